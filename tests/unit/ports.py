"""Ports for the tests' subprocess services."""

from __future__ import annotations

import random
import socket


def free_consecutive_ports(n: int) -> int:
    """The first of ``n`` consecutive ports free on 127.0.0.1 now, below the kernel's ephemeral range:
    ``reloop serve --workers`` listens on port + 1 + i too (each worker's /metrics), and a port next to
    an ephemeral one was seen taken by the local end of another test's Kafka connection."""
    for _ in range(200):
        base = random.randint(20_000, 30_000)
        socks = []
        try:
            for port in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {n} consecutive free ports")
