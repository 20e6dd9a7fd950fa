"""Slakh-layout tracks -> Parquet shards of audio chunks with score features, on Ray Data.

One Ray Data task per track: load, resample (torchaudio), cut into chunks on the STFT frame
grid, build piano rolls and clip activity, and write two shards atomically:
``<out>/<split>/features/<track>.parquet`` (mix + score: all a weak stage may read) and
``<out>/<split>/stems/<track>.parquet`` (references). A rerun skips tracks whose shards
exist; a bad track is named in the log and in ``featurize_report.json`` and skipped.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from wss_ray.atomic import atomic_path, check_out_folder, write_text
from wss_ray.config import DataConfig, RayConfig
from wss_ray.data.contract import (FEATURES, MANIFEST, MANIFEST_KEYS, REPORT, SCHEMA_VERSION, features_schema,
                                   fixed_list, read_json_mapping, shard_files, shard_paths, stems_schema)
from wss_ray.data.score import notes_to_roll
from wss_ray.data.slakh import list_tracks, load_track, read_sources


def _write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def chunk_track(mix: np.ndarray, stems: np.ndarray, notes: list[np.ndarray], cfg: DataConfig):
    """Cut a resampled track into chunks; yields (chunk, start, mix, stems, roll, active)."""
    L = cfg.chunk_samples
    n_full, tail = divmod(len(mix), L)
    n_chunks = n_full + (1 if tail >= cfg.min_tail_fraction * L else 0)
    for c in range(n_chunks):
        start = c * L
        seg = np.zeros(L, np.float32)
        seg_stems = np.zeros((stems.shape[0], L), np.float32)
        part = mix[start:start + L]
        seg[:len(part)] = part
        seg_stems[:, :len(part)] = stems[:, start:start + L]
        roll = np.stack([notes_to_roll(n, cfg.n_frames, cfg.sample_rate, cfg.hop, cfg.pitch_min,
                                       cfg.pitch_max, start_frame=start // cfg.hop) for n in notes])
        if len(part) < L:  # no score beyond the end of the audio
            roll[:, :, len(part) // cfg.hop + 1:] = 0
        active = roll.reshape(roll.shape[0], -1).max(axis=1).astype(np.uint8)
        yield c, start, seg, seg_stems, roll, active


@functools.lru_cache(maxsize=2)
def _transcriber(checkpoint: str):
    from wss_ray.align import RollTranscriber

    return RollTranscriber.load(checkpoint)


def _score_notes(src, audio, mix: str) -> np.ndarray:
    """The notes to align with: the target parts when the mix is their sum; every pitched part
    of the score (``all_src.mid``, else each stem's MIDI) when the mix is the track's own mix
    file, which holds all of them (strings, organ, ...). Scores, never stems."""
    from wss_ray.data.score import ScoreError, load_notes

    targets = np.concatenate(audio.notes)
    if mix != "mix_file":
        return targets
    files = [src.path / "all_src.mid"] if (src.path / "all_src.mid").is_file() else \
        sorted((src.midis[next(iter(src.midis))][0].parent).glob("*.mid"))
    try:
        every = [load_notes(f, require_notes=False) for f in files]
    except ScoreError:
        return targets
    every = np.concatenate(every) if every else targets
    return every if len(every) else targets


def align_track(audio, align: str, what: str, src=None, mix: str = "sum_of_targets", max_cost: float | None = None) -> dict:
    """Move each target's notes onto the recording (in place); the alignment's summary.

    One warp for the whole track, found from the score's notes against the mix: the parts of one
    score share its timing. A track without target notes has nothing to move."""
    from wss_ray.align import align_notes

    if not sum(len(n) for n in audio.notes):
        return {"skipped": "no notes of the target instruments"}
    notes = _score_notes(src, audio, mix) if src is not None else np.concatenate(audio.notes)
    transcriber = None if align == "salience" else _transcriber(align)
    al = align_notes(notes, audio.mix, audio.sample_rate, "salience" if transcriber is None else "transcriptor",
                     transcriber, what=what, max_cost=max_cost)
    audio.notes = [al.warp_notes(n) for n in audio.notes]
    return al.summary(notes)


def featurize_track(split: str, track_dir: str, out: str, cfg_dict: dict, align: str | None = None,
                    max_cost: float | None = None) -> dict:
    """Ray Data map function: one track -> two shards. Returns a status row, never raises.

    ``align``: None (the scores are aligned, as in Slakh), "salience" or a checkpoint holding a
    transcriptor: align each track's MIDI to its mix first (:mod:`wss_ray.align`)."""
    import torch

    from wss_ray.dsp import resample

    torch.set_num_threads(1)
    cfg = DataConfig(**cfg_dict)
    track = Path(track_dir)
    t0 = time.time()
    try:
        src = read_sources(split, track, cfg)
        mapping = json.dumps(src.mapping())
        audio = load_track(src, cfg)
        alignment = (align_track(audio, align, f"{track}: score alignment", src, cfg.mix, max_cost) if align
                     else {})
        wave = torch.from_numpy(np.concatenate([audio.mix[None], audio.stems]))
        wave = resample(wave, audio.sample_rate, cfg.sample_rate).numpy()
        mix, stems = wave[0], wave[1:]
        rows = list(chunk_track(mix, stems, audio.notes, cfg))
        if not rows:
            raise ValueError(f"{track}: shorter than half a chunk ({len(mix) / cfg.sample_rate:.2f} s)")
        k, p, f, l = len(cfg.instruments), cfg.n_pitches, cfg.n_frames, cfg.chunk_samples
        n = len(rows)
        names = pa.array([track.name] * n, pa.string())
        chunks = pa.array([r[0] for r in rows], pa.int32())
        feats = pa.Table.from_arrays([
            names, chunks, pa.array([r[1] for r in rows], pa.int64()),
            fixed_list(np.stack([r[2] for r in rows]), l, pa.float32()),
            fixed_list(np.stack([r[4] for r in rows]), k * p * f, pa.uint8()),
            fixed_list(np.stack([r[5] for r in rows]), k, pa.uint8()),
        ], schema=features_schema(cfg))
        stem_tab = pa.Table.from_arrays(
            [names, chunks, fixed_list(np.stack([r[3] for r in rows]), k * l, pa.float32())], schema=stems_schema(cfg))
        fpath, spath = shard_paths(Path(out), split, track.name)
        # stems first: the features shard is the "track finished" marker
        _write_parquet(stem_tab, spath)
        _write_parquet(feats, fpath)
        return {"split": split, "track": track.name, "chunks": n, "error": "", "mapping": mapping,
                "audio_s": len(mix) / cfg.sample_rate, "seconds": time.time() - t0,
                "alignment": json.dumps(alignment)}
    except Exception as e:  # reported by name in the log and the report file, never dropped
        msg = str(e) if str(track) in str(e) else f"{track}: {type(e).__name__}: {e}"
        return {"split": split, "track": track.name, "chunks": 0, "error": msg, "mapping": "{}",
                "audio_s": 0.0, "seconds": time.time() - t0, "alignment": "{}"}


def describe_mapping(mapping: dict, instruments: list[str]) -> str:
    """One line: which stems feed each target, how many were ignored (reasons in the report)."""
    got = mapping.get("mapped", {})
    parts = [f"{i} <- {'+'.join(got[i]) if got.get(i) else '(absent)'}" for i in instruments]
    ignored = mapping.get("ignored", {})
    if ignored:
        parts.append(f"{len(ignored)} stem(s) ignored")
    parts += mapping.get("notes", [])
    return "; ".join(parts)


def summarize_mappings(mappings: dict[str, dict], instruments: list[str]) -> list[str]:
    """A few lines for the console: how many tracks feed each target set, stems ignored. The
    per-track mapping stays in the report (``wss-ray data stats`` prints it)."""
    if not mappings:
        return []
    kinds = Counter(tuple(i for i in instruments if m.get("mapped", {}).get(i)) for m in mappings.values())
    ignored = sum(len(m.get("ignored", {})) for m in mappings.values())
    summed = sum(any(len(v) > 1 for v in m.get("mapped", {}).values()) for m in mappings.values())
    parts = [f"{n} with {' + '.join(k) if k else 'no target'}" for k, n in kinds.most_common()]
    line = f"targets per track: {'; '.join(parts)}"
    extra = ([f"{summed} track(s) sum several stems into one target"] if summed else []) \
        + ([f"{ignored} stem(s) ignored"] if ignored else [])
    return [line, "; ".join(extra + [f"per-track mapping: {REPORT} or `wss-ray data stats`"])]


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(out: Path) -> str:
    """Content hash of every shard (features and stems) with its relative path."""
    h = hashlib.sha256()
    for p in shard_files(out, "*/*/*.parquet"):
        h.update(str(p.relative_to(out)).encode())
        h.update(_file_sha(p).encode())
    return h.hexdigest()[:16]


def _check_existing(out: Path, cfg: DataConfig, align: str | None = None) -> None:
    path = out / MANIFEST
    if not path.is_file():
        return
    old = read_json_mapping(path)
    if old.get("score_alignment") != align:
        raise ValueError(f"{path}: existing features were made with score alignment {old.get('score_alignment')!r}, "
                         f"this run asks for {align!r}; use another --out folder or delete this one")
    for key in MANIFEST_KEYS:
        new = getattr(cfg, key) if key != "chunk_samples" else cfg.chunk_samples
        if old.get(key) != new:
            raise ValueError(f"{path}: existing features were made with {key}={old.get(key)!r}, the config "
                             f"asks for {new!r}; use another --out folder or delete this one")


def _check_splits(out: Path, tracks: list) -> None:
    """A track already featurized under another split (a flat corpus that grew, a track moved
    between split folders) would be in two splits at once: test data in training."""
    for split, track in tracks:
        for other in out.glob(f"*/{FEATURES}/{track.name}.parquet"):
            if other.parent.parent.name != split:
                raise ValueError(f"{track}: the corpus puts this track in '{split}', the features in {out} have it "
                                 f"in '{other.parent.parent.name}'; featurize into a new --out folder")


def _clean_temp(out: Path) -> None:
    # what a killed run left: wss_ray.atomic's temporaries are hidden ".<stem>.tmp-<pid><suffix>"
    # siblings of the shards (and of the report and manifest, at the top); being named by pid,
    # a rerun would not overwrite them
    for tmp in [*out.glob(".*.tmp-*"), *out.glob("*/*/.*.tmp-*")]:
        tmp.unlink()


def check_align(align: str | None) -> str | None:
    """``--align``: None, "salience", or a checkpoint holding a transcriptor (loaded here, so a
    wrong one fails before any task starts). Returns the value to record."""
    if align is None or align == "salience":
        return align
    from wss_ray.align import RollTranscriber

    RollTranscriber.load(align)
    return str(Path(align).resolve())


def featurize(slakh: str | Path, out: str | Path, cfg: DataConfig, ray_cfg: RayConfig | None = None,
              log: Callable[[str], None] = print, engine: str = "ray", align: str | None = None,
              max_cost: float | None = None) -> dict:
    """Featurize every track under ``slakh`` into ``out``; returns the manifest.

    ``align``: the scores are not aligned to the audio; align each track's MIDI first, with the
    score-free "salience" feature or a checkpoint's transcriptor (:func:`check_align`). A track
    whose alignment fails its sanity check is named and skipped like any bad track.

    ``engine``: "ray" (Ray Data tasks, local instance or cluster) or "local" (a process pool
    of ``cfg.workers``, for machines without Ray); both write the same shards."""
    out = Path(out)
    check_out_folder(out)
    tracks = list_tracks(slakh)
    align = check_align(align)
    if max_cost is not None:
        from wss_ray.align import check_max_cost

        if not align:
            raise ValueError("--max-cost: only used with --align (the alignment check's limit)")
        check_max_cost(max_cost)
    out.mkdir(parents=True, exist_ok=True)
    _check_existing(out, cfg, align)
    _check_splits(out, tracks)
    _clean_temp(out)
    todo = [(s, t) for s, t in tracks if not shard_paths(out, s, t.name)[0].is_file()]
    log(f"[featurize] {len(tracks)} tracks in {slakh}; {len(tracks) - len(todo)} already done, "
        f"{len(todo)} to do with {cfg.workers} parallel task(s)")
    errors: list[dict] = []
    mappings: dict[str, dict] = {}
    alignments: dict[str, dict] = {}
    report_path = out / REPORT
    if report_path.is_file():  # keep earlier failures that are still unresolved
        old = read_json_mapping(report_path)
        errors = [e for e in old.get("bad_tracks", [])
                  if not shard_paths(out, e["split"], e["track"])[0].is_file()
                  and (e["split"], e["track"]) not in {(s, t.name) for s, t in todo}]
        mappings = {k: v for k, v in old.get("tracks", {}).items()
                    if shard_paths(out, *k.split("/", 1))[0].is_file()}
        alignments = {k: v for k, v in old.get("alignment", {}).items() if k in mappings}
    t0 = time.time()
    audio_s = 0.0
    done_now: dict[str, dict] = {}
    if todo:
        rows = (_map_ray(todo, out, cfg, ray_cfg, align, max_cost) if engine == "ray"
                else _map_local(todo, out, cfg, align, max_cost))
        # about ten progress lines whatever the corpus size; every failure gets its own line
        every = max(1, math.ceil(len(todo) / 10))
        for i, row in enumerate(rows, 1):
            if row["error"]:
                errors.append({"split": row["split"], "track": row["track"], "error": row["error"]})
                log(f"[featurize] {i}/{len(todo)} FAILED {row['error']}")
            else:
                audio_s += row["audio_s"]
                done_now[f"{row['split']}/{row['track']}"] = json.loads(row["mapping"])
                if align:
                    alignments[f"{row['split']}/{row['track']}"] = json.loads(row["alignment"])
            if i % every == 0 or i == len(todo):
                elapsed = time.time() - t0
                log(f"[featurize] {i}/{len(todo)} tracks, {elapsed:.0f} s"
                    + (f", ~{elapsed / i * (len(todo) - i):.0f} s left" if i < len(todo) else ""))
        for line in summarize_mappings(done_now, cfg.instruments):
            log(f"[featurize] {line}")
        mappings.update(done_now)
        if align and alignments:
            costs = np.array([a["check_ratio"] for a in alignments.values() if "check_ratio" in a] or [np.nan])
            log(f"[featurize] scores aligned ({align if align == 'salience' else 'transcriptor of ' + align}): cost "
                f"{np.median(costs):.2f} of chance (median; worst {costs.max():.2f}); per track: {REPORT}")
    wall = time.time() - t0
    report = {"bad_tracks": errors, "tracks": dict(sorted(mappings.items()))}
    if align:
        report["alignment"] = dict(sorted(alignments.items()))
    write_text(report_path, json.dumps(report, indent=2))
    manifest = write_manifest(out, cfg, source=str(slakh), align=align)
    log(f"[featurize] {sum(v['chunks'] for v in manifest['splits'].values())} chunks in "
        f"{len(manifest['splits'])} split(s); {len(errors)} bad track(s)"
        + (f" (see {report_path})" if errors else "")
        + (f"; {audio_s / wall:.1f} s of audio per s" if audio_s and wall > 0 else ""))
    manifest["_run"] = {"wall_s": wall, "audio_s": audio_s, "bad_tracks": errors}
    return manifest


def _map_ray(todo: list, out: Path, cfg: DataConfig, ray_cfg: RayConfig | None, align: str | None = None,
             max_cost: float | None = None):
    import ray

    from wss_ray.ray_session import ensure_ray

    ensure_ray(ray_cfg)
    items = [{"split": s, "track_dir": str(t)} for s, t in todo]
    cfg_dict = cfg.to_dict()
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map(lambda r: featurize_track(r["split"], r["track_dir"], str(out), cfg_dict, align, max_cost),
                num_cpus=1, compute=ray.data.TaskPoolStrategy(size=cfg.workers))
    yield from ds.iter_rows()


def _map_local(todo: list, out: Path, cfg: DataConfig, align: str | None = None, max_cost: float | None = None):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    cfg_dict = cfg.to_dict()
    # spawn: a forked child of a process holding torch or Ray threads can hang
    with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(featurize_track, s, str(t), str(out), cfg_dict, align, max_cost) for s, t in todo]
        for f in as_completed(futures):
            yield f.result()


def write_manifest(out: Path, cfg: DataConfig, source: str = "", align: str | None = None) -> dict:
    splits = {}
    for split_dir in sorted(p for p in out.iterdir() if (p / FEATURES).is_dir()):
        shards = shard_files(split_dir / FEATURES)
        chunks = sum(pq.ParquetFile(s).metadata.num_rows for s in shards)
        splits[split_dir.name] = {"tracks": len(shards), "chunks": chunks}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "sample_rate": cfg.sample_rate, "chunk_samples": cfg.chunk_samples, "chunk_seconds": cfg.chunk_seconds,
        "n_fft": cfg.n_fft, "hop": cfg.hop, "n_frames": cfg.n_frames,
        "instruments": list(cfg.instruments), "pitch_min": cfg.pitch_min, "pitch_max": cfg.pitch_max,
        "mix": cfg.mix, "splits": splits, "fingerprint": fingerprint(out), "source": source,
        # how the scores were put on the audio's time line: None = as given (aligned, as in Slakh)
        "score_alignment": align,
    }
    write_text(out / MANIFEST, json.dumps(manifest, indent=2))
    return manifest
