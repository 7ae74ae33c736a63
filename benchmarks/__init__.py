"""tilefuse benchmarks: `python benchmarks/run.py SUITE` runs one suite (see benchmarks/README.md).

One module per suite (`suite_*.py`); `harness.py` holds what they share: the environment record, output checks,
timing and the record type; `report.py` writes JSON, markdown and plots.
"""
