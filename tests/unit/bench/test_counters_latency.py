"""bench/counters_latency.py: both arms serve the same requests; the report names them and the ratio."""

from __future__ import annotations

import re

from reloop.bench import counters_latency


def test_the_report_times_both_arms_and_the_feed(tmp_path, capsys) -> None:
    out = tmp_path / "report.md"
    assert counters_latency.main(["--out", str(out), "--requests", "5", "--candidates", "12"]) == 0
    text = out.read_text()
    assert text == capsys.readouterr().out
    rows = {m[0]: float(m[1]) for m in re.findall(r"\| (counters o[^|(]*?)(?: \(.*\))? \| ([\d.]+) \|", text)}
    assert set(rows) == {"counters off", "counters on", "counters on, shown_from: impressions"}, rows
    assert all(v > 0 for v in rows.values())
    assert re.search(r"throughput on / off: \d+\.\d\dx", text)
    assert re.search(r"batches of 60, half clicks.*: [\d,]+ samples/s", text)
    # 5 requests (+200 warm-up) of 10 shown: the feed counted all 2,050 the "on" arm served
    assert re.search(r"; 2,050 impressions the 'on' arm served.*\): [\d,]+ impressions/s", text), text


def test_a_cross_with_the_multi_valued_field_is_served_too(capsys) -> None:
    assert (
        counters_latency.main(["--requests", "3", "--candidates", "12", "--counters", "f0,f4,f0*tags"]) == 0
    )
    text = capsys.readouterr().out
    assert "counters of f0, f4, f0*tags" in text and "(12 dense inputs)" in text
    assert re.search(r"\| counters on \(arms\[\]\.counters\) \| [\d.]+ \|", text)
