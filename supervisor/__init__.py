"""rankvisor's supervisor: a supervised process tree for GPU (and CPU) workers.

Import-light on purpose: ``python -m supervisor`` must reach its first spawn quickly.
"""
from __future__ import annotations

__all__ = ["Supervisor"]


def __getattr__(name: str):
    if name == "Supervisor":
        from supervisor.api import Supervisor

        return Supervisor
    raise AttributeError(name)
