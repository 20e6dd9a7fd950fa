"""Score-to-audio alignment against a known warp: onset error and the cost test.

Input: a corpus made by ``wss-ray data warp`` (each track's MIDI warped, the exact map in its
``warp.json``). For every track of the split, the warped ``all_src.mid`` is aligned to the mix
(score-free salience, and a transcriptor when ``--checkpoint`` is given) and each note onset
the alignment predicts is compared with where the note sounds (the warp's inverse). Also:
the error of the warped score taken as it is, and how often the cost test refuses the score of
another track (and wrongly refuses the track's own).

    python benchmarks/bench_align.py --corpus CORPUS_WARPED [--checkpoint CKPT] [--split test]
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
    a = ap.parse_args()
    tracks = [t for s, t in list_tracks(a.corpus) if s == a.split]
    features = {"salience": None}
    if a.checkpoint:
        features["transcriptor"] = RollTranscriber(a.checkpoint)
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
        for f, tr in features.items():
            kind = "transcriptor" if tr else "salience"
            t0 = time.perf_counter()
            al = align_notes(notes, wave, sr, kind, tr, check=False)
            seconds[f] += time.perf_counter() - t0
            errs[f].append(np.abs(al.to_audio(notes[:, 0]) - truth))
            own[f].append(al.cost_ratio)
            other[f].append(align_notes(wrong, wave, sr, kind, tr, check=False).cost_ratio)
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
            lim = MAX_COST_RATIO[f]
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


if __name__ == "__main__":
    main()
