"""Autoscaling 1 -> 2 -> 1 under a load ramp, with one of the two engines killed at the top: no
request lost. Real Ray, real vLLM engines (the bundled tiny MoE), real HTTP on loopback.

A cluster of its own, started after test_serve.py's is torn down (one module at a time on 2
cores); the app deployed as `serve deploy` does it, with `autoscaling: {min_replicas: 1,
max_replicas: 2}`. About 5 minutes: two engine starts (scale-up, replacement).
"""

from __future__ import annotations

import os
import time

import pytest

import test_serve
from test_serve import API_KEY, KEY_FILE, READY_TIMEOUT_S, _deploy, _engine_workers, _Load

pytestmark = pytest.mark.slow

ENGINE = f"SereLLMServer:{test_serve.MODEL_ID}"
# Two engines fit 2 cores (0.75 CPU each + the ingress); a target of 2 ongoing requests per
# replica makes 7 busy clients ask for more than one, 1 client for one.
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
               "upscale_delay_s": 3, "downscale_delay_s": 15}


@pytest.fixture(scope="module")
def base_url():
    import ray
    from ray import serve

    with open(KEY_FILE, "w") as f:
        f.write(API_KEY + "\n")
    http_port = test_serve._free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port, "request_timeout_s": 120})
        start = time.monotonic()
        _deploy(test_serve.app_args(autoscaling=AUTOSCALING, replica={"num_cpus": 0.25}))
        base = f"http://127.0.0.1:{http_port}"
        test_serve._wait_healthy(base, start + READY_TIMEOUT_S)
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()
        os.unlink(KEY_FILE)


def _running_engines() -> int:
    from ray import serve

    deployment = serve.status().applications["sere"].deployments.get(ENGINE)
    states = deployment.replica_states if deployment else {}
    return states.get("RUNNING", 0) if set(states) == {"RUNNING"} else -1  # -1: in transition


def _wait_for(condition, timeout_s: float, what: str) -> float:
    """Seconds until `condition()` held (polled every 2 s); TimeoutError naming `what`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if condition():
            return time.monotonic() - start
        time.sleep(2)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


def test_autoscaling_1_to_2_to_1_and_one_engine_killed_lose_no_request(base_url):
    assert _running_engines() == 1
    with _Load(base_url, workers=1) as steady:
        with _Load(base_url, workers=6, streams=1) as burst:
            up_s = _wait_for(lambda: _running_engines() == 2, 400, "scale-up to 2 engines")
            time.sleep(5)
            workers = _engine_workers()
            assert len(workers) == 2
            killed_at = time.monotonic()
            workers[0].kill()
            _wait_for(lambda: time.monotonic() - killed_at > 5 and _running_engines() == 2
                      and len(_engine_workers()) == 2, 400, "a replacement for the killed engine")
            replaced_s = time.monotonic() - killed_at
            time.sleep(3)
        down_s = _wait_for(lambda: _running_engines() == 1, 200, "scale-down to 1 engine")
        time.sleep(3)
    events = steady.events + burst.events
    plain = [status for _, _, status, _, event in events if event is None]
    cut_streams = [event for *_, event in events if event is not None]
    print(f"autoscaling: up after {up_s:.0f} s of load, killed engine replaced in {replaced_s:.0f} s,"
          f" down {down_s:.0f} s after the burst; {len(events)} requests, "
          f"{len(cut_streams)} streams ended by an error event")
    assert plain.count(200) > 50
    assert [status for status in plain if status != 200] == []  # zero lost
    assert all('"error"' in event for event in cut_streams), cut_streams
