"""tilefuse.autotune: tile configs per fused site — search space (`space`), tuning keys (`keys`), the tuning
database (`db`), the search (`search`, `study`, `worker`), GPU measurement (`measure`), the compile-time registry
the launchers read (`registry.config_for`), and the `tilefuse tune` / `tilefuse db` commands (`cli`).
"""
