#!/usr/bin/env bash
# A local Redis Cluster for the tests: three masters and three replicas on 127.0.0.1, ports
# 7000-7005 (tests read REDIS_CLUSTER_URL=redis://127.0.0.1:7000), no persistence, each node
# with a directory of its own.
#
#   scripts/redis-cluster.sh start   # reuses a healthy cluster; resets one in a stale state
#   scripts/redis-cluster.sh stop    # shuts the nodes down and removes their files
#   scripts/redis-cluster.sh status  # exit 0 when the cluster is healthy
#
# REDIS_CLUSTER_DIR sets where the nodes keep their files (default: $TMPDIR or /tmp, then
# tower-idempotency-redis-cluster).
set -euo pipefail

PORTS=(7000 7001 7002 7003 7004 7005)
DIR="${REDIS_CLUSTER_DIR:-${TMPDIR:-/tmp}/tower-idempotency-redis-cluster}"

cli() { local port=$1; shift; redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null; }

# Every node answers, says cluster_state:ok and knows all six; every master has its replica.
healthy() {
  local port info
  for port in "${PORTS[@]}"; do
    info=$(cli "$port" CLUSTER INFO) || return 1
    grep -q 'cluster_state:ok' <<<"$info" || return 1
    grep -q "cluster_known_nodes:${#PORTS[@]}" <<<"$info" || return 1
    if cli "$port" ROLE | head -n 1 | grep -q master; then
      cli "$port" INFO replication | grep -q 'connected_slaves:1' || return 1
    else
      cli "$port" INFO replication | grep -q 'master_link_status:up' || return 1
    fi
  done
}

stop() {
  local port
  for port in "${PORTS[@]}"; do
    cli "$port" SHUTDOWN NOSAVE >/dev/null || true
  done
  for port in "${PORTS[@]}"; do
    for _ in $(seq 50); do
      cli "$port" PING >/dev/null || break
      sleep 0.1
    done
  done
  rm -rf "$DIR"
}

start() {
  if healthy; then
    echo "Redis Cluster on ${PORTS[0]}-${PORTS[-1]}: already running, reused"
    return
  fi
  # Whatever is left (some nodes up, an old nodes.conf, a cluster that never formed): reset.
  stop
  local port addrs=()
  for port in "${PORTS[@]}"; do
    mkdir -p "$DIR/$port"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$port" \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 5000 \
      --save "" --appendonly no --dir "$DIR/$port" --logfile "$DIR/$port/redis.log"
    addrs+=("127.0.0.1:$port")
  done
  for port in "${PORTS[@]}"; do
    for _ in $(seq 50); do
      [ "$(cli "$port" PING)" = PONG ] && break
      sleep 0.1
    done
    [ "$(cli "$port" PING)" = PONG ] || { echo "node $port did not start" >&2; exit 1; }
  done
  redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes >"$DIR/create.log"
  for _ in $(seq 300); do
    if healthy; then
      echo "Redis Cluster on ${PORTS[0]}-${PORTS[-1]}: started"
      return
    fi
    sleep 0.1
  done
  echo "Redis Cluster did not become healthy; see $DIR" >&2
  exit 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) healthy ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
