"""The CPUs a process may use: its affinity, capped by its cgroup's CPU quota.

torch takes one intra-op thread per CPU the process may run on (its affinity), and knows nothing of a
CFS quota: a container limited to 2 CPUs on a 64-core node (Kubernetes ``resources.limits.cpu: 2``,
``docker run --cpus 2``) trains with 64 threads that share 2 CPUs' time, and the kernel throttles the
whole process every period once they have used it. The quota is the cgroup's ``cpu.max`` (v2:
``"<quota> <period>"`` or ``"max <period>"``) or ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (v1; -1
is none), at the process's own cgroup and every ancestor visible from it (the tightest wins). A quota
of 1.5 CPUs gives 1 thread, as Go's automaxprocs rounds: a thread per whole CPU, never none.

Anything that cannot be read (no cgroup file system, a file of another shape) is no limit: this tunes a
default and must never stop a start.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> float | None:
    """CPUs the process's cgroup quota allows (quota / period, the tightest over its cgroup and its
    ancestors), or None when there is no quota or it cannot be read."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[float] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2: one unified hierarchy
            limits += _levels(root, path, _v2_limit)
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's hierarchy
            for mount in (controllers, "cpu,cpuacct", "cpu"):
                if (root / mount).is_dir():
                    limits += _levels(root / mount, path, _v1_limit)
                    break
    return min(limits) if limits else None


def usable_cpus(root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> int:
    """The CPUs this process may run on, capped by its cgroup's quota (whole CPUs, at least one)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root, self_cgroup)
    if limit is not None:
        cpus = min(cpus, math.floor(limit))
    return max(1, cpus)


def _levels(base: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The limits ``read`` finds at ``base``/``path`` and at each of its parents up to ``base`` (inside a
    container's cgroup namespace the path is "/" and its limit sits at ``base`` itself)."""
    found: list[float] = []
    here = (base / path.lstrip("/")).resolve()
    top = base.resolve()
    while True:
        limit = read(here)
        if limit is not None:
            found.append(limit)
        if here == top or top not in here.parents:
            return found
        here = here.parent


def _v2_limit(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()
        return None if quota == "max" else _ratio(int(quota), int(period))
    except (OSError, ValueError):
        return None


def _v1_limit(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _ratio(quota, period)


def _ratio(quota: int, period: int) -> float | None:
    return quota / period if quota > 0 and period > 0 else None
