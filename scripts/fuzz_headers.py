#!/usr/bin/env python
"""Fuzz the ring's headers: at least 100,000 corrupted rings, each read and written with zero timeouts.

Each input overwrites 1-4 header words of a ring that holds a bare pickle, an array frame and a frame streamed
over three slots (publication counter, futex words, reader counters, chunk records, frame headers), and now and
then the segment geometry a new reader attaches to. The contract (tests/unit/test_layout.py, ``Rig``): every call
returns a value or raises CorruptMessage / QueueTimeout / QueueClosed, within its timeout, and nothing allocates
more than max_message_bytes. A crash, a hang or another exception stops the run with the input that caused it.

    python scripts/fuzz_headers.py                  # 100,000 inputs, random seed (printed)
    python scripts/fuzz_headers.py -n 1000000 --seed 7
"""
from __future__ import annotations

import argparse
import collections
import faulthandler
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.unit.test_layout import GEOMETRY, INTERESTING, Rig, _FIELDS  # noqa: E402


def _value(rng: random.Random) -> int:
    pick = rng.random()
    if pick < 0.5:
        return rng.choice(INTERESTING)
    if pick < 0.75:
        return rng.randrange(0, 65)
    if pick < 0.9:
        return rng.getrandbits(32)
    return rng.getrandbits(64)


def _input(rng: random.Random):
    mutations = [(rng.randrange(len(_FIELDS)), _value(rng)) for _ in range(rng.randint(1, 4))]
    geometry = [(rng.randrange(len(GEOMETRY)), _value(rng)) for _ in range(rng.randint(1, 2))] \
        if rng.random() < 0.02 else []
    return mutations, geometry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--inputs", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"seed={seed} inputs={args.inputs}", flush=True)
    faulthandler.enable()
    rng = random.Random(seed)
    outcomes: collections.Counter[str] = collections.Counter()
    rig = Rig()
    t0 = time.monotonic()
    try:
        for i in range(args.inputs):
            mutations, geometry = _input(rng)
            faulthandler.dump_traceback_later(30, exit=True)  # a hang dumps the stacks and fails the run
            try:
                for outcome in rig.run(mutations, geometry):
                    outcomes[outcome] += 1
            except BaseException:
                named = [(_FIELDS[idx][0], value) for idx, value in mutations]
                print(f"FAILED on input {i} (seed {seed}): mutations {named}, geometry {geometry}", flush=True)
                raise
            if (i + 1) % 20_000 == 0:
                print(f"  {i + 1} inputs, {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        faulthandler.cancel_dump_traceback_later()
        rig.close()
    elapsed = time.monotonic() - t0
    total = sum(outcomes.values())
    print(f"\n{args.inputs} inputs, {total} calls in {elapsed:.1f} s, no crash, hang or stray exception (seed {seed})")
    print(f"{'outcome':24s} {'calls':>9s} {'share':>7s}")
    for outcome, n in outcomes.most_common():
        print(f"{outcome:24s} {n:9d} {n / total:7.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
