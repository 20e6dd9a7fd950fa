"""Resolve what users pass as --parent: a checkpoint folder, a stage output folder holding
``checkpoint/``, or a Tune handoff record (``best.json``) naming the best trial's checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

from wss_ray.checkpoint import META_FILE, CheckpointError

HANDOFF = "best.json"


def resolve_parent(parent: str | Path) -> Path:
    p = Path(parent)
    if p.is_file() and p.suffix == ".json":
        record = json.loads(p.read_text())
        if "checkpoint" not in record:
            raise CheckpointError(f"{p}: handoff record without a 'checkpoint' entry")
        return resolve_parent(record["checkpoint"])
    if (p / META_FILE).is_file():
        return p
    if (p / "checkpoint" / META_FILE).is_file():
        return p / "checkpoint"
    if (p / HANDOFF).is_file():
        return resolve_parent(p / HANDOFF)
    raise CheckpointError(f"{p}: not a checkpoint, a stage output folder or a Tune handoff record")
