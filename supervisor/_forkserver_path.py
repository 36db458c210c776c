"""Imported first by the forkserver (supervisor/backends/local/startmethod.py puts it at the head of the preload
list), before it imports torch:

- Python <= 3.12's forkserver ignores the sys.path it is handed and keeps ``python -c``'s current folder first, so a
  user's ``worker.py`` there would be what it preloads and every worker inherits. See supervisor/paths.py.
- The forkserver leaves the caller's process group for a session of its own (worker/session.py): a Ctrl-C or a
  SIGTERM sent to the group is the supervisor's to act on. Left in the group, the forkserver died of it (mid
  ``import torch``, with a traceback), and with it every exit status it reports for the workers (each read as 255).
"""
from supervisor.paths import ours_first

ours_first()

from worker import session  # noqa: E402 - after ours_first: our own worker package, not a folder's namesake

session.leave_group()
session.release()
