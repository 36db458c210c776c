#!/usr/bin/env bash
# Transport on a GPU host (issue 14 part 4): where a small round trip's microseconds go, then bench_transport.py with
# the settings worth comparing, each run printing its own table (peers side by side, A B A B, medians, p99, ratios):
#   0. build transport/_ringfast.c in place if it is not built for this Python (the compiled cursors); measure how
#      often the host interrupts a busy process (hiccups.py), the floor under every p99 below
#   1. profile_transport.py: pickling / queue work / hand-off shares of an N=1 round trip, compiled and Python cursors
#   2. round trip + CPU + idle at N=1,2,4,8: mpq, pipe, zmq, ours (compiled cursors) and py (Python cursors), plus
#      base (transport/ before the writer/reader split) when git history is there, and c (scripts/floor_rt.c: the
#      same exchange in C, busy-polling: the host's floor); then pipe, ours and c again with every process pinned
#   3. broadcast throughput, 1 MiB and 16 MiB to 2 and 8 readers: pipe, ours, zcopy (--quick counts)
# No GPU work: it needs the host's cores, not the card. About 6 minutes on 16 cores; time-boxed to 8.5 minutes in all.
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
for p in 2 9 16; do echo; echo "== hiccups.py --procs $p"
  timeout 30 python scripts/hiccups.py --procs "$p" --seconds 3 || echo "== (hiccups failed: exit $?)"; done
python -c "import zmq" 2>/dev/null && peers=mpq,pipe,zmq,ours,py || peers=mpq,pipe,ours,py
bench() { local box=$1; shift; echo; echo "== bench_transport.py $*"
  timeout "$box" python scripts/bench_transport.py "$@" 2> >(grep -E "^  rt|peer c" >&2) \
    || echo "== (that run failed or hit its $box s limit: exit $?)"; }
echo; echo "== profile_transport.py (N=1, default spin policy, compiled cursors)"
timeout 40 python scripts/profile_transport.py || echo "== (profile failed: exit $?)"
echo; echo "== profile_transport.py (N=1, default spin policy, Python cursors)"
RV_TRANSPORT_PURE=1 timeout 40 python scripts/profile_transport.py || echo "== (profile failed: exit $?)"
bench 180 --peers "$peers,c" "${base[@]}" --only rt,idle --readers 1,2,4,8 --calls 4800
bench 100 --peers pipe,ours,c --only rt --readers 1,2,4,8 --calls 4800 --pin --spin-yield 0
bench 120 --peers pipe,ours,zcopy --only tp --quick --readers 2,8 --sizes 1048576,16777216
