"""Resolve what users pass as --parent: a checkpoint folder, a stage output folder holding
``checkpoint/``, a Tune handoff record (``best.json``) naming the best trial's checkpoint, or a
Tune experiment folder holding that record. Checkpoints on object storage (s3://, gs://) are
downloaded once into a local cache."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from wss_ray.atomic import atomic_path
from wss_ray.checkpoint import CHECKPOINT_DIR, META_FILE, CheckpointError

HANDOFF = "best.json"


def _fetch(uri: str) -> Path:
    from ray.train import Checkpoint

    cache = Path(os.environ.get("WSS_RAY_CACHE", Path(tempfile.gettempdir()) / "wss-ray-cache"))
    local = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (local / META_FILE).is_file():
        with atomic_path(local, directory=True) as tmp:
            Checkpoint(uri).to_directory(str(tmp))
    return local


def resolve_parent(parent: str | Path) -> Path:
    s = str(parent)
    if "://" in s and not s.startswith("file://"):
        if s.endswith(".json"):
            import pyarrow.fs

            fs, path = pyarrow.fs.FileSystem.from_uri(s)
            with fs.open_input_stream(path) as fh:
                record = json.loads(fh.read())
            return resolve_parent(record["checkpoint"])
        return resolve_parent(_fetch(s))
    p = Path(s[len("file://"):] if s.startswith("file://") else s)
    if p.is_file() and p.suffix == ".json":
        record = json.loads(p.read_text())
        if "checkpoint" not in record:
            raise CheckpointError(f"{p}: handoff record without a 'checkpoint' entry")
        return resolve_parent(record["checkpoint"])
    if (p / META_FILE).is_file():
        return p
    if (p / CHECKPOINT_DIR / META_FILE).is_file():
        return p / CHECKPOINT_DIR
    if (p / HANDOFF).is_file():
        return resolve_parent(p / HANDOFF)
    raise CheckpointError(f"{p}: not a checkpoint, a stage output folder, a Tune handoff record ({HANDOFF}) "
                          "or a finished Tune experiment folder")
