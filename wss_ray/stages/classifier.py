"""Baseline, step 1: a frame-level instrument classifier (temporal weak labels, no pitch)."""
from __future__ import annotations

import torch

from wss_ray.losses import classifier_loss
from wss_ray.stages.base import Recipe, StepContext
from wss_ray.stages.transcriptor import frame_prf


class ClassifierRecipe(Recipe):
    name = "classifier"
    trainable = ("classifier",)
    creates = "classifier"
    val_metric, val_mode = "val_f1", "max"

    def build(self, ctx: StepContext):
        return {"classifier": ctx.new_classifier()}

    def losses(self, batch, models, ctx):
        _, mag = ctx.mixture(batch)
        return {"loss": classifier_loss(models["classifier"](mag)["inst"], batch["roll"])}

    @torch.no_grad()
    def validate(self, batch, models, ctx):
        _, mag = ctx.mixture(batch)
        logits = models["classifier"](mag)["inst"]
        p, r, f = frame_prf(logits.float(), batch["roll"].amax(dim=2))
        return {"val_loss": float(classifier_loss(logits, batch["roll"])), "val_f1": f}
