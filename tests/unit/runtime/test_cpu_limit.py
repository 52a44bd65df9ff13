"""The CPUs a process may use: its affinity capped by its cgroup's CPU quota, which torch does not read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from reloop.engine.runtime import build
from reloop.engine.runtime.config import load_config_dict
from reloop.engine.runtime.cpu_limit import cgroup_cpu_limit, usable_cpus
from reloop.engine.runtime.synthetic import SPEC


def _tree(tmp_path: Path, self_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup holding ``files`` and a fake /proc/self/cgroup reading ``self_cgroup``."""
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    own = tmp_path / "self_cgroup"
    own.write_text(self_cgroup)
    return root, own


@pytest.mark.parametrize(
    ("cpu_max", "limit"),
    [("200000 100000\n", 2.0), ("150000 100000\n", 1.5), ("max 100000\n", None), ("garbage\n", None)],
)
def test_v2_quota_inside_a_container(tmp_path, cpu_max, limit):
    """Kubernetes' limits.cpu in the container's own cgroup namespace: the path is "/"."""
    root, own = _tree(tmp_path, "0::/\n", {"cpu.max": cpu_max})
    assert cgroup_cpu_limit(root, own) == limit


def test_v2_the_tightest_of_the_cgroup_and_its_ancestors_wins(tmp_path):
    files = {"kubepods/cpu.max": "400000 100000", "kubepods/pod1/cpu.max": "max 100000",
             "kubepods/pod1/ctr/cpu.max": "300000 100000", "other/cpu.max": "50000 100000"}  # fmt: skip
    root, own = _tree(tmp_path, "0::/kubepods/pod1/ctr\n", files)
    assert cgroup_cpu_limit(root, own) == 3.0
    root2, own2 = _tree(tmp_path / "b", "0::/kubepods/pod1\n", files)
    assert cgroup_cpu_limit(root2, own2) == 4.0  # its sibling "ctr" and "other" are not its ancestors


@pytest.mark.parametrize(("quota", "limit"), [("250000", 2.5), ("-1", None)])
def test_v1_cfs_quota(tmp_path, quota, limit):
    cgroup = "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n1:name=systemd:/\n"
    files = {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": quota,
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
    }
    root, own = _tree(tmp_path, cgroup, files)
    assert cgroup_cpu_limit(root, own) == limit


def test_nothing_readable_is_no_limit(tmp_path):
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "none") is None
    root, own = _tree(tmp_path, "0::/\n", {})
    assert cgroup_cpu_limit(root, own) is None


def test_usable_cpus_are_whole_cpus_within_the_affinity(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    root, own = _tree(tmp_path, "0::/\n", {"cpu.max": "150000 100000"})
    assert usable_cpus(root, own) == 1  # 1.5 CPUs: one thread, as automaxprocs rounds
    root, own = _tree(tmp_path / "b", "0::/\n", {"cpu.max": "50000 100000"})
    assert usable_cpus(root, own) == 1  # never none
    root, own = _tree(tmp_path / "c", "0::/\n", {"cpu.max": f"{(affinity + 8) * 100000} 100000"})
    assert usable_cpus(root, own) == affinity  # a quota above the affinity: the affinity


def _cfg(**train: object):
    return load_config_dict({"model": {"backbone": "dcn", "spec": SPEC}, "train": train}, env={})


@pytest.fixture
def torch_on_64_cores_with_a_quota_of_4(monkeypatch):
    """torch's default of 64 threads (one per core of the node) in a container limited to 4 CPUs."""
    state = {"threads": 64, "set": []}

    def set_threads(n: int) -> None:
        state["set"].append(n)
        state["threads"] = n

    monkeypatch.setattr(build.torch, "get_num_threads", lambda: state["threads"])
    monkeypatch.setattr(build.torch, "set_num_threads", set_threads)
    monkeypatch.setattr(build, "usable_cpus", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return state


def test_the_train_stage_takes_no_more_threads_than_its_quota(torch_on_64_cores_with_a_quota_of_4):
    build.apply_torch_settings(_cfg())
    assert torch_on_64_cores_with_a_quota_of_4["set"] == [4]


def test_beside_a_join_process_one_less_than_the_quota(torch_on_64_cores_with_a_quota_of_4):
    """`reloop run`'s train process: the quota less the join process's core, and building the stage
    afterwards leaves that alone."""
    cfg = _cfg()
    assert build.leave_a_core_to_join(cfg) == 3
    build.apply_torch_settings(cfg)
    assert torch_on_64_cores_with_a_quota_of_4["set"] == [3]


@pytest.mark.parametrize("train", [{"threads": 16}, {"deterministic": True}])
def test_threads_the_config_sets_win_over_the_quota(torch_on_64_cores_with_a_quota_of_4, train, monkeypatch):
    monkeypatch.setattr(build.torch, "use_deterministic_algorithms", lambda on: None)
    build.apply_torch_settings(_cfg(**train))
    assert torch_on_64_cores_with_a_quota_of_4["set"] == [train.get("threads", 1)]


def test_omp_num_threads_wins_over_the_quota(torch_on_64_cores_with_a_quota_of_4, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    build.apply_torch_settings(_cfg())
    assert torch_on_64_cores_with_a_quota_of_4["set"] == []


def _writable_cpu_cgroup(name: str) -> Path | None:
    """A new cgroup with the cpu controller (v1's cpu hierarchy, or v2's unified one), where this process
    may make one (root in a container with its cgroups writable); None elsewhere."""
    for parent, quota in (
        (Path("/sys/fs/cgroup/cpu"), "cpu.cfs_quota_us"),
        (Path("/sys/fs/cgroup"), "cpu.max"),
    ):
        folder = parent / name
        try:
            folder.mkdir()
        except OSError:
            continue
        if (folder / quota).exists():
            return folder
        folder.rmdir()
    return None


def test_a_real_cgroup_quota_lowers_torchs_threads():
    """The kernel's own files: a process moved into a cgroup of 1.5 CPUs trains with one torch thread."""
    folder = _writable_cpu_cgroup(f"reloop-test-{os.getpid()}")
    if folder is None:
        pytest.skip("no writable cgroup with the cpu controller here (needs root and writable cgroups)")
    script = (
        "import torch; from reloop.engine.runtime.build import apply_torch_settings; "
        "from reloop.engine.runtime.config import load_config_dict; "
        "from reloop.engine.runtime.synthetic import SPEC; "
        "from reloop.engine.runtime.cpu_limit import cgroup_cpu_limit; "
        "apply_torch_settings(load_config_dict({'model': {'backbone': 'dcn', 'spec': SPEC}}, env={})); "
        "print(cgroup_cpu_limit(), torch.get_num_threads())"
    )
    try:
        if (folder / "cpu.max").exists():
            (folder / "cpu.max").write_text("150000 100000")
        else:
            (folder / "cpu.cfs_quota_us").write_text("150000")
            (folder / "cpu.cfs_period_us").write_text("100000")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELOOP__") and k != "OMP_NUM_THREADS"}
        shell = f'echo $$ > {folder / "cgroup.procs"} || exit 77; exec "$0" -c "$1"'
        out = subprocess.run(
            ["sh", "-c", shell, sys.executable, script], env=env, capture_output=True, text=True, timeout=120
        )
        if out.returncode == 77:
            pytest.skip(f"this process may not move into {folder}")
        assert out.returncode == 0, out.stderr[-2000:]
        limit, threads = out.stdout.split()
        assert float(limit) == 1.5
        assert int(threads) == 1
    finally:
        folder.rmdir()
