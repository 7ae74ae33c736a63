"""tilefuse.compiler."""
