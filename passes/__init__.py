"""tilefuse.passes."""
