import statistics

import pytest
from reloop.connectors.files.datasets import (
    DatasetError,
    DatasetRow,
    ExponentialDelay,
    FixedDelay,
    LogNormalDelay,
    make_delay,
    to_events,
    to_samples,
)
from reloop.engine.events.schema import Click, Impression


def _rows(n: int, labels: list[int] | None = None, step: int = 100) -> list[DatasetRow]:
    labels = labels or [i % 3 == 0 for i in range(n)]
    return [
        DatasetRow(f"r{i}", f"q{i}", "u", f"i{i}", i * step, {"x": str(i)}, int(labels[i])) for i in range(n)
    ]


def test_sampled_delays_are_stable_per_id_and_follow_their_distribution() -> None:
    exp = ExponentialDelay(mean_ms=1000, seed=7)
    draws = [exp.delay_ms(f"id{i}") for i in range(20_000)]
    assert draws[:50] == [ExponentialDelay(1000, 7).delay_ms(f"id{i}") for i in range(50)]
    assert draws[:50] != [ExponentialDelay(1000, 8).delay_ms(f"id{i}") for i in range(50)]
    assert min(draws) >= 0 and 950 < statistics.fmean(draws) < 1050
    logn = LogNormalDelay(median_ms=500, sigma=1.0, seed=1)
    assert 470 < statistics.median(logn.delay_ms(f"id{i}") for i in range(20_000)) < 530
    assert make_delay("fixed", ms=40).delay_ms("a") == 40 and make_delay("immediate").delay_ms("a") == 0
    with pytest.raises(ValueError, match="unknown click delay"):
        make_delay("gamma")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        FixedDelay(-1)


def test_events_time_ordered_each_click_after_its_impression() -> None:
    rows = _rows(60)
    events = list(to_events(rows, ExponentialDelay(mean_ms=250, seed=2)))
    times = [e.event_time_ms for e in events]
    assert times == sorted(times)
    seen: dict[str, int] = {}
    clicks = []
    for e in events:
        if isinstance(e, Impression):
            seen[e.impression_id] = e.event_time_ms
        else:
            assert e.impression_id in seen and e.event_time_ms >= seen[e.impression_id]
            clicks.append(e.impression_id)
    assert sorted(clicks) == sorted(r.row_id for r in rows if r.label)
    assert len(events) == len(rows) + len(clicks)


def test_fixed_delay_interleaves_clicks_with_later_impressions() -> None:
    events = list(to_events(_rows(3, [1, 0, 0]), FixedDelay(150)))
    assert [(type(e).__name__, e.event_time_ms) for e in events] == [
        ("Impression", 0), ("Impression", 100), ("Click", 150), ("Impression", 200),
    ]  # fmt: skip


def test_placeholder_is_the_causal_running_base_rate() -> None:
    events = list(to_events(_rows(4, [1, 1, 0, 0]), FixedDelay(150)))
    preds = [e.served_prediction for e in events if isinstance(e, Impression)]
    # clicks counted only once arrived: r0's click (t=150) is known at t=200, r1's (t=250) is not
    # (clicks + 1) / (impressions + 2): a prior of 0.5 worth two impressions
    assert preds == pytest.approx([1 / 2, 1 / 3, 2 / 4, 3 / 5])
    assert {e.model_version for e in events if isinstance(e, Impression)} == {0}


def test_logged_prediction_and_click_time_win() -> None:
    row = DatasetRow("a", "a", "u", "i", 10, {}, 1, click_time_ms=90, served_prediction=0.9, model_version=4)
    imp, click = to_events([row], FixedDelay(5))
    assert isinstance(imp, Impression) and imp.served_prediction == 0.9 and imp.model_version == 4
    assert isinstance(click, Click) and click.event_time_ms == 90
    bad = DatasetRow("b", "b", "u", "i", 10, {}, 1, click_time_ms=5)
    with pytest.raises(DatasetError, match="before its impression"):
        list(to_events([bad]))


def test_out_of_order_rows_are_refused() -> None:
    rows = _rows(3)
    with pytest.raises(DatasetError, match="out of time order"):
        list(to_samples([rows[1], rows[0]]))


def test_samples_match_rows() -> None:
    rows = _rows(5)
    samples = list(to_samples(rows))
    assert [(s.sample_id, s.label, s.event_time_ms, s.features) for s in samples] == [
        (r.row_id, r.label, r.event_time_ms, r.features) for r in rows
    ]
    assert samples[0].served_prediction == 0.5 and samples[1].served_prediction == pytest.approx(2 / 3)


def test_rows_without_user_or_item_ids_make_events_the_contract_takes() -> None:
    # Criteo rows (and logs without the columns) have no user id: every impression was dead-lettered
    # as bad_value ("user_id must not be empty") and every click orphaned.
    from reloop.engine.events.codec import decode_impression, encode

    rows = [DatasetRow("a", "a", "", "", 0, {"f": "x"}, 1)]
    events = list(to_events(rows))
    imp = events[0]
    assert (imp.user_id, imp.item_id) == ("unknown", "unknown")
    assert decode_impression(encode(imp)) == imp
