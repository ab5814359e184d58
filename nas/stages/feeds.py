"""What a graph of each kind needs fed besides ``input_ids`` and its cache, for one call.

numpy only, so that the measuring process (``nas.stages.measure_worker``, which must not import
torch) and the exporter's ``run_cached`` feed a graph by the same rule:

- ``"plain"`` (``nas.stages.export.export_onnx``): nothing more; positions come from the cache's
  past length inside the graph.
- ``"gqa"`` (``nas.stages.deploy``): ONNX Runtime's GroupQueryAttention reads the sequence
  lengths from two inputs instead of from the cache's shape: ``seqlens_k`` (batch,) int32, the
  total length minus one per sequence, and ``total_sequence_length``, an int32 scalar. All
  sequences of a batch have the same length here (no padding).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

GraphKind = Literal["plain", "gqa"]
GRAPH_KINDS: tuple[str, ...] = ("plain", "gqa")


def step_inputs(graph: str, batch: int, past: int, seq: int) -> dict[str, np.ndarray]:
    """The extra inputs of one call of a ``graph``-kind model on ``seq`` new tokens after ``past``
    cached ones, for a batch of ``batch`` equal-length sequences."""
    if graph == "plain":
        return {}
    if graph == "gqa":
        total = past + seq
        return {"seqlens_k": np.full((batch,), total - 1, dtype=np.int32),
                "total_sequence_length": np.array(total, dtype=np.int32)}
    raise ValueError(f"unknown graph kind {graph!r}; known: {', '.join(GRAPH_KINDS)}")
