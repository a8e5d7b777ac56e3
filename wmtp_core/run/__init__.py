"""A run: the start point it continues from, the plan every process reads, and the summary of what it did (its
directory's file names are wmtp_core.layout)."""
