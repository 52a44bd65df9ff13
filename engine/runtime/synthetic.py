"""A generated impression/click log whose joined result is known in advance (tests and benchmarks).

Every impression falls in exactly one case, so the expected samples follow from the case alone:

* ``negative``: no click -> one negative;
* ``positive``: one click inside the window -> one positive;
* ``multi``: 2-3 clicks inside the window -> one positive;
* ``duplicate``: the impression record is sent twice (and clicked or not) -> counted once;
* ``early``: the impression reaches the log late (partition skew) after its in-window click -> one positive;
* ``beyond``: one click after the window -> a negative, plus a correction positive under ``correct``.

Orphan clicks (no impression ever) and malformed records (dead letters) are mixed in. Record timestamps
are arrival times (what the broker stamps); event times live in the payload. A final far-future impression
(the *sentinel*) pushes the event-time watermark past every window, so all windows close without any
wall-clock idleness; the sentinel itself stays pending.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from reloop.engine.events.codec import encode
from reloop.engine.events.schema import Click, Impression

SPEC = {
    "fields": [
        {"kind": "categorical", "name": "user", "buckets": 500},
        {"kind": "categorical", "name": "item", "buckets": 500},
        {"kind": "categorical", "name": "ctx", "buckets": 20},
    ]
}


@dataclass(frozen=True, slots=True)
class LogRecord:
    topic_kind: str  # "impression" or "click"
    key: bytes
    value: bytes
    timestamp_ms: int


@dataclass
class SyntheticLog:
    records: list[LogRecord]  # in arrival order
    expected: dict[tuple[str, bool], int]  # (sample_id, is_correction) -> label, for the given policy
    cases: Counter = field(default_factory=Counter)
    orphans: int = 0
    malformed: int = 0
    sentinel_id: str = ""

    def topic_records(self, kind: str) -> list[LogRecord]:
        return [r for r in self.records if r.topic_kind == kind]

    def label_counts(self) -> dict[str, int]:
        c = Counter()
        for (_, corr), label in self.expected.items():
            c["correction" if corr else f"label_{label}"] += 1
        return dict(c)

    def with_features(self, change: Callable[[str, dict[str, Any]], bool]) -> SyntheticLog:
        """This log with the features of its impressions changed by ``change(impression_id, features)``,
        which edits them in place and says whether it did (hostile values for tests; the sentinel and
        the malformed records stay as they are)."""
        records = []
        for r in self.records:
            if r.topic_kind == "impression" and r.key != self.sentinel_id.encode():
                try:
                    obj = orjson.loads(r.value)
                except orjson.JSONDecodeError:
                    obj = None
                features = obj.get("features") if isinstance(obj, dict) else None
                if isinstance(features, dict) and change(obj.get("impression_id"), features):
                    r = replace(r, value=orjson.dumps(obj))
            records.append(r)
        return replace(self, records=records)


def generate(
    n_impressions: int,
    *,
    seed: int = 0,
    window_ms: int = 2_000,
    lateness_ms: int = 200,
    grace_ms: int = 1_000,
    step_ms: int = 10,
    policy: str = "correct",
    start_ms: int = 1_700_000_000_000,
    orphan_rate: float = 0.02,
    malformed_rate: float = 0.01,
    pad_to_multiple: int = 1,
) -> SyntheticLog:
    """``pad_to_multiple``: add plain negatives until the number of expected samples is a multiple of it
    (a run then ends with no partial batch, so every sample is trained)."""
    if lateness_ms + step_ms * 4 >= grace_ms or grace_ms >= window_ms:
        raise ValueError("need lateness << grace < window for unambiguous cases")
    rng = random.Random(seed)
    pending: list[tuple[int, LogRecord]] = []  # (arrival, record)
    expected: dict[tuple[str, bool], int] = {}
    cases: Counter = Counter()
    t = start_ms
    seq = 0

    def impression(iid: str, ev_t: int) -> bytes:
        return encode(
            Impression(
                impression_id=iid,
                request_id=f"r{iid}",
                user_id=f"u{rng.randrange(200)}",
                item_id=f"it{rng.randrange(300)}",
                features={
                    "user": f"u{rng.randrange(200)}",
                    "item": f"it{rng.randrange(300)}",
                    "ctx": rng.randrange(10),
                },
                event_time_ms=ev_t,
                served_prediction=round(rng.uniform(0.01, 0.5), 6),
                model_version=0,
            )
        )

    def add(kind: str, key: str, value: bytes, arrival: int) -> None:
        nonlocal seq
        seq += 1
        pending.append((arrival * 1_000_000 + seq, LogRecord(kind, key.encode(), value, arrival)))

    def click(iid: str, ev_t: int) -> None:
        add("click", iid, encode(Click(impression_id=iid, event_time_ms=ev_t)), ev_t)

    kinds = ["negative", "positive", "multi", "duplicate", "early", "beyond"]
    weights = [0.45, 0.2, 0.08, 0.07, 0.1, 0.1]
    i = 0
    while True:
        n_samples = len(expected)
        if i >= n_impressions and n_samples % pad_to_multiple == 0:
            break
        iid = f"imp{i:07d}"
        case = rng.choices(kinds, weights)[0] if i < n_impressions else "negative"
        cases[case] += 1
        payload = impression(iid, t)
        if case == "early":
            # The impression arrives half a grace period late; its click arrives on time, before it.
            add("impression", iid, payload, t + grace_ms // 2)
            click(iid, t + rng.randint(1, lateness_ms))
            expected[(iid, False)] = 1
        else:
            add("impression", iid, payload, t)
            if case == "duplicate":
                add("impression", iid, payload, t + rng.randint(1, 5 * step_ms))
                if rng.random() < 0.5:
                    click(iid, t + rng.randint(1, int(window_ms * 0.8)))
                    expected[(iid, False)] = 1
                else:
                    expected[(iid, False)] = 0
            elif case == "negative":
                expected[(iid, False)] = 0
            elif case == "positive":
                click(iid, t + rng.randint(1, int(window_ms * 0.8)))
                expected[(iid, False)] = 1
            elif case == "multi":
                for _ in range(rng.randint(2, 3)):
                    click(iid, t + rng.randint(1, int(window_ms * 0.8)))
                expected[(iid, False)] = 1
            elif case == "beyond":
                click(iid, t + window_ms + rng.randint(lateness_ms + 1, window_ms))
                expected[(iid, False)] = 0
                if policy == "correct":
                    expected[(iid, True)] = 1
        i += 1
        t += step_ms
    orphans = malformed = 0
    for k in range(int(n_impressions * orphan_rate)):
        orphans += 1
        click(f"ghost{k:06d}", start_ms + rng.randrange(max(1, t - start_ms)))
    for k in range(int(n_impressions * malformed_rate)):
        malformed += 1
        arrival = start_ms + rng.randrange(max(1, t - start_ms))
        bad = rng.choice([b"{not json", b'{"impression_id": 5}', b'{"impression_id":"x","event_time_ms":-1}'])
        add(rng.choice(["impression", "click"]), f"bad{k}", bad, arrival)
    sentinel = "sentinel"
    add("impression", sentinel, impression(sentinel, t + 100 * window_ms), t + 100 * window_ms)
    pending.sort(key=lambda x: x[0])
    return SyntheticLog(
        records=[r for _, r in pending],
        expected=expected,
        cases=cases,
        orphans=orphans,
        malformed=malformed,
        sentinel_id=sentinel,
    )
