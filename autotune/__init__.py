"""tilefuse.autotune: tile configs per fused site and kernel family (attention forward, decode and backward, norm
forward and backward, RoPE) — search spaces (`space`), tuning keys (`keys`), the tuning database (`db`), the search
(`search`, `study`, `worker`), GPU measurement (`measure`), the compile-time registry (`registry`, which
fills the launchers' table in codegen/launch_configs.py), and the `tilefuse tune` / `tilefuse db` commands (`cli`).
"""
