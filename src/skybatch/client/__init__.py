"""The user's side: datasets, mappers, jobs and the HTTP client."""
