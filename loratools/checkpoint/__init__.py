"""Base checkpoints: lazy, sharded, pickle-safe reading (reader.py) and atomic writing (writer.py)."""

from .reader import Checkpoint, open_checkpoint

__all__ = ["Checkpoint", "open_checkpoint"]
