"""What a separator's output means, whatever its domain. Mask backbones (BLSTM, Open-Unmix,
U-Net) read |X| and give masks on the mixture's STFT; waveform backbones (Conv-TasNet) read the
mixture's samples and give waveforms, which the score losses see through the same STFT. Training
(every recipe) and inference (``wss_ray.separate``) both go through :func:`estimate`."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wss_ray.dsp import STFT


def domain(separator: nn.Module) -> str:
    """"mask" or "wave" (DDP wrappers looked through)."""
    return getattr(getattr(separator, "module", separator), "domain", "mask")


@dataclass
class Estimates:
    """One separator pass over a batch of mixtures."""
    spec: torch.Tensor                  # mixture STFT X (B, F, N), complex
    mix_mag: torch.Tensor               # |X| (B, F, N), what the mixture losses compare with
    mag: torch.Tensor                   # separated magnitudes Ŝ (B, K, F, N), what the losses read
    masks: torch.Tensor | None = None   # mask backbones: M (B, K, F, N), Ŝ = M ⊙ |X|
    waves: torch.Tensor | None = None   # waveform backbones: ŝ (B, K, L), Ŝ = |STFT(ŝ)|

    def spectra(self, stft: STFT) -> torch.Tensor:
        """Complex source estimates (B, K, F, N): masks on X (its phase), or the STFT of ŝ."""
        if self.masks is not None:
            return self.masks.float() * self.spec[:, None]
        return stft(self.waves)

    def waveforms(self, stft: STFT, length: int, gain: torch.Tensor | None = None) -> torch.Tensor:
        """(B, K, length). ``gain`` (B, K, F, N): a further time-frequency mask (score-informed
        separation); a waveform backbone's own samples are returned untouched without one."""
        if gain is None and self.waves is not None:
            return self.waves.float()[..., :length]
        spec = self.spectra(stft)
        return stft.inverse(spec if gain is None else gain * spec, length)


def estimate(separator: nn.Module, mix: torch.Tensor, stft: STFT, spec: torch.Tensor | None = None) -> Estimates:
    """Run ``separator`` on mixtures ``mix`` (B, L); ``spec`` = STFT(mix) when the caller has it."""
    spec = stft(mix) if spec is None else spec
    mag = spec.abs()
    if domain(separator) == "wave":
        waves = separator(mix.float())
        return Estimates(spec, mag, stft(waves).abs(), waves=waves)
    masks = separator(mag)
    return Estimates(spec, mag, masks * mag[:, None], masks=masks)
