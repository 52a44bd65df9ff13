"""A stop answers every request that reached the service before it, even one still unread in its socket
while the event loop was busy: uvicorn closed such a connection as idle, resetting a request its client
could not tell scored or not."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from reloop.engine.serve.config import serve_config_from_dict
from reloop.engine.serve.stack import ServingStack

from .fakes import raw_score_request

SPEC = {"fields": [{"kind": "categorical", "name": "user", "buckets": 10}]}


def _status(conn: socket.socket) -> str:
    conn.settimeout(10)
    try:
        head = b""
        while b"\r\n" not in head:
            chunk = conn.recv(4096)
            if not chunk:
                return "closed"
            head += chunk
        return head.split(b" ")[1].decode()
    except OSError as exc:
        return type(exc).__name__


def test_a_request_still_unread_in_its_socket_when_the_stop_begins_is_answered(tmp_path):
    arm = {"name": "A", "registry": str(tmp_path / "A"), "cold_start": {"backbone": "lr", "spec": SPEC}}
    config = serve_config_from_dict({"serve": {"port": 0, "log": {"enabled": False}}, "arms": [arm]})
    stack = ServingStack(config).start()
    stack.serve_in_thread()
    conn = socket.create_connection(("127.0.0.1", stack.port))
    try:
        connections = stack._server.server_state.connections
        deadline = time.monotonic() + 5
        while not connections and time.monotonic() < deadline:
            time.sleep(0.01)
        (protocol,) = connections
        # A busy event loop, made certain: the service reads nothing from this connection for a while.
        paused = threading.Event()
        protocol.loop.call_soon_threadsafe(lambda: (protocol.transport.pause_reading(), paused.set()))
        assert paused.wait(5)
        conn.sendall(raw_score_request(0))
        time.sleep(0.2)  # arrived, unread
        stopping = threading.Thread(target=stack.close)
        stopping.start()
        time.sleep(0.5)  # uvicorn looks for the stop every 0.1 s: the connections were told to close
        with contextlib.suppress(RuntimeError):  # (the loop is gone if the service closed it meanwhile)
            protocol.loop.call_soon_threadsafe(protocol.transport.resume_reading)
        status = _status(conn)
        stopping.join(15)
    finally:
        conn.close()
    assert status == "200"
    assert not stopping.is_alive()
