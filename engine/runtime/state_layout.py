"""Refuse a checkpoint folder whose model versions a one-process pipeline wrote: reloop before the
two-stage data plane (2026-11-30), whose single process joined and trained and saved both in one state.

This reloop cannot resume from such a state: its train stage refused every version, but only after the
join stage, finding no join checkpoints, had started a new numbering from the oldest input retained and
sent the whole history to the samples topic again (and dead-lettered its bad records a second time).
Checked by ``reloop run``, ``join`` and ``train`` before they start anything. Reads JSON only: ``reloop
run``'s parent process imports no torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from reloop.engine.runtime.config import ConfigError, RunConfig

_VERSION_DIR = re.compile(r"^v(\d{12})$")  # as the snapshot registry names them


def one_process_version(checkpoint_dir: str | Path) -> Path | None:
    """The newest model version folder under ``checkpoint_dir`` when a one-process pipeline wrote it
    (its manifest's meta names no ``stage``), else None. Folders whose manifest cannot be read are passed
    over: the train stage's restore judges those."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return None
    folders = sorted(
        (int(m.group(1)), entry) for entry in root.iterdir() if (m := _VERSION_DIR.match(entry.name))
    )
    for _, folder in reversed(folders):
        try:
            meta = json.loads((folder / "manifest.json").read_text()).get("meta")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(meta, dict):
            return None if "stage" in meta else folder
    return None


def refuse_one_process_state(cfg: RunConfig) -> None:
    """ConfigError naming the folder when ``checkpoint.dir``'s newest version is a one-process state."""
    folder = one_process_version(cfg.checkpoint.dir)
    if folder is not None:
        raise ConfigError(one_process_message(folder))


def one_process_message(where: object) -> str:
    return (
        f"checkpoint.dir: {where} was written by a reloop from before 2026-11-30, whose one process "
        "joined and trained; this reloop joins and trains in two stages and cannot resume from that "
        "state. Give checkpoint.dir a new folder (the join stage then starts from the oldest input the "
        "topics retain), or keep the older reloop on this one"
    )
