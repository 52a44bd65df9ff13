"""``reloop versions {list,rollback}``: the model versions in a checkpoint folder, and rolling one back.

* ``list``: every version, newest first, with when it was published, the samples trained by then and
  whether its serving bundle is there; the stop checkpoints and the number the next version takes.
* ``rollback --to N``: remove the versions newer than N, their serving bundles and the stop checkpoints
  saved after them (engine/runtime/rollback.py). Refused while a trainer holds the folder (stop it
  first), when vN is not there or does not load. ``--dry-run`` says what it would remove.

The folder is ``--config``'s ``checkpoint.dir`` (the run config, ``RELOOP__*`` overrides applied) or
``--dir`` (a serve arm's ``registry``, a replay's checkpoint folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson
from reloop.engine.checkpoint.folder_lock import FolderInUse, FolderLock
from reloop.engine.checkpoint.registry import SnapshotError
from reloop.engine.runtime.config import ConfigError, load_config
from reloop.engine.runtime.rollback import RollbackError, describe, plan_rollback, roll_back, utc


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "rollback"), help="what to do")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="the run config: its checkpoint.dir (RELOOP__* env overrides)")
    where.add_argument("--dir", type=Path, help="the checkpoint folder itself (a serve arm's registry)")
    parser.add_argument("--to", type=int, default=None, help="rollback: the version to go back to")
    parser.add_argument("--dry-run", action="store_true", help="rollback: only say what it would remove")
    parser.add_argument("--json", action="store_true", help="list: one JSON object per version")


def _say(text: str) -> None:
    print(f"reloop versions: {text}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> int:
    if args.config is not None:
        try:
            root = Path(load_config(args.config).checkpoint.dir)
        except ConfigError as exc:
            _say(str(exc))
            return 2
    else:
        root = args.dir
    if args.action == "list":
        return _list(root, as_json=args.json)
    if args.to is None:
        _say("rollback needs --to N (the version to go back to; `reloop versions list` shows them)")
        return 2
    try:
        plan = plan_rollback(root, args.to)
    except (RollbackError, SnapshotError) as exc:
        _say(str(exc))
        return 2
    removed = ", ".join(f"v{v}" for v in plan.versions) or "no version"
    saved = len(plan.checkpoints)
    extra = f" and {saved} stop checkpoint(s) saved after v{plan.to}" if saved else ""
    if not plan.versions and not plan.bundles and not plan.checkpoints:
        print(f"{root}: v{plan.to} is already the newest; nothing to remove")
        return 0
    try:
        if args.dry_run:
            FolderLock(root).acquire(wait_s=0.0).release()  # refused now as the rollback would be
            print(f"{root}: would remove {removed} (with their serving bundles){extra}; the next version: "
                  f"v{plan.next_version}")  # fmt: skip
            return 0
        roll_back(plan)
    except FolderInUse as exc:
        _say(f"a train stage holds {root} (pid {exc.holder}): stop it first, then roll back")
        return 2
    except (RollbackError, SnapshotError) as exc:
        _say(str(exc))
        return 2
    print(
        f"{root}: rolled back to v{plan.to}: removed {removed} (with their serving bundles){extra}. "
        f"The scoring service follows to v{plan.to} at its next poll; the trainer, started again, resumes "
        f"from v{plan.to} and publishes v{plan.next_version} next."
    )
    return 0


def _list(root: Path, *, as_json: bool) -> int:
    if not root.is_dir():
        _say(f"{root} is not a folder")
        return 2
    try:
        listing = describe(root)
    except SnapshotError as exc:  # a highest_version that does not read
        _say(str(exc))
        return 2
    if as_json:
        for info in listing.versions:
            sys.stdout.buffer.write(orjson.dumps({
                "version": info.version, "created_unix": info.created_unix,
                "samples_trained": info.samples_trained, "bundle": info.bundle, "problem": info.problem,
            }) + b"\n")  # fmt: skip
        sys.stdout.flush()
        return 0
    print(f"{root}: {len(listing.versions)} version(s); the next takes v{listing.highest_published + 1}")
    print(f"{'version':>9}  {'published (UTC)':19}  {'samples trained':>15}  bundle")
    for info in listing.versions:
        samples = "-" if info.samples_trained is None else f"{info.samples_trained:,}"
        line = f"{'v' + str(info.version):>9}  {utc(info.created_unix):19}  {samples:>15}  "
        line += "yes" if info.bundle else "no"
        print(line + (f"  ({info.problem})" if info.problem else ""))
    for number, base, problem in listing.checkpoints:
        after = "before the first version" if base is None else f"after v{base}"
        print(f"stop checkpoint {number}: saved {after}" + (f" ({problem})" if problem else ""))
    return 0
