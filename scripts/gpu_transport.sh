#!/usr/bin/env bash
# Transport on a GPU host (issue 14 part 4): where a small round trip's microseconds go, then bench_transport.py with
# the settings worth comparing, each run printing its own table (peers side by side, A B A B, medians, p99, ratios):
#   1. profile_transport.py: pickling / queue work / hand-off shares of an N=1 round trip
#   2. round trip + CPU + idle at N=1,2,4,8: mpq, pipe, ours, and base (transport/ before the writer/reader split,
#      when git is there) -- the issue's reference table, and the split's before/after on this host
#   3. the spin policy: busy-poll instead of yield-poll (--spin-yield 0), and the tree's former 50 us window
#   4. broadcast throughput, 1 MiB and 16 MiB to 2 and 8 readers: pipe, ours, zcopy
# No GPU work: it needs the host's cores, not the card. About 2-3 minutes on 16 cores; time-boxed to 5 minutes in all.
# Run from the repository root:  bash scripts/gpu_transport.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import numpy" || { echo "gpu_transport.sh: needs numpy" >&2; exit 2; }
echo "== host: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)"
BASE=4f0084c  # the last commit before the transport split (issue 11 item 7)
base=()
if git rev-parse -q --verify "$BASE^{commit}" >/dev/null 2>&1; then base=(--baseline "$BASE"); else
  echo "== no git history here: the 'base' peer (before the split) is left out"; fi
peers=pipe,ours
python -c "import zmq" 2>/dev/null && peers=mpq,pipe,zmq,ours || peers=mpq,pipe,ours
bench() { echo; echo "== bench_transport.py $*"; timeout 65 python scripts/bench_transport.py "$@" 2>/dev/null \
  || echo "== (that run failed or hit its 65 s limit: exit $?)"; }
echo; echo "== profile_transport.py (N=1, default spin policy)"
timeout 40 python scripts/profile_transport.py || echo "== (profile failed: exit $?)"
bench --peers "$peers" "${base[@]}" --only rt,idle --readers 1,2,4,8
bench --peers pipe,ours --only rt --readers 1,2,4,8 --spin-yield 0
bench --peers pipe,ours --only rt --readers 1,8 --spin-us 50
bench --peers pipe,ours,zcopy --only tp --readers 2,8 --sizes 1048576,16777216
