import os
import subprocess
import sys
from pathlib import Path

import pytest
from reloop.connectors.files.datasets import DatasetError, FrappeLibFM, FrappeRaw
from reloop.connectors.files.datasets.base import PSEUDO_TIME_ORIGIN_MS


def test_two_negatives_per_positive_with_same_context_and_unused_items(frappe_csv: Path) -> None:
    rows = list(FrappeRaw(frappe_csv, seed=3).rows())
    assert len(rows) == 12 * 3
    used: dict[str, set[str]] = {}
    for r in rows:
        if r.label:
            used.setdefault(r.user_id, set()).add(r.item_id)
    for start in range(0, len(rows), 3):
        pos, *negs = rows[start : start + 3]
        assert pos.label == 1 and [n.label for n in negs] == [0, 0]
        assert len({pos.request_id, *(n.request_id for n in negs)}) == 1
        assert len({n.item_id for n in negs}) == 2
        for n in negs:
            assert n.item_id not in used[pos.user_id]
            ctx = {k: v for k, v in n.features.items() if k != "item"}
            assert ctx == {k: v for k, v in pos.features.items() if k != "item"}
            assert n.features["item"] == n.item_id
        assert "cnt" not in pos.features


def test_pseudo_time_is_file_order_and_seed_decides_the_negatives(frappe_csv: Path) -> None:
    ds = FrappeRaw(frappe_csv, seed=3, step_ms=10)
    assert ds.time_kind == "pseudo"
    rows = list(ds.rows())
    assert [r.event_time_ms for r in rows[::3]] == [PSEUDO_TIME_ORIGIN_MS + 10 * i for i in range(12)]
    assert [r.item_id for r in rows[::3]] == [str(i) for i in range(12)]
    again = list(FrappeRaw(frappe_csv, seed=3).rows())
    assert [r.item_id for r in again] == [r.item_id for r in rows]
    other = [list(FrappeRaw(frappe_csv, seed=s).rows()) for s in range(4, 8)]
    assert any([r.item_id for r in o] != [r.item_id for r in rows] for o in other)


def test_more_negatives_than_free_items_fails(frappe_csv: Path) -> None:
    with pytest.raises(DatasetError, match="cannot sample"):
        list(FrappeRaw(frappe_csv, negatives=9).rows())


def test_libfm_labels_and_fields(tmp_path: Path) -> None:
    a = tmp_path / "a.libfm"
    a.write_text("1 3:1 960:1 5039:1 5046:1 5053:1 5055:1 5058:1 5060:1 5069:1 5149:1\n")
    b = tmp_path / "b.libfm"
    b.write_text("-1 4:1 961:1 5040:1 5047:1 5054:1 5056:1 5059:1 5061:1 5070:1 5150:1\n")
    rows = list(FrappeLibFM([a, b]).rows())
    assert [r.label for r in rows] == [1, 0]
    assert rows[0].features["user"] == "3" and rows[1].features["city"] == "5150"
    assert rows[0].event_time_ms < rows[1].event_time_ms
    b.write_text("-1 4:1 961:1\n")
    with pytest.raises(DatasetError, match="b.libfm:1"):
        list(FrappeLibFM([b]).rows())


def test_libfm_without_rows_is_refused(tmp_path: Path) -> None:
    """Empty .libfm files, or a folder without any, gave zero rows in silence."""
    from reloop.connectors.files.datasets import open_dataset

    empty = tmp_path / "empty.libfm"
    empty.write_text("")
    with pytest.raises(DatasetError, match="empty.libfm: no rows"):
        list(FrappeLibFM([empty]).rows())
    folder = tmp_path / "none"
    folder.mkdir()
    with pytest.raises(DatasetError, match="no \\*.libfm file"):
        open_dataset("frappe-libfm", folder)


def test_a_utf8_bom_is_not_part_of_the_first_column(tmp_path: Path, frappe_csv: Path) -> None:
    bom = tmp_path / "bom" / "frappe.csv"  # '\ufeffuser': "header lacks columns ['user']"
    bom.parent.mkdir()
    bom.write_text(frappe_csv.read_text(), encoding="utf-8-sig")
    assert [r.features for r in FrappeRaw(bom).rows()] == [r.features for r in FrappeRaw(frappe_csv).rows()]
    libfm = tmp_path / "a.libfm"  # the first label '\ufeff1'
    libfm.write_text(
        "1 3:1 960:1 5039:1 5046:1 5053:1 5055:1 5058:1 5060:1 5069:1 5149:1\n", encoding="utf-8-sig"
    )
    assert [r.label for r in FrappeLibFM([libfm]).rows()] == [1]


def test_a_repeated_header_is_refused(tmp_path: Path, frappe_csv: Path) -> None:
    joined = tmp_path / "joined" / "frappe.csv"  # two files joined: user 'user' used item 'item'
    joined.parent.mkdir()
    text = frappe_csv.read_text()
    joined.write_text(text + text)
    with pytest.raises(DatasetError, match=r"frappe\.csv:14: the header again"):
        list(FrappeRaw(joined).rows())


def test_a_header_alone_is_refused(frappe_csv: Path) -> None:
    frappe_csv.write_text(frappe_csv.read_text().splitlines()[0] + "\n")  # zero rows: a replay exited 0
    with pytest.raises(DatasetError, match=r"frappe\.csv: no rows"):
        list(FrappeRaw(frappe_csv).rows())


@pytest.mark.parametrize("negatives", [-1, 0])
def test_negatives_below_one_are_refused(frappe_csv: Path, negatives: int) -> None:
    # -1 ran as 0; 0 leaves a stream of positives alone (every label 1: nothing to learn or evaluate).
    with pytest.raises(DatasetError, match=rf"negatives must be an int >= 1, got {negatives}"):
        FrappeRaw(frappe_csv, negatives=negatives)


_NEGATIVES_SCRIPT = """
import sys
from reloop.connectors.files.datasets import FrappeRaw
print([r.item_id for r in FrappeRaw(sys.argv[1], seed=0).rows() if r.label == 0])
"""


def test_a_seed_gives_the_same_negatives_in_every_process(tmp_path: Path) -> None:
    """Item ids that read as the same number ("1", "01") must not leave the candidates' order to the
    order of a set of str, which Python's per-process hash seed decides."""
    header = "user\titem\tcnt\tdaytime\tweekday\tisweekend\thomework\tcost\tweather\tcountry\tcity\n"
    ctx = "morning\tsunday\tweekend\tunknown\tfree\tsunny\tSpain\t0"
    items = ["1", "01", "001", "0001", "2", "3", "x", "²"]  # "²".isdigit() but int("²") fails
    lines = [f"{u}\t{item}\t1\t{ctx}\n" for u, item in enumerate(items)]
    path = tmp_path / "frappe.csv"
    path.write_text(header + "".join(lines))
    outputs = set()
    for hash_seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", _NEGATIVES_SCRIPT, str(path)],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outputs.add(done.stdout)
    assert len(outputs) == 1, outputs
