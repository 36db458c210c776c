"""The leak check lives in the package (supervisor/testing/leaks.py) so users' tests get it too; these names stay
for our conftest and scripts."""
from supervisor.testing.leaks import SHM_DIR, Snapshot, _children, helper_pids, kill_extra, leftovers  # noqa: F401
