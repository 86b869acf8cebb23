#!/usr/bin/env bash
# Large recipient files (SPEC §12): generates a CSV of N rows and measures
# `check` (read, validate, render every row), a first `send --limit 1`
# (import into the state database), a resumed `send --limit 1` (re-read of
# a file whose rows are all known) and the peak memory of each.
#
#   bash bench/import.sh [N]          (default 1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000000}
cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/c/templates"
python3 - "$n" "$work/c/recipients.csv" <<'PY'
import sys
n, path = int(sys.argv[1]), sys.argv[2]
with open(path, "w") as f:
    f.write("email,first_name,last_name,city\n")
    for i in range(1, n + 1):
        f.write(f"user{i}@example.com,First{i},Last{i},City{i % 500}\n")
PY
echo 'Hello {{first_name}} {{last_name}} in {{city}}!' > "$work/c/templates/body.txt.hbs"
cat > "$work/c/campaign.toml" <<'TOML'
name = "import-bench"
[recipients]
file = "recipients.csv"
[message]
from = "bench@acme.example"
subject = "Hello {{first_name}}"
text = "templates/body.txt.hbs"
[transport]
kind = "file"
dir = "outbox"
TOML
run() {
  local what=$1; shift
  /usr/bin/time -f "$what: %e s, peak RSS %M KiB" ./target/release/hikyaku --db "$work/state.db" -q "$@" \
    "$work/c/campaign.toml" > /dev/null 2> "$work/err" || true
  tail -1 "$work/err"
}
echo "rows: $n ($(du -h "$work/c/recipients.csv" | cut -f1))"
run "check (nothing stored)" check
run "first send --limit 1 (import)" send --limit 1
run "resumed send --limit 1 (re-read)" send --limit 1
echo "state database: $(du -h "$work/state.db" | cut -f1)"
