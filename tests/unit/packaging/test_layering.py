"""Project rule: the engine imports no Kafka client (kafka-python, confluent-kafka) and no
prometheus_client; connectors/ and the one metrics adapter do. Checked at any depth: a function-level
import counts too (the runtime's wiring reaches the clients through reloop.connectors only)."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[3] / "engine"
FORBIDDEN = {"kafka", "confluent_kafka", "prometheus_client"}


def _top_level_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_the_engine_imports_no_kafka_client_and_no_prometheus_client() -> None:
    files = list(ENGINE.rglob("*.py"))
    assert len(files) > 50  # the scan looked at the engine, not an empty folder
    offenders = {
        str(p.relative_to(ENGINE)): sorted(_top_level_imports(p) & FORBIDDEN)
        for p in files
        if _top_level_imports(p) & FORBIDDEN
    }
    assert offenders == {}


def test_the_scan_sees_a_function_level_import(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from kafka import KafkaProducer\n    import confluent_kafka.admin\n")
    assert _top_level_imports(f) & FORBIDDEN == {"kafka", "confluent_kafka"}
