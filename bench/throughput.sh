#!/usr/bin/env bash
# Unthrottled sending (SPEC §12): hikyaku against Postfix's smtp-source, the
# minimal C load generator, on the same connections and message size, both
# into Postfix's smtp-sink on loopback.
#
#   bash bench/throughput.sh [MESSAGES] [CONNECTIONS] [BODY_BYTES]
#                                      (defaults: 2000 messages, 2, 2000 bytes)
#
# Needs Postfix's tools: apt-get install postfix (smtp-source, smtp-sink).
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2000}
conns=${2:-2}
size=${3:-2000}
cargo build --release --quiet
work=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
smtp-sink -u nobody "127.0.0.1:$port" 256 &
sink=$!
trap 'kill "$sink" 2>/dev/null || true; rm -rf "$work"' EXIT
sleep 0.5

start=$(date +%s.%N)
smtp-source -d -s "$conns" -m "$n" -l "$size" -f bench@acme.example -t rcpt@example.com "127.0.0.1:$port"
end=$(date +%s.%N)
source_secs=$(echo "$end - $start" | bc -l)

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
start=$(date +%s.%N)
./target/release/hikyaku --db "$work/state.db" -q send "$work/c/campaign.toml" 2> "$work/summary"
end=$(date +%s.%N)
hikyaku_secs=$(echo "$end - $start" | bc -l)
cat "$work/summary"

printf 'messages: %s, connections: %s, body: %s bytes\n' "$n" "$conns" "$size"
printf 'smtp-source: %.2f s (%.0f msg/s)\n' "$source_secs" "$(echo "$n / $source_secs" | bc -l)"
printf 'hikyaku send (import, check, send, record): %.2f s (%.0f msg/s)\n' "$hikyaku_secs" "$(echo "$n / $hikyaku_secs" | bc -l)"
printf 'ratio hikyaku / smtp-source time: %.2f\n' "$(echo "$hikyaku_secs / $source_secs" | bc -l)"
