"""Step 3: separator and transcriptor fine-tuned together, alternating S and T updates, with
the adversarial transcription loss (ATL) and/or adversarial mixture loss (AML)."""
from __future__ import annotations

import torch

from wss_ray.checkpoint import CheckpointError, load_checkpoint
from wss_ray.losses import (aml_separator_loss, aml_transcriptor_loss, leakage_transcription_loss,
                            recomposition, separation_transcription_loss, transcription_loss)
from wss_ray.stages.base import Recipe, StepContext, apply_update, flat_sources, freeze, outside_graph
from wss_ray.stages.separator import ScoreValidated, SeparatorRecipe, separator_objective, separator_terms


def _split(out: dict, sizes: list[int]) -> list[dict]:
    """T's outputs on a concatenated batch, split back into its parts (one DDP forward per update)."""
    parts = {k: torch.split(v, sizes) for k, v in out.items()}
    return [{k: parts[k][i] for k in out} for i in range(len(sizes))]


class FinetuneRecipe(ScoreValidated, Recipe):
    name = "finetune"
    parents = ("separator",)
    trainable = ("separator", "transcriptor")
    tunable = SeparatorRecipe.tunable | {"adversarial", "lambda_t", "lambda_adv", "lambda_sep", "beta", "margin",
                                         "t_lr", "continue_optimizer"}
    critic = "critic"

    def variant(self, stage):
        return "+".join(list(stage.masks) + sorted(stage.adversarial))

    def build(self, ctx: StepContext):
        # "critic": a frozen copy of the stage-1 transcriptor, for validation only; the
        # fine-tuned transcriptor could collude with the separator it is trained with
        return {"separator": ctx.from_parent("separator"), "transcriptor": ctx.from_parent("transcriptor"),
                "critic": freeze(ctx.from_parent(self._critic_name(ctx)))}

    @staticmethod
    def _critic_name(ctx: StepContext) -> str:
        return "critic" if "critic" in ctx.parent["models"] else "transcriptor"

    def check_parent_checkpoint(self, path, stage):
        if stage.continue_optimizer and "separator" not in load_checkpoint(path)[0].get("optim", {}):
            raise CheckpointError(f"{path}: holds no separator optimizer state (an exported checkpoint?), which "
                                  "stages.finetune.continue_optimizer=true continues; pass the separator stage's "
                                  "own checkpoint or set it false")

    def optimizers(self, models, ctx):
        s = ctx.stage
        # the parameters the parent's optimizer held (Recipe.optimizers), in its order
        trained = [p for p in models["separator"].parameters() if p.requires_grad]
        opts = {"separator": torch.optim.AdamW(trained, lr=s.lr, weight_decay=s.weight_decay),
                "transcriptor": torch.optim.AdamW(models["transcriptor"].parameters(), lr=s.t_lr)}
        parent_state = (ctx.parent or {}).get("optim", {}).get("separator")
        if s.continue_optimizer and parent_state:
            opts["separator"].load_state_dict(parent_state)
            for g in opts["separator"].param_groups:   # the moments carry over, the settings are this stage's
                g.pop("initial_lr", None)
                g.update(lr=s.lr, weight_decay=s.weight_decay)
        return opts

    def _perms(self, b: int, k: int, device, step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(step)
        return torch.stack([torch.randperm(b, generator=g) for _ in range(k)]).to(device)

    def s_losses(self, batch, models, ctx, step=0):
        s, S, T = ctx.stage, models["separator"], models["transcriptor"]
        out = ctx.separate(S, batch)
        spec, mag, est = out.spec, out.mix_mag, out.mag
        b, k = est.shape[:2]
        inputs, sizes = [flat_sources(est)], [b * k]
        if "aml" in s.adversarial:
            fake, fake_score = recomposition(est, batch["roll"], self._perms(b, k, mag.device, step))
            inputs.append(fake)
            sizes.append(b)
        with outside_graph(T) as critic:   # S's update: T's weight gradients are not wanted
            outs = _split(critic(torch.cat(inputs)), sizes)
        # ATL's separator side is L_tr itself: remove what T learns to spot
        terms = separator_terms(batch, mag, est, outs[0], ctx)
        total = terms["loss"]
        if "aml" in s.adversarial:
            terms["aml_s"] = aml_separator_loss(outs[1], fake_score, s.pos_weight)
            total = total + s.lambda_adv * terms["aml_s"]
        terms["loss"] = total
        return terms, spec

    def t_losses(self, batch, models, ctx, spec, step=0):
        s, S, T = ctx.stage, models["separator"], models["transcriptor"]
        # the separations T learns from are the separator's as at inference: eval mode (no
        # dropout, BatchNorm's running statistics left as the S update set them)
        plain = getattr(S, "module", S)
        plain.eval()
        with torch.no_grad():
            out = ctx.separate(plain, batch, spec)
        plain.train()
        mag, est = out.mix_mag, out.mag
        b, k = est.shape[:2]
        # T reads the separations when a term of its loss judges them (ATL, or the cooperative
        # term with weight lambda_sep)
        on_sep = "atl" in s.adversarial or s.lambda_sep > 0
        inputs, sizes = [mag], [b]
        if on_sep:
            inputs.append(flat_sources(est))
            sizes.append(b * k)
        if "aml" in s.adversarial:
            fake, fake_score = recomposition(est, batch["roll"], self._perms(b, k, mag.device, step))
            inputs.append(fake)
            sizes.append(b)
        outs = _split(T(torch.cat(inputs)), sizes)
        terms = {}
        if "aml" in s.adversarial:
            terms["t_real"] = aml_transcriptor_loss(outs[0], batch["roll"], outs[-1], fake_score, s.beta, s.margin,
                                                    s.pos_weight)
        else:
            terms["t_real"] = transcription_loss(outs[0], batch["roll"], s.pos_weight)
        total = s.lambda_t * terms["t_real"]
        if "atl" in s.adversarial:
            terms["t_sep"] = leakage_transcription_loss(outs[1], batch["roll"], s.pos_weight)
            total = total + s.lambda_adv * terms["t_sep"]
        elif on_sep:
            # [ours] without ATL, T adapts cooperatively to separated sources (target Y^(k))
            terms["t_sep"] = separation_transcription_loss(outs[1], batch["roll"], s.pos_weight)
            total = total + s.lambda_sep * terms["t_sep"]
        terms["loss"] = total
        return terms

    def losses(self, batch, models, ctx):
        """Validation: the separator's score-only objective (no adversarial terms)."""
        return separator_objective(batch, models, ctx)

    def update(self, batch, models, opts, ctx, step=0):
        clip = ctx.stage.grad_clip
        # S update (T out of the graph), then T's
        with ctx.autocast():
            s_terms, spec = self.s_losses(batch, models, ctx, step)
        apply_update(s_terms["loss"], models, opts, ("separator",), clip)
        # T update on detached separations
        with ctx.autocast():
            t_terms = self.t_losses(batch, models, ctx, spec.detach(), step)
        apply_update(t_terms["loss"], models, opts, ("transcriptor",), clip)
        out = {k: v.detach() for k, v in s_terms.items()}   # read only when logged (see Recipe.update)
        out.update({("t_" + k if k == "loss" else k): v.detach() for k, v in t_terms.items()})
        return out
