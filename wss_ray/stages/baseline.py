"""Baseline, step 2 (Pishdadian et al. 2020): a separator trained with the frozen classifier as
critic (each separated source must be classified as its own instrument only) and the
clip-level mixture loss. It sees activity labels only, never pitch: the harmonic mask is
not available to it whatever ``masks`` says."""
from __future__ import annotations

from wss_ray.losses import classifier_guided_loss, clip_mixture_loss
from wss_ray.stages.base import COMMON_TUNABLE, Recipe, StepContext, flat_sources, freeze


class BaselineRecipe(Recipe):
    name = "baseline"
    parents = ("classifier",)
    trainable = ("separator",)
    tunable = COMMON_TUNABLE | {"lambda_cls", "lambda_c"}
    creates = "separator"
    # activity labels and the frozen classifier only: L_cls + L_c-mix, unweighted, so sweeps compare
    val_metric, val_mode = "val_score", "min"

    def build(self, ctx: StepContext):
        return {"separator": ctx.new_separator(), "classifier": freeze(ctx.from_parent("classifier"))}

    def losses(self, batch, models, ctx):
        s = ctx.stage
        out = ctx.separate(models["separator"], batch)
        mag, est = out.mix_mag, out.mag
        terms = {"cls": classifier_guided_loss(models["classifier"](flat_sources(est))["inst"], batch["roll"]),
                 "c_mix": clip_mixture_loss(mag, est, batch["active"])}
        terms["loss"] = s.lambda_cls * terms["cls"] + s.lambda_c * terms["c_mix"]
        return terms

    def validate(self, batch, models, ctx):
        out = super().validate(batch, models, ctx)
        out["val_score"] = out["val_cls"] + out["val_c_mix"]
        return out
