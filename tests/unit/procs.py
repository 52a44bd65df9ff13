"""Processes for the tests' torch.distributed ranks.

A spawned rank imports torch and the engine again (about 2.5 s each on two cores); the fork server
imports them once and forks each rank from that state. Forking from a process that only imported them
is safe: it has started no torch thread pool, no process group and no Kafka client.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.context import BaseContext

PRELOAD = ["torch", "pytest", "reloop.engine.runtime.build", "reloop.connectors.memory"]


def rank_context() -> BaseContext:
    """The multiprocessing context to start ranks with."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx
