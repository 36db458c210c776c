#!/usr/bin/env python
"""Kill -9 soak of start-up: nothing may be left in /dev/shm (issue 14 part 3).

Each round starts ``python -m supervisor worker=echo workload=serve parallel.tp=N``, waits a random instant of its
start-up (0 .. --window s: imports, config, spawning, attaching rings, READY), then SIGKILLs the supervisor and
every process of its tree at once, in a random order, and checks:

* /dev/shm holds no segment (``rvq-<pid>-...``) owned by any process of that tree, with no sweep run, and
* every process of the tree is gone.

With anonymous segments (the default, transport/shm.py) there is no name that a crash could leave behind; run
``--named`` to see what named segments leave without the next supervisor's sweep.

    python scripts/shm_soak.py               # 200 rounds at tp=2
    python scripts/shm_soak.py --rounds 20 --named
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from transport import shm  # noqa: E402

_TREE_GONE_S = 10.0  # bound on the wait for a killed tree's processes to vanish


@dataclass
class Round:
    killed_at_s: float
    tree: int  # processes of the tree when it was killed
    left_segments: list[str]
    survivors: list[int]


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def one_round(rng: random.Random, run_dir: str, tp: int = 2, window_s: float = 2.5, named: bool = False) -> Round:
    env = {**os.environ, "PYTHONPATH": ROOT, shm.NAMED_ENV: "1" if named else "0"}
    args = [sys.executable, "-m", "supervisor", "worker=echo", "workload=serve", f"parallel.tp={tp}",
            "logging.level=ERROR", "logging.events=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, env=env, cwd=run_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    at = rng.uniform(0.0, window_s)
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + at
    while time.monotonic() < deadline:  # remember every process the tree had, however briefly
        seen.update((p.pid, p) for p in _tree(proc))
        time.sleep(0.01)
    victims = _tree(proc)
    seen.update((p.pid, p) for p in victims)
    rng.shuffle(victims)
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    proc.wait(_TREE_GONE_S)
    _, alive = psutil.wait_procs([p for p in seen.values() if p.pid != proc.pid], timeout=_TREE_GONE_S)
    pids = set(seen) | {proc.pid}
    left = [n for n in shm.list_segments() if shm.owner_pid(n) in pids]
    return Round(at, len(victims), left, [p.pid for p in alive])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--window", type=float, default=2.5, help="kill instants are uniform in 0..WINDOW seconds")
    ap.add_argument("--named", action="store_true", help="named /dev/shm segments instead of anonymous ones")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    rng = random.Random(seed)
    leaked = survivors = 0
    with tempfile.TemporaryDirectory(prefix="shm-soak-") as tmp:
        t0 = time.monotonic()
        for i in range(args.rounds):
            r = one_round(rng, tmp, args.tp, args.window, args.named)
            leaked += len(r.left_segments)
            survivors += len(r.survivors)
            if r.left_segments or r.survivors:
                print(f"round {i}: killed at {r.killed_at_s:.3f} s ({r.tree} processes): left {r.left_segments} "
                      f"survivors {r.survivors}", flush=True)
                for name in r.left_segments:
                    shm.unlink(name)  # do not leave them to the machine
        elapsed = time.monotonic() - t0
    kind = "named" if args.named else "anonymous"
    print(f"{args.rounds} rounds ({kind} segments, tp={args.tp}, kill instants 0..{args.window} s, seed {seed}, "
          f"{elapsed:.0f} s): {leaked} segments left in /dev/shm, {survivors} processes survived")
    return 1 if leaked or survivors else 0


if __name__ == "__main__":
    sys.exit(main())
