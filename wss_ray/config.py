"""Typed configuration: dataclasses, YAML presets, ``--set a.b=c`` overrides.

Every error names the offending field by its dotted path, so a typo in a
200-line YAML file is found in one read.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_INSTRUMENTS = ("piano", "guitar", "bass")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML implements YAML 1.1, where ``3e-4`` (no dot) is a string; YAML 1.2 and every
    user mean a float. The 1.2 core-schema float pattern is added to the safe loader."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)


@dataclass
class DataConfig:
    sample_rate: int = 16000
    chunk_seconds: float = 2.0
    n_fft: int = 1024
    hop: int = 256
    instruments: list[str] = field(default_factory=lambda: list(DEFAULT_INSTRUMENTS))
    pitch_min: int = 21
    pitch_max: int = 108
    # Tracks lacking a target instrument still train (zero roll) unless this is set.
    require_all: bool = False
    # "sum_of_targets": the mixture is the sum of the target stems (the paper's setup);
    # "mix_file": use the track's mix file as is (contains every instrument).
    mix: str = "sum_of_targets"
    # A final partial chunk is kept (zero padded) when at least this fraction long.
    min_tail_fraction: float = 0.5
    harmonics: int = 10
    # Parallel featurization tasks on Ray Data.
    workers: int = 2

    @property
    def chunk_samples(self) -> int:
        return int(round(self.chunk_seconds * self.sample_rate))

    @property
    def n_frames(self) -> int:
        # centred STFT: one frame per hop plus the closing frame
        return self.chunk_samples // self.hop + 1

    @property
    def n_pitches(self) -> int:
        return self.pitch_max - self.pitch_min + 1

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1

    def validate(self, path: str = "data") -> None:
        _positive(self, path, "sample_rate", "chunk_seconds", "n_fft", "hop", "harmonics", "workers")
        if self.chunk_samples % self.hop:
            raise ConfigError(
                f"{path}.chunk_seconds: chunk of {self.chunk_samples} samples is not a multiple of "
                f"{path}.hop={self.hop}; chunks must sit on the STFT frame grid")
        if self.hop > self.n_fft:
            raise ConfigError(f"{path}.hop: {self.hop} exceeds n_fft={self.n_fft}")
        if not self.instruments or len(set(self.instruments)) != len(self.instruments):
            raise ConfigError(f"{path}.instruments: need a non-empty list of distinct names, got {self.instruments}")
        unknown = [i for i in self.instruments if i not in INSTRUMENT_CLASSES]
        if unknown:
            raise ConfigError(f"{path}.instruments: unknown {unknown}; known: {sorted(INSTRUMENT_CLASSES)}")
        if not 0 <= self.pitch_min <= self.pitch_max <= 127:
            raise ConfigError(f"{path}.pitch_min/pitch_max: need 0 <= min <= max <= 127")
        if self.mix not in ("sum_of_targets", "mix_file"):
            raise ConfigError(f"{path}.mix: expected 'sum_of_targets' or 'mix_file', got {self.mix!r}")
        if not 0.0 < self.min_tail_fraction <= 1.0:
            raise ConfigError(f"{path}.min_tail_fraction: must be in (0, 1]")


# Target instrument -> Slakh (inst_class, General MIDI programs). Slakh's metadata names
# the class; the program separates distorted from clean guitars and electric from
# acoustic/synth basses.
INSTRUMENT_CLASSES: dict[str, tuple[str, tuple[int, ...]]] = {
    "piano": ("Piano", tuple(range(0, 8))),
    "guitar": ("Guitar", (29, 30)),
    "bass": ("Bass", (33, 34, 35, 36, 37)),
}


@dataclass
class SynthConfig:
    enabled: bool = False
    tracks: int = 12
    seconds: float = 16.0
    seed: int = 0
    sample_rate: int = 44100
    soundfont: str = ""
    audio_format: str = "flac"
    workers: int = 2
    # Fractions of tracks for train / validation / test.
    splits: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])

    def validate(self, path: str = "synth") -> None:
        _positive(self, path, "tracks", "seconds", "sample_rate", "workers")
        if self.audio_format not in ("flac", "wav"):
            raise ConfigError(f"{path}.audio_format: expected 'flac' or 'wav', got {self.audio_format!r}")
        if len(self.splits) != 3 or any(s < 0 for s in self.splits) or abs(sum(self.splits) - 1) > 1e-6:
            raise ConfigError(f"{path}.splits: need three non-negative fractions summing to 1, got {self.splits}")


@dataclass
class SeparatorModelConfig:
    hidden: int = 128
    layers: int = 2
    dropout: float = 0.0


@dataclass
class TranscriptorModelConfig:
    channels: int = 16
    hidden: int = 96
    bins_per_semitone: int = 2
    dropout: float = 0.0


@dataclass
class ModelsConfig:
    separator: SeparatorModelConfig = field(default_factory=SeparatorModelConfig)
    transcriptor: TranscriptorModelConfig = field(default_factory=TranscriptorModelConfig)
    classifier: TranscriptorModelConfig = field(default_factory=TranscriptorModelConfig)


@dataclass
class StageConfig:
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-3
    # "constant" (the paper's setting) or "cosine" (decay to zero by the last step: steadier
    # final weights on short runs)
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    checkpoint_every: int = 50
    val_batches: int = 4
    # training windows start at a random STFT frame (running into the next chunk), not only
    # on the chunk grid; validation and evaluation always read the grid
    random_windows: bool = True
    # weight of positive cells in every transcription BCE (1 = plain BCE, as the paper)
    pos_weight: float = 1.0
    # separator / baseline / finetune: mixture losses in {"c", "h"}
    masks: list[str] = field(default_factory=lambda: ["c", "h"])
    lambda_tr: float = 1.0
    lambda_c: float = 1.0
    lambda_h: float = 1.0
    # finetune: adversarial losses in {"aml", "atl"}
    adversarial: list[str] = field(default_factory=list)
    lambda_t: float = 1.0
    lambda_adv: float = 1.0
    beta: float = 0.1
    margin: float = 1.0
    t_lr: float = 1e-4

    def validate(self, path: str) -> None:
        _positive(self, path, "steps", "batch_size", "lr", "checkpoint_every", "t_lr", "pos_weight")
        for name in ("weight_decay", "grad_clip", "val_batches", "lambda_tr", "lambda_c", "lambda_h",
                     "lambda_t", "lambda_adv", "beta", "margin"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{path}.{name}: must be >= 0, got {getattr(self, name)}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ConfigError(f"{path}.lr_schedule: 'constant' or 'cosine', got {self.lr_schedule!r}")
        bad = [m for m in self.masks if m not in ("c", "h")]
        if bad or len(set(self.masks)) != len(self.masks):
            raise ConfigError(f"{path}.masks: subset of ['c', 'h'] expected, got {self.masks}")
        bad = [a for a in self.adversarial if a not in ("aml", "atl")]
        if bad or len(set(self.adversarial)) != len(self.adversarial):
            raise ConfigError(f"{path}.adversarial: subset of ['aml', 'atl'] expected, got {self.adversarial}")


STAGE_NAMES = ("transcriptor", "separator", "finetune", "classifier", "baseline", "supervised")


def _default_stages() -> dict[str, StageConfig]:
    return {name: StageConfig() for name in STAGE_NAMES}


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass
class RayConfig:
    workers: int = 2
    # Fractional logical CPUs per worker leave room for Ray Data's read tasks (2-core pitfall).
    cpus_per_worker: float = 1.0
    # Logical CPUs of a local Ray instance; 0 = workers * cpus_per_worker + 2, at least 4.
    num_cpus: int = 0
    use_gpu: bool = False
    # GPUs per worker with use_gpu; a fraction lets several single-worker Tune trials share a GPU.
    gpus_per_worker: float = 1.0
    max_failures: int = 2
    storage: str = ""
    address: str = ""
    # How a run's workers are placed on nodes: PACK (fewest nodes, the default), SPREAD
    # (one per node where possible), STRICT_PACK / STRICT_SPREAD (or fail to schedule).
    placement_strategy: str = "PACK"
    # Keep Ray Data's block order fixed, so that a single-worker run is reproducible bit for bit
    # (seeds alone are not enough: blocks otherwise arrive in completion order). Costs some
    # ingest throughput; with several workers the split between them still follows timing.
    preserve_order: bool = False

    def validate(self, path: str = "ray") -> None:
        _positive(self, path, "workers", "cpus_per_worker")
        if self.num_cpus < 0 or self.max_failures < -1:
            raise ConfigError(f"{path}.num_cpus/max_failures: out of range")
        if self.gpus_per_worker <= 0:
            raise ConfigError(f"{path}.gpus_per_worker: must be > 0, got {self.gpus_per_worker}")
        if self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ConfigError(f"{path}.placement_strategy: {self.placement_strategy!r} is not one of "
                              f"{list(PLACEMENT_STRATEGIES)}")
        if self.use_gpu and self.gpus_per_worker < 1 and self.workers > 1:
            # NCCL cannot run two ranks of one process group on the same device
            raise ConfigError(f"{path}.gpus_per_worker: {self.gpus_per_worker} < 1 shares a GPU between the "
                              f"{self.workers} DDP workers of one run; use ray.workers=1 to share GPUs between trials")

    def local_cpus(self) -> int:
        if self.num_cpus:
            return self.num_cpus
        return max(4, int(self.workers * self.cpus_per_worker + 0.999) + 2)


@dataclass
class PipelineConfig:
    # Stages to run, in dependency order; evaluation rows come from these.
    stages: list[str] = field(default_factory=lambda: list(STAGE_NAMES))
    # Separator variants: each entry is a mask list, e.g. [["c"], ["h"], ["c", "h"]].
    separator_variants: list[list[str]] = field(default_factory=lambda: [["c", "h"]])
    # Fine-tuning variants: each an adversarial list, e.g. [[], ["aml"], ["atl"]].
    finetune_variants: list[list[str]] = field(default_factory=lambda: [[]])
    eval_split: str = "test"
    examples: int = 2
    # Excerpts of real compositions (`wss-ray data scores`, needs music21) rendered as a
    # second test set and scored with the same checkpoints; 0 = none.
    score_benchmark: int = 0
    # Stages swept with Ray Tune instead of trained once: stage -> search space YAML. A swept
    # separator/finetune replaces its variants list (put masks/adversarial in the space); the
    # best trial feeds the next stage and every trial becomes a row of the results table.
    sweeps: dict[str, str] = field(default_factory=dict)

    def validate(self, path: str = "pipeline") -> None:
        bad = [s for s in self.stages if s not in STAGE_NAMES]
        if bad:
            raise ConfigError(f"{path}.stages: unknown {bad}; known: {list(STAGE_NAMES)}")
        bad = [s for s in self.sweeps if s not in STAGE_NAMES]
        if bad:
            raise ConfigError(f"{path}.sweeps: unknown stage(s) {bad}; known: {list(STAGE_NAMES)}")
        for v in self.separator_variants:
            if not v or any(m not in ("c", "h") for m in v):
                raise ConfigError(f"{path}.separator_variants: each must be a non-empty subset of ['c','h'], got {v}")
        for v in self.finetune_variants:
            if any(a not in ("aml", "atl") for a in v):
                raise ConfigError(f"{path}.finetune_variants: each must be a subset of ['aml','atl'], got {v}")


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    stages: dict[str, StageConfig] = field(default_factory=_default_stages)
    ray: RayConfig = field(default_factory=RayConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def validate(self) -> "Config":
        self.data.validate()
        self.synth.validate()
        self.ray.validate()
        self.pipeline.validate()
        unknown = [s for s in self.stages if s not in STAGE_NAMES]
        if unknown:
            raise ConfigError(f"stages: unknown stage(s) {unknown}; known: {list(STAGE_NAMES)}")
        for name in STAGE_NAMES:
            self.stages.setdefault(name, StageConfig())
            self.stages[name].validate(f"stages.{name}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(obj: Any, path: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise ConfigError(f"{path}.{name}: must be > 0, got {value!r}")


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, path)
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__}")
        return {k: _coerce(vt, v, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        (et,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(et, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, Any], path: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{path}." if path else ""
        raise ConfigError(f"unknown setting(s) {', '.join(prefix + u for u in unknown)}; "
                          f"known here: {', '.join(sorted(names))}")
    obj = cls()
    for key, value in data.items():
        sub = f"{path}.{key}" if path else key
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            # merge into defaults so a preset may set one nested field
            merged = {**dataclasses.asdict(current), **value}
            setattr(obj, key, _coerce(hints[key], merged, sub))
        elif key == "stages" and isinstance(value, dict):
            stages = dict(current)
            for stage, sval in value.items():
                base = dataclasses.asdict(stages.get(stage, StageConfig()))
                if not isinstance(sval, dict):
                    raise ConfigError(f"{sub}.{stage}: expected a mapping")
                stages[stage] = _coerce(StageConfig, {**base, **sval}, f"{sub}.{stage}")
            setattr(obj, key, stages)
        else:
            setattr(obj, key, _coerce(hints[key], value, sub))
    return obj


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
    node[keys[-1]] = value


def parse_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["stages.separator.lr=3e-4", "data.instruments=[piano,bass]"]`` -> nested dict."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        key, raw = pair.split("=", 1)
        _set_dotted(out, key.strip(), yaml_load(raw) if raw.strip() else "")
    return out


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        loaded = yaml_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    return loaded


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                extra: dict[str, Any] | None = None) -> Config:
    """Load a YAML preset (or defaults), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path:
        data = read_yaml_mapping(path)
    if extra:
        data = _deep_merge(data, extra)
    data = _deep_merge(data, parse_overrides(overrides))
    try:
        return _build(Config, data, "").validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "").validate()
