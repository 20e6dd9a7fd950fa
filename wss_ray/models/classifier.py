"""Classifier C of the weak baseline (Pishdadian et al. 2020): the transcriptor's trunk with
only a frame-level instrument-activity head (temporal weak labels, no pitch)."""
from __future__ import annotations

import torch
from torch import nn

from wss_ray.models.transcriptor import SpectroTrunk


class Classifier(nn.Module):
    """|X| (B, F, N) -> dict with inst logits (B, K, N)."""

    def __init__(self, sample_rate: int, n_fft: int, n_sources: int, pitch_min: int, pitch_max: int,
                 channels: int = 16, hidden: int = 96, bins_per_semitone: int = 2, dropout: float = 0.0):
        super().__init__()
        self.trunk = SpectroTrunk(sample_rate, n_fft, pitch_min, pitch_max, channels, hidden,
                                  bins_per_semitone, dropout)
        self.inst_head = nn.Linear(self.trunk.out_dim, n_sources)

    def forward(self, mag: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"inst": self.inst_head(self.trunk(mag)).transpose(1, 2)}
