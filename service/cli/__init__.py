"""Every ``seqserve`` command, one module per command group, and the exit codes."""
