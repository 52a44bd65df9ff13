"""An unchanged config keeps the fingerprint older reloops recorded in their snapshots.

``model.counters`` (2026-12-06) entered the fingerprint at its default: every snapshot written before it
was then "made with another config" for the reloop before it (a rollback refused, naming no setting, and
the way past it, ``checkpoint.allow_fingerprint_change``, would also pass a real change).
"""

from __future__ import annotations

import pytest
from reloop.engine.runtime.config import RunConfig, load_config_dict

SPEC = {"fields": [{"kind": "categorical", "name": "u", "buckets": 10}, {"kind": "numeric", "name": "x"}]}
# (model section, train fingerprint, join fingerprint) as reloop computed them on 2026-12-03 (c5814c4)
# and 2026-12-05 (fd82125): both gave these, for a config with `train: {batch_size: 256}`.
RECORDED = [
    ({"backbone": "lr", "spec": SPEC}, "2d10c6d561e2563a", "9e493c8a274a6a92"),
    ({"backbone": "dcn", "spec": SPEC, "params": {"embed_dim": 8}}, "9a2b4e211de98ce1", "9e493c8a274a6a92"),
    (
        {"backbone": "deepfm", "spec": SPEC, "strategy": "reloop", "optimizer": {"lr": 0.01}},
        "1ab000258f057137",
        "9e493c8a274a6a92",
    ),
]


@pytest.mark.parametrize(("model", "train_fp", "join_fp"), RECORDED)
def test_an_unchanged_config_keeps_the_fingerprints_older_snapshots_recorded(model, train_fp, join_fp):
    cfg = load_config_dict({"model": model, "train": {"batch_size": 256}}, env={})
    assert (cfg.fingerprint(), cfg.join_fingerprint()) == (train_fp, join_fp)


# Every setting the fingerprints hash. A setting added to these sections needs a decision: left out of the
# fingerprints at its default (config._NEW_DEFAULTS, which keeps RECORDED), runtime only
# (config._RUNTIME_ONLY), or a deliberate change of every fingerprint (then RECORDED changes too).
FINGERPRINTED = {
    "model": "alpha backbone counters optimizer params seed spec spec_file strategy",
    "train": "batch_size delayed_feedback deterministic max_consecutive_skipped max_wait_ms "
    "progressive_window replay_batch_size replay_ratio replay_size threads version_mismatch y_last",
    "join": "allowed_lateness_ms bucket_ms click_grace_ms emit_policy idle_timeout_ms late_click_policy "
    "max_closed max_early_clicks max_pending retention_ms ttl_ms window_ms",
    "validation": "max_event_bytes max_feature_chars max_feature_list max_future_ms max_past_ms",
}


@pytest.mark.parametrize("section", sorted(FINGERPRINTED))
def test_a_setting_added_to_a_fingerprinted_section_is_decided_on(section):
    fields = RunConfig.model_fields[section].annotation.model_fields  # type: ignore[union-attr]
    assert sorted(fields) == sorted(FINGERPRINTED[section].split()), (
        f"settings of {section} changed: keep older snapshots' fingerprints (config._NEW_DEFAULTS) and "
        "update FINGERPRINTED here"
    )
