"""tilefuse.costmodel: rank tile configs without running them.

`hardware` (GPU table) · `analytic` (roofline × occupancy × waves latency model from a TiledPlan, the default
when no learned model exists) · `features` (compile for a GPU arch on CPU: TTGIR op mix via `mlir`, registers,
spills, shared memory; cached on disk) · `variants` (the kernel a TiledPlan launches).
"""
