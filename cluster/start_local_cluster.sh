#!/usr/bin/env bash
# A multi-node Ray cluster on ONE machine, all on loopback: the head on 127.0.0.1 and N worker
# nodes on 127.0.0.2, 127.0.0.3, ... carrying the custom resources node1, node2, ... so that a
# placement group (or a test) can pin work to a simulated node and kill that node's raylet; every
# worker node also has one `sim_node`, so a bundle asking for it gets a worker node of its own.
#
#   bash cluster/start_local_cluster.sh start [NUM_WORKERS=2]   # prints the address
#   bash cluster/start_local_cluster.sh status
#   bash cluster/start_local_cluster.sh kill-node 1              # SIGKILL node1's raylet
#   bash cluster/start_local_cluster.sh start-node 1             # bring node1 back
#   bash cluster/start_local_cluster.sh stop
#
# Environment: RAY_PORT (GCS, 6379), SERE_HEAD_CPUS (1), SERE_NODE_CPUS (1 per worker node),
# SERE_METRICS_PORT (8080), SERE_DASHBOARD_PORT (8265). Logical CPUs are scheduling units only:
# the nodes share the machine's cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$(pwd)/.venv/bin:$PATH
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
# 0 keeps the head (and drivers) on 127.0.0.1; with 1, Ray swaps 127.0.0.1 for the host's routable IP.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Serve kills an HTTP proxy that is not ready in 5 s (default); a loaded small CPU box needs longer.
export RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=${RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S:-60}

PORT=${RAY_PORT:-6379}
ADDRESS=127.0.0.1:$PORT
cmd=${1:-start}

# `ray start` for a worker node: Ray refuses to join a second node unless
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, and with it rewrites the GCS address 127.0.0.1 to the host's
# routable IP; keep the address as given so that every connection stays on loopback.
ray_start_worker() {
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 python -c '
import sys
import ray._private.services as services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv = ["ray", "start"] + sys.argv[1:]
main()' "$@"
}

node_pids() {  # raylet pids of worker node $1 (matched by its node ip)
    pgrep -f "raylet.*--node_ip_address=127.0.0.$(( $1 + 1 ))" || true
}

start_node() {  # worker node $1 on 127.0.0.($1 + 1)
    ray_start_worker --address "$ADDRESS" --node-ip-address "127.0.0.$(( $1 + 1 ))" \
        --num-cpus "${SERE_NODE_CPUS:-1}" --resources "{\"node$1\": 1, \"sim_node\": 1}" \
        --dashboard-agent-listen-port $(( PORT + 2 + $1 )) \
        --min-worker-port 20000 --max-worker-port 29999 --disable-usage-stats >/dev/null
}

case "$cmd" in
start)
    workers=${2:-2}
    # Fixed ports derived from the GCS port, so that two such clusters (or another user's Ray with
    # the defaults 10001 / 52365) can coexist; worker ports stay clear of 10000-19999.
    ray start --head --node-ip-address 127.0.0.1 --port "$PORT" \
        --ray-client-server-port $(( PORT + 1 )) --dashboard-agent-listen-port $(( PORT + 2 )) \
        --min-worker-port 20000 --max-worker-port 29999 \
        --num-cpus "${SERE_HEAD_CPUS:-1}" --resources '{"head": 1}' \
        --dashboard-host 127.0.0.1 --dashboard-port "${SERE_DASHBOARD_PORT:-8265}" \
        --metrics-export-port "${SERE_METRICS_PORT:-8080}" --disable-usage-stats >/dev/null
    for i in $(seq 1 "$workers"); do
        start_node "$i"
    done
    # Wait until every node has registered.
    for _ in $(seq 1 60); do
        alive=$(python -c "
import ray; ray.init(address='$ADDRESS', _node_ip_address='127.0.0.1', logging_level='ERROR')
print(sum(n['Alive'] for n in ray.nodes()))" 2>/dev/null || echo 0)
        [ "$alive" -ge $(( workers + 1 )) ] && break
        sleep 1
    done
    echo "ray cluster: $ADDRESS, head + $workers worker node(s) (resources node1..node$workers)"
    ;;
status)
    ray status --address "$ADDRESS"
    ;;
start-node)  # (re)start worker node N, e.g. after kill-node
    start_node "${2:?node number}"
    echo "started node$2 on 127.0.0.$(( $2 + 1 ))"
    ;;
kill-node)
    pids=$(node_pids "${2:?node number}")
    [ -n "$pids" ] || { echo "no raylet for node$2" >&2; exit 1; }
    kill -9 $pids
    echo "killed raylet of node$2 (pid $pids)"
    ;;
stop)
    # Only this cluster's processes (those naming its GCS address, and their children): `ray stop`
    # would end every Ray process on the machine, other users' included.
    python - "$PORT" <<'PY'
import sys
import psutil

port = sys.argv[1]
keys = (f"127.0.0.1:{port}", f"--gcs_server_port={port}")
roots = [p for p in psutil.process_iter(["cmdline"])
         if any(k in " ".join(p.info["cmdline"] or ()) for k in keys)]
procs = {}
for root in roots:
    try:
        for p in [root, *root.children(recursive=True)]:
            procs[p.pid] = p
    except psutil.Error:
        pass
for p in procs.values():
    try:
        p.terminate()
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(list(procs.values()), timeout=10)
for p in alive:
    try:
        p.kill()
    except psutil.Error:
        pass
print(f"ray cluster at 127.0.0.1:{port} stopped ({len(procs)} processes)")
PY
    ;;
*)
    echo "usage: $0 start [NUM_WORKERS] | status | kill-node N | start-node N | stop" >&2
    exit 2
    ;;
esac
