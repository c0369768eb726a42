"""The control plane: HTTP routes, job and pool services, scheduler, state store."""
