"""Run a function on W local processes that form one torch.distributed group (tests, benchmarks).

Every rank's return value (or its exception, as type name and text) comes back to the caller, and
a run that does not finish within `timeout_s` is killed and reported as a hang instead of
blocking the caller forever.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sere.ep.collective import default_backend

__all__ = ["run_group", "free_port", "RankFailure", "GroupHang"]


def free_port(low: int = 29600, high: int = 29700) -> int:
    """A TCP port in [low, high) that nothing listens on right now (other jobs share the machine)."""
    start = low + os.getpid() % (high - low)
    for offset in range(high - low):
        port = low + (start - low + offset) % (high - low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free TCP port in [{low}, {high})")


class RankFailure:
    """An exception raised on one rank: `kind` is the class name, `message` its text."""

    def __init__(self, kind: str, message: str, trace: str):
        self.kind, self.message, self.trace = kind, message, trace

    def __repr__(self) -> str:
        return f"RankFailure({self.kind}: {self.message})"


class GroupHang(RuntimeError):
    """The group did not finish in time (a rank is stuck in a collective)."""


def _worker(rank, fn, world_size, port, args, queue, timeout_s, threads):
    torch.set_num_threads(threads)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        dist.init_process_group(
            default_backend(), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        queue.put((rank, fn(rank, world_size, *args)))
    except BaseException as exc:  # reported to the parent, which decides
        queue.put((rank, RankFailure(type(exc).__name__, str(exc), traceback.format_exc())))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_group(fn, world_size: int, args: tuple = (), port: int | None = None, timeout_s: float = 120.0,
              threads: int = 1):
    """Run `fn(rank, world_size, *args)` on `world_size` spawned processes; returns [W] results.

    `port`: the rendezvous port (default: a free one in 29600-29699).
    `fn` must be importable (a module-level function). A rank's exception comes back as a
    RankFailure in its slot. Raises GroupHang when the group runs past `timeout_s`.
    """
    port = free_port() if port is None else port
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = mp.start_processes(
        _worker, args=(fn, world_size, port, args, queue, timeout_s, threads), nprocs=world_size,
        join=False, start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    results: dict[int, object] = {}
    while len(results) < world_size:
        if time.monotonic() > deadline:
            for proc in procs.processes:
                proc.kill()
            raise GroupHang(f"{world_size} ranks did not finish in {timeout_s} s; got ranks {sorted(results)}")
        if queue.empty():
            if all(not p.is_alive() for p in procs.processes) and queue.empty():
                break
            time.sleep(0.02)
            continue
        rank, value = queue.get()
        results[rank] = value
    for proc in procs.processes:
        proc.join(timeout=10)
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        raise GroupHang(f"ranks {missing} exited without a result")
    return [results[r] for r in range(world_size)]
