#!/usr/bin/env bash
# Transport on a GPU host (issue 14 part 4): where a small round trip's microseconds go, then bench_transport.py with
# the settings worth comparing, each run printing its own table (peers side by side, A B A B, medians, p99, ratios):
#   0. build transport/_ringfast.c in place if it is not built for this Python (the compiled cursors)
#   1. profile_transport.py: pickling / queue work / hand-off shares of an N=1 round trip, compiled and Python cursors
#   2. round trip + CPU + idle at N=1,2,4,8: mpq, pipe, zmq, ours (compiled cursors) and py (Python cursors), plus
#      base (transport/ before the writer/reader split) when git history is there
#   3. the spin policy: yield-poll instead of the busy-poll a 16-core host gets (--spin-yield 1)
#   4. broadcast throughput, 1 MiB and 16 MiB to 2 and 8 readers: pipe, ours, zcopy (--quick counts)
# No GPU work: it needs the host's cores, not the card. About 4 minutes on 16 cores; time-boxed to 8 minutes in all.
# Run from the repository root:  bash scripts/gpu_transport.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import numpy" || { echo "gpu_transport.sh: needs numpy" >&2; exit 2; }
echo "== host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)"
BASE=4f0084c  # the last commit before the transport split (issue 11 item 7)
base=()
if git rev-parse -q --verify "$BASE^{commit}" >/dev/null 2>&1; then base=(--baseline "$BASE"); else
  echo "== no git history here: the 'base' peer (before the split) is left out"; fi
python -c "import transport._ringfast" 2>/dev/null || python setup.py -q build_ext --inplace >/dev/null 2>&1 \
  || echo "== transport/_ringfast.c could not be built here: 'ours' runs the Python cursors too"
echo "== cursors: $(python -c 'from transport import cursor; print(cursor.implementation())')"
python -c "import zmq" 2>/dev/null && peers=mpq,pipe,zmq,ours,py || peers=mpq,pipe,ours,py
bench() { local box=$1; shift; echo; echo "== bench_transport.py $*"
  timeout "$box" python scripts/bench_transport.py "$@" 2>/dev/null || echo "== (that run failed or hit its $box s limit: exit $?)"; }
echo; echo "== profile_transport.py (N=1, default spin policy, compiled cursors)"
timeout 40 python scripts/profile_transport.py || echo "== (profile failed: exit $?)"
echo; echo "== profile_transport.py (N=1, default spin policy, Python cursors)"
RV_TRANSPORT_PURE=1 timeout 40 python scripts/profile_transport.py || echo "== (profile failed: exit $?)"
bench 150 --peers "$peers" "${base[@]}" --only rt,idle --readers 1,2,4,8
bench 90 --peers pipe,ours --only rt --readers 1,2,4,8 --spin-yield 1
bench 120 --peers pipe,ours,zcopy --only tp --quick --readers 2,8 --sizes 1048576,16777216
