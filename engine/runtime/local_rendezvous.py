"""torchrun on one machine with nothing listening beyond loopback.

torchrun's ``--standalone`` rendezvous starts two TCPStores in its agent (the rendezvous's, then the
one the ranks' process group meets at) and a TCPStore server binds every interface whatever host it is
given. Neither asks for a password, and the rendezvous reads its state back with ``pickle``: anyone who
could reach those ports could run code in the agent. Here the rendezvous keeps its state in a file
(c10d's ``store_type=file``) and the ranks' store listens on a socket bound to 127.0.0.1 beforehand
(TCPStore's ``master_listen_fd``). The ranks' gloo sockets are put on loopback by the caller
(``GLOO_SOCKET_IFNAME``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"


def rendezvous_args(scratch: Path) -> list[str]:
    """torchrun's arguments for one node whose rendezvous lives in a file under ``scratch``."""
    return [
        "--rdzv-backend=c10d", f"--rdzv-endpoint={scratch / 'rendezvous'}", "--rdzv-conf=store_type=file",
        f"--rdzv-id={uuid.uuid4()}", f"--local-addr={LOOPBACK}", "--nnodes=1",
    ]  # fmt: skip


class NoLoopbackStore(RuntimeError):
    """This torch builds the ranks' store somewhere reloop cannot bind to loopback."""


@contextlib.contextmanager
def loopback_store_server() -> Iterator[None]:
    """While open, the agent's store for the ranks listens on loopback only.

    torch builds that store in ``DynamicRendezvousHandler._create_tcp_store_server`` (torch 2.4 and
    later); a torch without it fails here, loudly, rather than listening on every interface unnoticed.
    """
    import torch.distributed as dist
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler

    name = "_create_tcp_store_server"
    original = getattr(DynamicRendezvousHandler, name, None)
    if original is None:
        raise NoLoopbackStore(
            f"this torch has no DynamicRendezvousHandler.{name}: reloop cannot keep torchrun's store on "
            "loopback; run the ranks under a torchrun of your own (docs/scale-out.md, Security)"
        )

    def on_loopback(self: object, master_addr: str, master_port: int) -> dist.TCPStore:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((LOOPBACK, master_port))
            listener.listen(socket.SOMAXCONN)
            port = listener.getsockname()[1]
        except OSError:
            listener.close()
            raise
        # The store owns the descriptor from here on (it closes it when it stops).
        return dist.TCPStore(
            LOOPBACK, port, is_master=True, multi_tenant=True, master_listen_fd=listener.detach()
        )

    setattr(DynamicRendezvousHandler, name, on_loopback)
    try:
        yield
    finally:
        setattr(DynamicRendezvousHandler, name, original)


def run_local(scratch: Path, tail: Sequence[str]) -> None:
    """torchrun with ``tail`` (``--nproc-per-node=M ... -m module args``) on this machine, on loopback.
    Its per-attempt folders (the ranks' error files) go in ``scratch`` too: by default torchrun made a
    /tmp/torchelastic_* tree at every launch and never removed it."""
    from torch.distributed.run import get_args_parser, run

    # The ranks meet at the agent's store (data_parallel.RankGroup.start): with torch's opt-out of sharing
    # it set, no store was started, and the ranks timed out and restarted until max_restarts.
    os.environ.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    with loopback_store_server():
        run(
            get_args_parser().parse_args(
                [*rendezvous_args(scratch), f"--log-dir={scratch / 'torchelastic'}", *tail]
            )
        )
