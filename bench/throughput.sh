#!/usr/bin/env bash
# Unthrottled sending (SPEC §12): hikyaku against Postfix's smtp-source, the
# minimal C load generator, on the same connections and message size, both
# into Postfix's smtp-sink on loopback, side by side in each of RUNS runs;
# prints each run, the medians and their ratio.
#
#   bash bench/throughput.sh [MESSAGES] [CONNECTIONS] [BODY_BYTES] [RUNS] [DB]
#              (defaults: 20000 messages, 4 connections, 4000 bytes, 3 runs,
#               a new SQLite file per run; DB = postgres://.../NAME runs on a
#               PostgreSQL database of that name, dropped and made anew per run)
#
# Needs Postfix's tools: apt-get install postfix (smtp-source, smtp-sink);
# for PostgreSQL, psql.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-20000}
conns=${2:-4}
size=${3:-4000}
runs=${4:-3}
db=${5:-}
cargo build --release --quiet
work=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
smtp-sink -u nobody "127.0.0.1:$port" 1024 &
sink=$!
trap 'kill "$sink" 2>/dev/null || true; rm -rf "$work"' EXIT
sleep 0.5

mkdir -p "$work/c/templates"
{
  echo "email,name"
  for i in $(seq "$n"); do echo "user$i@example.com,User $i"; done
} > "$work/c/recipients.csv"
{
  echo 'Hello {{name}},'
  head -c "$size" /dev/zero | tr '\0' 'x' | fold -w 76
  echo
} > "$work/c/templates/body.txt.hbs"
cat > "$work/c/campaign.toml" <<TOML
name = "throughput-bench"
[recipients]
file = "recipients.csv"
[message]
from = "bench@acme.example"
subject = "throughput {{name}}"
text = "templates/body.txt.hbs"
[transport]
kind = "smtp"
host = "127.0.0.1"
port = $port
tls = "none"
connections = $conns
TOML

fresh_db() {
  case "$db" in
    postgres://*|postgresql://*)
      local name=${db##*/} server=${db%/*}
      PGOPTIONS=--client-min-messages=warning psql -q "$server/postgres" -c "DROP DATABASE IF EXISTS \"$name\"" -c "CREATE DATABASE \"$name\"" >/dev/null
      echo "$db" ;;
    *) rm -f "$work"/state.db*; echo "$work/state.db" ;;
  esac
}

now() { date +%s.%N; }
rate() { echo "$n / $1" | bc -l; }
printf 'messages: %s, connections: %s, body: %s bytes, state: %s\n' "$n" "$conns" "$size" "${db:-SQLite}"
source_rates=() hikyaku_rates=()
for run in $(seq "$runs"); do
  start=$(now)
  smtp-source -d -s "$conns" -m "$n" -l "$size" -f bench@acme.example -t rcpt@example.com "127.0.0.1:$port"
  source_secs=$(echo "$(now) - $start" | bc -l)
  state=$(fresh_db)
  start=$(now)
  ./target/release/hikyaku --db "$state" -q send "$work/c/campaign.toml" 2> "$work/summary"
  hikyaku_secs=$(echo "$(now) - $start" | bc -l)
  grep -q "sent $n in this run" "$work/summary" || { cat "$work/summary"; exit 1; }
  source_rates+=("$(rate "$source_secs")")
  hikyaku_rates+=("$(rate "$hikyaku_secs")")
  printf 'run %s: smtp-source %.2f s (%.0f msg/s), hikyaku send %.2f s (%.0f msg/s, whole command: read, check, send, record)\n' \
    "$run" "$source_secs" "${source_rates[-1]}" "$hikyaku_secs" "${hikyaku_rates[-1]}"
done
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
source_median=$(median "${source_rates[@]}")
hikyaku_median=$(median "${hikyaku_rates[@]}")
printf 'median of %s runs: smtp-source %.0f msg/s, hikyaku %.0f msg/s, ratio %.2f (target >= 0.8)\n' \
  "$runs" "$source_median" "$hikyaku_median" "$(echo "$hikyaku_median / $source_median" | bc -l)"
