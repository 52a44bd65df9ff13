"""The error memory's saved state (.npz) across reloop versions: a newer format, or a state without a key
this version needs, is refused as a ValueError naming the file (the feed then starts empty), never a bare
KeyError or TypeError."""

from __future__ import annotations

import numpy as np
import pytest
from reloop.engine.memory.served import ServedMemory

from .test_served import CONFIG, _batch, _bundle, _rows


def _saved(tmp_path):
    b = _bundle(1)
    mem = ServedMemory(CONFIG, buffer=10)
    mem.write(b, _batch(b, _rows(20)), np.ones(20))
    mem.positions = {"samples:0": 3}
    mem.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:
        return {k: f[k] for k in f.files}


def test_a_state_of_a_newer_format_is_refused_naming_the_file_and_the_formats(tmp_path):
    good = _saved(tmp_path)
    np.savez(tmp_path / "newer.npz", **{**good, "format": np.array(2)})
    with pytest.raises(
        ValueError, match="format 2 \\(written by a newer reloop\\), this reloop reads 1"
    ) as e:
        ServedMemory(CONFIG, buffer=10).load(tmp_path / "newer.npz")
    assert str(tmp_path / "newer.npz") in str(e.value)


@pytest.mark.parametrize(
    ("drop", "change"),
    [
        ("version", {}),
        ("position_keys", {}),
        ("sketch.center", {}),
        (None, {"format": np.array([1, 1])}),
        (None, {"sketch.shape": np.array(5)}),
    ],
)
def test_a_state_without_a_key_it_needs_is_a_value_error_naming_the_file(tmp_path, drop, change):
    arrays = {k: v for k, v in _saved(tmp_path).items() if k != drop}
    np.savez(tmp_path / "odd.npz", **{**arrays, **change})
    with pytest.raises(ValueError, match="error memory state .*odd.npz"):
        ServedMemory(CONFIG, buffer=10).load(tmp_path / "odd.npz")
