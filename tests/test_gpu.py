"""Every stage a few steps on CUDA (bf16 autocast) through the plain loop. Runs where CUDA
exists; elsewhere the module is skipped and `make test` prints why (pytest -rs)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from wss_ray.checkpoint import read_meta
from wss_ray.separate import Separator
from wss_ray.stages.runner import train_local

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA is not available on this machine: the GPU stage tests need an NVIDIA GPU")

STAGES = [("transcriptor", None), ("classifier", None), ("supervised", None), ("separator", "transcriptor"),
          ("baseline", "classifier"), ("finetune", "separator")]


def test_every_stage_trains_on_cuda(features, small_cfg, tmp_path):
    cfg = copy.deepcopy(small_cfg)
    cfg.ray.use_gpu = True
    for s in cfg.stages.values():
        s.steps, s.checkpoint_every, s.batch_size = 4, 2, 4
    ckpt = {}
    for stage, parent in STAGES:
        ckpt[stage] = train_local(stage, cfg, features, tmp_path / stage, parent=ckpt.get(parent), device="cuda")
        assert np.isfinite(read_meta(ckpt[stage])["metrics"]["loss"])
    sep = Separator.from_checkpoint(ckpt["finetune"], device="cuda")
    out = sep.separate_batch(torch.randn(2, 16000))
    assert out.shape == (2, 3, 16000) and torch.isfinite(out).all()
