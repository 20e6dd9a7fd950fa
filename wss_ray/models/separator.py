"""Separator S: a BLSTM mask network over frames of log-magnitude (as in the weakly
supervised separation baseline the paper builds on)."""
from __future__ import annotations

import torch
from torch import nn

from wss_ray.dsp import log_magnitude
from wss_ray.models.precision import fp32_on_cpu


class MaskSeparator(nn.Module):
    """|X| (B, F, N) -> masks M (B, K, F, N) in [0, 1]; Ŝ_k = M_k ⊙ |X| is the caller's product."""

    domain = "mask"

    def __init__(self, n_bins: int, n_sources: int, hidden: int = 128, layers: int = 2, dropout: float = 0.0):
        super().__init__()
        self.n_bins, self.n_sources = n_bins, n_sources
        self.inp = nn.Linear(n_bins, hidden)
        self.blstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True, bidirectional=True,
                             dropout=dropout if layers > 1 else 0.0)
        self.out = nn.Linear(2 * hidden, n_sources * n_bins)

    def forward(self, mag: torch.Tensor) -> torch.Tensor:
        b, f, n = mag.shape
        x = log_magnitude(mag).transpose(1, 2)                       # (B, N, F)
        # per-example standardisation: the mask must not depend on the recording level
        x = (x - x.mean(dim=(1, 2), keepdim=True)) / (x.std(dim=(1, 2), keepdim=True) + 1e-5)
        h, _ = fp32_on_cpu(self.blstm, torch.tanh(self.inp(x)))
        m = torch.sigmoid(self.out(h))                               # (B, N, K*F)
        return m.view(b, n, self.n_sources, f).permute(0, 2, 3, 1)
