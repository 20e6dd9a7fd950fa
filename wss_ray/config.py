"""Typed configuration on pydantic v2: YAML presets, ``--set a.b=c`` overrides, validation.

Every error names the offending field by its dotted path (and the file), so a typo in a
200-line YAML file is found in one read. Each stage has its own settings: a setting that
means nothing to a stage (``lambda_adv`` on the transcriptor) is refused there.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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


# Target instrument -> Slakh (inst_class, General MIDI programs). Slakh's metadata names
# the class; the program separates distorted from clean guitars and electric from
# acoustic/synth basses.
INSTRUMENT_CLASSES: dict[str, tuple[str, tuple[int, ...]]] = {
    "piano": ("Piano", tuple(range(0, 8))),
    "guitar": ("Guitar", (29, 30)),
    "bass": ("Bass", (33, 34, 35, 36, 37)),
}


class _Field(ValueError):
    """Raised by a validator about one named field of its section (the path is completed
    when the pydantic error is turned into a :class:`ConfigError`)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


class Section(BaseModel):
    # strict: YAML already typed every value, so ``"8"`` for an integer is a mistake, not a
    # string to coerce; no NaN/Inf anywhere (an infinite lr trains NaN weights silently)
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False,
                              validate_default=False)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


Pos = Annotated[float, Field(gt=0)]
PosInt = Annotated[int, Field(gt=0)]
NonNeg = Annotated[float, Field(ge=0)]
NonNegInt = Annotated[int, Field(ge=0)]


def _distinct(name: str, values: list, allowed: tuple[str, ...], empty_ok: bool = True) -> list:
    if (not values and not empty_ok) or len(set(values)) != len(values):
        raise _Field(name, f"subset of {list(allowed)} expected, got {values}")
    return values


class DataConfig(Section):
    sample_rate: PosInt = 16000
    chunk_seconds: Pos = 2.0
    n_fft: PosInt = 1024
    hop: PosInt = 256
    instruments: list[str] = Field(default_factory=lambda: list(DEFAULT_INSTRUMENTS))
    pitch_min: NonNegInt = 21
    pitch_max: NonNegInt = 108
    # Tracks lacking a target instrument still train (zero roll) unless this is set.
    require_all: bool = False
    # "sum_of_targets": the mixture is the sum of the target stems (the paper's setup);
    # "mix_file": use the track's mix file as is (contains every instrument).
    mix: Literal["sum_of_targets", "mix_file"] = "sum_of_targets"
    # A final partial chunk is kept (zero padded) when at least this fraction long.
    min_tail_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    harmonics: PosInt = 10
    # Parallel featurization tasks on Ray Data.
    workers: PosInt = 2

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

    @field_validator("instruments")
    @classmethod
    def _instruments(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise _Field("instruments", f"need a non-empty list of distinct names, got {v}")
        unknown = [i for i in v if i not in INSTRUMENT_CLASSES]
        if unknown:
            raise _Field("instruments", f"unknown {unknown}; known: {sorted(INSTRUMENT_CLASSES)}")
        return v

    @model_validator(mode="after")
    def _grid(self) -> "DataConfig":
        if self.chunk_samples % self.hop:
            raise _Field("chunk_seconds", f"chunk of {self.chunk_samples} samples is not a multiple of "
                                          f"hop={self.hop}; chunks must sit on the STFT frame grid")
        if self.hop > self.n_fft:
            raise _Field("hop", f"{self.hop} exceeds n_fft={self.n_fft}")
        if not self.pitch_min <= self.pitch_max <= 127:
            raise _Field("pitch_min", "need 0 <= pitch_min <= pitch_max <= 127")
        return self


class SynthConfig(Section):
    enabled: bool = False
    tracks: PosInt = 12
    seconds: Pos = 16.0
    seed: int = 0
    sample_rate: PosInt = 44100
    soundfont: str = ""
    audio_format: Literal["flac", "wav"] = "flac"
    workers: PosInt = 2
    # Fractions of tracks for train / validation / test.
    splits: list[NonNeg] = Field(default_factory=lambda: [0.7, 0.15, 0.15])

    @field_validator("splits")
    @classmethod
    def _splits(cls, v: list[float]) -> list[float]:
        if len(v) != 3 or abs(sum(v) - 1) > 1e-6:
            raise _Field("splits", f"need three non-negative fractions summing to 1, got {v}")
        return v


class UnmixConfig(Section):
    """Open-Unmix (the reference's sizes): BLSTM width, layers, input bandwidth in Hz; ``n_fft``
    / ``hop``: 0 reads the project's STFT (a mask backbone), a size gives the model its own STFT
    (a waveform backbone, as the reference's ``Separator``; both or neither); ``softmask``: with
    its own STFT, ratio masks (the estimates sum to the mixture), the reference's option."""
    hidden: PosInt = 512
    layers: PosInt = 3
    bandwidth: Pos = 16000.0
    n_fft: Annotated[int, Field(ge=0)] = 0
    hop: Annotated[int, Field(ge=0)] = 0
    softmask: bool = False

    @model_validator(mode="after")
    def _sizes(self) -> "UnmixConfig":
        if self.hidden % 2:
            raise _Field("hidden", f"{self.hidden}: each direction of the BLSTM is hidden/2 wide, so it must be even")
        if (self.n_fft == 0) != (self.hop == 0):
            missing = "hop" if self.hop == 0 else "n_fft"
            raise _Field(missing, f"missing (n_fft={self.n_fft}, hop={self.hop}): give both (its own STFT) or "
                                  "neither (the project's)")
        if self.hop > self.n_fft // 2:
            raise _Field("hop", f"{self.hop} exceeds n_fft/2={self.n_fft // 2}: the inverse STFT would not "
                                "reconstruct the mixture")
        if self.softmask and not self.n_fft:
            raise _Field("softmask", "needs the model's own STFT (n_fft, hop): the ratio masks are its output")
        return self


class UNetConfig(Section):
    """Spleeter-style U-Net: first layer's channels (doubled per level), levels, decoder dropout."""
    channels: PosInt = 16
    depth: Annotated[int, Field(ge=1, le=8)] = 6
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.5


class TasNetConfig(Section):
    """Conv-TasNet (torchaudio's): encoder kernel/filters (L, N), bottleneck (B), hidden (H),
    blocks per stack (X), stacks (R); mixture-consistent outputs. The TCN's kernel is 3
    (torchaudio's padding assumes it)."""
    enc_kernel: Annotated[int, Field(ge=2)] = 16
    enc_feats: PosInt = 512
    bottleneck: PosInt = 128
    hidden: PosInt = 512
    layers: PosInt = 8
    stacks: PosInt = 3
    consistent: bool = True

    @model_validator(mode="after")
    def _even(self) -> "TasNetConfig":
        if self.enc_kernel % 2:
            raise _Field("enc_kernel", f"{self.enc_kernel}: the encoder's stride is half its kernel, so it must be even")
        return self


class SeparatorModelConfig(Section):
    # the backbone: "blstm" (this project's small default, sized by hidden/layers/dropout
    # below), "umx" (Open-Unmix), "unet" (Spleeter-style U-Net), "convtasnet" (waveform); each
    # reads only its own sizes (hidden/layers/dropout: the BLSTM's; umx/unet/convtasnet sections)
    arch: Literal["blstm", "umx", "unet", "convtasnet"] = "blstm"
    hidden: PosInt = 128
    layers: PosInt = 2
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    umx: UnmixConfig = Field(default_factory=UnmixConfig)
    unet: UNetConfig = Field(default_factory=UNetConfig)
    convtasnet: TasNetConfig = Field(default_factory=TasNetConfig)


class TranscriptorModelConfig(Section):
    channels: PosInt = 16
    hidden: PosInt = 96
    bins_per_semitone: PosInt = 2
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0


class ModelsConfig(Section):
    separator: SeparatorModelConfig = Field(default_factory=SeparatorModelConfig)
    transcriptor: TranscriptorModelConfig = Field(default_factory=TranscriptorModelConfig)
    classifier: TranscriptorModelConfig = Field(default_factory=TranscriptorModelConfig)


MASKS = ("c", "h")
ADVERSARIAL = ("aml", "atl")


class StageSettings(Section):
    """What every stage's training loop reads."""
    steps: PosInt = 200
    batch_size: PosInt = 8
    lr: Pos = 1e-3
    # "constant" (the paper's setting) or "cosine" (decay to zero by the last step: steadier
    # final weights on short runs)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    weight_decay: NonNeg = 0.0
    # checkpoints hold the exponential moving average of the trained weights with this decay
    # per step (it spans about 1/(1 - ema) steps); 0: the weights as trained (the paper)
    ema: Annotated[float, Field(ge=0, lt=1)] = 0.0
    grad_clip: NonNeg = 5.0
    checkpoint_every: PosInt = 50
    val_batches: NonNegInt = 4
    # training windows start at a random STFT frame (running into the next chunk), not only
    # on the chunk grid; validation and evaluation always read the grid
    random_windows: bool = True


class _Transcribes(StageSettings):
    # weight of positive cells in every transcription BCE (1 = plain BCE, as the paper)
    pos_weight: Pos = 1.0


class TranscriptorSettings(_Transcribes):
    pass


class SeparatorSettings(_Transcribes):
    # mixture losses: "c" clip-level, "h" harmonic masks
    masks: list[Literal["c", "h"]] = Field(default_factory=lambda: ["c", "h"])
    lambda_tr: NonNeg = 1.0
    lambda_c: NonNeg = 1.0
    lambda_h: NonNeg = 1.0
    # [ours] frames around each note's onset and offset where L_tr does not judge and the
    # harmonic masks also allow the note (0: the paper). For scores aligned to the audio
    # (featurize --align), whose boundaries may be a few frames off
    boundary_frames: Annotated[int, Field(ge=0, le=50)] = 0

    @field_validator("masks")
    @classmethod
    def _masks(cls, v: list[str]) -> list[str]:
        return _distinct("masks", v, MASKS)


class FinetuneSettings(SeparatorSettings):
    # adversarial losses: "aml" (mixture), "atl" (transcription)
    adversarial: list[Literal["aml", "atl"]] = Field(default_factory=list)
    lambda_t: NonNeg = 1.0
    lambda_adv: NonNeg = 1.0
    # [ours] without ATL, the weight of T's cooperative term on separated sources (target
    # Y^(k): T adapts to the separator's domain; before this setting it was weighted by
    # lambda_adv). 0 = T learns from real mixtures only (our strict reading of the paper's
    # step 3), in case a T that adapts to leaky separations eases S's pressure to remove the
    # leakage (not seen beyond the spread at demo scale: BENCHMARKS.md). Ignored with ATL,
    # whose term lambda_adv weighs
    lambda_sep: NonNeg = 1.0
    beta: NonNeg = 0.1
    margin: NonNeg = 1.0
    t_lr: Pos = 1e-4
    # [ours] the separator's AdamW continues from its parent's moment estimates (at this
    # stage's lr) instead of starting cold: a cold Adam's first steps move every weight by
    # about lr whatever its gradient's noise (BENCHMARKS.md, fine-tuning from its parent)
    continue_optimizer: bool = False

    @field_validator("adversarial")
    @classmethod
    def _adversarial(cls, v: list[str]) -> list[str]:
        return _distinct("adversarial", v, ADVERSARIAL)


class ClassifierSettings(StageSettings):
    pass


class BaselineSettings(StageSettings):
    # weights of the classifier-guided term and the clip-level mixture term
    lambda_cls: NonNeg = 1.0
    lambda_c: NonNeg = 1.0


class SupervisedSettings(StageSettings):
    # [ours, after Open-Unmix's training recipe] augmentation of the stems, which only this
    # stage has: each source of each training window is scaled by a gain drawn uniformly in
    # [gain_min, gain_max] (the reference: 0.25 - 1.25) and, with remix, taken from another
    # window of the batch (the reference's random track mix); the mixture is rebuilt from them.
    # 1 / 1 / false: the windows as read (the paper). Validation is never augmented
    gain_min: Pos = 1.0
    gain_max: Pos = 1.0
    remix: bool = False
    # what the separator is fitted to: "spectral" (the paper's L1 on magnitudes; a waveform
    # backbone's on its complex spectra) or "snr" [ours]: the waveforms' negative SNR with a
    # soft threshold (losses.supervised_snr_loss), closer to the SI-SDR the table scores.
    # Measured no better at 600 s (BENCHMARKS.md, session 23), so the paper's stays the default
    loss: Literal["spectral", "snr"] = "spectral"

    @model_validator(mode="after")
    def _gains(self) -> "SupervisedSettings":
        if self.gain_min > self.gain_max:
            raise _Field("gain_min", f"{self.gain_min} exceeds gain_max={self.gain_max} (each defaults to 1)")
        return self


# settings renamed or moved, so an old preset gets a pointer instead of only "unknown"
_RENAMED = {("baseline", "lambda_tr"): "lambda_cls"}


class StagesConfig(Section):
    transcriptor: TranscriptorSettings = Field(default_factory=TranscriptorSettings)
    separator: SeparatorSettings = Field(default_factory=SeparatorSettings)
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings)
    classifier: ClassifierSettings = Field(default_factory=ClassifierSettings)
    baseline: BaselineSettings = Field(default_factory=BaselineSettings)
    supervised: SupervisedSettings = Field(default_factory=SupervisedSettings)

    def __getitem__(self, stage: str) -> StageSettings:
        if stage not in STAGE_SETTINGS:
            raise KeyError(stage)
        return getattr(self, stage)

    def __contains__(self, stage: object) -> bool:
        return stage in STAGE_SETTINGS

    # the mapping view callers had when stages were a dict (pydantic's own __iter__ is left alone)
    def items(self) -> list[tuple[str, StageSettings]]:
        return [(name, getattr(self, name)) for name in STAGE_SETTINGS]

    def values(self) -> list[StageSettings]:
        return [getattr(self, name) for name in STAGE_SETTINGS]


# stage name -> its settings class, in dependency order (the pipeline's default order)
STAGE_SETTINGS: dict[str, type[StageSettings]] = {name: f.annotation for name, f in StagesConfig.model_fields.items()}
STAGE_NAMES = tuple(STAGE_SETTINGS)


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def local_cores() -> int:
    """The cores this process may run on: its affinity where the OS tells it, and at most a
    container's CPU quota (cgroup v2), which the affinity does not show."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return n


class RayConfig(Section):
    workers: PosInt = 2
    # Fractional logical CPUs per worker leave room for Ray Data's read tasks (2-core pitfall).
    cpus_per_worker: Pos = 1.0
    # Logical CPUs of a local Ray instance; 0 = workers * cpus_per_worker per run side by side
    # (below) + 2, at least 4.
    num_cpus: NonNegInt = 0
    # Runs of a pipeline that train at once where neither needs the other's checkpoint (the
    # transcriptor's chain, the classifier's, the supervised run), as far as the cluster's CPUs
    # (and GPUs) hold them with 2 CPUs left for Ray Data, and on a local instance as far as the
    # machine has a core for each CPU a run reserves (on 2 cores two runs side by side each
    # stepped about 2x slower and gained nothing). 1 = one after another.
    side_by_side: PosInt = 2
    use_gpu: bool = False
    # GPUs per worker with use_gpu; a fraction lets several single-worker Tune trials share a GPU.
    gpus_per_worker: Pos = 1.0
    max_failures: Annotated[int, Field(ge=-1)] = 2
    storage: str = ""
    address: str = ""
    # How a run's workers are placed on nodes: PACK (fewest nodes, the default), SPREAD
    # (one per node where possible), STRICT_PACK / STRICT_SPREAD (or fail to schedule).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Keep Ray Data's block order fixed, so that a run is reproducible bit for bit (seeds alone
    # are not enough: blocks otherwise arrive in completion order, and a streaming split deals
    # them to workers by timing). Costs some ingest throughput; with several workers each one
    # reads the whole stream and keeps its own rows (a read of the data per worker).
    preserve_order: bool = False
    # Training precision on CPU workers: bf16 autocast ("auto": where the CPU computes bf16
    # natively, AMX or AVX512-BF16) roughly halves the step of the stages whose gradient runs
    # through the transcriptor's convolutions; recurrences stay fp32. GPUs always use bf16.
    cpu_precision: Literal["auto", "bf16", "fp32"] = "auto"

    @model_validator(mode="after")
    def _sharing(self) -> "RayConfig":
        if self.use_gpu and self.gpus_per_worker < 1 and self.workers > 1:
            # NCCL cannot run two ranks of one process group on the same device
            raise _Field("gpus_per_worker", f"{self.gpus_per_worker} < 1 shares a GPU between the {self.workers} "
                                            "DDP workers of one run; use ray.workers=1 to share GPUs between trials")
        return self

    def local_cpus(self) -> int:
        if self.num_cpus:
            return self.num_cpus
        return max(4, self.runs_on(local_cores()) * int(self.workers * self.cpus_per_worker + 0.999) + 2)

    def runs_on(self, cores: int) -> int:
        """Runs side by side that find a core for each CPU they reserve, at most side_by_side."""
        return max(1, min(self.side_by_side, int(cores // (self.workers * self.cpus_per_worker))))


class PipelineConfig(Section):
    # Stages to run, in dependency order; evaluation rows come from these.
    stages: list[Literal[STAGE_NAMES]] = Field(default_factory=lambda: list(STAGE_NAMES))  # type: ignore[valid-type]
    # Separator variants: each entry is a mask list, e.g. [["c"], ["h"], ["c", "h"]].
    separator_variants: list[list[Literal["c", "h"]]] = Field(default_factory=lambda: [["c", "h"]])
    # Fine-tuning variants: each an adversarial list, e.g. [[], ["aml"], ["atl"]].
    finetune_variants: list[list[Literal["aml", "atl"]]] = Field(default_factory=lambda: [[]])
    eval_split: str = "test"
    examples: NonNegInt = 2
    # Excerpts of real compositions (`wss-ray data scores`, needs music21) rendered as a
    # second test set and scored with the same checkpoints; 0 = none.
    score_benchmark: NonNegInt = 0
    # Stages swept with Ray Tune instead of trained once: stage -> search space YAML. A swept
    # separator/finetune replaces its variants list (put masks/adversarial in the space); the
    # best trial feeds the next stage and every trial becomes a row of the results table.
    sweeps: dict[Literal[STAGE_NAMES], str] = Field(default_factory=dict)  # type: ignore[valid-type]

    @field_validator("separator_variants")
    @classmethod
    def _sep_variants(cls, v: list[list[str]]) -> list[list[str]]:
        for masks in v:
            _distinct("separator_variants", masks, MASKS, empty_ok=False)
        return v

    @field_validator("finetune_variants")
    @classmethod
    def _ft_variants(cls, v: list[list[str]]) -> list[list[str]]:
        for adv in v:
            _distinct("finetune_variants", adv, ADVERSARIAL)
        return v


class Config(Section):
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    synth: SynthConfig = Field(default_factory=SynthConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)


# ---------------------------------------------------------------------------------------------
# pydantic's errors, said the project's way: "<dotted.field>: <what is wrong>, got <value>"

_EXPECTED = {"int_type": "expected an integer", "int_from_float": "expected an integer",
             "float_type": "expected a number", "bool_type": "expected true/false",
             "string_type": "expected a string", "list_type": "expected a list",
             "dict_type": "expected a mapping", "model_type": "expected a mapping",
             "model_attributes_type": "expected a mapping"}


def _known_here(model: type[BaseModel], loc: tuple) -> list[str]:
    node: Any = model
    for part in loc:
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            return []
        node = fields[part].annotation
    return sorted(getattr(node, "model_fields", {}) or {})


def _message(model: type[BaseModel], err: dict) -> str:
    loc = tuple(err["loc"])
    kind, value = err["type"], err.get("input")
    path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc if p != "[key]").replace(".[", "[")
    if kind == "extra_forbidden":
        parent = loc[:-1]
        hint = ""
        if len(loc) == 3 and loc[0] == "stages" and (loc[1], loc[2]) in _RENAMED:
            hint = f" (renamed {'.'.join(map(str, parent))}.{_RENAMED[(loc[1], loc[2])]})"
        return f"unknown setting(s) {path}{hint}; known here: {', '.join(_known_here(model, parent))}"
    if kind in ("value_error", "assertion_error"):
        exc = (err.get("ctx") or {}).get("error")
        if isinstance(exc, _Field):
            # a section-level check names one of the section's fields; a field-level one
            # already sits at that field (or at an element of it: report the field)
            base = [str(p) for p in loc if not isinstance(p, int)]
            if not base or base[-1] != exc.name:
                base.append(exc.name)
            return f"{'.'.join(base)}: {exc}"
        return f"{path}: {exc if exc else err['msg']}"
    if kind == "finite_number":
        return f"{path}: must be a finite number, got {value!r}"
    if kind in _EXPECTED:
        return f"{path}: {_EXPECTED[kind]}, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter((err.get("ctx") or {}).values()), "?")
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"{path}: must be {op} {bound}, got {value!r}"
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", (err.get("ctx") or {}).get("expected", ""))
        return f"{path}: {value!r} is not one of {expected}"
    return f"{path}: {err['msg']}, got {value!r}"


def _validate(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        # the first error is the one to fix; the rest usually follow from it
        raise ConfigError(_message(model, e.errors(include_url=False)[0])) from None


def revalidated(section: Section) -> Section:
    """Check a section after code changed its fields (assignment is not validated)."""
    return _validate(type(section), section.model_dump())


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
        if not key.strip() or any(not k for k in key.strip().split(".")):
            raise ConfigError(f"--set {pair!r}: expected key=value with a dotted setting name, e.g. stages.separator.lr=3e-4")
        try:
            value = yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {pair!r}: not a YAML value ({str(e).splitlines()[0]})") from None
        _set_dotted(out, key.strip(), value)
    return out


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A YAML file whose top level is a mapping; errors name the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p}: is a folder, not a YAML file")
    if not p.is_file():
        raise ConfigError(f"{what} not found: {p}")
    try:
        loaded = yaml_load(p.read_text()) or {}
    except yaml.MarkedYAMLError as e:
        # PyYAML's message spans several lines (context, problem, a caret drawing): one is enough
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {e.problem or e.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
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
        return _validate(Config, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None


def config_from_dict(data: dict[str, Any]) -> Config:
    return _validate(Config, data)
