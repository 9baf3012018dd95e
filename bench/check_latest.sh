#!/usr/bin/env bash
# Newest-release check: install the project WITHOUT constraints.txt into a throw-away venv (so pip takes
# the newest releases pyproject.toml allows) and run the whole test suite there. Run it before
# regenerating the lock (tools/lock.sh), and now and then, so the next upstream break is found here
# and not by a user.
#   bench/check_latest.sh               # venv in a temporary folder, removed afterwards
#   KEEP_VENV=1 bench/check_latest.sh   # keep it (path printed) to debug a failure
# torch stays at the release whose CPU build the README uses (TORCH_SPEC to change it, e.g.
# TORCH_SPEC='torch' for the newest torch too): an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
work="$(mktemp -d -t fellrec-latest-XXXXXX)"
cleanup() { if [ -z "${KEEP_VENV:-}" ]; then rm -rf "$work"; else echo "venv kept: $work/venv"; fi; }
trap cleanup EXIT

python3 -m venv "$work/venv"
# shellcheck disable=SC1091
. "$work/venv/bin/activate"
pip install -q --upgrade pip
pip install -q "$TORCH_SPEC"
echo "$TORCH_SPEC" > "$work/torch-only.txt"
pip install -q --upgrade --upgrade-strategy eager -c "$work/torch-only.txt" -e ".[test]"

echo "== newest releases resolved (differences to constraints.txt) =="
pip freeze | grep -v '^-e ' | sed 's/+cpu//' | tr 'A-Z_' 'a-z-' | sort > "$work/latest.txt"
grep -E '^[A-Za-z0-9_.-]+==' constraints.txt | tr 'A-Z_' 'a-z-' | sort > "$work/pinned.txt"
{ diff "$work/pinned.txt" "$work/latest.txt" || true; } | grep '^[<>]' \
  | grep -v -E 'nvidia|cuda|triton|bitsandbytes|setuptools|^> #' > "$work/diff.txt" || true
if [ -s "$work/diff.txt" ]; then cat "$work/diff.txt"; else echo "(none: the newest releases are the pinned set)"; fi
python - <<'PY'
import importlib.metadata as md
print("key versions:", ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "transformers", "peft", "flwr", "ray", "numpy", "pandas", "accelerate", "grpcio")))
PY

export FLWR_HOME="$work/flwr-home" FELLREC_CACHE="$work/cache"
python -m pytest -q "$@"
