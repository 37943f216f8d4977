#!/usr/bin/env bash
# Packaging check (run by `make test`): build the wheel and the sdist, install each into a fresh
# virtual environment the way the README says (torch 2.13.0 first, so pip keeps the CPU build),
# and run the installed `brickwork` command from outside the repository: `brickwork ls` and a
# tiny real run on scikit-learn's digits. Fails if the environment ever holds a CUDA build.
#
#   tools/check_package.sh [PYTHON]     (default: python3; the interpreter that builds and makes the venv)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${1:-python3}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
t0=$SECONDS

echo "check_package: building wheel and sdist into $tmp/dist"
"$py" -m build --outdir "$tmp/dist" "$repo" >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log"; exit 1; }
wheel="$(ls "$tmp"/dist/brickwork-*.whl)"
sdist="$(ls "$tmp"/dist/brickwork-*.tar.gz)"
# The sdist is a complete source: the package, the shipped configs, docs, tests and tools.
# (Listings go to files first: `grep -q` closing a pipe early would fail it under pipefail.)
tar -tzf "$sdist" >"$tmp/sdist.txt"
for f in pyproject.toml README.md brickwork/py.typed configs/default.yaml configs/quickstart.yaml mkdocs.yml Makefile; do
    grep -qx "brickwork-[^/]*/$f" "$tmp/sdist.txt" || { echo "check_package: $f missing from $(basename "$sdist")"; exit 1; }
done
"$py" -m zipfile -l "$wheel" >"$tmp/wheel.txt"
grep -q "brickwork/py.typed" "$tmp/wheel.txt" || { echo "check_package: py.typed missing from the wheel"; exit 1; }

"$py" -m venv "$tmp/venv"
pip="$tmp/venv/bin/pip"
install() {  # pip install, its output shown only if it fails
    "$pip" install --quiet "$@" >"$tmp/pip.log" 2>&1 || { cat "$tmp/pip.log"; exit 1; }
}
install torch==2.13.0

check_torch() {
    # the CPU build, and no CUDA runtime pulled in beside it
    "$tmp/venv/bin/python" -c "import torch, sys; v = torch.__version__; sys.exit(0 if v == '2.13.0+cpu' and torch.version.cuda is None else f'check_package: torch {v} (cuda {torch.version.cuda}), expected 2.13.0+cpu')"
    "$pip" list --format=freeze >"$tmp/installed.txt" 2>/dev/null
    if grep -qi '^nvidia-' "$tmp/installed.txt"; then
        echo "check_package: a CUDA package was installed:"; grep -i '^nvidia-' "$tmp/installed.txt"; exit 1
    fi
}

run_installed() {  # $1: what was installed
    local work="$tmp/work-$1"
    mkdir "$work"
    cat >"$work/tiny.yaml" <<'EOF'
name: package-check
seed: 0
data: {name: digits}
model: {name: mlp-tiny}
stages:
  - {stage: train, epochs: 2, lr: 0.01}
  - {stage: evaluate, latency_repeats: 1}
EOF
    # from outside the repository, with nothing of it on the path
    (cd "$work" && env -u PYTHONPATH "$tmp/venv/bin/brickwork" ls model 'mlp-*' >/dev/null)
    (cd "$work" && env -u PYTHONPATH "$tmp/venv/bin/brickwork" run tiny.yaml | tail -n 3)
    test -f "$work"/runs/*/report.md || { echo "check_package: no report written by the $1's brickwork"; exit 1; }
    local where
    where="$(cd "$work" && env -u PYTHONPATH "$tmp/venv/bin/python" -c 'import brickwork, os; print(os.path.dirname(brickwork.__file__))')"
    case "$where" in "$tmp"/venv/*) ;; *) echo "check_package: brickwork imported from $where, not the venv"; exit 1 ;; esac
}

echo "check_package: wheel $(basename "$wheel")"
install "$wheel[data]"
check_torch
run_installed wheel
"$pip" uninstall --quiet --yes brickwork

echo "check_package: sdist $(basename "$sdist")"
install "$sdist[data]"
check_torch
run_installed sdist

echo "check_package: ok ($((SECONDS - t0)) s)"
