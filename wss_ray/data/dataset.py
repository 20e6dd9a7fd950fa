"""Readers of the Parquet contract.

``weak_dataset`` opens ``<data>/<split>/features`` only: the path to the stems is never
built, so a weakly supervised stage cannot read a reference even by mistake.
``supervised_dataset`` joins features with stems by (track, chunk) for the supervised
upper bound and for evaluation. Both yield Arrow batches that :func:`to_tensors` turns into
``mix (B, L)``, ``roll (B, K, P, N)``, ``active (B, K)`` and ``stems (B, K, L)``. The layout,
schema and manifest they read are defined in :mod:`wss_ray.data.contract`.
"""
from __future__ import annotations

import functools
import math
import threading
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from wss_ray.data.contract import (FEATURES, MANIFEST, MANIFEST_KEYS, SCHEMA_VERSION, STEM_COLUMNS, STEMS, fixed_list, fixed_to_numpy,
                                   manifest_dims, read_json_mapping, shard_files, to_tensors)


class DataError(ValueError):
    """The feature folder is missing, incomplete or of another schema."""


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest; run `wss-ray data featurize --slakh ... --out {data_dir}` first")
    try:
        manifest = read_json_mapping(path)
    except ValueError as e:
        raise DataError(str(e)) from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{path}: schema version {manifest.get('schema_version')} is not the supported "
                        f"{SCHEMA_VERSION}; re-run featurization")
    missing = [k for k in (*MANIFEST_KEYS, "splits", "fingerprint") if k not in manifest]
    if missing:
        raise DataError(f"{path}: lacks {missing}; featurize again into a fresh folder")
    return manifest


def _shards(data_dir: str | Path, split: str, kind: str) -> list[str]:
    folder = Path(data_dir) / split / kind
    files = [str(p) for p in shard_files(folder)]
    if not files:
        raise DataError(f"{folder}: no Parquet shards (is '{split}' a featurized split?)")
    return files


def feature_files(data_dir: str | Path, split: str) -> list[str]:
    return _shards(data_dir, split, FEATURES)


# Splits up to this size are held in Ray's object store once and replayed for every epoch.
MATERIALIZE_BYTES = 2 << 30
# Random-offset versions of each chunk drawn once and replayed (see _passes).
WINDOW_COPIES = 8
# Materialized splits this driver keeps for the next stage of a pipeline (estimated bytes;
# at most half of the object store).
HELD_BYTES = 2 * MATERIALIZE_BYTES
_held: dict[tuple, tuple] = {}
_held_on: tuple | None = None
# the pipeline's runs side by side open their splits from threads of one driver: one at a time,
# so two runs wanting the same split read it once
_held_lock = threading.RLock()


def _materialized(key: tuple, size: int, make, keep: tuple = ()):
    """``make().materialize()``, or the same dataset materialized earlier by this driver on the
    same Ray instance. Every stage of a pipeline opens the same splits with the same seed, and
    reading them (and drawing their windows) again cost 5-15 s of a 2-core machine per stage;
    the result is the same for the same files (path, size, mtime), options and seeds. The
    oldest are let go beyond HELD_BYTES, never this one nor those in ``keep`` (the other
    parts of the stream being built: evicting them would make the next stage miss them all);
    blocks live as long as the dataset is referenced."""
    import ray

    if not ray.is_initialized():
        return make().materialize()                     # Ray Data starts an instance of its own
    with _held_lock:
        return _materialized_held(key, size, make, keep)


def _materialized_held(key: tuple, size: int, make, keep: tuple):
    global _held_on
    import ray

    ctx = ray.get_runtime_context()
    here = (ctx.get_node_id(), ctx.get_job_id())
    if here != _held_on:                                # object refs die with their Ray instance
        _held.clear()
        _held_on = here
    key = _held_key(key)
    if key in _held:
        _held[key] = _held.pop(key)                     # most recently used last
        return _held[key][0]
    ds = make().materialize()
    _held[key] = (ds, size)
    cap = min(HELD_BYTES, ray.cluster_resources().get("object_store_memory", HELD_BYTES) // 2)
    spare = {key, *map(_held_key, keep)}
    while sum(v[1] for v in _held.values()) > cap:
        old = next((k for k in _held if k not in spare), None)
        if old is None:
            break
        _held.pop(old)
    return ds


def _held_key(key: tuple) -> tuple:
    from ray.data import DataContext

    # block order is part of the result when Ray Data is asked to keep it
    return (DataContext.get_current().execution_options.preserve_order, *key)


def release_held() -> None:
    """Let the splits kept for later stages go (the pipeline calls it when training is done)."""
    with _held_lock:
        _held.clear()


def _identity(files: list[str]) -> tuple:
    return tuple((f, (st := Path(f).stat()).st_size, st.st_mtime_ns) for f in files)


def weak_dataset(data_dir: str | Path, split: str, repeat: int = 1, seed: int | None = None,
                 windows: bool = False):
    """Ray Data Dataset of features rows (track, chunk, start, mix, roll, active). No stems.

    ``repeat`` > 1 chains that many passes (epochs) into one stream, each pass in its own
    shard order (``seed``): restarting a streaming split per epoch costs seconds, which
    dominates on small data. A split that fits comfortably in the object store is read
    once and replayed; a larger one is re-read per pass. ``windows``: random-offset windows
    (:func:`random_windows`) for training, drawn once in several copies and replayed (see _passes).
    """
    return _passes(data_dir, split, repeat, seed, attach=None, windows=windows)


def _passes(data_dir: str | Path, split: str, repeat: int, seed: int | None, attach, windows: bool = False):
    import ray

    files = feature_files(data_dir, split)
    manifest = load_manifest(data_dir)

    def read(paths):
        ds = ray.data.read_parquet(paths, file_extensions=["parquet"])
        return ds.map_batches(attach, batch_format="pyarrow", zero_copy_batch=True) if attach else ds

    def windowed(ds, window_seed: int):
        # a whole block per call: a block holds whole tracks (one shard each), so a chunk finds
        # its successor; one at a block edge keeps offset 0
        return ds.map_batches(_Windows(manifest, window_seed), batch_size=None,
                              batch_format="pyarrow") if windows else ds

    rng = np.random.default_rng(seed)
    size = sum(Path(f).stat().st_size for f in files) * 3  # parquet (zstd) -> arrow in memory, roughly
    if attach:
        size *= len(manifest["instruments"]) + 1
    # what the rows are made of: the manifest, the feature shards and, for the supervised
    # split, the stem shards attached to them
    source = (manifest["fingerprint"], _identity(files),
              _identity(_shards(data_dir, split, STEMS)) if attach else None)
    if repeat <= 1:
        if windows or size >= MATERIALIZE_BYTES:
            return windowed(read(files), int(rng.integers(1 << 31)))
        # a validation split: read once, so that every validation pass (and the next stage's)
        # replays blocks instead of starting read tasks
        return _materialized(source, size, lambda: read(files))
    copies = max(1, min(WINDOW_COPIES, repeat, MATERIALIZE_BYTES // max(size, 1))) if windows else 1
    if size < MATERIALIZE_BYTES:
        # Read once (stems, if any, attached once) and held in the object store. With windows,
        # ``copies`` versions of the split are drawn once, each by its own operator (so its
        # blocks stay apart from the other copies' and a block-order shuffle mixes tracks, not
        # copies of one chunk), and the whole is replayed in a new block order per pass. A
        # windows operator per pass instead would put one Ray Data operator per epoch into the
        # stream, and on 2 cores the executor's bookkeeping for ~70 of them cost more than the
        # training step.
        if windows:
            seeds = [int(rng.integers(1 << 31)) for _ in range(copies)]
            # each copy drawn and held on its own: a stage that needs fewer copies (a short one,
            # fine-tuning in the demo) replays the first ones another stage drew with the same
            # seed instead of reading the split and drawing again
            keys = [(*source, w) for w in seeds]
            base = []

            def draw(w):
                if not base:                            # read once, and only if a copy is missing
                    base.append(read(files).materialize())
                return windowed(base[0], w)

            drawn = [_materialized(k, size, functools.partial(draw, w), keep=keys) for k, w in zip(keys, seeds)]
            # materialized again: only block references are gathered (no task runs), and each
            # pass then replays one input instead of planning an input per copy and a union
            once = drawn[0].union(*drawn[1:]).materialize() if copies > 1 else drawn[0]
        else:
            once = _materialized(source, size, lambda: read(files))
        passes = [once.randomize_block_order(seed=int(rng.integers(1 << 31)))
                  for _ in range(math.ceil(repeat / copies))]
    else:
        passes = [windowed(read([files[i] for i in rng.permutation(len(files))]), int(rng.integers(1 << 31)))
                  for _ in range(repeat)]
    return passes[0].union(*passes[1:]) if len(passes) > 1 else passes[0]


def random_windows(table: pa.Table, manifest: dict, rng: np.random.Generator) -> pa.Table:
    """Every chunk becomes a chunk-length window starting at a random STFT frame inside it and
    running into the next chunk of its track, so training sees every alignment of notes to
    the window, not only the fixed chunk grid. Audio and rolls are sliced on the same frame
    grid: frame j of a window is frame o + j of the track's chunk sequence (a chunk's closing
    frame is the next chunk's first). A chunk without its successor in ``table`` (a track's
    last) keeps offset 0. ``start`` moves with the window; ``chunk`` still names the source
    chunk. Same schema, same row count."""
    if table.num_rows == 0:
        return table
    k, p, n, l = manifest_dims(manifest)
    hop = manifest["hop"]
    tracks = table.column("track").to_pylist()
    chunks = table.column("chunk").to_numpy()
    where = {(t, int(c)): i for i, (t, c) in enumerate(zip(tracks, chunks))}
    nxt = np.array([where.get((t, int(c) + 1), -1) for t, c in zip(tracks, chunks)])
    has = np.nonzero(nxt >= 0)[0]
    if not len(has):
        return table
    offsets = np.zeros(table.num_rows, np.int64)
    offsets[has] = rng.integers(0, n - 1, size=len(has))     # 0 .. frames per chunk - 1
    cols = {name: table.column(name) for name in table.column_names}

    def slide(name: str, shape: tuple, axis_len: int, step: int, pair) -> pa.Array:
        x = fixed_to_numpy(cols[name], shape)
        both = pair(x[has], x[nxt[has]])                        # (R', ..., 2 * axis_len - overlap)
        idx = offsets[has, None] * step + np.arange(axis_len)
        idx = idx.reshape(len(has), *([1] * (len(shape) - 1)), axis_len)
        out = x.copy()
        out[has] = np.take_along_axis(both, idx, axis=-1)
        return out

    mix = slide("mix", (l,), l, hop, lambda a, b: np.concatenate([a, b], axis=-1))
    roll = slide("roll", (k, p, n), n, 1, lambda a, b: np.concatenate([a[..., :-1], b], axis=-1))
    new = {
        "start": pa.array(table.column("start").to_numpy() + offsets * hop, pa.int64()),
        "mix": fixed_list(mix, l, pa.float32()),
        "roll": fixed_list(roll, k * p * n, pa.uint8()),
        "active": fixed_list(roll.reshape(len(roll), k, -1).max(axis=-1), k, pa.uint8()),
    }
    if "stems" in cols:
        stems = slide("stems", (k, l), l, hop, lambda a, b: np.concatenate([a, b], axis=-1))
        new["stems"] = fixed_list(stems, k * l, pa.float32())
    return pa.Table.from_arrays([new.get(name, cols[name]) for name in table.column_names], schema=table.schema)


class _Windows:
    """Ray Data UDF: the block with random-offset windows."""

    def __init__(self, manifest: dict, seed: int):
        self.manifest, self.seed = manifest, seed

    def __call__(self, batch: pa.Table) -> pa.Table:
        # offsets from the seed and the block's first track: the same whichever worker runs it
        key = zlib.crc32((batch.column("track")[0].as_py() if batch.num_rows else "").encode())
        return random_windows(batch, self.manifest, np.random.default_rng([self.seed, key]))


def _stems_for(data_dir: str, split: str, table: pa.Table) -> pa.Table:
    """Append the ``stems`` column matching (track, chunk) of each row of ``table``."""
    folder = Path(data_dir) / split / STEMS
    parts = []
    tracks = table.column("track").to_pylist()
    for track in dict.fromkeys(tracks):
        path = folder / f"{track}.parquet"
        if not path.is_file():
            raise DataError(f"{path}: stems shard missing for track {track}")
        parts.append(pq.read_table(path, columns=list(STEM_COLUMNS)))
    stems = pa.concat_tables(parts)
    key = pc.binary_join_element_wise(stems.column("track"), pc.cast(stems.column("chunk"), pa.string()), "#")
    want = pc.binary_join_element_wise(table.column("track"), pc.cast(table.column("chunk"), pa.string()), "#")
    idx = pc.index_in(want, value_set=key)
    if idx.null_count:
        raise DataError(f"{folder}: stems rows missing for some chunks of {sorted(set(tracks))}")
    return table.append_column("stems", stems.column("stems").take(idx))


class _AttachStems:
    def __init__(self, data_dir: str, split: str):
        self.data_dir, self.split = data_dir, split

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _stems_for(self.data_dir, self.split, batch)


def supervised_dataset(data_dir: str | Path, split: str, repeat: int = 1, seed: int | None = None,
                       windows: bool = False):
    """Ray Data Dataset of features rows joined with their reference stems."""
    _shards(data_dir, split, STEMS)  # fail now, naming the folder, rather than inside a Ray task
    return _passes(data_dir, split, repeat, seed, attach=_AttachStems(str(data_dir), split), windows=windows)


def load_split(data_dir: str | Path, split: str, with_stems: bool = False) -> pa.Table:
    """A whole split in memory (features, and stems when asked), for the plain loop."""
    table = pa.concat_tables([pq.read_table(f) for f in feature_files(data_dir, split)])
    return _stems_for(str(data_dir), split, table) if with_stems else table


def iter_local(data_dir: str | Path, split: str, batch_size: int, with_stems: bool = False,
               shuffle_seed: int | None = None, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """The same batches without Ray: for tests, debugging and single-process evaluation."""
    yield from iter_table(load_split(data_dir, split, with_stems), load_manifest(data_dir), batch_size,
                          shuffle_seed=shuffle_seed, drop_last=drop_last)


def iter_table(table: pa.Table, manifest: dict, batch_size: int, shuffle_seed: int | None = None,
               drop_last: bool = False, windows_seed: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of an in-memory table; random-offset windows drawn with ``windows_seed``."""
    if windows_seed is not None:
        table = random_windows(table, manifest, np.random.default_rng(windows_seed))
    order = np.arange(table.num_rows)
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        yield to_tensors(table.take(pa.array(idx)), manifest)
