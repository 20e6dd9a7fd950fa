"""Read a track in the Slakh2100 layout (real or our synthetic corpus) and map its stems to
the target instruments through ``metadata.yaml`` (``inst_class`` + ``program_num``).

Every problem is raised as :class:`SlakhError` naming the file at fault.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from wss_ray.config import INSTRUMENT_CLASSES, DataConfig
from wss_ray.data.score import ScoreError, load_notes

SPLITS = ("train", "validation", "test", "omitted")
AUDIO_EXTS = (".flac", ".wav")
# Classes Slakh2100's metadata uses (its instrument taxonomy); anything else is a typo or
# a different dataset and is refused rather than silently dropped.
SLAKH_CLASSES = {
    "Piano", "Chromatic Percussion", "Organ", "Guitar", "Bass", "Strings", "Strings (continued)",
    "Ensemble", "Brass", "Reed", "Pipe", "Synth Lead", "Synth Pad", "Synth Effects", "Sound Effects",
    "Sound effects", "Ethnic", "Percussive", "Drums",
}


class SlakhError(ValueError):
    """A track folder does not follow the Slakh layout or holds unusable files."""


@dataclass
class TrackSources:
    name: str
    split: str
    path: Path
    mix_path: Path | None
    stems: dict[str, list[Path]] = field(default_factory=dict)   # target -> audio files
    midis: dict[str, list[Path]] = field(default_factory=dict)   # target -> MIDI files


@dataclass
class TrackAudio:
    sample_rate: int
    mix: np.ndarray                  # (L,) float32
    stems: np.ndarray                # (K, L) float32, zeros for an absent instrument
    notes: list[np.ndarray]          # per target: (n, 3) start, end, pitch


def list_tracks(root: str | Path) -> list[tuple[str, Path]]:
    """(split, track dir) for every Track* folder under root/<split>/ or root itself."""
    root = Path(root)
    if not root.is_dir():
        raise SlakhError(f"{root}: not a directory")
    found = []
    for split in SPLITS:
        if (root / split).is_dir():
            found += [(split, p) for p in sorted((root / split).iterdir()) if _is_track(p)]
    if not found:  # a single split folder given directly
        found = [(root.name if root.name in SPLITS else "train", p)
                 for p in sorted(root.iterdir()) if _is_track(p)]
    if not found:
        raise SlakhError(f"{root}: no Track folders found (expected {root}/<split>/TrackNNNNN/metadata.yaml)")
    return found


def _is_track(p: Path) -> bool:
    return p.is_dir() and p.name.startswith("Track") and not p.name.startswith(".")


def _find_audio(folder: Path, stem: str) -> Path | None:
    for ext in AUDIO_EXTS:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def target_of(inst_class: str, program: int, is_drum: bool, instruments: list[str]) -> str | None:
    if is_drum:
        return None
    for name in instruments:
        cls, programs = INSTRUMENT_CLASSES[name]
        if inst_class == cls and program in programs:
            return name
    return None


def read_sources(split: str, track: Path, cfg: DataConfig) -> TrackSources:
    meta_path = track / "metadata.yaml"
    if not meta_path.is_file():
        raise SlakhError(f"{meta_path}: missing metadata.yaml")
    try:
        meta = yaml.safe_load(meta_path.read_text())
    except yaml.YAMLError as e:
        raise SlakhError(f"{meta_path}: not valid YAML ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("stems"), dict):
        raise SlakhError(f"{meta_path}: no 'stems' mapping")
    audio_dir = track / str(meta.get("audio_dir") or "stems")
    midi_dir = track / str(meta.get("midi_dir") or "MIDI")
    src = TrackSources(name=track.name, split=split, path=track, mix_path=_find_audio(track, "mix"))
    for sid, info in sorted(meta["stems"].items()):
        if not isinstance(info, dict):
            raise SlakhError(f"{meta_path}: stem {sid} has no fields")
        cls = info.get("inst_class")
        if cls not in SLAKH_CLASSES:
            raise SlakhError(f"{meta_path}: stem {sid} has unknown inst_class {cls!r}")
        try:
            program = int(info.get("program_num", -1))
        except (TypeError, ValueError):
            raise SlakhError(f"{meta_path}: stem {sid} has a non-integer program_num") from None
        target = target_of(cls, program, bool(info.get("is_drum", False)), cfg.instruments)
        if target is None or info.get("audio_rendered", True) is False:
            # an unrendered stem is not in the audio, so its notes must not be in the score
            continue
        if not audio_dir.is_dir():
            raise SlakhError(f"{audio_dir}: stems folder missing (metadata.yaml lists {sid})")
        audio = _find_audio(audio_dir, sid)
        if audio is None:
            raise SlakhError(f"{audio_dir / sid}.flac: stem audio missing (metadata.yaml says it was rendered)")
        midi = midi_dir / f"{sid}.mid"
        if not midi.is_file():
            raise SlakhError(f"{midi}: MIDI file of stem {sid} missing")
        src.stems.setdefault(target, []).append(audio)
        src.midis.setdefault(target, []).append(midi)
    if not src.stems:
        raise SlakhError(f"{meta_path}: no stem maps to the target instruments {cfg.instruments}")
    missing = [i for i in cfg.instruments if i not in src.stems]
    if missing and cfg.require_all:
        raise SlakhError(f"{track}: lacks instrument(s) {missing} and data.require_all is set")
    if cfg.mix == "mix_file" and src.mix_path is None:
        raise SlakhError(f"{track / 'mix.flac'}: mix file missing (data.mix is 'mix_file')")
    return src


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 (channels averaged) and its sample rate."""
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile reports corrupt files with a generic error type
        raise SlakhError(f"{path}: unreadable audio ({e})") from e
    if data.shape[0] == 0:
        raise SlakhError(f"{path}: audio file is empty")
    return data.mean(axis=1), int(sr)


def load_track(src: TrackSources, cfg: DataConfig) -> TrackAudio:
    """Load audio and notes of one track at its own sample rate (resampling is the caller's)."""
    rate = None
    ref_len = None
    if src.mix_path is not None:
        mix_file, rate = read_audio(src.mix_path)
        ref_len = len(mix_file)
    stems, notes = [], []
    for name in cfg.instruments:
        total = None
        inst_notes = []
        for audio_path, midi_path in zip(src.stems.get(name, []), src.midis.get(name, [])):
            x, sr = read_audio(audio_path)
            if rate is None:
                rate, ref_len = sr, len(x)
            if sr != rate:
                raise SlakhError(f"{audio_path}: unexpected sample rate {sr} Hz (the track's audio is {rate} Hz)")
            if len(x) < ref_len:
                raise SlakhError(f"{audio_path}: stem is shorter than the mix ({len(x)} < {ref_len} samples)")
            x = x[:ref_len]
            total = x if total is None else total + x
            try:
                inst_notes.append(load_notes(midi_path))
            except ScoreError as e:
                raise SlakhError(str(e)) from e
        stems.append(total)
        notes.append(np.concatenate(inst_notes) if inst_notes else np.zeros((0, 3)))
    if rate < cfg.sample_rate:
        raise SlakhError(f"{src.mix_path or src.path}: sample rate {rate} Hz is below the configured "
                         f"{cfg.sample_rate} Hz; upsampling would invent bandwidth")
    stems_arr = np.stack([s if s is not None else np.zeros(ref_len, np.float32) for s in stems]).astype(np.float32)
    if cfg.mix == "mix_file":
        mix = mix_file
    else:
        mix = stems_arr.sum(axis=0)
    return TrackAudio(sample_rate=rate, mix=mix.astype(np.float32), stems=stems_arr, notes=notes)
