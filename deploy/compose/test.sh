#!/usr/bin/env bash
# End-to-end test of deploy/compose: builds the offline image from a capdb binary, starts the
# 3-node cluster, writes 100 keys through node 1, kills the container of the shard leader once
# the shard is fully replicated, reads every key back from the other two nodes, writes through
# the survivors, and tears everything down (also on failure).
#
#   deploy/compose/test.sh [BINARY]      # BINARY default target/release/capdb
#
# Exits 0 with a SKIP message only when no Docker engine answers (`docker info` fails).
# Uses host ports 6381-6383 and 8081-8083 (those of docker-compose.yml), which must be free.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
BIN=${1:-$REPO/target/release/capdb}
COMPOSE_FILE="$HERE/docker-compose.yml"
READY_TIMEOUT_S=${READY_TIMEOUT_S:-120}
FAILOVER_TIMEOUT_S=${FAILOVER_TIMEOUT_S:-20}
KEYS=100

log() { echo "== $*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }

if ! docker info >/dev/null 2>&1; then
  echo "SKIP: deploy/compose/test.sh needs a Docker engine and 'docker info' fails"
  exit 0
fi

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
else
  fail "neither 'docker compose' nor 'docker-compose' is installed (Debian: apt-get install docker-compose)"
fi

need_apt=()
command -v redis-cli >/dev/null || need_apt+=(redis-tools)
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing ${need_apt[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    fail "needs ${need_apt[*]}"
  fi
fi

command -v python3 >/dev/null || fail "needs python3 (reads the cluster map JSON)"
[ -x "$BIN" ] || fail "no capdb binary at $BIN (cargo build --release -p capdb-cli)"

for port in 6381 6382 6383 8081 8082 8083; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    fail "host port $port is already in use; the compose file publishes 6381-6383 and 8081-8083"
  fi
done

ID="$(date +%s)-$$"
PROJECT="capdbtest${ID//-/}"
export CAPDB_IMAGE="capdb:compose-test-$ID"
export CAPDB_BIND=127.0.0.1
unset CAPDB_PASSWORD
dc() { "${COMPOSE[@]}" -p "$PROJECT" -f "$COMPOSE_FILE" "$@"; }

STATUS=1
cleanup() {
  set +e
  if [ "$STATUS" != 0 ]; then
    echo "---- container state"
    dc ps
    echo "---- container logs (last 200 lines per node)"
    dc logs --no-color --tail=200
  fi
  log "teardown: down -v"
  dc down -v --remove-orphans >/dev/null 2>&1
  docker image rm -f "$CAPDB_IMAGE" >/dev/null 2>&1
  if [ "$STATUS" = 0 ]; then echo "PASS: compose cluster test"; else echo "FAIL: compose cluster test" >&2; fi
}
trap 'STATUS=$?; cleanup' EXIT
trap 'exit 130' INT TERM

log "building $CAPDB_IMAGE from $BIN"
"$REPO/deploy/docker/build-offline-image.sh" "$BIN" "$CAPDB_IMAGE"

log "up (project $PROJECT, ${COMPOSE[*]})"
dc up -d

http_code() { curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$1/readyz" || true; }

log "waiting until node 1 answers PING and /readyz is 200 on all three nodes (max ${READY_TIMEOUT_S}s)"
up_at=$SECONDS
deadline=$((SECONDS + READY_TIMEOUT_S))
while :; do
  pong=$(redis-cli -p 6381 PING 2>/dev/null || true)
  codes="$(http_code 8081) $(http_code 8082) $(http_code 8083)"
  [ "$pong" = PONG ] && [ "$codes" = "200 200 200" ] && break
  [ $SECONDS -lt $deadline ] || fail "cluster not ready after ${READY_TIMEOUT_S}s (PING: '$pong', /readyz: $codes)"
  sleep 1
done
log "ready $((SECONDS - up_at))s after up"
curl -s http://127.0.0.1:8081/v1/cluster | head -c 2000; echo

NONCE=$RANDOM$RANDOM
value() { echo "value-$1-$NONCE"; }

# redis-cli exits 0 on error replies too: compare the reply text.
redis_retry() { # PORT EXPECTED CMD... : retries for up to 10 s while the reply differs
  local port=$1 expected=$2 reply=; shift 2
  local until=$((SECONDS + 10))
  while :; do
    reply=$(redis-cli -p "$port" "$@" 2>&1 || true)
    [ "$reply" = "$expected" ] && return 0
    [ $SECONDS -lt $until ] || { echo "'redis-cli -p $port $*' answered '$reply', expected '$expected'" >&2; return 1; }
    sleep 0.2
  done
}

log "writing $KEYS keys to node 1 (keyspace default)"
for i in $(seq 1 $KEYS); do
  redis_retry 6381 OK SET "key:$i" "$(value "$i")" || fail "SET key:$i on node 1"
done
[ "$(redis-cli -p 6381 DBSIZE)" = "$KEYS" ] || fail "DBSIZE on node 1 is $(redis-cli -p 6381 DBSIZE), expected $KEYS"

EXPECTED=$(for i in $(seq 1 $KEYS); do value "$i"; done)
get_all() { for i in $(seq 1 $KEYS); do echo "GET key:$i"; done | redis-cli -p "$1" 2>&1; }

# Kill the node that leads the default keyspace's shard (most shards, if several), once every
# shard has a leader and all its replicas as voters: the reads below then need a failover.
shard_state() { # prints "ok LEADER" when every shard of `default` is fully replicated, else "wait"
  curl -s -m 2 "http://127.0.0.1:$1/v1/cluster" | python3 -c '
import collections, json, sys
try:
    v = json.load(sys.stdin)
    ks = next(k for k in v["keyspaces"] if k["name"] == "default")
    shards = ks["shards"]
    ok = all(s.get("leader") and len(s.get("voters") or []) == ks["replication_factor"] for s in shards)
    lead = collections.Counter(s["leader"] for s in shards).most_common(1)[0][0]
    print("ok %s" % lead if ok else "wait")
except Exception:
    print("wait")
'
}
log "waiting until every shard of keyspace default has a leader and all its voters (max 60s)"
deadline=$((SECONDS + 60))
while :; do
  read -r st LEADER < <(shard_state 8081) || true
  [ "$st" = ok ] && break
  [ $SECONDS -lt $deadline ] || { curl -s http://127.0.0.1:8081/v1/cluster >&2; fail "shards not fully replicated after 60s"; }
  sleep 1
done
case "$LEADER" in 1|2|3) ;; *) fail "unexpected shard leader '$LEADER'" ;; esac
SURVIVORS=()
for n in 1 2 3; do [ "$n" = "$LEADER" ] || SURVIVORS+=("$n"); done
VICTIM=$(dc ps -q "capdb$LEADER")
[ -n "$VICTIM" ] || fail "no container for capdb$LEADER"
log "docker kill capdb$LEADER (the shard leader; container $VICTIM)"
docker kill "$VICTIM" >/dev/null
killed_at=$SECONDS

for n in "${SURVIVORS[@]}"; do
  port=638$n
  log "reading all $KEYS keys from the node on port $port (retrying up to ${FAILOVER_TIMEOUT_S}s)"
  deadline=$((killed_at + FAILOVER_TIMEOUT_S))
  attempts=0
  while :; do
    attempts=$((attempts + 1))
    got=$(get_all "$port")
    [ "$got" = "$EXPECTED" ] && break
    if [ $SECONDS -ge $deadline ]; then
      echo "first differences (expected | got):" >&2
      diff <(echo "$EXPECTED") <(echo "$got") | head -20 >&2 || true
      fail "node on port $port did not return every value within ${FAILOVER_TIMEOUT_S}s of the kill"
    fi
    sleep 0.5
  done
  echo "   all $KEYS values correct (attempt $attempts, $((SECONDS - killed_at))s after the kill)"
done

A=${SURVIVORS[0]} B=${SURVIVORS[1]}
log "writing through the survivors: SET on node $A, GET on node $B"
redis_retry "638$A" OK SET after-failover "$NONCE" || fail "SET on node $A after the kill"
redis_retry "638$B" "$NONCE" GET after-failover || fail "GET on node $B after the kill"

state=$(docker inspect -f '{{.State.Status}}' "$VICTIM")
[ "$state" != running ] || fail "capdb$LEADER is running again (restarted?) during the test"
log "capdb$LEADER stayed down ($state) for the whole check"
