"""Score-informed separation: the song's own score, aligned to the recording, restricts each
instrument's mask to the harmonics of its notes (``wss-ray separate --score``).

The score's MIDI tracks are assigned to the target instruments by their General MIDI family
(pretty_midi's instrument class: every piano program to ``piano``, every guitar to ``guitar``,
every bass to ``bass``; drums and other families are left out). That is broader than the
programs the model was trained on (distorted guitars 29-30, electric basses 33-37): a score
written for an acoustic guitar still names the part the user calls the guitar. An instrument with no notes in the
score comes out silent.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wss_ray.align import Alignment, AlignmentError, RollTranscriber, align_notes
from wss_ray.config import INSTRUMENT_CLASSES
from wss_ray.data.score import ScoreError, notes_to_roll


@dataclass
class ScoreGuide:
    """Each target instrument's notes on the recording's time line."""

    instruments: list[str]
    notes: list[np.ndarray]                 # per instrument (n, 3): start s, end s, pitch
    alignment: Alignment | None = None
    left_out: list[str] = field(default_factory=list)   # MIDI tracks that feed no target

    def roll(self, start_s: float, n_frames: int, sample_rate: int, hop: int, pitch_min: int,
             pitch_max: int) -> torch.Tensor:
        """(K, P, n_frames) roll of a stretch that starts ``start_s`` into the recording, on the
        STFT frame grid of (sample_rate, hop)."""
        rolls = []
        end_s = start_s + n_frames * hop / sample_rate
        for n in self.notes:
            shifted = n[(n[:, 1] > start_s) & (n[:, 0] < end_s)].copy()   # only this stretch's notes
            shifted[:, :2] -= start_s
            rolls.append(notes_to_roll(shifted, n_frames, sample_rate, hop, pitch_min, pitch_max))
        return torch.from_numpy(np.stack(rolls))

    def describe(self) -> str:
        parts = [f"{name} {len(n)} notes" if len(n) else f"{name} absent (silent)"
                 for name, n in zip(self.instruments, self.notes)]
        if self.left_out:
            parts.append(f"left out: {', '.join(self.left_out)}")
        return "; ".join(parts)


def score_notes(midi: str | Path, instruments: list[str]) -> tuple[list[np.ndarray], list[str]]:
    """Per target instrument, the notes of the MIDI tracks of its family; and the tracks left out."""
    import pretty_midi

    if Path(midi).is_dir():
        raise ValueError(f"{midi}: is a folder, not a MIDI file")
    if not Path(midi).is_file():
        raise FileNotFoundError(f"{midi}: no such MIDI file")
    try:
        pm = pretty_midi.PrettyMIDI(str(midi))
    except Exception as e:  # pretty_midi raises many types for corrupt files
        raise ScoreError(f"{midi}: unreadable MIDI file ({type(e).__name__}: {e})") from None
    family = {INSTRUMENT_CLASSES[name][0]: k for k, name in enumerate(instruments)}
    notes: list[list] = [[] for _ in instruments]
    left_out = []
    for inst in pm.instruments:
        cls = "Drums" if inst.is_drum else pretty_midi.program_to_instrument_class(inst.program)
        k = family.get(cls)
        if k is None:
            if inst.notes:
                left_out.append(f"{cls.lower()} (program {inst.program}{', ' + repr(inst.name) if inst.name else ''})")
            continue
        notes[k] += [(n.start, n.end, n.pitch) for n in inst.notes]
    arrays = [np.asarray(sorted(n), dtype=np.float64).reshape(-1, 3) for n in notes]
    if not any(len(n) for n in arrays):
        raise ScoreError(f"{midi}: no notes for any of {instruments} (a score needs piano, guitar or bass tracks "
                         f"by General MIDI program; found: {', '.join(left_out) or 'no notes at all'})")
    return arrays, left_out


def guide_for(midi: str | Path, wave: np.ndarray, sample_rate: int, instruments: list[str],
              transcriber: RollTranscriber | None = None, what: str = "", max_cost: float | None = None) -> ScoreGuide:
    """Read a score, align it to the recording (the transcriptor's roll when there is one, else
    the score-free salience feature) and return it on the recording's time line. A score of
    another piece fails the alignment's cost test (:class:`AlignmentError`)."""
    notes, left_out = score_notes(midi, instruments)
    everything = np.concatenate([n for n in notes if len(n)])
    al = align_notes(everything, wave, sample_rate, "transcriptor" if transcriber else "salience", transcriber,
                     what=what or str(midi), max_cost=max_cost)
    return ScoreGuide(instruments, [al.warp_notes(n) for n in notes], al, left_out)


__all__ = ["AlignmentError", "ScoreGuide", "guide_for", "score_notes"]
