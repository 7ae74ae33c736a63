"""Search worker processes: `python -m tilefuse.autotune.worker` reads one JSON job on stdin and runs the ask →
measure → tell loop on a shared Optuna study (one process per GPU; `TILEFUSE_WORKER_INDEX` tells it which)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from typing import Any

log = logging.getLogger("tilefuse.autotune")

WORKER_INDEX_ENV = "TILEFUSE_WORKER_INDEX"


def worker_request(job: Any, url: str, study_name: str, measure_target: str, heartbeat_interval: int) -> str:
    return json.dumps({
        "job": job.to_dict(), "url": url, "study": study_name, "measure": measure_target,
        "heartbeat_interval": heartbeat_interval,
    })  # fmt: skip


def launch_workers(job: Any, url: str, study_name: str, workers: int, measure_target: str,
                   heartbeat_interval: int) -> list[int]:  # fmt: skip
    """Run `workers` worker processes on the study until each stops; returns their exit codes. A worker that dies
    is logged, not raised: its running trial goes stale and the other workers (or the caller) finish the study."""
    request = worker_request(job, url, study_name, measure_target, heartbeat_interval)
    procs = []
    for index in range(workers):
        env = dict(os.environ)
        env[WORKER_INDEX_ENV] = str(index)
        if measure_target == "gpu" and "CUDA_VISIBLE_DEVICES" not in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = str(index)  # one GPU per worker
        proc = subprocess.Popen([sys.executable, "-m", "tilefuse.autotune.worker"], stdin=subprocess.PIPE, env=env,
                                text=True)  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(request)
        proc.stdin.close()
        procs.append(proc)
    codes = [proc.wait() for proc in procs]
    for index, code in enumerate(codes):
        if code != 0:
            log.warning("tuning worker %d exited with status %d; its unfinished trial is failed by heartbeat",
                        index, code)  # fmt: skip
    return codes


def main() -> int:
    import optuna

    from .search import resolve_measure
    from .study import SearchJob, make_storage, run_worker

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    request = json.loads(sys.stdin.read())
    job = SearchJob.from_dict(request["job"])
    index = int(os.environ.get(WORKER_INDEX_ENV, "0"))
    storage = make_storage(request["url"], int(request["heartbeat_interval"]))
    study = optuna.load_study(study_name=request["study"], storage=storage, sampler=job.sampler(job.seed + 1 + index))
    measured = run_worker(study, job, resolve_measure(request["measure"], job.kind), worker=str(index))
    log.info("tuning worker %d measured %d configs", index, measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
