"""LocalBroker pieces that need no Java: cluster ids and the port bookkeeping."""

from __future__ import annotations

import socket
from unittest import mock

from reloop.connectors.kafka import local_broker
from reloop.connectors.kafka.local_broker import _port_is_free, new_cluster_id


def test_cluster_ids_never_look_like_options() -> None:
    # uuid4 bytes whose base64 starts with "-" (0xFB...) must be skipped, not handed to the storage tool.
    dash_first = mock.Mock(bytes=bytes([0xFB]) + bytes(15))
    normal = mock.Mock(bytes=bytes(16))
    with mock.patch.object(local_broker.uuid, "uuid4", side_effect=[dash_first, normal]):
        assert new_cluster_id() == "AAAAAAAAAAAAAAAAAAAAAA"
    ids = {new_cluster_id() for _ in range(500)}
    assert len(ids) == 500
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


def test_a_listening_port_is_busy_and_a_closed_one_free() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert not _port_is_free(port)
    assert _port_is_free(port)
