"""The train stage's saved state, split per data-parallel rank, and how a restart picks its share.

One snapshot holds the model once (every rank has the same weights) and, per rank, what only that rank
knows: its positions in the samples topic, the highest seq taken per join task and numbering of the task
(``numberings``: task -> ``[[incarnation, seq], ...]``, the last one taken last; ``taken``: task -> the
last one's seq, all that states from before incarnations hold), the samples taken but not trained yet,
its trainer counters and metric windows, its ledger length. A restart with the same
number of ranks gives rank i exactly rank i's part (deterministic resume). A restart with another
number (a rescale, or one process reading a multi-rank snapshot) regroups the parts by partition:
partition p of the samples topic belongs to rank ``p % M`` (``reloop.engine.streams.PartitionShare``), and a
join task's samples live in the partition of the same number, so positions, seqs and buffered samples
move with their partition and nothing is lost or trained twice. Counters are summed into the new rank 0
where their old rank has no successor, so the global count of trained samples (the period trigger's
input) is preserved.

Format 1 (one train process, before ranks existed) reads as a one-rank state. A format newer than
``STATE_FORMAT`` (a rollback) raises ``NewerFormat``: the stage stops instead of resuming from an older
point. Keys added within a format are read with a default (``numberings``: ``taken`` alone) and written
so that a reader from before them reads what it knows (``taken`` stays the last numbering's seq).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from reloop.engine.checkpoint.registry import check_state_format
from reloop.engine.events.sample_batch import decode_batch
from reloop.engine.streams import PartitionShare, positions_from_json, positions_to_json

STATE_FORMAT = 2

_COUNTERS_SUMMED = "counters"


def rank_parts(state: Mapping[str, Any], meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The per-rank parts of a saved train-stage state (format 1 or 2)."""
    if state.get("format") == 1:
        return [
            {
                "trainer": state["trainer"],
                "served_metrics": state["served_metrics"],
                "buffer": list(state["buffer"]),
                "taken": dict(state["taken"]),
                "event_time_ms": state["event_time_ms"],
                "positions": dict(meta["positions"]),
                "ledger_bytes": int(state["ledger_bytes"]),
            }
        ]
    check_state_format(state, STATE_FORMAT, "train-stage state", oldest=1)
    return [dict(r) for r in state["ranks"]]


def numberings_of(part: Mapping[str, Any]) -> dict[int, dict[str, int]]:
    """A rank part's highest seq per join task and numbering (incarnation), the last one taken last. A
    part saved before incarnations has ``taken`` alone: one unnamed numbering ``""`` per task."""
    saved = part.get("numberings")
    if saved is None:
        return {int(task): {"": int(seq)} for task, seq in part["taken"].items()}
    return {int(task): {str(inc): int(seq) for inc, seq in pairs} for task, pairs in saved.items()}


def numberings_to_state(numberings: Mapping[int, Mapping[str, int]]) -> dict[str, list[list[Any]]]:
    return {str(task): [[inc, seq] for inc, seq in seen.items()] for task, seen in numberings.items()}


def ledger_lengths(state: Mapping[str, Any]) -> dict[int, int]:
    """Rank -> the length its ledger file had at this save, for every rank file ever written (carried
    forward from earlier saves so a smaller restart still truncates the files of ranks it no longer
    runs)."""
    if state.get("format") == 1:
        return {0: int(state["ledger_bytes"])}
    return {int(k): int(v) for k, v in state.get("ledger_lengths", {}).items()}


def share_of(parts: Sequence[Mapping[str, Any]], share: PartitionShare) -> dict[str, Any]:
    """What rank ``share.index`` of ``share.count`` resumes from."""
    if len(parts) == share.count:
        return dict(parts[share.index])
    positions: dict[str, int] = {}
    taken: dict[str, int] = {}
    numberings: dict[int, dict[str, int]] = {}
    buffer: list[bytes] = []
    event_time: int | None = None
    for part in parts:
        for key, offset in positions_from_json(part["positions"]).items():
            if share.owns(key):
                positions.update(positions_to_json({key: offset}))
        for task, seq in part["taken"].items():
            if int(task) % share.count == share.index:
                taken[str(task)] = int(seq)
        for task, seen in numberings_of(part).items():
            if task % share.count == share.index:
                numberings[task] = seen
        buffer += [data for data in part["buffer"] if decode_batch(data).task % share.count == share.index]
        t = part["event_time_ms"]
        if t is not None and (event_time is None or t > event_time):
            event_time = t
    own = parts[share.index] if share.index < len(parts) else None
    trainer = _trainer_share(parts, share, own)
    return {
        "trainer": trainer,
        "served_metrics": own["served_metrics"] if own is not None else None,
        "buffer": buffer,
        "taken": taken,
        "numberings": numberings_to_state(numberings),
        "event_time_ms": event_time,
        "positions": positions,
        "ledger_bytes": None,  # from ledger_lengths: a rank file keeps its own history
    }


def _trainer_share(
    parts: Sequence[Mapping[str, Any]], share: PartitionShare, own: Mapping[str, Any] | None
) -> dict[str, Any]:
    base = dict((own or parts[0])["trainer"])
    counters = dict(base[_COUNTERS_SUMMED])
    if own is None:
        counters = {k: 0 for k in counters}
    if share.index == 0:  # the old ranks without a successor hand their counts to the new rank 0
        for part in parts[share.count :]:
            for k, v in part["trainer"][_COUNTERS_SUMMED].items():
                counters[k] = counters.get(k, 0) + v
    base[_COUNTERS_SUMMED] = counters
    if own is None:  # a new rank starts its metric window empty
        base["progressive"] = {"window_size": 1, "y": [], "p": []}
    return base


def merged_positions(parts: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        out.update(part["positions"])
    return dict(sorted(out.items()))


def merged_taken(parts: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for task, seq in part["taken"].items():
            out[task] = max(out.get(task, -1), int(seq))
    return out


def samples_trained(parts: Sequence[Mapping[str, Any]]) -> int:
    return sum(int(p["trainer"][_COUNTERS_SUMMED]["samples"]) for p in parts)
