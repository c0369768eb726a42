"""Input and output formats over storage.

``base.py`` holds the two interfaces (:class:`InputReader`, :class:`OutputWriter`),
``formats/`` one module per built-in format, ``registry.py`` the spec ``kind``
to class map (a format's module is imported on first use: Parquet's pyarrow
is slow to import), ``custom.py`` the shipping of user-defined classes, and
``storage.py`` the fsspec layer beneath them all. The public names are
``skybatch``'s own (``skybatch.JsonReader``, ...).
"""
