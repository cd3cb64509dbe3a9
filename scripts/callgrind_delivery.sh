#!/usr/bin/env bash
# Instructions per delivery, counted by callgrind: repeatable where timings are not.
#
# Runs `signalbox serve` (fresh SQLite file) under `valgrind --tool=callgrind`, drives it with
# `signalbox-bench --url … --rate R` for D seconds, and counts only the load phase (counters are
# zeroed when the load starts; the bench verifies from the database file, so the server does no
# verification work). Prints user-space instructions per acked delivery, and the inclusive
# count of the pipeline's main functions per delivery.
#
# callgrind counts user-space instructions only (not the kernel's socket and file work), runs
# the server about 50x slower on one core, and cannot use the CPU's SHA extensions (so HMAC
# counts high). Compare builds with it, at the same rate; do not read the totals as speed.
#
# Usage: scripts/callgrind_delivery.sh BINARY [NAME]   (env: RATE=100 DUR=10 SCENARIO=slack)
# BINARY is the signalbox server under test; the load comes from signalbox-bench (env BENCH,
# default target/release/signalbox-bench: `cargo build --release -p signalbox-bench`), the same
# for every BINARY compared.
# Example (A/B):
#   cp target/release/signalbox /tmp/sb_a   # … change, rebuild …
#   scripts/callgrind_delivery.sh /tmp/sb_a a; scripts/callgrind_delivery.sh target/release/signalbox b
set -euo pipefail
BIN=$(realpath "$1")
NAME=${2:-$(basename "$BIN")}
RATE=${RATE:-100}
DUR=${DUR:-10}
SCENARIO=${SCENARIO:-slack}
REPO=$(cd "$(dirname "$0")/.." && pwd)
BENCH=${BENCH:-${CARGO_TARGET_DIR:-$REPO/target}/release/signalbox-bench}
[ -x "$BENCH" ] || { echo "$BENCH is missing: cargo build --release -p signalbox-bench (or set BENCH)" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "valgrind is needed" >&2; exit 1; }
D=$(mktemp -d)
PORT=$((20000 + RANDOM % 20000))
OUT_DIR=${OUT_DIR:-/tmp}
PROFILE="$OUT_DIR/callgrind.$NAME.out"
rm -f "$PROFILE"*
export SIGNALBOX_DATABASE_URL="sqlite://$D/sb.db" SIGNALBOX_BIND="127.0.0.1:$PORT" \
  SIGNALBOX_ADMIN_TOKEN="callgrind-0123456789abcdef0123456789" \
  SIGNALBOX_MASTER_KEYS="k1:$(head -c32 /dev/urandom | base64)" RUST_LOG=warn
valgrind --tool=callgrind --callgrind-out-file="$PROFILE" --dump-instr=no "$BIN" serve \
  >"$D/server.log" 2>&1 &
VP=$!
trap 'kill $VP 2>/dev/null || true; rm -rf "$D"' EXIT
for _ in $(seq 1 240); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.5; done
"$BENCH" --url "http://127.0.0.1:$PORT" --database-url "sqlite://$D/sb.db" \
  --scenario "$SCENARIO" --rate "$RATE" --duration "$DUR" --warmup 0 --connections 16 \
  >"$D/bench.log" 2>&1 &
BP=$!
until grep -q "load over" "$D/bench.log"; do
  kill -0 $BP 2>/dev/null || { cat "$D/bench.log" >&2; exit 1; }
  sleep 0.05
done
callgrind_control -z $VP >/dev/null
wait $BP || { cat "$D/bench.log" >&2; exit 1; }
callgrind_control -d $VP >/dev/null
kill -INT $VP
wait $VP || true
LINE=$(tail -1 "$D/bench.log")
echo "$LINE" | cut -c1-160
N=$(echo "$LINE" | sed -E 's/.* acked ([0-9]+) at.*/\1/')
DUMP=$(ls -t "$PROFILE".* | head -1)
callgrind_annotate --inclusive=yes --threshold=100 "$DUMP" >"$OUT_DIR/callgrind.$NAME.txt" 2>/dev/null
TOTAL=$(grep "PROGRAM TOTALS" "$OUT_DIR/callgrind.$NAME.txt" | awk '{print $1}' | tr -d ,)
printf '%s: %s deliveries, %.1f k instructions per delivery (user space)\n' \
  "$NAME" "$N" "$(echo "$TOTAL / $N / 1000" | bc -l)"
for f in 'hyper::proto::h1::dispatch::Dispatcher<D,Bs,I,T>::poll_catch' \
  'signalbox::sources::slack::receive::{{closure}}' 'signalbox::sources::pylon::receive' \
  'signalbox::sources::webhook::receive' 'signalbox::worker::handle_batch::{{closure}}' \
  'signalbox::store::sqlite::run_cycle' 'signalbox::store::sqlite::rows::insert_deliveries' \
  'signalbox::store::sqlite::rows::apply' 'signalbox::store::sqlite::rows::ApplyItem::new' \
  'signalbox::protocol::slack::parse_envelope' 'signalbox::protocol::slack::peek_envelope' \
  'signalbox::protocol::slack::normalize'; do
  # The largest of the function's entries (inlined copies are listed under other files).
  V=$( (grep -F "$f" "$OUT_DIR/callgrind.$NAME.txt" || true) | awk '{gsub(",","",$1); if ($1+0 > m) m = $1+0} END {print m}' || true)
  if [ "${V:-0}" != 0 ]; then printf '  %8.1f k  %s\n' "$(echo "$V / $N / 1000" | bc -l)" "$f"; fi
done
echo "  (full inclusive listing: $OUT_DIR/callgrind.$NAME.txt)"
