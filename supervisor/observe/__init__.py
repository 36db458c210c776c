"""Seeing the tree: what a person watching it (or a probe, or a script) needs, kept apart from the mechanism.

::

    EventLog ──subscribe──> story.py      every event in words into supervisor.log
             ├────────────> progress.py   start-up display by phase (rich, on a terminal)
             └────────────> metrics.py    restarts, give-ups, exits (counters)
    Supervisor.calls (calls.py) ──> metrics.py  RPC latency by method, failures by kind
    Supervisor.status() ──> control.py   RUN_DIR/control.sock (0600): status / restart / stop, for status_cli.py
                        ├─> http.py      127.0.0.1:PORT  /metrics /healthz /readyz /api/state and the page (page.py)
                        └─> live.py      RUNTIME/live/: this user's live trees, found by status_cli.py from anywhere
    endpoints.py: those three for one tree, served by the command (session.py) or an embedded tree (embedded.py)

``watch(sup, t0)`` starts what the CLI shows; nothing here is needed for the tree to run, and nothing here may stop it.
"""
from __future__ import annotations



def watch(sup, t0: float, job=None):
    """Start the story, the start-up display, the control socket and (when configured) the HTTP endpoints for
    ``sup`` (session.py). ``job``: a callable giving the multi-node job's view, shown in the status as "job".
    Imported lazily: the API imports calls.py from here and must stay light."""
    from supervisor.observe.session import Watch

    return Watch(sup, t0, job)
