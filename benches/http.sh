#!/usr/bin/env bash
# Requests per second and latency of the reference API (examples/seed_api/) over HTTP on
# loopback, with and without the idempotency layer, measured with wrk.
#
#   bash benches/http.sh
#   DURATION=5s CONNECTIONS=64 bash benches/http.sh
#   HANDLER_DELAY_MS=5 bash benches/http.sh      # handlers that take 5 ms
#
# Scenarios, each a POST with a 1 KiB JSON body and `Authorization: Bearer ...`:
#
#   bare        POST /calls, a new key and body each, to seed_api --no-idempotency (the baseline)
#   first       POST /calls, a new key and body each: every request runs and is stored
#   replay      POST /calls, one key and one body, stored beforehand: every request is a replay
#   unlisted    POST /voices with a key: not an idempotent endpoint, passes through
#   bare again  the baseline once more, to show how much the machine drifted during the run
#
# Each scenario starts seed_api afresh (release build) on 127.0.0.1:PORT and stops it after.
# Every scenario is bounded by DURATION; nothing leaves the loopback interface.
# Needs wrk (Debian package `wrk`) and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
PORT=${PORT:-38080}
HANDLER_DELAY_MS=${HANDLER_DELAY_MS:-0}
AUTH="Authorization: Bearer sk_bench_org"

for tool in wrk curl; do
  command -v "$tool" >/dev/null || { echo "benches/http.sh needs $tool (apt-get install $tool)" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

cargo build --release -p seed_api

# start FLAGS...: a fresh seed_api on 127.0.0.1:PORT, quiet (no per-request log lines), so that
# no scenario inherits the resources (and memory) that an earlier one created.
start() {
  RUST_LOG=error "$server" --addr "127.0.0.1:$PORT" --handler-delay-ms "$HANDLER_DELAY_MS" "$@" \
    >"$work/server.log" 2>&1 &
  server_pid=$!
  pids+=("$server_pid")
  for _ in $(seq 100); do
    curl -s -o /dev/null -H "$AUTH" "$url/stats" && return
    sleep 0.1
  done
  echo "seed_api did not start on port $PORT:" >&2
  cat "$work/server.log" >&2
  exit 1
}
stop() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
}
server="${CARGO_TARGET_DIR:-target}/release/seed_api"
url="http://127.0.0.1:$PORT"

# A ~1 KiB call body; %s is the request's reference.
cat >"$work/body.lua" <<'EOF'
local items = {}
for i = 1, 12 do
  items[i] = string.format('{"sku":"sku-%06d","qty":%d,"note":"ring twice, then leave it"}', i, i % 7 + 1)
end
body_template = '{"ref":"%s","to":"+15550100","agent_id":"agent_8f14e45fceea167a",'
  .. '"metadata":{"priority":3,"campaign":"spring"},"items":[' .. table.concat(items, ",") .. ']}'
EOF

# A new key and body for every request. Arguments: PATH RUN_ID.
cat >"$work/fresh.lua" <<'EOF'
dofile(os.getenv("BENCH_DIR") .. "/body.lua")
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  path, run = args[1], args[2]
  n = 0
end
function request()
  n = n + 1
  local ref = string.format("%s-%d-%d", run, tid, n)
  return wrk.format("POST", path, {
    ["Authorization"] = "Bearer sk_bench_org",
    ["Content-Type"] = "application/json",
    ["X-Idempotency-Key"] = ref,
  }, string.format(body_template, ref))
end
EOF

# The same key and body every time. Arguments: PATH KEY.
cat >"$work/same.lua" <<'EOF'
dofile(os.getenv("BENCH_DIR") .. "/body.lua")
function init(args)
  req = wrk.format("POST", args[1], {
    ["Authorization"] = "Bearer sk_bench_org",
    ["Content-Type"] = "application/json",
    ["X-Idempotency-Key"] = args[2],
  }, string.format(body_template, args[2]))
end
function request()
  return req
end
EOF

export BENCH_DIR="$work"
run_id="run$$-$(date +%s)"

replay_key="$run_id-replay"

# Create-handler runs so far on the layered server (GET /stats).
handler_calls() {
  curl -s -H "$AUTH" "$url/stats" | tr -cd '0-9'
}

# measure NAME URL SCRIPT ARGS...: one wrk run; prints a summary line to $work/results.
measure() {
  local name=$1 url=$2 script=$3
  shift 3
  local out="$work/$name.txt"
  wrk -t "$THREADS" -c "$CONNECTIONS" -d "$DURATION" --latency -s "$work/$script" "$url" -- "$@" >"$out"
  awk -v name="$name" '
    function ms(v) {
      if (v ~ /us$/) return v / 1000
      if (v ~ /ms$/) return v + 0
      if (v ~ /s$/) return v * 1000
      return v
    }
    /Requests\/sec/ { rps = $2 }
    /^ +50%/ { p50 = ms($2) }
    /^ +90%/ { p90 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    /Non-2xx or 3xx responses/ { bad = $NF }
    END { printf "%s %s %.3f %.3f %.3f %d\n", name, rps, p50, p90, p99, bad + 0 }
  ' "$out" >>"$work/results"
}

echo "wrk: $THREADS thread(s), $CONNECTIONS connections, $DURATION per scenario, handler delay ${HANDLER_DELAY_MS} ms"
start --no-idempotency
measure bare "$url" fresh.lua /calls "$run_id-bare"
stop
start
measure first "$url" fresh.lua /calls "$run_id-first"
stop
start
# The replayed record: one connection for a second, so the first request runs and the rest
# are replays.
wrk -t 1 -c 1 -d 1s -s "$work/same.lua" "$url" -- /calls "$replay_key" >/dev/null
runs_before=$(handler_calls)
measure replay "$url" same.lua /calls "$replay_key"
runs_after=$(handler_calls)
stop
start
measure unlisted "$url" fresh.lua /voices "$run_id-unlisted"
stop
start --no-idempotency
measure bare_again "$url" fresh.lua /calls "$run_id-bare-again"
stop

echo
awk '
  { name[NR] = $1; rps[NR] = $2; p50[NR] = $3; p90[NR] = $4; p99[NR] = $5; bad[NR] = $6 }
  END {
    base = rps[1]
    printf "| scenario | requests/s | vs bare | p50 ms | p90 ms | p99 ms | non-2xx |\n"
    printf "|---|---:|---:|---:|---:|---:|---:|\n"
    for (i = 1; i <= NR; i++)
      printf "| %s | %.0f | %.2f | %.3f | %.3f | %.3f | %d |\n", name[i], rps[i], rps[i] / base, p50[i], p90[i], p99[i], bad[i]
  }
' "$work/results"
echo
echo "handler runs during the replay scenario: $((runs_after - runs_before)) (0: every request was a replay)"
