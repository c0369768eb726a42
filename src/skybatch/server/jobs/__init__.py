"""The job service, split by responsibility: see ``service.py`` for the map."""

from skybatch.server.jobs.service import JobService

__all__ = ["JobService"]
