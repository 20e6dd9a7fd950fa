"""Transcriptor T (multitask, after Hung et al. ICASSP 2019): magnitude -> instrument-wise
piano-roll logits, with instrument-activity and pitch-activity heads beside the roll."""
from __future__ import annotations

import torch
from torch import nn

from wss_ray.dsp import log_frequency_filterbank
from wss_ray.models.precision import fp32_on_cpu


class _PairMax(torch.autograd.Function):
    """Max over adjacent pairs of rows (dim 2) of (B, C, H, W), as ``nn.MaxPool2d((2, 1))``:
    the same values (NaN propagates; an odd last row is dropped) and, for finite values and
    gradients, the same gradients (a tie sends it to the upper row, as the pooling kernel does).
    Only the sign of a zero and the routing around a NaN may differ, which change no finite
    result. The pairs are the two halves of a (B, C, H/2, 2W) view, so both passes are
    contiguous elementwise work: on the CPU the pooling kernel walks this layout element by
    element, several times slower (BENCHMARKS.md, the critic's pooling; an exact copy of the
    kernel's NaN and signed-zero rules costs as much as the kernel)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        pairs = x[:, :, :h - h % 2].reshape(b, c, h // 2, 2 * w)
        upper, lower = pairs[..., :w], pairs[..., w:]
        ctx.save_for_backward(upper >= lower)
        ctx.shape = x.shape
        return torch.maximum(upper, lower)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (first,) = ctx.saved_tensors
        b, c, h, w = ctx.shape
        m = first.to(grad.dtype)
        out = torch.stack([grad * m, grad * (1 - m)], dim=3).reshape(b, c, h - h % 2, w)
        return torch.cat([out, out.new_zeros(b, c, 1, w)], dim=2) if h % 2 else out


class PairMaxPool(nn.Module):
    """``nn.MaxPool2d((2, 1))``, faster on the CPU (see _PairMax); no parameters, so checkpoints
    of either load in the other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PairMax.apply(x)


class SpectroTrunk(nn.Module):
    """|X| (B, F, N) -> frame embeddings (B, N, 2H).

    A fixed log-frequency filterbank (a buffer, not a parameter) maps the linear STFT bins to
    a pitch-like axis, so gradients flow through it into the separator's masks.
    """

    def __init__(self, sample_rate: int, n_fft: int, pitch_min: int, pitch_max: int, channels: int = 16,
                 hidden: int = 96, bins_per_semitone: int = 2, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("fb", log_frequency_filterbank(sample_rate, n_fft, pitch_min, pitch_max,
                                                            bins_per_semitone), persistent=False)
        n_log = self.fb.shape[0]
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(),
            PairMaxPool(),
        )
        self.proj = nn.Linear(channels * (n_log // 2), hidden)
        self.drop = nn.Dropout(dropout)
        self.rnn = nn.GRU(hidden, hidden, batch_first=True, bidirectional=True)
        self.out_dim = 2 * hidden

    def forward(self, mag: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("lf,bfn->bln", self.fb, mag)
        x = torch.log1p(100.0 * x)          # compressive, finite at 0 (separated sources can be silent)
        x = self.conv(x.unsqueeze(1))       # (B, C, n_log/2, N)
        b, c, l, n = x.shape
        x = self.drop(torch.relu(self.proj(x.permute(0, 3, 1, 2).reshape(b, n, c * l))))
        h, _ = fp32_on_cpu(self.rnn, x)
        return h


class Transcriptor(nn.Module):
    """|X| (B, F, N) -> dict of logits: roll (B, K, P, N), inst (B, K, N), pitch (B, P, N)."""

    def __init__(self, sample_rate: int, n_fft: int, n_sources: int, pitch_min: int, pitch_max: int,
                 channels: int = 16, hidden: int = 96, bins_per_semitone: int = 2, dropout: float = 0.0):
        super().__init__()
        self.k, self.p = n_sources, pitch_max - pitch_min + 1
        self.trunk = SpectroTrunk(sample_rate, n_fft, pitch_min, pitch_max, channels, hidden,
                                  bins_per_semitone, dropout)
        d = self.trunk.out_dim
        self.roll_head = nn.Linear(d, self.k * self.p)
        self.inst_head = nn.Linear(d, self.k)
        self.pitch_head = nn.Linear(d, self.p)

    def forward(self, mag: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(mag)                                          # (B, N, D)
        b, n, _ = h.shape
        return {
            "roll": self.roll_head(h).view(b, n, self.k, self.p).permute(0, 2, 3, 1),
            "inst": self.inst_head(h).transpose(1, 2),
            "pitch": self.pitch_head(h).transpose(1, 2),
        }
