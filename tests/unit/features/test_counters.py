"""Click counters: the features they make, when a row sees a label, their state."""

from __future__ import annotations

import math

import numpy as np
import pytest
from reloop.engine.features.counters import (
    SEEN_SCALE,
    ClickCounters,
    CounterError,
    CounterSettings,
    counter_field_names,
    counter_inputs,
    with_counter_fields,
)
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import CategoricalField, FeatureSpec, NumericField
from reloop.engine.features.streamed_counters import streamed_counter_values

SPEC = FeatureSpec(
    fields=(
        CategoricalField(name="user", buckets=50),
        NumericField(name="price", transform="identity"),
        CategoricalField(name="item", buckets=30),
    )
)


def _cat(rows: list[dict]) -> np.ndarray:
    return Featurizer(SPEC).transform(rows).cat


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_an_unseen_value_reads_the_overall_rate_and_a_seen_one_its_own_smoothed_rate() -> None:
    counters = ClickCounters(SPEC, ["user", "item"], prior_strength=2.0)
    shown = _cat([{"user": "a", "item": "x"}] * 3 + [{"user": "b", "item": "x"}])
    counters.count_shown(shown)
    counters.count_clicks(shown, np.array([1.0, 1.0, 0.0, 0.0]))
    values = counters.values(_cat([{"user": "a", "item": "y"}, {"user": "c", "item": "x"}]))
    prior = (2 + 1) / (4 + 2)  # every counted event so far, smoothed
    assert values.shape == (2, 4)
    # user a: 2 clicks in 3 showings; item y: never shown
    assert values[0, 0] == pytest.approx(_logit((2 + 2 * prior) / (3 + 2)), rel=1e-5)
    assert values[0, 1] == pytest.approx(math.log1p(3) * SEEN_SCALE, rel=1e-5)
    assert values[0, 2] == pytest.approx(_logit(prior), rel=1e-5)
    assert values[0, 3] == 0.0
    # item x: 2 clicks in 4 showings
    assert values[1, 2] == pytest.approx(_logit((2 + 2 * prior) / (4 + 2)), rel=1e-5)
    assert [f.name for f in counters.spec_fields()] == ["user#ctr", "user#seen", "item#ctr", "item#seen"]


def test_a_row_is_counted_from_earlier_times_only_never_its_own_or_its_time() -> None:
    counters = ClickCounters(SPEC, ["user"])
    cat = _cat([{"user": "a"}] * 4)
    labels = np.array([1.0, 1.0, 0.0, 1.0])
    times = np.array([10, 20, 20, 30])
    values = streamed_counter_values(counters, cat, labels, times)
    seen = np.round(np.expm1(values[:, 1] / SEEN_SCALE)).astype(int)
    # the two rows of time 20 both see the one row before them, not each other
    assert seen.tolist() == [0, 1, 1, 3]
    assert values[1, 0] == values[2, 0]
    # the last row sees 2 clicks in 3 showings, against an overall rate of 2 in 3 smoothed
    prior = (2 + 1) / (3 + 2)
    assert values[3, 0] == pytest.approx(_logit((2 + 5 * prior) / (3 + 5)), rel=1e-5)
    assert values[0, 0] == pytest.approx(0.0, abs=1e-6)  # nothing counted: the prior 1/2
    assert counters.total_shown == 4 and counters.total_clicked == 3


def test_a_late_click_counts_from_its_arrival_and_an_impression_from_when_it_was_shown() -> None:
    counters = ClickCounters(SPEC, ["user"])
    cat = _cat([{"user": "a"}] * 4)
    labels = np.array([1.0, 0.0, 0.0, 0.0])
    times = np.array([0, 10, 20, 30])
    # the first row's click arrives at 25 (after the third row was served), the negatives whenever
    values = streamed_counter_values(counters, cat, labels, times, np.array([25, 99, 99, 99]))
    seen = np.round(np.expm1(values[:, 1] / SEEN_SCALE)).astype(int)
    assert seen.tolist() == [0, 1, 2, 3]  # every impression counts from when it was shown
    # no click is known to rows 1 and 2: their user reads below the overall rate; row 3 knows one
    assert values[1, 0] < 0 and values[2, 0] < values[1, 0]
    with_click = (1 + 5 * (1 + 1) / (3 + 2)) / (3 + 5)
    assert values[3, 0] == pytest.approx(_logit(with_click), rel=1e-5)
    assert counters.total_clicked == 1  # the run's clicks are all counted at the end


def test_counts_with_a_window_forget_with_its_time_constant_and_lifetime_ones_do_not() -> None:
    counters = ClickCounters(SPEC, ["user"], prior_strength=1.0, windows_s=[10.0])
    cat = _cat([{"user": "a"}])
    counters.count_shown(cat, now_ms=0)
    counters.count_clicks(cat, np.array([1.0]), now_ms=0)
    now = counters.values(cat, now_ms=0)[0]
    later = counters.values(cat, now_ms=10_000)[0]  # one time constant on
    seen = np.expm1(np.array([now[1], later[1], now[3], later[3]]) / SEEN_SCALE)
    assert seen == pytest.approx([1.0, 1.0, 1.0, math.exp(-1)], rel=1e-5)
    prior = (1 + 1) / (1 + 2)
    decayed = (math.exp(-1) + prior) / (math.exp(-1) + 1)
    assert later[2] == pytest.approx(_logit(decayed), rel=1e-5) and later[0] == now[0]
    # a new count weighs 1 beside the aged ones
    counters.count_shown(cat, now_ms=10_000)
    assert np.expm1(counters.values(cat, now_ms=10_000)[0, 3] / SEEN_SCALE) == pytest.approx(1 + math.exp(-1))
    assert [f.name for f in counters.spec_fields()] == [
        "user#ctr",
        "user#seen",
        "user#ctr@10s",
        "user#seen@10s",
    ]


def test_a_late_click_weighs_what_its_impression_weighs_never_more_clicks_than_showings() -> None:
    counters = ClickCounters(SPEC, ["user"], prior_strength=1e-6, windows_s=[10.0])
    cat = _cat([{"user": "a"}] * 3)
    labels = np.array([1.0, 1.0, 0.0])
    times = np.array([0, 1_000, 60_000])
    # both clicks arrive about a minute on, six time constants after their impressions
    values = streamed_counter_values(counters, cat, labels, times, np.array([59_000, 59_500, 99_000]))
    assert np.isfinite(values).all()
    shown, rate = np.expm1(values[2, 3] / SEEN_SCALE), 1 / (1 + np.exp(-values[2, 2]))
    assert shown == pytest.approx(np.exp(-6) + np.exp(-5.9), rel=1e-4)
    assert rate == pytest.approx(1.0, abs=1e-3)  # every showing clicked, and no more


def test_clicks_of_impressions_it_never_counted_cannot_make_a_rate_of_one() -> None:
    counters = ClickCounters(SPEC, ["user"], prior_strength=1.0)
    cat = _cat([{"user": "a"}])
    counters.count_shown(cat)
    counters.count_clicks(_cat([{"user": "a"}] * 3), np.ones(3))  # two clicks of showings it never saw
    values = counters.values(cat)
    assert np.isfinite(values).all()
    prior = (1 + 1) / (1 + 2)  # as if one click in one showing, overall and for the user
    assert values[0, 0] == pytest.approx(_logit((1 + prior) / (1 + 1)), rel=1e-5)


def test_counts_live_in_the_fields_buckets_and_survive_a_state_round_trip() -> None:
    counters = ClickCounters(SPEC, ["user", "item"], windows_s=[60.0])
    # lifetime and 60-s counts of each field's buckets, and when the 60-s ones last aged
    assert counters.state_dict()["shown"].shape == (2 * 50 + 2 * 30,)
    assert counters.state_dict()["stamp_ms"].shape == (50 + 30,)
    cat = _cat([{"user": str(i), "item": str(i % 7)} for i in range(200)])
    counters.count_shown(cat, now_ms=1_000)
    counters.count_clicks(cat, (np.arange(200) % 3 == 0).astype(float), now_ms=5_000)
    restored = ClickCounters(SPEC, ["user", "item"], windows_s=[60.0])
    restored.load_state_dict(counters.state_dict())
    probe = _cat([{"user": "5", "item": "3"}, {"user": "never", "item": "seen"}])
    np.testing.assert_array_equal(restored.values(probe, 9_000), counters.values(probe, 9_000))
    with pytest.raises(CounterError, match="does not fit"):
        ClickCounters(SPEC, ["item", "user"], windows_s=[60.0]).load_state_dict(counters.state_dict())
    with pytest.raises(CounterError, match="does not fit"):
        ClickCounters(SPEC, ["user", "item"]).load_state_dict(counters.state_dict())


@pytest.mark.parametrize(
    ("fields", "strength", "message"),
    [
        (["price"], 5.0, "'price' is not a categorical field"),
        (["nope"], 5.0, "'nope' is not a categorical field"),
        (["user", "user"], 5.0, "distinct"),
        ([], 5.0, "distinct"),
        (["user"], 0.0, "prior strength must be > 0"),
    ],
)
def test_a_bad_counter_setting_is_refused_naming_it(fields: list[str], strength: float, message: str) -> None:
    with pytest.raises(CounterError, match=message):
        ClickCounters(SPEC, fields, strength)


@pytest.mark.parametrize("windows", [[0.0], [-5.0], [60.0, 60.0]])
def test_a_bad_window_is_refused(windows: list[float]) -> None:
    with pytest.raises(CounterError, match="windows must be distinct and > 0 seconds"):
        ClickCounters(SPEC, ["user"], windows_s=windows)


CROSS_SPEC = FeatureSpec.model_validate(
    {
        "fields": [
            {"kind": "categorical", "name": "user", "buckets": 50},
            {"kind": "categorical", "name": "item", "buckets": 30},
            {"kind": "multi", "name": "genres", "buckets": 20, "max_len": 4},
        ]
    }
)


def _batch(rows: list[dict]):
    return Featurizer(CROSS_SPEC).transform(rows)


def test_a_cross_counts_each_pair_and_reads_the_mean_of_a_rows_pairs() -> None:
    counters = ClickCounters(CROSS_SPEC, ["user*genres"], prior_strength=1.0)
    shown = _batch([{"user": "a", "genres": ["drama", "war"]}, {"user": "a", "genres": ["drama"]}])
    counters.count_shown(shown)
    counters.count_clicks(shown.take(np.array([0])), np.ones(1))  # the first: a clicked drama and war
    prior = (1 + 1) / (2 + 2)
    asked = _batch(
        [
            {"user": "a", "genres": ["drama"]},  # shown twice, clicked once
            {"user": "a", "genres": ["war", "drama"]},  # war: shown once, clicked once
            {"user": "b", "genres": ["drama"]},  # another user's pair: never seen
            {"user": "a", "genres": []},  # no pair at all
        ]
    )
    values = counters.values(asked)
    drama, war = _logit((1 + prior) / (2 + 1)), _logit((1 + prior) / (1 + 1))
    assert values[0, 0] == pytest.approx(drama, rel=1e-5)
    assert values[0, 1] == pytest.approx(math.log1p(2) * SEEN_SCALE, rel=1e-5)
    assert values[1, 0] == pytest.approx((drama + war) / 2, rel=1e-5)
    assert values[1, 1] == pytest.approx((math.log1p(2) + math.log1p(1)) / 2 * SEEN_SCALE, rel=1e-5)
    assert values[2, 0] == pytest.approx(_logit(prior), rel=1e-5) and values[2, 1] == 0.0
    assert values[3, 0] == pytest.approx(_logit(prior), rel=1e-5) and values[3, 1] == 0.0
    assert [f.name for f in counters.spec_fields()] == ["user*genres#ctr", "user*genres#seen"]
    # The counts survive a state round trip; a multi-valued cross needs the batch, not its cat alone.
    again = ClickCounters(CROSS_SPEC, ["user*genres"], prior_strength=1.0)
    again.load_state_dict(counters.state_dict())
    np.testing.assert_array_equal(again.values(asked), values)
    with pytest.raises(CounterError, match="pass the batch"):
        counters.values(asked.cat)


def test_a_cross_of_two_categorical_fields_and_the_names_it_refuses() -> None:
    counters = ClickCounters(CROSS_SPEC, ["user*item"], windows_s=[60.0])
    rows = _batch([{"user": "a", "item": "x"}, {"user": "a", "item": "y"}])
    counters.count_shown(rows.cat, now_ms=0.0)
    counters.count_clicks(rows.cat[:1], np.ones(1), now_ms=0.0)
    values = counters.values(rows.cat, now_ms=0.0)
    assert values[0, 0] > values[1, 0]  # the pair clicked against the pair only shown
    assert values.shape == (2, 4)
    for bad, why in (("user*item*genres", "a cross of two fields"), ("user*", "a cross of two fields"),
                     ("user*nope", "'nope' is not a categorical field"),
                     ("genres*user", "'genres' is not a categorical field")):  # fmt: skip
        with pytest.raises(CounterError, match=why):
            ClickCounters(CROSS_SPEC, [bad])


def test_streamed_values_of_a_cross_see_earlier_pairs_only() -> None:
    counters = ClickCounters(CROSS_SPEC, ["user*genres"])
    batch = _batch([{"user": "a", "genres": ["drama"]}] * 3)
    values = streamed_counter_values(counters, batch, np.ones(3), np.array([10, 20, 30]))
    seen = np.round(np.expm1(values[:, 1] / SEEN_SCALE)).astype(int)
    assert seen.tolist() == [0, 1, 2]
    assert values[2, 0] > values[1, 0] > values[0, 0]  # more clicks of the pair each time


def test_counter_inputs_are_the_dense_fields_the_counters_appended() -> None:
    # serve refuses a model whose counter inputs its arm does not fill, found by these names
    settings = CounterSettings(fields=("user", "user*item"), windows_s=(60.0, 1.5))
    spec = with_counter_fields(SPEC, settings)
    assert counter_inputs(spec) == counter_field_names(settings.fields, settings.windows_s)
    assert len(counter_inputs(spec)) == 12 and counter_inputs(SPEC) == []  # "price" is not one
