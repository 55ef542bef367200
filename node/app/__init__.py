"""The composition root: the service and its roles, worker processes, the CLI and the HTTP side."""
