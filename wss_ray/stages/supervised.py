"""The upper bound: the same separator trained on the reference stems (the only stage that
reads them)."""
from __future__ import annotations

import torch

from wss_ray.losses import si_sdr, supervised_loss
from wss_ray.stages.base import Recipe, StepContext, separate


class SupervisedRecipe(Recipe):
    name = "supervised"
    needs_stems = True
    trainable = ("separator",)
    creates = "separator"
    val_metric, val_mode = "val_si_sdr", "max"

    def build(self, ctx: StepContext):
        return {"separator": ctx.new_separator()}

    def losses(self, batch, models, ctx):
        _, mag = ctx.mixture(batch)
        _, est = separate(models["separator"], mag)
        return {"loss": supervised_loss(est, ctx.stft(batch["stems"]).abs())}

    @torch.no_grad()
    def validate(self, batch, models, ctx):
        spec, mag = ctx.mixture(batch)
        masks, est = separate(models["separator"], mag)
        wave = ctx.stft.inverse(masks.float() * spec[:, None], batch["mix"].shape[-1])
        score = si_sdr(wave, batch["stems"])
        audible = batch["stems"].abs().amax(dim=-1) > 1e-3
        return {"val_loss": float(supervised_loss(est, ctx.stft(batch["stems"]).abs())),
                "val_si_sdr": float(score[audible].mean()) if audible.any() else 0.0}
