"""The benchmark framework's arithmetic and report rendering (no timing is asserted)."""

from __future__ import annotations

import itertools

import pytest
from reloop.bench.suite import (
    FIGURES,
    Figure,
    Row,
    alternate,
    fmt_number,
    median_ratio,
    percentiles,
    render_markdown,
    render_table,
)


def test_median_ratio_is_the_median_of_per_round_ratios_not_the_ratio_of_medians() -> None:
    a = [1.0, 10.0, 3.0]
    b = [1.0, 2.0, 6.0]
    # per-round ratios 1.0, 5.0, 0.5 -> median 1.0; ratio of medians would be 3/2
    assert median_ratio(a, b) == pytest.approx(1.0)


def test_median_ratio_refuses_unpaired_rounds() -> None:
    with pytest.raises(ValueError):
        median_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        median_ratio([], [])


def test_alternate_swaps_the_order_every_round_and_pairs_values() -> None:
    calls: list[str] = []
    counter = itertools.count(1)

    def a() -> float:
        calls.append("a")
        return float(next(counter))

    def b() -> float:
        calls.append("b")
        return 2.0

    a_values, b_values, ratio = alternate(a, b, rounds=4, warmup=True, between=lambda: None)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(a_values) == len(b_values) == 4
    assert a_values == [2.0, 3.0, 4.0, 5.0]  # the warm-up value (1.0) is not recorded
    assert ratio == pytest.approx((3.0 / 2 + 4.0 / 2) / 2)


def test_alternate_without_warmup_and_with_bad_rounds() -> None:
    a_values, b_values, ratio = alternate(lambda: 3.0, lambda: 1.5, rounds=1, warmup=False)
    assert (a_values, b_values, ratio) == ([3.0], [1.5], 2.0)
    with pytest.raises(ValueError):
        alternate(lambda: 1.0, lambda: 1.0, rounds=0)


def test_percentiles_interpolate_like_numpy() -> None:
    np = pytest.importorskip("numpy")
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0]
    qs = [0, 50, 90, 99, 99.9, 100]
    assert percentiles(values, qs) == pytest.approx(list(np.percentile(values, qs)))


def test_fmt_number_sizes() -> None:
    assert fmt_number(1_234_567.0) == "1,234,567"
    assert fmt_number(123.45) == "123.5"
    assert fmt_number(1.2345) == "1.23"
    assert fmt_number(0.012345) == "0.0123"
    assert fmt_number(None) == ""
    assert fmt_number(float("nan")) == "n/a"


def test_row_round_trips_through_dict() -> None:
    row = Row("x", 1.5, "s", "base", 3.0, 0.5, "<= 1 s", False, "python -m reloop.bench --only x")
    assert Row.from_dict(row.to_dict()) == row
    fig = Figure(key="k", title="T", rows=[row], notes="n", error=None, seconds=2.0)
    assert Figure.from_dict(fig.to_dict()) == fig


def test_table_escapes_pipes_and_marks_misses() -> None:
    rows = [
        Row("a | b", 300_000.0, "events/s", "dict join", 1e6, 0.3, ">= 300k/s", True, "cmd"),
        Row("c", 6.2, "ms", target="<= 5 ms", met=False),
        Row("d", 1.0, "x"),
    ]
    text = render_table(rows)
    lines = text.strip().splitlines()
    assert len(lines) == 2 + 3
    assert "a \\| b" in lines[2]
    assert "300,000 events/s" in lines[2] and "0.300" in lines[2] and "| yes |" in lines[2]
    assert "**no**" in lines[3]
    assert lines[4].count("|") == lines[0].count("|")


def test_markdown_counts_targets_and_shows_failures() -> None:
    figs = [
        Figure("a", "A title", rows=[Row("r1", 1.0, "s", target="<= 2 s", met=True)], notes="about A"),
        Figure("b", "B title", rows=[Row("r2", 9.0, "s", target="<= 2 s", met=False)]),
        Figure("c", "C title", error="RuntimeError: broker down"),
    ]
    machine = {"date": "2026-01-01 00:00 UTC", "cpu": "Test CPU", "cores": "2", "load": "1.0"}
    text = render_markdown(figs, machine, "python -m reloop.bench", quick=True)
    assert "Targets met: 1 of 2." in text
    assert "## A title" in text and "about A" in text
    assert "**Failed**: RuntimeError: broker down" in text
    assert "Test CPU" in text and "--quick" in text


def test_every_figure_names_a_loadable_target() -> None:
    for spec in FIGURES.values():
        assert spec.target.startswith("bench.") and callable(spec.load()), spec.target


def test_collapse_top_counts_self_at_the_leaf_and_inclusive_once_per_stack() -> None:
    from reloop.bench.suite_profile import collapse_top, render_pyspy

    stacks = {"main;work;work;leaf": 5, "main;other": 3, "main;work": 2}
    own, inclusive = collapse_top(stacks, top=10)
    assert dict(own) == {"leaf": 5, "other": 3, "work": 2}
    # "work" appears twice in one stack but counts once for it
    assert dict(inclusive) == {"main": 10, "work": 7, "leaf": 5, "other": 3}
    text = render_pyspy(stacks, 3, "t")
    assert "50.0%  leaf" in text and "100.0%  main" in text
    assert render_pyspy({}, 3, "t") == "(t: no samples)"


def test_cprofile_top_returns_the_result_and_names_the_hot_function() -> None:
    from reloop.bench.suite_profile import cprofile_top

    def hot() -> int:
        return sum(i * i for i in range(20_000))

    result, text = cprofile_top(hot, top=5)
    assert result == sum(i * i for i in range(20_000))
    assert "genexpr" in text and text.startswith("cProfile")


def test_alternate_many_rotates_so_each_takes_every_position() -> None:
    from reloop.bench.suite import alternate_many

    calls: list[str] = []

    def make(name: str, value: float):
        def fn() -> float:
            calls.append(name)
            return value

        return fn

    values = alternate_many([make("a", 1.0), make("b", 2.0), make("c", 4.0)], rounds=3, between=lambda: None)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert values == [[1.0] * 3, [2.0] * 3, [4.0] * 3]
    with pytest.raises(ValueError):
        alternate_many([], rounds=1)


def test_scale_counts_are_parsed_sorted_and_bounded_by_the_partitions() -> None:
    import argparse

    from reloop.bench.__main__ import _counts

    assert _counts("4,2,2") == (2, 4)
    for bad in ("1", "5", "two", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            _counts(bad)
