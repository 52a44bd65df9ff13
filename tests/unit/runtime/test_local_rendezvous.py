"""`reloop train --world-size M` runs torchrun with nothing listening beyond loopback: the agent's stores
(torch binds a TCPStore to every interface, and its rendezvous unpickles what it reads) and the ranks' gloo
sockets. Two ranks of a small script started the way the launcher starts its ranks list every listening
socket of the agent and of themselves, from /proc."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net/tcp")

_RANK = textwrap.dedent(
    """
    import json, os, socket, sys
    from pathlib import Path
    from reloop.engine.train.data_parallel import RankGroup

    def address(hex_addr):
        raw = bytes.fromhex(hex_addr)
        if len(raw) == 4:
            return socket.inet_ntop(socket.AF_INET, raw[::-1])
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, words)

    def listening():  # socket inode -> "address:port", every LISTEN socket on this machine
        found = {}
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A":
                    host, port = cols[1].split(":")
                    found[cols[9]] = (address(host), int(port, 16))
        return found

    def sockets_of(pid):
        inodes = set()
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        return inodes

    group = RankGroup.start(timeout_s=30)
    group.barrier()  # every rank's gloo sockets exist
    if group.rank == 0:
        agent = os.getppid()
        ranks = [int(p) for t in Path(f"/proc/{agent}/task").iterdir()
                 for p in (t / "children").read_text().split()]
        table = listening()
        seen = {str(pid): [table[i] for i in sockets_of(pid) if i in table] for pid in [agent, *ranks]}
        Path(sys.argv[1]).write_text(json.dumps({"agent": str(agent), "listening": seen}))
    group.barrier()
    RankGroup.close()
    """
)

_LAUNCHER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from reloop.engine.runtime.local_rendezvous import run_local

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    run_local(Path(sys.argv[1]), ["--nproc-per-node=2", sys.argv[2], sys.argv[3]])
    """
)


def _is_loopback(host: str) -> bool:
    address = ipaddress.ip_address(host)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def test_the_launchers_stores_and_the_ranks_listen_on_loopback_only(tmp_path: Path) -> None:
    rank, launcher, out = tmp_path / "rank.py", tmp_path / "launch.py", tmp_path / "listening.json"
    rank.write_text(_RANK)
    launcher.write_text(_LAUNCHER)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    # torch's opt-out of the agent's store, which operators set: the ranks waited for a store nobody started.
    env = {**os.environ, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    proc = subprocess.run(
        [sys.executable, str(launcher), str(scratch), str(rank), str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # torchrun's per-attempt folders in the launcher's scratch (removed with it), not a new /tmp tree
    assert list((scratch / "torchelastic").glob("*/attempt_0")), proc.stderr[-3000:]
    report = json.loads(out.read_text())
    listening = report["listening"]
    assert len(listening) == 3, listening  # the agent and its two ranks
    # Each process listens somewhere (the agent: the ranks' store; a rank: gloo), so a listener on every
    # interface cannot hide behind an empty list.
    assert all(listening.values()), listening
    off_loopback = {pid: [a for a in addrs if not _is_loopback(a[0])] for pid, addrs in listening.items()}
    assert not any(off_loopback.values()), f"listening beyond loopback: {off_loopback}"
