"""Open-Unmix (Stöter et al., JOSS 2019) as a score-supervised separator: the reference
implementation from the ``openunmix`` package, one network per instrument as in the reference
(input mean/scale and output scale/mean learned per bin, a bandwidth limit on the input bins,
fc → BN → tanh, a 3-layer BLSTM with the skip connection, two fc → BN stages, ReLU mask).

Three departures: the per-bin input statistics start at 0 / 1 and are learned (the reference
initialises them from the training set's); each example's |X| is divided by its mean before the
network (the reference trains with random gains instead), so the masks do not depend on the
recording's level (BatchNorm's running statistics would otherwise tie them to the training
corpus's loudness); and the output offset starts at 1/K, so the K networks' masks start summing
to one (the reference's single target starts at the identity mask, 1; K of those explain K
times the mixture, and Adam moves the offset by about the learning rate per step, so the
mixture losses spent the whole CPU budget undoing it: BENCHMARKS.md)."""
from __future__ import annotations

import torch
from openunmix.model import OpenUnmix
from openunmix.utils import bandwidth_to_max_bin
from torch import nn

from wss_ray.models.precision import fp32_on_cpu


class UnmixSeparator(nn.Module):
    """|X| (B, F, N) -> masks M (B, K, F, N) >= 0 (the reference's ReLU mask, not bounded by 1)."""

    domain = "mask"

    def __init__(self, n_bins: int, n_sources: int, sample_rate: int, n_fft: int, hidden: int = 512,
                 layers: int = 3, bandwidth: float = 16000.0):
        super().__init__()
        self.n_bins, self.n_sources = n_bins, n_sources
        # the reference's bandwidth limit: bins above ``bandwidth`` Hz are not read (every bin
        # when it is above Nyquist); every bin still gets a mask
        max_bin = min(int(bandwidth_to_max_bin(sample_rate, n_fft, bandwidth)), n_bins)
        self.targets = nn.ModuleList(OpenUnmix(nb_bins=n_bins, nb_channels=1, hidden_size=hidden,
                                               nb_layers=layers, max_bin=max_bin) for _ in range(n_sources))
        with torch.no_grad():
            for t in self.targets:
                t.output_mean.fill_(1.0 / n_sources)

    def forward(self, mag: torch.Tensor) -> torch.Tensor:
        x = mag / mag.mean(dim=(1, 2), keepdim=True).clamp_min(1e-8)
        # the reference returns relu(z) ⊙ x with x detached; its mask is that over x (clamped:
        # 0/0 would give NaN gradients where the mixture is digital silence)
        den = x.clamp_min(1e-8)
        # the reference's BLSTM sits between its dense layers, so the whole network stays in
        # fp32 under CPU autocast
        return fp32_on_cpu(self._masks, x, den)

    def _masks(self, x: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.stack([(t(x[:, None])[:, 0] / den) * (x > 1e-8) for t in self.targets], dim=1)
