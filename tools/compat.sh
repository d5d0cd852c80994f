#!/usr/bin/env bash
# Run the whole test suite against each transformers release given (default: the oldest supported, 5.24.0, and the
# newest tested, 5.25.0), each in its own virtual environment .compat/venv-<release> (reused when present):
#
#     tools/compat.sh                  # 5.24.0 and 5.25.0
#     tools/compat.sh 5.10.0 5.24.0    # any releases
#
# Every other package is pinned by constraints.txt, except the pins that the release's own requirements exclude
# (transformers 5.4.0 wants huggingface-hub<2 and tokenizers<=0.23.0): those are left to pip and listed in the table.
# Prints `release | passed | failed | errors | ...` and writes each release's row into docs/versions.md, between the
# compat-table marker comments (rows of releases not rerun stay). logs: .compat/{install,pytest}-<release>.log.
set -euo pipefail
cd "$(dirname "$0")/.."

releases=("$@")
[ ${#releases[@]} -gt 0 ] || releases=(5.24.0 5.25.0)
mkdir -p .compat
# DeepSpeed's CPU ops are compiled once (about a minute) and shared by every release's run.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.compat/torch_extensions}"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
[ -z "$(git status --porcelain 2>/dev/null)" ] || commit="$commit+dirty"

# constraints.txt with transformers at $1 and the pins that release excludes dropped; prints the dropped names.
write_constraints() {
    "$venv/bin/python" - "$1" "$2" <<'EOF'
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

release, out = sys.argv[1:]
wanted = [Requirement(r) for r in metadata.requires("transformers") or []]
wanted = {canonicalize_name(r.name): r for r in wanted if r.marker is None}
kept, dropped = [], []
for line in open("constraints.txt").read().splitlines():
    if not line or line.startswith("#"):
        continue
    pin = Requirement(line)
    name = canonicalize_name(pin.name)
    version = next(iter(pin.specifier)).version
    if name == "transformers":
        kept.append(f"transformers=={release}")
    elif name in wanted and not wanted[name].specifier.contains(version, prereleases=True):
        dropped.append(pin.name)
    else:
        kept.append(line)
open(out, "w").write("\n".join(kept) + "\n")
print(" ".join(dropped))
EOF
}

# The packages whose installed version differs from constraints.txt: `name version` (+name: not pinned there).
changed_pins() {
    "$venv/bin/pip" freeze --exclude-editable | "$venv/bin/python" -c '
import sys
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

def pins(lines):
    reqs = [Requirement(l) for l in lines if l.strip() and not l.startswith("#")]
    return {canonicalize_name(r.name): (r.name, next(iter(r.specifier)).version.split("+")[0]) for r in reqs}

pinned, installed = pins(open("constraints.txt").read().splitlines()), pins(sys.stdin.read().splitlines())
changes = [("" if key in pinned else "+") + f"{name} {version}" for key, (name, version) in sorted(installed.items())
           if pinned.get(key, (None, None))[1] != version]
changes += [f"-{name}" for key, (name, _) in sorted(pinned.items()) if key not in installed]
print(", ".join(changes) or "none")'
}

# Replace (or add) the row of release $1 in docs/versions.md's table, rows sorted by release.
write_row() {
    "$venv/bin/python" - "$1" "$2" <<'EOF'
import re
import sys
from pathlib import Path

from packaging.version import Version

release, row = sys.argv[1:]
path = Path("docs/versions.md")
start, end = "<!-- compat-table:start -->", "<!-- compat-table:end -->"
text = path.read_text()
head, rest = text.split(start)
table, tail = rest.split(end)
lines = [line for line in table.strip().splitlines()]
header, rows = lines[:2], {line.split("|")[1].strip(): line for line in lines[2:]}
rows[release] = row
ordered = [rows[key] for key in sorted(rows, key=Version)]
path.write_text(head + start + "\n" + "\n".join(header + ordered) + "\n" + end + tail)
EOF
}

# The counts of pytest's summary line ($2) for outcome $1 (a regular expression), 0 when absent.
count() { grep -oE "[0-9]+ $1" <<<"$2" | grep -oE '^[0-9]+' || echo 0; }

printf '| %s | %s | %s | %s | %s | %s |\n' transformers passed failed errors "pins that differ from constraints.txt" "run on"
for release in "${releases[@]}"; do
    venv=".compat/venv-$release"
    log=".compat/pytest-$release.log"
    constraints=".compat/constraints-$release.txt"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q torch==2.13.0 -c constraints.txt
    "$venv/bin/pip" install -q --no-deps "transformers==$release" "$(grep -i '^packaging==' constraints.txt)"
    dropped="$(write_constraints "$release" "$constraints")"
    [ -z "$dropped" ] || echo "transformers $release excludes the pins of: $dropped (left to pip)" >&2
    if ! "$venv/bin/pip" install -q -e ".[dev]" -c "$constraints" >".compat/install-$release.log" 2>&1; then
        row="| $release | - | - | - | install failed: .compat/install-$release.log | $commit, $(date +%F) |"
        echo "$row"
        write_row "$release" "$row"
        continue
    fi
    # One release's failures must not stop the others: pytest's exit status is only reported.
    status=0
    PATH="$PWD/$venv/bin:$PATH" VIRTUAL_ENV="$PWD/$venv" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        >"$log" 2>&1 || status=$?
    summary="$(tail -n 1 "$log")"
    counts="$(count passed "$summary") | $(count failed "$summary") | $(count 'errors?' "$summary")"
    row="| $release | $counts | $(changed_pins) | $commit, $(date +%F) |"
    echo "$row"
    [ "$status" -le 1 ] || echo "pytest exited with $status for $release: $summary" >&2
    write_row "$release" "$row"
done
