"""The runner: the process that runs the user's mapper on a worker, one per job.

Standard library only, and no imports from skybatch: the agent starts ``main.py``
by its path, in the user's environment (where skybatch may not be installed),
and ``main.py`` loads ``codec.py`` from beside it. The agent imports ``main.py``
for the frame format; ``io/`` imports ``codec.py`` for the format tags (and the
image writer for :func:`~skybatch.runner.codec.unpack_files`).
"""
