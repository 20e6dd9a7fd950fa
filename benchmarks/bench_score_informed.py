"""Score-informed separation end to end: `Separator.separate(wave, sr, score=MIDI)` (what
``wss-ray separate --score`` runs) against score-free separation, on whole test songs.

For each test track of a corpus made by ``wss-ray data warp`` the mix is separated three ways:
without a score, with the track's warped score (aligned by the model's transcriptor, as
``separate --score`` does), and with the exact score (``--exact`` corpus, same track names: the
ceiling of the masking once alignment is perfect). Estimates are cut into the evaluation's
chunks and scored like ``wss-ray evaluate``: SI-SDR per instrument where its reference is
audible, the multi-source table (at least two targets audible) first.

    python benchmarks/bench_score_informed.py --corpus WARPED --exact CORPUS --checkpoint CKPT
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from wss_ray.config import DataConfig
from wss_ray.data.slakh import list_tracks, load_track, read_sources
from wss_ray.evaluate import MIN_SOURCES, SILENCE_PEAK
from wss_ray.losses import si_sdr
from wss_ray.audio_io import ArrayReader
from wss_ray.score_informed import ScoreGuide, score_notes
from wss_ray.separate import Separator


def exact_separation(sep: Separator, mix: np.ndarray, sr: int, midi: Path) -> dict:
    """Score-informed separation with the exact score as it is (no alignment: the ceiling)."""
    guide = ScoreGuide(sep.instruments, score_notes(midi, sep.instruments)[0])
    est = torch.cat([b for _, b, _ in sep.stream(ArrayReader(mix, sr), guide=guide)], dim=1)
    return {name: est[k] for k, name in enumerate(sep.instruments)}


def chunk_scores(est: dict, stems: np.ndarray, instruments: list[str], chunk: int) -> tuple[list, list]:
    """Per chunk: SI-SDR (K,) and audibility (K,) of the estimates against the stems."""
    sdrs, audible = [], []
    for s in range(0, stems.shape[1] - chunk + 1, chunk):
        ref = torch.as_tensor(stems[:, s:s + chunk])
        e = torch.stack([est[i][s:s + chunk] for i in instruments]).float()
        sdrs.append(si_sdr(e[None], ref[None])[0].numpy())
        audible.append((ref.abs().amax(dim=-1) > SILENCE_PEAK).numpy())
    return sdrs, audible


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="warped corpus (wss-ray data warp)")
    ap.add_argument("--exact", required=True, help="the corpus it was warped from")
    ap.add_argument("--checkpoint", help="separator checkpoint (default: the shipped model)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--chunk-seconds", type=float, default=2.048)
    ap.add_argument("--out", help="write the table as JSON here")
    a = ap.parse_args()
    sep = Separator.from_checkpoint(a.checkpoint)
    insts = sep.instruments
    cfg = DataConfig(instruments=insts)
    exact = {t.name: t for s, t in list_tracks(a.exact) if s == a.split}
    systems = {"mixture": [], "score-free": [], "score (warped, aligned)": [], "score (exact)": []}
    audible_all = []
    for split, track in list_tracks(a.corpus):
        if split != a.split:
            continue
        audio = load_track(read_sources(split, track, cfg), cfg)
        sr, mix = audio.sample_rate, audio.mix
        chunk = int(a.chunk_seconds * sr)
        ests = {"mixture": {i: torch.as_tensor(mix) for i in insts},
                "score-free": sep.separate(mix, sr),
                "score (warped, aligned)": sep.separate(mix, sr, score=track / "all_src.mid"),
                "score (exact)": exact_separation(sep, mix, sr, exact[track.name] / "all_src.mid")}
        for name, est in ests.items():
            sdrs, audible = chunk_scores(est, audio.stems, insts, chunk)
            systems[name] += sdrs
        audible_all += audible
    aud = np.array(audible_all)
    multi = aud.sum(axis=1) >= MIN_SOURCES
    out = {"checkpoint": sep.system, "split": a.split, "chunks": int(len(aud)), "multi_source_chunks": int(multi.sum())}
    print(f"{sep.system} on {a.corpus}/{a.split}: {len(aud)} chunks, {int(multi.sum())} multi-source; "
          "SI-SDR (dB), mean over chunks where the reference is audible")
    print("| system | " + " | ".join(insts) + " | avg |")
    print("|---" * (len(insts) + 2) + "|")
    for name, sdrs in systems.items():
        s = np.array(sdrs)
        means = [float(s[multi & aud[:, k], k].mean()) for k in range(len(insts))]
        out[name] = dict(zip(insts, means)) | {"avg": float(np.mean(means))}
        print(f"| {name} | " + " | ".join(f"{m:.2f}" for m in means) + f" | {np.mean(means):.2f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
