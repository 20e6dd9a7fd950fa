"""A benchmark of real compositions in the Slakh layout: public-domain chamber music from
music21's corpus (string quartets by Haydn, Mozart and Beethoven, a Mozart sonata), its parts
given to electric bass, distorted guitar and piano by register, rendered with FluidSynth like
``data synth``. The generator's own songs share its idioms with the training corpus; these do
not. Never Bach: his chorales and inventions are kept for an independent check.

Per piece, the lowest part (by median pitch) becomes the bass, the highest the piano and the
parts between them guitars (two guitar stems are summed by the reader, as Slakh's doubled
guitars are); notes are folded by octaves into each instrument's range. Excerpts of
``seconds`` are cut where at least two targets sound; General MIDI programs vary per excerpt
within each class. Every excerpt goes to the ``test`` split.
"""
from __future__ import annotations

import functools
import tempfile
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from wss_ray.data.synth import PROGRAMS, Song, pool_context, synthesize_corpus

# music21 corpus paths (MusicXML), in a fixed order so a corpus is a pure function of its seed
PIECES = tuple(
    [f"haydn/opus1no1/movement{i}.mxl" for i in range(1, 6)]
    + [f"haydn/opus74no1/movement{i}.mxl" for i in range(1, 5)]
    + [f"mozart/k155/movement{i}.mxl" for i in range(1, 4)]
    + [f"mozart/k156/movement{i}.mxl" for i in range(1, 5)]
    + [f"mozart/k458/movement{i}.mxl" for i in range(1, 5)]
    + [f"mozart/k80/movement{i}.mxl" for i in range(1, 5)]
    + ["mozart/k545/movement1_exposition.mxl"]
    + [f"beethoven/opus18no1/movement{i}.mxl" for i in range(1, 5)]
    + ["beethoven/opus18no3.mxl", "beethoven/opus18no4.mxl", "beethoven/opus18no5.mxl", "beethoven/opus74.mxl"]
    + [f"beethoven/opus59no{n}/movement{i}.mxl" for n in (1, 2, 3) for i in range(1, 5)]
)
RANGES = {"bass": (28, 60), "guitar": (40, 84), "piano": (21, 108)}


class ScoreCorpusError(RuntimeError):
    """music21 is missing or a piece cannot be read."""


def _fold(pitch: int, lo: int, hi: int) -> int:
    while pitch < lo:
        pitch += 12
    while pitch > hi:
        pitch -= 12
    return pitch


def piece_parts(path: str) -> list[tuple[str, np.ndarray]]:
    """(target, notes (n, 4): start s, end s, pitch, velocity) per part of a music21 corpus
    piece, through music21's own MIDI export (tempo marks applied)."""
    if "bach" in path.lower():
        raise ScoreCorpusError(f"{path}: Bach is kept for an independent check")
    try:
        from music21 import corpus
        from music21.midi.translate import streamToMidiFile
    except ImportError as e:
        raise ScoreCorpusError(f"music21 is not installed ({e}); `pip install 'wss-ray[bench]'`") from e
    import pretty_midi

    try:
        score = corpus.parse(path)
        with tempfile.TemporaryDirectory() as tmp:
            mf = streamToMidiFile(score)
            mf.open(f"{tmp}/piece.mid", "wb")
            mf.write()
            mf.close()
            pm = pretty_midi.PrettyMIDI(f"{tmp}/piece.mid")
    except Exception as e:  # music21 and pretty_midi raise many types; the piece is named, then skipped
        raise ScoreCorpusError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    parts = [np.array([(n.start, n.end, n.pitch, n.velocity) for n in inst.notes], float)
             for inst in pm.instruments if inst.notes and not inst.is_drum]
    if len(parts) < 2:
        raise ScoreCorpusError(f"{path}: fewer than two parts with notes")
    order = np.argsort([np.median(p[:, 2]) for p in parts])
    targets = {int(order[0]): "bass", int(order[-1]): "piano"}
    out = []
    for i, notes in enumerate(parts):
        target = targets.get(i, "guitar")
        lo, hi = RANGES[target]
        notes = notes.copy()
        notes[:, 2] = [_fold(int(p), lo, hi) for p in notes[:, 2]]
        out.append((target, notes))
    return out


def _parsed(pieces: tuple[str, ...], workers: int) -> Iterator[tuple[str, object]]:
    """(path, parts or the ScoreCorpusError) per piece, in order. With ``workers`` > 1 that many
    pieces are parsed at once in worker processes (music21 takes 2-10 s a piece, one core each),
    at most ``workers`` ahead of the consumer, so stopping early parses no more than that
    beyond what was needed."""
    if workers <= 1:
        yield from ((path, _parse_or_error(path)) for path in pieces)
        return
    pool = ProcessPoolExecutor(workers, mp_context=pool_context())
    try:
        ahead: deque = deque()
        for i, path in enumerate(pieces):
            ahead.append((path, pool.submit(_parse_or_error, path)))
            last = i == len(pieces) - 1
            while ahead and (len(ahead) >= workers or last):   # the last piece submitted: drain
                done, fut = ahead.popleft()
                yield done, fut.result()
    finally:
        # the consumer has enough: what is queued is dropped; a parse already running finishes
        # on its own (seconds) rather than holding up the rendering that comes next
        pool.shutdown(wait=False, cancel_futures=True)


def _parse_or_error(path: str):
    try:
        return piece_parts(path)
    except ScoreCorpusError as e:
        return e


def excerpts(pieces: tuple[str, ...], n: int, seconds: float, per_piece: int = 2,
             log: Callable[[str], None] = print, workers: int = 1) -> list[dict]:
    """Up to ``n`` excerpts, at most ``per_piece`` from each piece in order (pieces are parsed
    ``workers`` at a time, and no further than needed), each a window of ``seconds`` where at least two
    targets have notes, windows spread over the piece. The result does not depend on
    ``workers``."""
    chosen, used = [], []
    for path, parts in _parsed(pieces, workers) if n > 0 else ():
        if isinstance(parts, ScoreCorpusError):
            log(f"[scores] skipped {parts}")
            continue
        end = max(p[:, 1].max() for _, p in parts)
        starts = np.arange(0.0, max(end - seconds, 0.0) + 1e-9, seconds)
        taken = 0
        # spread: every k-th window, so two excerpts of a movement are not back to back
        for t0 in starts[::max(1, len(starts) // per_piece)]:
            inside = [(t, notes[(notes[:, 0] < t0 + seconds) & (notes[:, 1] > t0)]) for t, notes in parts]
            if len({t for t, notes in inside if len(notes)}) >= 2:
                chosen.append({"piece": path, "start": float(t0),
                               "parts": [(t, notes - [t0, t0, 0, 0]) for t, notes in inside]})
                taken += 1
            if taken >= per_piece or len(chosen) >= n:
                break
        used.append(f"{path.removesuffix('.mxl')} ({taken})")
        if len(chosen) >= n:
            break
    # one line for all pieces (each track's metadata names its piece and offset too)
    if used:
        log(f"[scores] excerpts taken from: {', '.join(used)}")
    return chosen


def excerpt_song(chosen: list[dict], seed: int, index: int, seconds: float) -> Song:
    """The ``data synth`` composer interface: excerpt ``index`` (1-based) as a Song."""
    import pretty_midi

    ex = chosen[index - 1]
    rng = np.random.default_rng([seed, index])
    programs = {t: int(rng.choice(PROGRAMS[t])) for t in PROGRAMS}
    parts, seen = {}, {}
    for target, notes in ex["parts"]:
        inst = pretty_midi.Instrument(program=programs[target], name=target)
        for start, end, pitch, vel in notes:
            start, end = max(start, 0.0), min(end, seconds)
            if end - start > 0.02:
                inst.notes.append(pretty_midi.Note(velocity=int(np.clip(vel, 50, 120)), pitch=int(pitch),
                                                   start=float(start), end=float(end)))
        if inst.notes:
            seen[target] = seen.get(target, 0) + 1
            parts[target if seen[target] == 1 else f"{target}#{seen[target]}"] = inst
    return Song(tempo=120.0, key=0, mode=f"{ex['piece']}@{ex['start']:.0f}s", parts=parts)


def render_score_corpus(out: str | Path, n: int = 24, seconds: float = 16.0, seed: int = 0,
                        soundfont: str | None = None, sample_rate: int = 44100, workers: int = 2,
                        audio_format: str = "flac", pieces: tuple[str, ...] = PIECES,
                        log: Callable[[str], None] = print) -> dict:
    """Write ``n`` excerpts as a Slakh-format corpus (``<out>/test/TrackNNNNN``)."""
    chosen = excerpts(pieces, n, seconds, log=log, workers=workers)
    if not chosen:
        raise ScoreCorpusError("no excerpt with two sounding targets in the chosen pieces")
    log(f"[scores] {len(chosen)} excerpts of {seconds:g} s from {len({c['piece'] for c in chosen})} pieces")
    return synthesize_corpus(out, len(chosen), seconds, seed, soundfont=soundfont, sample_rate=sample_rate,
                             workers=workers, audio_format=audio_format, splits=[0.0, 0.0, 1.0],
                             composer=functools.partial(excerpt_song, chosen), log=log)
