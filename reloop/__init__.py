"""reloop: streaming continual learning for CTR ranking models with the ReLoop self-correction loss.

The one importable name of the product. The source keeps its top-level folders, mapped under it by
setup.py: ``engine/`` is ``reloop.engine`` (no Kafka client, no Prometheus), ``connectors/`` is
``reloop.connectors`` (Kafka, files, metrics), ``bench/`` is ``reloop.bench``. A built wheel also carries
``reloop.deploy_files``: the ``deploy/`` files the commands read at run time.
"""

from __future__ import annotations

import importlib.metadata

try:
    __version__ = importlib.metadata.version("reloop")
except importlib.metadata.PackageNotFoundError:  # a checkout that was never installed
    __version__ = "0+unknown"
