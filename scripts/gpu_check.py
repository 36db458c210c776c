"""Everything that needs a GPU, in one run on the device machine: the `cuda` tests, then measurements, then a
short table. Usage: python scripts/gpu_check.py [--skip-tests]. Prints the table last."""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from supervisor import gpu  # noqa: E402
from supervisor.core.topology import visible_gpus  # noqa: E402

GIB = 1 << 30
ROWS: list[tuple[str, str]] = []


def row(key: str, value) -> None:
    ROWS.append((key, str(value)))
    print(f"[gpu_check] {key}: {value}", flush=True)


def cli(*overrides: str, env: dict | None = None) -> dict[str, str]:
    """Run `python -m supervisor ...`; return its summary lines as a dict (plus rc)."""
    proc = subprocess.run([sys.executable, "-m", "supervisor", *overrides], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})
    out = {"rc": str(proc.returncode)}
    for line in proc.stdout.splitlines():
        m = re.match(r"\s{2}(.+?)\s{2,}(.+)$", line)
        if m:
            out[m.group(1).strip()] = m.group(2).strip()
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:], flush=True)
    return out


def cli_rows(label: str, *overrides: str, env: dict | None = None) -> None:
    s = cli(*overrides, env=env)
    row(f"{label}: rc / check", f"{s['rc']} / {s.get('check vs reference', '?')}")
    row(f"{label}: READY from command start", s.get("start-up to READY (from the command's start)", "?"))
    row(f"{label}: steps/s; step p50/p99", f"{s.get('steps/s', '?')}; {s.get('steps p50 / p99', '?')}")
    row(f"{label}: rpc p50/p99", s.get("rpc (check_health, all ranks) p50 / p99", "?"))
    row(f"{label}: shutdown", s.get("shutdown", "?"))


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def hold(nbytes):
    def fn(w):
        import torch

        w._ballast = torch.empty(nbytes, dtype=torch.uint8, device=w.device)
        torch.cuda.synchronize()
        return os.getpid()
    return fn


def gone_from_gpu(pids, t0: float, timeout: float = 10.0) -> float | None:
    while time.monotonic() - t0 < timeout:
        if not set(pids) & set(gpu.memory_by_pid()):
            return time.monotonic() - t0
        time.sleep(0.002)
    return None


def measure_kill_restart(tp: int, label: str) -> None:
    from supervisor.api import Supervisor
    from supervisor.config import load_config
    from worker.tp_mlp import make_input

    cfg = load_config(["device=cuda", f"parallel.tp={tp}", "restart=one_for_all", "restart.intensity=50",
                       "logging.events=false", "logging.level=WARNING"])
    base = [gpu.used_bytes(i) for i in range(tp)]
    with Supervisor(cfg) as sup:
        x = make_input(cfg.workload, 0)
        sup.execute_model(x, timeout=60)
        t = time.perf_counter()
        lat = []
        for _ in range(300):
            t1 = time.perf_counter()
            sup.collective_rpc("ping", timeout=10)
            lat.append(time.perf_counter() - t1)
        row(f"{label}: ping RPC all ranks p50/p99 (us)", f"{pct(lat, .5) * 1e6:.0f} / {pct(lat, .99) * 1e6:.0f}")
        detect, freed, ready = [], [], []
        for _ in range(3):
            old = sup.collective_rpc(hold(8 * GIB if tp == 1 else 4 * GIB), timeout=120)
            t0 = time.monotonic()
            t0_unix = time.time()
            os.kill(old[-1], signal.SIGKILL)
            freed.append(gone_from_gpu(old, t0))
            while not sup.serving(0) or set(old) & set(sup.pids()):
                time.sleep(0.002)
                if time.monotonic() - t0 > 120:
                    break
            ready.append(time.monotonic() - t0)
            ex = [e for e in sup.events.of_kind("exited") if e["pid"] == old[-1]]
            detect.append(ex[0]["time"] - t0_unix if ex else float("nan"))
            sup.execute_model(x, timeout=60)
        row(f"{label}: kill -9 -> exited event (ms)", " ".join(f"{d * 1e3:.1f}" for d in detect))
        row(f"{label}: kill -9 -> old ranks' GPU memory released (s)",
            " ".join("never" if f is None else f"{f:.3f}" for f in freed))
        row(f"{label}: kill -9 -> group READY again (s)", " ".join(f"{r:.2f}" for r in ready))
        row(f"{label}: used GiB per GPU before tree / now",
            f"{[round(b / GIB, 2) for b in base]} / {[round(gpu.used_bytes(i) / GIB, 2) for i in range(tp)]}")


def measure_supervisor_sigkill() -> None:
    from tests.integration.helpers import TreeInChild

    tree = TreeInChild("device=cuda", "parallel.tp=1", "parallel.dp=2", "parallel.share_gpus=true")
    try:
        pids = tree.pids
        t0 = time.monotonic()
        tree.kill(signal.SIGKILL)
        row("supervisor SIGKILL -> no process of ours on the GPU (s)", gone_from_gpu(pids, t0))
    finally:
        tree.wait()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args()
    n = visible_gpus()
    import torch

    row("GPUs visible / torch", f"{n} x {torch.cuda.get_device_name(0) if n else '-'} / {torch.__version__}")
    if not args.skip_tests:
        one = {"CUDA_VISIBLE_DEVICES": "0"}
        rc1 = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/integration/test_cuda.py",
                              "-k", "not nccl", "-p", "no:cacheprovider"], cwd=REPO, env={**os.environ, **one}).returncode
        rc2 = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/integration/test_cuda.py",
                              "-k", "nccl", "-p", "no:cacheprovider"], cwd=REPO).returncode
        row("cuda tests (1 GPU / all GPUs) exit codes", f"{rc1} / {rc2}")
    one = {"CUDA_VISIBLE_DEVICES": "0"}
    cli_rows("tp=1 device=cuda", "device=cuda", "parallel.tp=1", "workload.steps=200", env=one)
    cli_rows("tp=1 dp=2 shared GPU", "device=cuda", "parallel.dp=2", "parallel.share_gpus=true",
             "workload.steps=200", env=one)
    cli_rows("tp=1 device=auto", "device=auto", "workload.steps=50", env=one)
    for tp, pp in [(2, 1), (1, 2)]:
        if n >= tp * pp:
            cli_rows(f"tp={tp} pp={pp} NCCL", "device=cuda", f"parallel.tp={tp}", f"parallel.pp={pp}",
                     "workload.steps=200")
    measure_kill_restart(1, "tp=1 one_for_all")
    if n >= 2:
        measure_kill_restart(2, "tp=2 NCCL one_for_all")
    measure_supervisor_sigkill()
    width = max(len(k) for k, _ in ROWS)
    print("\n=== gpu_check summary ===")
    for k, v in ROWS:
        print(f"  {k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
