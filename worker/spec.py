"""Frozen specs that travel from the supervisor to a worker process.

The supervisor resolves and validates the Hydra configuration once, in the parent, into these plain frozen
dataclasses; a worker never sees Hydra or OmegaConf objects (``${hydra:}`` resolvers do not exist in a child).
Only what a worker needs lives here; supervisor-only settings live in ``supervisor/settings.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transport import defaults as _tx


@dataclass(frozen=True)
class TransportSettings:
    """Sizes of the shared-memory rings (layout: transport/layout.py). Defaults: transport/defaults.py."""

    slot_bytes: int = _tx.SLOT_BYTES  # payload bytes per slot of the broadcast ring; larger messages span slots
    slots: int = _tx.SLOTS  # slots per broadcast ring
    reply_slot_bytes: int = _tx.REPLY_SLOT_BYTES  # payload bytes per slot of each rank's reply ring
    reply_slots: int = _tx.REPLY_SLOTS  # slots per reply ring
    spin_us: float = _tx.SPIN_US  # busy-poll window before blocking in the kernel (futex)
    # How a waiting end polls within that window. auto: yield the CPU between polls where the ring's parties
    # outnumber the CPUs this process may use, else busy-poll; busy: always busy-poll (for ranks pinned to CPUs of
    # their own, whose affinity shows one CPU: auto would yield there); yield: always yield.
    spin_poll: str = "auto"
    max_message_bytes: int = _tx.MAX_MESSAGE_BYTES  # a header announcing more is treated as corrupt

    @property
    def spin_yield(self) -> bool | None:
        """``spin_poll`` as the queue's ``spin_yield`` argument (None: the queue decides)."""
        return {"busy": False, "yield": True}.get(self.spin_poll)


@dataclass(frozen=True)
class WorkloadSettings:
    """The built-in workload (tensor-parallel MLP) and the driver loop around it."""

    name: str = "tp_mlp"  # tp_mlp | echo | serve | bench | llm | script
    driver: str = ""  # "module:function" run instead of the named workload: fn(sup, stop) drives any worker.cls
    hidden: int = 256
    layers: int = 4
    batch: int = 8
    steps: int = 50
    seed: int = 0
    status_interval_s: float = 5.0  # serve mode: seconds between status lines
    # serve with worker=llm (supervisor/completions_serve.py): also answer prompts read line by line from stdin,
    # one answer a line on stdout; the end of input ends the run. Opt-in: a server's stdin is its launcher's.
    stdin: bool = False
    request_timeout_s: float = 300.0  # serve with worker=llm: one completion request's limit (HTTP or stdin)
    check_tolerance: float = 1e-4  # max abs error allowed against the single-process reference


@dataclass(frozen=True)
class LLMSettings:
    """The Llama-architecture decoder (``workload=llm``): which checkpoint, how it runs, what it is asked."""

    checkpoint: str = ""  # a local Hugging Face-format folder (config.json + *.safetensors); "" = the preset
    preset: str = "tiny"  # without a checkpoint: tiny | llama-3.2-1b (1b) | llama-3.1-8b (8b), seeded random weights
    cache_dir: str = ""  # where preset checkpoints are written once; "" = ~/.cache/rankvisor/llm
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16
    batch: int = 2  # prompts per step
    prompt_len: int = 16  # tokens of each seeded random prompt (when no prompt_ids / prompt_text is given)
    prompt_ids: tuple[int, ...] = ()  # one prompt as token ids, used for every row of the batch
    prompt_text: tuple[str, ...] = ()  # prompts as text (needs a tokenizer in the checkpoint folder), cycled
    max_new_tokens: int = 32  # greedy tokens generated per prompt
    max_seq_len: int = 0  # KV cache length; 0 = the prompt plus max_new_tokens
    seed: int = 0  # seed of the random checkpoint and the random prompts
    cuda_graphs: bool = True  # capture the decode step in a CUDA graph (device=cuda only; CPU runs eagerly)
    check: bool = True  # compare the greedy tokens with transformers' LlamaForCausalLM.generate


@dataclass(frozen=True)
class NodePlace:
    """Where one node's ranks sit in a multi-node job, for one round (set by ``rankvisor-run --nnodes``, per round:
    supervisor/launch/job.py). The defaults describe a single node, whose values come from its own tree instead."""

    group_rank: int = 0  # GROUP_RANK: this node's rank among the round's nodes
    group_world_size: int = 1  # GROUP_WORLD_SIZE: nodes in the round
    rank_offset: int = 0  # the global RANK of this node's local rank 0
    world_size: int = 0  # WORLD_SIZE: ranks of every node; 0 = this node's ranks only
    restart_count: int = -1  # TORCHELASTIC_RESTART_COUNT, the job's (one count for every node); -1 = the tree's own
    max_restarts: int = -1  # TORCHELASTIC_MAX_RESTARTS, the job's budget; -1 = derived from restart.*
    master_addr: str = ""  # MASTER_ADDR / MASTER_PORT of the round (global rank 0 hosts its store there)
    master_port: int = 0
    round: int = -1  # this node's round, numbering its log folders (attempt_<round>); -1 = the tree's attempt

    @property
    def multi_node(self) -> bool:
        return self.world_size > 0


@dataclass(frozen=True)
class ScriptSettings:
    """A torchrun-style script run as every rank (``workload=script``, or the ``rankvisor-run`` launcher)."""

    script: str = ""  # the script's path; with module=true a module name; with no_python=true a command
    args: tuple[str, ...] = ()  # its arguments
    module: bool = False  # torchrun -m: run ``python -m script``
    no_python: bool = False  # torchrun --no-python: run ``script`` itself as the command
    mode: str = "fresh"  # fresh: a new interpreter per rank (torchrun's way) | fast: runpy in a forkserver child
    run_id: str = "none"  # TORCHELASTIC_RUN_ID
    role: str = "default"  # ROLE_NAME
    redirects: int = 0  # torchrun's --redirects: 1 stdout, 2 stderr, 3 both go to the rank's log file only
    tee: int = 0  # torchrun's --tee: the same streams also go to the console (the files are always written)
    local_ranks_filter: tuple[int, ...] = ()  # console output only from these ranks; empty = every rank
    log_dir: str = ""  # per-rank logs and error files; "" = the run directory
    max_restarts: int = 0  # TORCHELASTIC_MAX_RESTARTS; the supervisor derives it from restart.*
    torchrun_exit_codes: bool = False  # launcher: exit 1 (torchrun's code) instead of 128+signal when signalled
    node: NodePlace = field(default_factory=NodePlace)  # set by rankvisor-run --nnodes for each round, not by hand


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker process runs: which class, how it proves liveness, when it is recycled."""

    cls: str = "worker.tp_mlp:TPMLPWorker"  # "module:Class", a subclass of worker.base.Worker
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 5.0  # no heartbeat for this long => declared hung
    orphan_grace_s: float = 0.5  # after the supervisor vanished: time to stop before os._exit
    max_rss_mb: int = 0  # 0 = no cap; above it the worker is recycled between calls
    max_calls: int = 0  # 0 = no cap
    # execute_model's call deadline (vLLM's is 300 s): ranks that have not answered by then are declared hung
    # (stacks dumped, killed, the restart policy acts). 0 = none. Other calls have a deadline only when asked
    # (collective_rpc(deadline=...)); a caller's timeout= never touches the ranks.
    call_deadline_s: float = 300.0
    # After a call fails with CUDA out of memory, hand the blocks torch's allocator cached for it back to the driver
    # (torch.cuda.empty_cache), so the device's memory is back at its level before the call: other processes on the
    # card (a dp replica sharing it, the next rank started there) can use it. false = keep them cached.
    empty_cache_on_oom: bool = True


@dataclass(frozen=True)
class Topology:
    """Where one rank sits in the dp × pp × tp layout. Ranks are numbered within their dp group's world."""

    dp_rank: int
    pp_rank: int
    tp_rank: int
    tp: int
    pp: int
    dp: int

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def rank(self) -> int:
        """Rank inside the group's torch.distributed world (pp-major, tp-minor)."""
        return self.pp_rank * self.tp + self.tp_rank

    @property
    def global_rank(self) -> int:
        """Rank in the whole tree (dp-major): how the API orders results and addresses ``unique_reply_rank``."""
        return self.dp_rank * self.world_size + self.rank

    @property
    def name(self) -> str:
        """Role name used for the process title and the log prefix: Worker_TP3, Worker_PP1_TP0, Worker_DP1_TP0."""
        parts = []
        if self.dp > 1:
            parts.append(f"DP{self.dp_rank}")
        if self.pp > 1:
            parts.append(f"PP{self.pp_rank}")
        parts.append(f"TP{self.tp_rank}")
        return "Worker_" + "_".join(parts)

    @property
    def is_output_rank(self) -> bool:
        """execute_model's result comes from the first TP rank of the last PP stage."""
        return self.pp_rank == self.pp - 1 and self.tp_rank == 0


@dataclass(frozen=True)
class WorkerSpec:
    """Everything one worker process needs to start. Picklable; no Hydra objects."""

    topology: Topology
    device: str  # "cpu" or "cuda" (already resolved from "auto" by the supervisor)
    local_rank: int  # index of the GPU on this host when device == "cuda"
    rendezvous: str  # torch.distributed init_method (file://... private to this group attempt)
    transport: TransportSettings = field(default_factory=TransportSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    workload: WorkloadSettings = field(default_factory=WorkloadSettings)
    llm: LLMSettings = field(default_factory=LLMSettings)
    script: ScriptSettings = field(default_factory=ScriptSettings)
    env: tuple[tuple[str, str], ...] = ()  # extra environment, set before torch is imported
    attempt: int = 0  # restart attempt of the group, for logs and events
    log_level: str = "INFO"
    supervisor_pid: int = 0
    stop_grace_s: float = 3.0  # the supervisor's shutdown grace: how long a deliberate stop may take
    weights: Any = None  # worker.weights.KeptWeights: this rank's shard in the weight keeper (None: load it)
    standby: bool = False  # a warm standby: warm_up(), then wait for a Promotion (worker/main.py)
