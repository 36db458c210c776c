"""The TP MLP on a real torch.distributed (gloo) world of spawned processes, without the supervisor."""
from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import time
import traceback
from pathlib import Path

import pytest
import torch

from worker.spec import Topology, WorkerSpec, WorkloadSettings
from worker.tp_mlp import TPMLPWorker, make_input, reference_forward

SETTINGS = WorkloadSettings(hidden=64, layers=4, batch=4, seed=11)
STEP = 3
DEADLINE_S = 60.0


def _run_rank(spec: WorkerSpec, results: "mp.Queue") -> None:
    """Child body: the worker lifecycle, reporting (rank, ok, payload) to the parent."""
    rank = spec.topology.rank
    try:
        worker = TPMLPWorker(spec)
        worker.init_device()
        worker.load_model()
        out = worker.execute_model(make_input(spec.workload, STEP))
        health = worker.check_health()
        worker.shutdown()
        # numpy, not a torch tensor: a tensor would travel through shared memory owned by this (exiting) process.
        results.put((rank, True, (None if out is None else out.numpy(), health)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        raise


def _specs(tp: int, pp: int, rendezvous: str) -> list[WorkerSpec]:
    return [
        WorkerSpec(
            topology=Topology(dp_rank=0, pp_rank=p, tp_rank=t, tp=tp, pp=pp, dp=1),
            device="cpu",
            local_rank=0,
            rendezvous=rendezvous,
            workload=SETTINGS,
        )
        for p in range(pp)
        for t in range(tp)
    ]


def _collect(results: "mp.Queue", n: int) -> dict[int, tuple]:
    """Gather n reports before joining (a child blocks on exit until its queued data is read); fail fast."""
    got: dict[int, tuple] = {}
    deadline = time.monotonic() + DEADLINE_S
    while len(got) < n:
        try:
            rank, ok, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue_mod.Empty:
            pytest.fail(f"timed out waiting for ranks {sorted(set(range(n)) - set(got))}")
        if not ok:
            pytest.fail(_failures(results, rank, payload))
        got[rank] = payload
    return got


def _failures(results: "mp.Queue", rank: int, payload: str, grace_s: float = 2.0) -> str:
    """The first error is often a peer's 'connection reset'; wait briefly so the root cause is reported too."""
    reports = [f"rank {rank} failed:\n{payload}"]
    deadline = time.monotonic() + grace_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            r, ok, p = results.get(timeout=left)
        except queue_mod.Empty:
            break
        if not ok:
            reports.append(f"rank {r} failed:\n{p}")
    return "\n".join(reports)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (2, 2), (1, 2)])
def test_distributed_forward_matches_reference(tp: int, pp: int, tmp_path: Path, monkeypatch) -> None:
    # Spawned children inherit os.environ at start(). gloo picks its interface from the hostname, which in
    # containers/CI often resolves to an address no peer can reach (or none at all); all ranks share this host,
    # so pin gloo to loopback. One OpenMP thread per rank: n ranks x all-cores threads would oversubscribe.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    specs = _specs(tp, pp, "file://" + str(tmp_path / "rendezvous"))
    procs = [ctx.Process(target=_run_rank, args=(s, results), daemon=True) for s in specs]
    try:
        for p in procs:
            p.start()
        got = _collect(results, len(procs))
        for p in procs:
            p.join(timeout=DEADLINE_S)
            assert p.exitcode == 0, f"{p.name} exit code {p.exitcode}"
    finally:
        for p in procs:  # leftovers after a failure: kill so no rank outlives the test
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    output_ranks = [r for r, (out, _) in got.items() if out is not None]
    assert output_ranks == [(pp - 1) * tp]  # first TP rank of the last stage, and only it
    out = torch.from_numpy(got[output_ranks[0]][0])
    expected = reference_forward(SETTINGS, make_input(SETTINGS, STEP))
    assert (out - expected).abs().max().item() < SETTINGS.check_tolerance
    assert sum(h["params"] for _, h in got.values()) == SETTINGS.layers * (8 * 64 * 64 + 4 * 64 + 64 * tp)
