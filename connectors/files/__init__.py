"""File-backed connectors: dataset readers (``connectors.files.datasets``) and JSONL logs."""
