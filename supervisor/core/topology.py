"""Who runs where: the dp × pp × tp layout turned into one WorkerSpec per rank. Pure functions."""
from __future__ import annotations

import glob
import os

from supervisor.settings import Config
from worker.spec import Topology, WorkerSpec

TREE_ENV = "RANKVISOR_TREE"


def visible_gpus() -> int:
    """GPUs this process may use, found without importing torch (the supervisor stays light and never
    initialises CUDA): CUDA_VISIBLE_DEVICES if set, else the NVIDIA driver's /proc entries."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [x for x in env.split(",") if x.strip() and x.strip() != "-1"]
        return len(ids)
    return len(glob.glob("/proc/driver/nvidia/gpus/*"))


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


def worker_env(cfg: Config, device: str, backend: str = "local") -> tuple[tuple[str, str], ...]:
    env = dict(cfg.runtime.env)
    if "OMP_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(cfg.runtime.omp_num_threads or 1)
    if backend == "local":  # one host: keep gloo's / NCCL's sockets on loopback
        env.setdefault("GLOO_SOCKET_IFNAME" if device == "cpu" else "NCCL_SOCKET_IFNAME", "lo")
    if device == "cuda":
        # NVLink multicast off: on shared hosts it can put the GPUs out of service (device notes).
        env.setdefault("NCCL_NVLS_ENABLE", "0")
        env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    env[TREE_ENV] = str(os.getpid())
    return tuple(sorted(env.items()))


def build_specs(cfg: Config, dp_rank: int, attempt: int, rendezvous: str, device: str,
                backend: str = "local") -> list[WorkerSpec]:
    n_gpus = visible_gpus() if device == "cuda" else 0
    env = worker_env(cfg, device, backend)
    return [
        WorkerSpec(
            topology=topo,
            device=device,
            local_rank=gpu_index(cfg, dp_rank, topo.rank, n_gpus) if device == "cuda" else 0,
            rendezvous=rendezvous,
            transport=cfg.transport,
            worker=cfg.worker,
            workload=cfg.workload,
            env=env,
            attempt=attempt,
            log_level=cfg.logging.level,
            supervisor_pid=os.getpid(),
            stop_grace_s=cfg.shutdown.grace_s,
        )
        for topo in group_topologies(cfg, dp_rank)
    ]
