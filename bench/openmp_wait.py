"""How the train process's OpenMP threads wait, beside its join process: figure 9's whole loop (``reloop
run``, two processes, through a backlog) with the train process at one torch thread and at two under each
given wait setting, alternating round by round with the bare loop at two threads and at one.

libgomp (torch's OpenMP runtime in its PyPI builds) spins a worker thread for ``GOMP_SPINCOUNT``
iterations after each parallel region before it sleeps; ``reloop run`` starts its train process with a
spin count of 1,000 unless the environment says how the threads wait (engine/runtime/cpu_limit.py).
Each setting given here is put in ``reloop run``'s environment for its runs; ``default`` leaves it to
``reloop run``. Per configuration: samples/s per round, the median ratio to the two-thread bare loop, and
the train stage's samples/s while the join stage worked and once it was done (off the progress lines).

Run: ``python -m reloop.bench.openmp_wait --waits default,GOMP_SPINCOUNT=300000 --rounds 3``
(a local broker is started; docs/data-plane.md, "Why two threads did so badly").
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping

from reloop.engine.runtime.cpu_limit import WAIT_SETTINGS

BATCH = 1024


def parse_waits(text: str) -> list[dict[str, str]]:
    """``default`` (nothing added) or ``NAME=VALUE`` (NAME one of OMP_WAIT_POLICY, GOMP_SPINCOUNT), comma-
    separated."""
    waits: list[dict[str, str]] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if item == "default":
            waits.append({})
            continue
        name, sep, value = item.partition("=")
        if not sep or name not in WAIT_SETTINGS or not value:
            raise ValueError(
                f"--waits: {item!r} is neither 'default' nor NAME=VALUE with NAME in {WAIT_SETTINGS}"
            )
        waits.append({name: value})
    if not waits:
        raise ValueError("--waits: give at least one setting")
    return waits


@contextlib.contextmanager
def environment(settings: Mapping[str, str]) -> Iterator[None]:
    """``settings`` in this process's environment (which ``reloop run`` inherits), every wait setting
    not among them removed; the environment as it was afterwards."""
    saved = {name: os.environ.get(name) for name in WAIT_SETTINGS}
    for name in WAIT_SETTINGS:
        os.environ.pop(name, None)
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def label(threads: int, settings: Mapping[str, str]) -> str:
    wait = ", ".join(f"{k}={v}" for k, v in settings.items()) or "reloop run's default"
    return f"{threads} thread{'s' if threads > 1 else ''}, {wait}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waits", default="default,GOMP_SPINCOUNT=300000", help="see the module doc")
    parser.add_argument("--threads", type=int, default=2, help="the train process's threads under --waits")
    parser.add_argument("--impressions", type=int, default=163_840)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    waits = parse_waits(args.waits)
    logging.disable(logging.WARNING)

    import torch
    from reloop.bench import suite_stages as stages
    from reloop.bench.suite import alternate_many, median_ratio
    from reloop.bench.suite_broker import local_broker
    from reloop.bench.suite_e2e import click_labels, fill_topics, make_events
    from reloop.engine.features.spec import criteo_spec

    torch.set_num_threads(1)
    spec = criteo_spec()
    n = 40_960
    imps, clicks = make_events(n)
    labels = click_labels(imps, clicks, n)
    configs = [(1, {})] + [(args.threads, w) for w in waits]
    print(f"load at start {os.getloadavg()}, {os.cpu_count()} cores", flush=True)
    with local_broker() as bootstrap, stages.stage_gc():
        bare = stages._bare("dcn", spec, imps[:n], labels, BATCH)
        raw = fill_topics(bootstrap, *make_events(args.impressions, seed=1))
        target = (args.impressions // BATCH) * BATCH

        def loop(threads: int, settings: dict[str, str]):
            def run() -> float:
                with environment(settings):
                    return stages.whole_loop_rate(
                        bootstrap, raw, spec, target, BATCH, threads=threads, label=label(threads, settings)
                    )

            return run

        bare_loops = [lambda: stages.bare_at(bare, 2), lambda: stages.bare_at(bare, 1)]
        results = alternate_many([loop(t, w) for t, w in configs] + bare_loops, args.rounds)
    base = results[-2]
    print(f"load at end {os.getloadavg()}")
    print("| train process | samples/s per round | ratio to the bare loop, 2 threads | while the join stage "
          "worked | once it was done |")  # fmt: skip
    print("| --- | --- | --- | --- | --- |")
    for (threads, settings), rates in zip(configs, results, strict=False):
        runs = stages.BUSY.get(label(threads, settings), [])[-args.rounds :]
        busy = ", ".join(f"{b:,.0f}" for b, _ in runs if b is not None)
        after = ", ".join(f"{a:,.0f}" for _, a in runs if a is not None)
        per_round = ", ".join(f"{r:,.0f}" for r in rates)
        ratio = median_ratio(rates, base)
        print(f"| {label(threads, settings)} | {per_round} | {ratio:.3f} | {busy} | {after} |")
    for name, rates in (("bare loop, 2 threads", base), ("bare loop, 1 thread", results[-1])):
        print(f"| {name} | {', '.join(f'{r:,.0f}' for r in rates)} | {median_ratio(rates, base):.3f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
