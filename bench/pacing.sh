#!/usr/bin/env bash
# Pacing accuracy (SPEC §12): sends N messages at a configured rate to a
# local SMTP sink and compares the arrival intervals with the configured one.
#
#   bash bench/pacing.sh [N] [PER_SECOND]      (defaults: 200 messages at 4/s)
#
# Needs python3 with tests/support/requirements.txt installed.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-200}
rate=${2:-4}
cargo build --release --quiet
work=$(mktemp -d)
trap 'kill "$server" 2>/dev/null || true; rm -rf "$work"' EXIT

python3 tests/support/smtp_server.py --tls none --ready-file "$work/ready.json" --record "$work/record.jsonl" &
server=$!
for _ in $(seq 100); do [ -s "$work/ready.json" ] && break; sleep 0.1; done
port=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["port"])' "$work/ready.json")

mkdir -p "$work/c/templates"
{
  echo "email,name"
  for i in $(seq "$n"); do echo "user$i@example.com,User $i"; done
} > "$work/c/recipients.csv"
echo 'Hello {{name}}, this is a pacing benchmark message.' > "$work/c/templates/body.txt.hbs"
cat > "$work/c/campaign.toml" <<TOML
name = "pacing-bench"
[recipients]
file = "recipients.csv"
[message]
from = "bench@acme.example"
subject = "pacing {{name}}"
text = "templates/body.txt.hbs"
[transport]
kind = "smtp"
host = "127.0.0.1"
port = $port
tls = "none"
[limits]
per_second = $rate
TOML

./target/release/hikyaku --db "$work/state.db" -q send "$work/c/campaign.toml"

python3 - "$work/record.jsonl" "$rate" "$work/state.db" <<'PY'
import json, sqlite3, sys
rate = float(sys.argv[2])
target = 1.0 / rate
arrivals = sorted(json.loads(l)["received_at"] for l in open(sys.argv[1]) if l.strip())
starts = [at / 1000 for (at,) in sqlite3.connect(sys.argv[3]).execute("SELECT at FROM send_log ORDER BY at")]
print(f"messages: {len(arrivals)}, configured interval: {target * 1000:.1f} ms")
for name, times in (("transaction starts (send log)", starts), ("arrivals at the server", arrivals)):
    gaps = [b - a for a, b in zip(times, times[1:])]
    mean = (times[-1] - times[0]) / len(gaps)
    worst = max(sum(1 for u in times[i:] if u < t + 1.0) for i, t in enumerate(times))
    print(f"{name}: mean interval {mean * 1000:.2f} ms (error {100 * (mean - target) / target:+.2f} %), "
          f"smallest {min(gaps) * 1000:.2f} ms, largest {max(gaps) * 1000:.2f} ms, "
          f"most in any 1 s window {worst} (limit {int(rate)})")
PY
