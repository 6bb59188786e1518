#!/usr/bin/env bash
# A two-node Ray cluster on this machine: a head (custom resource {"head_node": 1}, no GPUs) and
# a worker ({"worker_node": 1}, the machine's GPUs if any), both started on 127.0.0.1 (Ray
# advertises the machine's own IP for a loopback --node-ip-address; clients use 127.0.0.1; the
# dashboard listens on loopback only, and token authentication guards the GCS port). It
# exercises what a real cluster does (jobs submitted over the dashboard, trials and K-means
# tasks placed on another node, results on storage both nodes share) without leaving the laptop.
#
#   bash cluster_configs/local_two_node.sh start     # prints the addresses to use
#   bash cluster_configs/local_two_node.sh status
#   bash cluster_configs/local_two_node.sh stop      # stops exactly the two nodes it started
#
# Settings (environment, defaults in brackets): RAY_PORT [6379], DASHBOARD_PORT [8265],
# AGENT_PORT [52365; the worker's agent uses AGENT_PORT+1], HEAD_CPUS [2], WORKER_CPUS [2],
# OBJECT_STORE_BYTES [1000000000 per node], CLUSTERLAB_TWO_NODE_DIR [/tmp/clusterlab-two-node:
# logs, pid files, Ray's session files], STORAGE_PATH [<that dir>/ray_results: the sweeps'
# shared storage], CLUSTERLAB_TRACKING_URI [http://127.0.0.1:5000, the MLflow server of
# docker/compose.yaml; an MLflow server in any case: clusterlab refuses a file-based store
# (sqlite:, file:) on a cluster of more than one node], RAY_AUTH_MODE [token].
#
# The nodes are `ray start --block` processes running in the background; `stop` sends them
# SIGTERM, and each takes its own Ray processes down with it. Nothing else is touched (never
# `ray stop`, which would stop every Ray on the machine).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_DIR="${CLUSTERLAB_TWO_NODE_DIR:-/tmp/clusterlab-two-node}"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"
AGENT_PORT="${AGENT_PORT:-52365}"
HEAD_CPUS="${HEAD_CPUS:-2}"
WORKER_CPUS="${WORKER_CPUS:-2}"
OBJECT_STORE_BYTES="${OBJECT_STORE_BYTES:-1000000000}"
STORAGE_PATH="${STORAGE_PATH:-$STATE_DIR/ray_results}"
# Inherited by every Ray process, hence by job drivers and trials.
export CLUSTERLAB_TRACKING_URI="${CLUSTERLAB_TRACKING_URI:-http://127.0.0.1:5000}"
# SIGTERM tears a local node down at once instead of draining it for 30 s first.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
# Token authentication (Ray's default for new local clusters), explicitly: the nodes and every
# client (ray status here, ray job submit in your shell) must agree, and a client only sends
# the token (~/.ray/auth_token, created by `start` when missing) in token mode.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
export RAY_USAGE_STATS_ENABLED=0

# The project's virtual environment (make test / make demo create it), when there is one: the
# nodes then run the pinned Ray, and job entrypoints find `clusterlab` on the PATH.
if [[ -x "$REPO_ROOT/.venv/bin/ray" ]]; then
  export PATH="$REPO_ROOT/.venv/bin:$PATH"
fi

GCS_ADDRESS="127.0.0.1:$RAY_PORT"
DASHBOARD_URL="http://127.0.0.1:$DASHBOARD_PORT"

die() {
  echo "local_two_node.sh: $*" >&2
  exit 1
}

# The pid in $STATE_DIR/<role>.pid if that process is still our `ray start --block`.
node_pid() {
  local pidfile="$STATE_DIR/$1.pid" pid
  [[ -f "$pidfile" ]] || return 1
  pid="$(cat "$pidfile")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Guards against a recycled pid: the process must be a `ray start ... --block`.
  ps -o args= -p "$pid" 2>/dev/null | grep -q -- "start.*--block" || return 1
  echo "$pid"
}

# wait_until SECONDS ROLE COMMAND...: run COMMAND until it succeeds; fail if ROLE's process dies.
wait_until() {
  local timeout="$1" role="$2"
  local deadline=$((SECONDS + timeout))
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ! node_pid "$role" >/dev/null; then
      tail -n 30 "$STATE_DIR/$role.log" >&2 || true
      die "the $role node exited while starting (log: $STATE_DIR/$role.log)"
    fi
    ((SECONDS < deadline)) || die "the $role node did not come up in $timeout s (log: $STATE_DIR/$role.log)"
    sleep 1
  done
}

worker_registered() {
  ray status --address="$GCS_ADDRESS" 2>/dev/null | grep -q "worker_node"
}

start() {
  command -v ray >/dev/null || die "no 'ray' on the PATH: run 'make test' (creates .venv) or activate an environment with clusterlab installed"
  if node_pid head >/dev/null || node_pid worker >/dev/null; then
    die "already running (state in $STATE_DIR); stop it first: bash $0 stop"
  fi
  mkdir -p "$STATE_DIR" "$STORAGE_PATH"
  if [[ "$RAY_AUTH_MODE" == token ]]; then
    ray get-auth-token --generate >/dev/null
  fi

  # clusterlab refuses a file-based MLflow store (sqlite:, file:) on a cluster of two nodes: it
  # must be a tracking server.
  [[ "$CLUSTERLAB_TRACKING_URI" == http://* || "$CLUSTERLAB_TRACKING_URI" == https://* ]] ||
    die "CLUSTERLAB_TRACKING_URI must be an MLflow server (http://...), not $CLUSTERLAB_TRACKING_URI"
  if ! python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=3)" \
    "$CLUSTERLAB_TRACKING_URI" >/dev/null 2>&1; then
    echo "warning: no MLflow server answers at $CLUSTERLAB_TRACKING_URI yet; start one, e.g." >&2
    echo "  docker compose -f docker/compose.yaml up -d --wait" >&2
    echo "  (or, without Docker: mlflow server --backend-store-uri sqlite:///$STATE_DIR/mlflow.db --port 5000 --workers 1)" >&2
  fi

  echo "starting the head node (127.0.0.1:$RAY_PORT, $HEAD_CPUS CPUs, no GPUs) ..."
  # RAY_ADDRESS in the nodes' environment: Ray processes that look for "their" cluster (Train's
  # placement-group cleaner, for one) find this one even when other Ray instances run here.
  RAY_ADDRESS="$GCS_ADDRESS" nohup ray start --head --block \
    --node-ip-address=127.0.0.1 --port="$RAY_PORT" \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
    --dashboard-agent-listen-port="$AGENT_PORT" \
    --num-cpus="$HEAD_CPUS" --num-gpus=0 --resources='{"head_node": 1}' \
    --object-store-memory="$OBJECT_STORE_BYTES" \
    --temp-dir="$STATE_DIR/head" --disable-usage-stats \
    >"$STATE_DIR/head.log" 2>&1 &
  echo $! >"$STATE_DIR/head.pid"
  wait_until 120 head ray status --address="$GCS_ADDRESS"

  echo "starting the worker node ($WORKER_CPUS CPUs, the machine's GPUs) ..."
  RAY_ADDRESS="$GCS_ADDRESS" nohup ray start --block \
    --address="$GCS_ADDRESS" --node-ip-address=127.0.0.1 \
    --dashboard-agent-listen-port="$((AGENT_PORT + 1))" \
    --num-cpus="$WORKER_CPUS" --resources='{"worker_node": 1}' \
    --object-store-memory="$OBJECT_STORE_BYTES" \
    --temp-dir="$STATE_DIR/worker" --disable-usage-stats \
    >"$STATE_DIR/worker.log" 2>&1 &
  echo $! >"$STATE_DIR/worker.pid"
  wait_until 120 worker worker_registered

  cat <<EOF

Two-node Ray cluster up (head pid $(node_pid head), worker pid $(node_pid worker)).

  export RAY_ADDRESS=$DASHBOARD_URL       # for ray job submit / ray job logs (the dashboard)
  export RAY_AUTH_MODE=$RAY_AUTH_MODE              # clients send the token of ~/.ray/auth_token
  GCS address: $GCS_ADDRESS               # for ray start --address / ray status --address
  dashboard:   $DASHBOARD_URL
  tracking:    CLUSTERLAB_TRACKING_URI=$CLUSTERLAB_TRACKING_URI (set on both nodes)
  storage:     $STORAGE_PATH (both nodes)

Submit a sweep from the repository root (the job joins this cluster through the RAY_ADDRESS
Ray gives it; --resume auto continues the sweep if it already exists):

  ray job submit --address $DASHBOARD_URL --working-dir . -- clusterlab sweep search_spaces/mixem_loss_weights_digits.yaml storage_path=$STORAGE_PATH --resume auto

Stop both nodes: bash cluster_configs/local_two_node.sh stop
EOF
}

stop() {
  local role pid waited stopped=0
  for role in worker head; do
    if pid="$(node_pid "$role")"; then
      echo "stopping the $role node (pid $pid) ..."
      kill -TERM "$pid"
      waited=0
      while kill -0 "$pid" 2>/dev/null && ((waited < 60)); do
        sleep 1
        waited=$((waited + 1))
      done
      if kill -0 "$pid" 2>/dev/null; then
        echo "warning: the $role node (pid $pid) ignored SIGTERM for 60 s; killing it. Its Ray processes may be left over (log: $STATE_DIR/$role.log)" >&2
        kill -KILL "$pid" 2>/dev/null || true
      fi
      stopped=$((stopped + 1))
    fi
    rm -f "$STATE_DIR/$role.pid"
  done
  if ((stopped == 0)); then
    echo "no two-node cluster of this script is running (state dir $STATE_DIR)"
  else
    echo "stopped; logs and results stay in $STATE_DIR"
  fi
}

status() {
  local role pid
  for role in head worker; do
    if pid="$(node_pid "$role")"; then
      echo "$role: running (pid $pid)"
    else
      echo "$role: not running"
    fi
  done
  if node_pid head >/dev/null; then
    ray status --address="$GCS_ADDRESS" || true
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *)
    echo "usage: bash $0 start|stop|status" >&2
    exit 2
    ;;
esac
