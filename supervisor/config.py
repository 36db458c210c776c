"""Hydra configuration -> one validated, frozen ``supervisor.settings.Config``.

This module and ``supervisor/cli.py`` are the only places that import Hydra or OmegaConf. Everything after
``from_node`` sees plain frozen dataclasses, which is what travels to the workers (DESIGN §2).

::

    supervisor/settings.py  ─ _schema_of ─▶  ConfigStore "base_config": mutable twins of the frozen settings (each
      (every default, once;                  default and each Enum choice once), so OmegaConf checks key names,
       choices as Enums)                     types and choices while composing
    conf/config.yaml     ┐
    conf/<group>/*.yaml  ├─ Hydra compose (search path: the packaged conf/, then --config-dir / config_dir)
    CLI overrides        ┘        │
                                  ▼
            DictConfig ─ to_container ─▶ dict ─ _from_plain ─▶ frozen Config ─ validate ─▶ caller
                                  │                                               │ bounds: the machine, the ring
            any Hydra/OmegaConf/YAML error ─ _translate ─▶ ConfigError("parallel.tp: must be ...")  (one line)

The schema is derived from the frozen dataclasses instead of written twice: OmegaConf cannot assign into frozen
dataclasses, so each gets a non-frozen twin with the same fields; tuples become YAML lists, and tuples of
(key, value) pairs become YAML mappings. The YAML files therefore hold only what an option changes. Hydra and
OmegaConf are imported lazily so that importing ``ConfigError`` or ``validate`` costs nothing.

The configs ship inside the package: ``supervisor/conf`` links to the repository's top-level ``conf/`` and is
package data in a wheel, so a checkout, an editable install and a regular install all find them beside this file.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import importlib
import importlib.util
import itertools
import os
import re
from dataclasses import MISSING, Field, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Sequence, get_args, get_origin, get_type_hints

from supervisor.errors import ConfigError  # the checks' error; importers of supervisor.config find it here too
from supervisor.llm_checks import check_config as check_llm, runs_llm
from supervisor.settings import Choice, Config
from transport.layout import MAX_SLOTS, MESSAGE_LIMIT, MIN_SLOT_BYTES

SLOT_ALIGN = 64  # transport/layout.py: slot payloads stay cache-line aligned (readers and writer never share a line)
MAX_SLOT_BYTES = (1 << 32) - SLOT_ALIGN  # transport/layout.py: a slot's size is a u32

DEFAULT_CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")  # package data; a link to conf/ in a checkout
CONFIG_NAME = "config"


# Bounds that are not the transport's own (transport/layout.py states those) -- each with the reason it exists.
MAX_RANKS = 4096  # ranks of one tree, on any backend: beyond this the supervisor's own bookkeeping is the bottleneck
RANKS_PER_CPU = 16  # local backend: each rank is an interpreter with its own threads; more than this per CPU...
MIN_RANKS_LIMIT = 64  # ... cannot make progress, but small machines may still oversubscribe up to this many
MIN_RSS_CAP_MB = 16  # worker.max_rss_mb: a bare interpreter resides in ~10 MiB, a worker in ~30: below, every call recycles
SPIN_POLLS = ("auto", "busy", "yield")  # transport.spin_poll (worker/spec.py says what each does)
MAX_SPIN_US = 100_000.0  # transport.spin_us: spinning longer than 0.1 s before sleeping only burns a CPU
MIN_HEARTBEAT_INTERVAL_S = 0.01  # a faster heartbeat is a busy loop in every worker
MLP_EXPANSION, FLOAT32_BYTES = 4, 4  # worker/tp_mlp.py's inner width (EXPANSION * hidden) and its dtype


# -- schema: mutable twins of the frozen settings ------------------------------------------------------------------


def _is_pairs(hint: Any) -> bool:
    """tuple[tuple[K, V], ...]: stored frozen as sorted pairs, written in YAML as a mapping."""
    return get_origin(hint) is tuple and get_origin(get_args(hint)[0]) is tuple


def _schema_type(hint: Any) -> Any:
    if is_dataclass(hint):
        return _schema_of(hint)
    if _is_pairs(hint):
        key_type, value_type = get_args(get_args(hint)[0])
        return Dict[key_type, value_type]  # type: ignore[valid-type]
    if get_origin(hint) is tuple:
        return List[get_args(hint)[0]]  # type: ignore[misc]
    return hint


def _schema_field(hint: Any, f: Field) -> Field:
    if is_dataclass(hint):
        return field(default_factory=_schema_of(hint))
    default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    if get_origin(hint) is tuple:
        return field(default_factory=functools.partial(_to_plain_value, hint, default))
    return field(default=default)


@functools.cache
def _schema_of(cls: type) -> type:
    """The non-frozen twin of a frozen settings dataclass, with YAML-friendly container types."""
    hints = get_type_hints(cls)
    specs = [(f.name, _schema_type(hints[f.name]), _schema_field(hints[f.name], f)) for f in fields(cls)]
    return make_dataclass(f"{cls.__name__}Schema", specs)


@functools.cache
def _register_schema() -> None:
    """Store the root schema once; config.yaml lists it first in its defaults, so every group is typed."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=_schema_of(Config))


# -- frozen <-> plain containers -----------------------------------------------------------------------------------


def _from_plain(cls: type, data: dict, path: str = "") -> Any:
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names))  # '+parallel.foo=1' gets past Hydra's struct check; not past this
    _require(not unknown, path + (unknown or [""])[0], "no such key")
    missing = [name for name in names if name not in data]  # possible in a config dir without the schema
    _require(not missing, path + (missing or [""])[0], "missing")
    hints = get_type_hints(cls)
    return cls(**{name: _from_plain_value(hints[name], data[name], f"{path}{name}.") for name in names})


def _from_plain_value(hint: Any, value: Any, path: str) -> Any:
    if is_dataclass(hint):
        return _from_plain(hint, value, path)
    if _is_choice(hint):
        return _to_choice(hint, value, path.rstrip("."))
    if _is_pairs(hint):
        return tuple(sorted((str(k), _env_str(v)) for k, v in value.items()))
    if get_origin(hint) is tuple:
        return tuple(value)
    return value


def _is_choice(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, Choice)


def _to_choice(choice: type[Choice], value: Any, key: str) -> Choice:
    """A member from a member, its name or its value (a config without the schema -- e.g. a saved run's -- or one
    built in code holds plain strings)."""
    if isinstance(value, choice):
        return value
    member = choice.__members__.get(value) if isinstance(value, str) else None
    if member is None:
        member = next((m for m in choice if m.value == value), None)
    _require(member is not None, key, f"must be one of {choice.choices()}, got {value!r}")
    return member  # type: ignore[return-value]


def _to_plain_value(hint: Any, value: Any) -> Any:
    if is_dataclass(hint):
        return to_dict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if _is_pairs(hint):
        return dict(value)
    if get_origin(hint) is tuple:
        return list(value)
    return value


def to_dict(cfg: Any) -> dict:
    """A frozen settings dataclass as plain dicts/lists, shaped like the YAML (env as a mapping)."""
    hints = get_type_hints(type(cfg))
    return {f.name: _to_plain_value(hints[f.name], getattr(cfg, f.name)) for f in fields(cfg)}


# -- load ----------------------------------------------------------------------------------------------------------


def load_config(overrides: Sequence[str] = (), config_dir: str | None = None,
                config_name: str = CONFIG_NAME) -> Config:
    """Compose the packaged conf/config.yaml with Hydra-style ``overrides``, validate (without GPU facts) and freeze.

    ``config_dir`` is added to the search path, as Hydra's ``--config-dir`` does: a user's own options
    (``<config_dir>/parallel/big.yaml`` -> ``parallel=big``) or primary config (``config_name``) sit beside ours."""
    with hydra_session(config_dir):
        node = compose_node(list(overrides), config_name)
    return from_node(node)


def from_node(node: Any) -> Config:
    """A composed DictConfig (without its ``hydra`` node) -> the validated frozen Config."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = OmegaConf.to_container(node, resolve=True, throw_on_missing=True)
    except (OmegaConfBaseException, ValueError) as exc:
        raise _translate(exc) from exc
    cfg = _from_plain(Config, data)  # type: ignore[arg-type]
    validate(cfg)
    return cfg


def search_path(config_dir: str | None = None, primary: str | None = None) -> Any:
    """Hydra's config search path: Hydra's own configs, then ``primary`` (our packaged conf/ unless replaced, as
    ``--config-path`` does), then ``config_dir`` (added, as ``--config-dir`` does), then the structured schema."""
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    given = primary is not None
    primary = os.path.abspath(primary or DEFAULT_CONFIG_DIR)
    _require(os.path.isdir(primary), "--config-path" if given else "conf", f"no config folder at {primary}")
    path = create_config_search_path(f"file://{primary}")
    if config_dir:
        extra = os.path.abspath(config_dir)
        _require(os.path.isdir(extra), "config_dir", f"{extra} is not a directory")
        path.prepend(provider="command-line", path=f"file://{extra}", anchor=SearchPathQuery(provider="schema"))
    return path


@contextlib.contextmanager
def hydra_session(config_dir: str | None = None, primary: str | None = None) -> Iterator[Any]:
    """Hydra initialised with ``search_path`` for the block (the compose API's ``initialize_config_dir``, with our
    search path); yields the Hydra object. The previous global Hydra state is restored afterwards."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    _register_schema()
    path = search_path(config_dir, primary)
    backup = get_gh_backup()
    try:
        version.setbase(None)
        yield Hydra.create_main_hydra2(task_name="supervisor", config_search_path=path)
    finally:
        restore_gh_from_backup(backup)


def lists_of_one(overrides: Sequence[str]) -> list[str]:
    """One value where a list is expected is a list of one: ``llm.prompt_text=Hello`` -> ``llm.prompt_text=[Hello]``
    (OmegaConf refuses a lone value for a list field: "str is not a ListConfig"). Lists, mappings, null, sweeps and
    other keys are left as written. The CLI hands Hydra's run the same overrides as its preflight composed."""
    return [_one_item_list(o) for o in _parse_overrides(list(overrides))]


def _one_item_list(override: Any) -> str:
    hint = _field_hint(override.key_or_group)
    value = override.value() if not override.is_sweep_override() else None
    if get_origin(hint) is not tuple or _is_pairs(hint) or value is None or isinstance(value, (list, dict)):
        return override.input_line
    key, _, raw = override.input_line.partition("=")
    return f"{key}=[{raw}]"


def _env_verbatim(override: str) -> str:
    """``+runtime.env.X=false`` -> ``+runtime.env.X='false'``: environment values reach the worker as written
    (Hydra would parse them into a bool or a float first, and 'false' would come back as 'False', 1e3 as
    '1000.0'). A value the user quoted already is left alone."""
    key, eq, value = override.partition("=")
    if not eq or not key.lstrip("+~").startswith("runtime.env.") or value[:1] in ("'", '"') or "'" in value:
        return override
    return f"{key}='{value}'" if not value.endswith("\\") else override


def _env_str(value: Any) -> str:
    """A YAML value of runtime.env as text: booleans as YAML writes them (quote other values to keep them)."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def compose_node(overrides: list[str], config_name: str = CONFIG_NAME) -> Any:
    """Compose with the Hydra initialised by ``hydra_session`` (or the CLI); the app's config, without ``hydra``."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    keys = _check_overrides(overrides)
    overrides = [_env_verbatim(o) for o in lists_of_one(overrides)]
    try:
        return compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:  # Hydra raises ValueError for some input
        raise _translate(exc, keys) from exc
    except Exception as exc:  # a YAML syntax error in a config file arrives as yaml's own error
        translated = _translate_yaml(exc)
        if translated is None:
            raise
        raise translated from exc


def _check_overrides(overrides: list[str]) -> list[str]:
    """Catch what compose() reports late or without a key (``=3`` even passes Hydra's parser); return the keys."""
    keys = []
    for override in _parse_overrides(overrides):
        key = override.key_or_group
        _require(bool(key), override.input_line, "malformed override: no key before '='")
        _require(not override.is_sweep_override(), key, _sweep_problem(override))
        options = _group_options(key)
        if options and not override.is_delete():
            choices = ", ".join(options)
            _require(isinstance(override.value(), str), key, f"must name one option (choose from: {choices})")
        keys.append(key)
    return keys


def _sweep_problem(override: Any) -> str:
    """A comma in a value makes a sweep; in ``runtime.env`` it was more likely meant as part of the value."""
    line = override.input_line
    if override.get_key_element().lstrip("+~").startswith("runtime.env."):
        key, _, value = line.partition("=")
        return f"{line!r} is a sweep over {value}; to pass one value with commas, quote it: '{key}=\"{value}\"'"
    return f"{line!r} is a sweep; run with -m to expand it into one run per value"


def _group_options(key: str) -> list[str]:
    """The options of config group ``key`` on the search path, or [] when ``key`` is not a group."""
    from hydra.core.global_hydra import GlobalHydra

    if "." in key or not GlobalHydra.instance().is_initialized():
        return []
    loader = GlobalHydra.instance().config_loader()
    return sorted(loader.get_group_options(key)) if loader.repository.group_exists(key) else []


# -- Hydra / OmegaConf errors -> ConfigError -----------------------------------------------------------------------


def _translate(exc: BaseException, keys: Sequence[str] = ()) -> ConfigError:
    """Find the most specific error in the chain and name its key; Hydra wraps OmegaConf's errors."""
    for err in _chain(exc):
        translated = _translate_one(err)
        if translated is not None:
            return translated
    message = str(exc)
    mentioned = [key for key in keys if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w.])", message)]
    return ConfigError((mentioned or ["config"])[0], _first_line(message))


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _translate_one(err: BaseException) -> ConfigError | None:
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    if isinstance(err, MissingConfigException):
        return _missing_option(err)
    if isinstance(err, OverrideParseException):
        key = err.override.split("=", 1)[0].lstrip("+~") or err.override
        return ConfigError(key, f"malformed override: {_parse_detail(err)}")
    if isinstance(err, OmegaConfBaseException) and getattr(err, "full_key", None):
        if isinstance(err, (ConfigKeyError, AttributeError)):
            return ConfigError(err.full_key, _no_such_key(err.full_key))
        hint = _field_hint(err.full_key)
        if _is_choice(hint):  # OmegaConf lists the members' names, aliases included; say it as the YAML does
            return ConfigError(err.full_key, f"must be one of {hint.choices()}, got {getattr(err, 'value', '?')!r}")
        return ConfigError(err.full_key, _first_line(getattr(err, "msg", "") or str(err)))
    return None


def _translate_yaml(exc: BaseException) -> ConfigError | None:
    """A YAML syntax error in a config file: name the file (as Hydra's error does) and the line."""
    import yaml

    for err in _chain(exc):
        if isinstance(err, yaml.YAMLError):
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            name = mark.name if mark is not None and mark.name and not mark.name.startswith("<") else "a config file"
            what = getattr(err, "problem", None) or _first_line(str(err))
            return ConfigError(name, f"YAML syntax error{where}: {what}")
    return None


def _no_such_key(key: str) -> str:
    """Mappings (runtime.env) take new keys, but Hydra only adds a key when asked to with '+'."""
    if _is_pairs(_field_hint(key.rpartition(".")[0])):
        return f"no such key; add it with '+{key}=...'"
    return "no such key"


def _field_hint(path: str) -> Any:
    hint: Any = Config
    for part in path.split("."):
        hint = get_type_hints(hint).get(part) if is_dataclass(hint) else None
    return hint


def _missing_option(err: Any) -> ConfigError:
    """``restart=bogus`` -> ``restart: no such option 'bogus' (choose from: never, ...)``."""
    path = err.missing_cfg_file or ""
    group, _, option = path.rpartition("/")
    if not group and path:
        return ConfigError("--config-name", f"no primary config named '{path}' on the search path")
    if not group or err.options is None:
        return ConfigError(path or "config", _first_line(str(err)))
    choices = ", ".join(sorted(err.options))
    return ConfigError(group, f"no such option '{option}' (choose from: {choices})")


def _parse_detail(err: Any) -> str:
    """The parser's complaint without its echo of the input, the caret line and the link to the grammar docs."""
    lines = [ln.strip() for ln in err.message.splitlines()]
    useful = [ln for ln in lines if ln.strip("^ ") and not ln.startswith(("See https", "Error parsing override"))]
    return "; ".join(useful) or "cannot parse"


def _first_line(message: str) -> str:
    return next((line.strip() for line in message.splitlines() if line.strip()), "invalid")


# -- validation ----------------------------------------------------------------------------------------------------


def _int_at_least(low: int) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        return None if ok else f"must be {what}, got {value!r}"

    return check


def _number(low: float, strict: bool) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = is_num and (value > low if strict else value >= low)
        return None if ok else f"must be a number {'>' if strict else '>='} {low:g}, got {value!r}"

    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {'|'.join(choices)}, got {value!r}"

    return check


def _workloads() -> tuple[str, ...]:
    """The one list of workload names: the driver registry (imported only when a config is checked)."""
    from supervisor.workloads import WORKLOADS

    return tuple(WORKLOADS)


def _at_most(check: Callable[[Any], str | None], high: float, why: str) -> Callable[[Any], str | None]:
    """``check``, plus an upper bound with the reason it exists."""
    def bounded(value: Any) -> str | None:
        problem = check(value)
        if problem is None and value > high:
            return f"must be <= {high:,} ({why}), got {value!r}"
        return problem

    return bounded


_POSITIVE_INT, _NON_NEG_INT = _int_at_least(1), _int_at_least(0)
_POSITIVE, _NON_NEG = _number(0, strict=True), _number(0, strict=False)
_RANKS = _at_most(_POSITIVE_INT, MAX_RANKS, "ranks of one tree")

# One rule per key whose value can be judged alone; checks that relate keys come after, in validate().
_RULES: tuple[tuple[str, Callable[[Any], str | None]], ...] = (
    ("parallel.tp", _RANKS),
    ("parallel.pp", _RANKS),
    ("parallel.dp", _RANKS),
    ("ray.cpus_per_rank", _POSITIVE),
    ("runtime.omp_num_threads", _NON_NEG_INT),
    ("runtime.startup_timeout_s", _POSITIVE),
    ("transport.slot_bytes", _at_most(_int_at_least(MIN_SLOT_BYTES), MAX_SLOT_BYTES, "the ring's 32-bit slot size")),
    ("transport.slots", _at_most(_int_at_least(2), MAX_SLOTS, "the ring's slot index")),
    ("transport.reply_slot_bytes", _at_most(_int_at_least(MIN_SLOT_BYTES), MAX_SLOT_BYTES, "the ring's 32-bit slot size")),
    ("transport.reply_slots", _at_most(_int_at_least(2), MAX_SLOTS, "the ring's slot index")),
    ("transport.spin_us", _at_most(_NON_NEG, MAX_SPIN_US, "longer spinning only burns a CPU")),
    ("transport.spin_poll", _one_of(SPIN_POLLS)),
    ("transport.max_message_bytes", _at_most(_POSITIVE_INT, MESSAGE_LIMIT - 1, "what a ring header can announce")),
    ("shutdown.grace_s", _NON_NEG),
    ("shutdown.reap_s", _POSITIVE),
    ("shutdown.drain_s", _NON_NEG),
    ("shutdown.signal_window_s", _NON_NEG),
    ("rpc.retry_attempts", _POSITIVE_INT),
    ("worker.heartbeat_interval_s", _number(MIN_HEARTBEAT_INTERVAL_S, strict=False)),
    ("worker.heartbeat_timeout_s", _POSITIVE),
    ("worker.orphan_grace_s", _NON_NEG),
    ("worker.max_rss_mb", _NON_NEG_INT),
    ("worker.max_calls", _NON_NEG_INT),
    ("worker.call_deadline_s", _NON_NEG),
    ("workload.name", lambda name: _one_of(_workloads())(name)),
    ("http.port", _at_most(_NON_NEG_INT, 65535, "the largest TCP port")),
    ("gpu.health_ttl_s", _NON_NEG),
    ("workload.hidden", _POSITIVE_INT),
    ("workload.layers", _POSITIVE_INT),
    ("workload.batch", _POSITIVE_INT),
    ("workload.steps", _NON_NEG_INT),
    ("workload.status_interval_s", _POSITIVE),
    ("workload.request_timeout_s", _POSITIVE),
    ("workload.check_tolerance", _NON_NEG),
    ("restart.intensity", _NON_NEG_INT),
    ("restart.period_s", _POSITIVE),
    ("restart.startup_intensity", _NON_NEG_INT),
    ("restart.startup_period_s", _POSITIVE),
    ("restart.backoff_initial_s", _NON_NEG),
    ("restart.backoff_factor", _number(1, strict=False)),
    ("restart.backoff_max_s", _NON_NEG),
    ("recovery.standby_delay_s", _NON_NEG),
    ("recovery.standby_backoff_s", _NON_NEG),
    # Every Choice-typed key (device, backend, runtime.start_method, restart.strategy, ...) is checked against its
    # Enum by _check_choices: the choices are written once, in supervisor/settings.py.
)


def _get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(key, problem)


def validate(cfg: Config, visible_gpus: int | None = None, cuda_initialized: bool = False) -> None:
    """Raise ConfigError for the first bad value. GPU facts are checked only when the caller knows them."""
    for key, check in _RULES:
        problem = check(_get(cfg, key))
        _require(problem is None, key, problem or "")
    _check_choices(cfg)
    _check_relations(cfg)
    _check_machine(cfg)
    _check_runtime(cfg, cuda_initialized)
    _check_gpus(cfg, visible_gpus)
    _check_worker_cls(cfg.worker.cls)
    _check_recovery(cfg)
    if runs_llm(cfg):  # the checkpoint against the layout and the memory, before anything loads
        check_llm(cfg, visible_gpus)
    if cfg.workload.name == "script":  # the script, its mode and the layout it needs (supervisor/launch/checks.py)
        from supervisor.launch.checks import check_config as check_script

        check_script(cfg)


def _check_relations(cfg: Config) -> None:
    par, load, tr, rs = cfg.parallel, cfg.workload, cfg.transport, cfg.restart
    mlp = not runs_llm(cfg)  # the MLP's sizes; the decoder checks its own shape (supervisor/llm_checks.py)
    _require(not mlp or load.layers % par.pp == 0, "workload.layers",
             f"{load.layers} layers cannot be split evenly over parallel.pp={par.pp} stages")
    _require(not mlp or load.hidden % par.tp == 0, "workload.hidden",
             f"{load.hidden} is not divisible by parallel.tp={par.tp}")
    for key in ("slot_bytes", "reply_slot_bytes"):
        size = getattr(tr, key)
        _require(size % SLOT_ALIGN == 0, f"transport.{key}", f"must be a multiple of {SLOT_ALIGN}, got {size}")
    slot = max(tr.slot_bytes, tr.reply_slot_bytes)  # a message that fits one slot must never be refused
    _require(tr.max_message_bytes >= slot, "transport.max_message_bytes",
             f"must be at least a slot (transport.slot_bytes / reply_slot_bytes, {slot:,}), got {tr.max_message_bytes}")
    _require(rs.backoff_max_s >= rs.backoff_initial_s, "restart.backoff_max_s",
             f"must be >= restart.backoff_initial_s={rs.backoff_initial_s:g}, got {rs.backoff_max_s:g}")
    hb = cfg.worker
    _require(hb.heartbeat_timeout_s > hb.heartbeat_interval_s, "worker.heartbeat_timeout_s",
             f"must exceed worker.heartbeat_interval_s={hb.heartbeat_interval_s:g}, got {hb.heartbeat_timeout_s:g}")


def _check_recovery(cfg: Config) -> None:
    """recovery.keeper / standby set to "on" where they cannot work (supervisor/core/recovery.py says where)."""
    from supervisor.backends.local.backend import keeps_weights
    from supervisor.core.recovery import recovery_problem

    problem = recovery_problem(cfg.recovery, keeps_weights(cfg.worker.cls), cfg.backend)
    if problem is not None:
        raise ConfigError(*problem)


def _check_choices(cfg: Any, path: str = "") -> None:
    """Every Choice-typed field holds a member of its Enum (or its value, in a config built in code)."""
    hints = get_type_hints(type(cfg))
    for f in fields(cfg):
        hint, value, key = hints[f.name], getattr(cfg, f.name), path + f.name
        if is_dataclass(hint):
            _check_choices(value, key + ".")
        elif _is_choice(hint):
            _require(value in set(hint) or value in {m.value for m in hint}, key,
                     f"must be one of {hint.choices()}, got {value!r}")


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _memory_mb() -> int:
    import psutil

    return psutil.virtual_memory().total >> 20


def _check_machine(cfg: Config) -> None:
    """Process counts and memory sizes against this machine, before a single process starts."""
    par, cpus = cfg.parallel, _cpus()
    _require(par.total <= MAX_RANKS, "parallel", f"tp*pp*dp = {par.total} ranks; at most {MAX_RANKS} are supported")
    limit = max(MIN_RANKS_LIMIT, RANKS_PER_CPU * cpus)
    _require(cfg.backend != "local" or par.total <= limit, "parallel",
             f"tp*pp*dp = {par.total} worker processes on {cpus} CPU(s); at most {limit} can make progress here")
    memory_mb, cap = _memory_mb(), cfg.worker.max_rss_mb
    _require(cap == 0 or MIN_RSS_CAP_MB <= cap <= memory_mb, "worker.max_rss_mb",
             f"must be 0 (no cap) or {MIN_RSS_CAP_MB}..{memory_mb} MiB (a bare interpreter alone resides in ~10 MiB, "
             f"so a smaller cap recycles after every call; this machine has {memory_mb} MiB), got {cap}")
    load = cfg.workload
    if load.name in ("tp_mlp", "bench", "serve", "echo"):  # the MLP's weights, built once for the reference check
        model_mb = (2 * MLP_EXPANSION * load.hidden * load.hidden * load.layers * FLOAT32_BYTES) >> 20
        _require(model_mb <= memory_mb, "workload.hidden",
                 f"{load.layers} layers of width {load.hidden} need {model_mb} MiB of weights; "
                 f"this machine has {memory_mb} MiB")


_MODULE_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_runtime(cfg: Config, cuda_initialized: bool) -> None:
    rt = cfg.runtime
    _require(not (rt.start_method == "fork" and cuda_initialized), "runtime.start_method",
             "fork is unsafe once CUDA is initialised in the parent; use spawn, forkserver or auto")
    for name in rt.preload:
        _require(bool(_MODULE_NAME.match(name)), "runtime.preload", f"{name!r} is not a module name")
        _require(_importable(name), "runtime.preload", f"no module named {name!r} can be imported here")
    _require(cfg.backend != "ray" or _importable("ray"), "backend",
             "ray is not installed here (pip install 'rankvisor[ray]'), use backend=local")
    for name, _ in rt.env:
        _require(bool(_ENV_NAME.match(name)), f"runtime.env.{name}", "is not a valid environment variable name")


def _importable(module: str) -> bool:
    """Found on the path, without importing it (nor running its code)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing, or not a package
        return False


def _check_gpus(cfg: Config, visible_gpus: int | None) -> None:
    if cfg.device != "cuda" or visible_gpus is None:
        return
    _require(visible_gpus > 0, "device", "cuda requested but no GPU is usable here (torch without CUDA, no driver, "
                                         "or CUDA_VISIBLE_DEVICES naming no device); use device=auto or device=cpu")
    par = cfg.parallel
    world = par.group_world
    _require(world <= visible_gpus, "parallel",
             f"tp*pp = {world} ranks of one group need {world} GPUs with device=cuda, but {visible_gpus} are visible")
    _require(par.total <= visible_gpus or par.share_gpus, "parallel",
             f"tp*pp*dp = {par.total} ranks need {par.total} GPUs with device=cuda, but {visible_gpus} are visible "
             "(set parallel.share_gpus=true to let dp replicas share cards)")


def _check_worker_cls(spec: str) -> None:
    """Import the class now, so a typo fails before anything is spawned (exit 2, not a crash loop)."""
    module_name, _, cls_name = spec.partition(":")
    _require(bool(_MODULE_NAME.match(module_name)) and cls_name.isidentifier(), "worker.cls",
             f"must look like 'package.module:Class', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any error while importing user code means "cannot use this class"
        raise ConfigError("worker.cls", f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from exc
    cls = getattr(module, cls_name, None)
    from worker.base import Worker  # light: worker.base imports torch lazily

    _require(isinstance(cls, type), "worker.cls", f"no class {cls_name!r} in module {module_name!r}")
    _require(issubclass(cls, Worker), "worker.cls", f"{spec} is not a subclass of worker.base.Worker")


# -- sweeps (-m) ---------------------------------------------------------------------------------------------------


def expand_sweep(overrides: list[str], config_dir: str | None = None) -> list[list[str]]:
    """``["parallel.tp=1,2", "device=cpu"]`` -> ``[["parallel.tp=1", "device=cpu"], ["parallel.tp=2", "device=cpu"]]``.

    Same semantics as Hydra's BasicSweeper: choice (``a,b``), ``range(...)`` and, for config groups, ``glob(...)``
    sweeps; the cartesian product in the order given, first key slowest; a key given twice keeps its first position
    and its last value. ``config_dir`` is only needed to list a group's options for ``glob``.
    """
    per_key: dict[str, list[str]] = {}
    for override in _parse_overrides(overrides):
        key = override.get_key_element()
        if not override.is_sweep_override():
            per_key[key] = [override.input_line]
        elif override.is_discrete_sweep():
            per_key[key] = [f"{key}={value}" for value in _sweep_values(override, config_dir)]
        else:
            raise ConfigError(override.key_or_group, "only choice (a,b,c), range(...) and glob(...) sweeps expand")
    return [list(run) for run in itertools.product(*per_key.values())]


def _sweep_values(override: Any, config_dir: str | None) -> list[str]:
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.types import Glob

    if not isinstance(override.value(), Glob):
        return list(override.sweep_string_iterator())
    if GlobalHydra.instance().is_initialized():
        options = _group_options(override.key_or_group)
    else:
        with hydra_session(config_dir):
            options = _group_options(override.key_or_group)
    _require(bool(options), override.key_or_group, "glob(...) sweeps only work on a config group")
    return override.value().filter(options)


def _parse_overrides(overrides: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(overrides=list(overrides))
    except HydraException as exc:
        raise _translate(exc) from exc


# -- the run folder -------------------------------------------------------------------------------------------------


def make_run_dir(base: str = "outputs") -> str:
    """For launchers without Hydra's run machinery (rankvisor-run; ``python -m supervisor`` uses hydra.run.dir).
    Create ``base/YYYY-MM-DD/HH-MM-SS`` (``-1``, ``-2``… when taken, e.g. two runs in one second)."""
    from datetime import datetime

    now = datetime.now()
    stem = os.path.join(base, now.strftime("%Y-%m-%d"), now.strftime("%H-%M-%S"))
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    for n in itertools.count():
        path = stem if n == 0 else f"{stem}-{n}"
        try:
            os.mkdir(path)  # atomic: a concurrent run that lost the race moves on to the next suffix
            return path
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def to_yaml(cfg: Config) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))
