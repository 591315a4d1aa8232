"""HF checkpoint I/O: per-tensor reading (pread), streamed sharded writing, tensor naming."""

from evomerge.checkpoint.reader import Checkpoint
from evomerge.checkpoint.writer import CheckpointWriter, TensorSpec

__all__ = ["Checkpoint", "CheckpointWriter", "TensorSpec"]
