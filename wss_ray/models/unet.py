"""A Spleeter-style U-Net (Hennequin et al., JOSS 2020) over the spectrogram: strided 5×5 2-D
convolutions (BN, leaky ReLU 0.2) down, transposed 5×5 convolutions (ReLU, BN, dropout 0.5 on
the three deepest) up, skip connections by concatenation, a dilated 4×4 convolution to sigmoid
masks. Departures from Spleeter: one network with a mask per instrument (Spleeter trains one
U-Net per instrument; sharing it keeps the CPU step affordable); the input is the log-magnitude
standardised per example (Spleeter: the magnitude), so the masks do not depend on the level;
skips carry each level's activated output (Spleeter: the convolution's, before BN); every bin is
kept (Spleeter crops to 1024 bins)."""
from __future__ import annotations

import torch
from torch import nn

from wss_ray.dsp import log_magnitude


class UNetSeparator(nn.Module):
    """|X| (B, F, N) -> masks M (B, K, F, N) in [0, 1]."""

    domain = "mask"

    def __init__(self, n_bins: int, n_sources: int, channels: int = 16, depth: int = 6, dropout: float = 0.5):
        super().__init__()
        self.n_bins, self.n_sources, self.depth = n_bins, n_sources, depth
        widths = [1] + [channels * 2 ** i for i in range(depth)]
        self.down = nn.ModuleList(nn.Sequential(nn.Conv2d(widths[i], widths[i + 1], 5, stride=2, padding=2),
                                                nn.BatchNorm2d(widths[i + 1]), nn.LeakyReLU(0.2))
                                  for i in range(depth))
        self.up = nn.ModuleList()
        for i in reversed(range(depth)):
            # input: the deepest code, or the previous up layer concatenated with its skip
            cin = widths[i + 1] if i == depth - 1 else 2 * widths[i + 1]
            cout = widths[i] if i > 0 else channels
            layers = [nn.ConvTranspose2d(cin, cout, 5, stride=2, padding=2, output_padding=1), nn.ReLU(),
                      nn.BatchNorm2d(cout)]
            if i >= depth - 3 and dropout:
                layers.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*layers))
        self.out = nn.Conv2d(channels, n_sources, 4, dilation=2, padding=3)

    def encode(self, mag: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Size]]:
        """The down path: the deepest code, the skips the up path joins (shallowest first) and
        the size of every level (the input's first)."""
        x = log_magnitude(mag)
        # per-example standardisation: the mask must not depend on the recording level
        x = (x - x.mean(dim=(1, 2), keepdim=True)) / (x.std(dim=(1, 2), keepdim=True) + 1e-5)
        # any size: each stride-2 level halves (rounding up), each up level restores the size of
        # the level it joins (no padding to a multiple of 2^depth)
        x = x[:, None]
        sizes, skips = [x.shape[-2:]], []
        for layer in self.down:
            x = layer(x)
            skips.append(x)
            sizes.append(x.shape[-2:])
        skips.pop()
        return x, skips, sizes

    def forward(self, mag: torch.Tensor) -> torch.Tensor:
        if mag.dim() != 3:
            raise ValueError(f"UNetSeparator: expected |X| of shape (B, F, N), got {tuple(mag.shape)}")
        x, skips, sizes = self.encode(mag)
        for i, layer in enumerate(self.up):
            x = x if i == 0 else torch.cat([x, skips.pop()], dim=1)
            # the transposed convolution made at the size of the level it joins: the values of
            # making 2x and cropping (output_padding only appends the last row/column; eval mode
            # agrees to float rounding), but no strided view for the next layers to copy, and
            # BN's batch statistics over that level only
            for j, module in enumerate(layer):
                x = module(x, output_size=sizes[-2 - i]) if j == 0 else module(x)
        # the last up level is (F, N) and the dilated 4x4 convolution (padding 3) keeps the size
        return torch.sigmoid(self.out(x))
