"""`reloop simulate` before its scoring service answers: it says what it waits for, and Ctrl-C ends the
wait (it sat silent for 60 s and Ctrl-C there ended in a traceback)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_ctrl_c_while_waiting_for_the_service_ends_at_once_with_a_message() -> None:
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "reloop.engine.runtime.cli", "simulate",
            "--config", str(ROOT / "deploy" / "config" / "serve.example.yaml"),
            "--url", "http://127.0.0.1:1", "--bootstrap", "127.0.0.1:1", "--duration", "5",
        ],
        stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    seen = ""
    while "waiting for the scoring service" not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    assert "waiting for the scoring service at http://127.0.0.1:1" in seen
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=30)
    assert proc.returncode == 0  # the operator's stop (it exited 1, a failure)
    assert time.monotonic() - start < 5
    assert "stopped while waiting" in rest and "Traceback" not in rest


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("simulate", ["--rate", "nan"]),  # sent requests unpaced, as fast as the service answered
        ("simulate", ["--rate", "inf"]),
        ("simulate", ["--rate", "-5"]),
        ("simulate", ["--rate", "0"]),  # silently replaced by simulate.rate
        ("simulate", ["--duration", "nan"]),  # never ended
        ("simulate", ["--duration", "-1"]),
        ("simulate", ["--seed", "-1"]),  # a traceback, after the service was up
        ("demo", ["--rate", "nan"]),
        ("demo", ["--rate", "0"]),
        ("demo", ["--duration", "nan"]),
        ("demo", ["--duration", "inf"]),
    ],
)
def test_out_of_range_overrides_are_refused_at_parse_time_with_exit_2(command, argv, capsys) -> None:
    import argparse
    import importlib

    module = importlib.import_module(
        {"simulate": "reloop.engine.simulate.cli", "demo": "reloop.engine.runtime.demo"}[command]
    )
    parser = argparse.ArgumentParser(prog=f"reloop {command}")
    module.configure(parser)
    config = ["--config", str(ROOT / "deploy" / "config" / "demo.yaml")]
    with pytest.raises(SystemExit) as exc:
        parser.parse_args([*config, *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}" in err and "Traceback" not in err


def test_the_overrides_still_take_ordinary_values() -> None:
    import argparse

    from reloop.engine.simulate.cli import configure

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--config", "x.yaml", "--rate", "2.5", "--duration", "1e3", "--seed", "0"])
    assert (args.rate, args.duration, args.seed) == (2.5, 1000.0, 0)


def test_an_infinite_rate_in_the_config_is_refused() -> None:
    from reloop.engine.serve.config import ConfigError
    from reloop.engine.simulate.config import simulate_config_from_dict

    with pytest.raises(ConfigError, match="simulate.rate"):
        simulate_config_from_dict({"simulate": {"rate": float("inf")}})


def test_a_misspelt_kafka_key_is_refused_at_once_naming_it_without_its_value(tmp_path) -> None:
    # It was checked after the wait for the service (up to 60 s), and refused in pydantic's words, which
    # print each input: a misspelt sasl_password printed the password.
    config = tmp_path / "sim.yaml"
    config.write_text("kafka: {bootstrap: '127.0.0.1:1', sasl_pasword: hunter2}\narms: [{name: a}]\n")
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "simulate", "--config", str(config),
         "--url", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and time.monotonic() - began < 30, done.stderr
    assert "kafka.sasl_pasword: unknown key (did you mean sasl_password?)" in done.stderr, done.stderr
    assert "hunter2" not in done.stderr


def test_a_run_in_which_every_request_failed_exits_1(tmp_path) -> None:
    # The failures were counted and printed, and the command exited 0 as if it had simulated something.
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Broken(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # /readyz: ready
            self.send_response(200)
            self.end_headers()

        def do_POST(self) -> None:  # /score: fails
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "reloop.engine.runtime.cli", "simulate",
             "--config", str(ROOT / "deploy" / "config" / "serve.example.yaml"),
             "--url", f"http://127.0.0.1:{server.server_port}", "--bootstrap", "127.0.0.1:1",
             "--duration", "1", "--rate", "20"],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip
    finally:
        server.shutdown()
    assert out.returncode == 1, out.stderr[-2000:]
    assert "no request was answered with a ranking" in out.stderr


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("notaurl", "got no scheme"),  # waited 60 s for a service it could never reach
        ("localhost:8000", "got scheme 'localhost'"),
        ("ftp://127.0.0.1:8000", "got scheme 'ftp'"),
        ("http://", "got no host"),
        ("http://127.0.0.1:99999", "port 99999 is not in 1..65535"),
        ("http://127.0.0.1:abc", "port 'abc' is not a number"),
        ("http://127.0.0.1:8000/?x=1", "no query"),
    ],
)
def test_a_url_that_names_no_http_service_is_refused_at_parse_time(url, why, capsys) -> None:
    import argparse

    from reloop.engine.simulate.cli import configure

    parser = argparse.ArgumentParser(prog="reloop simulate")
    configure(parser)
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["--config", "x.yaml", "--url", url])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --url: {url!r}" in err and why in err


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000", "http://[::1]:8000/", "https://scoring.example:443/base", "http://host"]
)
def test_service_urls_of_every_form_are_taken(url) -> None:
    import argparse

    from reloop.engine.simulate.cli import configure

    parser = argparse.ArgumentParser()
    configure(parser)
    assert parser.parse_args(["--config", "x.yaml", "--url", url]).url == url


def test_without_url_it_finds_the_service_of_the_serve_config_it_is_given() -> None:
    # README: `reloop simulate --config SERVE_CONFIG`. It went to http://127.0.0.1:8000 whatever the file's
    # serve.port said, and waited there.
    import argparse

    from reloop.engine.simulate.cli import configure, service_url

    assert service_url({"serve": {"port": 18091}}) == "http://127.0.0.1:18091"
    assert service_url({"serve": {"host": "0.0.0.0", "port": 9000}}) == "http://127.0.0.1:9000"
    assert service_url({"serve": {"host": "::", "port": 9000}}) == "http://[::1]:9000"
    assert service_url({}) == "http://127.0.0.1:8000"
    parser = argparse.ArgumentParser()
    configure(parser)
    assert parser.parse_args(["--config", "x.yaml"]).url is None  # --url, when given, wins


def test_it_reads_the_service_as_the_service_reads_itself(tmp_path: Path, monkeypatch) -> None:
    # Under RELOOP__SERVE__PORT / RELOOP__KAFKA__BOOTSTRAP it went to the file's port and broker, and
    # against a service with a token every request was a 401.
    import httpx
    from reloop.engine.simulate.cli import service_token, service_url, with_service_overrides
    from reloop.engine.simulate.http import HttpScorer

    doc = {"serve": {"port": 8000}, "kafka": {"bootstrap": "file:9092"}, "simulate": {"rate": 5}}
    monkeypatch.setenv("RELOOP__SERVE__PORT", "18092")
    monkeypatch.setenv("RELOOP__KAFKA__BOOTSTRAP", "env:9092")
    monkeypatch.setenv("RELOOP__SERVE__AUTH_TOKEN", "s3cret")
    merged = with_service_overrides(doc)
    assert service_url(merged) == "http://127.0.0.1:18092" and merged["kafka"]["bootstrap"] == "env:9092"
    assert merged["simulate"] == {"rate": 5} and service_token(merged) == "s3cret"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert service_token({"serve": {"auth_token_file": str(token_file), "auth_token": "x"}}) == "from-file"
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200)

    scorer = HttpScorer("http://service", token="s3cret")
    scorer.client = httpx.Client(
        base_url=scorer.url, headers=scorer.client.headers, transport=httpx.MockTransport(handler)
    )
    assert scorer.ready() and seen == ["Bearer s3cret"]


_LOGGING_AFTER_MAIN = """
import argparse, logging, sys
from reloop.engine.runtime.jsonlog import ThrottledRecords
from reloop.engine.simulate import cli
cli.main(argparse.Namespace(config=sys.argv[1]))  # a config that is not there: refused after logging is set
(handler,) = logging.getLogger().handlers
throttled = any(isinstance(f, ThrottledRecords) for f in handler.filters)
print(logging.getLevelName(logging.getLogger("kafka").level), throttled)
"""


def test_kafka_pythons_lines_are_quieted_as_in_the_other_processes(tmp_path) -> None:
    # Through a broker outage the simulator printed every kafka-python reconnect WARNING between its lines.
    done = subprocess.run(
        [sys.executable, "-c", _LOGGING_AFTER_MAIN, str(tmp_path / "none.yaml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout.split() == ["ERROR", "True"], done.stderr


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ("serv: {port: 19420}\narms: [{name: a}]\n", "serv: unknown section (did you mean serve?)"),
        ("simulat: {rate: 1}\narms: [{name: a}]\n", "simulat: unknown section (did you mean simulate?)"),
        # A run config: its clicks went to the default topic 'clicks', not the arm's.
        ("model: {backbone: lr}\nsource: {clicks_topic: c}\n", "sections model, source are a run config's"),
    ],
)
def test_a_section_the_services_file_has_no_use_for_is_refused(tmp_path, doc, needle) -> None:
    # Ignored: a misspelt serve section, and the service listened on the default port; a misspelt
    # simulate section ran at the default rate.
    from reloop.engine.serve.config import serve_config_from_dict

    config = tmp_path / "sim.yaml"
    config.write_text(doc)
    done = subprocess.run(
        [sys.executable, "-m", "reloop.engine.runtime.cli", "simulate", "--config", str(config),
         "--url", "http://127.0.0.1:9", "--bootstrap", "127.0.0.1:9"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and needle in done.stderr, done.stderr
    from reloop.engine.serve.config import ConfigError, read_yaml

    with pytest.raises(ConfigError, match=needle.split(" (")[0]):
        serve_config_from_dict(read_yaml(config), env={})
