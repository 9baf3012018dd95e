#!/usr/bin/env bash
# Regenerate constraints.txt: the exact versions the README install and CI use.
# A deliberate step: run it, then the whole test suite on a fresh install (.ci/run), then commit both.
#   tools/lock.sh            # resolve the newest releases allowed by pyproject.toml
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-uv}"
if ! command -v "$UV" >/dev/null; then
  echo "uv is needed to resolve the lock: pip install uv (in any environment), or set UV=/path/to/uv" >&2
  exit 2
fi
"$UV" pip compile pyproject.toml constraints.in --all-extras \
  --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
  --custom-compile-command "tools/lock.sh" -o constraints.txt
echo "constraints.txt regenerated; now run .ci/run before committing it"
