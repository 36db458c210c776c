"""Single-process checks of the TP MLP: sharding math, pipeline split, determinism, and the echo worker."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from worker.spec import Topology, WorkerSpec, WorkloadSettings
from worker.tp_mlp import (
    EchoWorker,
    layer_weights,
    make_input,
    reference_forward,
    shard_layer,
    simulate_parallel_forward,
    stage_layers,
    validate,
)

SETTINGS = WorkloadSettings(hidden=32, layers=8, batch=4, seed=3)
TOL = 1e-4


@pytest.mark.parametrize("pp", [1, 2, 4, 8])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_simulated_sharding_matches_reference(tp: int, pp: int) -> None:
    x = make_input(SETTINGS, step=0)
    expected = reference_forward(SETTINGS, x)
    got = simulate_parallel_forward(SETTINGS, x, tp=tp, pp=pp)
    assert got.shape == (SETTINGS.batch, SETTINGS.hidden)
    assert (got - expected).abs().max().item() < TOL


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_shards_reassemble_full_weights(tp: int) -> None:
    full = layer_weights(SETTINGS, 1)
    shards = [shard_layer(full, tp, r) for r in range(tp)]
    assert torch.equal(torch.cat([s["w1"] for s in shards], dim=0), full["w1"])
    assert torch.equal(torch.cat([s["b1"] for s in shards], dim=0), full["b1"])
    assert torch.equal(torch.cat([s["w2"] for s in shards], dim=1), full["w2"])
    assert all(torch.equal(s["b2"], full["b2"]) for s in shards)


def test_stage_layers_partition_in_order() -> None:
    stages = [list(stage_layers(8, 4, r)) for r in range(4)]
    assert stages == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_validate_rejects_uneven_layouts() -> None:
    with pytest.raises(ValueError, match="tp=3"):
        validate(SETTINGS, tp=3, pp=1)
    with pytest.raises(ValueError, match="pp=3"):
        validate(SETTINGS, tp=1, pp=3)


def test_weights_are_deterministic_per_seed_and_layer() -> None:
    a, b = layer_weights(SETTINGS, 2), layer_weights(SETTINGS, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["w1"], layer_weights(SETTINGS, 3)["w1"])
    other_seed = WorkloadSettings(hidden=32, layers=8, batch=4, seed=4)
    assert not torch.equal(a["w1"], layer_weights(other_seed, 2)["w1"])
    assert all(t.dtype == torch.float32 for t in a.values())


def test_inputs_are_deterministic_per_step() -> None:
    x = make_input(SETTINGS, step=5)
    assert x.shape == (SETTINGS.batch, SETTINGS.hidden) and x.dtype == torch.float32
    assert torch.equal(x, make_input(SETTINGS, step=5))
    assert not torch.equal(x, make_input(SETTINGS, step=6))


def test_activations_stay_order_one_for_deep_stacks() -> None:
    deep = WorkloadSettings(hidden=64, layers=64, batch=16, seed=0)
    out = reference_forward(deep, make_input(deep, step=0))
    assert torch.isfinite(out).all()
    assert 0.5 < out.std().item() < 3.0


# -- echo worker --------------------------------------------------------------------------------------------------
def _echo_spec(pp_rank: int, tp_rank: int, tp: int = 2, pp: int = 2) -> WorkerSpec:
    topo = Topology(dp_rank=0, pp_rank=pp_rank, tp_rank=tp_rank, tp=tp, pp=pp, dp=1)
    return WorkerSpec(topology=topo, device="cpu", local_rank=0, rendezvous="file:///nonexistent")


def test_echo_worker_answers_only_from_output_rank() -> None:
    out = EchoWorker(_echo_spec(pp_rank=1, tp_rank=0))
    out.init_device()  # must not touch torch.distributed (the rendezvous above does not exist)
    assert out.execute_model(1, k="v") == (2, (1,), {"k": "v"})
    assert out.echo({"a": [1]}) == {"a": [1]} and out.sleep(0) == 0 and out.pid() > 0
    assert EchoWorker(_echo_spec(pp_rank=0, tp_rank=0)).execute_model(1) is None
    assert EchoWorker(_echo_spec(pp_rank=1, tp_rank=1)).execute_model(1) is None


def test_echo_worker_module_does_not_import_torch() -> None:
    # The echo worker exists to start fast; importing its module must not pull in torch.
    code = "import sys, worker.tp_mlp as m; m.EchoWorker; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
