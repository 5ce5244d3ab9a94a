#!/usr/bin/env bash
# A three-node raft-http KV cluster driven with curl alone, after Openraft's
# examples/raft-kv-memstore/test-cluster.sh: start, init, write, read, kill the
# leader, fail over, restart it and watch it catch up by snapshot, stop.
#
# Run from the repository with the package installed: ./examples/test-cluster.sh
# Needs: curl, python3, and `raft-http` on PATH (else `python3 -m raft_http.kv.cli`; set RAFT_HTTP
# to override).

set -o errexit
set -o nounset
set -o pipefail

if [ -z "${RAFT_HTTP-}" ]; then
    if command -v raft-http >/dev/null; then RAFT_HTTP=raft-http; else RAFT_HTTP="python3 -m raft_http.kv.cli"; fi
fi
BASE_PORT=${BASE_PORT:-21001}   # 21001..21003: below the usual ephemeral range (32768+)
DATA=$(mktemp -d "${TMPDIR:-/tmp}/raft-http-cluster.XXXXXX")
declare -A PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do
        kill -9 "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$DATA"
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

port() { echo $((BASE_PORT + $1 - 1)); }

start_node() {
    local id=$1
    # shellcheck disable=SC2086
    $RAFT_HTTP node --id "$id" --listen "127.0.0.1:$(port "$id")" --data-dir "$DATA/$id" \
        --snapshot-logs 50 --keep-logs 5 >>"$DATA/node$id.log" 2>&1 &
    PIDS[$id]=$!
    echo "started node $id (pid ${PIDS[$id]}) on 127.0.0.1:$(port "$id")"
}

# rpc <node> <route> [json-body]: POST (GET without a body), following 307s to the leader.
rpc() {
    local node=$1 uri=$2 body=${3-}
    local url="127.0.0.1:$(port "$node")$uri"
    echo "--- rpc($url, ${body:-GET})" >&2
    if [ -n "$body" ]; then
        curl --silent --show-error --fail-with-body --location --max-time 15 \
            -H "Content-Type: application/json" -d "$body" "$url"
    else
        curl --silent --show-error --fail-with-body --max-time 15 "$url"
    fi
    echo
}

# wait_until <seconds> <description> <command...>: bounded polling.
wait_until() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "FAILED: timed out waiting for $what" >&2
            tail -n 20 "$DATA"/node*.log >&2
            exit 1
        fi
        sleep 0.2
    done
}

metric() {  # metric <node> <python expression over m>
    curl --silent --max-time 5 "127.0.0.1:$(port "$1")/metrics" |
        python3 -c "import json,sys; m=json.load(sys.stdin); print($2)"
}
is_leader() { [ "$(metric "$1" 'm["state"]')" = "Leader" ]; }
leader_of() { metric "$1" 'm["current_leader"]'; }
has_value() { rpc "$1" /read "\"$2\"" 2>/dev/null | grep -q "\"value\":\"$3\""; }
purged_past() { [ "$(metric "$1" '-1 if m["purged"] is None else m["purged"]["index"]')" -gt "$2" ]; }

echo "=== start 3 nodes"
for id in 1 2 3; do start_node "$id"; done
for id in 1 2 3; do wait_until 15 "node $id" metric "$id" 'm["id"]'; done

echo "=== initialize the cluster with nodes 1, 2, 3"
rpc 1 /init "[[1,\"127.0.0.1:$(port 1)\"],[2,\"127.0.0.1:$(port 2)\"],[3,\"127.0.0.1:$(port 3)\"]]"
leader_elected() { local l; l=$(leader_of 1) && [ "$l" != None ] && is_leader "$l"; }
wait_until 15 "a leader" leader_elected
LEADER=$(leader_of 1)
echo "leader: node $LEADER"

echo "=== write through every node (followers answer 307 to the leader; curl -L follows)"
for id in 1 2 3; do rpc "$id" /write "{\"Set\":{\"key\":\"foo$id\",\"value\":\"bar$id\"}}"; done
rpc 2 /write '{"Delete":{"key":"foo1"}}'

echo "=== read: consistent on every node, then local once applied"
for id in 1 2 3; do rpc "$id" /consistent_read '"foo2"'; done
for id in 1 2 3; do wait_until 10 "node $id to apply" has_value "$id" foo3 bar3; done

echo "=== kill the leader (node $LEADER) with SIGKILL"
OLD_LAST_LOG=$(metric "$LEADER" 'm["last_log_index"]')
kill -9 "${PIDS[$LEADER]}"
OLD=$LEADER
SURVIVOR=$(( OLD % 3 + 1 ))
wait_until 20 "a new leader" bash -c "
    l=\$(curl -s --max-time 2 127.0.0.1:$(port "$SURVIVOR")/metrics |
        python3 -c 'import json,sys; print(json.load(sys.stdin)[\"current_leader\"])')
    [ -n \"\$l\" ] && [ \"\$l\" != None ] && [ \"\$l\" != $OLD ]"
LEADER=$(leader_of "$SURVIVOR")
echo "new leader: node $LEADER"
if rpc "$SURVIVOR" /consistent_read '"foo3"' | grep -q '"bar3"'; then
    echo "acknowledged writes survived"
else
    echo "FAILED: an acknowledged write is missing after the failover" >&2
    exit 1
fi

echo "=== write 150 keys while node $OLD is down (snapshots every 50 logs)"
for i in $(seq 1 150); do
    rpc "$SURVIVOR" /write "{\"Set\":{\"key\":\"bulk$i\",\"value\":\"$i\"}}" >/dev/null 2>&1
done
wait_until 20 "the leader to purge its log" purged_past "$LEADER" "$OLD_LAST_LOG"
echo "leader snapshot: $(metric "$LEADER" 'm["snapshot"]'), purged: $(metric "$LEADER" 'm["purged"]')"

echo "=== restart node $OLD; it can only catch up by snapshot"
start_node "$OLD"
wait_until 30 "node $OLD to catch up" has_value "$OLD" bulk150 150
echo "node $OLD snapshot: $(metric "$OLD" 'm["snapshot"]'), applied: $(metric "$OLD" 'm["last_applied"]')"
rpc "$OLD" /read '"foo2"'

echo "=== metrics of node $OLD"
rpc "$OLD" /metrics

echo "=== stop every node with SIGTERM"
for id in 1 2 3; do kill -TERM "${PIDS[$id]}"; done
for id in 1 2 3; do
    wait "${PIDS[$id]}" && echo "node $id exited cleanly" || { echo "node $id exited with $?"; exit 1; }
done
PIDS=()
echo "=== all good"
