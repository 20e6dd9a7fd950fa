"""Losses on hand-made tensors whose answer is known; DSP round trip; model shapes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from wss_ray import losses as L
from wss_ray.dsp import STFT, log_frequency_filterbank
from wss_ray.models import Classifier, MaskSeparator, Transcriptor

B, K, P, F, N = 2, 3, 88, 513, 9


def big_logits(target):
    return (target * 2 - 1) * 30.0


def test_stft_round_trip():
    x = torch.randn(2, 16000)
    stft = STFT(1024, 256)
    spec = stft(x)
    # by hand: 1024 // 2 + 1 = 513 one-sided bins; centred frames sit at t = 0, 256, ..., 15872
    # (62 * 256, the last centre inside 16000 samples), so 63 frames
    assert spec.shape == (2, 513, 63)
    torch.testing.assert_close(stft.inverse(spec, 16000), x, atol=1e-5, rtol=0)


def test_log_filterbank_covers_low_pitches():
    fb = log_frequency_filterbank(16000, 1024, 21, 108, 2)
    assert fb.shape[1] == 513 and fb.shape[0] > 2 * 88
    torch.testing.assert_close(fb.sum(1), torch.ones(fb.shape[0]))
    assert (fb[0] > 0).any()  # A0 (27.5 Hz) still gets energy from the nearest bins


def test_model_shapes():
    mag = torch.rand(B, F, N)
    assert MaskSeparator(F, K, hidden=8, layers=1)(mag).shape == (B, K, F, N)
    m = MaskSeparator(F, K, hidden=8, layers=1)(mag)
    assert m.min() >= 0 and m.max() <= 1
    out = Transcriptor(16000, 1024, K, 21, 108, channels=2, hidden=8)(mag)
    assert out["roll"].shape == (B, K, P, N) and out["inst"].shape == (B, K, N) and out["pitch"].shape == (B, P, N)
    assert Classifier(16000, 1024, K, 21, 108, channels=2, hidden=8)(mag)["inst"].shape == (B, K, N)


def test_transcription_loss_zero_for_perfect_logits():
    y = (torch.rand(B, K, P, N) < 0.1).float()
    out = {"roll": big_logits(y), "inst": big_logits(y.amax(2)), "pitch": big_logits(y.amax(1))}
    assert L.transcription_loss(out, y) < 1e-6 and L.transcription_loss(out, y, pos_weight=5.0) < 1e-6
    # a missed note costs pos_weight times more than with plain BCE
    miss = {k: torch.full_like(v, -30.0) for k, v in out.items()}
    ratio = L.bce(miss["roll"], y, 5.0) / L.bce(miss["roll"], y)
    assert abs(float(ratio) - 5.0) < 1e-3
    wrong = {k: -v for k, v in out.items()}
    assert L.transcription_loss(wrong, y) > 10


def test_own_channel_targets_and_separation_loss():
    y = (torch.rand(B, K, P, N) < 0.2).float()
    t = L.own_channel_targets(y)
    assert t.shape == (B, K, K, P, N)
    for k in range(K):
        assert torch.equal(t[:, k, k], y[:, k])
        for j in range(K):
            if j != k:
                assert t[:, k, j].sum() == 0
    # T's rows are the separated sources ordered (b, k): row b*K + k holds y[b, k] in channel k only
    tgt = torch.zeros(B * K, K, P, N)
    for b in range(B):
        for k in range(K):
            tgt[b * K + k, k] = y[b, k]
    perfect = {"roll": big_logits(tgt), "inst": big_logits(tgt.amax(2)), "pitch": big_logits(tgt.amax(1))}
    assert L.separation_transcription_loss(perfect, y) < 1e-6
    # leakage loss wants every instrument in every source: the same logits now score badly
    assert L.leakage_transcription_loss(perfect, y) > 1.0


def test_clip_mixture_loss_perfect_and_inactive_instrument():
    est = torch.rand(B, K, F, N)
    active = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    mix = torch.stack([est[0, 0] + est[0, 1], est[1, 0] + est[1, 2]])  # by hand: each clip's active instruments
    assert L.clip_mixture_loss(mix, est, active) == 0
    # garbage in an inactive channel does not count
    est2 = est.clone()
    est2[0, 2] += 5.0
    est2[1, 1] += 5.0
    assert L.clip_mixture_loss(mix, est2, active) == 0
    assert L.clip_mixture_loss(mix, est2, torch.ones(B, K)) > 1.0


def test_harmonic_mixture_loss():
    est = torch.rand(B, K, F, N)
    h = (torch.rand(B, K, F, N) < 0.3).float()
    assert L.harmonic_mixture_loss(torch.rand(B, F, N), est, torch.zeros_like(h)) == 0
    # each bin explained by exactly one instrument on its own harmonics: zero loss
    owner = torch.randint(0, K, (B, F, N))
    h = torch.nn.functional.one_hot(owner, K).permute(0, 3, 1, 2).float()
    mix = est.gather(1, owner[:, None])[:, 0]      # every bin holds its owner's estimate
    assert L.harmonic_mixture_loss(mix, est, h) < 1e-6
    # energy off the harmonic positions is ignored
    h[:, :, :100] = 0
    noisy = mix.clone()
    noisy[:, :100] += 3.0
    assert L.harmonic_mixture_loss(noisy, est, h) < 1e-6


def test_recomposition_and_aml_hinge():
    est = torch.rand(B, K, F, N)
    y = (torch.rand(B, K, P, N) < 0.1).float()
    ident = torch.arange(B).repeat(K, 1)
    mixed, score = L.recomposition(est, y, ident)
    torch.testing.assert_close(mixed, est.sum(1))
    assert torch.equal(score, y)
    swap = torch.stack([torch.arange(B), torch.arange(B).flip(0), torch.arange(B)])
    mixed, score = L.recomposition(est, y, swap)
    torch.testing.assert_close(mixed[0], est[0, 0] + est[1, 1] + est[0, 2])
    assert torch.equal(score[0, 1], y[1, 1])
    good = {"roll": big_logits(y), "inst": big_logits(y.amax(2)), "pitch": big_logits(y.amax(1))}
    bad = {k: -v for k, v in good.items()}
    # T's loss: real term ~0, fake term clipped at the margin
    loss = L.aml_transcriptor_loss(good, y, bad, y, beta=0.5, margin=1.0)
    assert abs(float(loss) + 0.5) < 1e-4


def test_classifier_guided_loss_targets_own_channel():
    y = (torch.rand(B, K, P, N) < 0.3).float()
    act = (y.sum(2) > 0).float()                   # (B, K, N): any pitch of instrument k sounds
    # C's rows are the separated sources ordered (b, k): row b*K + k is active in channel k only,
    # where instrument k of clip b plays (any pitch)
    tgt = torch.zeros(B * K, K, N)
    for b in range(B):
        for k in range(K):
            tgt[b * K + k, k] = act[b, k]
    assert L.classifier_guided_loss(big_logits(tgt), y) < 1e-6
    assert L.classifier_loss(big_logits(act), y) < 1e-6


def test_supervised_loss_zero_when_exact():
    ref = torch.rand(B, K, F, N)
    assert L.supervised_loss(ref, ref) == 0


def test_supervised_snr_loss_is_capped_negative_snr_and_charges_silent_sources_their_energy():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 2, 8000, generator=g)
    ref[:, 1] = 0.0                                              # the second source is silent
    mix = ref.sum(1)
    half = L.supervised_snr_loss(0.5 * ref, ref, mix)            # source 0 at 6.02 dB SNR; source 1 exact
    # (source 0's -SNR with the 30 dB threshold, source 1's 0) / 2
    expected = (10 * np.log10(0.25 + 1e-3) - 10 * np.log10(1 + 1e-3)) / 2
    assert float(half) == pytest.approx(expected, abs=1e-3)
    exact = L.supervised_snr_loss(ref.clone(), ref, mix)
    assert float(exact) == pytest.approx(-30.0 / 2, abs=0.01)     # capped at tau_db, not -inf
    # energy in the silent source's estimate costs its share of the mixture's, in dB
    leak = ref.clone()
    leak[:, 1] = 0.1 * mix
    assert float(L.supervised_snr_loss(leak, ref, mix)) == pytest.approx(
        (-30.0 + 10 * np.log10(1e-2 + 1e-3) - 10 * np.log10(1e-3)) / 2, abs=0.01)
    # finite gradients where estimate and reference are both digital silence
    est = torch.zeros_like(ref, requires_grad=True)
    L.supervised_snr_loss(est, ref, mix).backward()
    assert torch.isfinite(est.grad).all() and est.grad[:, 0].abs().sum() > 0


def test_si_sdr_known_values_and_mir_eval():
    import mir_eval

    rng = np.random.default_rng(0)
    ref = rng.standard_normal(16000)
    noise = rng.standard_normal(16000)
    est = 0.5 * ref + 0.1 * noise
    ours = float(L.si_sdr(torch.tensor(est), torch.tensor(ref)))
    # analytic: target = 0.5 ref (+ tiny projection of noise); SNR = 10 log10(0.25 / 0.01) = 14 dB
    assert abs(ours - 13.98) < 0.2
    # scale invariance
    assert abs(float(L.si_sdr(torch.tensor(3 * est), torch.tensor(ref))) - ours) < 1e-6
    sdr, _, _, _ = mir_eval.separation.bss_eval_sources(ref[None], est[None])
    # with white noise the bss_eval distortion filter gains almost nothing over a scalar gain
    assert abs(sdr[0] - ours) < 0.5


def test_learning_rate_schedules():
    import math

    from wss_ray.stages.runner import set_learning_rates

    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([w], lr=0.01)
    opt.param_groups[0]["initial_lr"] = 0.01
    set_learning_rates({"o": opt}, "constant", 50, 100)
    assert opt.param_groups[0]["lr"] == 0.01
    for step, want in ((0, 0.01), (50, 0.005), (100, 0.0)):
        set_learning_rates({"o": opt}, "cosine", step, 100)
        assert math.isclose(opt.param_groups[0]["lr"], want, abs_tol=1e-12)


def test_boundary_tolerance_leaves_only_the_frames_around_onsets_and_offsets_unjudged():
    from wss_ray.losses import bce, boundary_weights, dilate_time, separation_transcription_loss

    roll = torch.zeros(1, 1, 1, 12)
    roll[..., 4:8] = 1                                   # a note over frames 4..7
    w = boundary_weights(roll, 1)
    # onset between frames 3|4, offset between 7|8: frames 3, 4 and 7, 8 are unjudged
    assert w.flatten().tolist() == [1, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 1]
    assert dilate_time(roll, 1).flatten().tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert torch.equal(boundary_weights(roll, 0), torch.ones_like(roll))
    # a transcription wrong only at the unjudged frames costs what a perfect one does
    perfect = (roll * 2 - 1) * 20
    late = perfect.clone()
    late[..., 4] = -20                                   # the note found one frame late
    assert bce(late, roll, tolerance=1) == pytest.approx(float(bce(perfect, roll, tolerance=1)), abs=1e-6)
    assert bce(late, roll) > bce(perfect, roll) + 0.5
    # ...and one wrong away from the boundaries still costs
    far = perfect.clone()
    far[..., 0] = 20
    assert bce(far, roll, tolerance=1) > bce(perfect, roll, tolerance=1) + 0.5
    # through L_tr: the same with the (B·K) separated-source targets
    y = torch.zeros(1, 2, 3, 12)
    y[0, 0, 1, 4:8] = 1
    logits = {"roll": (torch.stack([y[0], torch.zeros_like(y[0])]) * 2 - 1) * 20}
    logits["roll"][0, 0, 1, 4] = -20
    logits["inst"] = logits["roll"].amax(dim=2)
    logits["pitch"] = logits["roll"].amax(dim=1)
    exact = separation_transcription_loss(logits, y, tolerance=0)
    tolerant = separation_transcription_loss(logits, y, tolerance=1)
    assert tolerant < 1e-6 < exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [176, 175])
def test_the_critics_pair_pooling_is_max_pool(dtype, rows):
    from wss_ray.models.transcriptor import PairMaxPool

    torch.manual_seed(0)
    # rounded: ties between the two rows of a pair are common, and the gradient must go where
    # max pooling sends it (the first row)
    x = torch.randn(3, 4, rows, 17).round(decimals=1).to(dtype)
    x[0, 0, 2, 3] = x[0, 0, 3, 3] = 0.5
    x[1, 2, 5, 0] = float("nan")
    grad = torch.randn(3, 4, rows // 2, 17).to(dtype)
    got = {}
    for name, pool in (("max_pool", torch.nn.MaxPool2d((2, 1))), ("pair", PairMaxPool())):
        leaf = x.clone().requires_grad_()
        y = pool(leaf)
        y.backward(grad)
        got[name] = (y, leaf.grad)
    (y0, g0), (y1, g1) = got["max_pool"], got["pair"]
    assert y1.dtype == dtype and y1.shape == y0.shape
    assert torch.equal(y0.isnan(), y1.isnan()) and y1.isnan().sum() == 1      # NaN in, NaN out
    assert torch.equal(y0.nan_to_num(), y1.nan_to_num())
    finite = ~x.isnan().any(dim=2, keepdim=True).expand_as(x)   # where a NaN took part, max_pool's own routing is its own
    assert torch.equal(g0[finite], g1[finite])
    assert g1[0, 0, 2, 3] == grad[0, 0, 1, 3] and g1[0, 0, 3, 3] == 0
