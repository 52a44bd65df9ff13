"""bench/report.py: a benchmark's report is printed and, given a path, written there the same."""

from __future__ import annotations

from reloop.bench.report import publish


def test_the_report_is_printed_and_written_alike(tmp_path, capsys) -> None:
    out = tmp_path / "new" / "report.md"
    assert publish(["# Title", "", "| a | b |"], out) == 0
    assert out.read_text() == "# Title\n\n| a | b |\n" == capsys.readouterr().out
    assert publish(["only printed"], None) == 0
    assert capsys.readouterr().out == "only printed\n" and len(list(tmp_path.rglob("*.md"))) == 1
