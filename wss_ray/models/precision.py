"""Numeric precision the models keep whatever autocast the caller chose."""
from __future__ import annotations

import torch
from torch import nn


def fp32_recurrence(rnn: nn.RNNBase, x: torch.Tensor):
    """``rnn(x)`` with CPU autocast switched off around it: on CPU a bf16 LSTM/GRU step is
    slower than fp32 (measured: the separator's step 0.40 s with its recurrences in bf16 against
    0.32 s in fp32, convolutions bf16 in both), and a recurrence carries rounding over every
    frame. CUDA autocast is left as it is (cuDNN's bf16 RNNs are fast)."""
    if x.device.type != "cpu":
        return rnn(x)
    with torch.autocast("cpu", enabled=False):
        return rnn(x.float())
