"""List-backed source and sink for unit tests of engine logic; never a stand-in for Kafka."""

from reloop.connectors.memory.memory import MemoryLog, MemorySink, MemorySource

__all__ = ["MemoryLog", "MemorySink", "MemorySource"]
