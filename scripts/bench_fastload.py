#!/usr/bin/env python
"""Weight load onto one GPU, in one process: worker/llm/fastload.py at a few settings against the plain path.

The stage (every layer, tp=1) is allocated once on the device; each load fills it again from the checkpoint, which
is in the page cache after the first (an untimed warm-up load). Settings, interleaved over ``--rounds`` (A B C, B C
A, ...): ``plain`` (SliceReader.fill: a pageable CPU tensor per slice, copied synchronously), and ``TxM`` = fastload
with T reader threads and staging buffers of M MiB (three of them). Medians; GB/s counts the checkpoint bytes loaded.

    python scripts/bench_fastload.py --preset llama-3.1-8b        # the 8B checkpoint is written first if missing
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bench_common as C  # noqa: E402  (also puts the repository root on sys.path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--settings", default="plain,8x128,16x128,4x128,8x32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cache-dir", default="")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_fastload.py: needs a CUDA device", file=sys.stderr)
        return 2
    from worker.llm import checkpoint, fastload
    from worker.llm.model import Alloc, Parallel, Stage, stage_fills
    from worker.llm.shape import preset

    shape, dev = preset(args.preset), torch.device("cuda")
    path = checkpoint.resolve("", args.preset, args.cache_dir, 0, args.dtype)
    stage = Stage(shape, Parallel(), shape.num_hidden_layers, Alloc(getattr(torch, args.dtype), dev))
    fills = stage_fills(stage, shape, Parallel(), range(shape.num_hidden_layers))
    nbytes = sum(p.numel() * p.element_size() for p in stage.parameters())
    reader = checkpoint.SliceReader(path)
    settings = args.settings.split(",")

    def load(setting: str) -> dict[str, float]:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            if setting == "plain":
                reader.fill(fills)
                stats = {}
            else:
                threads, mib = (int(x) for x in setting.split("x"))
                stats = fastload.fill(reader, fills, dev, threads=threads, buffer_bytes=mib << 20)
        torch.cuda.synchronize()
        return {"s": time.perf_counter() - t0, **stats}

    load(settings[-1])  # warm-up: the checkpoint into the page cache, the CUDA context, pinned-memory paths
    got: dict[str, list[dict[str, float]]] = {s: [] for s in settings}
    for r in range(args.rounds):
        for s in C.rotate(settings, r):
            got[s].append(load(s))
            C.log(f"{args.preset} {s}: {got[s][-1]['s']:.3f} s")
    base = C.median([g["s"] for g in got[settings[0]]])
    rows = []
    for s in settings:
        secs = C.median([g["s"] for g in got[s]])
        reads, pins = (C.median([g.get(k, 0.0) for g in got[s]]) for k in ("read_s", "stage_s"))
        rows.append([s, C.f_s(secs), f"{nbytes / secs / 1e9:.1f}", C.f_s(reads), C.f_s(pins),
                     C.f_x(C.ratio(secs, base))])
    print(C.format_table(f"weight load, {args.preset} {args.dtype}, {nbytes / 1e9:.1f} GB, tp=1, one GPU "
                         f"(medians of {args.rounds})", ["setting", "load", "GB/s", "waiting on reads",
                                                         "pinning buffers", f"vs {settings[0]}"], rows))
    reader.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
