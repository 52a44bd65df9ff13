"""Figure 3: kafka-python vs confluent-kafka, produce and consume on the local broker.

The measurement is the Kafka engineer's ``reloop.bench.kafka_clients.run`` (both clients alternating round by
round in one process, ~850-byte orjson-encoded impressions, 3 partitions); this module turns its rates
into rows and writes down which client the engine uses and why.
"""

from __future__ import annotations

import statistics

from reloop.bench.suite import Context, Figure, Row
from reloop.bench.suite_broker import local_broker

COMMAND = "python -m reloop.bench --only kafka"
TITLE = "3. Kafka clients: kafka-python vs confluent-kafka"


def run(ctx: Context) -> Figure:
    from reloop.bench import kafka_clients as kc

    records = ctx.pick(30_000, 5_000)
    rounds = min(ctx.rounds, 3)
    with local_broker() as bootstrap:
        rates = kc.run(bootstrap, records, rounds)
    base, other = kc.CLIENTS[0].name, kc.CLIENTS[1].name
    rows = []
    for kind in ("produce", "consume"):
        a, b = rates[other][kind], rates[base][kind]
        rows.append(
            Row(
                figure=f"Kafka {kind}, confluent-kafka",
                value=statistics.median(a),
                unit="records/s",
                baseline_name="kafka-python (our KafkaSink/KafkaSource)",
                baseline_value=statistics.median(b),
                ratio=statistics.median(x / y for x, y in zip(a, b, strict=True)),
                target="engine uses the faster, or says why",
                command=COMMAND,
            )
        )
    avg_bytes = rates["_meta"]["avg_bytes"][0]
    ratio_p, ratio_c = rows[0].ratio or 0.0, rows[1].ratio or 0.0
    kp_consume = statistics.median(rates[base]["consume"])
    per_round = "\n".join(
        f"| {name} | {kind} | " + ", ".join(f"{v:,.0f}" for v in rates[name][kind]) + " |"
        for name in (base, other)
        for kind in ("produce", "consume")
    )
    notes = f"""{records:,} records of {avg_bytes:.0f} bytes on average per run (orjson-encoded `Impression`
events, encoded before timing: the rates are the clients' and the broker's, not the codec's; the codec
alone is in `bench/codec.py`), 3 partitions, producers `acks=all` + idempotent, {rounds} rounds with the
client order alternating. Measured by `reloop.bench.kafka_clients.run`
(details: `python -m reloop.bench.kafka_clients`).

| client | direction | records/s per round |
|---|---|---|
{per_round}

{kc.reading(rates)}

Decision: kafka-python stays the stream processors' default client (pure Python, no native librdkafka to
ship or match to the platform), although confluent-kafka moved records {ratio_c:.1f}x (consume) and
{ratio_p:.1f}x (produce) as fast here. That is sound only while kafka-python's consume rate
({kp_consume:,.0f} records/s here) stays well above the rest of the stream processor's rate: figure 1's
end-to-end samples/s, times ~1.25 records per sample (an impression, plus a click for a quarter of them).
Where it does not, `kafka.client: confluent` runs the same stages on librdkafka (connectors/confluent,
passing the same `tests/contract`)."""
    return Figure(key="kafka", title=TITLE, rows=rows, notes=notes)
