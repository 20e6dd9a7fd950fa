"""A waveform separator: Conv-TasNet (Luo & Mesgarani, TASLP 2019), torchaudio's implementation
(learned encoder, temporal convolution network of dilated depthwise blocks, masks on the
encoder's features, learned decoder). Its estimates are waveforms; the score losses see them
through the project's STFT (``wss_ray.separation``)."""
from __future__ import annotations

import torch
from torch import nn
from torchaudio.models import ConvTasNet


class TasNetSeparator(nn.Module):
    """Mixture x (B, L) -> source waveforms ŝ (B, K, L).

    ``consistent``: the mixture-consistency projection (Wisdom et al., ICASSP 2019),
    ŝ_k + (x − Σ_j ŝ_j)/K, so the estimates sum to the mixture exactly."""

    domain = "wave"

    def __init__(self, n_sources: int, enc_kernel: int = 16, enc_feats: int = 512, bottleneck: int = 128,
                 hidden: int = 512, layers: int = 8, stacks: int = 3, consistent: bool = True):
        super().__init__()
        self.n_sources, self.consistent = n_sources, consistent
        self.net = ConvTasNet(num_sources=n_sources, enc_kernel_size=enc_kernel, enc_num_feats=enc_feats,
                              msk_kernel_size=3, msk_num_feats=bottleneck, msk_num_hidden_feats=hidden,
                              msk_num_layers=layers, msk_num_stacks=stacks, msk_activate="sigmoid")

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        # per-example level normalisation (undone on the output): the estimates scale with the
        # mixture whatever the recording level
        scale = mix.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
        est = self.net((mix / scale)[:, None]) * scale[:, None]
        if self.consistent:
            est = est + (mix[:, None] - est.sum(dim=1, keepdim=True)) / self.n_sources
        return est
