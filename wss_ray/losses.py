"""Every loss of the method as a pure function. Shapes: B batch, K instruments, P pitches,
F frequency bins, N frames. BCE is binary cross-entropy on logits, averaged over elements;
‖·‖₁ is the mean absolute error."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# a reference quieter than this peak (about -60 dBFS) counts as silent in that chunk: the one
# threshold of the losses, the validation score and the evaluation table
SILENCE_PEAK = 1e-3


def bce(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = 1.0, tolerance: int = 0) -> torch.Tensor:
    """Mean BCE on logits; ``pos_weight`` w scales the positive term: −[w·y log σ(z) + (1−y) log(1−σ(z))].
    ``tolerance`` d > 0: cells within d frames of a change of the target along its last (time)
    axis are not judged (weighted mean over the others; see :func:`boundary_weights`)."""
    pw = None if pos_weight == 1.0 else torch.tensor(pos_weight, device=logits.device)
    if not tolerance:
        return F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=pw)
    w = boundary_weights(target, tolerance)
    cells = F.binary_cross_entropy_with_logits(logits.float(), target.float(), pos_weight=pw, reduction="none")
    return (w * cells).sum() / w.sum().clamp_min(1.0)


def dilate_time(x: torch.Tensor, frames: int) -> torch.Tensor:
    """max over a window of ±``frames`` along the last axis (a note extended at both ends)."""
    if not frames:
        return x
    flat = x.float().reshape(-1, 1, x.shape[-1])
    return F.max_pool1d(flat, 2 * frames + 1, stride=1, padding=frames).reshape(x.shape).to(x.dtype)


def boundary_weights(target: torch.Tensor, frames: int) -> torch.Tensor:
    """1 where a {0, 1} target is constant within ±``frames`` along its last axis, else 0: the
    cells around each onset and offset, where a score aligned to the audio (``featurize
    --align``) may be a few frames off, are left out of the loss [ours]."""
    on = dilate_time(target.float(), frames)
    off = 1.0 - dilate_time(1.0 - target.float(), frames)
    return 1.0 - (on - off)


def transcription_loss(out: dict[str, torch.Tensor], roll: torch.Tensor, pos_weight: float = 1.0,
                       tolerance: int = 0) -> torch.Tensor:
    """L_T = BCE(Z, Y) + BCE(inst, max_p Y) + BCE(pitch, max_k Y).

    out: roll (B, K, P, N), inst (B, K, N), pitch (B, P, N) logits; roll: Y (B, K, P, N) in {0, 1}.
    pos_weight > 1 [ours, default 1] counters the sparsity of piano rolls (a few % of cells on).
    tolerance [ours, default 0]: frames around each target's onsets and offsets left unjudged.
    """
    return (bce(out["roll"], roll, pos_weight, tolerance) + bce(out["inst"], roll.amax(dim=2), pos_weight, tolerance)
            + bce(out["pitch"], roll.amax(dim=1), pos_weight, tolerance))


def own_channel_targets(roll: torch.Tensor) -> torch.Tensor:
    """Y^(k) for every k: (B, K, P, N) -> (B, K, K, P, N) with Y_k in channel k, zeros elsewhere."""
    k = roll.shape[1]
    eye = torch.eye(k, device=roll.device, dtype=roll.dtype)
    return eye[None, :, :, None, None] * roll[:, None]


def separation_transcription_loss(out: dict[str, torch.Tensor], roll: torch.Tensor, pos_weight: float = 1.0,
                                  tolerance: int = 0) -> torch.Tensor:
    """L_tr = (1/K) Σ_k L_T(T(Ŝ_k), Y^(k)): separated source k transcribes to instrument k's
    notes and nothing else.

    out: T's logits on the B·K separated sources, ordered (b, k) row-major; roll: Y (B, K, P, N).
    """
    b, k, p, n = roll.shape
    target = own_channel_targets(roll).reshape(b * k, k, p, n)
    return transcription_loss(out, target, pos_weight, tolerance)


def leakage_transcription_loss(out: dict[str, torch.Tensor], roll: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """ATL, transcriptor side: L_T(T(Ŝ_k), Y) for every k. T learns to find *all* instruments'
    notes in each separated source, i.e. to spot leakage; S answers with L_tr.

    out: T's logits on the B·K separated sources; roll: Y (B, K, P, N).
    """
    b, k, p, n = roll.shape
    target = roll[:, None].expand(b, k, k, p, n).reshape(b * k, k, p, n)
    return transcription_loss(out, target, pos_weight)


def clip_mixture_loss(mix_mag: torch.Tensor, est_mag: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """L_c-mix = ‖ |X| − Σ_k c_k Ŝ_k ‖₁: only instruments active in the clip may explain the mixture.

    mix_mag: |X| (B, F, N); est_mag: Ŝ (B, K, F, N); active: c (B, K) in {0, 1}.
    """
    return (mix_mag - (active[:, :, None, None] * est_mag).sum(dim=1)).abs().mean()


def harmonic_mixture_loss(mix_mag: torch.Tensor, est_mag: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """L_h-mix = ‖ H ⊙ |X| − Σ_k H_k ⊙ Ŝ_k ‖₁ with H = max_k H_k: only the score's harmonic
    positions count, and there instrument k's estimate counts only on its own harmonics.

    mix_mag: (B, F, N); est_mag: (B, K, F, N); masks: H_k (B, K, F, N) in {0, 1}.
    """
    h = masks.amax(dim=1)
    return (h * mix_mag - (masks * est_mag).sum(dim=1)).abs().mean()


def recomposition(est_mag: torch.Tensor, roll: torch.Tensor, perms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AML's synthetic mixtures: x̃_b = Σ_k Ŝ_k[perms[k, b]] with score Ỹ_b,k = Y_k[perms[k, b]].

    est_mag: (B, K, F, N); roll: (B, K, P, N); perms: (K, B) long, one permutation of the batch
    per instrument. Returns x̃ (B, F, N) and Ỹ (B, K, P, N).
    """
    k = est_mag.shape[1]
    mixed = torch.stack([est_mag[perms[i], i] for i in range(k)], dim=1).sum(dim=1)
    score = torch.stack([roll[perms[i], i] for i in range(k)], dim=1)
    return mixed, score


def aml_separator_loss(out_recomposed: dict[str, torch.Tensor], score: torch.Tensor,
                       pos_weight: float = 1.0) -> torch.Tensor:
    """AML, separator side: L_T(T(x̃), Ỹ). S makes recomposed mixtures transcribe like real ones."""
    return transcription_loss(out_recomposed, score, pos_weight)


def aml_transcriptor_loss(out_real: dict[str, torch.Tensor], roll: torch.Tensor,
                          out_recomposed: dict[str, torch.Tensor], score: torch.Tensor,
                          beta: float, margin: float, pos_weight: float = 1.0) -> torch.Tensor:
    """AML, transcriptor side: L_T(T(|X|), Y) − β · min(L_T(T(x̃), Ỹ), m).

    T stays a transcriber on real mixtures while it learns where recomposed mixtures betray
    separation errors; the hinge at margin m keeps the adversarial term bounded.
    """
    fake = transcription_loss(out_recomposed, score, pos_weight)
    return transcription_loss(out_real, roll, pos_weight) - beta * torch.clamp(fake, max=margin)


def classifier_loss(inst_logits: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """Frame-level activity: BCE(C(|X|), max_p Y), inst_logits (B, K, N)."""
    return bce(inst_logits, roll.amax(dim=2))


def classifier_guided_loss(inst_logits: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """Baseline separator (Pishdadian et al.): (1/K) Σ_k BCE(C(Ŝ_k), a^(k)), where a^(k) holds
    instrument k's frame activity in channel k and zeros elsewhere.

    inst_logits: C's logits on the B·K separated sources (B·K, K, N); roll: (B, K, P, N).
    """
    b, k, _, n = roll.shape
    act = roll.amax(dim=2)                                                   # (B, K, N)
    eye = torch.eye(k, device=roll.device, dtype=roll.dtype)
    target = (eye[None, :, :, None] * act[:, None]).reshape(b * k, k, n)
    return bce(inst_logits, target)


def supervised_loss(est_mag: torch.Tensor, ref_mag: torch.Tensor) -> torch.Tensor:
    """Upper bound: ‖ Ŝ_k − |S_k| ‖₁ against the reference stems' magnitudes (B, K, F, N)."""
    return (est_mag - ref_mag).abs().mean()


def supervised_spectrum_loss(est_spec: torch.Tensor, ref_spec: torch.Tensor) -> torch.Tensor:
    """Upper bound of a waveform backbone [ours]: ‖ STFT(ŝ_k) − STFT(s_k) ‖₁ on the complex
    spectra (B, K, F, N): the magnitude loss leaves such a model's phase free, and its estimates
    are scored as they come out. For a mask backbone (the mixture's phase) it is not used."""
    return (est_spec - ref_spec).abs().mean()


def supervised_snr_loss(est: torch.Tensor, ref: torch.Tensor, mix: torch.Tensor, tau_db: float = 30.0,
                        eps: float = 1e-8) -> torch.Tensor:
    """Upper bound on the waveforms [ours, an option]: the negative SNR with a soft threshold of
    mixture invariant training (Wisdom et al., NeurIPS 2020), est / ref (B, K, L), mix (B, L):

        10 log10(‖s − ŝ‖² + τ_s) − 10 log10(‖s‖² + τ_s),  τ = 10^(−tau_db / 10),

    with τ_s = τ‖s‖² for a source that sounds (−SNR, capped at tau_db: a source already separated
    that well stops pulling the gradient) and τ‖x‖² for a silent one (whose estimate is then
    penalised by its energy relative to the mixture's, where an SNR is undefined). The second
    term carries no gradient; it puts the figure in dB of SNR. Mean over (B, K).

    Why: the table scores SI-SDR of the waveforms; the spectral L1 losses reach it only through
    the inverse STFT and weight every bin alike, loud sources most."""
    tau = 10.0 ** (-tau_db / 10.0)
    est, ref = est.float(), ref.float()
    e_ref = ref.pow(2).sum(-1)                                    # (B, K)
    e_mix = mix.float().pow(2).sum(-1, keepdim=True)              # (B, 1)
    audible = ref.abs().amax(dim=-1) > SILENCE_PEAK
    thr = tau * torch.where(audible, e_ref, e_mix.expand_as(e_ref)) + eps
    err = (ref - est).pow(2).sum(-1)
    return (10 * torch.log10(err + thr) - 10 * torch.log10(e_ref + thr)).mean()


def si_sdr(estimate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale-invariant SDR in dB (Le Roux et al. 2019), over the last axis, means removed.

    SI-SDR = 10 log10(‖α s‖² / ‖α s − ŝ‖²), α = <ŝ, s> / ‖s‖².
    """
    estimate = estimate - estimate.mean(dim=-1, keepdim=True)
    reference = reference - reference.mean(dim=-1, keepdim=True)
    alpha = (estimate * reference).sum(-1, keepdim=True) / (reference.pow(2).sum(-1, keepdim=True) + eps)
    target = alpha * reference
    noise = target - estimate
    return 10 * torch.log10((target.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps))
