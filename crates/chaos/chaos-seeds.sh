#!/usr/bin/env bash
# Runs one chaos schedule over several seeds, one run at a time, and prints a table.
#
#   crates/chaos/chaos-seeds.sh [options] FIRST_SEED COUNT [-- extra `capdb chaos run` flags]
#
#   -b PATH   the harness binary (default: target/debug/capdb)
#   -s PATH   the server binary the nodes run (--server-bin; default: the harness itself)
#   -o DIR    where each seed's output goes, as DIR/seed-N (default: target/chaos-seeds)
#   -d SECS   workload seconds per run (default: 60)
#
# The default schedule is the one that finds writes applied twice when a forwarded write's
# leader dies: 3 nodes, clients moving between followers and the leader, a compare-and-set heavy
# register workload plus counters, and the shard leader killed (kill -9) every few seconds
# while forwarded writes are in flight. Flags after `--` are appended (later ones win).
#
# Exit status: 0 when every seed passed, 1 when any found a violation or an unknown verdict,
# 2 when any run was a harness error. Needs root (network namespaces).
set -uo pipefail
cd "$(dirname "$0")/../.."

harness=target/debug/capdb
server=
out=target/chaos-seeds
duration=60
while getopts "b:s:o:d:" opt; do
  case $opt in
    b) harness=$OPTARG ;;
    s) server=$OPTARG ;;
    o) out=$OPTARG ;;
    d) duration=$OPTARG ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
if [ $# -lt 2 ]; then
  sed -n '2,16p' "$0"
  exit 2
fi
first=$1
count=$2
shift 2
[ "${1:-}" = "--" ] && shift
command -v jq >/dev/null || { echo "chaos-seeds: needs jq"; exit 2; }

schedule=(--nodes 3 --workload cas,counter --nemesis kill-leader --route mixed --rate 300
  --quiet 3 --fault-min 3 --fault-max 5 --recovery 8 --duration "$duration")
server_flag=()
[ -n "$server" ] && server_flag=(--server-bin "$server")

mkdir -p "$out"
worst=0
printf '%-6s %-5s %-7s %6s %6s %5s %5s %9s %5s  %s\n' \
  seed exit valid ops ok fail info forwarded kills first-problem
for ((seed = first; seed < first + count; seed++)); do
  dir=$out/seed-$seed
  "$harness" chaos run --seed "$seed" --out "$dir" "${schedule[@]}" "${server_flag[@]}" "$@" \
    >"$out/seed-$seed.log" 2>&1
  rc=$?
  report=$dir/report.json
  if [ -f "$report" ]; then
    read -r valid ops ok fail info fwd kills problem < <(jq -r '[
        (.valid | tostring), .ops, .ok, .fail, .info,
        ([.writes_by_role // {} | to_entries[] | select(.key != "leader" and .key != "unknown")
          | .value.ops] | add // 0),
        ([.windows[] | select(.fault | startswith("kill -9 leader"))] | length),
        (.problems[0] // "-")
      ] | @tsv' "$report")
  else
    valid=harness-error ops=- ok=- fail=- info=- fwd=- kills=- problem="see $out/seed-$seed.log"
  fi
  printf '%-6s %-5s %-7s %6s %6s %5s %5s %9s %5s  %s\n' \
    "$seed" "$rc" "$valid" "$ops" "$ok" "$fail" "$info" "$fwd" "$kills" "$problem"
  if [ "$rc" -gt "$worst" ]; then worst=$rc; fi
done
exit "$worst"
