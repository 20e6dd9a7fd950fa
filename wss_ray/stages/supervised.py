"""The upper bound: the same separator trained on the reference stems (the only stage that
reads them)."""
from __future__ import annotations

import torch

from wss_ray.losses import si_sdr, supervised_loss, supervised_spectrum_loss
from wss_ray.stages.base import Recipe, StepContext


class SupervisedRecipe(Recipe):
    name = "supervised"
    needs_stems = True
    trainable = ("separator",)
    creates = "separator"
    val_metric, val_mode = "val_si_sdr", "max"

    def build(self, ctx: StepContext):
        return {"separator": ctx.new_separator()}

    @staticmethod
    def _loss(out, ref: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if out.waves is not None:   # a waveform backbone: its phase is its own, so it is trained too
            return supervised_spectrum_loss(out.spectra(ctx.stft), ref)
        return supervised_loss(out.mag, ref.abs())

    def losses(self, batch, models, ctx):
        return {"loss": self._loss(ctx.separate(models["separator"], batch), ctx.stft(batch["stems"]), ctx)}

    @torch.no_grad()
    def validate(self, batch, models, ctx):
        out = ctx.separate(models["separator"], batch)
        score = si_sdr(out.waveforms(ctx.stft, batch["mix"].shape[-1]), batch["stems"])
        audible = batch["stems"].abs().amax(dim=-1) > 1e-3
        return {"val_loss": float(self._loss(out, ctx.stft(batch["stems"]), ctx)),
                "val_si_sdr": float(score[audible].mean()) if audible.any() else 0.0}
