"""Impression-click join with event time, attribution window and an idle-advancing watermark."""

from reloop.engine.join.joiner import Joined, Joiner, JoinerConfig, JoinStats

__all__ = ["Joined", "Joiner", "JoinerConfig", "JoinStats"]
