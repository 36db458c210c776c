"""Every backend's classes hold to the written contract (supervisor/backends/base.py), the Ray ones included:
their module imports ray lazily, so this runs without a Ray cluster and the two backends cannot drift unseen."""
from __future__ import annotations

import inspect

import pytest

from supervisor.backends import base
from supervisor.backends.local.backend import LocalBackend
from supervisor.backends.local.group import WorkerGroup
from supervisor.backends.local.monitor import Monitor
from supervisor.backends.local.process import WorkerProcess
from supervisor.backends.ray import RayBackend, RayChannel, RayGroup, RayMonitor, RayWorker
from supervisor.core.rpc import RpcChannel

IMPLEMENTATIONS = {
    base.Backend: [LocalBackend, RayBackend],
    base.Group: [WorkerGroup, RayGroup],
    base.WorkerHandle: [WorkerProcess, RayWorker],
    base.Channel: [RpcChannel, RayChannel],
    base.Monitor: [Monitor, RayMonitor],
}


def _methods(protocol: type) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(protocol).items()
            if callable(fn) and not name.startswith("_")}


def _params(sig: inspect.Signature) -> list[str]:
    return [p.name for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def test_every_protocol_has_two_implementations():
    assert set(IMPLEMENTATIONS) == set(base.CONTRACT)


@pytest.mark.parametrize("protocol,cls", [(p, c) for p, cs in IMPLEMENTATIONS.items() for c in cs],
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_implementation_has_every_method_with_the_contract_parameters(protocol, cls):
    for name, sig in _methods(protocol).items():
        impl = getattr(cls, name, None)
        assert impl is not None and callable(impl), f"{cls.__name__} lacks {protocol.__name__}.{name}"
        want, got = _params(sig), _params(inspect.signature(impl))
        # the implementation may add optional parameters after the contract's own
        assert got[:len(want)] == want, f"{cls.__name__}.{name}{tuple(got)} != contract {tuple(want)}"
        extra = list(inspect.signature(impl).parameters.values())[len(want):]
        assert all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in extra), \
            f"{cls.__name__}.{name} adds required parameters {[p.name for p in extra]}"


@pytest.mark.parametrize("protocol,cls", [(p, c) for p, cs in IMPLEMENTATIONS.items() for c in cs],
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_implementation_sets_every_contract_attribute(protocol, cls):
    """Data members are set in __init__ (or are class attributes / properties): read the source once."""
    source = inspect.getsource(cls)
    for name in getattr(protocol, "__annotations__", {}):
        assert f"self.{name}" in source or name in vars(cls) or \
            any(name in vars(k) for k in cls.__mro__), f"{cls.__name__} never sets {protocol.__name__}.{name}"
