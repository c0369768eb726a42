"""Worker pools: the pool YAML (``spec.py``) and the providers that run workers (``providers/``)."""
