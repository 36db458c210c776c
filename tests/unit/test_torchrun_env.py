"""torchrun's variables for each rank of a layout (pure: topology.build_specs / torchrun_env)."""
from __future__ import annotations

from supervisor.config import load_config
from supervisor.core.topology import TORCHRUN_KEYS, build_specs


def _envs(*overrides, dp_rank=0, rendezvous="file:///tmp/rdzv", device="cpu"):
    cfg = load_config(["device=cpu", *overrides])
    return [dict(s.env) for s in build_specs(cfg, dp_rank, 0, rendezvous, device)]


def test_every_rank_gets_torchruns_variables_with_the_worlds_meaning():
    envs = _envs("parallel.tp=2", "parallel.pp=2", "parallel.dp=2", dp_rank=1)
    assert all(set(TORCHRUN_KEYS) <= set(e) for e in envs)
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]  # rank inside the group's torch world
    assert {e["WORLD_SIZE"] for e in envs} == {"4"} and {e["LOCAL_WORLD_SIZE"] for e in envs} == {"4"}
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["RANKVISOR_GLOBAL_RANK"] for e in envs] == ["4", "5", "6", "7"]
    assert {e["RANKVISOR_DP_RANK"] for e in envs} == {"1"}
    assert len({(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs}) == 1  # one meeting point per group
    assert 0 < int(envs[0]["MASTER_PORT"]) < 65536


def test_a_tcp_rendezvous_is_the_master_and_the_users_own_value_wins():
    envs = _envs("parallel.tp=2", "+runtime.env.MASTER_PORT=1234", rendezvous="tcp://10.0.0.5:29500")
    assert {e["MASTER_ADDR"] for e in envs} == {"10.0.0.5"}
    assert {e["MASTER_PORT"] for e in envs} == {"1234"}
