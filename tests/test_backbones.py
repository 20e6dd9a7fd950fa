"""Separator backbones chosen by ``models.separator.arch``: each one's shapes and output
contract, every stage trained with it (plain loop, and one through Ray Train), its checkpoints
rebuilt by ``separate`` and scored by ``evaluate`` unchanged."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from wss_ray.config import ConfigError, load_config
from wss_ray.dsp import STFT
from wss_ray.models import MaskSeparator, TasNetSeparator, UNetSeparator, UnmixSeparator, UnmixWaveSeparator
from wss_ray.separation import estimate

# each backbone name (an arch, or umx-stft: Open-Unmix on its own STFT) and the class it builds
CLASSES = {"blstm": "MaskSeparator", "umx": "UnmixSeparator", "umx-stft": "UnmixWaveSeparator",
           "unet": "UNetSeparator", "convtasnet": "TasNetSeparator"}
ARCHS = tuple(CLASSES)
STAGES = [("transcriptor", None), ("classifier", None), ("supervised", None), ("separator", "transcriptor"),
          ("baseline", "classifier"), ("finetune", "separator")]


def tiny_cfg(small_cfg, arch: str):
    cfg = copy.deepcopy(small_cfg)
    sep = cfg.models.separator
    sep.arch = "umx" if arch == "umx-stft" else arch
    sep.umx.hidden = 16
    if arch == "umx-stft":   # Open-Unmix on its own STFT (a waveform backbone), ratio masks
        sep.umx.n_fft, sep.umx.hop, sep.umx.softmask = 512, 128, True
    sep.unet.channels, sep.unet.depth = 4, 3
    t = sep.convtasnet
    t.enc_feats, t.bottleneck, t.hidden, t.layers, t.stacks = 16, 8, 16, 2, 1
    return cfg


@pytest.mark.parametrize("f,n", [(513, 129), (257, 37), (65, 7)])
def test_mask_backbones_give_one_mask_per_source_for_any_spectrogram_size(f, n):
    torch.manual_seed(0)
    mag = torch.rand(2, f, n) * 10
    for model in (MaskSeparator(f, 3, hidden=8, layers=1),
                  UnmixSeparator(f, 3, sample_rate=16000, n_fft=2 * (f - 1), hidden=8, layers=3),
                  UNetSeparator(f, 3, channels=4, depth=3)):
        m = model.eval()(mag)
        assert m.shape == (2, 3, f, n), type(model).__name__
        assert torch.isfinite(m).all() and (m >= 0).all()
        if not isinstance(model, UnmixSeparator):   # Open-Unmix's ReLU mask is not bounded by 1
            assert (m <= 1).all()


def test_unet_up_path_at_each_levels_size_gives_the_cropped_values(benchmark):
    """Each transposed convolution is made at the size of the level it joins; the values are
    those of making 2x and cropping (benchmarks/bench_unet.py keeps that older path), in eval
    mode to float rounding, at odd and even sizes down to one frame; training runs too."""
    bench = benchmark("bench_unet")
    for f, n in [(33, 17), (2, 3), (64, 32), (513, 129), (7, 1)]:
        torch.manual_seed(0)
        model = UNetSeparator(f, 3, channels=4, depth=3)
        mag = torch.rand(2, f, n) * 10
        model.train()(mag).sum().backward()          # moves BN's running statistics off 0/1
        model.eval()
        with torch.no_grad():
            sized, cropped = model(mag), bench.cropped_forward(model, mag)
        assert sized.shape == (2, 3, f, n) and torch.isfinite(sized).all()
        torch.testing.assert_close(sized, cropped, rtol=0, atol=1e-6)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(ValueError):
        model(torch.rand(1, 2, 7, 1))                # not (B, F, N): refused at the door


def test_open_unmix_is_the_reference_with_its_bandwidth_limit():
    from openunmix.model import OpenUnmix

    m = UnmixSeparator(513, 3, sample_rate=44100, n_fft=1024, hidden=16, layers=3, bandwidth=8000)
    assert len(m.targets) == 3 and all(isinstance(t, OpenUnmix) for t in m.targets)
    # 8 kHz of 22.05: the input layer reads the 186 bins at or below it (bin 185 = 7967 Hz), every
    # bin gets a mask
    t = m.targets[0]
    assert t.nb_bins == 186 and t.nb_output_bins == 513 and t.fc1.in_features == 186
    assert t.lstm.num_layers == 3 and t.lstm.bidirectional
    # per-bin input and output scaling are learned
    names = {n for n, p in t.named_parameters() if p.requires_grad}
    assert {"input_mean", "input_scale", "output_scale", "output_mean"} <= names
    # the K networks start from masks that sum to one (offset 1/K), not K identity masks
    assert all(torch.allclose(tt.output_mean, torch.full((513,), 1 / 3)) for tt in m.targets)
    # its mask times the input is exactly what the reference module returns on that input (|X|
    # over its mean), and the mask does not depend on the recording's level
    mag = torch.rand(2, 513, 9) + 0.1
    m.eval()
    x = mag / mag.mean(dim=(1, 2), keepdim=True)
    ref = torch.stack([tt(x[:, None])[:, 0] for tt in m.targets], dim=1)
    torch.testing.assert_close(m(mag) * x[:, None], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m(0.01 * mag), m(mag), rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match=r"models\.separator\.umx\.hidden: 15"):
        load_config(None, ["models.separator.umx.hidden=15"])


def test_postfilter_bench_softmask_sums_to_the_mixture_and_em_keeps_the_shape(benchmark):
    """benchmarks/bench_postfilter.py: the reference's Wiener post-filters on masked estimates."""
    pf = benchmark("bench_postfilter")
    torch.manual_seed(0)
    mix = torch.randn(2, 33, 20, dtype=torch.complex64)
    masks = torch.rand(2, 3, 33, 20) * 2                  # Open-Unmix's masks need not sum to one
    est = masks * mix[:, None]
    assert pf.postfilter(est, mix, "raw") is est
    soft = pf.postfilter(est, mix, "softmask")
    assert not torch.allclose(est.sum(1), mix, atol=1e-2)
    torch.testing.assert_close(soft.sum(1), mix, rtol=1e-4, atol=1e-4)
    # estimates whose masks already sum to one are left as they are
    ratio = masks / masks.sum(1, keepdim=True) * mix[:, None]
    torch.testing.assert_close(pf.postfilter(ratio, mix, "softmask"), ratio, rtol=1e-4, atol=1e-4)
    em = pf.postfilter(est, mix, "em1")
    assert em.shape == est.shape and em.dtype == est.dtype and torch.isfinite(torch.view_as_real(em)).all()


def test_open_unmix_on_its_own_stft_is_a_waveform_backbone_that_sums_to_the_mixture_with_masks_summing_to_one():
    """``models.separator.umx.n_fft/hop``: the reference's ``Separator`` arrangement (its own
    STFT, masks on the mixture's phase, inverse STFT); the score losses see its waveforms through
    the project's STFT."""
    torch.manual_seed(0)
    stft = STFT(512, 128)
    mix = torch.randn(2, 8000) * 0.3
    model = UnmixWaveSeparator(3, sample_rate=16000, n_fft=1024, hop=256, hidden=16, layers=2)
    assert model.unmix.targets[0].nb_output_bins == 513            # its own resolution, not the project's 257
    est = estimate(model.eval(), mix, stft)
    assert est.waves.shape == (2, 3, 8000) and est.masks is None
    assert est.mag.shape == (2, 3, 257, stft.n_frames(8000))
    torch.testing.assert_close(est.mag, stft(est.waves).abs())
    assert torch.equal(est.waveforms(stft, 8000), est.waves)
    # its waveforms are the inner Open-Unmix's masks on its own STFT of the mixture
    own = model.stft(mix)
    torch.testing.assert_close(est.waves, model.stft.inverse(model.unmix(own.abs()) * own[:, None], 8000))
    # the estimates follow the mixture's level
    torch.testing.assert_close(estimate(model, 4 * mix, stft).waves, 4 * est.waves, rtol=1e-4, atol=1e-4)
    # gradients reach every weight through the inverse STFT and the project's STFT
    model.train()
    estimate(model, mix, stft).mag.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
    model.eval()
    # masks that sum to one (the networks' output scale zeroed leaves each at its offset 1/K) give
    # estimates that sum to the mixture: the inverse STFT reconstructs it
    with torch.no_grad():
        for t in model.unmix.targets:
            t.output_scale.zero_()
    torch.testing.assert_close(model(mix).sum(dim=1), mix, atol=1e-5, rtol=0)
    # the reference's softmask: ratio masks, so a fresh network's estimates sum to the mixture
    # (its raw masks do not), and digital silence gives silence, not NaN
    torch.manual_seed(1)
    raw = UnmixWaveSeparator(3, sample_rate=16000, n_fft=1024, hop=256, hidden=16, layers=2).eval()
    soft = UnmixWaveSeparator(3, sample_rate=16000, n_fft=1024, hop=256, hidden=16, layers=2, softmask=True).eval()
    soft.load_state_dict(raw.state_dict())
    assert (raw(mix).sum(dim=1) - mix).abs().max() > 1e-2
    torch.testing.assert_close(soft(mix).sum(dim=1), mix, atol=1e-5, rtol=0)
    quiet = torch.cat([torch.zeros(1, 4000), mix[:1, :4000]], dim=1)
    out = soft(quiet)
    assert torch.isfinite(out).all() and out[..., :3000].abs().max() == 0
    soft.train()(quiet).pow(2).sum().backward()                      # no NaN gradient from the ratio
    assert all(torch.isfinite(p.grad).all() for p in soft.parameters() if p.grad is not None)
    # a clip shorter than its own window (inference pads only to the project's) keeps its length
    short = soft.eval()(mix[:, :300])
    assert short.shape == (2, 3, 300) and torch.isfinite(short).all()
    torch.testing.assert_close(short.sum(dim=1), mix[:, :300], atol=1e-5, rtol=0)
    for bad, field in ((["models.separator.umx.n_fft=2048"], "hop"), (["models.separator.umx.hop=512"], "n_fft"),
                       (["models.separator.umx.n_fft=1024", "models.separator.umx.hop=1024"], "hop"),
                       (["models.separator.umx.softmask=true"], "softmask")):
        with pytest.raises(ConfigError, match=rf"models\.separator\.umx\.{field}"):
            load_config(None, bad)


def test_each_backbone_bench_name_builds_its_backbone(benchmark, features):
    """benchmarks/bench_backbones.py: every ``--archs`` name is a valid config of its arch."""
    from wss_ray.data.dataset import load_manifest
    from wss_ray.stages.base import StepContext

    bench = benchmark("bench_backbones")
    manifest = load_manifest(features)
    built = {}
    for name in bench.CPU_SIZES:
        cfg = bench.bench_config(None, name, [])
        ctx = StepContext(cfg, cfg.stages["separator"], manifest, torch.device("cpu"))
        built[name] = ctx.new_separator()
    assert {k: type(m).__name__ for k, m in built.items()} == CLASSES
    # the bench's sizes reach the model (and its checkpoint's constructor arguments)
    kw = built["umx-stft"].init_kwargs
    assert (kw["n_fft"], kw["hop"], kw["softmask"], kw["hidden"]) == (2048, 512, True, 128)
    assert built["umx"].init_kwargs["n_fft"] == manifest["n_fft"] and "softmask" not in built["umx"].init_kwargs


def test_waveform_backbone_sums_to_the_mixture_when_asked_and_the_losses_see_its_stft():
    torch.manual_seed(0)
    stft = STFT(512, 128)
    mix = torch.randn(3, 4000) * 0.3
    kw = dict(enc_kernel=16, enc_feats=16, bottleneck=8, hidden=16, layers=2, stacks=1)
    assert not hasattr(load_config(None).models.separator.convtasnet, "kernel")   # torchaudio's padding needs 3
    consistent = TasNetSeparator(3, consistent=True, **kw).eval()
    est = estimate(consistent, mix, stft)
    assert est.waves.shape == (3, 3, 4000) and est.masks is None
    torch.testing.assert_close(est.waves.sum(dim=1), mix, atol=1e-5, rtol=0)
    # the score losses read |STFT(ŝ_k)|, on the mixture's frame grid
    assert est.mag.shape == (3, 3, 257, stft.n_frames(4000))
    torch.testing.assert_close(est.mag, stft(est.waves).abs())
    # inference returns the waveforms themselves (no round trip through masks)
    assert torch.equal(est.waveforms(stft, 4000), est.waves)
    # without the projection nothing ties the sum to the mixture
    free = estimate(TasNetSeparator(3, consistent=False, **kw).eval(), mix, stft)
    assert (free.waves.sum(dim=1) - mix).abs().max() > 1e-2
    # the estimates scale with the mixture (level normalised inside)
    loud = estimate(consistent, 4 * mix, stft)
    torch.testing.assert_close(loud.waves, 4 * est.waves, atol=1e-4, rtol=1e-4)


def test_the_config_names_the_backbone_and_refuses_what_it_cannot_build():
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / "configs" / "smoke.yaml",
                      ["models.separator.arch=unet", "models.separator.unet.depth=4"])
    assert cfg.models.separator.arch == "unet" and cfg.models.separator.unet.depth == 4
    with pytest.raises(ConfigError, match=r"models\.separator\.arch"):
        load_config(None, ["models.separator.arch=demucs"])
    with pytest.raises(ConfigError, match=r"models\.separator\.convtasnet\.enc_kernel"):
        load_config(None, ["models.separator.convtasnet.enc_kernel=15"])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_stage_trains_with_each_backbone_and_its_checkpoints_separate(arch, features, small_cfg, tmp_path):
    from wss_ray.checkpoint import read_meta
    from wss_ray.separate import Separator
    from wss_ray.stages.runner import train_local

    cfg = tiny_cfg(small_cfg, arch)
    for s in cfg.stages.values():
        s.steps, s.checkpoint_every, s.batch_size = 2, 1, 4
    ckpt = {}
    for stage, parent in STAGES:
        ckpt[stage] = train_local(stage, cfg, features, tmp_path / stage, parent=ckpt.get(parent), log=None)
        meta = read_meta(ckpt[stage])
        assert np.isfinite(meta["metrics"]["loss"]), (arch, stage)
    cls = CLASSES[arch]
    song = np.random.default_rng(0).normal(0, 0.1, 16000 * 3).astype(np.float32)
    for stage in ("supervised", "separator", "baseline", "finetune"):
        sep = Separator.from_checkpoint(ckpt[stage])
        assert type(sep.separator).__name__ == cls
        if arch == "umx-stft":   # its own STFT and ratio masks survive the checkpoint
            assert (sep.separator.n_fft, sep.separator.hop, sep.separator.softmask) == (512, 128, True)
        out = sep.separate(song, 16000, chunk_seconds=1.0)
        assert set(out) == {"piano", "guitar", "bass", "residual"}
        for x in out.values():
            assert x.shape == song.shape and torch.isfinite(x).all()
    # evaluate scores its checkpoints unchanged (one row per system)
    from wss_ray.evaluate import evaluate

    rows = evaluate([str(ckpt["separator"]), str(ckpt["supervised"])], features, tmp_path / "eval", split="test",
                    log=lambda *_: None)
    assert {"separator[c+h]", "supervised"} <= {r["system"] for r in rows}
    if arch == "convtasnet":
        # the waveform backbone through Ray Train (DDP-wrapped, 2 workers)
        from wss_ray.stages.runner import train_stage

        final = train_stage("separator", cfg, features, out=tmp_path / "ray_sep", parent=str(ckpt["transcriptor"]),
                            log=lambda *_: None)
        assert type(Separator.from_checkpoint(final).separator).__name__ == cls
