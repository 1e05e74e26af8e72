"""The router role: the registry of nodes, dispatch over them, and the HTTP client that talks to one."""
