"""Step 1: the transcriptor learns instrument-wise piano rolls from real mixtures (L_T)."""
from __future__ import annotations

import torch

from wss_ray.losses import transcription_loss
from wss_ray.stages.base import COMMON_TUNABLE, Recipe, StepContext


def frame_prf(logits: torch.Tensor, roll: torch.Tensor) -> tuple[float, float, float]:
    """Frame-level precision/recall/F1 of thresholded roll logits (0.5), pooled over everything."""
    pred = logits > 0
    ref = roll > 0.5
    tp = (pred & ref).sum().item()
    p = tp / max(pred.sum().item(), 1)
    r = tp / max(ref.sum().item(), 1)
    return p, r, 2 * p * r / max(p + r, 1e-12)


class TranscriptorRecipe(Recipe):
    name = "transcriptor"
    trainable = ("transcriptor",)
    tunable = COMMON_TUNABLE | {"pos_weight"}
    creates = "transcriptor"
    val_metric, val_mode = "val_f1", "max"

    def build(self, ctx: StepContext):
        return {"transcriptor": ctx.new_transcriptor()}

    def losses(self, batch, models, ctx):
        _, mag = ctx.mixture(batch)
        return {"loss": transcription_loss(models["transcriptor"](mag), batch["roll"], ctx.stage.pos_weight)}

    @torch.no_grad()
    def validate(self, batch, models, ctx):
        _, mag = ctx.mixture(batch)
        out = models["transcriptor"](mag)
        p, r, f = frame_prf(out["roll"].float(), batch["roll"])
        return {"val_loss": float(transcription_loss(out, batch["roll"], ctx.stage.pos_weight)), "val_precision": p,
                "val_recall": r, "val_f1": f}
