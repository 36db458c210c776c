"""Where workers run. Every backend implements the contract written in ``supervisor.backends.base``; the manager core
(``supervisor.core``) knows nothing else about them.

local (the default): worker processes are children of this supervisor, shared-memory rings between them.
ray: one Ray actor per rank in a placement group; imported only when ``backend=ray``.
"""
from __future__ import annotations

from supervisor.settings import Config


def make_backend(cfg: Config):
    if cfg.backend == "ray":
        from supervisor.backends.ray import RayBackend  # imports ray: only for backend=ray

        return RayBackend(cfg)
    from supervisor.backends.local.backend import LocalBackend

    return LocalBackend(cfg)
