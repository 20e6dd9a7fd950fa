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

SPLITS = ("train", "validation", "test", "omitted")   # names a split folder given directly may have
AUDIO_EXTS = (".flac", ".wav", ".ogg")   # .ogg: Vorbis copies made for transport (benchmarks/gpu_bundle.py)
# Classes Slakh2100's metadata uses (its instrument taxonomy); anything else is a typo or
# a different dataset and is refused rather than silently dropped.
SLAKH_CLASSES = {
    "Piano", "Chromatic Percussion", "Organ", "Guitar", "Bass", "Strings", "Strings (continued)",
    "Ensemble", "Brass", "Reed", "Pipe", "Synth Lead", "Synth Pad", "Synth Effects", "Sound Effects",
    "Sound effects", "Ethnic", "Percussive", "Drums",
}
# A corpus without split folders (BabySlakh) is split by sorted track name (see flat_splits).
FLAT_SPLITS = (0.7, 0.15, 0.15)


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
    ignored: dict[str, str] = field(default_factory=dict)        # stem id -> why it is not used
    notes: list[str] = field(default_factory=list)               # what else the reader noticed

    def mapping(self) -> dict:
        """What the reader did with the track's stems, for reports: JSON-ready."""
        return {"mapped": {t: [p.stem for p in ps] for t, ps in self.stems.items()},
                "ignored": dict(self.ignored), "notes": list(self.notes)}


@dataclass
class TrackAudio:
    sample_rate: int
    mix: np.ndarray                  # (L,) float32
    stems: np.ndarray                # (K, L) float32, zeros for an absent instrument
    notes: list[np.ndarray]          # per target: (n, 3) start, end, pitch


def list_tracks(root: str | Path) -> list[tuple[str, Path]]:
    """(split, track dir) for every Track* folder of a corpus.

    Recognised: ``root/<split>/TrackNNNNN`` for any split folder (Slakh2100's train,
    validation, test, and others such as ``omitted``); ``root/TrackNNNNN`` (BabySlakh), split
    by sorted name (:func:`flat_splits`); a split folder given directly (``slakh/test``).
    """
    root = Path(root)
    if not root.is_dir():
        raise SlakhError(f"{root}: not a directory")
    found = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not _is_track(sub):
            found += [(sub.name, p) for p in sorted(sub.iterdir()) if _is_track(p)]
    flat = [p for p in sorted(root.iterdir()) if _is_track(p)]
    if root.name in SPLITS or (flat and found):
        found += [(root.name if root.name in SPLITS else "train", p) for p in flat]
    elif flat:
        found += flat_splits(flat)
    if not found:
        raise SlakhError(f"{root}: no Track folders found (expected {root}/<split>/TrackNNNNN/metadata.yaml "
                         f"or {root}/TrackNNNNN/metadata.yaml)")
    return found


def flat_splits(tracks: list[Path]) -> list[tuple[str, Path]]:
    """By sorted name: the last 15% to test, the 15% before them to validation (BabySlakh's 20
    tracks: 14 / 3 / 3). Adding tracks can move a track to another split; featurizing into a
    folder made before refuses that (``featurize``)."""
    n = len(tracks)
    n_test = int(round(FLAT_SPLITS[2] * n))
    n_val = int(round(FLAT_SPLITS[1] * n))
    n_train = max(n - n_test - n_val, 1 if n else 0)
    names = ["train"] * n_train + ["validation"] * min(n_val, n - n_train)
    names += ["test"] * (n - len(names))
    return list(zip(names, sorted(tracks)))


def _is_track(p: Path) -> bool:
    return p.is_dir() and p.name.startswith("Track") and not p.name.startswith(".")


def _find_audio(folder: Path, stem: str) -> Path | None:
    for ext in AUDIO_EXTS:
        if (folder / f"{stem}{ext}").is_file():
            return folder / f"{stem}{ext}"
    return None


def resolve_dir(track: Path, value, default: str) -> Path | None:
    """Where a track's ``audio_dir`` / ``midi_dir`` is. Slakh2100 (flac_redux) writes it relative
    to the split folder (``Track00001/stems``), BabySlakh and our corpus relative to the track
    (``stems``). Tried in that order: the track folder, the split folder, then the track's own
    ``default``. A split-relative path must land inside this track: a renamed copy of a track
    must not read another track's stems."""
    here = track.resolve()
    if value:
        if (track / str(value)).is_dir():
            return track / str(value)
        beside = (track.parent / str(value)).resolve()
        if beside.is_dir() and beside.is_relative_to(here):
            return beside
    return track / default if (track / default).is_dir() else None


def target_of(inst_class: str, program: int, is_drum: bool, instruments: list[str]) -> str | None:
    if is_drum:
        return None
    for name in instruments:
        cls, programs = INSTRUMENT_CLASSES[name]
        if inst_class == cls and program in programs:
            return name
    return None


def _why_not(inst_class: str, program: int, is_drum: bool, name: str) -> str:
    if is_drum:
        return "drums"
    return f"{inst_class} program {program} ({name or 'unnamed'}) maps to no target"


def read_sources(split: str, track: Path, cfg: DataConfig) -> TrackSources:
    """Which stem files feed which target, from ``metadata.yaml`` and what is on disk.

    A stem counts when its audio file exists, whatever ``audio_rendered`` says (BabySlakh
    writes false for every stem it ships); ``audio_rendered: false`` with no file is an
    absent stem; ``audio_rendered: true`` with no file is a broken track."""
    meta_path = track / "metadata.yaml"
    if not meta_path.is_file():
        raise SlakhError(f"{meta_path}: missing metadata.yaml")
    try:
        meta = yaml.safe_load(meta_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SlakhError(f"{meta_path}: not valid YAML ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("stems"), dict):
        raise SlakhError(f"{meta_path}: no 'stems' mapping")
    audio_dir = resolve_dir(track, meta.get("audio_dir"), "stems")
    midi_dir = resolve_dir(track, meta.get("midi_dir"), "MIDI")
    src = TrackSources(name=track.name, split=split, path=track, mix_path=_find_audio(track, "mix"))
    for sid, info in sorted(meta["stems"].items()):
        sid = str(sid)
        if not isinstance(info, dict):
            raise SlakhError(f"{meta_path}: stem {sid} has no fields")
        cls = info.get("inst_class")
        if cls not in SLAKH_CLASSES:
            raise SlakhError(f"{meta_path}: stem {sid} has unknown inst_class {cls!r}")
        try:
            program = int(info.get("program_num", -1))
        except (TypeError, ValueError):
            raise SlakhError(f"{meta_path}: stem {sid} has a non-integer program_num") from None
        is_drum = bool(info.get("is_drum", False))
        target = target_of(cls, program, is_drum, cfg.instruments)
        if target is None:
            src.ignored[sid] = _why_not(cls, program, is_drum, str(info.get("midi_program_name") or ""))
            continue
        if audio_dir is None:
            raise SlakhError(f"{track / str(meta.get('audio_dir') or 'stems')}: stems folder missing "
                             f"(metadata.yaml lists {sid})")
        audio = _find_audio(audio_dir, sid)
        if audio is None:
            if info.get("audio_rendered", True) is False:
                # not rendered, so not in the mix: its notes must not be in the score either
                src.ignored[sid] = f"{target}: no audio file (audio_rendered: false)"
                continue
            raise SlakhError(f"{audio_dir / sid}.flac: stem audio missing (metadata.yaml says it was rendered)")
        midi = (midi_dir or track / "MIDI") / f"{sid}.mid"
        if not midi.is_file():
            raise SlakhError(f"{midi}: MIDI file of stem {sid} missing")
        src.stems.setdefault(target, []).append(audio)
        src.midis.setdefault(target, []).append(midi)
    if audio_dir is not None:
        listed = {str(s) for s in meta["stems"]}
        for extra in sorted(p for p in audio_dir.iterdir() if p.suffix in AUDIO_EXTS and p.stem not in listed):
            src.notes.append(f"{extra.name}: no entry in metadata.yaml, ignored")
    if not src.stems:
        raise SlakhError(f"{meta_path}: no stem maps to the target instruments {cfg.instruments} "
                         f"({'; '.join(f'{k}: {v}' for k, v in src.ignored.items()) or 'no stems listed'})")
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
    bad = np.flatnonzero(~np.isfinite(data).all(axis=1))
    if len(bad):  # a float file can hold NaN/Inf; it would poison every chunk it reaches
        raise SlakhError(f"{path}: non-finite sample (NaN or Inf) at {bad[0] / sr:.3f} s")
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
