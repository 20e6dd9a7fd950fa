"""A copy of a Slakh-format corpus whose MIDI is time-warped within realistic bounds, the true
warp kept beside each track (``warp.json``): score-to-audio alignment, and training from
unaligned scores, can then be measured against the exact score.

The warp maps audio time t to score time ``offset + rate * t + d(t)``: a constant offset, a
tempo off by a few percent, and a smooth local drift d (two or three slow sinusoids). It is
stored sampled every ``STEP_S`` and is piecewise linear between the samples by definition:
the warped MIDI follows exactly that polyline, so nothing is lost to interpolation.

MIDI files are warped in the tick domain: every event keeps its tick (notes, controls, pitch
bends, programs, channels, meta events, byte for byte) and only the tempo map is rewritten, so
that tick k, which sounded at T(k) in the audio, now falls at W(T(k)). pretty_midi's
``adjust_times`` was measured first: it re-quantises every note onto the tick grid (up to 2-5
ms off at 96 ticks per beat) and keeps only one of several controls at the map's start.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from wss_ray.atomic import atomic_path, check_out_folder, write_text
from wss_ray.data.slakh import AUDIO_EXTS, SPLITS, SlakhError, list_tracks

STEP_S = 0.05           # warp.json sampling; the smooth curve lies within 0.1 ms of its polyline
MARGIN_S = 5.0          # the map runs this far past the track's end
MAX_DRIFT_SLOPE = 0.15  # |d'(t)|: the local tempo strays at most 15% from the global one
DRIFT_PERIODS_S = (4.0, 20.0)
MAX_OFFSET_S = 10.0
MAX_DRIFT_S = 0.5       # more is unreachable: |d'| <= 0.15 with 20 s periods caps d at 0.48 s
TOLERANCE_S = 1e-3      # a warped note further than this from where the map puts it is a bug
MIDI_EXTS = (".mid", ".midi")
WARP_FILE = "warp.json"
DEFAULT_TEMPO = 500000  # µs per quarter note (120 bpm), what MIDI assumes before a set_tempo
MAX_TEMPO_US = 0xFFFFFF  # a set_tempo holds 24 bits


def check_bounds(max_offset: float, max_tempo: float, drift: float) -> None:
    """Refuse bounds that are not a plausible misalignment (NaN fails every comparison)."""
    if not 0 <= max_offset <= MAX_OFFSET_S:
        raise ValueError(f"--max-offset: need 0..{MAX_OFFSET_S:g} seconds, got {max_offset}")
    if not 0 <= max_tempo < 0.5:
        raise ValueError(f"--max-tempo: need a fraction in [0, 0.5), got {max_tempo}")
    if not 0 <= drift <= MAX_DRIFT_S:
        raise ValueError(f"--drift: need 0..{MAX_DRIFT_S:g} seconds, got {drift}")


def _draw(seed: int, max_offset: float, max_tempo: float, drift: float) -> dict:
    """The warp's parameters; drawn before anything depends on the duration, so a seed gives
    the same warp whatever the track's length."""
    rng = np.random.default_rng(seed)
    offset = float(rng.uniform(-max_offset, max_offset))
    rate = 1.0 + float(rng.uniform(-max_tempo, max_tempo))
    n = int(rng.integers(2, 4))
    periods = rng.uniform(*DRIFT_PERIODS_S, n)
    phases = rng.uniform(0.0, 2 * math.pi, n)
    amps = rng.dirichlet(np.ones(n)) * drift * float(rng.uniform())
    slope = float(np.sum(amps * 2 * math.pi / periods))   # bound on |d'|
    if slope > MAX_DRIFT_SLOPE:
        amps *= MAX_DRIFT_SLOPE / slope
    return {"offset": offset, "rate": rate, "amps": amps, "periods": periods, "phases": phases}


def _curve(p: dict, t: np.ndarray) -> np.ndarray:
    d = np.sum(p["amps"][:, None] * np.sin(2 * math.pi * t[None, :] / p["periods"][:, None]
                                           + p["phases"][:, None]), axis=0)
    return p["offset"] + p["rate"] * t + d


def _grid(duration: float) -> np.ndarray:
    return np.round(np.arange(int(math.ceil((duration + MARGIN_S) / STEP_S)) + 1) * STEP_S, 6)


def random_warp(seed: int, duration: float, max_offset: float = 1.0, max_tempo: float = 0.10,
                drift: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """(audio_s, score_s): audio time 0 .. duration + ``MARGIN_S`` every ``STEP_S``, and the score
    time of each, ``offset + rate * t + d(t)`` with offset ~ U(±max_offset), rate ~ 1 + U(±max_tempo),
    |d| <= drift (sum of 2-3 sinusoids of 4-20 s periods) and |d'| <= ``MAX_DRIFT_SLOPE``.
    Rounded to the microsecond: the arrays as returned are the map."""
    check_bounds(max_offset, max_tempo, drift)
    audio_s = _grid(duration)
    score_s = np.round(_curve(_draw(seed, max_offset, max_tempo, drift), audio_s), 6)
    # slope >= 1 - 0.5 - MAX_DRIFT_SLOPE > 0, so this holds by construction
    assert np.all(np.diff(score_s) > 0), "warp is not strictly increasing"
    return audio_s, score_s


# ---------------------------------------------------------------- MIDI in the tick domain

class _TempoMap:
    """Tick <-> seconds of a MIDI file, read as pretty_midi reads it (set_tempo of track 0 only),
    so the warped file agrees with what the project's score reader saw in the original."""

    def __init__(self, ticks: list[int], tempos: list[int], resolution: int):
        self.ticks = np.asarray(ticks, dtype=np.float64)
        self.scale = np.asarray(tempos, dtype=np.float64) / (1e6 * resolution)   # seconds per tick
        self.starts = np.concatenate([[0.0], np.cumsum(np.diff(self.ticks) * self.scale[:-1])])

    @classmethod
    def of(cls, mid) -> _TempoMap:
        changes = {0: DEFAULT_TEMPO}
        tick = 0
        for msg in mid.tracks[0]:
            tick += msg.time
            if msg.type == "set_tempo":
                changes[tick] = msg.tempo   # several at one tick: the last counts
        ticks = sorted(changes)
        return cls(ticks, [changes[t] for t in ticks], mid.ticks_per_beat)

    def seconds(self, ticks) -> np.ndarray:
        k = np.asarray(ticks, dtype=np.float64)
        j = np.searchsorted(self.ticks, k, side="right") - 1
        return self.starts[j] + (k - self.ticks[j]) * self.scale[j]

    def ticks_at(self, seconds) -> np.ndarray:
        t = np.asarray(seconds, dtype=np.float64)
        j = np.clip(np.searchsorted(self.starts, t, side="right") - 1, 0, None)
        return self.ticks[j] + (t - self.starts[j]) / self.scale[j]


def _read_midi(path: Path):
    import mido

    try:
        mid = mido.MidiFile(str(path))
    except Exception as e:  # mido raises many types (EOFError, OSError, ValueError, KeyError)
        raise SlakhError(f"{path}: unreadable MIDI file ({type(e).__name__}: {e})") from e
    if mid.type == 2:
        raise SlakhError(f"{path}: MIDI type 2 (independent sequences) cannot be warped")
    if not mid.tracks:
        raise SlakhError(f"{path}: MIDI file has no tracks")
    return mid


def _absolute(track) -> list[int]:
    out, tick = [], 0
    for msg in track:
        tick += msg.time
        out.append(tick)
    return out


def _is_onset(msg) -> bool:
    return msg.type == "note_on" and msg.velocity > 0


def midi_span(path: str | Path) -> tuple[float | None, float]:
    """(first note onset or None, last event) of a MIDI file, in seconds."""
    mid = _read_midi(Path(path))
    tempo = _TempoMap.of(mid)
    onsets, end = [], 0
    for track in mid.tracks:
        ticks = _absolute(track)
        end = max([end] + ticks)
        onsets += [k for k, msg in zip(ticks, track) if _is_onset(msg)]
    first = float(tempo.seconds(min(onsets))) if onsets else None
    return first, float(tempo.seconds(end))


def _check_map(audio_s: np.ndarray, score_s: np.ndarray) -> None:
    if audio_s.ndim != 1 or audio_s.shape != score_s.shape or len(audio_s) < 2:
        raise ValueError(f"warp map: need two 1-D arrays of equal length >= 2, got {audio_s.shape} and {score_s.shape}")
    if not (np.all(np.diff(audio_s) > 0) and np.all(np.diff(score_s) > 0)):
        raise ValueError("warp map: audio_s and score_s must both be strictly increasing")
    if audio_s[0] > 0:
        raise ValueError(f"warp map: must start at audio time 0 or before, starts at {audio_s[0]}")


def warp_midi(src_path: str | Path, dst_path: str | Path, audio_s, score_s) -> int:
    """Write ``src_path`` to ``dst_path`` with every event moved from audio time t to score time
    ``interp(t, audio_s, score_s)``; returns the number of notes. Controls and meta events that
    would land before 0 s (set-up at the top of the file) are gathered at the start, in order; a
    note that would is an error: shift the map instead. The written file is read back with pretty_midi and
    each note checked against the map (``TOLERANCE_S``)."""
    import mido

    src_path, dst_path = Path(src_path), Path(dst_path)
    audio_s = np.asarray(audio_s, dtype=np.float64)
    score_s = np.asarray(score_s, dtype=np.float64)
    _check_map(audio_s, score_s)
    mid = _read_midi(src_path)
    res = mid.ticks_per_beat
    old = _TempoMap.of(mid)
    abs_ticks = [_absolute(t) for t in mid.tracks]
    end = max(max(t, default=0) for t in abs_ticks)
    if old.seconds(end) > audio_s[-1]:
        raise SlakhError(f"{src_path}: runs to {float(old.seconds(end)):.2f} s, past the warp's end "
                         f"({audio_s[-1]:.2f} s)")

    def warp(ticks):
        return np.interp(old.seconds(ticks), audio_s, score_s)

    # first tick whose warped time is >= 0; the ticks before it are cut
    k0 = 0
    if warp(0) < 0:
        k0 = int(math.ceil(float(old.ticks_at(np.interp(0.0, score_s, audio_s)))))
        while warp(k0) < 0:   # float rounding at the boundary
            k0 += 1
    early = [float(old.seconds(k)) for t, msgs in zip(abs_ticks, mid.tracks)
             for k, m in zip(t, msgs) if k < k0 and _is_onset(m)]
    if early:
        t = min(early)
        raise SlakhError(f"{src_path}: its note at {t:.3f} s would move to {np.interp(t, audio_s, score_s):.3f} s, "
                         f"before 0 s (the warp's offset must be raised)")
    # a lead-in of whole beats carries a positive start time, since tick 0 is always 0 s
    lead_s = float(warp(k0))
    lead = res * max(1, math.ceil(lead_s * 1e6 / MAX_TEMPO_US)) if lead_s >= 1e-6 else 0

    # new tempo segments at the old tempo changes and the map's samples, both as old ticks
    sample_ticks = np.round(old.ticks_at(audio_s[(audio_s >= old.seconds(k0)) & (audio_s <= old.seconds(end))]))
    bounds = np.unique(np.concatenate([[k0, end], old.ticks[old.ticks > k0], sample_ticks]))
    bounds = bounds[(bounds >= k0) & (bounds <= end)].astype(np.int64)
    targets = warp(bounds)
    tempo_events = []
    now = 0.0
    if lead:
        us = int(round(lead_s * 1e6 * res / lead))
        tempo_events.append((0, us))
        now = us * lead / (res * 1e6)
    for a, b, target in zip(bounds[:-1], bounds[1:], targets[1:]):
        # error feedback: each tempo is rounded to a whole µs, the next one absorbs the rest
        us = max(round(float(target - now) * 1e6 * res / float(b - a)), 1)
        if us > MAX_TEMPO_US:
            raise SlakhError(
                f"{src_path}: the warp holds the score still for too long at {float(old.seconds(a)):.2f} s "
                f"({(b - a) / res:.3g} quarter notes would last {float(target - now):.2f} s; a MIDI tempo cannot be "
                f"slower than {MAX_TEMPO_US / 1e6:.2f} s per quarter note); the map must advance faster there")
        tempo_events.append((int(a - k0 + lead), us))
        now += us * (b - a) / (res * 1e6)
    if not tempo_events:   # a file of one tick: keep its tempo
        tempo_events.append((0, int(old.scale[-1] * 1e6 * res)))

    for i, (track, ticks) in enumerate(zip(mid.tracks, abs_ticks)):
        # (new tick, tempo first at a tick, original order, message)
        rows = [(max(k, k0) - k0 + lead, 1, j, m) for j, (k, m) in enumerate(zip(ticks, track))
                if m.type != "set_tempo"]
        if i == 0:   # set_tempo elsewhere is ignored by pretty_midi, as by the old map: dropped
            rows += [(k, 0, j, mido.MetaMessage("set_tempo", tempo=us)) for j, (k, us) in enumerate(tempo_events)]
        rows.sort(key=lambda r: r[:3])
        track[:] = [m.copy(time=int(k - prev)) for (k, _, _, m), prev in zip(rows, [0] + [r[0] for r in rows[:-1]])]
    with atomic_path(dst_path) as tmp:
        mid.save(str(tmp))
        return _verify(src_path, tmp, audio_s, score_s, name=dst_path)


def _notes(path: Path) -> list:
    import pretty_midi

    try:
        pm = pretty_midi.PrettyMIDI(str(path))
    except Exception as e:  # pretty_midi raises many types for corrupt files
        raise SlakhError(f"{path}: unreadable MIDI file ({type(e).__name__}: {e})") from e
    out = []
    for inst in pm.instruments:
        notes = np.array(sorted((n.start, n.pitch, n.end, n.velocity) for n in inst.notes), dtype=np.float64)
        out.append((inst.program, inst.is_drum, notes.reshape(-1, 4)))
    return out


def _verify(src: Path, dst: Path, audio_s: np.ndarray, score_s: np.ndarray, name: Path) -> int:
    """Every note of ``src`` is in ``dst`` (to be written as ``name``), same program, pitch and
    velocity, where the map says."""
    before, after = _notes(src), _notes(dst)
    n_before, n_after = sum(len(x[2]) for x in before), sum(len(x[2]) for x in after)
    if n_before != n_after or [x[:2] for x in before] != [x[:2] for x in after]:
        raise SlakhError(f"{name}: warped file has {n_after} notes in {len(after)} instruments, "
                         f"the original ({src}) {n_before} in {len(before)}")
    worst = 0.0
    for (_, _, a), (_, _, b) in zip(before, after):
        if len(a) == 0:
            continue
        if not np.array_equal(a[:, [1, 3]], b[:, [1, 3]]):
            raise SlakhError(f"{name}: warped notes differ from the original's in pitch or velocity")
        want = np.interp(a[:, [0, 2]], audio_s, score_s)
        worst = max(worst, float(np.abs(want - b[:, [0, 2]]).max()))
    if worst > TOLERANCE_S:
        raise SlakhError(f"{name}: a warped note is {worst * 1e3:.2f} ms from where the warp puts it")
    return n_after


# ---------------------------------------------------------------- tracks and corpora

def _link_or_copy(src: Path, dst: Path) -> None:
    # a hard link costs no space; every writer in this project replaces files by rename, so
    # the original behind a link is never written through it
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:   # another filesystem, or one without hard links
        shutil.copy2(src, dst)


def _audio_seconds(path: Path) -> float:
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as e:  # libsndfile reports corrupt files with a generic error type
        raise SlakhError(f"{path}: unreadable audio ({e})") from e
    return info.frames / info.samplerate


def warp_track(track_dir: str | Path, out_track_dir: str | Path, seed: int, max_offset: float = 1.0,
               max_tempo: float = 0.10, drift: float = 0.25, corpus_seed: int | None = None) -> dict:
    """Copy one track folder to ``out_track_dir``: audio and metadata unchanged (hard-linked when
    possible), every MIDI file (``MIDI/*.mid``, ``all_src.mid``, any other) warped with the same
    map, and that map written to ``warp.json``. The map covers the longest audio file and the
    longest MIDI file; its offset is raised where needed so that no note lands before 0 s.
    ``corpus_seed`` (the seed ``seed`` was derived from, :func:`track_seed`) is recorded too."""
    track, out = Path(track_dir), Path(out_track_dir)
    files = sorted(p for p in track.rglob("*") if p.is_file() and not p.name.startswith("."))
    midis = [p for p in files if p.suffix.lower() in MIDI_EXTS]
    audio = [p for p in files if p.suffix.lower() in AUDIO_EXTS]
    if not audio:
        raise SlakhError(f"{track}: no audio file, so no length for the warp to cover")
    if not midis:
        raise SlakhError(f"{track}: no MIDI file to warp")
    if (track / WARP_FILE).exists():
        # its MIDI is in score time already: a second warp would be recorded without the first
        raise SlakhError(f"{track / WARP_FILE}: the track is a warped copy; warp the original corpus")
    spans = [midi_span(p) for p in midis]
    duration = max([_audio_seconds(p) for p in audio] + [end for _, end in spans])
    params = _draw(seed, max_offset, max_tempo, drift)
    audio_s, score_s = random_warp(seed, duration, max_offset, max_tempo, drift)
    onsets = [first for first, _ in spans if first is not None]
    shift = 0.0
    if onsets:
        first = np.interp(min(onsets), audio_s, score_s)
        if first < 0:
            shift = round(-float(first) + 1e-6, 6)   # the first note lands at 0 s (+1 µs, for rounding)
            score_s = np.round(score_s + shift, 6)
    out.mkdir(parents=True, exist_ok=True)
    for p in files:
        dst = out / p.relative_to(track)
        if p.suffix.lower() in MIDI_EXTS:
            dst.parent.mkdir(parents=True, exist_ok=True)
            warp_midi(p, dst, audio_s, score_s)
        else:
            _link_or_copy(p, dst)
    record = {"version": 1, **({"corpus_seed": int(corpus_seed)} if corpus_seed is not None else {}),
              "seed": int(seed), "offset_s": round(params["offset"] + shift, 6),
              "tempo_ratio": round(params["rate"], 6), "drift_s": round(float(params["amps"].sum()), 6),
              "bounds": {"max_offset": max_offset, "max_tempo": max_tempo, "drift": drift},
              "audio_s": audio_s.tolist(), "score_s": score_s.tolist()}
    write_text(out / WARP_FILE, json.dumps(record, separators=(",", ":")) + "\n")
    return {k: v for k, v in record.items() if k not in ("audio_s", "score_s")}


def track_seed(seed: int, name: str) -> int:
    """One seed per track from the corpus seed and the track's name: the same track gets the same
    warp whichever other tracks the corpus holds."""
    return int(seed) * 2**32 + zlib.crc32(name.encode())


def _made_with(dst: Path) -> dict:
    """The corpus seed, track seed and bounds that made the warped track ``dst``, from its warp.json."""
    path = dst / WARP_FILE
    try:
        rec = json.loads(path.read_text())
        bounds = rec["bounds"]
        made = {"--seed": rec.get("corpus_seed"), "track seed": int(rec["seed"]),
                "--max-offset": float(bounds["max_offset"]), "--max-tempo": float(bounds["max_tempo"]),
                "--drift": float(bounds["drift"])}
    except FileNotFoundError:
        raise SlakhError(f"{dst}: already in --out but has no {WARP_FILE}, so what made it is unknown; "
                         f"use another --out or delete {dst}") from None
    except (OSError, KeyError, TypeError, ValueError) as e:   # ValueError: bad JSON or UTF-8, a non-number
        raise SlakhError(f"{path}: unreadable ({type(e).__name__}: {e}), so what made {dst} is unknown; "
                         f"use another --out or delete {dst}") from e
    if made["--seed"] is None:   # recorded before corpus_seed was: track_seed() puts it in the high bits
        made["--seed"] = made["track seed"] >> 32
    return made


def _options(values: dict, keys: list[str]) -> str:
    return " ".join(f"{k} {values[k]:g}" if isinstance(values[k], float) else f"{k} {values[k]}" for k in keys)


def _check_existing(dsts: list[Path], seed: int, bounds: dict) -> None:
    """Refuse when a track already in --out was made with another seed or other bounds: keeping it
    would mix two warps under one summary."""
    differ = []
    for dst in dsts:
        if not dst.exists():
            continue
        if not dst.is_dir():
            raise ValueError(f"{dst}: exists and is not a folder; use another --out or delete it")
        made = _made_with(dst)
        want = {"--seed": seed, "track seed": track_seed(seed, dst.name), **bounds}
        keys = [k for k in want if made[k] != want[k]]
        if "--seed" in keys and "track seed" in keys:   # the track seed follows from the corpus seed
            keys.remove("track seed")
        if keys:
            differ.append((dst, keys, made, want))
    if differ:
        dst, keys, made, want = differ[0]
        others = f" ({len(differ)} tracks of --out differ)" if len(differ) > 1 else ""
        raise ValueError(f"{dst / WARP_FILE}: made with {_options(made, keys)}, this run asks for "
                         f"{_options(want, keys)}{others}; "
                         f"use another --out or delete {'them' if others else dst}")


def _remove_empty(folders: list[Path]) -> None:
    for d in sorted(folders, key=lambda p: len(p.parts), reverse=True):   # deepest first
        try:
            d.rmdir()   # only when empty
        except OSError:
            pass


def warp_corpus(src: str | Path, out: str | Path, seed: int, max_offset: float = 1.0, max_tempo: float = 0.10,
                drift: float = 0.25, log: Callable[[str], None] = print) -> int:
    """``wss-ray data warp``: every track of ``src`` warped into ``out`` at the same relative path
    (a split folder given directly keeps its name: ``slakh/test`` -> ``out/test``). Tracks already
    in ``out`` are kept when made with the same seed and bounds (refused otherwise); each track
    appears whole or not at all. A track that fails is named in the log and the others go on;
    then :class:`SlakhError` names how many failed. Returns the tracks written."""
    check_bounds(max_offset, max_tempo, drift)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed: need a non-negative integer, got {seed}")
    src = Path(src)
    out = check_out_folder(out)
    tracks = list_tracks(src)   # names src when it holds no track
    s, o = src.resolve(), out.resolve()
    if o == s or o.is_relative_to(s) or s.is_relative_to(o):
        raise ValueError(f"--out {out}: overlaps --in {src}; the warped copy needs a folder of its own")
    # everything that can be refused is refused before the first folder is made
    warped = next((t for _, t in tracks if (t / WARP_FILE).exists()), None)
    if warped is not None:
        # its MIDI is in score time already: a second warp would be recorded without the first
        raise SlakhError(f"{warped / WARP_FILE}: the track is a warped copy; warp the original corpus")
    pairs = []
    for _, track in tracks:
        rel = track.relative_to(src)
        if src.name in SPLITS and len(rel.parts) == 1:
            rel = Path(src.name) / rel
        pairs.append((track, out / rel))
    bounds = {"--max-offset": float(max_offset), "--max-tempo": float(max_tempo), "--drift": float(drift)}
    _check_existing([dst for _, dst in pairs], seed, bounds)
    # the folders this call may create, so that those left empty by failures can be removed
    created = {p for _, dst in pairs for p in [dst.parent, *dst.parent.parents] if not p.exists()}

    n = len(tracks)
    log(f"[warp] {n} tracks of {src} -> {out}, seed {seed}")
    every = max(1, math.ceil(n / 10))   # about ten progress lines whatever the corpus size
    written = kept = 0
    failed: list[str] = []
    try:
        for i, (track, dst) in enumerate(pairs, 1):
            name = dst.relative_to(out)
            if dst.is_dir():
                kept += 1
            else:
                try:
                    with atomic_path(dst, directory=True, replace=False) as tmp:
                        warp_track(track, tmp, track_seed(seed, track.name), max_offset, max_tempo, drift,
                                   corpus_seed=seed)
                    written += 1
                except Exception as e:  # a bad file: named in the log and at the end, the other tracks go on
                    reason = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
                    reason = (reason.splitlines() or [type(e).__name__])[0]
                    failed.append(f"{name}: {reason}")
                    log(f"[warp] FAILED {failed[-1]}")
            if i % every == 0 or i == n:
                log(f"[warp] {i}/{n} tracks ({kept} kept from an earlier run, {len(failed)} failed)")
    finally:
        _remove_empty(list(created))
    log(f"[warp] {written} tracks warped, {kept} kept, {len(failed)} failed -> {out}: offset within "
        f"±{max_offset:g} s (raised where a note would start before 0 s), tempo within ±{max_tempo:.0%}, "
        f"drift up to {drift:g} s; the exact map of each track is in its {WARP_FILE}")
    if failed:
        rest = f"the {written + kept} others are in {out}, and a rerun keeps them" if written + kept else "none written"
        raise SlakhError(f"{len(failed)} of {n} tracks failed (the first: {failed[0]}); {rest}")
    return written


def load_warp(track_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(audio_s, score_s) of a warped track, from its ``warp.json``."""
    path = Path(track_dir) / WARP_FILE
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        raise SlakhError(f"{path}: missing (the track was not made by `wss-ray data warp`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SlakhError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(rec, dict) or rec.get("version") != 1:
        raise SlakhError(f"{path}: not a version-1 warp record")
    try:
        audio_s = np.asarray(rec["audio_s"], dtype=np.float64)
        score_s = np.asarray(rec["score_s"], dtype=np.float64)
        _check_map(audio_s, score_s)
    except (KeyError, TypeError, ValueError) as e:
        raise SlakhError(f"{path}: damaged warp map ({e})") from e
    return audio_s, score_s


def score_to_audio(times, audio_s, score_s) -> np.ndarray:
    """Score times -> audio times: the map inverted, linear between samples and extended at its
    end slopes outside them (an estimate that strays past the map still gets a finite error)."""
    t = np.asarray(times, dtype=np.float64)
    a, s = np.asarray(audio_s, dtype=np.float64), np.asarray(score_s, dtype=np.float64)
    out = np.interp(t, s, a)
    lo = (a[1] - a[0]) / (s[1] - s[0])
    hi = (a[-1] - a[-2]) / (s[-1] - s[-2])
    out = np.where(t < s[0], a[0] + (t - s[0]) * lo, out)
    return np.where(t > s[-1], a[-1] + (t - s[-1]) * hi, out)
