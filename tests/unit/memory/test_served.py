"""The serving arm's error memory: one-forward keys, correct only its own version, re-key on a reload,
save/load, the samples feed (decode, write, positions, resume), and the scoring service using it."""

from __future__ import annotations

import numpy as np
import pytest
from reloop.connectors.memory.memory import MemoryLog, MemorySink, MemorySource
from reloop.engine.events.sample_batch import batch_from_samples, encode_batch
from reloop.engine.events.schema import LabeledSample
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import CategoricalField, FeatureSpec
from reloop.engine.memory.feed import SamplesFeed
from reloop.engine.memory.served import ServedMemory, predict_and_hidden
from reloop.engine.memory.sketch import SketchConfig
from reloop.engine.models.registry import build_learner
from reloop.engine.serve.arms import ArmRouter
from reloop.engine.serve.bundle import ModelBundle, ModelHolder
from reloop.engine.serve.schema import ScoreRequest
from reloop.engine.serve.service import ArmRuntime, ScoringService

SPEC = FeatureSpec(
    fields=(CategoricalField(name="user", buckets=40), CategoricalField(name="item", buckets=40))
)
CONFIG = SketchConfig(n_tables=2, n_bits=6, lam=1.0)


def _bundle(version: int, seed: int = 0) -> ModelBundle:
    learner = build_learner("dcn", SPEC, "ce", 0.0, seed=seed, hidden_units=(8,), embedding_dim=4)
    return ModelBundle(version=version, learner=learner.clone_frozen(), featurizer=Featurizer(SPEC))


def _rows(n: int, offset: int = 0) -> list[dict]:
    return [{"user": f"u{(i + offset) % 5}", "item": f"i{(i + offset) % 7}"} for i in range(n)]


def _batch(b: ModelBundle, rows: list[dict]):
    return b.featurizer.transform(rows)


def test_one_forward_gives_the_learners_own_probabilities_and_hidden() -> None:
    b = _bundle(1)
    x = _batch(b, _rows(9))
    probs, hidden = predict_and_hidden(b.learner, x)
    assert np.array_equal(probs, b.learner.predict_proba(x))
    assert np.array_equal(hidden, b.learner.hidden(x))


def test_scores_corrected_only_by_a_memory_of_the_same_version() -> None:
    b = _bundle(3)
    x = _batch(b, _rows(10))
    mem = ServedMemory(CONFIG, buffer=100)
    base = b.learner.predict_proba(x)
    assert np.array_equal(mem.score(b, x), base)  # empty
    mem.write(b, x, np.ones(10))
    up = mem.score(b, x)
    assert (up > base).all()  # every sample was a click the base model underrated
    assert np.array_equal(mem.score(_bundle(4), x), _bundle(4).learner.predict_proba(x))  # not its version


def test_reload_rekeys_from_the_ring_or_empties_without_one() -> None:
    old, new = _bundle(1), _bundle(2, seed=7)
    x = _batch(old, _rows(30))
    mem = ServedMemory(CONFIG, buffer=20)
    mem.write(old, x, np.ones(30))
    mem.rekey(new)
    assert mem.version == 2 and mem.sketch is not None and mem.sketch.written == 20  # the ring's last 20
    y, b, n = mem.sketch.read(predict_and_hidden(new.learner, x)[1])
    assert (y == n).all()  # only clicks were kept
    bare = ServedMemory(CONFIG, buffer=0)
    bare.write(old, x, np.ones(30))
    bare.rekey(new)
    assert bare.sketch is None and np.array_equal(bare.score(new, x), new.learner.predict_proba(x))


def test_save_and_load_round_trip(tmp_path) -> None:
    b = _bundle(5)
    x = _batch(b, _rows(25))
    mem = ServedMemory(CONFIG, buffer=10)
    mem.write(b, x, (np.arange(25) % 2).astype(float))
    mem.positions = {"samples:0": 42}
    mem.save(tmp_path / "m.npz")
    back = ServedMemory(CONFIG, buffer=10)
    back.load(tmp_path / "m.npz")
    assert back.version == 5 and back.positions == {"samples:0": 42}
    assert np.array_equal(back.score(b, x), mem.score(b, x))
    back.rekey(_bundle(6, seed=2))
    assert back.sketch is not None and back.sketch.written == 10  # the ring came back too
    with pytest.raises(ValueError):
        ServedMemory(SketchConfig(n_tables=3, n_bits=6)).load(tmp_path / "m.npz")


def _publish(mlog: MemoryLog, n: int, first_seq: int, label: int = 1) -> None:
    samples = [
        LabeledSample(
            f"s{first_seq + i}", row, label, served_prediction=0.9, served_version=1, event_time_ms=i
        )
        for i, row in enumerate(_rows(n, first_seq))
    ]
    MemorySink(mlog, "samples").send(encode_batch(batch_from_samples(samples, task=0, first_seq=first_seq)))


def test_feed_writes_joined_samples_saves_positions_and_resumes(tmp_path) -> None:
    mlog = MemoryLog()
    mlog.create("samples", 1)
    holder = ModelHolder(_bundle(1))
    state = tmp_path / "arm.npz"

    def feed() -> SamplesFeed:
        return SamplesFeed(name="A", source=MemorySource(mlog, ["samples"]), target=ServedMemory(CONFIG),
                           holder=holder, state_path=state, poll_timeout_s=0)  # fmt: skip

    f = feed()
    _publish(mlog, 8, 0)
    MemorySink(mlog, "samples").send(b"not arrow")
    assert f.step() == 8 and f.undecodable == 1
    f.close()
    g = feed()
    _publish(mlog, 4, 8)
    assert g.step() == 4  # resumed after what the first feed had read
    assert g.target.sketch is not None and g.target.sketch.written == 12  # the saved 8 + these 4
    holder.swap(_bundle(2, seed=3))
    g.step()
    assert g.target.version == 2 and g.target.rekeys == 1
    g.close()


def test_scoring_service_serves_the_corrected_scores() -> None:
    b = _bundle(1)
    mem = ServedMemory(CONFIG)
    holder = ModelHolder(b)
    service = ScoringService(
        router=ArmRouter([("A", 1.0)], salt="t"), arms={"A": ArmRuntime("A", holder, memory=mem)}
    )
    request = ScoreRequest.model_validate(
        {
            "request_id": "r",
            "user_id": "u",
            "context": {"user": "u1"},
            "candidates": [{"item_id": f"i{j}", "features": {"item": f"i{j}"}} for j in range(5)],
        }  # fmt: skip
    )
    before = [s.score for s in service.score(request).scores]
    rows = [{"user": "u1", "item": f"i{j}"} for j in range(5)]
    mem.write(b, _batch(b, rows), np.ones(5))
    after = [s.score for s in service.score(request).scores]
    assert before == pytest.approx(b.learner.predict_proba(_batch(b, rows)).tolist())
    assert all(a > c for a, c in zip(after, before, strict=True))


def test_samples_the_model_cannot_score_stay_out_of_the_memory() -> None:
    # A row the model scores NaN (here an infinite dense input; 1e30 under the identity transform does it
    # too): in the sketch it would make a NaN centre and NaN corrections for every request hashed near
    # it (and those are refused as unscorable).
    from reloop.engine.features.spec import NumericField

    spec = FeatureSpec(fields=(CategoricalField(name="user", buckets=40), NumericField(name="x")))
    learner = build_learner("dcn", spec, "ce", 0.0, seed=0, hidden_units=(8,), embedding_dim=4)
    bundle = ModelBundle(version=1, learner=learner.clone_frozen(), featurizer=Featurizer(spec))
    rows = [{"user": f"u{i % 5}", "x": 0.5} for i in range(10)]
    bad = bundle.featurizer.transform(rows)
    bad.num[0, 0] = np.inf
    good = bundle.featurizer.transform(rows)
    mem = ServedMemory(CONFIG, buffer=100)
    mem.write(bundle, bad, np.ones(10))
    assert mem.sketch is not None and mem.sketch.written == 9
    assert np.isfinite(mem.score(bundle, good)).all()
    mem.rekey(ModelBundle(version=2, learner=learner.clone_frozen(), featurizer=Featurizer(spec)))
    assert mem.sketch is not None and mem.sketch.written == 9  # the ring's rows, less the one again


def test_a_snapshot_with_another_feature_spec_rekeys_without_the_old_rows(tmp_path) -> None:
    # The ring holds embedding ids of the spec that featurised them: a model with another spec read them
    # out of its table (IndexError) at every re-key, i.e. at every poll: the memory was dead for good.
    other = FeatureSpec(
        fields=(CategoricalField(name="user", buckets=7), CategoricalField(name="item", buckets=7))
    )
    learner = build_learner("dcn", other, "ce", 0.0, seed=1, hidden_units=(8,), embedding_dim=4)
    new = ModelBundle(version=2, learner=learner.clone_frozen(), featurizer=Featurizer(other))
    old = _bundle(1)
    mem = ServedMemory(CONFIG, buffer=100)
    mem.write(old, _batch(old, _rows(30)), np.ones(30))
    mem.save(tmp_path / "m.npz")
    for m in (mem, ServedMemory(CONFIG, buffer=100)):  # live, and restored from the saved state
        if m is not mem:
            m.load(tmp_path / "m.npz")
        m.rekey(new)
        assert m.version == 2 and m.sketch is None  # emptied, not filled with another spec's ids
        x = _batch(new, _rows(10))
        m.write(new, x, np.ones(10))
        assert m.sketch is not None and m.sketch.written == 10
        m.rekey(_bundle(3))  # and back: only rows of the current spec were kept
        assert m.sketch is None


def test_a_state_saved_without_the_rings_spec_is_rekeyed_only_when_its_rows_fit(tmp_path) -> None:
    old = _bundle(1)
    mem = ServedMemory(CONFIG, buffer=100)
    mem.write(old, _batch(old, _rows(30)), np.ones(30))
    mem.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:  # the state as written before the spec was recorded
        arrays = {k: f[k] for k in f.files if k != "ring.spec"}
    np.savez(tmp_path / "legacy.npz", **arrays)
    back = ServedMemory(CONFIG, buffer=100)
    back.load(tmp_path / "legacy.npz")
    back.rekey(_bundle(2, seed=4))
    assert back.sketch is not None and back.sketch.written == 30
    small = FeatureSpec(
        fields=(CategoricalField(name="user", buckets=7), CategoricalField(name="item", buckets=7))
    )
    learner = build_learner("dcn", small, "ce", 0.0, seed=1, hidden_units=(8,), embedding_dim=4)
    back = ServedMemory(CONFIG, buffer=100)
    back.load(tmp_path / "legacy.npz")
    back.rekey(ModelBundle(version=2, learner=learner.clone_frozen(), featurizer=Featurizer(small)))
    assert back.sketch is None


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbled"])
def test_an_unreadable_state_file_is_refused_and_the_feed_starts_empty(tmp_path, damage) -> None:
    # EOFError, BadZipFile and tokenize.TokenError escaped the feed's (OSError, ValueError, KeyError):
    # open() raised at every step, so the feed never read a sample again.
    b = _bundle(1)
    mem = ServedMemory(CONFIG, buffer=10)
    mem.write(b, _batch(b, _rows(20)), np.ones(20))
    mem.positions = {"samples:0": 3}
    path = tmp_path / "arm.npz"
    mem.save(path)
    data = path.read_bytes()
    path.write_bytes(
        {"empty": b"", "truncated": data[: len(data) // 2], "garbled": data[:100] + b"x" * 50 + data[150:]}[
            damage
        ]
    )
    with pytest.raises(ValueError):
        ServedMemory(CONFIG).load(path)
    mlog = MemoryLog()
    mlog.create("samples", 1)
    feed = SamplesFeed(name="A", source=MemorySource(mlog, ["samples"]), target=ServedMemory(CONFIG),
                       holder=ModelHolder(b), state_path=path, poll_timeout_s=0)  # fmt: skip
    _publish(mlog, 5, 0)
    assert feed.step() == 5
    assert feed.target.sketch is not None and feed.target.sketch.written == 5
    feed.close()
    ServedMemory(CONFIG).load(path)  # the save on close replaced the damaged file


def test_a_state_with_inconsistent_arrays_is_refused(tmp_path) -> None:
    b = _bundle(1)
    mem = ServedMemory(CONFIG, buffer=10)
    mem.write(b, _batch(b, _rows(20)), np.ones(20))
    mem.save(tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as f:
        good = {k: f[k] for k in f.files}
    for key, value in (
        ("sketch.center", np.zeros(3, np.float32)),  # every later read (every request) failed on it
        ("sketch.labels", np.ones(1)),  # broadcast into every bucket
        ("sketch.counts", np.full_like(good["sketch.counts"], np.nan)),
        ("ring.labels", np.ones(4)),  # labels paired with other samples' features
    ):
        np.savez(tmp_path / "bad.npz", **{**good, key: value})
        with pytest.raises(ValueError):
            ServedMemory(CONFIG, buffer=10).load(tmp_path / "bad.npz")


def test_scoring_reads_the_sketch_and_its_version_together() -> None:
    """A re-key that lands between the request's read of the sketch and of the version gave the old
    model's sketch with the new version: corrections keyed by another model."""
    import threading

    class Racy(ServedMemory):
        racer: ModelBundle | None = None

        @property
        def version(self) -> int | None:  # the request reads it: the feed thread re-keys right then
            racer, self.racer = self.racer, None
            if racer is not None:
                t = threading.Thread(target=self.rekey, args=(racer,))
                t.start()
                t.join(0.5)  # blocks while the request holds the lock (the fix)
            return self._version

        @version.setter
        def version(self, value: int | None) -> None:
            self._version = value

    old, new = _bundle(1), _bundle(2, seed=7)
    mem = Racy(CONFIG, buffer=0)  # no ring: the new version's sketch is empty
    x = _batch(old, _rows(30))
    mem.write(old, x, np.ones(30))
    mem.racer = new
    scores = mem.score(new, x)
    assert np.array_equal(scores, new.learner.predict_proba(x))  # v2's memory is empty: no correction
    for _ in range(100):  # the re-key finishes once the request let go of the lock
        if mem.version == 2:
            break
        threading.Event().wait(0.01)
    assert mem.version == 2 and mem.sketch is None


def test_two_saves_at_once_both_succeed_and_leave_a_readable_file(tmp_path, monkeypatch) -> None:
    """close() saves while a feed thread it could not join may be saving: they shared one '.tmp'
    file, so one save renamed it away under the other (FileNotFoundError) or mixed their bytes."""
    import threading

    b = _bundle(1)
    first, second = ServedMemory(CONFIG, buffer=10), ServedMemory(CONFIG, buffer=10)
    first.write(b, _batch(b, _rows(20)), np.ones(20))
    first.positions, second.positions = {"samples:0": 20}, {"samples:0": 7}
    real = np.savez
    inside, go = threading.Event(), threading.Event()

    def savez(f, **arrays):
        if int(arrays["position_values"][0]) == 20:  # the first save: wait inside until the other is done
            inside.set()
            go.wait(5)
        real(f, **arrays)

    monkeypatch.setattr(np, "savez", savez)
    path = tmp_path / "arm.npz"
    errors: list[BaseException] = []

    def save_first() -> None:
        try:
            first.save(path)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=save_first)
    t.start()
    assert inside.wait(5)
    second.save(path)
    go.set()
    t.join(5)
    assert errors == []
    back = ServedMemory(CONFIG, buffer=10)
    back.load(path)
    assert back.positions == {"samples:0": 20} and back.sketch is not None and back.sketch.written == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arm.npz"]  # no temporary file left behind


class _FailingMemory(ServedMemory):
    """Raises on the writes whose number (from 1) is in ``fail``."""

    def __init__(self, fail: set[int]) -> None:
        super().__init__(CONFIG)
        self.fail, self.calls = fail, 0

    def write(self, bundle, batch, labels, times_ms=None) -> None:
        self.calls += 1
        if self.calls in self.fail:
            raise RuntimeError("the model raised on this batch")
        super().write(bundle, batch, labels, times_ms)


def test_a_write_that_fails_costs_its_message_not_the_rest_of_the_poll() -> None:
    # The source has moved past the whole poll: a failure that ended the step lost every message after
    # the failing one (never written, never read again).
    mlog = MemoryLog()
    mlog.create("samples", 1)
    for k in range(3):
        _publish(mlog, 4, 4 * k)
    memory = _FailingMemory({2})
    f = _feed_from_start(mlog, memory)
    assert f.step() == 8  # the first and the third message
    assert f.write_failures == 1 and f.stats()["write_failures"] == 1 and f.undecodable == 0
    assert memory.sketch is not None and memory.sketch.written == 8
    assert f.target.positions and f.step() == 0  # the poll's position was kept: nothing read twice


def test_a_rekey_that_fails_reads_nothing_and_is_retried() -> None:
    mlog = MemoryLog()
    mlog.create("samples", 1)
    holder = ModelHolder(_bundle(1))
    memory = ServedMemory(CONFIG)
    f = SamplesFeed(
        name="A", source=MemorySource(mlog, ["samples"]), target=memory, holder=holder, poll_timeout_s=0
    )
    f.step()  # keyed to version 1, at the end of the (empty) topic
    _publish(mlog, 4, 0)
    holder.swap(_bundle(2, seed=3))
    real = memory.rekey

    def broken(bundle) -> None:
        raise RuntimeError("re-key failed")

    memory.rekey = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        f.step()
    memory.rekey = real  # type: ignore[method-assign]
    assert f.step() == 4 and memory.version == 2  # the message polled after the re-key, not lost


def test_a_value_the_live_spec_cannot_read_costs_its_sample_not_its_message() -> None:
    # As in the train stage (row by row after a FeatureError): the memory skipped the whole message,
    # so the samples the trainer learnt from were missing from the memory.
    mlog = MemoryLog()
    mlog.create("samples", 1)
    rows = _rows(4)
    rows[2] = {**rows[2], "user": ["a", "list"]}  # the join's spec may be another one: not a category here
    samples = [
        LabeledSample(f"s{i}", row, 1, served_prediction=0.9, served_version=1, event_time_ms=i)
        for i, row in enumerate(rows)
    ]
    MemorySink(mlog, "samples").send(encode_batch(batch_from_samples(samples, task=0, first_seq=0)))
    memory = ServedMemory(CONFIG)
    f = _feed_from_start(mlog, memory)
    assert f.step() == 3 and f.refused == 1 and f.undecodable == 0 and f.write_failures == 0
    assert memory.sketch is not None and memory.sketch.written == 3
    good = _bundle(1).featurizer.transform([r for i, r in enumerate(rows) if i != 2])
    y, _, n = memory.sketch.read(predict_and_hidden(_bundle(1).learner, good)[1])
    assert (n > 0).all()  # the three readable samples are in the memory


def _feed_from_start(mlog: MemoryLog, memory: ServedMemory) -> SamplesFeed:
    """A feed keyed to model version 1 reading ``mlog``'s samples topic from its start (a fresh feed
    starts at the end)."""
    f = SamplesFeed(
        name="A",
        source=MemorySource(mlog, ["samples"]),
        target=memory,
        holder=ModelHolder(_bundle(1)),
        poll_timeout_s=0,
    )
    f.open()
    f.source.open({("samples", 0): 0})
    return f


def test_samples_re_emitted_by_a_resumed_join_task_are_written_once(tmp_path) -> None:
    mlog = MemoryLog()
    mlog.create("samples", 1)
    memory = ServedMemory(CONFIG)
    f = _feed_from_start(mlog, memory)
    _publish(mlog, 4, 0)
    _publish(mlog, 4, 2)  # seqs 2 and 3 again (the join task resumed from its checkpoint), 4 and 5 new
    assert f.step() == 6 and f.duplicates == 2
    assert memory.sketch is not None and memory.sketch.written == 6
    memory.save(tmp_path / "m.npz")
    back = ServedMemory(CONFIG)
    back.load(tmp_path / "m.npz")
    assert back.seen.highest == {"0/": 5}  # task 0, the numbering without a name
