from __future__ import annotations

import math
import re
import threading
import time

import numpy as np
import pytest
from reloop.connectors.memory.memory import MemoryLog, MemorySink
from reloop.engine.events.codec import decode_click
from reloop.engine.simulate.driver import NotReadyYet, Simulator
from reloop.engine.simulate.stats import SimStats, ab_plan, ab_report, log_ctr_variance
from reloop.engine.simulate.world import World, WorldConfig


class FakeClock:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def __call__(self) -> int:
        return self.ms


def _ranker(world: World, clock: FakeClock, *, oracle: bool, arm_of=lambda user: "A"):
    """An in-process stand-in for the service: ranks by the truth (oracle) or by noise."""
    rng = np.random.default_rng(0)
    n = [0]

    def score(body):
        user = int(body["user_id"][1:])
        items = [World.parse_item_id(c["item_id"]) for c in body["candidates"]]
        if oracle:
            taste = world.user_taste(np.array([user]), (clock.ms - sim_start[0]) / 1000)[0]
            s = 1 / (1 + np.exp(-(world._item[items] @ taste)))
        else:
            s = rng.random(len(items))
        order = np.argsort(-s)[: body["top_k"]]
        ranking = []
        for pos, i in enumerate(order):
            n[0] += 1
            ranking.append(
                {
                    "item_id": World.item_id(items[i]),
                    "score": float(s[i]),
                    "position": pos,
                    "impression_id": f"imp{n[0]}",
                }
            )
        return {"arm": arm_of(user), "model_version": 1, "ranking": ranking}

    sim_start = [clock.ms]
    return score


def _sim(oracle: bool, mlog: MemoryLog, **kw):
    world = World(WorldConfig(seed=1, delay_median_s=1.0, delay_sigma=1.0, attribution_window_s=5.0))
    clock = FakeClock()
    sim = Simulator(
        world=world,
        score=_ranker(world, clock, oracle=oracle, **kw),
        click_sink=lambda arm: MemorySink(mlog, f"clicks.{arm}"),
        top_k=5,
        clock_ms=clock,
    )
    return sim, clock


def test_clicks_are_sent_after_their_delay_keyed_by_impression():
    mlog = MemoryLog()
    sim, clock = _sim(True, mlog)
    shown = {}
    for _ in range(300):
        resp = sim.step()
        for r in resp["ranking"]:
            shown[r["impression_id"]] = clock.ms
        clock.ms += 100
        sim.emit_due_clicks()
    sent_early = sim.stats.clicks_sent
    clock.ms += 10_000_000  # long after every delay
    sim.emit_due_clicks()
    sim.close()
    records = [r for tp in mlog.partitions("clicks.A") for r in mlog.read(tp, 0, 100_000)]
    clicks = [decode_click(r.value) for r in records]
    assert len(clicks) == sim.stats.arms["A"].clicks > 0
    assert sent_early < len(clicks)  # some clicks were still waiting for their delay
    for rec, click in zip(records, clicks, strict=True):
        assert rec.key == click.impression_id.encode()
        assert rec.timestamp_ms == click.event_time_ms >= shown[click.impression_id]
    assert sim.stats.clicks_late > 0 and sim.stats.clicks_pending_at_end == 0


def test_truth_stats_separate_a_good_ranker_from_noise():
    good, _ = _sim(True, MemoryLog())
    bad, _ = _sim(False, MemoryLog())
    for _ in range(400):
        good.step()
        bad.step()
    g, b = good.stats.arms["A"], bad.stats.arms["A"]
    assert g.true_ctr > 1.5 * b.true_ctr
    assert g.summary()["served_auc"] > 0.6
    assert abs(b.summary()["served_auc"] - 0.5) < 0.08
    # Expected and realized CTR agree (the clicks are drawn from the true probability).
    assert abs(g.realized_ctr - g.true_ctr) < 0.05


def test_not_ready_and_errors_are_counted_not_raised():
    calls = {"n": 0}

    def flaky(body):
        calls["n"] += 1
        if calls["n"] == 1:
            raise NotReadyYet("no model")
        raise RuntimeError("boom")

    world = World(WorldConfig(seed=0))
    sim = Simulator(world=world, score=flaky, click_sink=lambda arm: MemorySink(MemoryLog(), "c"))
    assert sim.step() is None and sim.step() is None
    assert sim.stats.not_ready == 1 and sim.stats.errors == 1


def test_ab_minus_aa_report():
    stats = SimStats()
    rng = np.random.default_rng(0)
    for arm, p in (("reloop", 0.12), ("ce", 0.10), ("ce2", 0.10)):
        for _ in range(200):
            true_p = np.full(10, p)
            stats.arm(arm).record(1, rng.random(10), true_p, rng.random(10) < true_p)
    rep = ab_report(stats, treatment="reloop", control="ce", aa=("ce2", "ce"))
    assert abs(rep["ab_lift_true"] - 0.2) < 1e-9
    assert abs(rep["aa_lift_true"]) < 1e-9
    assert rep["ab_minus_aa_true"] == rep["ab_lift_true"] - rep["aa_lift_true"]
    assert np.isfinite(rep["ab_minus_aa_clicks"])


def test_run_paces_requests_from_several_threads():
    mlog = MemoryLog()
    world = World(WorldConfig(seed=0))
    clock = FakeClock()
    sim = Simulator(
        world=world,
        score=_ranker(world, clock, oracle=False),
        click_sink=lambda arm: MemorySink(mlog, "c"),
        top_k=3,
    )
    sim.run(rate=100.0, duration_s=1.0, concurrency=3)
    requests = sim.stats.arms["A"].requests
    # Paced: about rate x duration, never a burst far beyond it.
    assert 50 <= requests <= 110
    assert sim.stats.arms["A"].impressions == 3 * requests


def test_logged_ctr_counts_each_clicked_impression_once():
    from reloop.connectors.memory.memory import MemorySource
    from reloop.engine.events.codec import encode
    from reloop.engine.events.schema import Click, Impression
    from reloop.engine.simulate.logged import count_logged

    mlog = MemoryLog()
    imp_sink, click_sink = MemorySink(mlog, "imp"), MemorySink(mlog, "clk")
    for i in range(10):
        imp = Impression(
            impression_id=f"i{i}",
            request_id="r",
            user_id="u",
            item_id="x",
            features={},
            event_time_ms=1,
            served_prediction=0.5,
            model_version=0,
        )
        imp_sink.send(encode(imp))
    for imp_id in ("i1", "i1", "i2", "ghost"):
        click_sink.send(encode(Click(impression_id=imp_id, event_time_ms=2)))
    counts = count_logged(MemorySource(mlog, ["imp"]), MemorySource(mlog, ["clk"]), idle_s=0.1)
    assert (counts.impressions, counts.clicked, counts.orphan_clicks) == (10, 2, 1)
    assert counts.ctr == 0.2


def test_ab_plan_says_what_the_drawn_clicks_can_detect_and_how_long_the_observed_lift_needs():
    stats = SimStats()
    # Treatment 1,100 clicks / 10,000, A/A copy and control 1,000 / 10,000 each, over 60 s.
    for arm, clicks in (("reloop", 1100), ("ce", 1000), ("ce2", 1000)):
        a = stats.arm(arm)
        a.impressions, a.clicks = 10_000, clicks
        a.first_at, a.last_at = 100.0, 160.0
    plan = ab_plan(stats, treatment="reloop", control="ce", aa=("ce2", "ce"))
    var = (1 - 0.11) / 1100 + (1 - 0.10) / 1000  # var(log CTR) of the treatment and the A/A copy
    assert plan["detectable"] == pytest.approx((1.959964 + 0.841621) * math.sqrt(var))
    assert plan["observed"] == pytest.approx(0.10)  # A/B +10% minus A/A 0%
    assert plan["elapsed_s"] == 60.0
    assert plan["needed_s"] == pytest.approx(60.0 * (plan["detectable"] / 0.10) ** 2)
    # Four times the clicks halve the detectable size.
    for a in stats.arms.values():
        a.impressions, a.clicks = 4 * a.impressions, 4 * a.clicks
    assert ab_plan(stats, treatment="reloop", control="ce", aa=("ce2", "ce"))["detectable"] == pytest.approx(
        plan["detectable"] / 2
    )
    assert ab_plan(stats, treatment="reloop", control="missing") == {}


def _arm_of_users(stats: SimStats, name: str, users: list[tuple[int, int]]) -> None:
    """Record ``(impressions, clicks)`` per user into arm ``name``, one request per user."""
    arm = stats.arm(name)
    for u, (n, c) in enumerate(users):
        clicked = np.array([1] * c + [0] * (n - c))
        arm.record(1, np.full(n, 0.1), np.full(n, 0.1), clicked, user=f"u{u}")


def test_with_one_impression_per_user_the_variance_over_users_is_the_binomial():
    stats = SimStats()
    _arm_of_users(stats, "a", [(1, 1)] * 300 + [(1, 0)] * 700)
    arm = stats.arms["a"]
    n = 1000
    assert log_ctr_variance(arm) == pytest.approx(n / (n - 1) * (1 - 0.3) / 300)


def test_users_who_click_all_or_nothing_make_the_arm_noisier_than_its_impressions_say():
    # 200 users with 10 impressions each; half click all 10, half none: as many independent
    # impressions would give var(CTR) = 0.25 / 2,000, the users give 0.25 / 200 (times n / (n - 1)).
    stats = SimStats()
    _arm_of_users(stats, "a", [(10, 10), (10, 0)] * 100)
    _arm_of_users(stats, "b", [(10, 10), (10, 0)] * 100)
    arm = stats.arms["a"]
    binomial = (1 - arm.realized_ctr) / arm.clicks
    assert log_ctr_variance(arm) == pytest.approx(10 * binomial * 200 / 199)
    plan = ab_plan(stats, treatment="a", control="b")
    assert plan["unit"] == "user"
    assert plan["detectable"] == pytest.approx((1.959964 + 0.841621) * math.sqrt(2 * log_ctr_variance(arm)))


def test_the_summary_line_says_how_long_the_demo_would_need():
    from reloop.engine.simulate.config import ReportConfig
    from reloop.engine.simulate.report import ab_lines

    stats = SimStats()
    for arm, clicks in (("reloop", 1010), ("ce", 1000), ("ce2", 1000)):
        a = stats.arm(arm)
        a.impressions, a.clicks, a.true_p_sum = 10_000, clicks, clicks
        a.first_at, a.last_at = 0.0, 120.0
    lines = ab_lines(stats, ReportConfig(treatment="reloop", control="ce", aa=("ce2", "ce")))
    plan_line = lines[-1]
    assert "this run can detect ±" in plan_line and "after 120 s" in plan_line
    # +1% observed against a detectable ~12%: about (12/1)^2 = 150x the run, i.e. hours.
    assert " h (" in plan_line and "x this run" in plan_line
    # A difference far beyond the noise needs a fraction of the run, said as such (not "0x").
    stats.arm("reloop").clicks = stats.arm("reloop").true_p_sum = 2_000
    short = ab_lines(stats, ReportConfig(treatment="reloop", control="ce", aa=("ce2", "ce")))[-1]
    assert re.search(r"\(0\.\d+x this run\)", short), short


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_click_sink_that_fails_stops_the_run_and_counts_every_click_not_sent(concurrency):
    # Kafka down: the clicks were popped before the send raised (reported as 0 pending), the worker
    # threads died with tracebacks, and `reloop simulate` exited 0; each thread waited its own timeout.
    from reloop.engine.simulate.driver import ClickSinkFailed

    class Breaks(MemorySink):
        sends = 0

        def send(self, value, key=None, timestamp_ms=None):
            Breaks.sends += 1
            if Breaks.sends > 5:
                raise ConnectionError("broker gone")
            super().send(value, key=key, timestamp_ms=timestamp_ms)

    mlog, made = MemoryLog(), []
    world = World(WorldConfig(seed=0, delay_median_s=0.001, delay_sigma=0.1))

    def sink(arm):
        made.append(arm)
        return Breaks(mlog, "c")

    clock = FakeClock()
    sim = Simulator(world=world, score=_ranker(world, clock, oracle=False), click_sink=sink, top_k=10)
    with pytest.raises(ClickSinkFailed, match="broker gone"):
        sim.run(rate=200.0, duration_s=30.0, concurrency=concurrency)
    with pytest.raises(ClickSinkFailed):
        sim.close()
    clicks = sum(a.clicks for a in sim.stats.arms.values())
    assert sim.stats.clicks_sent == 5 and len(mlog.read(mlog.partitions("c")[0], 0, 100)) == 5
    assert sim.stats.clicks_sent + sim.stats.clicks_pending_at_end == clicks > 5
    assert Breaks.sends == 6 and made == ["A"]  # no thread tried the broken sink again


def test_the_same_seed_gives_the_same_clicks_whatever_order_threads_answer_in():
    # One generator served the requests and, after each HTTP answer, the clicks: with two client
    # threads the outcomes depended on which answer came back first.
    import threading
    import time as _time

    def run_once() -> tuple[int, dict[str, list[tuple[str, int]]]]:
        world = World(WorldConfig(seed=7, delay_median_s=0.5))
        clock = FakeClock()
        lock, order = threading.Lock(), [0]

        def score(body):
            with lock:
                order[0] += 1
                slow = order[0] % 3 == 0
            if slow:  # answers come back out of request order
                _time.sleep(0.004)
            ranking = [
                {"item_id": c["item_id"], "score": 0.5, "position": i,
                 "impression_id": f"{body['request_id']}/{c['item_id']}"}
                for i, c in enumerate(body["candidates"][:5])
            ]  # fmt: skip
            return {"arm": "A", "model_version": 1, "ranking": ranking}

        sim = Simulator(world=world, score=score, click_sink=lambda arm: None, clock_ms=clock)
        sim.run(rate=400.0, duration_s=0.6, concurrency=2)
        out: dict[str, list[tuple[str, int]]] = {}
        for _, click in sim.clicks.pop_due(10**15):
            out.setdefault(click.impression_id.split("/")[0], []).append(
                (click.impression_id, click.event_time_ms)
            )
        return sim._n, {k: sorted(v) for k, v in out.items()}

    (na, a), (nb, b) = run_once(), run_once()
    both = min(na, nb)  # requests 1..both were answered in both runs

    def first(clicks):
        return {k: v for k, v in clicks.items() if int(k.rsplit("-", 1)[1]) <= both}

    assert len(first(a)) > 20 and first(a) == first(b)


@pytest.mark.parametrize(
    "answer",
    [
        {"detail": "not the scoring service"},  # a 200 from something else at that address
        {"arm": "A", "model_version": 1, "ranking": [{"item_id": "oops", "score": 0.5}]},
        {"arm": "A", "model_version": 1, "ranking": [{"item_id": "i999999", "score": 0.5}]},
        None,
    ],
)
def test_an_answer_of_the_wrong_shape_is_counted_as_an_error_and_the_run_goes_on(answer):
    """It raised out of step(): every client thread died (the run ended early, those requests counted
    nowhere); with one thread the run ended in a traceback."""
    calls = {"n": 0}

    def odd(body):
        calls["n"] += 1
        return answer

    world = World(WorldConfig(seed=0))
    sim = Simulator(world=world, score=odd, click_sink=lambda arm: MemorySink(MemoryLog(), "c"))
    assert sim.step() is None
    sim.run(rate=50.0, duration_s=0.4, concurrency=2)
    assert calls["n"] >= 10  # the threads kept going for the whole duration
    assert sim.stats.errors == calls["n"] and not sim.stats.arms


class _Expiring(MemorySink):
    """A sink like KafkaSink: it takes ``on_failure`` and, once ``expire()`` is called, gives up on every
    record it holds (a broker down past the producer's delivery timeout); ``held`` until ``deliver()``."""

    def __init__(self, log: MemoryLog, topic: str) -> None:
        super().__init__(log, topic)
        self.held: list[tuple[bytes, bytes | None, int | None, object]] = []
        self.aborted = False

    def send(self, value, key=None, timestamp_ms=None, on_failure=None):
        self.held.append((value, key, timestamp_ms, on_failure))

    def deliver(self) -> None:
        for value, key, ts, _ in self.held:
            super().send(value, key=key, timestamp_ms=ts)
        self.held = []

    def expire(self) -> None:
        for _, _, _, on_failure in self.held:
            on_failure(TimeoutError("120002 ms has passed since batch creation"))
        self.held = []

    def abort(self) -> None:
        self.aborted = True

    def flush(self, timeout_s=None) -> None:
        self.deliver()


def test_clicks_a_producer_gave_up_on_are_sent_again_by_a_new_one_once_the_broker_is_back(monkeypatch):
    # `reloop simulate` through a broker outage over 2 min: the producer expired its clicks (counted as
    # sent), then sent nothing more until restarted; every impression served meanwhile trained as a negative.
    mlog, made, broker_up = MemoryLog(), [], [True]

    def sink(arm):
        if not broker_up[0]:
            raise ConnectionError("no broker")
        made.append(_Expiring(mlog, "c"))
        return made[-1]

    world = World(WorldConfig(seed=0, delay_median_s=0.001, delay_sigma=0.1))
    clock = FakeClock()
    sim = Simulator(
        world=world, score=_ranker(world, clock, oracle=True), click_sink=sink, top_k=10, clock_ms=clock
    )
    monkeypatch.setattr(Simulator, "SINK_RETRY_S", 0.01)
    for _ in range(50):
        sim.step()
        clock.ms += 1000
        sim.emit_due_clicks()
    first = len(made[0].held)
    assert first > 0
    broker_up[0] = False
    made[0].expire()
    sim.emit_due_clicks()  # the first sink is dropped; a new one cannot be made yet: no error, they wait
    assert made[0].aborted and len(made) == 1 and sim.failure is None
    assert len(sim.clicks) == first and sim.stats.clicks_resent == first
    broker_up[0] = True
    _until(lambda: (sim.emit_due_clicks(), len(made) == 2 and not sim.clicks)[1])
    sim.close()
    clicks = [decode_click(r.value) for r in mlog.read(mlog.partitions("c")[0], 0, 100_000)]
    assert len(made) == 2 and len(clicks) == sum(a.clicks for a in sim.stats.arms.values())
    assert len({c.impression_id for c in clicks}) == len(clicks) and sim.stats.clicks_sent == len(clicks)


def _until(done, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class _SlowSecondSink:
    """Click sinks whose second one (made again after the first gave up its clicks) waits for
    ``release``: a broker that does not answer. ``entered`` is set once that one is being made."""

    def __init__(self) -> None:
        self.log, self.made = MemoryLog(), []
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, arm: str) -> _Expiring:
        if self.made:
            self.entered.set()
            self.release.wait(10)
        sink = _Expiring(self.log, "c")
        sink.closed = False
        sink.close = lambda: setattr(sink, "closed", True)
        self.made.append(sink)
        return sink


def _through_an_outage(sinks: _SlowSecondSink) -> tuple[Simulator, FakeClock]:
    """A simulator whose first sink gave up the clicks it held, its second being made (not yet back)."""
    world = World(WorldConfig(seed=0, delay_median_s=0.001, delay_sigma=0.1))
    clock = FakeClock()
    sim = Simulator(
        world=world, score=_ranker(world, clock, oracle=True), click_sink=sinks, top_k=10, clock_ms=clock
    )
    while not sinks.made or not sinks.made[0].held:
        sim.step()
        clock.ms += 1000
        sim.emit_due_clicks()
    sinks.made[0].expire()
    sim.emit_due_clicks()  # returns while the new sink is still being made
    assert sinks.entered.wait(10)
    return sim, clock


def test_a_sink_made_again_during_an_outage_does_not_hold_up_the_requests():
    # Each try to make a producer while the broker is down can wait a whole bootstrap timeout: made on
    # the request loop, it stalled the requests once per SINK_RETRY_S of an outage.
    sinks = _SlowSecondSink()
    sim, clock = _through_an_outage(sinks)
    assert not sinks.release.is_set() and len(sinks.made) == 1
    assert sim.step() is not None  # requests go on meanwhile
    sim.emit_due_clicks()
    sinks.release.set()
    clock.ms += 60_000  # the last request's clicks due
    _until(lambda: (sim.emit_due_clicks(), len(sinks.made) == 2 and not sim.clicks)[1])
    sim.close()
    clicks = [decode_click(r.value) for r in sinks.log.read(sinks.log.partitions("c")[0], 0, 100_000)]
    assert len(clicks) == sum(a.clicks for a in sim.stats.arms.values()) == sim.stats.clicks_sent


def test_a_sink_made_after_close_is_closed_and_not_used():
    sinks = _SlowSecondSink()
    sim, _ = _through_an_outage(sinks)
    sim.close()  # the clicks still wait: counted as pending, not lost unseen
    assert sim.stats.clicks_pending_at_end > 0
    sinks.release.set()
    _until(lambda: len(sinks.made) == 2 and sinks.made[1].closed)
    assert not sinks.made[1].held


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_stop_ends_the_run_while_a_request_thread_waits_for_a_broker_that_is_down(concurrency):
    # The first click producer waits for the broker (kafka-python: up to 30 s): the run, and `reloop
    # simulate` with it, ignored the stop (and every signal after it) until that wait gave up.
    released = threading.Event()

    def waits_for_the_broker(arm):
        released.wait(60)
        raise ConnectionError("no broker")

    world = World(WorldConfig(seed=0, delay_median_s=0.001, delay_sigma=0.1))
    clock = FakeClock()
    sim = Simulator(world=world, score=_ranker(world, clock, oracle=False), click_sink=waits_for_the_broker)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    try:
        began = time.monotonic()
        sim.run(rate=100.0, duration_s=60.0, stop=stop, concurrency=concurrency)
        sim.close()
        assert time.monotonic() - began < 0.5 + 2 * Simulator.STOP_GRACE_S + 2
        clicks = sum(a.clicks for a in sim.stats.arms.values())
        # every click drawn is accounted for: none sent, the stuck thread's as pending too
        assert clicks > 0 and sim.stats.clicks_sent == 0 and sim.stats.clicks_pending_at_end == clicks
    finally:
        released.set()
