from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from reloop.engine.serve.arms import ArmRouter, unit_hash


def test_routing_is_stable_across_processes():
    users = [f"user-{i}" for i in range(50)]
    router = ArmRouter([("A", 1.0), ("B", 1.0)], salt="exp")
    here = [router.route(u) for u in users]
    # A fresh interpreter has a different PYTHONHASHSEED: a hash()-based router would disagree.
    code = (
        "from reloop.engine.serve.arms import ArmRouter;"
        "r=ArmRouter([('A',1.0),('B',1.0)],salt='exp');"
        "print(','.join(r.route(f'user-{i}') for i in range(50)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip().split(",") == here


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 3.0), (1.0, 1.0, 2.0)])
def test_routing_is_balanced_by_weight(weights):
    names = [f"arm{i}" for i in range(len(weights))]
    router = ArmRouter(list(zip(names, weights, strict=True)), salt="balance")
    n = 40_000
    counts = dict.fromkeys(names, 0)
    for i in range(n):
        counts[router.route(f"u{i}")] += 1
    total = sum(weights)
    for name, w in zip(names, weights, strict=True):
        expected = n * w / total
        # 5 binomial standard deviations: fails for a biased hash, passes for a fair one.
        sd = (n * (w / total) * (1 - w / total)) ** 0.5
        assert abs(counts[name] - expected) < 5 * sd, counts


def test_salt_reshuffles_users():
    a = ArmRouter([("A", 1.0), ("B", 1.0)], salt="one")
    b = ArmRouter([("A", 1.0), ("B", 1.0)], salt="two")
    users = [f"u{i}" for i in range(2000)]
    agree = sum(a.route(u) == b.route(u) for u in users) / len(users)
    assert 0.4 < agree < 0.6


def test_salts_that_differ_past_64_bytes_reshuffle_users_too():
    # blake2b takes a key of 64 bytes at most: the salt used to be cut there.
    prefix = "experiment-" * 6
    a = ArmRouter([("A", 1.0), ("B", 1.0)], salt=prefix + "v1")
    b = ArmRouter([("A", 1.0), ("B", 1.0)], salt=prefix + "v2")
    users = [f"u{i}" for i in range(2000)]
    agree = sum(a.route(u) == b.route(u) for u in users) / len(users)
    assert 0.4 < agree < 0.6
    # A salt of 64 bytes or fewer is the key as before: no running experiment is reshuffled.
    digest = hashlib.blake2b(b"k", digest_size=8, key=b"exp").digest()
    assert unit_hash("exp", "k") == int.from_bytes(digest, "big") / 2**64


def test_unit_hash_range_and_determinism():
    values = [unit_hash("s", f"k{i}") for i in range(1000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert values == [unit_hash("s", f"k{i}") for i in range(1000)]


def test_bad_arms_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        ArmRouter([("A", 1.0), ("A", 1.0)], salt="s")
    with pytest.raises(ValueError, match="weight"):
        ArmRouter([("A", 0.0)], salt="s")
    with pytest.raises(ValueError, match="at least one"):
        ArmRouter([], salt="s")
    # inf (or a sum beyond the largest float) gave the arm no traffic at all; NaN alike
    for bad in (float("inf"), float("nan"), 1e308):
        with pytest.raises(ValueError, match="weight"):
            ArmRouter([("A", bad), ("B", 1.0)], salt="s")


@pytest.mark.parametrize("weight", [".inf", ".nan", "1e308"])
def test_an_arm_weight_that_cannot_route_is_a_config_error_naming_it(tmp_path, weight):
    import yaml
    from reloop.engine.serve.config import serve_config_from_dict

    arms = yaml.safe_load(f"[{{name: A, registry: r, weight: {weight}}}, {{name: B, registry: r}}]")
    with pytest.raises(ValueError, match="weight"):
        serve_config_from_dict({"arms": arms})


def test_an_arm_whose_share_rounds_to_nothing_is_refused_naming_it():
    # 1e-300 next to 1e12: its share rounded to 0, and the arm was accepted and served no one.
    with pytest.raises(ValueError, match="arm 'B' .* served no one"):
        ArmRouter([("A", 1e12), ("B", 1e-300)], salt="s")
    ArmRouter([("A", 1e3), ("B", 1e-3)], salt="s")  # one in a million: small, but served


def test_a_tiny_arm_share_is_a_config_error_at_load(tmp_path):
    from reloop.engine.serve.config import serve_config_from_dict

    arms = [{"name": "A", "registry": "r", "weight": 1e12}, {"name": "B", "registry": "r2", "weight": 1e-6,
             "impressions_topic": "imp-b"}]  # fmt: skip
    with pytest.raises(ValueError, match="arm 'B'"):
        serve_config_from_dict({"arms": arms})
