"""What every stage shares: the step context (STFT, harmonic basis, device, precision) and the
Recipe interface the runner drives. A recipe reads like the paper's step: build the models,
define the losses of one update; it knows nothing of Ray."""
from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from wss_ray.checkpoint import build_model, make_model
from wss_ray.config import Config, StageSettings
from wss_ray.data.score import harmonic_basis, harmonic_masks
from wss_ray.dsp import STFT
from wss_ray.separation import Estimates, estimate


def cpu_precision(setting: str = "auto") -> str:
    """"bf16" or "fp32": the precision CPU training runs at for a ``ray.cpu_precision`` value.
    "auto" takes bf16 only where the CPU computes it natively; emulated bf16 is slower than fp32."""
    if setting != "auto":
        return setting
    caps = torch.cpu.get_capabilities()
    return "bf16" if caps.get("amx_bf16") or caps.get("avx512_bf16") else "fp32"


# every stage's optimisation settings (steps and checkpointing only change how long it runs)
COMMON_TUNABLE = frozenset({"lr", "lr_schedule", "weight_decay", "ema", "grad_clip", "batch_size"})


@dataclass
class StepContext:
    cfg: Config
    stage: StageSettings
    manifest: dict
    device: torch.device
    parent: dict | None = None          # parent checkpoint payload
    _basis: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self):
        self.stft = STFT(self.manifest["n_fft"], self.manifest["hop"])

    @property
    def n_sources(self) -> int:
        return len(self.manifest["instruments"])

    @property
    def precision(self) -> str:
        """What the steps compute in ("bf16" or "fp32"), recorded in every checkpoint's meta."""
        return "bf16" if self.device.type == "cuda" else cpu_precision(self.cfg.ray.cpu_precision)

    def autocast(self, validating: bool = False):
        # bf16 on GPU; on CPU as ray.cpu_precision says (the models keep recurrences in fp32),
        # except validation: its numbers rank checkpoints and Tune trials, so on CPU they do not
        # depend on whether the machine has native bf16
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.precision == "bf16" and not validating:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def mixture(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Complex STFT X (B, F, N) and |X| of the batch's mixtures."""
        spec = self.stft(batch["mix"])
        return spec, spec.abs()

    def harmonic(self, roll: torch.Tensor) -> torch.Tensor:
        if self._basis is None:
            m = self.manifest
            self._basis = harmonic_basis(m["sample_rate"], m["n_fft"], m["pitch_min"], m["pitch_max"],
                                         self.cfg.data.harmonics).to(self.device)
        return harmonic_masks(roll, self._basis)

    # model factories from the config (sizes) and the manifest (signal settings)
    def new_separator(self) -> nn.Module:
        c, m = self.cfg.models.separator, self.manifest
        n_bins = m["n_fft"] // 2 + 1
        # each backbone's config section names its constructor's size arguments
        if c.arch == "umx" and c.umx.n_fft:
            return make_model("UnmixWaveSeparator", {"n_sources": self.n_sources, "sample_rate": m["sample_rate"],
                                                     **c.umx.model_dump()})
        if c.arch == "umx":
            sizes = c.umx.model_dump(exclude={"n_fft", "hop", "softmask"})
            return make_model("UnmixSeparator", {"n_bins": n_bins, "n_sources": self.n_sources,
                                                 "sample_rate": m["sample_rate"], "n_fft": m["n_fft"], **sizes})
        if c.arch == "unet":
            return make_model("UNetSeparator", {"n_bins": n_bins, "n_sources": self.n_sources, **c.unet.model_dump()})
        if c.arch == "convtasnet":
            return make_model("TasNetSeparator", {"n_sources": self.n_sources, **c.convtasnet.model_dump()})
        return make_model("MaskSeparator", {"n_bins": n_bins, "n_sources": self.n_sources, "hidden": c.hidden,
                                            "layers": c.layers, "dropout": c.dropout})

    def separate(self, separator: nn.Module, batch: dict, spec: torch.Tensor | None = None) -> Estimates:
        """The separator's estimates on the batch's mixtures (Ŝ and |X| for the losses); ``spec``:
        the mixtures' STFT when the caller already has it."""
        return estimate(separator, batch["mix"], self.stft, spec)

    def _spectro_kwargs(self, c) -> dict:
        m = self.manifest
        return {"sample_rate": m["sample_rate"], "n_fft": m["n_fft"], "n_sources": self.n_sources,
                "pitch_min": m["pitch_min"], "pitch_max": m["pitch_max"], "channels": c.channels,
                "hidden": c.hidden, "bins_per_semitone": c.bins_per_semitone, "dropout": c.dropout}

    def new_transcriptor(self) -> nn.Module:
        return make_model("Transcriptor", self._spectro_kwargs(self.cfg.models.transcriptor))

    def new_classifier(self) -> nn.Module:
        return make_model("Classifier", self._spectro_kwargs(self.cfg.models.classifier))

    def from_parent(self, name: str) -> nn.Module:
        return build_model(self.parent, name)


def critic_mode(model: nn.Module) -> nn.Module:
    """The mode of a frozen critic that gradients flow *through* (the transcriptor under the
    separator, the classifier under the baseline): deterministic, and differentiable on every
    backend. cuDNN's RNN backward refuses a module in eval mode ("cudnn RNN backward can only be
    called in training mode"), so recurrent layers stay in train mode with their inter-layer
    dropout off (an RNN has no running statistics: train mode then computes what eval does);
    every other layer (dropout, norms) is in eval mode."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            m.dropout = 0.0
            m.train()
    return model


def freeze(model: nn.Module) -> nn.Module:
    """No gradient to its parameters (so no optimizer step can touch it), critic mode."""
    for p in model.parameters():
        p.requires_grad_(False)
    return critic_mode(model)


@contextlib.contextmanager
def outside_graph(model: nn.Module):
    """``model`` (unwrapped from DDP) with its parameters out of the autograd graph for the
    forwards inside the block: gradients flow through it to its input, none to its weights.
    For a trained model acting as the critic of another's update (fine-tuning's transcriptor
    under the separator step): its weight gradients would be discarded anyway, and through
    DDP they would also start an all-reduce."""
    plain = getattr(model, "module", model)
    flags = [p.requires_grad for p in plain.parameters()]
    for p in plain.parameters():
        p.requires_grad_(False)
    try:
        yield plain
    finally:
        for p, f in zip(plain.parameters(), flags):
            p.requires_grad_(f)


def flat_sources(est: torch.Tensor) -> torch.Tensor:
    """(B, K, F, N) -> (B·K, F, N), row-major in (b, k) as the losses expect."""
    b, k, f, n = est.shape
    return est.reshape(b * k, f, n)


def as_floats(terms: dict) -> dict[str, float]:
    """Loss terms (tensors or numbers) as plain floats: the one place a step's terms wait for the device."""
    return {k: float(v) for k, v in terms.items()}


def apply_update(loss: torch.Tensor, models: dict, opts: dict, names: tuple[str, ...], clip: float) -> None:
    """Backward ``loss`` and step the optimizers of ``names`` only; every gradient is cleared
    first, so gradients that reach other models (a critic in the graph) are discarded."""
    for o in opts.values():
        o.zero_grad(set_to_none=True)
    loss.backward()
    for n in names:
        if clip:
            torch.nn.utils.clip_grad_norm_(models[n].parameters(), clip)
        opts[n].step()


class Recipe(abc.ABC):
    """One stage of the method. Subclasses set the class attributes and implement
    ``build`` and ``losses``; ``update`` may be overridden for alternating schemes."""

    name = ""
    parents: tuple[str, ...] = ()     # stages whose checkpoint this one starts from
    needs_stems = False               # only the supervised upper bound
    trainable: tuple[str, ...] = ()   # models with an optimizer (DDP-wrapped by the runner)
    val_metric = "val_loss"
    val_mode = "min"
    # settings of stages.<name> that a Tune sweep may vary (they act on this stage), and the
    # models.<key> section of the model it creates from scratch (None: all come from parents)
    tunable: frozenset[str] = COMMON_TUNABLE
    creates: str | None = None

    def variant(self, stage: StageSettings) -> str:
        return ""

    def check_parent_checkpoint(self, path: str, stage: StageSettings) -> None:
        """Refuse (CheckpointError naming ``path``) a parent lacking what these settings need of it."""

    @abc.abstractmethod
    def build(self, ctx: StepContext) -> dict[str, nn.Module]:
        """Fresh models (parents' weights loaded, frozen critics frozen)."""

    @abc.abstractmethod
    def losses(self, batch: dict, models: dict[str, nn.Module], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Loss terms with the total under "loss"; differentiable."""

    def optimizers(self, models: dict[str, nn.Module], ctx: StepContext) -> dict[str, torch.optim.Optimizer]:
        s = ctx.stage
        return {n: torch.optim.AdamW([p for p in models[n].parameters() if p.requires_grad], lr=s.lr,
                                     weight_decay=s.weight_decay) for n in self.trainable}

    def update(self, batch: dict, models: dict, opts: dict, ctx: StepContext, step: int = 0) -> dict[str, torch.Tensor]:
        """One optimisation step; returns the loss terms as detached tensors. Reading one as a
        number waits for the device, so the loop reads them (``as_floats``) only when it logs."""
        with ctx.autocast():
            terms = self.losses(batch, models, ctx)
        apply_update(terms["loss"], models, opts, self.trainable, ctx.stage.grad_clip)
        return {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def validate(self, batch: dict, models: dict, ctx: StepContext) -> dict[str, float]:
        with ctx.autocast(validating=True):
            terms = self.losses(batch, models, ctx)
        return {f"val_{k}": float(v) for k, v in terms.items()}
