"""Step 2: the separator, trained through the frozen transcriptor (L_tr) and the mixture
losses with clip-level (L_c-mix) and/or harmonic (L_h-mix) masks. Reads no stems."""
from __future__ import annotations

import torch

from wss_ray.losses import clip_mixture_loss, dilate_time, harmonic_mixture_loss, separation_transcription_loss
from wss_ray.stages.base import COMMON_TUNABLE, Recipe, StepContext, flat_sources, freeze


def separator_terms(batch, mag, est, t_out, ctx: StepContext) -> dict:
    """L_S = λ_tr L_tr + λ_c L_c-mix + λ_h L_h-mix (the terms of the stage config's masks).

    mag |X| (B, F, N), est Ŝ (B, K, F, N), t_out: T's logits on the flattened Ŝ."""
    s = ctx.stage
    terms = {"tr": separation_transcription_loss(t_out, batch["roll"], s.pos_weight, s.boundary_frames)}
    total = s.lambda_tr * terms["tr"]
    if "c" in s.masks:
        terms["c_mix"] = clip_mixture_loss(mag, est, batch["active"])
        total = total + s.lambda_c * terms["c_mix"]
    if "h" in s.masks:
        terms["h_mix"] = harmonic_mixture_loss(mag, est, ctx.harmonic(dilate_time(batch["roll"], s.boundary_frames)))
        total = total + s.lambda_h * terms["h_mix"]
    terms["loss"] = total
    return terms


def separator_objective(batch, models, ctx: StepContext) -> dict:
    """L_S of the batch with the given separator and (critic) transcriptor."""
    out = ctx.separate(models["separator"], batch)
    mag, est = out.mix_mag, out.mag
    return separator_terms(batch, mag, est, models["transcriptor"](flat_sources(est)), ctx)


class ScoreValidated:
    """Validation of the weak separators, with no stems and independent of the tuned loss
    weights or mask choice, so trials of a sweep are comparable: val_score = L_tr + L_c-mix +
    L_h-mix, unweighted, judged by ``critic``, a transcriptor no trial trains. The stage's own
    objective (val_loss and its terms) comes from the same separator pass."""
    critic = "transcriptor"
    val_metric, val_mode = "val_score", "min"

    @torch.no_grad()
    def validate(self, batch, models, ctx: StepContext) -> dict:
        with ctx.autocast(validating=True):
            out = ctx.separate(models["separator"], batch)
            mag, est = out.mix_mag, out.mag
            flat = flat_sources(est)
            judged = models[self.critic](flat)
            own = judged if self.critic == "transcriptor" else models["transcriptor"](flat)
            out = {f"val_{k}": float(v) for k, v in separator_terms(batch, mag, est, own, ctx).items()}
            tr = separation_transcription_loss(judged, batch["roll"], ctx.stage.pos_weight)
            c = clip_mixture_loss(mag, est, batch["active"])
            h = harmonic_mixture_loss(mag, est, ctx.harmonic(batch["roll"]))
        out.update({"val_score_tr": float(tr), "val_score_c": float(c), "val_score_h": float(h),
                    "val_score": float(tr + c + h)})
        return out


class SeparatorRecipe(ScoreValidated, Recipe):
    name = "separator"
    parents = ("transcriptor",)
    trainable = ("separator",)
    tunable = COMMON_TUNABLE | {"pos_weight", "masks", "lambda_tr", "lambda_c", "lambda_h",
                                "boundary_frames"}
    creates = "separator"

    def variant(self, stage):
        return "+".join(stage.masks)

    def build(self, ctx: StepContext):
        return {"separator": ctx.new_separator(), "transcriptor": freeze(ctx.from_parent("transcriptor"))}

    def losses(self, batch, models, ctx):
        return separator_objective(batch, models, ctx)

