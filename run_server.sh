#!/usr/bin/env bash
# Set up (once) and run tinkerd on this box: API + worker, no external service.
# Extra arguments go to `tinkerd serve` (e.g. --port 8000 --data-dir /srv/tinkerd).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/tinkerd serve "$@"
