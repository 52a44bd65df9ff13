"""Which hosts keep a service on this machine: `reloop serve` warns when it answers the network without a
token (it printed only its listening line on 0.0.0.0)."""

from __future__ import annotations

import pytest
from reloop.engine.netaddr import is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.7", False), ("example.internal", False)],
)  # fmt: skip
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_serve_warns_when_it_answers_the_network_without_a_token(tmp_path) -> None:
    import signal
    import subprocess
    import sys
    import time

    import yaml

    config = tmp_path / "serve.yaml"
    config.write_text(
        yaml.safe_dump(
            {"serve": {"log": {"enabled": False}}, "arms": [{"name": "A", "registry": str(tmp_path)}]}
        )
    )
    for host, warned in (("0.0.0.0", True), ("127.0.0.1", False)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "reloop.engine.runtime.cli", "serve", "--config", str(config),
             "--host", host, "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 60
            while "listening on" not in proc.stdout.readline():
                assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.5)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        assert ("without a token" in err) is warned, err[-2000:]
