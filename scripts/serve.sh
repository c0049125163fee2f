#!/usr/bin/env bash
# Fresh clone -> a running OpenAI-compatible service of the bundled tiny MoE with SERE on.
#
#   bash scripts/serve.sh          # then: ray stop   (to shut it down)
#
# Steps: build .venv (scripts/setup_env.sh), start a local Ray head on loopback (metrics on
# :8080, dashboard on :8265), `serve deploy serve_config.yaml`, wait for /v1/models and /health
# (the engine is up), send one chat completion.
# Environment knobs: SERE_SERVE_CONFIG (default serve_config.yaml), SERE_READY_TIMEOUT (s, default
# 600), SERE_NUM_CPUS (logical CPUs of the head, default 2), SERE_API_KEY_FILE or SERE_API_KEY
# (when set, the service requires `Authorization: Bearer <key>`; the key is never printed).
# Everything binds to 127.0.0.1 (service, dashboard, metrics).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
CONFIG=${SERE_SERVE_CONFIG:-serve_config.yaml}
READY_TIMEOUT=${SERE_READY_TIMEOUT:-600}
BASE_URL=http://127.0.0.1:8000
DASHBOARD=http://127.0.0.1:8265
LOGS=/tmp/ray/session_latest/logs
start=$(date +%s)

bash scripts/setup_env.sh
# A key file wins over SERE_API_KEY (the ingress reads it the same way); the checks below send
# the key, and nothing here prints it.
if [ -n "${SERE_API_KEY_FILE:-}" ]; then
    [ -s "$SERE_API_KEY_FILE" ] || { echo "[serve] SERE_API_KEY_FILE=$SERE_API_KEY_FILE is missing or empty" >&2; exit 1; }
    SERE_API_KEY=$(tr -d '[:space:]' < "$SERE_API_KEY_FILE")
    export SERE_API_KEY SERE_API_KEY_FILE
fi
PY=$REPO/.venv/bin/python
export PATH=$REPO/.venv/bin:$PATH
# Token auth would make later CLI calls fail; usage stats would phone home; all on loopback.
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# Serve kills an HTTP proxy that is not ready in 5 s (default); a loaded small CPU box needs longer.
export RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S=${RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S:-60}
# Serve imports deploy.app:build_app in Ray workers: make the checkout importable even if the
# editable install is missing.
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

if ray status --address 127.0.0.1:6379 >/dev/null 2>&1; then
    echo "[serve] reusing the Ray cluster already running at 127.0.0.1:6379"
    # The ingress reads SERE_API_KEY(_FILE) from the environment its Ray node was started with.
    [ -n "${SERE_API_KEY:-}" ] && echo "[serve] NOTE: the API key is enforced only if it was set when that cluster started (else: ray stop, rerun)"
else
    echo "[serve] starting a local Ray head (127.0.0.1, metrics :8080, dashboard :8265)"
    ray start --head --node-ip-address 127.0.0.1 --port 6379 \
        --dashboard-host 127.0.0.1 --dashboard-port 8265 --metrics-export-port 8080 \
        --num-cpus "${SERE_NUM_CPUS:-2}" --disable-usage-stats >/tmp/sere-ray-start.log 2>&1 \
        || { cat /tmp/sere-ray-start.log; echo "[serve] ray start failed" >&2; exit 1; }
fi

echo "[serve] serve deploy $CONFIG"
serve deploy "$CONFIG" --address "$DASHBOARD"

# /v1/models answers as soon as the HTTP ingress is up; /health only once the engine is (the
# first request would otherwise wait for the engine inside its own timeout).
echo "[serve] waiting for $BASE_URL/v1/models and /health (timeout ${READY_TIMEOUT}s; engine start ~1-3 min)"
"$PY" - "$BASE_URL" "$READY_TIMEOUT" "$DASHBOARD" "$LOGS" <<'EOF'
import json, os, sys, time, urllib.request

base, timeout, dashboard, logs = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
headers = {"Authorization": "Bearer " + os.environ["SERE_API_KEY"]} if os.environ.get("SERE_API_KEY") else {}
deadline = time.monotonic() + timeout
status = "unknown"
ids = None
while time.monotonic() < deadline:
    try:
        if ids is None:
            with urllib.request.urlopen(urllib.request.Request(base + "/v1/models", headers=headers), timeout=5) as r:
                ids = [m["id"] for m in json.load(r)["data"]]
            print(f"[serve] /v1/models answers: {ids}; waiting for the engine", flush=True)
        with urllib.request.urlopen(base + "/health", timeout=15) as r:
            print(f"[serve] ready: {json.load(r)}")
            sys.exit(0)
    except Exception:
        pass
    try:  # fail fast when Serve has given up on the app
        with urllib.request.urlopen(dashboard + "/api/serve/applications/", timeout=5) as r:
            apps = json.load(r).get("applications", {})
        status = {name: app.get("status") for name, app in apps.items()}
        failed = {n: a.get("message", "") for n, a in apps.items() if a.get("status") == "DEPLOY_FAILED"}
        if failed:
            for name, message in failed.items():  # the cause is at the end of the traceback
                tail = "\n    ".join(message.strip().splitlines()[-8:])
                print(f"[serve] ERROR: app '{name}' failed to deploy:\n    {tail}", file=sys.stderr)
            break
    except Exception:
        pass
    time.sleep(3)
else:
    print(f"[serve] ERROR: {base}/v1/models did not answer within {timeout:.0f}s (apps: {status})",
          file=sys.stderr)
print(f"[serve] see `serve status`, and the logs in {logs}/serve/ (replica_*.log, controller_*.log) "
      f"and {logs}/worker-*.err; after fixing, `serve shutdown -y` (Serve does not retry an "
      "unchanged config) and rerun, or stop everything with `ray stop`", file=sys.stderr)
sys.exit(1)
EOF

echo "[serve] one chat completion:"
"$PY" - "$BASE_URL" <<'EOF'
import json, os, sys, time, urllib.request

base = sys.argv[1]
headers = {"Content-Type": "application/json"}
if os.environ.get("SERE_API_KEY"):
    headers["Authorization"] = "Bearer " + os.environ["SERE_API_KEY"]
body = {"model": "tiny-moe", "max_tokens": 32, "temperature": 0,
        "messages": [{"role": "user", "content": "def fibonacci(n):"}]}
t0 = time.monotonic()
req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(), headers)
with urllib.request.urlopen(req, timeout=120) as r:
    reply = json.load(r)
print(json.dumps({"content": reply["choices"][0]["message"]["content"],
                  "finish_reason": reply["choices"][0]["finish_reason"],
                  "usage": reply["usage"], "latency_s": round(time.monotonic() - t0, 2)}, indent=2))
EOF

auth=""
[ -n "${SERE_API_KEY:-}" ] && auth=' -H "Authorization: Bearer $SERE_API_KEY"'
cat <<EOF

[serve] up in $(( $(date +%s) - start ))s. The service (OpenAI API) is at $BASE_URL/v1

  curl $BASE_URL/v1/chat/completions -H 'Content-Type: application/json'$auth \\
       -d '{"model": "tiny-moe", "messages": [{"role": "user", "content": "import os"}], "max_tokens": 32}'

  from openai import OpenAI      # .venv/bin/python
  client = OpenAI(base_url="$BASE_URL/v1", api_key="${SERE_API_KEY:+\$SERE_API_KEY}${SERE_API_KEY:-unused}")
  reply = client.chat.completions.create(model="tiny-moe", max_tokens=32,
                                         messages=[{"role": "user", "content": "import os"}])
  print(reply.choices[0].message.content)

  health:  curl $BASE_URL/health        metrics (Prometheus, incl. sere_*):  curl 127.0.0.1:8080/metrics
  status:  .venv/bin/serve status        dashboard: $DASHBOARD        logs: $LOGS/serve/
  stop:    .venv/bin/ray stop            (redeploy a changed config: .venv/bin/serve deploy $CONFIG)
EOF
