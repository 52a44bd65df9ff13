"""``fetched_ends`` of the confluent-kafka sources: librdkafka's cached high watermarks, None while any
assigned partition has had no fetch response (the caller then asks the broker)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException
from reloop.connectors.confluent.source import fetched_ends
from reloop.engine.streams import TopicPartition

A, B = TopicPartition("t", 0), TopicPartition("t", 1)


class _Cached:
    """A consumer whose cached watermarks are ``highs`` (librdkafka: -1001 before a fetch response)."""

    def __init__(self, highs: dict[int, int | None]) -> None:
        self.highs = highs
        self.cached: list[bool] = []

    def get_watermark_offsets(self, partition, cached: bool = False, timeout: float | None = None):
        self.cached.append(cached)
        high = self.highs[partition.partition]
        if high is None:
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION))
        return 0, high


def test_the_ends_are_the_cached_watermarks_once_every_partition_has_one() -> None:
    consumer = _Cached({0: 30, 1: 0})
    assert fetched_ends(consumer, [A, B]) == {A: 30, B: 0}
    assert consumer.cached == [True, True]  # never a request to the broker


@pytest.mark.parametrize("highs", [{0: 30, 1: -1001}, {0: -1001, 1: -1001}, {0: 30, 1: None}])
def test_a_partition_without_a_fetch_response_makes_the_ends_unknown(highs) -> None:
    assert fetched_ends(_Cached(highs), [A, B]) is None
