"""Stage checkpoints: a directory with ``model.pt`` (each model's class, constructor kwargs and
state, optimizer states) and ``meta.json`` (stage, variant, resolved config, parents, data
fingerprint, code revision, step, metrics). Loaded with ``weights_only=True``."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from wss_ray.atomic import atomic_path
from wss_ray.models import MODEL_CLASSES

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
# a stage's output folder holds its final checkpoint in this subfolder
CHECKPOINT_DIR = "checkpoint"


class CheckpointError(ValueError):
    """A checkpoint is missing, of the wrong stage or made for other data."""


def code_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        if rev.returncode == 0 and rev.stdout.strip():
            return rev.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from wss_ray import __version__
    return f"wss-ray {__version__}"


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _entries(models: dict[str, nn.Module]) -> dict:
    return {name: {"class": type(unwrap(m)).__name__, "kwargs": unwrap(m).init_kwargs,
                   "state": {k: v.detach().cpu() for k, v in unwrap(m).state_dict().items()}}
            for name, m in models.items()}


def save_checkpoint(path: str | Path, models: dict[str, nn.Module], meta: dict,
                    optimizers: dict[str, torch.optim.Optimizer] | None = None,
                    trained: dict[str, nn.Module] | None = None) -> Path:
    """Write atomically: a reader never sees a half-written checkpoint. ``models``: what the
    checkpoint serves (weight averages where the stage keeps them); ``trained``: the weights
    the optimizers step, kept only to resume training (export drops them)."""
    path = Path(path)
    payload = {"models": _entries(models), "optim": {name: o.state_dict() for name, o in (optimizers or {}).items()}}
    if trained:
        payload["trained"] = _entries(trained)
    with atomic_path(path, directory=True) as tmp:
        torch.save(payload, tmp / MODEL_FILE)
        (tmp / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "_path"}, indent=2,
                                                default=str))
    return path


def read_meta(path: str | Path) -> dict:
    p = Path(path) / META_FILE
    if not p.is_file():
        final = Path(path) / CHECKPOINT_DIR
        hint = f"; its stage checkpoint is {final}" if (final / META_FILE).is_file() else ""
        raise CheckpointError(f"{path}: not a wss-ray checkpoint (no {META_FILE}){hint}")
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{p}: not a checkpoint's meta (a JSON object expected)")
    meta["_path"] = str(path)
    return meta


def load_checkpoint(path: str | Path, stages: Iterable[str] | None = None,
                    instruments: list[str] | None = None, purpose: str = "") -> tuple[dict, dict]:
    """(payload, meta); refuses a checkpoint of another stage or instrument list."""
    meta = read_meta(path)
    stages = list(stages) if stages else None
    if stages and meta.get("stage") not in stages:
        raise CheckpointError(f"{path}: is a '{meta.get('stage')}' checkpoint; {purpose or 'this'} needs "
                              f"one of {stages}")
    if instruments is not None and meta.get("instruments") != list(instruments):
        raise CheckpointError(f"{path}: trained on instruments {meta.get('instruments')}, the data has "
                              f"{list(instruments)}")
    model_file = Path(path) / MODEL_FILE
    try:
        payload = torch.load(model_file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{model_file}: missing") from None
    except Exception as e:  # truncated or foreign files raise pickle, zip and torch errors alike
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else "empty or cut short"
        raise CheckpointError(f"{model_file}: not a readable wss-ray model file ({type(e).__name__}: {detail})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("models"), dict):
        raise CheckpointError(f"{model_file}: not a wss-ray model file (no 'models')")
    return payload, meta


def build_model(payload: dict, name: str) -> nn.Module:
    if name not in payload["models"]:
        raise CheckpointError(f"checkpoint holds no '{name}' model (it has {sorted(payload['models'])})")
    entry = payload["models"][name]
    model = make_model(entry["class"], entry["kwargs"])
    model.load_state_dict(entry["state"])
    return model


# The model that ships with the repository (`wss-ray separate` without --checkpoint);
# WSS_RAY_MODEL points elsewhere.
SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "models" / "default"


def default_checkpoint() -> Path:
    path = Path(os.environ.get("WSS_RAY_MODEL") or SHIPPED_MODEL)
    if not (path / META_FILE).is_file():
        raise CheckpointError(f"{path}: no shipped model there; pass --checkpoint (a separator, finetune, "
                              "baseline or supervised checkpoint) or set WSS_RAY_MODEL")
    return path


def export_model(src: str | Path, out: str | Path, models: Iterable[str] = ("separator", "transcriptor"),
                 note: dict | None = None, run_root: str | Path | None = None) -> Path:
    """A checkpoint for inference only: the named models' weights in float16 (half the bytes;
    loading casts them back to the model's float32), no optimizer state, the source's meta with
    an ``exported`` record (source, dtype, models, ``note``) so the lineage stays readable.
    ``run_root``: lineage paths under it are written as ``<run>/relative/path`` (a model that
    ships must not carry the paths of the machine that trained it)."""
    payload, meta = load_checkpoint(src)
    root = Path(run_root).resolve() if run_root else None

    def where(path: str) -> str:
        p = Path(path).resolve()
        return f"<run>/{p.relative_to(root)}" if root and p.is_relative_to(root) else str(path)

    keep = [m for m in models if m in payload["models"]]
    if "separator" not in keep:
        raise CheckpointError(f"{src}: holds no separator to export (it has {sorted(payload['models'])})")
    half = {name: {**payload["models"][name],
                   "state": {k: v.half() if v.is_floating_point() else v
                             for k, v in payload["models"][name]["state"].items()}} for name in keep}
    out = Path(out)
    if out.exists() and not (out.is_dir() and (out / META_FILE).is_file()):
        raise CheckpointError(f"--out {out}: exists and is not a checkpoint folder; it would be replaced")
    if Path(src).resolve().is_relative_to(out.resolve()):
        raise CheckpointError(f"--out {out}: holds the source checkpoint {src}")
    with atomic_path(out, directory=True) as tmp:
        torch.save({"models": half, "optim": {}}, tmp / MODEL_FILE)
        meta = {**meta, "exported": {"from": where(str(Path(src).resolve())), "dtype": "float16", "models": keep,
                                     "code_revision": code_revision(), **(note or {})}}
        if root:
            meta["parents"] = [where(p) for p in meta.get("parents", [])]
            meta["data"] = where(meta["data"]) if meta.get("data") else meta.get("data")
        (tmp / META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "_path"}, indent=2,
                                                default=str))
    return out


def make_model(class_name: str, kwargs: dict) -> nn.Module:
    model = MODEL_CLASSES[class_name](**kwargs)
    model.init_kwargs = dict(kwargs)
    return model
