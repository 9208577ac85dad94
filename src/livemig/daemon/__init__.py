"""livemigd: one per host. It serves the CLI on a root-only Unix socket and peer daemons
over the authenticated wire protocol, and it runs the migrations of its host's VMs."""
