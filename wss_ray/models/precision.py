"""Numeric precision the models keep whatever autocast the caller chose."""
from __future__ import annotations

from typing import Callable

import torch


def fp32_on_cpu(fn: Callable, *tensors: torch.Tensor):
    """``fn(*tensors)`` with CPU autocast switched off around it and the inputs in fp32, for the
    recurrences: on CPU a bf16 LSTM/GRU step is slower than fp32 (measured: the separator's step
    0.40 s with its recurrences in bf16 against 0.32 s in fp32, convolutions bf16 in both), and a
    recurrence carries rounding over every frame. CUDA autocast is left as it is (cuDNN's bf16
    RNNs are fast)."""
    if tensors[0].device.type != "cpu":
        return fn(*tensors)
    with torch.autocast("cpu", enabled=False):
        return fn(*(t.float() for t in tensors))
