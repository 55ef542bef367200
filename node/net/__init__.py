"""The network floor every stage shares: TLS contexts, socket options, pynetdicom's process-wide switches."""
