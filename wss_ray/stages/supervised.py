"""The upper bound: the same separator trained on the reference stems (the only stage that
reads them)."""
from __future__ import annotations

import torch

from wss_ray.losses import si_sdr, supervised_loss
from wss_ray.stages.base import Recipe, StepContext


class SupervisedRecipe(Recipe):
    name = "supervised"
    needs_stems = True
    trainable = ("separator",)
    creates = "separator"
    val_metric, val_mode = "val_si_sdr", "max"

    def build(self, ctx: StepContext):
        return {"separator": ctx.new_separator()}

    def losses(self, batch, models, ctx):
        spec, _ = ctx.mixture(batch)
        est = ctx.separate(models["separator"], batch, spec).mag
        return {"loss": supervised_loss(est, ctx.stft(batch["stems"]).abs())}

    @torch.no_grad()
    def validate(self, batch, models, ctx):
        spec, mag = ctx.mixture(batch)
        out = ctx.separate(models["separator"], batch, spec)
        est, wave = out.mag, out.waveforms(ctx.stft, batch["mix"].shape[-1])
        score = si_sdr(wave, batch["stems"])
        audible = batch["stems"].abs().amax(dim=-1) > 1e-3
        return {"val_loss": float(supervised_loss(est, ctx.stft(batch["stems"]).abs())),
                "val_si_sdr": float(score[audible].mean()) if audible.any() else 0.0}
