"""Spawned gloo processes for the multi-process tests, each run under a deadline: a hang fails the test
instead of stalling CI."""
import socket
import time

import pytest
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, args, world, timeout=240):
    """Run fn(rank, *args) on `world` spawned processes."""
    ctx = mp.start_processes(fn, args=args, nprocs=world, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} processes did not finish within {timeout} s (a collective hang?)")
