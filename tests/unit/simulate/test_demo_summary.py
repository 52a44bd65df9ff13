"""The demo's printed summary (engine/runtime/demo.py print_summary), from fakes instead of a broker."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from reloop.engine.runtime.demo import print_summary
from reloop.engine.simulate.config import SimulateConfig
from reloop.engine.simulate.stats import SimStats
from rich.console import Console


def _summary_row(stats: SimStats, arm: str) -> list[str]:
    stack = SimpleNamespace(
        service=SimpleNamespace(versions=lambda: {arm: 2}),
        arms={arm: SimpleNamespace(logger=None, memory=None, counters=None)},
    )
    console = Console(record=True, width=250)
    print_summary(
        console,
        sim=SimpleNamespace(stats=stats),
        stack=stack,
        trainers={arm: None},
        registries={arm: SimpleNamespace(latest_version=lambda: 2)},
        sim_config=SimulateConfig(),
        trainer_rcs={arm: 0},
        logged={},
    )
    table = console.export_text().split("per arm: model versions and logging")[1]
    row = next(line for line in table.splitlines() if line.strip().startswith(f"│ {arm} "))
    return [cell.strip() for cell in row.strip("│ ").split("│")]


def test_auc_of_the_last_versions_leaves_out_versions_without_an_auc():
    stats = SimStats()
    a = stats.arm("A")
    # version 1: a perfect ranker; version 2: 100 impressions, none clicked yet (its AUC is undefined)
    a.record(1, np.array([0.9, 0.1] * 50), np.full(100, 0.1), np.array([True, False] * 50))
    a.record(2, np.full(100, 0.5), np.full(100, 0.1), np.zeros(100, dtype=bool))
    cells = _summary_row(stats, "A")
    assert cells[3] == "1.000"  # AUC first version
    assert cells[4] == "1.000"  # was 0.500: version 2's impressions weighed in with an AUC of 0


def test_auc_of_the_last_versions_is_a_dash_when_none_has_one():
    stats = SimStats()
    stats.arm("A").record(0, np.full(40, 0.5), np.full(40, 0.1), np.zeros(40, dtype=bool))
    cells = _summary_row(stats, "A")
    assert cells[3] == "-"
    assert cells[4] == "-"  # was 0.000


def test_the_summary_file_is_strict_json_with_undefined_values_as_null(tmp_path) -> None:
    # json wrote an AUC without clicks as NaN, which is not JSON: jq and JSON.parse refused the file.
    import json
    from pathlib import Path

    from reloop.engine.runtime.demo import write_summary

    path = tmp_path / "summary.json"
    arm = {"auc": float("nan"), "impressions": 3, "versions": {2: {"auc": 0.5}}}  # int keys, as the demo's
    write_summary(path, {"arms": {"a": arm}, "workdir": Path("/w")})

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {
        "arms": {"a": {"auc": None, "impressions": 3, "versions": {"2": {"auc": 0.5}}}},
        "workdir": "/w",
    }


def test_the_arms_table_says_what_its_pooled_auc_is() -> None:
    # "AUC (all)" read 0.46-0.48 for every arm beside per-version AUCs of 0.5-0.75, and nothing said why.
    from reloop.engine.simulate.report import arms_table

    console = Console(width=200, record=True)
    console.print(arms_table(SimStats(), title="t"))
    text = console.export_text()
    assert "pooled AUC" in text and "every version's scores ranked together" in text
