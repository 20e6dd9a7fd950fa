"""Weight averaging: the checkpoints of a stage hold an exponential moving average (EMA) of the
weights it trains, when ``stages.<stage>.ema`` > 0.

Why: on short runs the last weights of a small model are one draw from a noisy walk (its
BatchNorm statistics follow the last few batches), so two checkpoints a few steps apart score
tenths of a dB apart. The average over the last ~1/(1 - ema) steps is steadier, and the rule is
the same for every row. The averaging is torch's (``swa_utils.AveragedModel``); buffers
(BatchNorm's running statistics) are averaged with the weights.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from wss_ray.checkpoint import unwrap


class WeightAverages:
    """The EMA copies of ``names`` among ``models`` (none when ``decay`` is 0)."""

    def __init__(self, models: dict[str, nn.Module], names: tuple[str, ...], decay: float):
        self.copies: dict[str, AveragedModel] = {
            n: AveragedModel(unwrap(models[n]), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
            for n in names if n in models and decay > 0}

    @torch.no_grad()
    def update(self, models: dict[str, nn.Module]) -> None:
        """After an optimizer step (the first call copies the weights as they are)."""
        for n, copy in self.copies.items():
            copy.update_parameters(unwrap(models[n]))

    def held(self, models: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The models a checkpoint holds and validation scores: the averages where there are any."""
        return {n: (self.copies[n].module if n in self.copies else m) for n, m in models.items()}

    def trained(self, models: dict[str, nn.Module]) -> dict[str, nn.Module]:
        """The trained weights behind the averages (what a resumed run continues from)."""
        return {n: models[n] for n in self.copies}

    def load(self, states: dict[str, dict], step: int) -> None:
        """Resume: the averages as a checkpoint of ``step`` held them."""
        for n, copy in self.copies.items():
            copy.module.load_state_dict(states[n]["state"])
            copy.n_averaged.fill_(max(step, 1))
