"""tilefuse.autotune."""
