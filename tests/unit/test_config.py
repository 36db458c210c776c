"""Configuration layer: Hydra composition, validation and error messages (pure: no processes)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from supervisor import config as config_module
from supervisor.config import ConfigError, expand_sweep, load_config, validate
from supervisor.settings import Config

CONF_DIR = Path(config_module.DEFAULT_CONFIG_DIR)


def error_for(overrides: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    return info.value


def assert_names_key(err: ConfigError, key: str) -> None:
    message = str(err)
    assert "\n" not in message, message
    assert message.startswith(f"{key}: "), message
    assert err.key == key


# -- defaults and overrides ------------------------------------------------------------------------------------------


def test_defaults_equal_the_settings_dataclass_defaults():
    # The YAML files and supervisor/settings.py state the defaults twice; this keeps them in step.
    assert load_config([]) == Config()


def test_result_is_frozen():
    cfg = load_config([])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.parallel.tp = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides, read, expected",
    [
        (["parallel.tp=8"], lambda c: c.parallel.tp, 8),
        (["parallel.dp=2", "parallel.tp=4"], lambda c: (c.parallel.dp, c.parallel.tp, c.parallel.total), (2, 4, 8)),
        (["parallel.pp=2"], lambda c: c.parallel.pp, 2),
        (["restart=one_for_all"], lambda c: c.restart.strategy, "one_for_all"),
        (["restart=one_for_one"], lambda c: c.restart.strategy, "one_for_one"),
        (["restart=rest_for_one"], lambda c: c.restart.strategy, "rest_for_one"),
        (["restart.intensity=0"], lambda c: c.restart.intensity, 0),
        (["workload=serve"], lambda c: c.workload.name, "serve"),
        (["workload=bench"], lambda c: (c.workload.name, c.workload.steps), ("bench", 1000)),
        (["workload=bench", "workload.steps=7"], lambda c: c.workload.steps, 7),
        (["workload=echo"], lambda c: (c.workload.name, c.worker.cls), ("echo", "worker.tp_mlp:EchoWorker")),
        (["workload=echo", "worker=default"], lambda c: c.worker.cls, "worker.tp_mlp:TPMLPWorker"),
        (["device=cpu"], lambda c: c.device, "cpu"),
        (["device=cuda"], lambda c: c.device, "cuda"),
        (["+runtime.env.FOO=bar"], lambda c: c.runtime.env, (("FOO", "bar"),)),
        (["++runtime.env.FOO=1"], lambda c: c.runtime.env, (("FOO", "1"),)),
        (["+runtime.env.B=2", "+runtime.env.A=1"], lambda c: c.runtime.env, (("A", "1"), ("B", "2"))),
        (["runtime.preload=[]"], lambda c: c.runtime.preload, ()),
        (["runtime.preload=[torch,numpy]"], lambda c: c.runtime.preload, ("torch", "numpy")),
        # one value where a list is expected is a list of one (OmegaConf refused it: "str is not a ListConfig")
        (["runtime.preload=numpy"], lambda c: c.runtime.preload, ("numpy",)),
        (["llm.prompt_text=Hello"], lambda c: c.llm.prompt_text, ("Hello",)),
        (["llm.prompt_text='Hello, world'"], lambda c: c.llm.prompt_text, ("Hello, world",)),
        (["llm.prompt_ids=5"], lambda c: c.llm.prompt_ids, (5,)),
        (["runtime.start_method=forkserver"], lambda c: c.runtime.start_method, "forkserver"),
        (["runtime.startup_timeout_s=5"], lambda c: c.runtime.startup_timeout_s, 5.0),
        (["logging.level=debug"], lambda c: c.logging.level, "DEBUG"),
        (["transport.slots=2", "transport.slot_bytes=4096"], lambda c: (c.transport.slots, c.transport.slot_bytes),
         (2, 4096)),
        (["shutdown.grace_s=0"], lambda c: c.shutdown.grace_s, 0.0),
        ([], lambda c: (c.transport.spin_poll, c.transport.spin_yield), ("auto", None)),
        (["transport.spin_poll=busy"], lambda c: (c.transport.spin_poll, c.transport.spin_yield), ("busy", False)),
        (["transport.spin_poll=yield"], lambda c: c.transport.spin_yield, True),
    ],
)
def test_override(overrides, read, expected):
    assert read(load_config(overrides)) == expected


def test_restart_options_differ_only_in_strategy():
    # The budget is written once (settings.RestartSettings); each restart/*.yaml holds only its strategy.
    base = dataclasses.asdict(load_config([]).restart)
    for option in ("one_for_one", "one_for_all", "rest_for_one"):
        restart = dataclasses.asdict(load_config([f"restart={option}"]).restart)
        assert restart == {**base, "strategy": option}
        assert _yaml_keys(CONF_DIR / "restart" / f"{option}.yaml") == {"strategy"}


def _yaml_keys(path: Path) -> set:
    import yaml

    return set(yaml.safe_load(path.read_text()) or {})


def test_yaml_holds_only_what_an_option_changes():
    # Every default is written once, in the settings dataclasses: no YAML restates one.
    from omegaconf import OmegaConf

    from supervisor.config import to_dict

    defaults = to_dict(Config())
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        data = yaml_data = OmegaConf.to_container(OmegaConf.load(path))
        if path.name == "config.yaml" or not yaml_data:
            continue
        text = path.read_text()
        package = defaults if "@package _global_" in text else defaults.get(path.parent.name, {})
        selector = {"restart": "strategy", "backend": "backend", "workload": "name"}.get(path.parent.name)
        restated = {k: v for k, v in data.items() if k not in ("defaults", selector) and package.get(k, object()) == v}
        assert restated == {}, f"{path.relative_to(CONF_DIR)} restates defaults {restated}"


def test_choices_are_enums_checked_while_composing():
    from supervisor.settings import Device, LogLevel, Strategy

    cfg = load_config(["device=cpu", "restart=one_for_all", "logging.level=debug"])
    assert cfg.device is Device.cpu and cfg.restart.strategy is Strategy.one_for_all
    assert cfg.logging.level is LogLevel.DEBUG and f"{cfg.logging.level}" == "DEBUG" and cfg.device == "cpu"


def test_every_yaml_key_has_a_comment():
    key_line = re.compile(r"^\s*[A-Za-z_]\w*:")
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.startswith("hydra:"):  # Hydra's own keys (help texts in block scalars) are documented by Hydra
                break
            if key_line.match(line) and not line.strip().startswith("defaults:"):
                assert "#" in line, f"{path.relative_to(CONF_DIR)}:{number}: {line!r} has no comment"


def test_config_dir_adds_options_beside_ours(tmp_path):
    # As Hydra's --config-dir: a user's folder is added to the search path, it does not replace conf/.
    (tmp_path / "parallel").mkdir()
    (tmp_path / "parallel" / "big.yaml").write_text("tp: 2  # x\ndp: 2  # x\n")
    cfg = load_config(["parallel=big", "restart=one_for_all"], config_dir=str(tmp_path))
    assert (cfg.parallel.tp, cfg.parallel.dp, cfg.restart.strategy) == (2, 2, "one_for_all")


def test_config_dir_with_its_own_primary_config(tmp_path):
    (tmp_path / "mine.yaml").write_text("defaults:\n  - config\n  - _self_\nparallel:\n  tp: 4\n")
    assert load_config([], config_dir=str(tmp_path), config_name="mine").parallel.tp == 4


def test_missing_config_dir_names_config_dir(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config([], config_dir=str(tmp_path / "nowhere"))
    assert_names_key(info.value, "config_dir")


def test_yaml_syntax_error_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "parallel").mkdir()
    (tmp_path / "parallel" / "broken.yaml").write_text("tp: [1, 2\npp: 1\n")
    err = error_for_dir(["parallel=broken"], tmp_path)
    assert "\n" not in str(err) and "YAML syntax error" in str(err), str(err)


def error_for_dir(overrides: list[str], config_dir: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(overrides, config_dir=str(config_dir))
    return info.value


# -- bad input: one line, naming the key -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["parallel.tp=0"], "parallel.tp"),
        (["parallel.tp=-3"], "parallel.tp"),
        (["parallel.tp=abc"], "parallel.tp"),
        (["parallel.tp=2.5"], "parallel.tp"),
        (["parallel.tp=null"], "parallel.tp"),
        (["parallel.dp=0"], "parallel.dp"),
        (["parallel.pp=-1"], "parallel.pp"),
        (["parallel.foo=1"], "parallel.foo"),
        (["+parallel.foo=1"], "parallel.foo"),
        (["foo=1"], "foo"),
        (["restart=bogus"], "restart"),
        (["restart=[never,one_for_all]"], "restart"),
        (["backend=nope"], "backend"),
        (["parallel.pp=3"], "workload.layers"),
        (["parallel.tp=3"], "workload.hidden"),
        (["workload.hidden=100", "parallel.tp=8"], "workload.hidden"),
        (["device=gpu"], "device"),
        (["runtime.start_method=thread"], "runtime.start_method"),
        (["+runtime.env.A-B=1"], "runtime.env.A-B"),
        (["runtime.env.FOO=bar"], "runtime.env.FOO"),
        (["runtime.startup_timeout_s=0"], "runtime.startup_timeout_s"),
        (["runtime.omp_num_threads=-1"], "runtime.omp_num_threads"),
        (["worker.cls=no_such_module_xyz:Worker"], "worker.cls"),
        (["worker.cls=worker.tp_mlp:NoSuchClass"], "worker.cls"),
        (["worker.cls=worker.spec:Topology"], "worker.cls"),
        (["worker.cls=worker.tp_mlp"], "worker.cls"),
        (["worker.heartbeat_timeout_s=0.1"], "worker.heartbeat_timeout_s"),
        (["worker.max_calls=-1"], "worker.max_calls"),
        (["transport.slot_bytes=1024"], "transport.slot_bytes"),
        (["transport.slot_bytes=4100"], "transport.slot_bytes"),
        (["transport.slots=1"], "transport.slots"),
        (["transport.spin_us=-1"], "transport.spin_us"),
        (["transport.spin_poll=fast"], "transport.spin_poll"),
        (["shutdown.grace_s=-1"], "shutdown.grace_s"),
        (["shutdown.reap_s=0"], "shutdown.reap_s"),
        (["restart.strategy=sometimes"], "restart.strategy"),
        (["restart.restart_type=forever"], "restart.restart_type"),
        (["restart.calls_during_restart=queue"], "restart.calls_during_restart"),
        (["restart.intensity=-1"], "restart.intensity"),
        (["restart.period_s=0"], "restart.period_s"),
        (["restart.backoff_factor=0.5"], "restart.backoff_factor"),
        (["restart.backoff_initial_s=2", "restart.backoff_max_s=1"], "restart.backoff_max_s"),
        (["logging.level=LOUD"], "logging.level"),
        (["logging.events=maybe"], "logging.events"),
        (["workload.name=other"], "workload.name"),
        (["workload.hidden=${nope}"], "workload.hidden"),
        (["parallel.tp"], "parallel.tp"),  # malformed: no '='
        (["=3"], "=3"),
        (["parallel.tp=1,2"], "parallel.tp"),  # a sweep without -m
        # former escapes (issue 13): each was a traceback or accepted though absurd
        (["transport.slots=70000"], "transport.slots"),
        (["transport.slot_bytes=8589934592"], "transport.slot_bytes"),
        (["parallel.tp=100000", "parallel.dp=1000"], "parallel.tp"),
        (["parallel.tp=64", "parallel.dp=64", "workload.hidden=1024"], "parallel"),
        (["worker.max_rss_mb=1"], "worker.max_rss_mb"),
        (["worker.max_rss_mb=1000000000"], "worker.max_rss_mb"),
        (["runtime.preload=[nosuchmodule]"], "runtime.preload"),
        (["+runtime.env.CUDA_VISIBLE_DEVICES=0,1"], "runtime.env.CUDA_VISIBLE_DEVICES"),
        (["transport.spin_us=1e9"], "transport.spin_us"),
        (["worker.heartbeat_interval_s=0.0001"], "worker.heartbeat_interval_s"),
        (["workload.hidden=100000"], "workload.hidden"),
        (["ray.placement_strategy=CLOSE"], "ray.placement_strategy"),
        (["transport.reply_slots=70000"], "transport.reply_slots"),
        (["transport.reply_slot_bytes=4100"], "transport.reply_slot_bytes"),
        # round 3: these started the workers and failed with exit 1
        (["transport.max_message_bytes=100"], "transport.max_message_bytes"),
        (["transport.max_message_bytes=281474976710656"], "transport.max_message_bytes"),
    ],
)
def test_bad_input_names_the_key(overrides, key):
    assert_names_key(error_for(overrides), key)


def test_messages_say_what_is_wrong():
    assert str(error_for(["parallel.tp=0"])) == "parallel.tp: must be a positive integer, got 0"
    assert str(error_for(["parallel.foo=1"])) == "parallel.foo: no such key"
    assert "choose from: never, one_for_all, one_for_one, rest_for_one" in str(error_for(["restart=bogus"]))
    assert "'+runtime.env.FOO=...'" in str(error_for(["runtime.env.FOO=bar"]))
    assert "-m" in str(error_for(["parallel.tp=1,2"]))
    assert str(error_for(["restart.strategy=sometimes"])) == (
        "restart.strategy: must be one of never|one_for_one|one_for_all|rest_for_one, got 'sometimes'")
    assert """quote it: '+runtime.env.X="0,1"'""" in str(error_for(["+runtime.env.X=0,1"]))
    assert str(error_for(["transport.slots=70000"])) == (
        "transport.slots: must be <= 65,536 (the ring's slot index), got 70000")


def test_backend_ray_where_ray_is_installed(monkeypatch):
    monkeypatch.setattr(config_module, "_importable", lambda name: True)
    cfg = load_config(["backend=ray", "ray.address=auto"])
    assert (cfg.backend, cfg.ray.address) == ("ray", "auto")


def test_backend_ray_without_ray_is_one_line(monkeypatch):
    monkeypatch.setattr(config_module, "_importable", lambda name: name != "ray")
    err = error_for(["backend=ray"])
    assert_names_key(err, "backend")
    assert "not installed" in str(err)


def test_quoted_value_with_commas_is_one_value():
    assert load_config(['+runtime.env.CUDA_VISIBLE_DEVICES="0,1"']).runtime.env == (("CUDA_VISIBLE_DEVICES", "0,1"),)


# Numeric keys without a rule in config._RULES, and why: a seed takes any integer; llm.* and launch.* are checked by
# their own modules (supervisor/llm_workload.py, supervisor/launch/checks.py), against the checkpoint and the script.
UNBOUNDED = ("workload.seed", "llm.", "launch.")


def test_every_numeric_key_has_a_bound():
    from typing import get_type_hints

    def numeric(cls, path=""):
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint, key = hints[f.name], path + f.name
            if dataclasses.is_dataclass(hint):
                yield from numeric(hint, key + ".")
            elif hint in (int, float):
                yield key

    ruled = {key for key, _ in config_module._RULES}
    assert [k for k in numeric(Config) if k not in ruled and not k.startswith(UNBOUNDED)] == []


def test_config_error_is_always_one_line():
    assert str(ConfigError("a.b", "first\n  second\n")) == "a.b: first second"


# -- validate(): facts only the caller knows -------------------------------------------------------------------------


def test_more_ranks_than_visible_gpus_names_parallel():
    cfg = load_config(["device=cuda", "parallel.tp=4", "parallel.dp=2"])
    with pytest.raises(ConfigError) as info:
        validate(cfg, visible_gpus=4)
    assert_names_key(info.value, "parallel")
    validate(cfg, visible_gpus=8)


def test_cuda_without_gpus_names_device():
    cfg = load_config(["device=cuda"])
    with pytest.raises(ConfigError) as info:
        validate(cfg, visible_gpus=0)
    assert_names_key(info.value, "device")


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_gpu_count_only_binds_device_cuda(device):
    validate(load_config([f"device={device}", "parallel.tp=8"]), visible_gpus=0)


def test_fork_with_cuda_initialized_names_start_method():
    cfg = load_config(["runtime.start_method=fork"])
    validate(cfg, cuda_initialized=False)
    with pytest.raises(ConfigError) as info:
        validate(cfg, cuda_initialized=True)
    assert_names_key(info.value, "runtime.start_method")


@pytest.mark.parametrize("method", ["auto", "spawn", "forkserver"])
def test_other_start_methods_are_fine_with_cuda_initialized(method):
    validate(load_config([f"runtime.start_method={method}"]), cuda_initialized=True)


def test_validate_checks_hand_built_configs():
    # validate() must not rely on Hydra's type checks: configs can be built in code too.
    parallel = dataclasses.replace(Config().parallel, tp="2")  # type: ignore[arg-type]
    bad = dataclasses.replace(Config(), parallel=parallel)
    with pytest.raises(ConfigError) as info:
        validate(bad)
    assert_names_key(info.value, "parallel.tp")


# -- sweeps ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ([], [[]]),
        (["device=cpu"], [["device=cpu"]]),
        (["parallel.tp=1,2,4,8"], [["parallel.tp=1"], ["parallel.tp=2"], ["parallel.tp=4"], ["parallel.tp=8"]]),
        (["parallel.tp=range(1,3)"], [["parallel.tp=1"], ["parallel.tp=2"]]),
        (
            ["parallel.tp=1,2", "device=cpu", "workload=serve,bench"],
            [
                ["parallel.tp=1", "device=cpu", "workload=serve"],
                ["parallel.tp=1", "device=cpu", "workload=bench"],
                ["parallel.tp=2", "device=cpu", "workload=serve"],
                ["parallel.tp=2", "device=cpu", "workload=bench"],
            ],
        ),
        (["+runtime.env.FOO=a,b"], [["+runtime.env.FOO=a"], ["+runtime.env.FOO=b"]]),
        (["restart=glob(one_*)"], [["restart=one_for_all"], ["restart=one_for_one"]]),
        (["parallel.tp=1", "parallel.tp=2,4"], [["parallel.tp=2"], ["parallel.tp=4"]]),  # last value wins
    ],
)
def test_expand_sweep(overrides, expected):
    assert expand_sweep(overrides) == expected


def test_every_expanded_run_loads():
    runs = expand_sweep(["parallel.tp=1,2,4,8", "restart=never,one_for_all", "workload=bench"])
    assert len(runs) == 8
    assert sorted((c.parallel.tp, c.restart.strategy) for c in map(load_config, runs)) == sorted(
        (tp, s) for tp in (1, 2, 4, 8) for s in ("never", "one_for_all")
    )


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["parallel.tp=interval(1,2)"], "parallel.tp"),  # continuous: nothing to enumerate
        (["parallel.tp=glob(*)"], "parallel.tp"),  # glob needs a config group's options
        (["range(1,3)"], "range(1,3)"),  # malformed
    ],
)
def test_expand_sweep_rejects(overrides, key):
    with pytest.raises(ConfigError) as info:
        expand_sweep(overrides)
    assert_names_key(info.value, key)


