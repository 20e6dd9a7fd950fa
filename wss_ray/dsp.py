"""The one place that computes spectrograms: STFT/iSTFT, magnitudes, the fixed
log-frequency filterbank of the transcriptor, resampling, pitch <-> frequency."""
from __future__ import annotations

import functools
import math

import torch
import torchaudio


def midi_to_hz(pitch: torch.Tensor | float) -> torch.Tensor | float:
    return 440.0 * 2.0 ** ((pitch - 69) / 12.0)


def hz_to_midi(freq: torch.Tensor | float) -> torch.Tensor | float:
    if isinstance(freq, torch.Tensor):
        return 69.0 + 12.0 * torch.log2(freq / 440.0)
    return 69.0 + 12.0 * math.log2(freq / 440.0)


class STFT:
    """Centred Hann STFT with a matching inverse (perfect reconstruction for hop <= n_fft/2)."""

    def __init__(self, n_fft: int = 1024, hop: int = 256):
        self.n_fft, self.hop = n_fft, hop
        self._windows: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _window(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype if x.dtype.is_floating_point else torch.float32)
        if key not in self._windows:
            self._windows[key] = torch.hann_window(self.n_fft, device=x.device, dtype=key[1])
        return self._windows[key]

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        """(..., L) float -> (..., F, N) complex, F = n_fft/2 + 1, N = L // hop + 1."""
        shape = wave.shape
        flat = wave.reshape(-1, shape[-1]).float()
        spec = torch.stft(flat, self.n_fft, self.hop, window=self._window(flat), center=True,
                          return_complex=True)
        return spec.reshape(*shape[:-1], *spec.shape[-2:])

    def inverse(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        """(..., F, N) complex -> (..., length) float."""
        shape = spec.shape
        flat = spec.reshape(-1, *shape[-2:])
        wave = torch.istft(flat, self.n_fft, self.hop, window=self._window(flat.real), center=True,
                           length=length)
        return wave.reshape(*shape[:-2], length)

    def n_frames(self, length: int) -> int:
        return length // self.hop + 1


def magnitude(spec: torch.Tensor) -> torch.Tensor:
    return spec.abs()


def log_magnitude(mag: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return torch.log(mag + eps)


@functools.lru_cache(maxsize=8)
def _resampler(orig_sr: int, new_sr: int, dtype: torch.dtype) -> torchaudio.transforms.Resample:
    return torchaudio.transforms.Resample(orig_sr, new_sr, dtype=dtype)


def resample(wave: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited sinc resampling over the last axis; the kernel is built once per rate pair
    (chunked separation resamples every chunk)."""
    if orig_sr == new_sr:
        return wave
    return _resampler(orig_sr, new_sr, wave.dtype).to(wave.device)(wave)


def log_frequency_filterbank(sample_rate: int, n_fft: int, pitch_min: int = 21,
                             pitch_max: int = 108, bins_per_semitone: int = 2) -> torch.Tensor:
    """(n_log, F) triangular filters centred on a log-frequency grid.

    Centres run from ``pitch_min`` to the highest pitch below Nyquist (at least ``pitch_max``
    where possible) in steps of 1/bins_per_semitone semitone. Where a filter is narrower
    than an STFT bin it degenerates to linear interpolation between the two nearest bins,
    so low notes still receive energy. Fixed (not learned) so T's gradient reaches S.
    """
    nyq_pitch = float(hz_to_midi(sample_rate / 2.0)) - 1.0
    top = min(max(pitch_max + 12, pitch_max), nyq_pitch)
    n_log = int((top - pitch_min) * bins_per_semitone) + 1
    centres = pitch_min + torch.arange(n_log, dtype=torch.float64) / bins_per_semitone
    step = 1.0 / bins_per_semitone
    bin_hz = sample_rate / n_fft
    freqs = torch.arange(n_fft // 2 + 1, dtype=torch.float64) * bin_hz
    lo = midi_to_hz(centres - step) / bin_hz
    mid = midi_to_hz(centres) / bin_hz
    hi = midi_to_hz(centres + step) / bin_hz
    k = freqs / bin_hz
    # the triangle's half-widths are at least one STFT bin: interpolation at low pitches
    left = torch.maximum(mid - lo, torch.ones_like(mid))
    right = torch.maximum(hi - mid, torch.ones_like(mid))
    up = (k[None, :] - (mid - left)[:, None]) / left[:, None]
    down = ((mid + right)[:, None] - k[None, :]) / right[:, None]
    fb = torch.clamp(torch.minimum(up, down), min=0.0)
    fb = fb / fb.sum(dim=1, keepdim=True).clamp(min=1e-8)
    return fb.float()
