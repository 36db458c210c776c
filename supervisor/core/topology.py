"""Who runs where: the dp × pp × tp layout turned into one WorkerSpec per rank. Pure functions."""
from __future__ import annotations

import dataclasses
import os
import socket

from supervisor.settings import Config
from worker.spec import Topology, WorkerSpec

TREE_ENV = "RANKVISOR_TREE"
LOOPBACK = "127.0.0.1"
TORCHRUN_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
RANK_ENV_KEYS = (*TORCHRUN_KEYS, "RANKVISOR_DP_RANK", "RANKVISOR_GLOBAL_RANK")  # what names one rank


def visible_gpus() -> int:
    """GPUs this process may use: those torch and the driver can really use (supervisor/gpu.py: a CUDA build of
    torch, devices the driver sees, CUDA_VISIBLE_DEVICES applied), found without importing torch -- the supervisor
    stays light and never initialises CUDA."""
    from supervisor.gpu import usable_gpus

    return len(usable_gpus())


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if visible_gpus() > 0 else "cpu"
    return device


def group_topologies(cfg: Config, dp_rank: int) -> list[Topology]:
    p = cfg.parallel
    return [Topology(dp_rank=dp_rank, pp_rank=pp, tp_rank=tp, tp=p.tp, pp=p.pp, dp=p.dp)
            for pp in range(p.pp) for tp in range(p.tp)]


def gpu_index(cfg: Config, dp_rank: int, rank: int, n_gpus: int) -> int:
    """Ranks fill GPUs in global-rank order; groups wrap around when several dp replicas share the cards."""
    return (dp_rank * cfg.parallel.group_world + rank) % max(n_gpus, 1)


def worker_env(cfg: Config, device: str, backend: str = "local", marker: str = "") -> tuple[tuple[str, str], ...]:
    env = dict(cfg.runtime.env)
    if "OMP_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(cfg.runtime.omp_num_threads or 1)
    if backend == "local" and not cfg.launch.node.multi_node:  # one host: keep gloo's / NCCL's sockets on loopback
        env.setdefault("GLOO_SOCKET_IFNAME" if device == "cpu" else "NCCL_SOCKET_IFNAME", "lo")
    if device == "cuda":
        # NVLink multicast off: on shared hosts it can put the GPUs out of service (device notes).
        env.setdefault("NCCL_NVLS_ENABLE", "0")
        env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    env[TREE_ENV] = marker or str(os.getpid())
    return tuple(sorted(env.items()))


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on ``host`` right now (the kernel picks it; torchrun's own way). It can be taken by someone
    else before it is used: callers that bind it must cope, as torchrun's do."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def torchrun_env(topo: Topology, local_rank: int, local_world_size: int, master_addr: str,
                 master_port: int) -> dict[str, str]:
    """The variables torchrun gives each process, for one rank of this layout.

    A dp group is one torch.distributed world (the groups of a dp > 1 run are independent replicas, restarted
    apart), so RANK / WORLD_SIZE are the rank and size inside that world, exactly what init_process_group sees.
    LOCAL_RANK is the rank's index on its host, and with CUDA the index of its card, so the usual
    ``torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))`` picks the card the supervisor assigned.
    MASTER_ADDR / MASTER_PORT name a port free at spawn time, one per group start: our own world meets through a
    private file:// rendezvous instead, so the port is there for code that opens its own store or second world.
    RANKVISOR_DP_RANK and RANKVISOR_GLOBAL_RANK carry what torchrun has no name for."""
    return {
        "RANK": str(topo.rank),
        "WORLD_SIZE": str(topo.world_size),
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "RANKVISOR_DP_RANK": str(topo.dp_rank),
        "RANKVISOR_GLOBAL_RANK": str(topo.global_rank),
    }


def _master(rendezvous: str) -> tuple[str, int]:
    """The group's meeting point: a tcp:// rendezvous's own address (Ray), else a free loopback port."""
    if rendezvous.startswith("tcp://"):
        host, _, port = rendezvous[len("tcp://"):].rpartition(":")
        return host, int(port)
    return LOOPBACK, free_port()


def script_settings(cfg: Config):
    """workload=script: the launch settings as a rank sees them. TORCHELASTIC_MAX_RESTARTS is the restart budget
    (restart.intensity, 0 when the policy never restarts); logs go to the run directory unless launch.log_dir says."""
    budget = 0 if cfg.restart.strategy == "never" else cfg.restart.intensity
    return dataclasses.replace(cfg.launch, max_restarts=budget, log_dir=cfg.launch.log_dir or cfg.logging.run_dir)


def build_specs(cfg: Config, dp_rank: int, attempt: int, rendezvous: str, device: str,
                backend: str = "local", marker: str = "") -> list[WorkerSpec]:
    n_gpus = visible_gpus() if device == "cuda" else 0
    shared = worker_env(cfg, device, backend, marker)
    addr, port = _master(rendezvous)
    user = {k for k, _ in cfg.runtime.env}
    specs = _specs(cfg, dp_rank, attempt, rendezvous, device, n_gpus, shared)
    out = []
    for spec in specs:  # torchrun's variables, unless the user set one explicitly in runtime.env
        local = spec.local_rank if device == "cuda" else spec.topology.rank
        tr = torchrun_env(spec.topology, local, cfg.parallel.group_world, addr, port)
        env = dict(shared) | {k: v for k, v in tr.items() if k not in user}
        out.append(dataclasses.replace(spec, env=tuple(sorted(env.items()))))
    return out


def _specs(cfg: Config, dp_rank: int, attempt: int, rendezvous: str, device: str, n_gpus: int,
           env: tuple[tuple[str, str], ...]) -> list[WorkerSpec]:
    return [
        WorkerSpec(
            topology=topo,
            device=device,
            local_rank=gpu_index(cfg, dp_rank, topo.rank, n_gpus) if device == "cuda" else 0,
            rendezvous=rendezvous,
            transport=cfg.transport,
            worker=cfg.worker,
            workload=cfg.workload,
            llm=cfg.llm,
            script=script_settings(cfg),
            env=env,
            attempt=attempt,
            log_level=cfg.logging.level,
            supervisor_pid=os.getpid(),
            stop_grace_s=cfg.shutdown.grace_s,
        )
        for topo in group_topologies(cfg, dp_rank)
    ]
