"""RankGroup.close() frees the gloo group: no gloo thread is left when the rank's interpreter exits.

torch.distributed.nn.functional takes ``group=group.WORLD`` as a default; imported after the group
exists (torch._dynamo imports it, and the first optimizer imports torch._dynamo) it held the group for
ever, so destroy_process_group freed nothing and gloo's threads ran on through interpreter exit, where a
rank could abort ("terminate called without an active exception", SIGABRT) after training ended."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

CHILD = """
import os, sys
import torch
from reloop.engine.train.data_parallel import RankGroup

def threads():
    return sorted(open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task"))

group = RankGroup.start(rank=0, world_size=1, init_method=sys.argv[1], timeout_s=30)
import torch.distributed.nn.functional  # what building the learner's first optimizer does (via torch._dynamo)
torch.optim.Adam([torch.nn.Parameter(torch.ones(2))])
group.exchange([1, 2])
group.close()
print(",".join(threads()))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from /proc")
def test_close_leaves_no_gloo_thread_running(tmp_path):
    out = (
        subprocess.run(
            [sys.executable, "-c", CHILD, f"file://{tmp_path / 'store'}"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    assert not [name for name in out.split(",") if "gloo" in name], out
