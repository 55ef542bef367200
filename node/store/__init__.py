"""Where state lives: the spool of received instances, the job store, its database and task queue."""
