"""The Source/Sink protocols now live in the engine (engine/streams.py): connectors import the engine,
never the reverse. This module re-exports them for code written against the old place."""

from reloop.engine.streams import (  # noqa: F401
    Positions,
    Record,
    RecordTooLarge,
    Sink,
    Source,
    TopicPartition,
    positions_from_json,
    positions_to_json,
)
