"""Our import names -- supervisor, worker, transport -- are common folder names in users' projects.

``python -m supervisor`` (and multiprocessing's forkserver, started as ``python -c``) put the current folder first on
sys.path, so a ``worker.py`` or ``transport/`` there would be imported instead of our packages -- in this process and
in every worker, which inherit sys.path. ``ours_first`` puts the folder our ``supervisor`` package came from ahead of
the current folder when (and only when) that is the case: ours are then found first, and the user's own modules in
the current folder stay importable under their other names (``worker.cls=mine:MyWorker``). The ``rankvisor`` console
script is immune from the start: its sys.path[0] is its own bin/ folder.

Imports nothing of ours but this package's light ``__init__``: it must run before ``worker`` is first imported.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

SHADOWABLE = ("worker", "transport")  # "supervisor" itself: if it were shadowed, this code would not be running
SUPERVISORD_MARKER = "supervisord.py"  # supervisord's import package is also called "supervisor"


def root() -> str:
    """The folder holding our supervisor package (site-packages, or the checkout for an editable install)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ours_first() -> str | None:
    """Make our packages win over same-named modules on sys.path; one line when that cannot be done."""
    home = root()
    shadowed = [name for name in SHADOWABLE if not _is_ours(name, home)]
    if shadowed:
        sys.path[:] = [home] + [p for p in sys.path if os.path.abspath(p or ".") != home]
        importlib.invalidate_caches()
        still = [name for name in shadowed if not _is_ours(name, home)]
        if still:
            return (f"{_origin(still[0])} shadows rankvisor's '{still[0]}' package (installed in {home}); rename it "
                    "or run from another folder")
    if os.path.exists(os.path.join(home, "supervisor", SUPERVISORD_MARKER)):
        return (f"supervisord is installed over rankvisor in {home}/supervisor (both use the import name "
                "'supervisor'); install rankvisor in its own virtual environment")
    return None


def _is_ours(name: str, home: str) -> bool:
    module = sys.modules.get(name)
    origin = getattr(module, "__file__", None) if module is not None else _origin(name)
    return origin is not None and os.path.abspath(origin).startswith(home + os.sep)


def _origin(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    return locations[0] if locations else spec.origin
