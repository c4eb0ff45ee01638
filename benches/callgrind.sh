#!/usr/bin/env bash
# Instructions per request under valgrind's callgrind (benches/callgrind.rs): figures that do not
# drift with the machine's load, each scenario beside its baselines.
#
#   bash benches/callgrind.sh                         # every scenario, a table
#   bash benches/callgrind.sh first/ours replay/ours  # some
#   KEEP=/tmp/cg bash benches/callgrind.sh first/ours # keep callgrind.out files there, for
#                                                     # callgrind_annotate --inclusive=yes
#
# Needs valgrind. Instruction counts are those of `measured` and everything it calls (the
# requests, the runtime's work on them, reading the responses), divided by the requests sent.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v valgrind >/dev/null || { echo "valgrind is needed (Debian package valgrind)" >&2; exit 1; }

exe=$(cargo bench -p tower-idempotency-benches --bench callgrind --no-run 2>&1 |
  sed -n 's/.*Executable .*(\(.*\)).*/\1/p' | tail -n 1)
[ -x "$exe" ] || { echo "could not find the callgrind bench binary" >&2; exit 1; }

requests=$("$exe" list | sed -n 's/^requests //p')
if [ $# -gt 0 ]; then
  scenarios=("$@")
else
  mapfile -t scenarios < <("$exe" list | grep -v '^requests ')
fi

out=${KEEP:-$(mktemp -d)}
mkdir -p "$out"
declare -A per sha
for scenario in "${scenarios[@]}"; do
  file="$out/callgrind.out.${scenario//\//.}"
  valgrind --tool=callgrind --toggle-collect='*callgrind::measured*' \
    --callgrind-out-file="$file" "$exe" "$scenario" >/dev/null 2>"$file.log"
  total=$(sed -n 's/^totals: *\([0-9]*\).*/\1/p' "$file")
  per[$scenario]=$((total / requests))
  # SHA-256's share: valgrind's virtual CPU has no SHA extensions, so sha2 runs its portable
  # code here (about 50 instructions a byte) where the real CPU may use SHA-NI.
  compress=$(callgrind_annotate "$file" 2>/dev/null | awk '/sha2::sha256::compress256/ && !done { gsub(",", "", $1); print $1; done = 1 }')
  sha[$scenario]=$(( ${compress:-0} / requests ))
done
[ -n "${KEEP:-}" ] || rm -rf "$out"

# Each figure against its group's baselines, when they ran too.
ratio() {
  local base=$1 scenario=$2
  if [ -n "${per[$base]:-}" ] && [ "$base" != "$scenario" ]; then
    awk -v a="${per[$scenario]}" -v b="${per[$base]}" 'BEGIN { printf "%.2f", a / b }'
  fi
}
printf '| %s | %s | %s | %s | %s |\n' scenario 'instructions per request' 'of which SHA-256' 'vs first baseline' 'vs second baseline'
printf '|---|---:|---:|---:|---:|\n'
for scenario in "${scenarios[@]}"; do
  group=${scenario%%/*}
  case $group in
    passthrough) bases=(passthrough/bare passthrough/noop_layer) ;;
    first | replay) bases=("$group/bare" "$group/axum_idempotent") ;;
    digest) bases=("digest/raw_${scenario##*_}" "") ;;
  esac
  r1=$(ratio "${bases[0]}" "$scenario")
  r2=$([ -n "${bases[1]}" ] && ratio "${bases[1]}" "$scenario" || true)
  case $scenario in */bare) r1= r2= ;; esac
  printf '| %s | %s | %s | %s | %s |\n' "$scenario" "${per[$scenario]}" "${sha[$scenario]}" "${r1:+$r1 vs ${bases[0]#*/}}" "${r2:+$r2 vs ${bases[1]#*/}}"
done
