"""Small generated fixtures in each dataset's on-disk format (never the real data)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def movielens_dir(tmp_path: Path) -> Path:
    """6 ratings, deliberately not in time order, plus user and item side files."""
    d = tmp_path / "ml"
    d.mkdir()
    (d / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        "1\t10\t5\t300\n"
        "2\t11\t3\t100\n"
        "1\t11\t4\t200\n"
        "3\t12\t1\t100\n"
        "2\t10\t2\t400\n"
        "3\t10\t4\t50\n"
    )
    (d / "ml-100k.user").write_text(
        "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
        "1\t24\tM\ttechnician\t85711\n2\t53\tF\tother\t94043\n3\t23\tM\twriter\t32067\n"
    )
    (d / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
        "10\tToy Story\t1995\tAnimation Children's Comedy\n11\tGoldenEye\t1995\tAction\n12\tFour Rooms\t\t\n"
    )
    return d


FRAPPE_HEADER = "user\titem\tcnt\tdaytime\tweekday\tisweekend\thomework\tcost\tweather\tcountry\tcity\n"


@pytest.fixture
def frappe_csv(tmp_path: Path) -> Path:
    """3 users, 12 items; user 0 used items 0..3, so its negatives must come from 4..11."""
    lines = [FRAPPE_HEADER]
    ctx = [
        "morning\tsunday\tweekend\tunknown\tfree\tsunny\tSpain\t0",
        "evening\tmonday\tworkday\thome\tpaid\tcloudy\tItaly\t3",
    ]
    for i in range(4):
        lines.append(f"0\t{i}\t{i + 1}\t{ctx[i % 2]}\n")
    for i in range(4, 12):
        lines.append(f"{1 + i % 2}\t{i}\t1\t{ctx[i % 2]}\n")
    path = tmp_path / "frappe.csv"
    path.write_text("".join(lines))
    return path


CRITEO_ROWS = [
    ["1", "5", "", "3", *[str(i) for i in range(10)], *[f"c{i:02d}" for i in range(26)]],
    ["0", *[""] * 13, *([""] * 25 + ["zz"])],
    ["0", "0", "1", "2", *["7"] * 10, *["ab"] * 26],
]


@pytest.fixture
def criteo_files(tmp_path: Path) -> tuple[Path, Path]:
    """The same three rows as a raw Kaggle TSV and as a CSV with header."""
    tsv = tmp_path / "train.txt"
    tsv.write_text("".join("\t".join(r) + "\n" for r in CRITEO_ROWS))
    header = ",".join(["label", *[f"I{i}" for i in range(1, 14)], *[f"C{i}" for i in range(1, 27)]])
    csv = tmp_path / "criteo.csv"
    csv.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in CRITEO_ROWS))
    return tsv, csv


AVAZU_HEADER = (
    "id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,device_id,"
    "device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21"
)


def avazu_line(row_id: str, click: int, hour: str, site: str = "s1", device: str = "d1") -> str:
    tail = "ip1,m1,1,0,15704,320,50,1722,0,35,-1,79"
    return f"{row_id},{click},{hour},1005,0,{site},sd,sc,app1,ad,ac,{device},{tail}"


@pytest.fixture
def avazu_csv(tmp_path: Path) -> Path:
    path = tmp_path / "avazu.csv"
    lines = [
        AVAZU_HEADER,
        avazu_line("a", 0, "14102101"),
        avazu_line("b", 1, "14102100"),
        avazu_line("c", 0, "14102101", site="85f751fd", device="a99f214a"),
        avazu_line("d", 1, "14102100"),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
