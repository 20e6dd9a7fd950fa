"""A synthetic corpus in the Slakh2100 layout, made the way Slakh was: MIDI rendered by
a sample-based synthesizer (FluidSynth + a General MIDI soundfont).

Songs are composed procedurally from a seed: key, mode, tempo, a chord progression,
sections in which instruments rest, a bass line that follows the harmony, guitar power
chords or riffs, piano voicings and arpeggios, varied registers, densities, velocities and
General MIDI programs within each class. Each stem is rendered with a fixed gain, all stems
of a track are scaled by one common factor and quantised to 16 bit, and the mix is the
integer sum of the quantised stems, so mix == sum(stems) holds exactly in the files.
"""
from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import yaml

from wss_ray.atomic import atomic_path, check_out_folder
from wss_ray.config import INSTRUMENT_CLASSES

SOUNDFONT_CANDIDATES = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
    "/usr/share/soundfonts/default.sf2",
)
INSTALL_HINT = ("install them with `sudo apt-get install libfluidsynth3 fluid-soundfont-gm` and "
                "`pip install 'wss-ray[synth]'` (or run `make setup`)")

# General MIDI programs per target, all inside the class the Slakh reader maps them to.
PROGRAMS = {
    "piano": (0, 1, 2, 4, 5),     # acoustic/bright/electric grand, two electric pianos
    "guitar": (29, 30),           # overdriven, distortion
    "bass": (33, 34, 35),         # finger, pick, fretless
}
MAJOR = (0, 2, 4, 5, 7, 9, 11)
MINOR = (0, 2, 3, 5, 7, 8, 10)
PROGRESSIONS = {
    "major": ((0, 4, 5, 3), (0, 3, 4, 0), (1, 4, 0, 0), (0, 5, 3, 4), (0, 3, 0, 4)),
    "minor": ((0, 5, 2, 6), (0, 3, 4, 0), (0, 6, 5, 6), (0, 5, 6, 4)),
}


class SynthError(RuntimeError):
    """The synthesizer or its soundfont is missing or unusable."""


def find_soundfont(path: str | None = None) -> Path:
    if path:
        p = Path(path)
        if not p.is_file():
            raise SynthError(f"soundfont not found: {p}")
        return p
    env = os.environ.get("WSS_RAY_SOUNDFONT")
    for cand in ([env] if env else []) + list(SOUNDFONT_CANDIDATES):
        if cand and Path(cand).is_file():
            return Path(cand)
    raise SynthError("no General MIDI soundfont found (looked in " + ", ".join(SOUNDFONT_CANDIDATES)
                     + "); " + INSTALL_HINT + ", or pass --soundfont PATH")


def _import_fluidsynth():
    try:
        import fluidsynth  # noqa: F401
    except (ImportError, OSError) as e:
        raise SynthError(f"FluidSynth is not available ({e}); {INSTALL_HINT}") from e
    return fluidsynth


# ---------------------------------------------------------------- composition

@dataclass
class Song:
    tempo: float
    key: int
    mode: str
    parts: dict[str, "object"]  # instrument name -> pretty_midi.Instrument


def _chord(key: int, mode: str, degree: int) -> list[int]:
    """Diatonic triad on a scale degree, as pitch classes relative to C (root first)."""
    scale = MAJOR if mode == "major" else MINOR
    return [(key + scale[(degree + i) % 7]) % 12 for i in (0, 2, 4)]


def _in_range(pc: int, low: int) -> int:
    """Lowest pitch >= low with pitch class pc."""
    return low + (pc - low) % 12


def compose(seed: int, index: int, seconds: float) -> Song:
    import pretty_midi

    rng = np.random.default_rng([seed, index])
    mode = "major" if rng.random() < 0.6 else "minor"
    key = int(rng.integers(12))
    tempo = float(rng.integers(80, 161))
    beat = 60.0 / tempo
    bar = 4 * beat
    n_bars = int(math.ceil(seconds / bar)) + 1
    prog = PROGRESSIONS[mode][int(rng.integers(len(PROGRESSIONS[mode])))]
    bars_per_chord = int(rng.choice([1, 2]))
    chords = [_chord(key, mode, prog[(b // bars_per_chord) % len(prog)]) for b in range(n_bars)]

    names = list(PROGRAMS)
    present = set(names)
    if rng.random() < 0.15:  # some tracks lack an instrument altogether, as in Slakh
        present.discard(names[int(rng.integers(len(names)))])
    # As in Slakh's multi-instrument songs the band mostly plays together (sections of 2 bars);
    # an instrument may enter late (its first one or two sections silent) and rests now and then,
    # never all at once.
    entry = {n: int(rng.integers(1, 3)) if rng.random() < 0.2 else 0 for n in names}
    plays = {n: [] for n in names}
    for i, s in enumerate(range(0, n_bars, 2)):
        on = {n: n in present and i >= entry[n] and rng.random() < 0.95 for n in names}
        if not any(on.values()):
            on[sorted(present)[int(rng.integers(len(present)))]] = True
        for n in names:
            plays[n] += [on[n]] * 2

    parts = {}
    for name in names:
        if name not in present:
            continue
        program = int(rng.choice(PROGRAMS[name]))
        inst = pretty_midi.Instrument(program=program, name=name)
        density = float(rng.uniform(0.6, 1.0))
        base_vel = int(rng.integers(60, 111))
        writer = {"bass": _bass, "guitar": _guitar, "piano": _piano}[name]
        writer(inst, rng, chords, plays[name], beat, density, base_vel)
        inst.notes = [n for n in inst.notes if n.start < seconds - 0.05]
        for n in inst.notes:
            n.end = min(n.end, seconds)
        if inst.notes:
            parts[name] = inst
    return Song(tempo=tempo, key=key, mode=mode, parts=parts)


def _add(inst, pitch: int, start: float, dur: float, vel: int) -> None:
    import pretty_midi

    vel = int(np.clip(vel, 20, 127))
    inst.notes.append(pretty_midi.Note(velocity=vel, pitch=int(pitch), start=start, end=start + dur))


def _bass(inst, rng, chords, plays, beat, density, vel) -> None:
    pattern = rng.choice(["whole", "eighths", "root_fifth", "walking"])
    low = int(rng.integers(28, 36))
    for b, chord in enumerate(chords):
        if not plays[b]:
            continue
        t0 = b * 4 * beat
        root = _in_range(chord[0], low)
        fifth = root + 7
        nxt = _in_range(chords[(b + 1) % len(chords)][0], low)
        if pattern == "whole":
            _add(inst, root, t0, 3.8 * beat, vel + 10)
        elif pattern == "eighths":
            for i in range(8):
                if rng.random() < density or i == 0:
                    _add(inst, root, t0 + i * beat / 2, 0.45 * beat, vel + (12 if i % 2 == 0 else 0))
        elif pattern == "root_fifth":
            for i, p in enumerate((root, fifth, root + 12 if root + 12 < 60 else root, fifth)):
                _add(inst, p, t0 + i * beat, 0.9 * beat, vel + (10 if i == 0 else 0))
        else:  # walking: chord tones then a chromatic approach to the next root
            third = _in_range(chord[1], root)
            approach = nxt - 1 if nxt > root else nxt + 1
            for i, p in enumerate((root, third, fifth, approach)):
                _add(inst, p, t0 + i * beat, 0.95 * beat, vel + int(rng.integers(-8, 9)))


def _guitar(inst, rng, chords, plays, beat, density, vel) -> None:
    pattern = rng.choice(["sustain", "chug", "riff"])
    low = int(rng.integers(40, 48))
    for b, chord in enumerate(chords):
        if not plays[b]:
            continue
        t0 = b * 4 * beat
        root = _in_range(chord[0], low)
        power = (root, root + 7, root + 12)
        if pattern == "sustain":
            for i in range(2):
                for p in power:
                    _add(inst, p, t0 + 2 * i * beat, 1.9 * beat, vel)
        elif pattern == "chug":  # palm-muted eighths, accents on the beat
            for i in range(8):
                if rng.random() < density or i == 0:
                    d = 0.3 * beat if rng.random() < 0.7 else 0.48 * beat
                    for p in power[:2]:
                        _add(inst, p, t0 + i * beat / 2, d, vel + (15 if i % 2 == 0 else 0))
        else:  # minor-pentatonic riff from the chord root, an octave up
            penta = [root + 12 + s for s in (0, 3, 5, 7, 10, 12)]
            for i in range(8):
                if rng.random() < density:
                    _add(inst, int(rng.choice(penta)), t0 + i * beat / 2, 0.45 * beat,
                         vel + int(rng.integers(-10, 11)))


def _piano(inst, rng, chords, plays, beat, density, vel) -> None:
    pattern = rng.choice(["block", "arpeggio", "broken"])
    low = int(rng.integers(53, 64))  # register of the right hand
    sixteenths = rng.random() < 0.4
    for b, chord in enumerate(chords):
        if not plays[b]:
            continue
        t0 = b * 4 * beat
        inversion = int(rng.integers(3))
        pcs = chord[inversion:] + chord[:inversion]
        voicing = []
        for pc in pcs:
            voicing.append(_in_range(pc, voicing[-1] + 1 if voicing else low))
        bassnote = _in_range(chord[0], low - 24 if low - 24 >= 33 else low - 12)
        if pattern == "block":
            for i in range(0, 4, 2):
                _add(inst, bassnote, t0 + i * beat, 1.9 * beat, vel - 5)
                for p in voicing:
                    _add(inst, p, t0 + i * beat, 1.8 * beat, vel)
        elif pattern == "arpeggio":
            step = beat / 4 if sixteenths else beat / 2
            seq = voicing + [voicing[0] + 12] + voicing[::-1][1:]
            _add(inst, bassnote, t0, 3.8 * beat, vel)
            for i in range(int(round(4 * beat / step))):
                if rng.random() < density or i == 0:
                    _add(inst, seq[i % len(seq)], t0 + i * step, 1.5 * step, vel - 8 + (8 if i % 4 == 0 else 0))
        else:  # broken: bass on 1 and 3, chord on 2 and 4
            for i in range(4):
                if i % 2 == 0:
                    _add(inst, bassnote, t0 + i * beat, 0.95 * beat, vel)
                elif rng.random() < density or i == 1:
                    for p in voicing:
                        _add(inst, p, t0 + i * beat, 0.8 * beat, vel - 10)


# ---------------------------------------------------------------- rendering

_WORKER: tuple[str, int] | None = None


def _init_worker(soundfont: str, sample_rate: int) -> None:
    global _WORKER
    _import_fluidsynth()
    _WORKER = (soundfont, sample_rate)


def _new_synth():
    """A fresh synthesizer per track: FluidSynth keeps state between renders (voices, block
    buffers) that would make a track depend on what its worker rendered before; loading
    the soundfont again costs about 0.1 s (the file is in the page cache)."""
    fluidsynth = _import_fluidsynth()
    soundfont, sample_rate = _WORKER
    # Reverb and chorus off: the score must describe the audio.
    synth = fluidsynth.Synth(gain=0.5, samplerate=sample_rate,
                             **{"synth.reverb.active": 0, "synth.chorus.active": 0})
    sfid = synth.sfload(soundfont)
    if sfid == -1:
        raise SynthError(f"FluidSynth could not load soundfont {soundfont}")
    return synth, sfid, sample_rate


def render_instrument(synth_state, inst, n_samples: int) -> np.ndarray:
    """Render one instrument; float64, exactly n_samples long."""
    synth, sfid, sr = synth_state
    synth.system_reset()
    synth.program_select(0, sfid, 0, inst.program)
    events = sorted([(n.start, 1, n.pitch, n.velocity) for n in inst.notes]
                    + [(n.end, 0, n.pitch, 0) for n in inst.notes])
    out = np.zeros(n_samples, dtype=np.float64)
    pos = 0
    for t, on, pitch, velocity in events:
        target = min(int(round(t * sr)), n_samples)
        if target > pos:
            out[pos:target] = synth.get_samples(target - pos)[::2] / 32768.0
            pos = target
        if on:
            synth.noteon(0, pitch, velocity)
        else:
            synth.noteoff(0, pitch)
    if pos < n_samples:
        out[pos:] = synth.get_samples(n_samples - pos)[::2] / 32768.0
    synth.system_reset()
    return out


def _loudness_db(x: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    return round(20 * math.log10(rms) if rms > 0 else -120.0, 2)


def make_track(out_dir: str, split: str, index: int, seed: int, seconds: float,
               audio_format: str, soundfont_name: str, composer: Callable[[int, int, float], Song] | None = None) -> dict:
    """Compose (``composer(seed, index, seconds)``, default :func:`compose`), write and render
    one track into <out>/<split>/TrackNNNNN (atomically). A part named ``guitar#2`` is a second
    stem of the guitar target."""
    import pretty_midi
    import soundfile as sf

    t_start = time.time()
    name = f"Track{index:05d}"
    final = Path(out_dir) / split / name
    if final.is_dir():
        return {"track": name, "split": split, "skipped": True, "seconds": 0.0}
    # a track folder appears whole or not at all: an interrupted run redoes only unfinished tracks
    with atomic_path(final, directory=True, replace=False) as tmp:
        (tmp / "stems").mkdir(parents=True)
        (tmp / "MIDI").mkdir()

        song = (composer or compose)(seed, index, seconds)
        synth_state = _new_synth()
        sr = synth_state[2]
        n = int(round(seconds * sr))
        full = pretty_midi.PrettyMIDI(initial_tempo=song.tempo)
        stems, meta_stems = {}, {}
        for s_idx, (inst_name, inst) in enumerate(song.parts.items()):
            sid = f"S{s_idx:02d}"
            one = pretty_midi.PrettyMIDI(initial_tempo=song.tempo)
            one.instruments.append(inst)
            one.write(str(tmp / "MIDI" / f"{sid}.mid"))
            full.instruments.append(inst)
            # render what the file holds (tick-quantised), so score and audio agree exactly
            rendered = pretty_midi.PrettyMIDI(str(tmp / "MIDI" / f"{sid}.mid")).instruments[0]
            stems[sid] = render_instrument(synth_state, rendered, n)
            cls = INSTRUMENT_CLASSES[inst_name.split("#")[0]][0]
            meta_stems[sid] = {
                "audio_rendered": True, "inst_class": cls, "integrated_loudness": 0.0,
                "is_drum": False, "midi_program_name": pretty_midi.program_to_instrument_name(inst.program),
                "midi_saved": True, "plugin_name": soundfont_name, "program_num": int(inst.program),
            }
        full.write(str(tmp / "all_src.mid"))
        synth_state[0].delete()

        total = sum(stems.values()) if stems else np.zeros(n)
        peak = float(np.max(np.abs(total))) if n else 0.0
        scale = 0.8 / peak if peak > 0.8 else 1.0
        q = {sid: np.round(np.clip(x * scale, -1, 1) * 32767).astype(np.int16) for sid, x in stems.items()}
        mix = np.sum([v.astype(np.int32) for v in q.values()], axis=0) if q else np.zeros(n, np.int32)
        assert np.abs(mix).max(initial=0) <= 32767, "mix exceeds 16-bit range"
        ext = audio_format
        for sid, x in q.items():
            sf.write(str(tmp / "stems" / f"{sid}.{ext}"), x, sr, subtype="PCM_16")
            meta_stems[sid]["integrated_loudness"] = _loudness_db(x / 32768.0)
        sf.write(str(tmp / f"mix.{ext}"), mix.astype(np.int16), sr, subtype="PCM_16")
        meta = {
            "UUID": hashlib.sha1(f"{seed}-{index}".encode()).hexdigest(),
            "audio_dir": "stems", "midi_dir": "MIDI", "lmd_midi_dir": f"synthetic/{seed}/{index}.mid",
            "normalization_factor": -13.0, "normalized": True, "overall_gain": round(scale, 6),
            "stems": meta_stems, "target_peak": -1.0,
            "synthetic": {"seed": seed, "tempo": song.tempo, "key": song.key, "mode": song.mode},
        }
        (tmp / "metadata.yaml").write_text(yaml.safe_dump(meta, sort_keys=True))
    return {"track": name, "split": split, "skipped": False, "seconds": time.time() - t_start}


def split_plan(tracks: int, fractions: list[float]) -> list[str]:
    """Split name of each track (1-based order); every split gets one track when possible."""
    names = ["train", "validation", "test"]
    counts = [int(math.floor(f * tracks)) for f in fractions]
    for i in range(3):
        if counts[i] == 0 and fractions[i] > 0 and sum(counts) < tracks:
            counts[i] = 1
    while sum(counts) < tracks:
        counts[0] += 1
    while sum(counts) > tracks:
        counts[int(np.argmax(counts))] -= 1
    return [n for n, c in zip(names, counts) for _ in range(c)]


def pool_context():
    """The start method for a pool of worker processes. Fork only from a single-threaded caller
    without torch: a forked child of a process holding threads (a Ray driver, say, or torch's
    OpenMP pool once it has run an op) can wait forever on a lock held at fork time (seen:
    rendering hung after a torch STFT in the same process). Spawn needs the caller's main module
    to be importable (the `if __name__ == "__main__":` idiom)."""
    forkable = threading.active_count() == 1 and "torch" not in sys.modules
    method = "fork" if forkable and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


def synthesize_corpus(out: str | Path, tracks: int, seconds: float, seed: int,
                      soundfont: str | None = None, sample_rate: int = 44100, workers: int = 2,
                      audio_format: str = "flac", splits: list[float] | None = None,
                      composer: Callable[[int, int, float], Song] | None = None,
                      log: Callable[[str], None] = print) -> dict:
    """Write a Slakh-format corpus; finished tracks of an earlier run are kept."""
    if tracks <= 0 or seconds <= 0:
        raise ValueError(f"--tracks and --seconds must be > 0 (got {tracks}, {seconds})")
    splits = [0.7, 0.15, 0.15] if splits is None else list(splits)
    if len(splits) != 3 or not all(math.isfinite(f) and f >= 0 for f in splits) or abs(sum(splits) - 1) > 1e-6:
        raise ValueError(f"--splits: three shares (train validation test), each 0 or more, summing to 1 (got {splits})")
    _import_fluidsynth()
    sf2 = find_soundfont(soundfont)
    out = check_out_folder(out)
    plan = split_plan(tracks, splits)
    for split in set(plan):
        (out / split).mkdir(parents=True, exist_ok=True)
    log(f"[synth] {tracks} tracks x {seconds:g} s at {sample_rate} Hz, seed {seed}, soundfont {sf2.name}, "
        f"{workers} worker(s) -> {out}")
    t0 = time.time()
    done = 0
    results = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=pool_context(),
                             initializer=_init_worker,
                             initargs=(str(sf2), sample_rate)) as pool:
        futures = [pool.submit(make_track, str(out), split, i + 1, seed, seconds, audio_format, sf2.name, composer)
                   for i, split in enumerate(plan)]
        # about ten progress lines whatever the corpus size: a line per track drowns the console
        every = max(1, math.ceil(tracks / 10))
        for fut in as_completed(futures):
            r = fut.result()
            done += 1
            results.append(r)
            if done % every == 0 or done == tracks:
                kept = sum(x["skipped"] for x in results)
                elapsed = time.time() - t0
                eta = elapsed / done * (tracks - done)
                log(f"[synth] {done}/{tracks} tracks ({kept} kept from an earlier run), {elapsed:.0f} s"
                    + (f", ~{eta:.0f} s left" if done < tracks else ""))
    wall = time.time() - t0
    rendered = [r for r in results if not r["skipped"]]
    audio_s = len(rendered) * seconds
    log(f"[synth] done in {wall:.1f} s ({audio_s / wall if wall > 0 else 0:.1f} s of audio per s)")
    return {"tracks": tracks, "rendered": len(rendered), "wall_s": wall, "audio_s": audio_s}
