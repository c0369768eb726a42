"""Providers: where a pool's workers run.

``base.py`` is the interface (four methods), ``local.py`` the default,
``testing.py`` the local one with slowness and failures on demand, for the
tests. ``../registry.py`` maps a pool YAML's ``provider:`` to one of them and
its config model, loading it only when a pool asks for it.
"""
