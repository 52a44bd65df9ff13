"""The engine's plain counters: values per label tuple, histogram bins, scrape hooks, reset, and a
scraping reader next to a writer that keeps creating children."""

from __future__ import annotations

import ast
import subprocess
import sys
import threading
from dataclasses import fields
from pathlib import Path

import pytest
from reloop.engine.metrics.stats import STATS, Buckets, EngineStats, Level, Tally

ENGINE = Path(__file__).resolve().parents[3] / "engine"


def test_tally_counts_per_label_tuple_and_a_resolved_child_shares_the_count():
    t = Tally()
    t.add("a")
    t.add("a", n=2)
    t.add("b", n=5)
    child = t.child("a")
    child.add(10)
    assert sorted(t.items()) == [(("a",), 13), (("b",), 5)]
    assert t.get("a") == 13 and t.get("never") == 0
    plain = Tally()
    assert plain.items() == []  # nothing is exported before the first add
    plain.add()
    assert plain.items() == [((), 1)]


def test_level_values_functions_replace_and_remove():
    lv = Level()
    assert lv.get() is None and lv.items() == []
    lv.set(3.0)
    assert lv.get() == 3.0
    state = {"v": 10}
    lv.set_function(lambda: state["v"], "x")
    state["v"] = 11
    assert dict(lv.items()) == {(): 3.0, ("x",): 11.0}
    lv.replace({("a", "1"): 0.5})
    assert lv.items() == [(("a", "1"), 0.5)]
    lv.remove("a", "1")
    assert lv.items() == []


def test_buckets_are_raw_per_bound_le_inclusive_and_read_as_a_copy():
    b = Buckets((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        b.observe(v, "a")
    ((key, bins),) = b.items()
    assert key == ("a",)
    assert bins.counts == [2, 1, 1] and bins.total() == 4
    assert bins.sum == pytest.approx(3.65)
    b.observe(0.2, "a")
    assert bins.counts == [2, 1, 1]  # items() handed out a copy
    with pytest.raises(ValueError):
        Buckets((1.0, 0.5))


def test_hooks_run_before_a_read_and_reset_drops_values_and_hooks():
    stats = EngineStats()
    calls = []
    hook = lambda: (calls.append(1), stats.joiner_pending.set(len(calls)))  # noqa: E731
    stats.add_hook(hook)
    stats.run_hooks()
    stats.run_hooks()
    assert stats.joiner_pending.get() == 2.0
    stats.remove_hook(hook)
    stats.run_hooks()
    assert len(calls) == 2
    stats.add_hook(hook)
    stats.events_consumed.add("t")
    stats.reset()
    assert stats.hooks == [] and stats.events_consumed.items() == [] and stats.joiner_pending.items() == []


def test_every_field_is_a_counter_kind_and_instances_do_not_share_state():
    stats = EngineStats()
    kinds = {type(m) for m in stats.metrics().values()}
    assert kinds == {Tally, Level, Buckets}
    assert set(stats.metrics()) == {f.name for f in fields(EngineStats)} - {"hooks"}
    stats.events_consumed.add("only-here")
    assert EngineStats().events_consumed.items() == []
    assert ("only-here",) not in dict(STATS.events_consumed.items())


def test_scraping_while_a_writer_creates_children_never_breaks():
    t = Tally()
    stop = threading.Event()
    errors: list[BaseException] = []

    def scrape():
        try:
            while not stop.is_set():
                t.items()
        except BaseException as exc:  # noqa: BLE001 - the test reports any failure
            errors.append(exc)

    reader = threading.Thread(target=scrape)
    reader.start()
    for i in range(20000):
        t.add(str(i % 500))
    stop.set()
    reader.join()
    assert not errors
    assert sum(v for _, v in t.items()) == 20000


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_the_engine_never_imports_prometheus_client():
    """Project rule: only connectors/metrics/prometheus.py knows Prometheus (checked at any depth:
    a function-level import counts too)."""
    offenders = [str(p.relative_to(ENGINE)) for p in ENGINE.rglob("*.py")
                 if "prometheus_client" in _imports(p)]
    assert offenders == []
    modules = ("metrics.stats", "metrics.online", "runtime.pipeline", "runtime.join_stage",
               "runtime.train_stage", "serve.service")  # fmt: skip
    code = (
        "import sys\n"
        + "".join(f"import reloop.engine.{m}\n" for m in modules)
        + "assert 'prometheus_client' not in sys.modules, 'prometheus_client was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
