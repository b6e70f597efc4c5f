"""Training text: documents read from files (readers.py), tokenized into cached token files and a
validation split (prepare.py), served as blocks of consecutive tokens (blocks.py)."""

from .prepare import PreparedData, prepare_data, read_documents

__all__ = ["PreparedData", "prepare_data", "read_documents"]
