"""What a script run (workload=script) needs of the configuration; each problem is one ConfigError line."""
from __future__ import annotations

import os

from supervisor.errors import ConfigError
from worker.spec import NodePlace

MODES = ("fresh", "fast")
STREAM_MASKS = range(4)  # torchrun's --redirects / --tee: 0 none, 1 stdout, 2 stderr, 3 both


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def check_config(cfg) -> None:
    s = cfg.launch
    _require(bool(s.script), "launch.script", "workload=script needs a script (launch.script=train.py)")
    _require(s.mode in MODES, "launch.mode", f"must be one of {'|'.join(MODES)}, got {s.mode!r}")
    _require(not (s.module and s.no_python), "launch.no_python", "cannot be combined with launch.module (-m)")
    _require(not (s.no_python and s.mode == "fast"), "launch.mode",
             "fast runs a Python script inside a rank process; --no-python commands need mode fresh")
    if not s.module and not s.no_python:
        _require(os.path.isfile(s.script), "launch.script", f"no such file: {s.script}")
    for key in ("redirects", "tee"):
        _require(getattr(s, key) in STREAM_MASKS, f"launch.{key}",
                 f"must be 0 (none), 1 (stdout), 2 (stderr) or 3 (both), got {getattr(s, key)!r}")
    world = cfg.parallel.group_world
    bad = [r for r in s.local_ranks_filter if not 0 <= r < world]
    _require(not bad, "launch.local_ranks_filter", f"rank {bad[0] if bad else ''} is not one of the {world} ranks")
    _require(cfg.parallel.dp == 1, "parallel.dp", "a script run is one torch.distributed world: dp must be 1")
    _require(s.node == NodePlace(), "launch.node", "is set by rankvisor-run --nnodes for each round, not by hand")
    _require(cfg.backend == "local", "backend",
             "workload=script runs on the local backend: past one machine, run rankvisor-run --nnodes on each "
             "node (README: multi-node)")
