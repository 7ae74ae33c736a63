"""tilefuse.costmodel."""
