#!/usr/bin/env bash
# Set up, start `tinkerd serve` on a free port, train the built-in tiny model through the official
# SDK (examples/train_tiny.py), then stop the server. Everything stays on this machine.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
export TINKERD_DATA_DIR=${TINKERD_DATA_DIR:-$PWD/.tinkerd-data}
PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
.venv/bin/tinkerd serve --port "$PORT" --log-level WARNING &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/api/v1/healthz" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "tinkerd exited" >&2; exit 1; }
  sleep 0.5
done
.venv/bin/python examples/train_tiny.py --url "http://127.0.0.1:$PORT" "$@"
