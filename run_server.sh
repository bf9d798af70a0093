#!/usr/bin/env bash
# Set up (once) and run tinkerd on this box.
#
#   ./run_server.sh [SERVE FLAGS]
#       Embedded: API + worker in one process, no external service. Every argument goes to
#       `tinkerd serve` (e.g. --port 8000 --data-dir /srv/tinkerd).
#
#   ./run_server.sh --cluster [--workers N] [--port P] [--host H] [--data-dir D]
#                   [--api-workers N] [--log-level L]           (or TINKERD_CLUSTER=1)
#       Scaled out on this one box, the topology of docker-compose.yml:
#       - redis-server on 127.0.0.1:$REDIS_PORT (default: a free port), with --appendonly yes and
#         its files in <data-dir>/redis; skipped when TINKERD_REDIS_URL names a running Redis;
#       - `tinkerd worker` processes: one per GPU that `nvidia-smi -L` lists (--device cuda:i),
#         else --workers N CPU workers (default 1); --workers N with GPUs spreads N workers over
#         them round-robin;
#       - the API: `tinkerd serve --redis URL` (gunicorn, --api-workers processes, default 2).
#       Ctrl-C or SIGTERM stops every child (API, then workers, then Redis) and waits for them.
#       The workers stop together: none hands its models to another that is stopping; the last
#       one saves every model exactly (weights, AdamW state, pending gradients) in
#       <data-dir>/stopped, and the next start on the same data directory restores them under
#       the same model ids. A worker gets TINKERD_DRAIN_SECONDS (default 300) + 60 s for that.
#       A worker that dies is reported and the cluster carries on without it; if Redis, the API
#       or the last worker exits, everything is stopped and the script fails.
#       Redis logs to <data-dir>/redis/redis.log; tinkerd processes log to stderr.
#
# The data directory is --data-dir, else $TINKERD_DATA_DIR, else ~/.local/share/tinkerd. Other
# settings come from TINKERD_* variables as usual (tinkerd/config.py).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

cluster=${TINKERD_CLUSTER:-0}
[[ $cluster == 1 || $cluster == true || $cluster == yes ]] && cluster=1 || cluster=0
for arg in "$@"; do
  [[ $arg == --cluster ]] && cluster=1
done

if [[ $cluster == 0 ]]; then
  cd "$here"
  bash scripts/setup.sh
  exec .venv/bin/tinkerd serve "$@"
fi

# -- cluster mode ----------------------------------------------------------------------------
die() { echo "run_server.sh: $*" >&2; exit 2; }
n_workers=""
port=${TINKERD_PORT:-8000}
host=${TINKERD_HOST:-127.0.0.1}
data_dir=${TINKERD_DATA_DIR:-$HOME/.local/share/tinkerd}
log_level=INFO
serve_args=()
while (($#)); do
  opt=$1 val=""
  if [[ $opt == --*=* ]]; then val=${opt#*=} opt=${opt%%=*}; shift
  elif [[ $opt == --cluster || $opt == -h || $opt == --help ]]; then shift
  else
    (($# >= 2)) || die "$opt needs a value"
    val=$2; shift 2
  fi
  case $opt in
    --cluster) ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --workers) n_workers=$val ;;
    --port) port=$val ;;
    --host) host=$val ;;
    --data-dir) data_dir=$val ;;
    --log-level) log_level=$val ;;
    --api-workers) serve_args+=(--api-workers "$val") ;;
    *) die "unknown option $opt in --cluster mode (see ./run_server.sh --help)" ;;
  esac
done
[[ -z $n_workers || $n_workers =~ ^[1-9][0-9]*$ ]] || die "--workers needs a positive number"
[[ $port =~ ^[0-9]+$ ]] || die "--port needs a number"
mkdir -p "$data_dir"
data_dir=$(cd "$data_dir" && pwd)  # absolute, relative to where the script was started
export TINKERD_DATA_DIR=$data_dir

cd "$here"
bash scripts/setup.sh
TINKERD=$PWD/.venv/bin/tinkerd
PY=$PWD/.venv/bin/python

pids=()     # every child, in start order: for the watch at the end
names=()    # what each is, for messages
redis_pid="" api_pid="" worker_pids=()
declare -A seen_dead=()
any_alive() {
  local pid
  for pid in "$@"; do kill -0 "$pid" 2>/dev/null && return 0; done
  return 1
}
stop_group() {  # stop_group SECONDS PID...: SIGTERM, wait up to SECONDS, then SIGKILL; reap
  local seconds=$1 pid; shift
  (($#)) || return 0
  kill -TERM "$@" 2>/dev/null || true
  for _ in $(seq $((seconds * 10))); do
    any_alive "$@" || break
    sleep 0.1
  done
  kill -KILL "$@" 2>/dev/null || true
  for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}
stopping=0
stop_all() {
  ((stopping)) && return 0
  stopping=1
  trap '' INT TERM
  # The API first (no new work; gunicorn lets long-polls end, up to 30 s), then the workers
  # (they finish the step at hand, flush results to Redis and save their models: killing one
  # then loses them, so they get their drain time and more), then Redis.
  [[ -n $api_pid ]] && stop_group 40 "$api_pid"
  local drain=${TINKERD_DRAIN_SECONDS:-300}
  stop_group $((${drain%.*} + 60)) "${worker_pids[@]}"
  [[ -n $redis_pid ]] && stop_group 30 "$redis_pid"
  return 0
}
trap 'stop_all' EXIT
trap 'echo "run_server.sh: stopping the cluster" >&2; stop_all; exit 130' INT
trap 'echo "run_server.sh: stopping the cluster" >&2; stop_all; exit 143' TERM
trap 'stop_all; exit 129' HUP

start() {  # start NAME COMMAND...: a child in the background, recorded for stop_all
  local name=$1; shift
  # Each child in a session of its own, so that Ctrl-C reaches only this script, which then
  # stops the children in order.
  setsid "$@" &
  pids+=($!)
  names+=("$name")
  case $name in
    redis*) redis_pid=$! ;;
    api) api_pid=$! ;;
    *) worker_pids+=($!) ;;
  esac
}

# Redis: the one named by TINKERD_REDIS_URL, else our own.
if [[ -n ${TINKERD_REDIS_URL:-} ]]; then
  redis_url=$TINKERD_REDIS_URL
else
  command -v redis-server >/dev/null ||
    die "redis-server is not installed (apt install redis-server); or set TINKERD_REDIS_URL"
  free_port='import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
  redis_port=${REDIS_PORT:-$("$PY" -c "$free_port")}
  mkdir -p "$data_dir/redis"
  start redis-server redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$data_dir/redis" \
    --appendonly yes --appendfsync everysec --save "" --logfile "$data_dir/redis/redis.log"
  redis_url=redis://127.0.0.1:$redis_port/0
fi
export TINKERD_REDIS_URL=$redis_url

redis_ok() {
  "$PY" -c 'import redis, sys; redis.Redis.from_url(sys.argv[1], socket_timeout=2).ping()' \
    "$redis_url" 2>/dev/null
}
for _ in $(seq 100); do
  redis_ok && break
  if [[ -n $redis_pid ]] && ! kill -0 "$redis_pid" 2>/dev/null; then
    die "redis-server exited; see $data_dir/redis/redis.log"
  fi
  sleep 0.2
done
redis_ok || die "no Redis answers at $redis_url"

# Workers: one per GPU, else CPU workers.
gpus=0
if command -v nvidia-smi >/dev/null && gpu_list=$(nvidia-smi -L 2>/dev/null); then
  gpus=$(grep -c '^GPU ' <<<"$gpu_list" || true)
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then  # cuda:i counts the visible ones
    IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
    gpus=${#visible[@]}
  fi
fi
if ((gpus > 0)); then
  n_workers=${n_workers:-$gpus}
else
  n_workers=${n_workers:-1}
fi
for ((i = 0; i < n_workers; i++)); do
  if ((gpus > 0)); then device=cuda:$((i % gpus)); else device=${TINKERD_DEVICE:-cpu}; fi
  start "worker $i ($device)" "$TINKERD" worker --redis "$redis_url" --data-dir "$data_dir" \
    --device "$device" --log-level "$log_level"
done

start api "$TINKERD" serve --redis "$redis_url" --host "$host" --port "$port" \
  --data-dir "$data_dir" --log-level "$log_level" "${serve_args[@]}"

# Ready: the API answers and every worker has registered.
check_host=$host
[[ $check_host == 0.0.0.0 || $check_host == :: || $check_host == "" ]] && check_host=127.0.0.1
ready() {  # the API answers, and each of our workers has registered (by host and pid)
  local url=http://$check_host:$port/api/v1/healthz
  "$PY" - "$redis_url" "$url" "${worker_pids[@]}" 2>/dev/null <<'EOF'
import json, socket, sys, urllib.request
import redis
urllib.request.urlopen(sys.argv[2], timeout=2).read()
client = redis.Redis.from_url(sys.argv[1], socket_timeout=2)
names = sorted(client.smembers("tinkerd:workers"))
found = client.mget([b"tinkerd:worker:" + n for n in names]) if names else []
mine = {r["pid"] for r in map(json.loads, filter(None, found)) if r["host"] == socket.gethostname()}
sys.exit(0 if set(map(int, sys.argv[3:])) <= mine else 1)
EOF
}
children_alive() {
  local i
  for i in "${!pids[@]}"; do
    kill -0 "${pids[i]}" 2>/dev/null || { echo "run_server.sh: ${names[i]} exited" >&2; return 1; }
  done
}
for _ in $(seq 600); do
  ready && break
  children_alive || exit 1
  sleep 0.5
done
ready || { echo "run_server.sh: the cluster was not ready after 5 minutes" >&2; exit 1; }
echo "run_server.sh: tinkerd cluster ready at http://$check_host:$port" \
  "($n_workers worker(s), Redis $redis_url, data in $data_dir); Ctrl-C stops it" >&2

# Run until a signal. A worker that exits is reported and the rest carry on (the API fails its
# requests and reports its models lost, as for any lost worker); when Redis, the API or the last
# worker exits, everything stops and the script fails.
while :; do
  live=()
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && live+=("$pid"); done
  status=0
  wait -n "${live[@]}" || status=$?
  fatal=""
  workers_left=0
  for i in "${!pids[@]}"; do
    pid=${pids[i]}
    if kill -0 "$pid" 2>/dev/null; then
      [[ ${names[i]} == worker* ]] && workers_left=$((workers_left + 1))
      continue
    fi
    [[ ${seen_dead[$pid]:-} ]] && continue
    seen_dead[$pid]=1
    echo "run_server.sh: ${names[i]} (pid $pid) exited" >&2
    [[ ${names[i]} == worker* ]] || fatal=${names[i]}
  done
  if [[ -n $fatal ]] || ((workers_left == 0)); then
    echo "run_server.sh: stopping the cluster" >&2
    exit $((status ? status : 1))
  fi
done
