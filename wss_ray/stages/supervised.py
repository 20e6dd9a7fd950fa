"""The upper bound: the same separator trained on the reference stems (the only stage that
reads them)."""
from __future__ import annotations

import torch

from wss_ray.config import SupervisedSettings
from wss_ray.losses import SILENCE_PEAK, si_sdr, supervised_loss, supervised_snr_loss, supervised_spectrum_loss
from wss_ray.stages.base import COMMON_TUNABLE, Recipe, StepContext


class SupervisedRecipe(Recipe):
    name = "supervised"
    needs_stems = True
    trainable = ("separator",)
    creates = "separator"
    tunable = COMMON_TUNABLE | {"gain_min", "gain_max", "remix", "loss"}
    val_metric, val_mode = "val_si_sdr", "max"

    def build(self, ctx: StepContext):
        return {"separator": ctx.new_separator()}

    @staticmethod
    def _loss(out, batch: dict, ctx: StepContext) -> torch.Tensor:
        if ctx.stage.loss == "snr":   # on the waveforms, whatever the backbone
            return supervised_snr_loss(out.waveforms(ctx.stft, batch["mix"].shape[-1]), batch["stems"], batch["mix"])
        ref = ctx.stft(batch["stems"])
        if out.waves is not None:   # a waveform backbone: its phase is its own, so it is trained too
            return supervised_spectrum_loss(out.spectra(ctx.stft), ref)
        return supervised_loss(out.mag, ref.abs())

    def losses(self, batch, models, ctx):
        batch = augment(batch, ctx.stage)
        return {"loss": self._loss(ctx.separate(models["separator"], batch), batch, ctx)}

    @torch.no_grad()
    def validate(self, batch, models, ctx):
        out = ctx.separate(models["separator"], batch)
        score = si_sdr(out.waveforms(ctx.stft, batch["mix"].shape[-1]), batch["stems"])
        audible = batch["stems"].abs().amax(dim=-1) > SILENCE_PEAK
        return {"val_loss": float(self._loss(out, batch, ctx)),
                "val_si_sdr": float(score[audible].mean()) if audible.any() else 0.0}


def augment(batch: dict, s: SupervisedSettings) -> dict:
    """Open-Unmix's training augmentation on a batch with stems (B, K, L): source k of window i
    is drawn from window π_k(i) of the batch when ``s.remix`` (an independent permutation per
    source, so the sources of a new mixture need not have played together), scaled by a gain
    drawn uniformly in [s.gain_min, s.gain_max], and the mixture is rebuilt as window i's
    residual (what its mixture holds beyond the K stems: nothing in the synthetic corpus) plus
    the new sources. The rolls and activity follow their sources. Draws from torch's generator,
    which the runner seeds per rank."""
    if not s.remix and s.gain_min == s.gain_max == 1.0:
        return batch
    stems, mix = batch["stems"], batch["mix"]
    b, k = stems.shape[:2]
    out = dict(batch)
    if s.remix:
        # a uniform permutation per source, drawn on the device (a copy from the host would wait for it)
        src = torch.argsort(torch.rand(b, k, device=stems.device), dim=0)   # (B, K)
        col = torch.arange(k, device=stems.device)
        out.update({key: batch[key][src, col] for key in ("stems", "roll", "active") if key in batch})
    gains = s.gain_min + (s.gain_max - s.gain_min) * torch.rand(b, k, 1, device=stems.device)
    out["stems"] = out["stems"] * gains.to(stems.dtype)
    out["mix"] = (mix - stems.sum(dim=1)) + out["stems"].sum(dim=1)
    return out

