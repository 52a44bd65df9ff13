"""``python -m reloop.bench`` (or ``reloop bench``): run the benchmark suite and write docs/benchmarks.md.

    python -m reloop.bench                      # every figure, writes docs/benchmarks.md
    python -m reloop.bench --only snapshots,joiner
    python -m reloop.bench --quick              # smoke test: small sizes, few rounds, report to stdout

Each figure runs in its own child process (``--figure KEY --json PATH``), so one figure's memory,
threads or crash cannot touch the next, and a figure that hangs is stopped after ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reloop.bench.suite import FIGURES, Context, Figure, machine_info, render_markdown

DEFAULT_OUT = Path("docs/benchmarks.md")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--only", type=_known_figures, help=f"comma-separated figures to run, of: {','.join(FIGURES)}"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes and rounds")
    parser.add_argument("--rounds", type=int, default=None, help="alternation rounds (default 5; quick 2)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"markdown report (default {DEFAULT_OUT} for a full run; --quick/--only print to stdout)",
    )
    parser.add_argument("--json-dir", type=Path, default=None, help="also keep each figure's raw JSON here")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="with --only and --json-dir: report every figure, taking the ones not run now from --json-dir "
        "(a rerun of some figures merged into the last full report)",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per figure")
    parser.add_argument(
        "--scale-counts",
        type=_counts,
        default=(2,),
        help="figure 10 (scale): the numbers of train ranks M and join processes K to compare with 1, "
        "e.g. 2,4 on a machine with the cores (default 2; at most 4: the figure's topics have 4 partitions)",
    )
    parser.add_argument("--figure", help=argparse.SUPPRESS)  # internal: run one figure in this process
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)


def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"integers like 2,4 expected, not {text!r}") from None
    if not counts or any(c < 2 or c > 4 for c in counts):
        raise argparse.ArgumentTypeError(f"each count must be 2, 3 or 4, got {text!r}")
    return counts


def _known_figures(text: str) -> str:
    """``--only``'s check, in the parser: an unknown figure is a usage error (exit 2), not a failure."""
    unknown = [k for k in _selected(text) if k not in FIGURES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown figure(s) {unknown}; choose from {list(FIGURES)}")
    return text


def _selected(only: str | None) -> list[str]:
    if not only:
        return list(FIGURES)
    return [k.strip() for k in only.split(",") if k.strip()]


def _run_here(key: str, ctx: Context) -> Figure:
    spec = FIGURES[key]
    began = time.perf_counter()
    try:
        figure = spec.load()(ctx)
    except Exception as exc:  # noqa: BLE001 - the report says which figure failed and why
        import traceback

        traceback.print_exc()
        figure = Figure(key=key, title=spec.title, error=f"{type(exc).__name__}: {exc}")
    figure.seconds = time.perf_counter() - began
    return figure


def _run_child(key: str, args: argparse.Namespace, rounds: int, tmp: Path) -> Figure:
    out = tmp / f"{key}.json"
    cmd = [sys.executable, "-m", "reloop.bench", "--figure", key, "--json", str(out), "--rounds", str(rounds),
           "--scale-counts", ",".join(map(str, args.scale_counts))]  # fmt: skip
    if args.quick:
        cmd.append("--quick")
    print(f"== bench {key}: {FIGURES[key].title}", flush=True)
    began = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=args.timeout, check=False)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = None
    if out.exists():
        figure = Figure.from_dict(json.loads(out.read_text()))
    else:
        why = f"timed out after {args.timeout:.0f} s" if rc is None else f"child exited with status {rc}"
        figure = Figure(key=key, title=FIGURES[key].title, error=why)
    figure.seconds = time.perf_counter() - began
    if args.json_dir is not None:
        args.json_dir.mkdir(parents=True, exist_ok=True)
        (args.json_dir / f"{key}.json").write_text(json.dumps(figure.to_dict(), indent=1))
    status = f"error: {figure.error}" if figure.error else f"{len(figure.rows)} rows"
    print(f"== bench {key}: {status} in {figure.seconds:.0f} s", flush=True)
    return figure


def main(args: argparse.Namespace) -> int:
    rounds = args.rounds or (2 if args.quick else 5)
    ctx = Context(quick=args.quick, rounds=rounds, scale_counts=args.scale_counts)
    if args.figure:
        figure = _run_here(args.figure, ctx)
        if args.json is not None:
            args.json.write_text(json.dumps(figure.to_dict(), indent=1))
        return 0 if figure.error is None else 1

    keys = _selected(args.only)
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="reloop-bench-") as tmp:
        fresh = {key: _run_child(key, args, rounds, Path(tmp)) for key in keys}
    command = (
        "python -m reloop.bench"
        + (f" --only {args.only}" if args.only else "")
        + (" --quick" if args.quick else "")
        + (f" --scale-counts {','.join(map(str, args.scale_counts))}" if args.scale_counts != (2,) else "")
    )
    figures = list(fresh.values())
    if args.reuse and args.json_dir is not None:
        figures = []
        for key in FIGURES:
            path = args.json_dir / f"{key}.json"
            if key in fresh:
                figures.append(fresh[key])
            elif path.exists():
                figures.append(Figure.from_dict(json.loads(path.read_text())))
        command = (
            f"python -m reloop.bench --json-dir {args.json_dir}` then "
            f"`{command} --json-dir {args.json_dir} --reuse"
        )
    text = render_markdown(figures, machine, command, args.quick)
    out = (
        args.out
        if args.out is not None
        else (None if args.quick or (args.only and not args.reuse) else DEFAULT_OUT)
    )
    if out is None:
        print(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    return 0 if all(f.error is None for f in figures) else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m reloop.bench", description=__doc__.split("\n\n")[0])
    configure(_parser)
    sys.exit(main(_parser.parse_args()))
