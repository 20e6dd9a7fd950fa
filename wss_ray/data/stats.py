"""What a corpus holds, before and after featurization.

``corpus_stats`` reads a Slakh-layout folder's metadata (no audio is decoded) and says, per
track, which stems feed which target and why the others are ignored, so a user sees what the
reader will do with their data. ``feature_stats`` counts, per split of a featurized folder, the
chunks with 0, 1, 2 or 3 audible targets (the reference stems above the evaluation's silence
threshold) and with 0..K instruments in the score.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq

from wss_ray.config import DataConfig
from wss_ray.data.contract import FEATURES, REPORT, STEMS, read_json_mapping, shard_files
from wss_ray.data.dataset import load_manifest
from wss_ray.data.featurize import describe_mapping
from wss_ray.data.slakh import SlakhError, list_tracks, read_sources

# the evaluation's rule: a reference whose peak is under this (about -60 dBFS) is silent
SILENCE_PEAK = 1e-3


def corpus_stats(root: str | Path, cfg: DataConfig, log: Callable[[str], None] = print) -> dict:
    """Per-track stem mapping of a Slakh-layout corpus; returns {"split/track": mapping or error}."""
    out: dict[str, dict] = {}
    tracks = list_tracks(root)
    have = {i: 0 for i in cfg.instruments}
    for split, track in tracks:
        key = f"{split}/{track.name}"
        try:
            src = read_sources(split, track, cfg)
        except SlakhError as e:
            out[key] = {"error": str(e)}
            log(f"{key}: UNUSABLE {e}")
            continue
        m = src.mapping()
        out[key] = m
        for i in m["mapped"]:
            have[i] += 1
        log(f"{key}: {describe_mapping({**m, 'ignored': {}}, cfg.instruments)}")
        for sid, why in m["ignored"].items():
            log(f"    {sid} ignored: {why}")
    n_ok = sum("error" not in v for v in out.values())
    every = sum(all(i in v.get("mapped", {}) for i in cfg.instruments) for v in out.values())
    log(f"{len(tracks)} track(s), {n_ok} usable; tracks with "
        + ", ".join(f"{i}: {n}" for i, n in have.items()) + f"; with all {len(cfg.instruments)}: {every}")
    return out


def feature_stats(data: str | Path, log: Callable[[str], None] = print) -> dict:
    """Chunk density per split: how many chunks have n audible targets (and n scored ones)."""
    data = Path(data)
    manifest = load_manifest(data)
    k = len(manifest["instruments"])
    result = {}
    for split in sorted(manifest["splits"]):
        scored = np.zeros(k + 1, np.int64)
        audible = np.zeros(k + 1, np.int64)
        for shard in shard_files(data / split / FEATURES):
            active = pq.read_table(shard, columns=["active"]).column("active").combine_chunks()
            counts = active.flatten().to_numpy(zero_copy_only=False).reshape(-1, k).sum(1)
            scored += np.bincount(counts, minlength=k + 1)
            stems = data / split / STEMS / shard.name
            if stems.is_file():
                col = pq.read_table(stems, columns=["stems"]).column("stems").combine_chunks()
                peak = np.abs(col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), k, -1)).max(-1)
                audible += np.bincount((peak > SILENCE_PEAK).sum(1), minlength=k + 1)
        n = int(scored.sum())
        result[split] = {"chunks": n, "scored": scored.tolist(), "audible": audible.tolist()}
        share = lambda c: " / ".join(f"{i}: {v / max(n, 1):.0%}" for i, v in enumerate(c))
        log(f"{split}: {n} chunks; audible targets per chunk {share(audible)}; "
            f"instruments in the score {share(scored)}")
    report = data / REPORT
    if report.is_file():
        tracks = read_json_mapping(report).get("tracks", {})
        for key, m in tracks.items():
            log(f"{key}: {describe_mapping(m, manifest['instruments'])}")
    return result
