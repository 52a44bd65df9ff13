"""docs/observability.md names the online metrics' methods: each must exist (it named snapshot() and
restore() on OnlineMetricsBook, which has state_dict() and from_state_dict())."""

from __future__ import annotations

import re
from pathlib import Path

from reloop.engine.metrics import online, rolling_batch

DOC = Path(__file__).resolve().parents[3] / "docs" / "observability.md"
CLASSES = {
    "RollingBinaryMetrics": online.RollingBinaryMetrics,
    "BatchRollingMetrics": rolling_batch.BatchRollingMetrics,
    "OnlineMetricsBook": online.OnlineMetricsBook,
}


def test_the_methods_the_online_metrics_section_names_exist():
    section = DOC.read_text().split("## Online metrics", 1)[1].split("\n## ", 1)[0]
    bullets = re.split(r"\n\* ", section)
    checked = 0
    for bullet in bullets:
        head = re.match(r"`(\w+)\(", bullet)
        if head is None or head.group(1) not in CLASSES:
            continue
        cls = CLASSES[head.group(1)]
        for name in re.findall(r"`(\w+)\(", bullet)[1:]:
            if name not in CLASSES and name != "LabeledSample":
                assert hasattr(cls, name), f"docs/observability.md: {cls.__name__}.{name} does not exist"
                checked += 1
    assert checked >= 10
