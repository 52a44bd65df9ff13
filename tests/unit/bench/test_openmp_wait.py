"""The OpenMP wait probe's settings (bench/openmp_wait.py): parsed strictly, put in the environment that
``reloop run`` inherits for its runs only."""

from __future__ import annotations

import os

import pytest
from reloop.bench.openmp_wait import environment, label, parse_waits


def test_waits_are_default_or_one_openmp_wait_setting():
    assert parse_waits("default, GOMP_SPINCOUNT=300000,OMP_WAIT_POLICY=PASSIVE") == [
        {},
        {"GOMP_SPINCOUNT": "300000"},
        {"OMP_WAIT_POLICY": "PASSIVE"},
    ]
    for bad in ("", "OMP_NUM_THREADS=2", "GOMP_SPINCOUNT", "GOMP_SPINCOUNT=", "passive"):
        with pytest.raises(ValueError, match="--waits"):
            parse_waits(bad)


def test_a_setting_holds_for_its_runs_only_and_hides_the_callers(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    with environment({"GOMP_SPINCOUNT": "300000"}):
        # The caller's policy would decide over the spin count: gone while the setting runs.
        assert os.environ.get("GOMP_SPINCOUNT") == "300000" and "OMP_WAIT_POLICY" not in os.environ
    with environment({}):
        assert "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "GOMP_SPINCOUNT" not in os.environ


def test_labels_name_the_threads_and_the_setting():
    assert label(1, {}) == "1 thread, reloop run's default"
    assert label(2, {"GOMP_SPINCOUNT": "300000"}) == "2 threads, GOMP_SPINCOUNT=300000"
