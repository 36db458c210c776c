"""Start a supervisor with the given overrides, print its worker pids as JSON, then serve until a signal.
With --calls, keep issuing calls (so a kill lands mid-call); with --reserve, wait for the weight keeper and every
warm standby first and print their pids too ("reserve")."""
from __future__ import annotations

import json
import os
import signal
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> int:
    from supervisor.backends.local import escalation
    from supervisor.api import Supervisor
    from supervisor.config import load_config

    flags = ("--calls", "--reserve")
    args = [a for a in sys.argv[1:] if a not in flags]
    cfg = load_config(["logging.events=false", "logging.level=WARNING", *args])
    escalation.become_subreaper()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    with Supervisor(cfg) as sup:
        kids = []
        if any("grandchild" in a for a in args):
            kids = [p for ps in sup.collective_rpc("children", timeout=10) for p in ps]
        reserve = _reserve_pids(sup) if "--reserve" in sys.argv else []
        print(json.dumps({"pids": sup.pids(), "grandchildren": kids, "reserve": reserve}), flush=True)
        if "--calls" in sys.argv:
            method = "sleep" if "echo" in cfg.worker.cls.lower() else "ping"
            while not stop.is_set():
                try:
                    sup.collective_rpc(method, args=(0.01,) if method == "sleep" else (), timeout=5)
                except Exception:
                    pass
        stop.wait()
    return 0


def _reserve_pids(sup, timeout_s: float = 60.0) -> list[int]:
    """The keeper's and every standby's pids, once every standby is ready."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = sup.reserve_status()
        if len(st["standbys"]) == len(sup.live_groups) and all(s["ready"] for s in st["standbys"].values()):
            keeper = [st["keeper"]["pid"]] if st["keeper"] else []
            return keeper + [p for s in st["standbys"].values() for p in s["pids"]]
        time.sleep(0.02)
    raise TimeoutError("the reserve did not get ready")


if __name__ == "__main__":
    sys.exit(main())
