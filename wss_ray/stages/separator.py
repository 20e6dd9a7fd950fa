"""Step 2: the separator, trained through the frozen transcriptor (L_tr) and the mixture
losses with clip-level (L_c-mix) and/or harmonic (L_h-mix) masks. Reads no stems."""
from __future__ import annotations

from wss_ray.losses import clip_mixture_loss, harmonic_mixture_loss, separation_transcription_loss
from wss_ray.stages.base import Recipe, StepContext, flat_sources, freeze, separate


def separator_terms(batch, mag, est, t_out, ctx: StepContext) -> dict:
    """L_S = λ_tr L_tr + λ_c L_c-mix + λ_h L_h-mix (the terms of the stage config's masks).

    mag |X| (B, F, N), est Ŝ (B, K, F, N), t_out: T's logits on the flattened Ŝ."""
    s = ctx.stage
    terms = {"tr": separation_transcription_loss(t_out, batch["roll"], s.pos_weight)}
    total = s.lambda_tr * terms["tr"]
    if "c" in s.masks:
        terms["c_mix"] = clip_mixture_loss(mag, est, batch["active"])
        total = total + s.lambda_c * terms["c_mix"]
    if "h" in s.masks:
        terms["h_mix"] = harmonic_mixture_loss(mag, est, ctx.harmonic(batch["roll"]))
        total = total + s.lambda_h * terms["h_mix"]
    terms["loss"] = total
    return terms


def separator_objective(batch, models, ctx: StepContext) -> dict:
    """L_S of the batch with the given separator and (critic) transcriptor."""
    _, mag = ctx.mixture(batch)
    _, est = separate(models["separator"], mag)
    return separator_terms(batch, mag, est, models["transcriptor"](flat_sources(est)), ctx)


class SeparatorRecipe(Recipe):
    name = "separator"
    parents = ("transcriptor",)
    trainable = ("separator",)

    def variant(self, stage):
        return "+".join(stage.masks)

    def build(self, ctx: StepContext):
        return {"separator": ctx.new_separator(), "transcriptor": freeze(ctx.from_parent("transcriptor"))}

    def losses(self, batch, models, ctx):
        return separator_objective(batch, models, ctx)
