"""The contract between the featurizer (the one writer) and every reader of its output.

``wss-ray data featurize`` writes a folder that training, evaluation, tuning, the stats and
the benchmarks read later, possibly on other machines and from another revision of the code.
Everything both sides must agree on is defined here, once: the file names and layout, the
Parquet schema of the shards, the manifest's version and keys, and how a batch becomes
tensors. A change to any of it that old folders do not satisfy must bump ``SCHEMA_VERSION``,
so that ``load_manifest`` refuses such a folder instead of misreading it.

Layout of a features folder::

    manifest.json                       settings, chunk counts per split, fingerprint
    featurize_report.json               bad tracks, and each track's stem -> target mapping
    <split>/features/<track>.parquet    track, chunk, start, mix, roll, active
    <split>/stems/<track>.parquet       track, chunk, stems (references: weak stages never open these)

Per row (one chunk): ``mix (L,)`` float32, ``roll (K, P, N)`` uint8 (0/1 piano roll),
``active (K,)`` uint8 (any note of instrument k in the chunk), ``stems (K, L)`` float32,
with K instruments, P pitches, N STFT frames and L samples, each stored flat (C order) as a
fixed-size list so that a column is one contiguous buffer.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

if TYPE_CHECKING:  # readers need no config: everything they need is in the manifest
    from wss_ray.config import DataConfig

# Bump on any change to the layout, schema or manifest that old folders would not satisfy.
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "featurize_report.json"
# Settings a manifest must agree on with the config for shards to be mixed in one folder.
MANIFEST_KEYS = ("sample_rate", "chunk_samples", "n_fft", "hop", "instruments", "pitch_min", "pitch_max", "mix")
# The two shard folders of a split: the stems live apart so that a weak reader never builds their path.
# what inference must reproduce exactly: copied from the manifest into every checkpoint
# ("signal" in meta.json), read back by separate/evaluate, checked against the config by training
SIGNAL_KEYS = ("sample_rate", "n_fft", "hop", "pitch_min", "pitch_max", "chunk_samples", "instruments")
# the ones a model's weights depend on (chunk length only sets the training windows)
MODEL_SIGNAL_KEYS = ("sample_rate", "n_fft", "hop", "pitch_min", "pitch_max", "instruments")

def read_json_mapping(path: str | Path) -> dict:
    """A JSON file this project wrote (manifest, featurize report); a damaged one is named in a
    one-line error instead of a bare JSON message or a traceback further on."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                         "featurize again into a fresh folder") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}; featurize again into a fresh folder")
    return value


FEATURES = "features"
STEMS = "stems"

FEATURE_COLUMNS = ("track", "chunk", "start", "mix", "roll", "active")
STEM_COLUMNS = ("track", "chunk", "stems")
# Scalar columns' types, and the element types of the fixed-size-list columns.
_TYPES = {"track": pa.string(), "chunk": pa.int32(), "start": pa.int64(),
          "mix": pa.float32(), "roll": pa.uint8(), "active": pa.uint8(), "stems": pa.float32()}


def shard_paths(out: Path, split: str, track: str) -> tuple[Path, Path]:
    """(features shard, stems shard) of one track."""
    return out / split / FEATURES / f"{track}.parquet", out / split / STEMS / f"{track}.parquet"


def shard_files(root: str | Path, pattern: str = "*.parquet") -> list[Path]:
    """Finished shards under ``root`` matching ``pattern``, in name order.

    A shard being written is a hidden sibling that keeps the ``.parquet`` suffix
    (:func:`wss_ray.atomic.temp_sibling`), and pathlib's glob matches hidden names, so they
    are skipped by name: a reader never sees a half-written shard."""
    return sorted(p for p in Path(root).glob(pattern) if not p.name.startswith("."))


def element_shapes(k: int, p: int, n: int, l: int) -> dict[str, tuple[int, ...]]:
    """Per-row shape of each fixed-size-list column for K instruments, P pitches, N frames, L samples."""
    return {"mix": (l,), "roll": (k, p, n), "active": (k,), "stems": (k, l)}


def manifest_dims(manifest: dict) -> tuple[int, int, int, int]:
    """(K, P, N, L) of a featurized folder, from its manifest."""
    return (len(manifest["instruments"]), manifest["pitch_max"] - manifest["pitch_min"] + 1,
            manifest["n_frames"], manifest["chunk_samples"])


def _schema(columns: tuple[str, ...], cfg: DataConfig) -> pa.Schema:
    shapes = element_shapes(len(cfg.instruments), cfg.n_pitches, cfg.n_frames, cfg.chunk_samples)
    return pa.schema([(c, pa.list_(_TYPES[c], math.prod(shapes[c])) if c in shapes else _TYPES[c])
                      for c in columns])


def features_schema(cfg: DataConfig) -> pa.Schema:
    """Schema of a features shard for a ``DataConfig``."""
    return _schema(FEATURE_COLUMNS, cfg)


def stems_schema(cfg: DataConfig) -> pa.Schema:
    """Schema of a stems shard for a ``DataConfig``."""
    return _schema(STEM_COLUMNS, cfg)


def fixed_list(values: np.ndarray, size: int, typ: pa.DataType) -> pa.Array:
    """Rows of ``values`` (``size`` elements each, any shape after the first axis) as a fixed-size-list column."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), type=typ), size)


def fixed_to_numpy(col: pa.ChunkedArray | pa.Array, shape: tuple[int, ...]) -> np.ndarray:
    """A fixed-size-list column as an array of shape ``(rows, *shape)``."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(-1, *shape)


def to_tensors(batch: pa.Table | dict, manifest: dict) -> dict[str, torch.Tensor]:
    """Arrow batch (or a dict of numpy columns) -> float tensors in the shapes of the contract."""
    shapes = element_shapes(*manifest_dims(manifest))
    if isinstance(batch, dict):
        # a list column of a numpy batch may come as an object array of per-row arrays
        get = lambda name: np.asarray(np.stack(list(batch[name])) if batch[name].dtype == object
                                      else batch[name]).reshape(-1, *shapes[name])
    else:
        get = lambda name: fixed_to_numpy(batch.column(name), shapes[name])
    names = batch.column_names if not isinstance(batch, dict) else list(batch)
    out = {
        "mix": torch.from_numpy(np.require(get("mix"), np.float32, ["C", "W"])),
        "roll": torch.from_numpy(get("roll").astype(np.float32)),
        "active": torch.from_numpy(get("active").astype(np.float32)),
    }
    if "stems" in names:
        out["stems"] = torch.from_numpy(np.require(get("stems"), np.float32, ["C", "W"]))
    return out
