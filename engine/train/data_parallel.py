"""Data-parallel training over torch.distributed: M ranks, one replica of the model each, the same
weights on every rank after every step.

Every step is collective. Before it the ranks exchange how many samples each will train
(``RankGroup.exchange``); each computes its loss as the mean over its own samples, and ``GradientSync``
turns the gradients into those of the mean over ALL the step's samples, g = sum_i n_i g_i / N. Dense
gradients travel in one flat all-reduce. Sparse embedding gradients (``nn.Embedding(sparse=True)``,
the large tables) travel as an all-gather of the rows each rank touched (indices + values, padded to
the longest): every rank then holds the same list in rank order, sums it the same way and applies the
same sparse update (SparseAdam, Adagrad). The alternative, densifying the table's gradient, moves
rows x dim floats per step whatever the batch touched (``embedding_sync="dense"``; bench figure 10
measures both). A rank with no samples in a step still takes part with zero gradients
(``TorchLearner.idle_step``).

The process group comes from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
gloo on the CPU. Collectives time out after ``timeout_s`` (a peer that died must not hold the others
for torch's default 30 minutes); the rank then exits and torchrun restarts the group.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

EmbeddingSync = Literal["sparse", "dense"]


class RankGroup:
    """This process's place in a torch.distributed group and the few collectives the stage needs."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    @classmethod
    def start(
        cls,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        init_method: str = "env://",
        timeout_s: float = 60.0,
        backend: str = "gloo",
    ) -> RankGroup:
        """Join the group (rank and size from torchrun's environment unless given)."""
        rank = int(os.environ["RANK"]) if rank is None else rank
        world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
        timeout = timedelta(seconds=timeout_s)
        if dist.is_initialized():
            return cls(rank, world_size)
        # Before the group exists: this module's functions take ``group=group.WORLD`` as a default, read
        # when it is imported. Imported after init (torch._dynamo imports it; building the first
        # optimizer imports torch._dynamo) they would hold the group for ever: destroy_process_group
        # would free nothing and gloo's threads would still run while the interpreter exits (suspected,
        # not reproduced, in a rank's SIGABRT at exit: "terminate called without an active exception").
        import torch.distributed.nn.functional  # noqa: F401

        if init_method == "env://" and "TORCHELASTIC_RUN_ID" in os.environ:
            # Under torchrun: the agent's store, with keys of this attempt only. Gloo's plain env://
            # init reads the addresses the previous attempt's ranks left in it after a restart and
            # then hangs connecting to them (seen with torch 2.15: 1 restart in 3).
            env = os.environ
            attempt = f"reloop/{env['TORCHELASTIC_RUN_ID']}/{env.get('TORCHELASTIC_RESTART_COUNT', 0)}"
            host, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
            agent = dist.TCPStore(host, port, is_master=False, timeout=timeout)
            store = dist.PrefixStore(attempt, agent)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        else:
            dist.init_process_group(
                backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout
            )
        return cls(rank, world_size)

    def exchange(self, values: Sequence[int]) -> np.ndarray:
        """Every rank's ``values`` (same length everywhere): int64 [world_size, len(values)]."""
        mine = torch.tensor(list(values), dtype=torch.int64)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(out, mine)
        return torch.stack(out).numpy()

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order, on every rank."""
        sizes = self.exchange([len(data)])[:, 0]
        top = int(sizes.max())
        buf = torch.zeros(top, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = [torch.empty(top, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(out, buf)
        return [bytes(t[: int(n)].numpy()) for t, n in zip(out, sizes, strict=True)]

    def barrier(self) -> None:
        dist.barrier()

    @staticmethod
    def close() -> None:
        if dist.is_initialized():
            # Together: a rank whose peer had already torn its group down could abort in gloo (SIGABRT,
            # 3 of 33 runs of test_train_ranks' refusal test). A peer gone raises after the timeout.
            with contextlib.suppress(RuntimeError):
                dist.barrier()
            dist.destroy_process_group()


class GradientSync:
    """The learner's ``grad_sync`` hook: replaces this rank's gradients with the step's global mean and
    returns the step's samples over all ranks (``total``, set before each step), whose size picks the
    step's learning rates on every rank alike."""

    def __init__(self, group: RankGroup, model: nn.Module, embedding_sync: EmbeddingSync = "sparse") -> None:
        self.group = group
        self.embedding_sync = embedding_sync
        self.sparse = [m.weight for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse]
        sparse_ids = {id(p) for p in self.sparse}
        self.dense = [p for p in model.parameters() if p.requires_grad and id(p) not in sparse_ids]
        self.total = 0
        self.calls = 0  # syncs so far: whether a step that failed on this rank still owes its peers one

    def __call__(self, n: int) -> int:
        if self.total <= 0:
            raise RuntimeError("GradientSync.total must be the step's samples over all ranks")
        self.calls += 1
        scale = n / self.total
        self._dense(scale)
        for p in self.sparse:
            if self.embedding_sync == "dense":
                self._table_dense(p, scale)
            else:
                self._table_sparse(p, scale)
        return self.total

    def _dense(self, scale: float) -> None:
        if not self.dense:
            return
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.dense]
        )
        flat.mul_(scale)
        dist.all_reduce(flat)
        offset = 0
        for p in self.dense:
            k = p.numel()
            p.grad = flat[offset : offset + k].view_as(p)
            offset += k

    def _table_sparse(self, p: torch.Tensor, scale: float) -> None:
        rows, dim = p.shape
        if p.grad is None:
            idx = torch.empty(0, dtype=torch.int64)
            val = torch.empty(0, dim, dtype=p.dtype)
        else:
            g = p.grad.coalesce()
            idx, val = g.indices()[0], g.values() * scale
        counts = self.group.exchange([idx.numel()])[:, 0]
        top = int(counts.max())
        if top == 0:
            p.grad = torch.sparse_coo_tensor(idx[None], val, (rows, dim))
            return
        pad_idx = torch.zeros(top, dtype=torch.int64)
        pad_val = torch.zeros(top, dim, dtype=p.dtype)
        pad_idx[: idx.numel()] = idx
        pad_val[: idx.numel()] = val
        all_idx = [torch.empty_like(pad_idx) for _ in range(self.group.world_size)]
        all_val = [torch.empty_like(pad_val) for _ in range(self.group.world_size)]
        dist.all_gather(all_idx, pad_idx)
        dist.all_gather(all_val, pad_val)
        indices = torch.cat([t[: int(c)] for t, c in zip(all_idx, counts, strict=True)])
        values = torch.cat([t[: int(c)] for t, c in zip(all_val, counts, strict=True)])
        p.grad = torch.sparse_coo_tensor(indices[None], values, (rows, dim)).coalesce()

    def _table_dense(self, p: torch.Tensor, scale: float) -> None:
        g = p.grad.to_dense() if p.grad is not None else torch.zeros_like(p)
        g = g * scale
        dist.all_reduce(g)
        p.grad = g.to_sparse()


def weights_digest(model: nn.Module) -> str:
    """A hash of every parameter and buffer: equal on every rank when data parallelism works."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
