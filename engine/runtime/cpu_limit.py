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

Also how the OpenMP threads of a process that shares its cores with another busy one wait
(``shared_cores_env``: ``reloop run``'s train process beside its join process).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
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


# libgomp, the OpenMP runtime of torch's PyPI builds, keeps a worker thread spinning for GOMP_SPINCOUNT
# iterations (300,000 by default, 1,000 where it sees more of its own threads than CPUs) after a parallel
# region before it sleeps. Beside a join process that is busy on the same cores, the spinning threads
# take the time slices the join process needs, and a region then waits for a thread whose core the join
# process has: two train threads on 2 cores trained 6,155-7,229 samples/s of a 15,000/s stream, and
# 14,198-14,439 with a spin count of 1,000 (one thread: 14,595-14,705; docs/data-plane.md).
SHARED_CORES_SPINCOUNT = "1000"
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def shared_cores_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` for a process whose torch threads share their cores with another busy process: its
    OpenMP threads sleep soon after each parallel region (GOMP_SPINCOUNT), unless ``environ`` sets how
    they wait (OMP_WAIT_POLICY or GOMP_SPINCOUNT). Read by libgomp when torch loads it: it must be in
    the environment the process starts with."""
    env = dict(environ)
    if not any(name in env for name in WAIT_SETTINGS):
        env["GOMP_SPINCOUNT"] = SHARED_CORES_SPINCOUNT
    return env
