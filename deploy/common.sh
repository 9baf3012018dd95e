# Shared settings for the deploy scripts (sourced, not run). Every value can be overridden
# from the environment, e.g. `DEPLOY_DIR=/srv/fellrec SUPERLINK_HOST=10.0.0.5 deploy/start_superlink.sh`.

# Where certificates, keys, secrets, tokens, the SuperLink database and client state live.
# Keep it outside the project folder: `flwr run .` packs *.json/*.toml/*.md files of the app folder.
DEPLOY_DIR="$(realpath -m "${DEPLOY_DIR:-$HOME/fellrec-deploy}")"
# The server's address as the clients reach it (must be one of the certificate's SANs).
SUPERLINK_HOST="${SUPERLINK_HOST:-127.0.0.1}"
SUPERLINK_PORT="${SUPERLINK_PORT:-9093}"  # the Fleet gateway: the only SuperLink port other machines reach
# The SuperLink itself (Control, Runtime and Fleet API) on 127.0.0.1 only: operators' `flwr` CLI.
CONTROL_PORT="${CONTROL_PORT:-9095}"
# Interface the public processes (Fleet gateway, split service) listen on: 0.0.0.0 accepts other
# machines, 127.0.0.1 only this one.
BIND_HOST="${BIND_HOST:-0.0.0.0}"
SPLIT_PORT="${SPLIT_PORT:-8470}"
# Name of the [superlink.<name>] connection in $FLWR_HOME/config.toml used by `flwr run/list/stop`.
CONNECTION="${CONNECTION:-fellrec-tls}"
PYTHON="${PYTHON:-python}"

export FLWR_HOME="${FLWR_HOME:-$HOME/.flwr}"
# Offline-friendly and reproducible: no telemetry, no update check, and use the installed
# project (pip install -e .) instead of a fresh `uv sync` per run.
export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

CERTS="$DEPLOY_DIR/certs"
KEYS="$DEPLOY_DIR/keys"
SPLIT_DIR="$DEPLOY_DIR/split"
