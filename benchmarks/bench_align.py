"""Score-to-audio alignment against a known warp: onset error and the cost test.

Input: a corpus made by ``wss-ray data warp`` (each track's MIDI warped, the exact map in its
``warp.json``). For every track of the split, the warped ``all_src.mid`` is aligned to the mix
(score-free salience, and a transcriptor when ``--checkpoint`` is given) and each note onset
the alignment predicts is compared with where the note sounds (the warp's inverse). Also:
the error of the warped score taken as it is, and how often the cost test refuses the score of
another track (and wrongly refuses the track's own).

    python benchmarks/bench_align.py --corpus CORPUS_WARPED [--checkpoint CKPT] [--split test]
    python benchmarks/bench_align.py --corpus CORPUS_WARPED --long-minutes 10   # memory and time

``--long-minutes``: one track's mix and warped score repeated to that length (a 10-minute song),
aligned once with the salience feature; prints the wall time, the DTW frame rate and the peak
resident memory of the process (DTW's cost matrix is bounded by wss_ray.align.MAX_CELLS).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from wss_ray.align import MAX_COST_RATIO, RollTranscriber, align_notes
from wss_ray.data.score import load_notes
from wss_ray.data.slakh import list_tracks, read_audio
from wss_ray.data.warp import load_warp, score_to_audio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="a corpus made by `wss-ray data warp`")
    ap.add_argument("--checkpoint", help="also align with this checkpoint's transcriptor")
    ap.add_argument("--split", default="test")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--long-minutes", type=float, default=0.0, help="only the long-song memory check")
    a = ap.parse_args()
    if a.long_minutes:
        return long_song(a.corpus, a.split, a.long_minutes)
    tracks = [t for s, t in list_tracks(a.corpus) if s == a.split]
    # each feature with and without the onset refinement after the DTW, side by side
    features = {"salience, DTW only": ("salience", None, False), "salience": ("salience", None, True)}
    if a.checkpoint:
        tr = RollTranscriber.load(a.checkpoint)
        features |= {"transcriptor, DTW only": ("transcriptor", tr, False), "transcriptor": ("transcriptor", tr, True)}
    errs = {"as given": []} | {f: [] for f in features}
    own = {f: [] for f in features}
    other = {f: [] for f in features}
    seconds = {f: 0.0 for f in features}
    audio_total = 0.0
    for i, track in enumerate(tracks):
        wave, sr = read_audio(track / "mix.flac" if (track / "mix.flac").is_file() else track / "mix.wav")
        audio_total += len(wave) / sr
        notes = load_notes(track / "all_src.mid")
        audio_s, score_s = load_warp(track)
        truth = score_to_audio(notes[:, 0], audio_s, score_s)
        errs["as given"].append(np.abs(notes[:, 0] - truth))
        wrong = load_notes(tracks[(i + 1) % len(tracks)] / "all_src.mid")
        for f, (kind, tr, refine) in features.items():
            t0 = time.perf_counter()
            al = align_notes(notes, wave, sr, kind, tr, check=False, refine=refine)
            seconds[f] += time.perf_counter() - t0
            errs[f].append(np.abs(al.to_audio(notes[:, 0]) - truth))
            own[f].append(al.check_ratio)
            other[f].append(align_notes(wrong, wave, sr, kind, tr, check=False, refine=False).check_ratio)
    out = {"corpus": a.corpus, "split": a.split, "tracks": len(tracks), "notes": int(sum(map(len, errs["as given"])))}
    print(f"{len(tracks)} tracks of {a.corpus}/{a.split}, {out['notes']} notes")
    print("| scores | onset error mean (ms) | median (ms) | 90th pct (ms) | within 50 ms | own score refused | "
          "other track's score refused | s per audio s |")
    print("|---|---|---|---|---|---|---|---|")
    for f, e in errs.items():
        e = np.concatenate(e) * 1000
        row = {"mean_ms": float(e.mean()), "median_ms": float(np.median(e)), "p90_ms": float(np.percentile(e, 90)),
               "within_50ms": float((e <= 50).mean())}
        if f in own:
            lim = MAX_COST_RATIO
            row |= {"own_refused": float(np.mean(np.array(own[f]) > lim)),
                    "other_refused": float(np.mean(np.array(other[f]) > lim)),
                    "own_cost": [float(min(own[f])), float(max(own[f]))],
                    "other_cost": [float(min(other[f])), float(max(other[f]))],
                    "s_per_audio_s": seconds[f] / audio_total}
        out[f] = row
        name = f if f == "as given" else f"aligned ({f})"
        extra = (f"{row['own_refused']:.0%} | {row['other_refused']:.0%} | {row['s_per_audio_s']:.3f}" if f in own
                 else "- | - | -")
        print(f"| {name} | {row['mean_ms']:.1f} | {row['median_ms']:.1f} | {row['p90_ms']:.1f} | "
              f"{row['within_50ms']:.0%} | {extra} |")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


def long_song(corpus: str, split: str, minutes: float) -> None:
    import resource

    track = [t for s, t in list_tracks(corpus) if s == split][0]
    wave, sr = read_audio(track / "mix.flac")
    notes = load_notes(track / "all_src.mid")                      # warped: score time
    truth = score_to_audio(notes[:, 0], *load_warp(track))         # where each note sounds
    length = len(wave) / sr
    period = float(notes[:, 1].max()) + 0.5                          # the score repeats after its last note
    reps = int(np.ceil(minutes * 60 / length))
    long_wave = np.tile(wave, reps)
    long_notes = np.concatenate([notes + np.array([r * period, r * period, 0.0]) for r in range(reps)])
    long_truth = np.concatenate([truth + r * length for r in range(reps)])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    al = align_notes(long_notes, long_wave, sr, "salience", check=False)
    took = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    err = np.abs(al.to_audio(long_notes[:, 0]) - long_truth) * 1000
    last = err[-len(notes):]
    print(f"{len(long_wave) / sr / 60:.1f} min of audio at {sr} Hz, {len(long_notes)} notes: aligned in {took:.1f} s "
          f"at {al.fps:.2f} frames/s; onset error mean {err.mean():.0f} ms, median {np.median(err):.0f} ms "
          f"(last repeat: median {np.median(last):.0f} ms); peak RSS {peak:.0f} MB (before aligning {before:.0f} MB)")


if __name__ == "__main__":
    main()
