"""Start a supervisor with the given overrides, print its worker pids as JSON, then serve until a signal.
With --calls, keep issuing calls (so a kill lands mid-call)."""
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

    args = [a for a in sys.argv[1:] if a != "--calls"]
    cfg = load_config(["logging.events=false", "logging.level=WARNING", *args])
    escalation.become_subreaper()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    with Supervisor(cfg) as sup:
        kids = []
        if any("grandchild" in a for a in args):
            kids = [p for ps in sup.collective_rpc("children", timeout=10) for p in ps]
        print(json.dumps({"pids": sup.pids(), "grandchildren": kids}), flush=True)
        if "--calls" in sys.argv:
            while not stop.is_set():
                try:
                    sup.collective_rpc("sleep", args=(0.01,), timeout=5)
                except Exception:
                    pass
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
