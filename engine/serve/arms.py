"""Stable assignment of users to experiment arms.

blake2b of (salt, user id) mapped to [0, 1) and cut by the arms' cumulative weights: the same user
lands in the same arm in every process and on every restart (Python's ``hash()`` is salted per process
and must never be used for this), and changing the salt reshuffles everyone for a new experiment.

>>> router = ArmRouter([("A", 1.0), ("B", 1.0)], salt="exp1")
>>> router.route("user-42") == router.route("user-42")
True
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

_SCALE = float(2**64)
# The smallest traffic share an arm may have: below it (one user in a billion) the arm is served no one,
# and a share that rounds to 0 next to a weight 1e12 times larger never could be.
MIN_SHARE = 1e-9


def _salt_key(salt: str) -> bytes:
    """blake2b's key (64 bytes at most): the salt itself, or a digest of a longer one (cutting it at 64
    bytes made salts that differ only after that route every user alike)."""
    raw = salt.encode()
    return raw if len(raw) <= 64 else hashlib.blake2b(raw, digest_size=64).digest()


def unit_hash(salt: str, key: str) -> float:
    """A deterministic value in [0, 1) for (salt, key)."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, key=_salt_key(salt)).digest()
    return int.from_bytes(digest, "big") / _SCALE


class ArmRouter:
    def __init__(self, arms: Sequence[tuple[str, float]], *, salt: str) -> None:
        if not arms:
            raise ValueError("arms: at least one arm is required")
        names = [name for name, _ in arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arms: duplicate arm names in {names}")
        if not all(0 < weight <= 1e12 for _, weight in arms):  # NaN fails too; inf would route nothing
            raise ValueError("arms: every weight must be > 0 and at most 1e12")
        total = sum(weight for _, weight in arms)
        self.names = names
        self.salt = salt
        self._cuts: list[float] = []
        acc = 0.0
        for name, weight in arms:
            if weight / total < MIN_SHARE:
                raise ValueError(
                    f"arms: arm {name!r} has weight {weight:g} of {total:g} in all, a share of "
                    f"{weight / total:.3g} of the traffic (below {MIN_SHARE:g}: it would be served no one)"
                )
            acc += weight / total
            self._cuts.append(acc)
        self._cuts[-1] = 1.0

    def route(self, user_id: str) -> str:
        if len(self.names) == 1:
            return self.names[0]
        index = bisect.bisect_right(self._cuts, unit_hash(self.salt, user_id))
        return self.names[min(index, len(self.names) - 1)]
