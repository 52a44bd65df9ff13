"""A dataset's rows with the click-counter inputs a serving arm would have logged with each impression.

``reloop serve`` with ``arms[].counters`` writes each impression's counter values into its features, and
the trainer learns from them as served (``model.counters``). A dataset replay has no service, so the
values are made here, as such an arm would have served them: every impression of an earlier time
counted, and every click that had arrived (its row's ``click_time_ms``, else its time plus the replay's
click delay) before that time; never a row's own label, nor one of its own time (one request's
candidates are scored together). The service counts a click when the joiner emits it, a moment after
it arrives: here it is counted at its arrival.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
from reloop.connectors.files.datasets.base import DatasetRow
from reloop.connectors.files.datasets.delay import ClickDelay
from reloop.connectors.files.datasets.events import click_time_ms
from reloop.engine.features.counters import ClickCounters, CounterSettings, counter_field_names
from reloop.engine.features.featurizer import Featurizer
from reloop.engine.features.spec import FeatureSpec
from reloop.engine.features.streamed_counters import streamed_counter_values


def with_served_counters(
    rows: Iterable[DatasetRow], spec: FeatureSpec, settings: CounterSettings, delay: ClickDelay
) -> list[DatasetRow]:
    """``rows`` (in time order; all read here) with their counter inputs added to their features, under
    the names ``model.counters`` appends to ``spec``. CounterError: a counted field ``spec`` lacks."""
    rows = list(rows)
    counters = ClickCounters(spec, settings.fields, settings.prior_strength, settings.windows_s)
    if not rows:
        return rows
    batch = Featurizer(spec).transform([r.features for r in rows])
    labels = np.fromiter((r.label for r in rows), dtype=np.int64, count=len(rows))
    times = np.fromiter((r.event_time_ms for r in rows), dtype=np.int64, count=len(rows))
    arrived = np.array(
        [click_time_ms(r, delay) if r.label else r.event_time_ms for r in rows], dtype=np.int64
    )
    values = streamed_counter_values(counters, batch, labels, times, arrived)
    names = counter_field_names(settings.fields, settings.windows_s)
    return [
        dataclasses.replace(row, features={**row.features, **dict(zip(names, v.tolist(), strict=True))})
        for row, v in zip(rows, values, strict=True)
    ]
