"""File-backed connectors: dataset readers (``reloop.connectors.files.datasets``) and JSONL logs."""
