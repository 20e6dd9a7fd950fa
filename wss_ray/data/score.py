"""Score features: MIDI notes -> piano rolls on the STFT frame grid, clip activity,
and harmonic masks built from the rolls (vectorised torch, runs in the training step)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from wss_ray.dsp import midi_to_hz


class ScoreError(ValueError):
    """A MIDI file cannot serve as a score."""


def load_notes(path: str | Path, require_notes: bool = True) -> np.ndarray:
    """All pitched notes of a MIDI file as an (n, 3) float array of (start s, end s, pitch).

    Drum tracks are ignored: they have no pitch. A file without a single pitched note is
    an error when ``require_notes``: a stem whose score is empty cannot supervise anything.
    """
    import pretty_midi

    try:
        midi = pretty_midi.PrettyMIDI(str(path))
    except Exception as e:  # pretty_midi raises many types for corrupt files
        raise ScoreError(f"{path}: unreadable MIDI file ({type(e).__name__}: {e})") from e
    notes = [(n.start, n.end, n.pitch) for inst in midi.instruments if not inst.is_drum for n in inst.notes]
    if not notes and require_notes:
        raise ScoreError(f"{path}: MIDI file has no pitched notes" + (" (only drums)" if any(
            i.notes for i in midi.instruments) else ""))
    return np.asarray(notes, dtype=np.float64).reshape(-1, 3)


def notes_to_roll(notes: np.ndarray, n_frames: int, sample_rate: int, hop: int,
                  pitch_min: int, pitch_max: int, start_frame: int = 0) -> np.ndarray:
    """(P, n_frames) uint8 roll; frame n sits at time (start_frame + n) * hop / sample_rate.

    A frame is on when start <= t < end. A note too short to cover any frame centre keeps
    the frame nearest its onset, so no note of the score is dropped.
    """
    roll = np.zeros((pitch_max - pitch_min + 1, n_frames), dtype=np.uint8)
    fps = sample_rate / hop
    for start, end, pitch in notes:
        p = int(pitch) - pitch_min
        if not 0 <= p < roll.shape[0]:
            continue
        a = math.ceil(start * fps - 1e-9)
        b = math.ceil(end * fps - 1e-9)
        if b <= a:
            a, b = int(round(start * fps)), int(round(start * fps)) + 1
        a, b = a - start_frame, b - start_frame
        a, b = max(a, 0), min(b, n_frames)
        if b > a:
            roll[p, a:b] = 1
    return roll


def harmonic_basis(sample_rate: int, n_fft: int, pitch_min: int, pitch_max: int,
                   n_harmonics: int = 10) -> torch.Tensor:
    """(P, F) 0/1 matrix: bin f belongs to a harmonic of pitch p.

    Harmonic h of f0 covers the bins within max(1 bin, half a semitone) of h*f0, for
    h = 1..n_harmonics below Nyquist: one bin of tolerance where bins are coarse (low
    notes), the note's semitone bandwidth where they are fine (high harmonics).
    """
    n_bins = n_fft // 2 + 1
    bin_hz = sample_rate / n_fft
    pitches = torch.arange(pitch_min, pitch_max + 1, dtype=torch.float64)
    f0 = midi_to_hz(pitches)                                   # (P,)
    h = torch.arange(1, n_harmonics + 1, dtype=torch.float64)  # (H,)
    centre = f0[:, None] * h[None, :] / bin_hz                 # (P, H) in bins
    half = torch.clamp(centre * (2 ** (1 / 24) - 1), min=1.0)
    valid = centre * bin_hz < sample_rate / 2
    k = torch.arange(n_bins, dtype=torch.float64)
    near = (k[None, None, :] - centre[..., None]).abs() <= half[..., None]  # (P, H, F)
    return (near & valid[..., None]).any(dim=1).float()


def harmonic_masks(roll: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Rolls (B, K, P, N) and basis (P, F), or one per instrument (K, P, F) -> masks H_k
    (B, K, F, N) in {0, 1}.

    H_k(f, n) = max_p roll_k(p, n) * basis(p, f), computed as one matmul and a threshold.
    """
    spec = "bkpn,kpf->bkfn" if basis.dim() == 3 else "bkpn,pf->bkfn"
    overlap = torch.einsum(spec, roll.to(basis.dtype), basis)
    return (overlap > 0).to(basis.dtype)


def harmonic_masks_reference(roll: np.ndarray, sample_rate: int, n_fft: int, pitch_min: int,
                             n_harmonics: int = 10) -> np.ndarray:
    """Slow loop over every active note; the test oracle for :func:`harmonic_masks`."""
    B, K, P, N = roll.shape
    n_bins = n_fft // 2 + 1
    bin_hz = sample_rate / n_fft
    out = np.zeros((B, K, n_bins, N), dtype=np.float32)
    for b, k, p, n in zip(*np.nonzero(roll)):
        f0 = 440.0 * 2 ** ((pitch_min + p - 69) / 12)
        for h in range(1, n_harmonics + 1):
            if h * f0 >= sample_rate / 2:
                break
            c = h * f0 / bin_hz
            half = max(1.0, c * (2 ** (1 / 24) - 1))
            for f in range(n_bins):
                if abs(f - c) <= half:
                    out[b, k, f, n] = 1.0
    return out


def soft_score_mask(roll: torch.Tensor, basis: torch.Tensor, time_tol: int = 2, freq_tol: int = 1,
                    floor: float = 0.0) -> torch.Tensor:
    """Rolls (B, K, P, N) -> (B, K, F, N) in [floor, 1]: 1 near the harmonics of each
    instrument's notes, ``floor`` elsewhere. Score-informed separation multiplies a separator's
    masks by it. ``basis``: (P, F), or (K, P, F) for a basis per instrument (a distorted guitar
    has far more audible harmonics than a bass).

    The harmonic masks are widened by ``time_tol`` frames and ``freq_tol`` bins on each side, so a
    note a little early or late (an alignment error, a slow attack, a release tail) or slightly
    detuned keeps its energy."""
    h = harmonic_masks(roll, basis)
    B, K, F, N = h.shape
    wide = torch.nn.functional.max_pool2d(h.reshape(B * K, 1, F, N), kernel_size=(2 * freq_tol + 1, 2 * time_tol + 1),
                                          stride=1, padding=(freq_tol, time_tol)).reshape(B, K, F, N)
    return floor + (1.0 - floor) * wide
