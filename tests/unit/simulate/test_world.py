from __future__ import annotations

import numpy as np
import pytest
from reloop.engine.simulate.world import World, WorldConfig


def test_same_seed_same_world_and_draws():
    a, b = World(WorldConfig(seed=3)), World(WorldConfig(seed=3))
    for t in (0.0, 10.0, 100.0):
        ra, rb = a.sample_request(t), b.sample_request(t)
        assert ra.user == rb.user and np.array_equal(ra.candidates, rb.candidates)
        np.testing.assert_array_equal(a.click_probability(ra, t), b.click_probability(rb, t))
    np.testing.assert_array_equal(a.draw_delays_s(100), b.draw_delays_s(100))
    c = World(WorldConfig(seed=4))
    assert not np.array_equal(c._item, a._item)


def test_click_probability_matches_drawn_clicks():
    world = World(WorldConfig(seed=1))
    req = world.sample_request(0.0)
    p = world.click_probability(req, 0.0)
    draws = np.mean([world.draw_clicks(p) for _ in range(4000)], axis=0)
    np.testing.assert_allclose(draws, p, atol=0.03)


def test_preferences_drift_so_an_old_ranking_goes_stale():
    config = WorldConfig(seed=2, drift_period_s=600.0)
    world = World(config)
    stale, fresh = [], []
    for _ in range(500):
        req = world.sample_request(300.0)
        p_old = world.click_probability(req, 0.0)
        p_now = world.click_probability(req, 300.0)
        stale.append(p_now[np.argsort(-p_old)[:10]].mean())
        fresh.append(p_now[np.argsort(-p_now)[:10]].mean())
    assert np.mean(fresh) > 1.5 * np.mean(stale)
    # A full period brings the tastes back.
    req = world.sample_request(0.0)
    np.testing.assert_allclose(
        world.click_probability(req, 0.0), world.click_probability(req, 600.0), atol=1e-9
    )


def test_ranking_by_truth_beats_random():
    world = World(WorldConfig(seed=5))
    top, rand = [], []
    for _ in range(300):
        req = world.sample_request(0.0)
        p = world.click_probability(req, 0.0)
        top.append(np.sort(p)[-10:].mean())
        rand.append(p.mean())
    assert np.mean(top) > 2 * np.mean(rand)


def test_delays_are_lognormal_with_a_tail_beyond_the_window():
    config = WorldConfig(seed=6, delay_median_s=2.0, delay_sigma=1.2, attribution_window_s=10.0)
    world = World(config)
    d = world.draw_delays_s(200_000)
    assert abs(np.median(d) - 2.0) < 0.05
    beyond = float((d > 10.0).mean())
    assert beyond > 0
    assert abs(beyond - world.fraction_beyond_window()) < 0.003


def test_features_are_strings_with_stable_ids():
    world = World(WorldConfig(seed=0))
    req = world.sample_request(0.0)
    ctx = world.context_features(req)
    assert ctx["user_id"] == f"u{req.user}"
    item = int(req.candidates[0])
    feats = world.item_features(item)
    assert World.parse_item_id(feats["item_id"]) == item
    assert all(isinstance(v, str) for v in (*ctx.values(), *feats.values()))


@pytest.mark.parametrize(
    "kw",
    [{"n_users": 0}, {"n_candidates": 600, "n_items": 500}, {"drift_period_s": 0}, {"delay_median_s": 0}],
)
def test_bad_config_is_refused(kw):
    with pytest.raises(ValueError):
        WorldConfig(**kw)
