#!/usr/bin/env bash
# Scaling out (SPEC §10): one campaign on PostgreSQL sent by 1 worker, then
# by W workers at once, into the test SMTP server with a reply delay, no
# limits. Prints the time and rate of each and the ratio.
#
#   bash bench/workers.sh [N] [WORKERS] [DELAY_MS]   (defaults: 3000, 3, 20)
#
# Needs a PostgreSQL server (HIKYAKU_TEST_PG, default the local one as user
# postgres; a throwaway database is made and dropped) and python3 with
# tests/support/requirements.txt installed. HIKYAKU_BIN overrides the binary.
set -euo pipefail
export PGOPTIONS="-c client_min_messages=warning"
cd "$(dirname "$0")/.."
n=${1:-3000}
workers=${2:-3}
delay=${3:-20}
admin=${HIKYAKU_TEST_PG:-postgres://postgres@127.0.0.1:5432/postgres}
bin=${HIKYAKU_BIN:-./target/release/hikyaku}
if [ -z "${HIKYAKU_BIN:-}" ]; then cargo build --release --quiet; fi
work=$(mktemp -d)
db="hikyaku_bench_$$"
base=${admin%/*}
cleanup() {
    kill "$server" 2>/dev/null || true
    psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
    rm -rf "$work"
}
trap cleanup EXIT

python3 tests/support/smtp_server.py --tls none --delay-ms "$delay" \
    --ready-file "$work/ready.json" --record "$work/record.jsonl" 2>/dev/null &
server=$!
for _ in $(seq 100); do [ -s "$work/ready.json" ] && break; sleep 0.1; done
port=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["port"])' "$work/ready.json")

mkdir -p "$work/c/templates"
{
  echo "email,name"
  for i in $(seq "$n"); do echo "user$i@example.com,User $i"; done
} > "$work/c/recipients.csv"
echo 'Hello {{name}}, this is a scale-out benchmark message.' > "$work/c/templates/body.txt.hbs"
cat > "$work/c/campaign.toml" <<TOML
name = "workers-bench"
[recipients]
file = "recipients.csv"
[message]
from = "bench@acme.example"
subject = "workers {{name}}"
text = "templates/body.txt.hbs"
[transport]
kind = "smtp"
host = "127.0.0.1"
port = $port
tls = "none"
connections = 2
TOML

run() {
    local count=$1
    psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
    : > "$work/record.jsonl"
    local start end pids=()
    start=$(date +%s.%N)
    for _ in $(seq "$count"); do
        "$bin" --db "$base/$db" -q send "$work/c/campaign.toml" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p"; done
    end=$(date +%s.%N)
    python3 - "$start" "$end" "$count" "$work/record.jsonl" <<'PY'
import json, sys
start, end, count = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
got = [json.loads(l) for l in open(sys.argv[4]) if l.strip()]
rcpts = [r for m in got for r in m["rcpt_tos"]]
twice = len(rcpts) - len(set(rcpts))
print(f"{count} worker(s): {len(got)} messages in {end - start:.2f} s, "
      f"{len(got) / (end - start):.1f}/s, delivered twice: {twice}")
PY
}

run 1 | tee "$work/one"
run "$workers" | tee "$work/many"
python3 - "$work/one" "$work/many" <<'PY'
import re, sys
rate = lambda f: float(re.search(r"([\d.]+)/s", open(f).read()).group(1))
print(f"speed-up: {rate(sys.argv[2]) / rate(sys.argv[1]):.2f}x")
PY
