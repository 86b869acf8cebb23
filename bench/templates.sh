#!/usr/bin/env bash
# Large templates, bodies and HTML (SPEC §11): `check` of a one-row campaign
# whose template is large in one way each, and `send --dry-run` of a large
# campaign under a daily window (its ETA simulates every message left).
# Prints the time and peak memory of each, or the error that refused it.
#
#   bash bench/templates.sh [HIKYAKU]   (default: the release build)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-}
if [ -z "$bin" ]; then
    cargo build --release --quiet
    bin=target/release/hikyaku
fi
bin=$(realpath "$bin")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 - "$work" <<'PY'
import os, sys
work = sys.argv[1]

def campaign(name, key, body, rows=1, limits=""):
    d = os.path.join(work, name)
    os.makedirs(os.path.join(d, "templates"))
    with open(os.path.join(d, "r.csv"), "w") as f:
        f.write("email,name\n")
        for i in range(rows):
            f.write(f"user{i}@example.com,Name{i}\n")
    with open(os.path.join(d, "templates", "body.hbs"), "w") as f:
        f.write(body)
    with open(os.path.join(d, "campaign.toml"), "w") as f:
        f.write(f'name = "{name}"\n[recipients]\nfile = "r.csv"\n[message]\n'
                f'from = "bench@acme.example"\nsubject = "Hi"\n{key} = "templates/body.hbs"\n'
                f'[transport]\nkind = "file"\n{limits}')

line = "Hello {{name}} " + "x" * 60 + "\n"
campaign("1-MB-template-12500-expressions", "text", line * 12500)
campaign("1-MB-template-450-expressions", "text", ("{{name}} " + "x" * 2320 + "\n") * 450)
campaign("10-MB-body-100-char-lines", "text", ("y" * 99 + "\n") * 100000)
campaign("10-MB-body-one-line", "text", ("y" * 99 + " ") * 100000)
campaign("html-50000-divs-deep", "html", "<div>" * 50000 + "{{name}}" + "</div>" * 50000)
campaign("html-1-MB-flat", "html", "{{name}}" + "<div>text</div>" * 69000)
campaign("html-100-KB-512-deep", "html", "{{name}}" + ("<div>" * 512 + "x" + "</div>" * 512) * 18)
campaign("dry-run-100000-rows-10000-a-day", "text", "Hello {{name}}\n", rows=100000,
         limits="[limits]\nper_day = 10000\nper_minute = 120\n")
PY

printf '%-36s %10s %12s  %s\n' case seconds "peak RSS" outcome
for dir in "$work"/*/; do
    name=$(basename "$dir")
    command=check
    case "$name" in dry-run-*) command="send --dry-run" ;; esac
    # shellcheck disable=SC2086
    /usr/bin/time -f '%e %M' -o "$work/time" "$bin" --db "$work/state.db" $command \
        "$dir/campaign.toml" >/dev/null 2>"$work/err" || true
    read -r secs kb < <(tail -n 1 "$work/time") || true
    outcome=$(grep -m1 '^error' "$work/err" | sed -E 's/.*(row 1[^:]*: |hbs: )//' | cut -c1-70 || true)
    printf '%-36s %10s %9s MB  %s\n' "$name" "$secs" "$((kb / 1024))" "${outcome:-ok}"
    rm -f "$work"/state.db*
done
