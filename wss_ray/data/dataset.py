"""Readers of the Parquet contract.

``weak_dataset`` opens ``<data>/<split>/features`` only: the path to the stems is never
built, so a weakly supervised stage cannot read a reference even by mistake.
``supervised_dataset`` joins features with stems by (track, chunk) for the supervised
upper bound and for evaluation. Both yield Arrow batches that :func:`to_tensors` turns into
``mix (B, L)``, ``roll (B, K, P, N)``, ``active (B, K)`` and ``stems (B, K, L)``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from wss_ray.data.featurize import MANIFEST, SCHEMA_VERSION


class DataError(ValueError):
    """The feature folder is missing, incomplete or of another schema."""


def load_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{path}: no manifest; run `wss-ray data featurize --slakh ... --out {data_dir}` first")
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{path}: schema version {manifest.get('schema_version')} is not the supported "
                        f"{SCHEMA_VERSION}; re-run featurization")
    return manifest


def _shards(data_dir: str | Path, split: str, kind: str) -> list[str]:
    folder = Path(data_dir) / split / kind
    files = sorted(str(p) for p in folder.glob("*.parquet") if not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: no Parquet shards (is '{split}' a featurized split?)")
    return files


def feature_files(data_dir: str | Path, split: str) -> list[str]:
    return _shards(data_dir, split, "features")


# Splits up to this size are held in Ray's object store once and replayed for every epoch.
MATERIALIZE_BYTES = 2 << 30


def weak_dataset(data_dir: str | Path, split: str, repeat: int = 1, seed: int | None = None):
    """Ray Data Dataset of features rows (track, chunk, start, mix, roll, active). No stems.

    ``repeat`` > 1 chains that many passes (epochs) into one stream, each pass in its own
    shard order (``seed``): restarting a streaming split per epoch costs seconds, which
    dominates on small data. A split that fits comfortably in the object store is read
    once and replayed; a larger one is re-read per pass.
    """
    return _passes(data_dir, split, repeat, seed, attach=None)


def _passes(data_dir: str | Path, split: str, repeat: int, seed: int | None, attach):
    import ray

    files = feature_files(data_dir, split)

    def read(paths):
        ds = ray.data.read_parquet(paths, file_extensions=["parquet"])
        return ds.map_batches(attach, batch_format="pyarrow", zero_copy_batch=True) if attach else ds

    if repeat <= 1:
        return read(files)
    rng = np.random.default_rng(seed)
    size = sum(Path(f).stat().st_size for f in files) * 3  # parquet (zstd) -> arrow in memory, roughly
    if attach:
        size *= len(load_manifest(data_dir)["instruments"]) + 1
    if size < MATERIALIZE_BYTES:
        once = read(files).materialize()  # stems (if any) attached once, not per pass
        passes = [once.randomize_block_order(seed=int(rng.integers(1 << 31))) for _ in range(repeat)]
    else:
        passes = [read([files[i] for i in rng.permutation(len(files))]) for _ in range(repeat)]
    return passes[0].union(*passes[1:])


def _stems_for(data_dir: str, split: str, table: pa.Table) -> pa.Table:
    """Append the ``stems`` column matching (track, chunk) of each row of ``table``."""
    folder = Path(data_dir) / split / "stems"
    parts = []
    tracks = table.column("track").to_pylist()
    for track in dict.fromkeys(tracks):
        path = folder / f"{track}.parquet"
        if not path.is_file():
            raise DataError(f"{path}: stems shard missing for track {track}")
        parts.append(pq.read_table(path, columns=["track", "chunk", "stems"]))
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


def supervised_dataset(data_dir: str | Path, split: str, repeat: int = 1, seed: int | None = None):
    """Ray Data Dataset of features rows joined with their reference stems."""
    _shards(data_dir, split, "stems")  # fail now, naming the folder, rather than inside a Ray task
    return _passes(data_dir, split, repeat, seed, attach=_AttachStems(str(data_dir), split))


def _fixed_to_numpy(col: pa.ChunkedArray | pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, *shape)


def to_tensors(batch: pa.Table | dict, manifest: dict) -> dict[str, torch.Tensor]:
    """Arrow batch (or a dict of numpy columns) -> float tensors in the shapes of the contract."""
    k = len(manifest["instruments"])
    p = manifest["pitch_max"] - manifest["pitch_min"] + 1
    n, l = manifest["n_frames"], manifest["chunk_samples"]
    if isinstance(batch, dict):
        get = lambda name, shape: np.asarray(np.stack(list(batch[name])) if batch[name].dtype == object
                                             else batch[name]).reshape(-1, *shape)
    else:
        get = lambda name, shape: _fixed_to_numpy(batch.column(name), shape)
    names = batch.column_names if not isinstance(batch, dict) else list(batch)
    out = {
        "mix": torch.from_numpy(np.require(get("mix", (l,)), np.float32, ["C", "W"])),
        "roll": torch.from_numpy(get("roll", (k, p, n)).astype(np.float32)),
        "active": torch.from_numpy(get("active", (k,)).astype(np.float32)),
    }
    if "stems" in names:
        out["stems"] = torch.from_numpy(np.require(get("stems", (k, l)), np.float32, ["C", "W"]))
    return out


def iter_local(data_dir: str | Path, split: str, batch_size: int, with_stems: bool = False,
               shuffle_seed: int | None = None, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """The same batches without Ray: for tests, debugging and single-process evaluation."""
    manifest = load_manifest(data_dir)
    table = pa.concat_tables([pq.read_table(f) for f in feature_files(data_dir, split)])
    if with_stems:
        table = _stems_for(str(data_dir), split, table)
    order = np.arange(table.num_rows)
    if shuffle_seed is not None:
        np.random.default_rng(shuffle_seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        if drop_last and len(idx) < batch_size:
            break
        yield to_tensors(table.take(pa.array(idx)), manifest)
