"""``reloop replay`` through the real pipeline: a dataset and the same events as JSONL files give the
same samples and the same final model; the replay keeps its state to itself."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch
import yaml
from reloop.connectors.files.datasets import DatasetRow, ExponentialDelay, ImmediateDelay, to_events
from reloop.connectors.files.datasets.base import FieldInfo
from reloop.connectors.files.jsonl import JsonlSink
from reloop.engine.checkpoint import SnapshotRegistry
from reloop.engine.events.codec import encode
from reloop.engine.events.schema import Impression
from reloop.engine.runtime.cli import main

FIELDS = (FieldInfo("user", "categorical"), FieldInfo("item", "categorical"))


def rows(n: int = 400, t0: int = 1_700_000_000_000) -> list[DatasetRow]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(n):
        u, it = int(rng.integers(20)), int(rng.integers(30))
        p = 0.7 if (u + it) % 3 == 0 else 0.2
        label = int(rng.random() < p)
        out.append(
            DatasetRow(
                f"r{i}", f"q{i}", str(u), str(it), t0 + 700 * i, {"user": str(u), "item": str(it)}, label
            )
        )
    return out


def events():
    return list(to_events(rows(), ExponentialDelay(mean_ms=2_000, seed=1)))


def config(path: Path, ckpt: Path) -> Path:
    from reloop.connectors.files.datasets.spec import feature_spec

    cfg = {
        "model": {"backbone": "dcn", "strategy": "reloop", "alpha": 0.5,
                  "spec": feature_spec(FIELDS, buckets=64).to_dict(),
                  "params": {"hidden_units": [16], "embedding_dim": 4, "cross_layers": 2}},
        "train": {"batch_size": 32, "deterministic": True, "y_last": "snapshot"},
        "period": {"every_samples": 96},
        "join": {"window_ms": 60_000, "allowed_lateness_ms": 0},
        "consumer": {"group_id": None, "poll_max_records": 50},
        "checkpoint": {"dir": str(ckpt)},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def write_jsonl(root: Path, evs) -> None:
    sinks = {
        "impressions": JsonlSink(root=root, topic="impressions"),
        "clicks": JsonlSink(root=root, topic="clicks"),
    }
    for e in evs:
        sinks["impressions" if isinstance(e, Impression) else "clicks"].send(encode(e))
    for s in sinks.values():
        s.close()


def samples_of(out: Path) -> list[bytes]:
    return (out / "samples" / "samples" / "partition-00000.jsonl").read_bytes().splitlines()


def final_model(out: Path) -> dict[str, torch.Tensor]:
    return SnapshotRegistry(out / "snapshots").load().state["model"]["model"]


def assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_dataset_and_jsonl_replays_agree_and_keep_state_isolated(tmp_path: Path) -> None:
    live_ckpt = tmp_path / "live-snapshots"
    cfg = config(tmp_path / "run.yaml", live_ckpt)
    root = tmp_path / "log"
    evs = events()
    write_jsonl(root, evs)
    assert (
        main(
            ["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(tmp_path / "a"), "--samples"]
        )
        == 0
    )

    # the same events again, through a second replay of the files into another folder
    assert (
        main(
            ["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(tmp_path / "b"), "--samples"]
        )
        == 0
    )
    a, b = samples_of(tmp_path / "a"), samples_of(tmp_path / "b")
    assert a == b
    assert_same_model(final_model(tmp_path / "a"), final_model(tmp_path / "b"))

    # every impression became exactly one sample with its true label
    truth = {r.row_id: r.label for r in rows()}
    got = {orjson.loads(x)["sample_id"]: orjson.loads(x)["label"] for x in a}
    assert got == truth
    summary = orjson.loads((tmp_path / "a" / "summary.json").read_bytes())
    assert summary["samples_trained"] == len(truth) and summary["records"] == len(evs)
    assert summary["first_time_ms"] == evs[0].event_time_ms
    # isolated: the live checkpoint dir of the config was never written
    assert not live_ckpt.exists()
    # a second replay into a used folder is refused instead of mixing states
    assert main(["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(tmp_path / "a")]) == 2


def test_offset_range_replays_only_that_range(tmp_path: Path) -> None:
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    root = tmp_path / "log"
    evs = events()
    write_jsonl(root, evs)
    n_imp = sum(isinstance(e, Impression) for e in evs)
    n_clk = len(evs) - n_imp
    argv = [
        "replay",
        "--config",
        str(cfg),
        "--jsonl",
        str(root),
        "--out",
        str(tmp_path / "r"),
        "--samples",
        "--start-offsets",
        "impressions:0=100,clicks:0=0",
        "--end-offsets",
        f"impressions:0=200,clicks:0={n_clk}",
    ]
    assert main(argv) == 0
    ids = {orjson.loads(x)["sample_id"] for x in samples_of(tmp_path / "r")}
    assert ids == {f"r{i}" for i in range(100, 200)}


@pytest.mark.parametrize("bad", ["impressions:x=1", "impressions=1"])
def test_bad_offsets_fail_fast(tmp_path: Path, bad: str) -> None:
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    root = tmp_path / "log"
    write_jsonl(root, events()[:10])
    argv = [
        "replay",
        "--config",
        str(cfg),
        "--jsonl",
        str(root),
        "--out",
        str(tmp_path / "r"),
        "--end-offsets",
        bad,
    ]
    assert main(argv) == 2


def test_dataset_replay_recomputes_y_last_by_default() -> None:
    """A dataset's served predictions are placeholders, so the default teacher is the previous snapshot."""
    import argparse

    from reloop.engine.replay.replay_cmd import configure, dataset_config
    from reloop.engine.runtime.config import load_config_dict

    parser = argparse.ArgumentParser()
    configure(parser)
    base = ["--dataset", "movielens-100k", "--data", "x", "--out", "y"]
    cfg = load_config_dict(dataset_config(parser.parse_args(base), FIELDS), env={})
    assert cfg.train.y_last == "snapshot" and cfg.join.window_ms == 3_600_000
    args = parser.parse_args([*base, "--y-last", "logged"])
    assert load_config_dict(dataset_config(args, FIELDS), env={}).train.y_last == "logged"


def test_dataset_replay_counts_the_datasets_user_and_item_by_default() -> None:
    """As in ``reloop backtest``: ``--counters auto`` counts what the dataset declares, window 600 s."""
    import argparse

    from reloop.engine.replay.replay_cmd import configure, dataset_config
    from reloop.engine.runtime.config import load_config_dict

    parser = argparse.ArgumentParser()
    configure(parser)
    base = ["--dataset", "frappe", "--data", "x", "--out", "y"]

    def counters(*extra: str, declared: tuple[str, ...] = ("user", "item")):
        cfg = load_config_dict(dataset_config(parser.parse_args([*base, *extra]), FIELDS, declared), env={})
        return cfg.model.counters

    assert counters().fields == ("user", "item") and counters().windows_s == (600.0,)
    assert counters(declared=()) is None  # a dataset that names no user: nothing counted
    assert counters("--counters", "none") is None
    assert counters("--counters", "item", "--counter-windows", "60,3600").windows_s == (60.0, 3600.0)
    assert counters("--counter-windows", "none").windows_s == ()
    with pytest.raises(ValueError, match="windows of no counters"):
        counters("--counters", "none", "--counter-windows", "600")
    # an empty value is refused rather than guessed (it read as auto), and auto / none stand alone
    refused = [
        (("--counters", ""), "--counters: empty"),
        (("--counter-windows", " , "), "--counter-windows: empty"),
        (("--counters", "auto,user"), "auto and none stand alone"),
    ]
    for extra, why in refused:
        with pytest.raises(ValueError, match=why):
            counters(*extra)


def test_a_dataset_replay_trains_with_the_counter_inputs_an_arm_would_have_served(tmp_path: Path) -> None:
    from reloop.engine.checkpoint import SnapshotRegistry

    data = _tiny_movielens(tmp_path, 300)
    argv = [
        "replay",
        "--dataset",
        "movielens-100k",
        "--data",
        str(data),
        "--backbone",
        "fm",
        "--batch-size",
        "32",
    ]

    def spec_names(out: Path, *extra: str) -> list[str]:
        assert main([*argv, *extra, "--out", str(out)]) == 0
        snapshot = SnapshotRegistry(out / "snapshots", create=False).load()
        spec = orjson.loads(snapshot.state["model"]["config_json"])["spec"]  # the model's, as trained
        return [f["name"] for f in spec["fields"]] + [str(snapshot.meta["config"]["model"].get("counters"))]

    counted = spec_names(tmp_path / "a", "--samples")
    # each sample trained on carries the values the rows get from with_served_counters, as served
    from reloop.connectors.files.datasets import open_dataset
    from reloop.connectors.files.datasets.served_counters import with_served_counters
    from reloop.connectors.files.datasets.spec import feature_spec
    from reloop.engine.features.counters import CounterSettings

    ds = open_dataset("movielens-100k", data)
    settings = CounterSettings(fields=ds.counters, windows_s=(600.0,))
    rows = with_served_counters(ds.rows(), feature_spec(ds.fields), settings, ImmediateDelay())
    want = {r.row_id: {k: v for k, v in r.features.items() if "#" in k} for r in rows}
    samples = (tmp_path / "a" / "samples" / "samples" / "partition-00000.jsonl").read_bytes().splitlines()
    got = {
        s["sample_id"]: {k: v for k, v in s["features"].items() if "#" in k}
        for s in map(orjson.loads, samples)
    }
    assert len(got) == 300 and got == want
    assert len({v["user_id#seen"] for v in got.values()}) > 10  # counts that grow, not a constant
    assert {"user_id#ctr", "item_id#seen@600s", "user_id*genres#ctr@600s"} <= set(counted)
    plain = spec_names(tmp_path / "b", "--counters", "none")
    assert not [n for n in plain if "#" in n] and plain[-1] == "None"
    summaries = [orjson.loads((tmp_path / x / "summary.json").read_bytes())["progressive"] for x in "ab"]
    assert summaries[0]["auc"] != summaries[1]["auc"]  # the inputs reached the model


def test_samples_replay_trains_what_the_fetch_thread_still_holds(tmp_path, monkeypatch):
    """The replay source runs dry before the train stage has taken what its fetch thread decoded ahead:
    the replay goes on until every message handed out is trained (it once stopped with them queued)."""
    from reloop.connectors.memory import MemoryLog, MemorySource
    from reloop.engine.events.sample_batch import batch_from_samples, encode_batch
    from reloop.engine.replay.replay import run_samples_replay
    from reloop.engine.runtime.config import load_config_dict
    from reloop.engine.runtime.synthetic import SPEC
    from reloop.engine.streams import TopicPartition

    samples = _random_samples(seed=1)
    log = MemoryLog()
    log.create("samples")
    for i in range(0, len(samples), 64):
        log.append("samples", encode_batch(batch_from_samples(samples[i : i + 64], task=0, first_seq=i)),
                   None, samples[i].event_time_ms)  # fmt: skip
    cfg = load_config_dict(
        {
            "model": {"backbone": "lr", "strategy": "reloop", "alpha": 0.3, "spec": SPEC},
            # max_wait_ms 0 would step on every partial batch in a live run; a replay takes full batches only
            "train": {"batch_size": 100, "max_wait_ms": 0},
            "stages": {"samples_topic": "samples"},
            "period": {"every_samples": 10**9},
            "consumer": {"group_id": None},
        },
        env={},
    )
    from reloop.engine.runtime import build

    stages = []
    build_train_stage = build.build_train_stage

    def keep(*args, **kwargs):
        stages.append(build_train_stage(*args, **kwargs))
        return stages[-1]

    monkeypatch.setattr(build, "build_train_stage", keep)
    result = run_samples_replay(
        cfg, source=MemorySource(log, ["samples"]), end={TopicPartition("samples", 0): 40},
        checkpoint_dir=tmp_path / "c",
    )  # fmt: skip
    assert stages[0].settings.max_wait_ms is None and stages[0].partial_steps == 0
    assert result.records == 40
    assert result.samples_trained == len(samples)
    assert result.steps == len(samples) // 100 + 1  # full batches, then the rest at the end


def test_a_replay_writing_snapshots_in_the_background_equals_one_waiting_for_each(tmp_path, monkeypatch):
    """The raw replay's pipeline commits no offsets, so its period snapshots are written on a writer
    thread; every version must hold what a replay waiting for each write saves, even when writes lag."""
    import time

    write = SnapshotRegistry.write

    def slow_write(self, prepared):
        time.sleep(0.02)
        return write(self, prepared)

    monkeypatch.setattr(SnapshotRegistry, "write", slow_write)
    root = tmp_path / "log"
    write_jsonl(root, events())
    regs = {}
    for name, background in (("background", True), ("in-step", False)):
        cfg = config(tmp_path / f"{name}.yaml", tmp_path / "unused")
        data = yaml.safe_load(cfg.read_text())
        data["checkpoint"]["background_writes"] = background
        cfg.write_text(yaml.safe_dump(data))
        out = tmp_path / name
        assert main(["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(out)]) == 0
        regs[name] = SnapshotRegistry(out / "snapshots")
    bg, fg = regs["background"], regs["in-step"]
    assert bg.versions() == fg.versions() and len(bg.versions()) >= 2
    for v in bg.versions():
        a, b = bg.load(v), fg.load(v)
        assert a.meta["positions"] == b.meta["positions"]
        assert_same_model(a.state["model"]["model"], b.state["model"]["model"])


def _replayed(tmp_path: Path) -> list[str]:
    """The argv of a finished ``--jsonl`` replay of ``events()`` into ``tmp_path/a`` (its config is
    ``argv[2]``), run once."""
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    root = tmp_path / "log"
    write_jsonl(root, events())
    argv = ["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    return argv


def test_a_resume_with_nothing_left_publishes_no_new_version(tmp_path: Path, capsys) -> None:
    # It published version n+1 from the same state, 0 records later: a model version that is no new model.
    argv = _replayed(tmp_path)
    reg = SnapshotRegistry(tmp_path / "a" / "snapshots")
    versions = reg.versions()
    assert versions
    first = orjson.loads((tmp_path / "a" / "summary.json").read_bytes())
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert reg.versions() == versions
    summary = orjson.loads((tmp_path / "a" / "summary.json").read_bytes())
    assert summary["final_version"] == versions[-1]
    # Its times are the whole replay's: the newest was null, and "the events span -1,714,550,400 s" warned.
    assert (summary["first_time_ms"], summary["last_time_ms"]) == (
        first["first_time_ms"],
        first["last_time_ms"],
    )
    assert summary["last_time_ms"] is not None and "events span" not in capsys.readouterr().err


def test_a_resume_with_other_options_than_its_start_is_refused_naming_them(tmp_path: Path, capsys) -> None:
    # A changed --start-time was ignored (the positions went on from the snapshot); --samples given to one
    # of the two runs left part of the samples in the file; neither said a word.
    argv = _replayed(tmp_path)
    capsys.readouterr()
    for extra, named in (
        (["--samples"], "--samples False -> True"),
        (["--start-offsets", "impressions:0=5"], "--start-offsets None -> 'impressions:0=5'"),
    ):
        assert main([*argv, "--resume", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("reloop replay: --resume with other options") and named in err, err
    assert main([*argv, "--resume"]) == 0  # the same options
    capsys.readouterr()
    fresh = [*argv[:-1], str(tmp_path / "b"), "--resume"]  # another --out
    assert main(fresh) == 0  # nothing to resume: said, then a whole replay
    assert "holds no snapshot yet: starting from the beginning" in capsys.readouterr().err


def test_a_resume_cutting_versions_elsewhere_is_refused_naming_it(tmp_path: Path, capsys) -> None:
    # period.* is not in the config fingerprint (a live service may change its cadence at a restart), so
    # a resumed replay with another period was accepted without a word: not the replay it resumed.
    argv = _replayed(tmp_path)
    cfg, out = Path(argv[2]), tmp_path / "a"
    capsys.readouterr()
    other = yaml.safe_load(cfg.read_text())
    other["period"] = {"every_samples": 192}
    changed = tmp_path / "other.yaml"
    changed.write_text(yaml.safe_dump(other))
    assert main([*argv[:2], str(changed), *argv[3:], "--resume"]) == 2
    err = capsys.readouterr().err
    assert "period.every_samples 96 -> 192" in err, err
    # An OUT recorded by a reloop that did not record the period resumes under any.
    options = out / "replay-options.json"
    recorded = orjson.loads(options.read_bytes())
    options.write_bytes(orjson.dumps({k: v for k, v in recorded.items() if not k.startswith("period.")}))
    assert main([*argv[:2], str(changed), *argv[3:], "--resume"]) == 0
    # An OUT with no record (a replay by a reloop from before it): said, and recorded from this resume on.
    options.unlink()
    capsys.readouterr()
    assert main([*argv[:2], str(changed), *argv[3:], "--resume"]) == 0
    assert "has no record of the options its replay was started with" in capsys.readouterr().err
    assert main([*argv, "--resume"]) == 2
    assert "period.every_samples 192 -> 96" in capsys.readouterr().err


def test_a_click_stamped_with_its_impressions_time_is_not_held_as_early(tmp_path: Path) -> None:
    # ``--delay immediate`` stamps a click with its impression's own time; the merge ordered the topics
    # by name ("clicks" < "impressions"), so every click reached the joiner before its impression.
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    root = tmp_path / "log"
    evs = list(to_events(rows(), ImmediateDelay()))
    clicks = sum(not isinstance(e, Impression) for e in evs)
    assert clicks > 50
    write_jsonl(root, evs)
    assert main(["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(tmp_path / "a")]) == 0
    summary = orjson.loads((tmp_path / "a" / "summary.json").read_bytes())
    assert summary["join"]["early_clicks_held"] == 0
    assert summary["join"]["positives"] == clicks


@pytest.mark.parametrize("bad", [b"not json", b'{"impression_id": "r1", "event_time_ms": "x"}'])
def test_a_click_record_without_an_event_time_costs_only_itself(tmp_path: Path, bad: bytes) -> None:
    # Stamped 0, it pulled the clicks before it ahead of their impressions (the merge orders a record
    # by the earliest time of it and its successors): 4 valid clicks lost their label.
    from dataclasses import replace

    from reloop.connectors.files.datasets import FixedDelay

    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    root = tmp_path / "log"
    hourly = [replace(r, event_time_ms=1_700_000_000_000 + 3_600_000 * i) for i, r in enumerate(rows(200))]
    evs = list(to_events(hourly, FixedDelay(30_000)))
    clicks = sum(not isinstance(e, Impression) for e in evs)
    write_jsonl(root, evs)
    path = root / "clicks" / "partition-00000.jsonl"
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join([*lines[:50], bad, *lines[50:]]) + b"\n")
    assert main(["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(tmp_path / "a")]) == 0
    summary = orjson.loads((tmp_path / "a" / "summary.json").read_bytes())
    assert sum(summary["dead_letters"].values()) == 1
    assert summary["join"]["positives"] == clicks and summary["join"]["orphan_clicks"] == 0
    # and the record itself is kept with its reason (a replay wrote only the count)
    (letter,) = [
        orjson.loads(x)
        for f in (tmp_path / "a" / "dead-letters").rglob("*.jsonl")
        for x in f.read_bytes().splitlines()
    ]
    assert letter["value"]["data"] == bad.decode() and letter["reason"] in summary["dead_letters"]


def test_reloop_deadletters_reads_a_replays_dead_letters(tmp_path: Path, capsys) -> None:
    # `reloop deadletters` read only the dead-letter topic: a replay's OUT/dead-letters had no reader.
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    root = tmp_path / "log"
    write_jsonl(root, list(to_events(rows(100))))
    path = root / "clicks" / "partition-00000.jsonl"
    path.write_bytes(path.read_bytes() + b"not json\n" + b'{"impression_id": 7}\n')
    assert main(["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(tmp_path / "a")]) == 0
    reasons = orjson.loads((tmp_path / "a" / "summary.json").read_bytes())["dead_letters"]
    assert sum(reasons.values()) == 2
    capsys.readouterr()
    letters = tmp_path / "a" / "dead-letters"
    assert main(["deadletters", "summary", "--file", str(letters)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("2 of 2 dead letters in 1 file(s)")
    assert sorted((line.split()[1], int(line.split()[0])) for line in out[1:]) == sorted(reasons.items())
    assert main(["deadletters", "show", "--file", str(letters), "--limit", "1"]) == 0
    (shown,) = [orjson.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert shown["topic"] == "clicks" and shown["dead_letter_offset"] == 0
    assert main(["deadletters", "redrive", "--file", str(letters)]) == 2
    assert "replayed again" in capsys.readouterr().err
    # An --origin no letter came from (a typo) said "0 of 2" as if none came from a real topic.
    assert main(["deadletters", "summary", "--file", str(letters), "--origin", "click"]) == 2
    assert "--origin click: no dead letter read came from it; origins read: clicks" in capsys.readouterr().err
    assert main(["deadletters", "summary", "--file", str(letters), "--origin", "clicks"]) == 0
    assert capsys.readouterr().out.startswith("2 of 2")


def test_an_impression_stamped_years_ahead_is_dead_lettered_and_the_rest_trained(tmp_path: Path) -> None:
    # The replay clock followed the newest record handed out, the far-future one too: it passed the
    # intake's max_future_ms check against itself, its partition was held back behind it, and 150 of
    # 200 valid impressions after it were dropped as too late.
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    root = tmp_path / "log"
    evs = events()
    write_jsonl(root, evs)
    path = root / "impressions" / "partition-00000.jsonl"
    lines = path.read_bytes().splitlines()
    ahead = orjson.loads(lines[100])
    ahead["impression_id"] = "from-the-future"
    ahead["event_time_ms"] += 10 * 365 * 86_400_000
    path.write_bytes(b"\n".join([*lines[:50], orjson.dumps(ahead), *lines[50:]]) + b"\n")
    assert main(["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(tmp_path / "a")]) == 0
    summary = orjson.loads((tmp_path / "a" / "summary.json").read_bytes())
    assert summary["dead_letters"] == {"bad_time": 1}
    assert summary["samples_trained"] == len(rows()) and summary["join"]["too_late_impressions"] == 0


def test_a_last_line_without_a_newline_is_named_in_a_warning(tmp_path: Path, capsys) -> None:
    # It was left out of the replay without a word (the reader waits for a line's newline: a writer may
    # still be appending it).
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    root = tmp_path / "log"
    write_jsonl(root, events())
    path = root / "impressions" / "partition-00000.jsonl"
    path.write_bytes(path.read_bytes()[:-1])
    assert main(["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert f"{path}: its last line" in err and "no newline" in err, err


def test_impressions_lost_to_disorder_are_named_in_a_warning(tmp_path: Path, capsys) -> None:
    # A file not in event-time order lost most of its impressions as too late, seen only in summary.json.
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    root = tmp_path / "log"
    write_jsonl(root, events())
    path = root / "impressions" / "partition-00000.jsonl"
    assert main(["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(tmp_path / "a")]) == 0
    assert "found no impression" not in capsys.readouterr().err  # in order: nothing to say
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join(lines[::-1]) + b"\n")  # newest first
    assert main(["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(tmp_path / "b")]) == 0
    summary = orjson.loads((tmp_path / "b" / "summary.json").read_bytes())
    err = capsys.readouterr().err
    j = summary["join"]
    assert j["orphan_clicks"] > 0
    assert f"and {j['orphan_clicks']} click(s) found no impression" in err, err


def test_impressions_dropped_as_repeats_are_named_in_a_warning(tmp_path: Path, capsys) -> None:
    # A log whose rows repeat an impression_id lost the later ones to the join's duplicate check with
    # exit 0, counted only in summary.json: a live join drops a redelivery by design, a log loses a row.
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    root = tmp_path / "log"
    write_jsonl(root, events())
    path = root / "impressions" / "partition-00000.jsonl"
    lines = path.read_bytes().splitlines()
    path.write_bytes(b"\n".join([*lines[:10], lines[9], lines[9], *lines[10:]]) + b"\n")
    assert main(["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(tmp_path / "a")]) == 0
    summary = orjson.loads((tmp_path / "a" / "summary.json").read_bytes())
    assert summary["join"]["duplicate_impressions"] == 2
    assert "2 impression(s) repeated an impression_id" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("source", "options"),
    [
        ("--jsonl", ["--start-time", "1700000005000"]),
        ("--jsonl", ["--end-time", "garbage"]),
        ("--dataset", ["--start-offsets", "impressions:0=5"]),
    ],
)
def test_a_range_the_source_cannot_apply_is_refused(tmp_path: Path, capsys, source: str, options) -> None:
    # A time range with --jsonl (or any range with --dataset) was ignored: the whole log replayed, exit 0.
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    root = tmp_path / "log"
    write_jsonl(root, events()[:10])
    given = [source, str(root)] if source == "--jsonl" else [source, "movielens-100k", "--data", str(root)]
    argv = ["replay", "--config", str(cfg), *given, "--out", str(tmp_path / "r"), *options]
    assert main(argv) == 2
    assert options[0] in capsys.readouterr().err
    assert not (tmp_path / "r" / "snapshots").exists()


def test_a_resume_from_snapshots_of_another_config_or_none_usable_exits_2(tmp_path: Path, capsys) -> None:
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    root = tmp_path / "log"
    write_jsonl(root, events()[:120])
    argv = ["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    other = yaml.safe_load(cfg.read_text())
    other["train"]["batch_size"] = 16
    changed = tmp_path / "other.yaml"
    changed.write_text(yaml.safe_dump(other))
    changed_argv = [*argv, "--resume"]
    changed_argv[2] = str(changed)
    assert main(changed_argv) == 2  # it was a SnapshotMismatch traceback, exit 1
    assert "reloop replay:" in capsys.readouterr().err
    for part in (tmp_path / "a" / "snapshots").glob("v*/state.pt"):
        data = bytearray(part.read_bytes())
        data[len(data) // 2] ^= 0xFF
        part.write_bytes(bytes(data))
    assert main([*argv, "--resume"]) == 2  # NoUsableSnapshot
    assert "reloop replay:" in capsys.readouterr().err


def test_out_naming_a_file_is_refused(tmp_path: Path, capsys) -> None:
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    root = tmp_path / "log"
    write_jsonl(root, events()[:10])
    (tmp_path / "afile").write_text("")
    argv = ["replay", "--config", str(cfg), "--jsonl", str(root), "--out"]
    # At parse time (exit 2); a path under the file was a NotADirectoryError traceback.
    for out, why in (("afile", "is a file, expected a folder"), ("afile/x", "is a file, so")):
        with pytest.raises(SystemExit) as stop:
            main([*argv, str(tmp_path / out)])
        assert (
            stop.value.code == 2
            and f"argument --out: '{tmp_path / 'afile'}' {why}" in capsys.readouterr().err
        )


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--strategy", "ce"], "--strategy: with --config"),
        (["--backbone", "lr", "--alpha", "0.1"], "--backbone, --alpha: with --config"),
        (["--max-rows", "10"], "--max-rows: for --dataset only"),
        (["--delay", "fixed:1000"], "--delay: for --dataset only"),
        (["--timestamps", "record"], "JSONL files keep no record timestamps"),
        (["--end-offsets", "impressions:0=999999"], "outside its file"),
        (["--start-offsets", "impressions:0=-5"], "outside its file"),
        (["--end-offsets", "impressions:7=10"], "not a partition of this replay"),
        (["--start-offsets", "clicks:0=50", "--end-offsets", "clicks:0=40"], "past its end"),
    ],
)
def test_options_a_jsonl_replay_would_ignore_or_choke_on_are_refused(tmp_path: Path, capsys, extra, needle):
    # Each ran with exit 0 as if not given (the config's model, every row), or ended in a traceback.
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    write_jsonl(tmp_path / "log", events())
    argv = ["replay", "--config", str(cfg), "--jsonl", str(tmp_path / "log"), "--out", str(tmp_path / "a")]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_end_offsets_for_one_topic_end_the_others_with_their_files(tmp_path: Path) -> None:
    # "replay end positions missing" (a traceback) when the end offsets named one topic only.
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    write_jsonl(tmp_path / "log", events())
    argv = ["replay", "--config", str(cfg), "--jsonl", str(tmp_path / "log"), "--out", str(tmp_path / "a")]
    assert main([*argv, "--end-offsets", "impressions:0=100"]) == 0
    summary = orjson.loads((tmp_path / "a" / "summary.json").read_bytes())
    assert summary["join"]["impressions"] == 100


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--config", "run.yaml", "--backbone", "lr"], "--backbone: with --config"),
        (["--config", "run.yaml", "--counters", "none"], "--counters: with --config"),
        (["--max-rows", "-3"], "--max-rows: expected an integer >= 0"),
        (["--buckets", "0"], "--buckets: expected an integer >= 2"),  # a multi-line pydantic error
        (["--alpha", "nan"], "model.alpha: Input should be a finite number"),  # "less than or equal to 1"
        (["--delay", "fixed"], "--delay fixed: use fixed:MS"),  # was a 0 ms delay
        (["--delay", "immediate:5000"], "--delay immediate:5000: use immediate"),  # was immediate
        (["--delay", "exponential:abc"], "--delay exponential:abc: 'abc' is not milliseconds"),
        (
            ["--delay", "exponential:nan"],
            "--delay exponential:nan: expected finite values >= 0",
        ),  # a traceback
        (["--delay", "fixed:-5"], "--delay fixed:-5: expected finite values >= 0"),
        (["--from-samples"], "--from-samples: with --kafka only"),  # replayed the dataset as if not given
    ],
)
def test_dataset_options_the_replay_would_ignore_are_refused(tmp_path: Path, capsys, extra, needle):
    argv = ["replay", "--dataset", "movielens-100k", "--data", str(tmp_path), "--out", str(tmp_path / "a")]
    try:
        code = main([*argv, *extra])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--start-time", "garbage"], "--start-time garbage: Invalid isoformat string"),
        (["--end-time", "2026-13-01"], "--end-time 2026-13-01: month must be in 1..12"),
        (["--start-time", "2000", "--end-time", "1000"], "--start-time 2000 is not before --end-time 1000"),
        (["--end-offsets", "impressions:0=1,impressions:0=5"], "impressions:0 is given twice"),
        (["--from-samples", "--samples"], "--samples: not with --from-samples"),
        (["--from-samples", "--timestamps", "event"], "--timestamps: not with --from-samples"),
    ],
)
def test_kafka_range_options_are_checked_naming_the_flag(tmp_path: Path, capsys, extra, needle) -> None:
    # The parse error did not name the option ("reloop replay: month must be in 1..12"), an empty time
    # range exited 0 with an untrained model, the last of two offsets silently won, and --from-samples
    # ignored --samples and --timestamps. All before any connection: no broker listens at port 9.
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    argv = ["replay", "--config", str(cfg), "--kafka", "127.0.0.1:9", "--out", str(tmp_path / "a"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "a" / "snapshots").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_replay_resumed_writes_each_sample_once(
    tmp_path: Path, monkeypatch, capsys, signum
) -> None:
    # The samples written after the last snapshot were written again by the resumed replay: 400
    # impressions, 400 + k lines in OUT/samples. And the interrupted replay left no summary saying so.
    # A SIGTERM ended the process at once (no summary, a serving bundle without its snapshot): now as
    # Ctrl-C, exit 143.
    from reloop.engine.runtime.pipeline import Pipeline

    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    root = tmp_path / "log"
    write_jsonl(root, events())
    argv = ["replay", "--config", str(cfg), "--jsonl", str(root), "--samples", "--out"]
    assert main([*argv, str(tmp_path / "whole")]) == 0
    step = Pipeline.step
    calls = 0

    def interrupted_step(self: Pipeline) -> int:
        nonlocal calls
        calls += 1
        if calls == 7:  # past the first snapshots (every 96 samples), between two of them
            os.kill(os.getpid(), signum)  # the Python handler runs here, in the main thread
        return step(self)

    monkeypatch.setattr(Pipeline, "step", interrupted_step)
    out = tmp_path / "cut"
    assert main([*argv, str(out)]) == (130 if signum == signal.SIGINT else 143)
    said = [ln for ln in capsys.readouterr().err.splitlines() if "interrupted" in ln]
    assert said and said[0].startswith("reloop replay: interrupted"), said  # not after the bar's text
    assert orjson.loads((out / "summary.json").read_bytes())["interrupted"] is True
    written = len(samples_of(out))
    assert SnapshotRegistry(out / "snapshots").versions()  # resumed from a snapshot, not from scratch
    monkeypatch.setattr(Pipeline, "step", step)
    assert main([*argv, str(out), "--resume"]) == 0
    assert 0 < written < len(rows())
    assert samples_of(out) == samples_of(tmp_path / "whole")
    assert "interrupted" not in orjson.loads((out / "summary.json").read_bytes())


def test_a_replay_whose_source_stops_delivering_exits_1_with_a_message(tmp_path: Path, monkeypatch, capsys):
    # ReplayStalled (records deleted by retention while a replay reads them) was a traceback.
    import reloop.engine.replay.replay as replay_module
    from reloop.engine.replay.sources import ReplayStalled

    def stalled(*args, **kwargs):
        raise ReplayStalled("no records for 30.0s from partitions [impressions:0]")

    monkeypatch.setattr(replay_module, "run_replay", stalled)
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    write_jsonl(tmp_path / "log", events()[:20])
    argv = ["replay", "--config", str(cfg), "--jsonl", str(tmp_path / "log"), "--out", str(tmp_path / "a")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "reloop replay: no records for 30.0s" in err and "Traceback" not in err
    # From Kafka, with the broker gone: said (the message blamed retention alone).
    from types import SimpleNamespace

    from reloop.engine.replay.replay_cmd import _broker_note

    note = _broker_note(SimpleNamespace(kafka="127.0.0.1:1"), ReplayStalled("no records"))
    assert note.startswith(" (no Kafka broker answers at 127.0.0.1:1 now: 127.0.0.1:1: "), note


def _dead_letter_lines(out: Path) -> list[bytes]:
    return [x for f in sorted((out / "dead-letters").rglob("*.jsonl")) for x in f.read_bytes().splitlines()]


def test_a_resumed_replay_summarises_and_dead_letters_as_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    # A resume counted only its own records in "records" (while the join and trainer counts went on from
    # the snapshot), its "dead_letters" only those it refused itself, and the bad records after the
    # restore point went to OUT/dead-letters a second time.
    from reloop.engine.runtime.pipeline import Pipeline

    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    root = tmp_path / "log"
    write_jsonl(root, events())
    path = root / "clicks" / "partition-00000.jsonl"
    lines = path.read_bytes().splitlines()
    bad = [b"not json %d" % i for i in range(len(lines) // 20 + 1)]
    mixed = [x for i, line in enumerate(lines) for x in ((bad[i // 20], line) if i % 20 == 0 else (line,))]
    path.write_bytes(b"\n".join(mixed) + b"\n")
    argv = ["replay", "--config", str(cfg), "--jsonl", str(root), "--out"]
    assert main([*argv, str(tmp_path / "whole")]) == 0
    whole = orjson.loads((tmp_path / "whole" / "summary.json").read_bytes())
    assert sum(whole["dead_letters"].values()) == len(bad) == len(_dead_letter_lines(tmp_path / "whole"))
    step = Pipeline.step
    calls = 0

    def interrupted_step(self: Pipeline) -> int:
        nonlocal calls
        calls += 1
        if calls == 9:  # past the first snapshots, between two of them
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Pipeline, "step", interrupted_step)
    out = tmp_path / "cut"
    assert main([*argv, str(out)]) == 130
    assert SnapshotRegistry(out / "snapshots").versions()
    before = len(_dead_letter_lines(out))
    assert 0 < before < len(bad)
    monkeypatch.setattr(Pipeline, "step", step)
    assert main([*argv, str(out), "--resume"]) == 0
    strip = [
        {k: v for k, v in orjson.loads(x).items() if k != "dead_lettered_at_ms"}
        for x in _dead_letter_lines(out)
    ]
    assert strip == [
        {k: v for k, v in orjson.loads(x).items() if k != "dead_lettered_at_ms"}
        for x in _dead_letter_lines(tmp_path / "whole")
    ]
    resumed = orjson.loads((out / "summary.json").read_bytes())
    for key in ("records", "samples_trained", "steps", "first_time_ms", "last_time_ms", "join",
                "dead_letters", "positions", "trainer", "final_version"):  # fmt: skip
        assert resumed[key] == whole[key], key
    assert resumed["progressive"] == pytest.approx(whole["progressive"])  # a sum's last bit may differ
    # what is this run's alone says so
    assert resumed["resumed_from"] is not None and whole["resumed_from"] is None
    assert 0 < resumed["records_this_run"] < resumed["records"]
    assert whole["records_this_run"] == whole["records"]


def test_a_resumed_samples_replay_summarises_and_dead_letters_as_an_uninterrupted_one(tmp_path, monkeypatch):
    # As for the raw replay: a resumed --from-samples replay counted only its own records and its own
    # dead letters, and wrote again the dead letters of the messages after its restore point.
    import functools

    from reloop.connectors.memory import MemoryLog, MemorySource
    from reloop.engine.events.sample_batch import batch_from_samples, encode_batch
    from reloop.engine.replay.replay import run_samples_replay
    from reloop.engine.replay.replay_cmd import keep_dead_letters
    from reloop.engine.runtime.config import load_config_dict
    from reloop.engine.runtime.synthetic import SPEC
    from reloop.engine.runtime.train_stage import TrainStage
    from reloop.engine.streams import TopicPartition

    samples = _random_samples(seed=2)
    log = MemoryLog()
    log.create("samples")
    for i in range(0, len(samples), 64):
        log.append("samples", encode_batch(batch_from_samples(samples[i : i + 64], task=0, first_seq=i)),
                   None, samples[i].event_time_ms)  # fmt: skip
        if i % (64 * 8) == 0:
            log.append("samples", b"not a batch %d" % i, None, samples[i].event_time_ms)
    end = {TopicPartition("samples", 0): len(log._data[TopicPartition("samples", 0)])}
    cfg = load_config_dict(
        {
            "model": {"backbone": "lr", "strategy": "reloop", "alpha": 0.3, "spec": SPEC},
            "train": {"batch_size": 100, "deterministic": True},
            "stages": {"samples_topic": "samples"},
            "period": {"every_samples": 500},
            "consumer": {"group_id": None},
        },
        env={},
    )

    def replay(out: Path, on_progress=None):
        dead = JsonlSink(root=out / "dead-letters", topic="dl")
        try:
            return run_samples_replay(
                cfg, source=MemorySource(log, ["samples"]), end=end, checkpoint_dir=out / "snapshots",
                dead_letter_sink=dead, on_dead_letters_restored=functools.partial(keep_dead_letters, dead),
                on_progress=on_progress,
            )  # fmt: skip
        finally:
            dead.close()

    whole = replay(tmp_path / "whole").to_dict()
    assert sum(whole["dead_letters"].values()) == 5 == len(_dead_letter_lines(tmp_path / "whole"))
    step = TrainStage.step

    def interrupted_step(self: TrainStage) -> int:
        if self.trainer.counters.samples >= 1_300:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(TrainStage, "step", interrupted_step)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        replay(out)
    assert SnapshotRegistry(out / "snapshots").versions()
    monkeypatch.setattr(TrainStage, "step", step)
    progress: list[int] = []
    resumed = replay(out, progress.append).to_dict()
    assert progress[-1] == whole["records"]  # the whole replay's count (a bar ended a resume at 56%)
    assert [orjson.loads(x)["value"] for x in _dead_letter_lines(out)] == [
        orjson.loads(x)["value"] for x in _dead_letter_lines(tmp_path / "whole")
    ]
    for key in ("records", "samples_trained", "steps", "first_time_ms", "last_time_ms", "join",
                "dead_letters", "positions", "trainer", "final_version"):  # fmt: skip
        assert resumed[key] == whole[key], key
    assert resumed["resumed_from"] is not None and 0 < resumed["records_this_run"] < resumed["records"]
    # A resume of the finished replay (killed after its final snapshot) publishes no new version: it
    # published the same model again as version n+1.
    versions = SnapshotRegistry(out / "snapshots").versions()
    again = replay(out).to_dict()
    assert again["final_version"] == whole["final_version"] == versions[-1]
    assert SnapshotRegistry(out / "snapshots").versions() == versions and again["records_this_run"] == 0


def test_a_replay_whose_final_snapshot_fails_exits_1(tmp_path: Path, monkeypatch, capsys) -> None:
    # The final snapshot (the replay's model) failed: "final save skipped" in the log, and the replay
    # exited 0 with a summary of final_version null.
    from reloop.engine.runtime.pipeline import Pipeline

    snapshot = Pipeline.snapshot

    def full_disk(self: Pipeline, *, wait: bool = True, **kwargs) -> int:
        if wait:  # the final one (period snapshots go to the writer thread)
            raise OSError(28, "No space left on device")
        return snapshot(self, wait=wait, **kwargs)

    monkeypatch.setattr(Pipeline, "snapshot", full_disk)
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    write_jsonl(tmp_path / "log", events())
    out = tmp_path / "a"
    argv = ["replay", "--config", str(cfg), "--jsonl", str(tmp_path / "log"), "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "reloop replay: the final snapshot was not written" in err and "No space left" in err
    assert "Traceback" not in err and not (out / "summary.json").exists()
    versions = SnapshotRegistry(out / "snapshots").versions()
    monkeypatch.setattr(Pipeline, "snapshot", snapshot)
    assert main([*argv, "--resume"]) == 0  # goes on from the last period snapshot
    assert SnapshotRegistry(out / "snapshots").versions()[-1] == versions[-1] + 1


def _random_samples(seed: int, n: int = 2_560) -> list:
    """``n`` labelled samples of the synthetic spec's fields, one a millisecond."""
    from reloop.engine.events.schema import LabeledSample

    rng = np.random.default_rng(seed)
    return [
        LabeledSample(
            f"s{i}",
            {"user": f"u{rng.integers(50)}", "item": f"i{rng.integers(80)}", "ctx": i % 7},
            int(rng.random() < 0.3),
            0.3,
            0,
            1_700_000_000_000 + i,
        )  # fmt: skip
        for i in range(n)
    ]


def test_a_replay_whose_training_diverges_exits_2_saying_a_resume_would_diverge_again(
    tmp_path: Path, capsys
) -> None:
    # TrainingDiverged ended the replay in a traceback (exit 1).
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    diverging = yaml.safe_load(cfg.read_text())
    diverging["model"]["optimizer"] = {"lr": 1e37, "embedding_lr": 1e37, "small_steps_below": 0}
    cfg.write_text(yaml.safe_dump(diverging))
    root = tmp_path / "log"
    write_jsonl(root, events())
    out = tmp_path / "a"
    out.mkdir()
    (out / "summary.json").write_text("{}")  # an earlier run's: must not read as this one's
    assert main(["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "reloop replay: training diverged" in err and "Traceback" not in err
    assert "would diverge again" in err and "model.optimizer.lr" in err
    assert not (out / "summary.json").exists()


def _tiny_movielens(tmp_path: Path, n: int = 200) -> Path:
    """A ratings file of ``n`` rows in MovieLens's layout (7 users, 11 items, a rating a minute)."""
    data = tmp_path / "ml"
    data.mkdir()
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"{i % 7}\t{i % 11}\t{5 if i % 3 else 1}\t{1_000_000 + i * 60}" for i in range(n)]
    (data / "ml-100k.inter").write_text("\n".join(lines) + "\n")
    return data


def test_a_config_whose_model_reads_none_of_the_datasets_fields_is_refused(tmp_path: Path, capsys) -> None:
    # The example config (Criteo's spec) on MovieLens trained a bias alone: AUC 0.48, exit 0.
    import yaml

    data = _tiny_movielens(tmp_path)
    base = {
        "model": {"backbone": "lr", "spec": {"fields": [{"kind": "categorical", "name": "C1", "buckets": 8}]}}
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(base))
    argv = ["replay", "--config", str(config), "--dataset", "movielens-100k", "--data", str(data)]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "reads none of movielens-100k's fields" in err and "item_id" in err and "C1" in err
    fields = base["model"]["spec"]["fields"]
    fields.append({"kind": "categorical", "name": "user_id", "buckets": 8})
    config.write_text(yaml.safe_dump(base))
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert (
        "1 of the model's 2 fields are not in movielens-100k and read as missing: C1"
        in capsys.readouterr().err
    )


def test_a_dataset_replay_takes_the_environments_overrides(tmp_path: Path, monkeypatch) -> None:
    # RELOOP__MODEL__BACKBONE=fm trained dcn: the config built from the dataset ignored the environment.
    from reloop.engine.checkpoint import SnapshotRegistry

    data = _tiny_movielens(tmp_path)
    monkeypatch.setenv("RELOOP__MODEL__BACKBONE", "fm")
    argv = ["replay", "--dataset", "movielens-100k", "--data", str(data), "--batch-size", "32", "--out"]
    assert main([*argv, str(tmp_path / "out")]) == 0
    snapshot = SnapshotRegistry(tmp_path / "out" / "snapshots", create=False).load()
    assert snapshot.meta["config"]["model"]["backbone"] == "fm"
    assert main([*argv, str(tmp_path / "flag"), "--backbone", "lr"]) == 0  # a flag given wins
    snapshot = SnapshotRegistry(tmp_path / "flag" / "snapshots", create=False).load()
    assert snapshot.meta["config"]["model"]["backbone"] == "lr"


def test_a_replay_that_trains_nothing_publishes_no_model_version(tmp_path: Path, capsys) -> None:
    # An empty range (or only clicks) published an untrained model as version 1, which a service
    # pointed at the folder would load and serve.
    from reloop.engine.checkpoint import SnapshotRegistry

    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    write_jsonl(tmp_path / "log", [e for e in events() if not isinstance(e, Impression)])
    out = tmp_path / "clicks-only"
    assert main(["replay", "--config", str(cfg), "--jsonl", str(tmp_path / "log"), "--out", str(out)]) == 0
    assert orjson.loads((out / "summary.json").read_bytes())["final_version"] is None
    assert SnapshotRegistry(out / "snapshots", create=False).versions() == []
    assert not list((out / "snapshots").glob("serving/*"))
    assert "no model version was published" in capsys.readouterr().err


def test_a_replay_shorter_than_the_join_window_says_its_metrics_read_low(tmp_path: Path, capsys) -> None:
    # 2,000 Frappe rows (11 minutes) against a 1-hour window: AUC 0.25, every positive trained before any
    # negative, and nothing said why.
    data = _tiny_movielens(tmp_path)  # 200 ratings a minute apart: 3.3 hours
    argv = ["replay", "--dataset", "movielens-100k", "--data", str(data), "--batch-size", "32", "--out"]
    assert main([*argv, str(tmp_path / "hour"), "--window-ms", "3600000"]) == 0
    assert "less than join.window_ms" not in capsys.readouterr().err
    assert main([*argv, str(tmp_path / "day"), "--window-ms", "86400000"]) == 0
    assert "span 11,940 s, less than join.window_ms (86,400 s)" in capsys.readouterr().err


def test_a_wall_clock_period_in_a_replay_is_warned_about(tmp_path: Path, capsys) -> None:
    # Replayed at its own speed, 137 s of records gave 1 version at every_wall_s 10 and 8 at
    # every_event_ms 10000, without a word.
    cfg = config(tmp_path / "run.yaml", tmp_path / "live")
    doc = yaml.safe_load(cfg.read_text())
    doc["period"] = {"every_wall_s": 10}
    cfg.write_text(yaml.safe_dump(doc))
    root = tmp_path / "log"
    write_jsonl(root, events()[:40])
    assert main(["replay", "--config", str(cfg), "--jsonl", str(root), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "period.every_wall_s (10 s) counts this replay's own running time" in err, err


def test_a_dataset_replay_resumed_under_another_click_delay_is_refused(tmp_path: Path, capsys) -> None:
    # --delay and --delay-seed were not among the options a resume is checked against: the rest of the
    # stream was labelled by another delay model, in one summary with the first part.
    data = _tiny_movielens(tmp_path)
    argv = ["replay", "--dataset", "movielens-100k", "--data", str(data), "--batch-size", "32"]
    argv += ["--delay", "fixed:1000", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    capsys.readouterr()
    for extra, named in (
        (["--delay", "fixed:5000"], "--delay 'fixed:1000' -> 'fixed:5000'"),
        (["--delay-seed", "3"], "--delay-seed 0 -> 3"),
    ):
        assert main([*argv, "--resume", *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("reloop replay: --resume with other options") and named in err, err
    assert main([*argv, "--resume"]) == 0  # the same options
