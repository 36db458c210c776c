"""Imported first by the forkserver (supervisor/backends/local/startmethod.py puts it at the head of the preload
list): Python <= 3.12's forkserver ignores the sys.path it is handed and keeps ``python -c``'s current folder first,
so a user's ``worker.py`` there would be what it preloads and every worker inherits. See supervisor/paths.py."""
from supervisor.paths import ours_first

ours_first()
