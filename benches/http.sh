#!/usr/bin/env bash
# Requests per second and latency of the reference API (examples/seed_api/) over HTTP on
# loopback, with and without the idempotency layer, measured with wrk.
#
#   bash benches/http.sh
#   ROUNDS=5 DURATION=5s CONNECTIONS=64 bash benches/http.sh
#   HANDLER_DELAY_MS=5 bash benches/http.sh      # handlers that take 5 ms
#
# Scenarios, each a POST with a 1 KiB JSON body and `Authorization: Bearer ...`:
#
#   bare        POST /calls, a new key and body each, to seed_api --no-idempotency (the baseline)
#   first       POST /calls, a new key and body each: every request runs and is stored
#   replay      POST /calls, one key and one body, stored beforehand: every request is a replay
#   unlisted    POST /voices with a key: not an idempotent endpoint, passes through
#
# The scenarios run in ROUNDS rounds (default 3), in turn within each round: forwards in odd
# rounds, backwards in even ones, so that a machine that speeds up or slows down during the run
# weighs on every scenario alike. Each scenario is compared with the bare run of its own round,
# and the table gives the median over the rounds with the lowest and highest round.
#
# Each run starts seed_api afresh (release build) on 127.0.0.1:PORT and stops it after.
# Every run is bounded by DURATION (default 5s), after a warm-up run of 2 s that is not counted;
# nothing leaves the loopback interface.
# Needs wrk (Debian package `wrk`) and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
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

# measure NAME URL SCRIPT ARGS...: one wrk run; adds a line to $work/results: the round, the
# scenario, requests/s, p50, p90 and p99 in ms, and the count of non-2xx responses.
measure() {
  local name=$1 url=$2 script=$3
  shift 3
  local out="$work/$name.$round.txt"
  wrk -t "$THREADS" -c "$CONNECTIONS" -d "$DURATION" --latency -s "$work/$script" "$url" -- "$@" >"$out"
  awk -v round="$round" -v name="$name" '
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
    END { printf "%d %s %s %.3f %.3f %.3f %d\n", round, name, rps, p50, p90, p99, bad + 0 }
  ' "$out" >>"$work/results"
}

# One run of each scenario.
scenario() {
  case $1 in
    bare)
      start --no-idempotency
      measure bare "$url" fresh.lua /calls "$run_id-bare-$round"
      ;;
    first)
      start
      measure first "$url" fresh.lua /calls "$run_id-first-$round"
      ;;
    replay)
      start
      # The replayed record: one connection for a second, so the first request runs and the
      # rest are replays.
      local key="$replay_key-$round"
      wrk -t 1 -c 1 -d 1s -s "$work/same.lua" "$url" -- /calls "$key" >/dev/null
      local before
      before=$(handler_calls)
      measure replay "$url" same.lua /calls "$key"
      replay_runs=$((replay_runs + $(handler_calls) - before))
      ;;
    unlisted)
      start
      measure unlisted "$url" fresh.lua /voices "$run_id-unlisted-$round"
      ;;
  esac
  stop
}

echo "wrk: $THREADS thread(s), $CONNECTIONS connections, $DURATION per run, $ROUNDS rounds, handler delay ${HANDLER_DELAY_MS} ms"
# A warm-up run, not counted: the first run after a build is slower (cold caches and page
# faults in the server and in wrk), which would weigh on whichever scenario comes first.
start --no-idempotency
wrk -t "$THREADS" -c "$CONNECTIONS" -d 2s -s "$work/fresh.lua" "$url" -- /calls "$run_id-warm-up" >/dev/null
stop
replay_runs=0
for round in $(seq "$ROUNDS"); do
  if ((round % 2)); then order=(bare first replay unlisted); else order=(unlisted replay first bare); fi
  for name in "${order[@]}"; do scenario "$name"; done
done

echo
echo "Each round (requests/s):"
awk '{ printf "  round %d %-8s %8.0f  p50 %.3f ms  p99 %.3f ms  non-2xx %d\n", $1, $2, $3, $4, $6, $7 }' "$work/results"
echo
awk '
  function median(list, n,    i, j, t, a) {
    split(list, a, " ")
    for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
  { row[NR] = $0; if ($2 == "bare") bare[$1] = $3 }
  END {
    split("bare first replay unlisted", names, " ")
    for (r = 1; r <= NR; r++) {
      split(row[r], f, " ")
      s = f[2]; n[s]++; q = f[3] / bare[f[1]]
      rps[s] = rps[s] " " f[3]; ratio[s] = ratio[s] " " q
      p50[s] = p50[s] " " f[4]; p90[s] = p90[s] " " f[5]; p99[s] = p99[s] " " f[6]; bad[s] += f[7]
      if (!(s in lo) || q < lo[s]) lo[s] = q
      if (!(s in hi) || q > hi[s]) hi[s] = q
    }
    printf "| scenario | requests/s (median) | vs bare, same round: median (lowest to highest) | p50 ms | p90 ms | p99 ms | non-2xx |\n"
    printf "|---|---:|---:|---:|---:|---:|---:|\n"
    for (i = 1; i <= 4; i++) {
      s = names[i]
      if (!n[s]) continue
      printf "| %s | %.0f | %.2f (%.2f to %.2f) | %.3f | %.3f | %.3f | %d |\n", s, median(rps[s], n[s]), median(ratio[s], n[s]), lo[s], hi[s], median(p50[s], n[s]), median(p90[s], n[s]), median(p99[s], n[s]), bad[s]
    }
  }
' "$work/results"
echo
echo "handler runs during the replay runs: $replay_runs (0: every request was a replay)"
