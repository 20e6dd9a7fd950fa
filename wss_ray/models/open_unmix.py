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

from wss_ray.dsp import STFT
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


class UnmixWaveSeparator(nn.Module):
    """Open-Unmix on its own STFT, as the reference's ``Separator`` wraps it: mixture x (B, L) ->
    STFT -> the masks of :class:`UnmixSeparator` on |X| -> masks on X (its phase) -> inverse
    STFT -> ŝ (B, K, L), a waveform backbone whose estimates the score losses see through the
    project's STFT.

    Why: the reference analyses 44.1 kHz with a 4096-point window (93 ms, 10.8 Hz bins, a hop of
    23 ms); the project's STFT at 16 kHz is 1024 points (64 ms, 15.6 Hz bins, a hop of 16 ms).
    A longer window resolves the low harmonics that tell a bass from a piano, and a longer hop
    shortens the sequence the BLSTMs walk frame by frame, which is where a CPU step's time goes.
    The reference's EM post-filter is not applied (its default, ``niter=0``); ``softmask``
    is the reference's other option, ratio masks Ŝ_k / Σ_j Ŝ_j on X, so the estimates sum to
    the mixture in every bin where some mask is non-zero (here in training too, since training
    and inference share this forward)."""

    domain = "wave"

    def __init__(self, n_sources: int, sample_rate: int, n_fft: int = 2048, hop: int = 512, hidden: int = 512,
                 layers: int = 3, bandwidth: float = 16000.0, softmask: bool = False):
        super().__init__()
        self.n_fft, self.hop, self.softmask = n_fft, hop, softmask
        self.stft = STFT(n_fft, hop)
        self.unmix = UnmixSeparator(n_fft // 2 + 1, n_sources, sample_rate, n_fft, hidden=hidden, layers=layers,
                                    bandwidth=bandwidth)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        # a mixture shorter than this model's window (the callers pad only to the project's) is
        # zero-padded to one window and cut back: the centred STFT cannot reflect-pad it
        length = mix.shape[-1]
        padded = torch.nn.functional.pad(mix.float(), (0, max(0, self.n_fft - length)))
        spec = self.stft(padded)
        masks = self.unmix(spec.abs())
        if self.softmask:   # a bin where every mask is 0 stays 0 (0 / eps), not NaN
            masks = masks / masks.sum(dim=1, keepdim=True).clamp_min(1e-8)
        return self.stft.inverse(masks.float() * spec[:, None], padded.shape[-1])[..., :length]
