"""What the framework callbacks share: batch sizes, logged numbers, the end-of-training text."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from ..report import PARTITION


def batch_size(batch: Any) -> Optional[int]:
    """The leading dimension of the first tensor in a batch (a tensor, a sequence or a mapping)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() > 0 else None
    if isinstance(batch, Mapping):
        items = batch.values()
    else:
        items = batch if isinstance(batch, (list, tuple)) else ()
    for b in items:
        n = batch_size(b)
        if n is not None:
            return n
    return None


def phase_scalars(rep: dict, prefix: str) -> dict:
    """p50 (ms) and share of the step of each partition phase seen so far, as plain floats."""
    out = {}
    for ph in PARTITION + ("step",):
        e = rep["phases"][ph]
        if e["host"]["count"] == 0:
            continue
        out[f"{prefix}{ph}_p50_ms"] = e["host"]["p50"] * 1e3
        if ph != "step" and e["share_host"] is not None:
            out[f"{prefix}{ph}_share"] = e["share_host"]
    return out


def closing_text(mon: Any, note: str = "") -> str:
    """The summary (with its diagnosis) and a note on what the numbers mean."""
    return mon.summary() + ("\n" + note if note else "")
