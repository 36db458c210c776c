"""The validated, frozen configuration of one run (built once in the parent by supervisor/config.py).

Plain dataclasses with no Hydra objects: the parts a worker needs are the types from worker/spec.py, the rest is
supervisor-only.

Each default is written once, here: the YAML files under conf/ hold only what an option changes, and the structured
schema that types them is derived from these classes (supervisor/config.py). Each choice is an Enum here, so
OmegaConf checks it while composing and the code compares members, not strings.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from worker.spec import LLMSettings, ScriptSettings, TransportSettings, WorkerSettings, WorkloadSettings


class Choice(str, enum.Enum):
    """A configuration choice. The member's name is its value: OmegaConf looks members up by name and writes names
    to YAML, so the two spellings agree. A str subclass, so a member still works wherever the code or a library
    expects the string (f-strings, ``== "cuda"``, dict keys, loguru levels, ``mp.get_context``)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def choices(cls) -> str:
        return "|".join(member.value for member in cls)


class Device(Choice):
    auto = "auto"  # cuda when torch and the driver can really use a GPU here, else cpu
    cpu = "cpu"
    cuda = "cuda"


class StartMethod(Choice):
    auto = "auto"  # forkserver where the platform has it, else spawn
    spawn = "spawn"
    forkserver = "forkserver"
    fork = "fork"


class Strategy(Choice):
    """Which dp groups a restart restarts (supervisor/core/policy.py has the table)."""

    never = "never"
    one_for_one = "one_for_one"
    one_for_all = "one_for_all"
    rest_for_one = "rest_for_one"
    NEVER, ONE_FOR_ONE, ONE_FOR_ALL, REST_FOR_ONE = never, one_for_one, one_for_all, rest_for_one  # Python spelling


class RestartType(Choice):
    permanent = "permanent"
    transient = "transient"
    temporary = "temporary"
    PERMANENT, TRANSIENT, TEMPORARY = permanent, transient, temporary  # Python spelling


class CallsDuringRestart(Choice):
    wait = "wait"  # bounded by the call's timeout
    fail = "fail"


class RetryExecuteModel(Choice):
    """What is retried when a group fails mid-request (supervisor/core/retry.py, supervisor/serving.py)."""

    auto = "auto"  # generation requests (serving.Generator) continue on another group; execute_model steps do not
    always = "always"  # execute_model steps too: only for steps that keep no state in the group (tp_mlp, not llm)
    never = "never"  # neither


class Backend(Choice):
    local = "local"
    ray = "ray"


class PlacementStrategy(Choice):
    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


class LogLevel(Choice):
    """loguru's built-in levels; the lower-case spellings are accepted too (``logging.level=debug``)."""

    TRACE = "TRACE"
    DEBUG = "DEBUG"
    INFO = "INFO"
    SUCCESS = "SUCCESS"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"
    trace, debug, info, success, warning, error, critical = TRACE, DEBUG, INFO, SUCCESS, WARNING, ERROR, CRITICAL


@dataclass(frozen=True)
class ParallelSettings:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    share_gpus: bool = False  # device=cuda: dp replicas may share cards (ranks of one group never do)

    @property
    def group_world(self) -> int:
        """Ranks in one dp group (one torch.distributed world)."""
        return self.tp * self.pp

    @property
    def total(self) -> int:
        return self.tp * self.pp * self.dp


@dataclass(frozen=True)
class RuntimeSettings:
    start_method: StartMethod = StartMethod.auto
    preload: tuple[str, ...] = ("torch",)  # modules the forkserver imports once, before forking workers
    omp_num_threads: int = 0  # 0 = 1 unless OMP_NUM_THREADS is already set in the environment
    env: tuple[tuple[str, str], ...] = ()  # extra environment for the workers
    startup_timeout_s: float = 60.0  # spawn -> READY for a whole group


@dataclass(frozen=True)
class ShutdownSettings:
    grace_s: float = 3.0  # SIGTERM -> SIGKILL
    reap_s: float = 1.0  # after SIGKILL, how long to wait for the kernel to reap
    # shutdown(drain=True) and the CLI's first SIGTERM: new calls are refused at once (ShutdownInProgress) and calls
    # in flight get this long to finish before the stop above. Kept with grace_s + reap_s under Kubernetes' default
    # 30 s termination grace. An idle tree skips it; a second SIGTERM or Ctrl-C cuts it short.
    drain_s: float = 10.0
    # The CLI's stop signals: the same signal again within this many seconds of the first is that first one
    # delivered twice (``timeout`` signals the command and then its whole group; a kill of the group and of the
    # pid), not a second request. A person's second Ctrl-C comes later and forces the stop. 0 = every one counts.
    signal_window_s: float = 0.5


@dataclass(frozen=True)
class RestartSettings:
    strategy: Strategy = Strategy.never  # between dp groups
    restart_type: RestartType = RestartType.permanent
    intensity: int = 3  # at most this many run-time restarts ...
    period_s: float = 10.0  # ... within this many seconds
    startup_intensity: int = 3  # start-up failures are counted apart
    startup_period_s: float = 60.0
    # 0.1 s before the first restart (systemd's RestartSec default), doubling up to 5 s: a crash loop is not a busy
    # loop and its log stays readable, while a single crash still recovers in a fraction of a second.
    backoff_initial_s: float = 0.1
    backoff_factor: float = 2.0
    backoff_max_s: float = 5.0
    calls_during_restart: CallsDuringRestart = CallsDuringRestart.wait


class Toggle(Choice):
    auto = "auto"  # decided by supervisor/core/recovery.py from the worker class, the restart policy, the backend
    on = "on"
    off = "off"


@dataclass(frozen=True)
class RecoverySettings:
    """What a rank's death leaves ready for its replacement (supervisor/core/recovery.py says what ``auto`` means).

    keeper: the weight keeper, one process of the tree holding every rank's weights (worker/keeper.py); a
    restarted rank maps them instead of reading the checkpoint. Costs no second copy: the ranks' own copies are
    gone (their parameters are views of the keeper's), so it adds one process and its CUDA context per GPU.
    standby: a warm standby per dp group, a process per rank with its imports, CUDA context, mapped weights, KV cache
    and (tp=1) captured CUDA graph ready, which takes a dead group's place; a new one is made behind it. Costs per
    rank a second CUDA context, KV cache and graph pool (not the weights: they are mapped from the keeper)."""

    keeper: Toggle = Toggle.auto  # auto: on when the worker class keeps weights and a restart policy is set
    standby: Toggle = Toggle.auto  # auto: on wherever the keeper is on
    # A group's next standby is started this long after the group serves (again): its warm-up (a fork, a CUDA
    # context, a first step) then does not compete with the replacement's first steps for the CPUs and the GPU.
    standby_delay_s: float = 0.5
    standby_backoff_s: float = 1.0  # a standby that died while waiting is replaced after this, doubling to 30 s


@dataclass(frozen=True)
class RpcSettings:
    """Retryable calls (supervisor/core/retry.py): a call whose group fails before it answered is sent again."""

    retry: bool = False  # collective_rpc's default for retry= (a retried method must be safe to run twice)
    retry_execute_model: RetryExecuteModel = RetryExecuteModel.auto  # execute_model's default
    retry_attempts: int = 3  # attempts of a retryable call, the first included, all within the call's deadline


@dataclass(frozen=True)
class LoggingSettings:
    level: LogLevel = LogLevel.INFO
    events: bool = True  # write events.jsonl in the run directory
    run_dir: str = ""  # filled in by the CLI (Hydra-style outputs/DATE/TIME); "" = no files


class HttpWhen(Choice):
    serve = "serve"  # only in workload=serve, the long-running one
    always = "always"
    never = "never"


@dataclass(frozen=True)
class HttpSettings:
    """/metrics, /healthz, /readyz and the live page on 127.0.0.1 (supervisor/observe/http.py)."""

    when: HttpWhen = HttpWhen.serve
    port: int = 0  # 0 = a free port, chosen at start (logged, and written to RUN_DIR/http.json)


@dataclass(frozen=True)
class GpuSettings:
    """GPU health from NVML (supervisor/gpu_health.py; needs the `gpu` extra: nvidia-ml-py)."""

    # Read each GPU's ECC errors, retired pages, remapped rows and throttle reasons: an uncorrectable error since the
    # driver loaded, or a pending retirement / remap, makes check_health fail naming the GPU and the counter; status
    # and /metrics show them. false = never touch NVML for this.
    health: bool = True
    health_ttl_s: float = 1.0  # a reading is reused this long (scrapes, status views and health checks share it)


@dataclass(frozen=True)
class RaySettings:
    address: str = ""  # "" = start a local Ray instance; "auto" or host:port = join a cluster
    placement_strategy: PlacementStrategy = PlacementStrategy.PACK  # PACK keeps a TP group on one node
    cpus_per_rank: float = 1.0  # CPU resource of each rank's bundle (a GPU is added when device=cuda)


@dataclass(frozen=True)
class Config:
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    runtime: RuntimeSettings = field(default_factory=RuntimeSettings)
    device: Device = Device.auto
    transport: TransportSettings = field(default_factory=TransportSettings)
    shutdown: ShutdownSettings = field(default_factory=ShutdownSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    workload: WorkloadSettings = field(default_factory=WorkloadSettings)
    llm: LLMSettings = field(default_factory=LLMSettings)  # workload=llm: the Llama decoder
    launch: ScriptSettings = field(default_factory=ScriptSettings)  # workload=script: a torchrun-style script
    restart: RestartSettings = field(default_factory=RestartSettings)
    recovery: RecoverySettings = field(default_factory=RecoverySettings)
    rpc: RpcSettings = field(default_factory=RpcSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    gpu: GpuSettings = field(default_factory=GpuSettings)
    backend: Backend = Backend.local
    ray: RaySettings = field(default_factory=RaySettings)
