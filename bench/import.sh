#!/usr/bin/env bash
# Large recipient files (SPEC §12): generates a CSV of N rows and measures,
# side by side in each of RUNS runs, the reference — the sqlite3 shell's
# `.import` of the same file into a table keyed by email — and hikyaku's
# `check` (read, validate, check every row's message), first `send --limit 1`
# (import and the full pre-send check, then one message) and resumed
# `send --limit 1` (an unchanged file: the time to its first message), with
# peak memory and the state database's size against the CSV's. Prints each
# run, the medians and each ratio to its target.
#
#   bash bench/import.sh [N] [RUNS] [DB]   (defaults: 1000000 rows, 3 runs,
#        a new SQLite file per run; DB = postgres://.../NAME runs on a
#        PostgreSQL database of that name, dropped and made anew per run)
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-1000000}
runs=${2:-3}
db=${3:-}
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
csv_bytes=$(stat -c %s "$work/c/recipients.csv")

fresh_db() {
  case "$db" in
    postgres://*|postgresql://*)
      local name=${db##*/} server=${db%/*}
      PGOPTIONS=--client-min-messages=warning psql -q "$server/postgres" -c "DROP DATABASE IF EXISTS \"$name\"" -c "CREATE DATABASE \"$name\"" >/dev/null
      echo "$db" ;;
    *) rm -f "$work"/state.db*; echo "$work/state.db" ;;
  esac
}

db_bytes() {
  case "$db" in
    postgres://*|postgresql://*)
      psql -qtA "$db" -c "SELECT pg_database_size(current_database())" ;;
    *) cat "$work"/state.db* | wc -c ;;
  esac
}

# Seconds and peak RSS (KiB) of one command, its output kept in $work/err.
timed() {
  /usr/bin/time -f '%e %M' -o "$work/time" "$@" > /dev/null 2> "$work/err" || true
  tail -n 1 "$work/time"
}

hikyaku() {
  timed ./target/release/hikyaku --db "$state" -q "$@" "$work/c/campaign.toml"
}

printf 'rows: %s, CSV: %s bytes, state: %s\n' "$n" "$csv_bytes" "${db:-SQLite}"
ref=() check=() first=() resume=() size=() rss=0
for run in $(seq "$runs"); do
  rm -f "$work/ref.db"
  read -r secs _ < <(timed sqlite3 "$work/ref.db" \
    "CREATE TABLE r (email TEXT PRIMARY KEY, first_name TEXT, last_name TEXT, city TEXT)" \
    ".import --csv --skip 1 $work/c/recipients.csv r")
  ref+=("$secs")
  state=$(fresh_db)
  rm -rf "$work/c/outbox"
  read -r secs kb < <(hikyaku check)
  check+=("$secs"); rss=$((kb > rss ? kb : rss))
  read -r secs kb < <(hikyaku send --limit 1)
  grep -q "1 message written" "$work/err" || { cat "$work/err"; exit 1; }
  first+=("$secs"); rss=$((kb > rss ? kb : rss))
  size+=("$(db_bytes)")
  read -r secs kb < <(hikyaku send --limit 1)
  grep -q "total: 2 written" "$work/err" || { cat "$work/err"; exit 1; }
  resume+=("$secs"); rss=$((kb > rss ? kb : rss))
  printf 'run %s: sqlite3 .import %s s; hikyaku check %s s, first send %s s, resumed send %s s, state %s bytes\n' \
    "$run" "${ref[-1]}" "${check[-1]}" "${first[-1]}" "${resume[-1]}" "${size[-1]}"
done
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
r=$(median "${ref[@]}")
c=$(median "${check[@]}")
f=$(median "${first[@]}")
s=$(median "${resume[@]}")
z=$(median "${size[@]}")
printf 'median of %s runs:\n' "$runs"
printf '  sqlite3 .import:      %6.2f s (the reference)\n' "$r"
printf '  check:                %6.2f s = %.2f x the import (target <= 3)\n' "$c" "$(echo "$c / $r" | bc -l)"
printf '  first send:           %6.2f s = %.2f x the import (target <= 3)\n' "$f" "$(echo "$f / $r" | bc -l)"
printf '  resumed send:         %6.2f s to its first message and exit (target <= 1 s)\n' "$s"
printf '  state database:       %.0f MB = %.2f x the CSV (target <= 2)\n' "$(echo "$z / 1000000" | bc -l)" "$(echo "$z / $csv_bytes" | bc -l)"
printf '  peak RSS:             %s MB (target < 50)\n' "$((rss / 1024))"
