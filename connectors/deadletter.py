"""The dead-letter sink now lives in the engine (engine/deadletter.py); re-exported here for code written
against the old place."""

from reloop.engine.deadletter import DeadLetterSink, decode_raw  # noqa: F401
