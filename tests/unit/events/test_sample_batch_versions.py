"""A samples message of another format (a join stage newer than the train stage, in a rolling upgrade) is
dead-lettered with a detail that says so, and what to do; one without a format is not a samples message."""

from __future__ import annotations

import pyarrow as pa
import pytest
from reloop.engine.events.sample_batch import FORMAT, batch_from_samples, decode_batch, encode_batch
from reloop.engine.events.schema import LabeledSample
from reloop.engine.events.validation import EventError


def _message(format_value: str | None) -> bytes:
    good = encode_batch(
        batch_from_samples([LabeledSample("i1", {"u": "a"}, 1, 0.2, 3, 1000)], task=0, first_seq=0)
    )
    batch = pa.ipc.open_stream(pa.py_buffer(good)).read_next_batch()
    meta = {k: v for k, v in batch.schema.metadata.items() if k != b"reloop.samples.format"}
    if format_value is not None:
        meta[b"reloop.samples.format"] = format_value.encode()
    batch = pa.RecordBatch.from_arrays(batch.columns, schema=batch.schema.with_metadata(meta))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def test_a_message_of_a_newer_format_says_a_newer_join_stage_wrote_it():
    with pytest.raises(EventError) as caught:
        decode_batch(_message(str(FORMAT + 1)))
    assert caught.value.reason == "unknown_schema_version"
    assert f"samples format {FORMAT + 1} " in caught.value.detail and "newer reloop" in caught.value.detail


@pytest.mark.parametrize(
    ("value", "says"),
    # a superscript digit and 5,000 digits are "digits" int() refuses: the detail must not raise
    [
        (None, "not a reloop samples message"),
        ("0", "'0'"),
        ("x", "'x'"),
        ("\u00b2", "\u00b2"),
        ("9" * 5000, "999"),
    ],
)
def test_a_message_without_a_format_or_of_an_older_one_is_refused_as_such(value, says):
    with pytest.raises(EventError) as caught:
        decode_batch(_message(value))
    assert caught.value.reason == "unknown_schema_version" and says in caught.value.detail
    assert "newer" not in caught.value.detail
