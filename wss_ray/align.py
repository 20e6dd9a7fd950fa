"""Score-to-audio alignment: dynamic time warping (librosa's) between the score's notes and a
representation of the recording, and the warp applied to notes and MIDI files.

Two representations of the audio, each with an onset channel (rises of the activation against
the score's note onsets) that pins the path to attacks rather than letting it slide along held
chords:
- ``salience`` (no model): the recording's STFT magnitude pooled onto semitones, against the
  score's notes each spread over its harmonic series (onset error on synthetic test tracks by
  the DTW alone: median ~16 ms; librosa's chroma gave 52 ms on the same tracks: it cannot tell
  the bass's octave);
- a trained transcriptor (any checkpoint that holds one): its pitch-activation roll, summed over
  instruments, against the score's piano roll (median ~12 ms by the DTW alone).

After the DTW, :func:`refine_onsets` moves each group of onsets onto the recording's attack
(median ~4 ms with either feature). Figures: BENCHMARKS.md.

Memory is bounded: DTW keeps a cost matrix of (audio frames x score frames), so the frame rate
is lowered for long inputs until the matrix stays under ``MAX_CELLS`` (50 frames/s up to
about 1.5 minutes; a 10-minute song aligns at 7.2 frames/s in 7-10 s, its alignment taking
about 650 MB on top of the process: benchmarks/bench_align.py --long-minutes 10).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wss_ray.data.score import ScoreError, notes_to_roll

FPS = 50.0            # DTW frame rate for songs of a few minutes (20 ms per frame)
MAX_CELLS = 2e7       # cells of the DTW cost matrix: ~20 bytes each in librosa's DTW
# A salience path whose mean cost is above this share of the matrix's mean cost is no alignment.
# Chosen on the validation split of a warped demo corpus (benchmarks/bench_align.py), each
# track's mix against its own warped score and the score of the next track: 0.44-0.78 own,
# 0.77-1.00 other (92% of other scores refused). The test always uses the score-free salience
# path, also when a transcriptor aligns: a transcriptor's cost moves with how well it knows the
# music (on real compositions, out of its training domain, its own scores reached 0.77 and other
# pieces' came down to 0.62), the salience cost does not depend on a model.
MAX_COST_RATIO = 0.8
MAX_TEMPO_RATIO = 2.0  # the score's overall tempo may differ by this factor at most
QUIET_DB = -50.0       # leading and trailing stretches this far below the peak are cut before aligning
SILENT_PEAK = 1e-5     # a recording whose peak is below this is silence
ONSET_WEIGHT = 0.5     # weight of the onset channel against the 12 (or P) pitch channels


class AlignmentError(ValueError):
    """A score cannot be aligned to a recording (no notes, far too long, another song)."""


@dataclass
class Alignment:
    """A monotonic map between score time and audio time, sampled at the DTW frames."""

    score_s: np.ndarray   # increasing
    audio_s: np.ndarray   # non-decreasing, same length
    cost: float           # mean cost along the path (cosine distance, 0..1)
    cost_ratio: float     # cost / the mean cost of all frame pairs: ~1 means no better than chance
    fps: float
    feature: str
    check_ratio: float = math.nan   # the salience path's cost_ratio: what the sanity check tests
    stretch: float = 1.0            # audio span / score span, first to last onset
    onset_moves: np.ndarray | None = None   # seconds each onset group was moved by refine_onsets

    def to_audio(self, times: np.ndarray) -> np.ndarray:
        """Score times -> audio times (linear between path points, extended at the slope 1 outside)."""
        t = np.asarray(times, dtype=np.float64)
        out = np.interp(t, self.score_s, self.audio_s)
        out = np.where(t < self.score_s[0], self.audio_s[0] + (t - self.score_s[0]), out)
        return np.where(t > self.score_s[-1], self.audio_s[-1] + (t - self.score_s[-1]), out)

    def warp_notes(self, notes: np.ndarray) -> np.ndarray:
        """(n, 3) (start, end, pitch) in score time -> the same notes in audio time; a note
        keeps at least 10 ms (a held note squeezed to a point by the path would vanish)."""
        out = np.array(notes, dtype=np.float64, copy=True).reshape(-1, 3)
        if len(out):
            out[:, 0] = self.to_audio(out[:, 0])
            out[:, 1] = np.maximum(self.to_audio(out[:, 1]), out[:, 0] + 0.01)
        return out

    def summary(self, notes: np.ndarray) -> dict:
        """Cost, where the score's first note moved, how its span (first to last onset) was
        stretched and how far the refinement moved the onsets (median), for reports."""
        first = float(notes[:, 0].min())
        out = {"feature": self.feature, "cost": round(self.cost, 4), "cost_ratio": round(self.cost_ratio, 4),
               "check_ratio": round(self.check_ratio, 4), "fps": round(self.fps, 3),
               "shift_s": round(float(self.to_audio(np.array([first]))[0] - first), 3),
               "stretch": round(self.stretch, 4)}
        if self.onset_moves is not None and len(self.onset_moves):
            out["onset_move_ms"] = round(1000 * float(np.median(np.abs(self.onset_moves))), 1)
        return out


def dtw_rate(audio_seconds: float, score_seconds: float, fps: float = FPS, max_cells: float = MAX_CELLS) -> float:
    """The frame rate at which the cost matrix of the two lengths stays under max_cells."""
    cells_per_fps2 = max(audio_seconds, 1e-3) * max(score_seconds, 1e-3)
    return float(min(fps, math.sqrt(max_cells / cells_per_fps2)))


def _normalise(x: np.ndarray, silent: np.ndarray) -> np.ndarray:
    """Columns to unit length, with one extra row that is 1 exactly where a frame is silent, so
    silence matches silence (a zero column has no cosine distance to anything)."""
    norm = np.linalg.norm(x, axis=0, keepdims=True)
    x = np.where(silent[None], 0.0, x / np.maximum(norm, 1e-12))
    return np.concatenate([x, silent[None].astype(np.float64)], axis=0)


def _onset_channel(x: np.ndarray) -> np.ndarray:
    """Half-wave rectified rise of a (D, N) activation, summed over D and scaled to max 1."""
    rise = np.maximum(np.diff(x, axis=1, prepend=x[:, :1]), 0.0).sum(axis=0)
    return rise / max(float(rise.max()), 1e-12)


def score_roll(notes: np.ndarray, n_frames: int, sample_rate: int, hop: int, pitch_min: int = 0,
               pitch_max: int = 127) -> np.ndarray:
    """(P, n_frames) float roll of notes on the recording's frame grid (frame i at i * hop / sample_rate)."""
    return notes_to_roll(notes, n_frames, sample_rate, hop, pitch_min, pitch_max).astype(np.float64)


def score_features(notes: np.ndarray, n_frames: int, sample_rate: int, hop: int, feature: str,
                   pitch_range=(0, 127)) -> np.ndarray:
    roll = score_roll(notes, n_frames, sample_rate, hop, *pitch_range)
    silent = roll.sum(axis=0) == 0
    # the score-free feature compares spectra: each note becomes its harmonic series
    body = _harmonic_template(*pitch_range).T @ roll if feature == "salience" else roll
    onsets = notes_onsets(notes, n_frames, sample_rate / hop)
    return np.concatenate([_normalise(body, silent), ONSET_WEIGHT * onsets[None]], axis=0)


def notes_onsets(notes: np.ndarray, n_frames: int, fps: float) -> np.ndarray:
    """Number of note onsets per frame, scaled to max 1 (a note counts in the first frame it is
    on in the roll: :func:`wss_ray.data.score.notes_to_roll`'s convention)."""
    idx = np.clip(np.ceil(np.asarray(notes)[:, 0] * fps - 1e-9).astype(int), 0, n_frames - 1) if len(notes) else []
    count = np.bincount(np.asarray(idx, dtype=int), minlength=n_frames)[:n_frames].astype(np.float64)
    return count / max(float(count.max()), 1.0)


def _harmonics(n_harmonics: int) -> list[tuple[int, int]]:
    """(semitones above the fundamental of the h-th harmonic, rounded; h), h = 1..n; harmonic h
    weighs 1/h."""
    return [(int(round(12 * math.log2(h))), h) for h in range(1, n_harmonics + 1)]


def _harmonic_template(pitch_min: int, pitch_max: int, n_harmonics: int = 8) -> np.ndarray:
    """(P, P) matrix: a note of pitch p puts 1/h of energy on the semitone nearest its h-th harmonic."""
    P = pitch_max - pitch_min + 1
    t = np.zeros((P, P))
    for p in range(P):
        for off, h in _harmonics(n_harmonics):
            if p + off < P:
                t[p, p + off] += 1.0 / h
    return t


SALIENCE_RANGE = (24, 108)   # semitones C1..C8: the pitch range of the salience feature


def semitone_spectrogram(wave: np.ndarray, sample_rate: int, hop: int, n_fft: int,
                         win_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """((P, N) STFT magnitude pooled onto the semitones of SALIENCE_RANGE, (N,) frame energy);
    frame i is centred on sample i * hop; ``win_length`` (default n_fft) samples of window,
    zero-padded to n_fft. The STFT runs block by block (librosa's, uncentred, on a
    zero-padded copy: what a centred STFT computes), so memory does not grow with the song's
    spectrogram."""
    import librosa

    from wss_ray.dsp import log_frequency_filterbank

    fb = log_frequency_filterbank(sample_rate, n_fft, SALIENCE_RANGE[0], SALIENCE_RANGE[1], 1).numpy()
    fb = fb[:SALIENCE_RANGE[1] - SALIENCE_RANGE[0] + 1]
    x = np.pad(np.asarray(wave, dtype=np.float32), (n_fft // 2, n_fft // 2))
    n_frames = 1 + len(wave) // hop
    semis = np.empty((fb.shape[0], n_frames), dtype=np.float32)
    energy = np.empty(n_frames)
    per_block = max(1, (1 << 22) // n_fft)   # ~4M spectrum values (~16 MB) at a time
    for f0 in range(0, n_frames, per_block):
        f1 = min(n_frames, f0 + per_block)
        seg = x[f0 * hop:(f1 - 1) * hop + n_fft]
        spec = np.abs(librosa.stft(seg, n_fft=n_fft, hop_length=hop, win_length=win_length,
                                   center=False))[:, :f1 - f0]
        semis[:, f0:f1] = fb @ spec
        energy[f0:f1] = (spec.astype(np.float64) ** 2).sum(axis=0)
    return semis, energy


def salience_features(wave: np.ndarray, sample_rate: int, hop: int) -> np.ndarray:
    """(P + 2, N): the recording's STFT magnitude pooled onto semitones (the project's
    log-frequency filterbank), log-compressed, plus silence and onset strength; frame i is
    centred on sample i * hop."""
    n_fft = 1 << max(12, math.ceil(math.log2(2 * hop)))   # >= 4096: semitones apart at low pitch
    semis, energy = semitone_spectrogram(wave, sample_rate, hop, n_fft)
    semis = np.log1p(3 * semis.astype(np.float64) / max(float(semis.max()), 1e-20))
    silent = energy < 1e-6 * max(float(energy.max()), 1e-20)
    flux = _onset_channel(semis)
    return np.concatenate([_normalise(semis, silent), ONSET_WEIGHT * flux[None]], axis=0)


# Onset refinement after the DTW (chosen on the validation split of a warped demo corpus,
# benchmarks/bench_align.py; BENCHMARKS.md): a fine grid (4 ms hop, 32 ms window: the DTW's 20 ms
# frames and 4096-sample window blur attacks) and up to 60 ms either way of where the path put
# the onset.
REFINE_HOP_S = 0.004
REFINE_WINDOW_S = 0.032
REFINE_REACH_S = 0.06
REFINE_HARMONICS = 6
REFINE_COMPRESSION = 100.0   # log(1 + C x / max): quiet attacks count next to loud ones
REFINE_PEAK_RATIO = 2.0      # the chosen peak must exceed this many times the median strength in reach
REFINE_MIN_RISE = 0.1        # and a rise of this much per note (log units, harmonics weighed 1/h)


def refine_onsets(al: Alignment, notes: np.ndarray, wave: np.ndarray, sample_rate: int,
                  reach: float = REFINE_REACH_S) -> Alignment:
    """Move each group of notes that start together in the score to where the rise of their
    pitches' harmonics peaks in the recording, within ``reach`` seconds of where the DTW path put
    it, and bend the map through the moved onsets (it stays monotonic). The DTW's frames are 20 ms
    or coarser and its path slides along held notes; attacks are sharper than that. A slight
    preference for small moves (the strength is weighed down to half at the edge of the reach)
    keeps a group on the path's estimate when two attacks are equally strong; a group whose
    strongest rise in reach does not stand out of the rest (no attack of its pitches there, only
    noise) stays where the path put it, and no group moves past half-way to its neighbours."""
    notes = np.asarray(notes, dtype=np.float64).reshape(-1, 3)
    if not len(notes):
        return al
    hop = max(1, int(round(REFINE_HOP_S * sample_rate)))
    # the window in seconds whatever the rate (an attack is seen when it enters the window, so a
    # longer one would see it earlier); zero-padded to a power of two
    win = max(16, int(round(REFINE_WINDOW_S * sample_rate)))
    semis, _ = semitone_spectrogram(wave, sample_rate, hop, 1 << math.ceil(math.log2(win)), win)
    logs = np.log1p(REFINE_COMPRESSION * semis / max(float(semis.max()), 1e-20))
    rise = np.maximum(np.diff(logs, axis=1, prepend=logs[:, :1]), 0.0)
    P, N = rise.shape
    k = max(1, int(round(reach * sample_rate / hop)))
    deltas = np.arange(-k, k + 1)
    prior = 1.0 - 0.5 * (deltas / k) ** 2
    starts, group = np.unique(np.round(notes[:, 0], 4), return_inverse=True)
    mapped = al.to_audio(starts)
    # each group searches only up to half-way to its neighbours' estimates, so two groups cannot
    # swap or land on one attack
    mid = (mapped[1:] + mapped[:-1]) / 2
    lo = np.concatenate([[-np.inf], mid])
    hi = np.concatenate([mid, [np.inf]])
    moves = np.zeros(len(starts))
    for g in range(len(starts)):
        centre = int(round(mapped[g] * sample_rate / hop))
        frames = centre + deltas
        t = frames * hop / sample_rate
        ok = (frames >= 0) & (frames < N) & (t >= lo[g]) & (t <= hi[g])
        if not ok.any():
            continue
        strength = np.zeros(len(deltas))
        for p in notes[group == g, 2]:
            # a note below the range still counts its harmonics that fall inside it
            for off, h in _harmonics(REFINE_HARMONICS):
                q = int(p) + off - SALIENCE_RANGE[0]
                if 0 <= q < P:
                    strength[ok] += rise[q, frames[ok]] / h
        weighed = np.where(ok, strength * prior, 0.0)
        best = int(np.argmax(weighed))
        # a peak that does not stand out of its surroundings, or is too small a rise to be an
        # attack of these notes, is noise
        n_notes = int((group == g).sum())
        if weighed[best] <= max(REFINE_PEAK_RATIO * float(np.median(strength[ok])), REFINE_MIN_RISE * n_notes):
            continue
        moves[g] = deltas[best] * hop / sample_rate
    knots = np.union1d(al.score_s, starts)
    audio = al.to_audio(knots) + np.interp(knots, starts, moves)
    al.score_s, al.audio_s = knots, np.maximum.accumulate(audio)
    al.onset_moves = moves
    return al


def dtw(audio_feat: np.ndarray, score_feat: np.ndarray, fps: float, feature: str, audio_start_s: float = 0.0) -> Alignment:
    """librosa's DTW over cosine distances, the path pinned to both signals' ends (the score's
    silence before its first note and after its last lets the path absorb an offset); the
    audio's first frame is at ``audio_start_s`` in the recording."""
    import librosa
    from scipy.spatial.distance import cdist

    cost = cdist(audio_feat.T, score_feat.T, metric="cosine")
    cost = np.nan_to_num(cost, nan=1.0)
    _, path = librosa.sequence.dtw(C=cost, backtrack=True)
    path = path[::-1]
    path_cost = float(cost[path[:, 0], path[:, 1]].mean())
    ratio = path_cost / max(float(cost.mean()), 1e-12)
    # one audio time per score frame: the mean over the path's cells in that column
    n = score_feat.shape[1]
    sums = np.bincount(path[:, 1], weights=path[:, 0], minlength=n)
    counts = np.bincount(path[:, 1], minlength=n)
    audio_frames = np.maximum.accumulate(sums / np.maximum(counts, 1))
    # DTW paths move in steps; a short running mean turns the steps into slopes
    k = 5
    padded = np.pad(audio_frames, (k // 2, k // 2), mode="edge")
    audio_frames = np.convolve(padded, np.ones(k) / k, mode="valid")
    score_s = np.arange(n) / fps
    return Alignment(score_s=score_s, audio_s=audio_frames / fps + audio_start_s, cost=path_cost, cost_ratio=ratio, fps=fps,
                     feature=feature)


def _shape_map(al: Alignment, notes: np.ndarray) -> None:
    """Outside the notes the path has nothing to follow (silence at either end of the score or the
    recording): the map runs at slope 1 from the first onset backwards and from the last note's end
    onwards."""
    first, last = float(notes[:, 0].min()), float(notes[:, 1].max())
    a_first = float(np.interp(first, al.score_s, al.audio_s))
    audio = al.audio_s
    a_last = float(np.interp(last, al.score_s, audio))
    audio = np.where(al.score_s < first, a_first - (first - al.score_s), audio)
    al.audio_s = np.where(al.score_s > last, a_last + (al.score_s - last), audio)
    onsets = al.to_audio(np.array([first, float(notes[:, 0].max())]))
    span = float(notes[:, 0].max()) - first
    al.stretch = float(onsets[1] - onsets[0]) / span if span > 0 else 1.0


def _sounding(wave: np.ndarray, sample_rate: int) -> tuple[int, int]:
    """Sample range from the first to the last 10 ms block within QUIET_DB of the loudest block."""
    block = max(1, sample_rate // 100)
    n = len(wave) // block
    if n < 2:
        return 0, len(wave)
    rms = np.sqrt(np.mean(wave[:n * block].reshape(n, block).astype(np.float64) ** 2, axis=1))
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (QUIET_DB / 20))
    return int(loud[0] * block), int(min(len(wave), (loud[-1] + 1) * block))


def check_max_cost(value: float, option: str = "--max-cost") -> float:
    # above 1 a path worse than chance would pass: the check would be off
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"{option}: need a number in (0, 1], got {value!r} (default {MAX_COST_RATIO})")
    return float(value)


def check_alignment(al: Alignment, what: str, max_cost_ratio: float = MAX_COST_RATIO) -> Alignment:
    """A path little better than chance, or one that needs an absurd tempo, is refused."""
    if not al.check_ratio <= max_cost_ratio:
        raise AlignmentError(f"{what}: the score does not match the recording (alignment cost {al.check_ratio:.2f} "
                             f"of chance, limit {max_cost_ratio}): is it the score of another piece, or one that "
                             f"lacks most of the parts that play? (a partial score: raise the limit with --max-cost)")
    if not 1 / MAX_TEMPO_RATIO <= al.stretch <= MAX_TEMPO_RATIO:
        raise AlignmentError(f"{what}: the alignment plays the score {1 / al.stretch:.2f}x as fast as written "
                             f"(limit {MAX_TEMPO_RATIO}x either way): is the score complete, and of this piece?")
    return al


def align_notes(notes: np.ndarray, wave: np.ndarray, sample_rate: int, feature: str = "salience",
                transcriber=None, what: str = "score", check: bool = True,
                max_cost: float | None = None, refine: bool = True) -> Alignment:
    """Align notes (n, 3) in score time to a mono recording.

    ``feature``: "salience", or "transcriptor" with ``transcriber`` a :class:`RollTranscriber`.
    ``max_cost``: the sanity check's limit (None: :data:`MAX_COST_RATIO`); ``refine``: move the
    onsets onto the recording's attacks after the DTW (:func:`refine_onsets`)."""
    notes = np.asarray(notes, dtype=np.float64).reshape(-1, 3)
    if not len(notes):
        raise AlignmentError(f"{what}: no notes to align")
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(wave))
    if len(bad):
        raise AlignmentError(f"{what}: the recording has a non-finite sample (NaN or Inf) at "
                             f"{bad[0] / sample_rate:.3f} s")
    if not len(wave) or float(np.abs(wave).max()) < SILENT_PEAK:
        raise AlignmentError(f"{what}: the recording is silent; there is nothing to align the score to")
    audio_s = len(wave) / sample_rate
    score_end = float(notes[:, 1].max())
    if score_end > MAX_TEMPO_RATIO * audio_s + 2.0:
        raise AlignmentError(f"{what}: the score lasts {score_end:.1f} s, the recording {audio_s:.1f} s; "
                             f"more than {MAX_TEMPO_RATIO}x apart, so it cannot be this recording's score")
    # the score's frames run a little past its last note so a tail of silence can match
    score_s = score_end + 0.5
    # one frame grid for recording and score: a whole number of samples per frame
    hop = max(1, int(round(sample_rate / dtw_rate(audio_s, score_s))))
    fps = sample_rate / hop
    # silence before and after the music (a pause before the first note, a fade to nothing) is
    # cut: the path is pinned to the ends, and pinned to silence it would drag the notes with it
    i0, i1 = _sounding(wave, sample_rate)
    whole, wave = wave, wave[i0:i1]
    if feature == "salience":
        a = salience_features(wave, sample_rate, hop)
        pitch_range = SALIENCE_RANGE
    elif feature == "transcriptor":
        if transcriber is None:
            raise ValueError("feature 'transcriptor' needs a transcriber (a checkpoint holding a transcriptor)")
        a = transcriber.features(wave, sample_rate, fps)
        pitch_range = (transcriber.pitch_min, transcriber.pitch_max)
    else:
        raise ValueError(f"alignment feature: 'salience' or a transcriptor checkpoint, got {feature!r}")
    n_score = max(2, int(math.ceil(score_s * fps)))
    al = dtw(a, score_features(notes, n_score, sample_rate, hop, feature, pitch_range), fps, feature,
             i0 / sample_rate)
    if feature == "salience":
        al.check_ratio = al.cost_ratio
    else:   # the sanity check's cost comes from the model-free feature (see MAX_COST_RATIO)
        sal = salience_features(wave, sample_rate, hop)
        al.check_ratio = dtw(sal, score_features(notes, n_score, sample_rate, hop, "salience", SALIENCE_RANGE),
                             fps, "salience").cost_ratio
    _shape_map(al, notes)
    if refine:
        refine_onsets(al, notes, whole, sample_rate)
    return check_alignment(al, what, max_cost or MAX_COST_RATIO) if check else al


class RollTranscriber:
    """A trained transcriptor as an alignment feature: pitch activations summed over instruments."""

    def __init__(self, model, sample_rate: int, n_fft: int, hop: int, pitch_min: int, pitch_max: int,
                 name: str = "transcriptor"):
        from wss_ray.dsp import STFT

        self.model = model.eval()
        self.sample_rate, self.n_fft, self.hop = sample_rate, n_fft, hop
        self.pitch_min, self.pitch_max = pitch_min, pitch_max
        self.stft = STFT(n_fft, hop)
        self.device = next(model.parameters()).device
        self.name = name

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "cpu") -> RollTranscriber:
        """From any checkpoint holding a transcriptor (transcriptor, separator or finetune stage)."""
        from wss_ray.checkpoint import CheckpointError, build_model, load_checkpoint

        payload, meta = load_checkpoint(checkpoint, stages=("transcriptor", "separator", "finetune"),
                                        purpose="alignment with a transcriptor")
        data = meta.get("signal") or (meta.get("config") or {}).get("data") or {}
        try:
            signal = [int(data[k]) for k in ("sample_rate", "n_fft", "hop", "pitch_min", "pitch_max")]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{checkpoint}: meta.json lacks the signal settings") from None
        return cls(build_model(payload, "transcriptor").to(device), *signal, name=str(checkpoint))

    def roll(self, wave: np.ndarray, sample_rate: int, chunk_seconds: float = 30.0) -> np.ndarray:
        """(P, N) activation at the model's frame rate, chunk by chunk (memory stays flat)."""
        import torch

        from wss_ray.dsp import resample

        x = resample(torch.as_tensor(np.asarray(wave, dtype=np.float32)), sample_rate, self.sample_rate)
        step = int(chunk_seconds * self.sample_rate) // self.hop * self.hop
        parts = []
        with torch.no_grad():
            for s in range(0, x.shape[-1], step):
                seg = x[s:s + step]
                seg = torch.nn.functional.pad(seg, (0, max(0, self.n_fft - seg.shape[-1])))
                logits = self.model(self.stft(seg[None].to(self.device)).abs())["roll"][0].float()
                n = min(logits.shape[-1], step // self.hop) if s + step < x.shape[-1] else logits.shape[-1]
                parts.append(torch.sigmoid(logits).sum(0)[:, :n].cpu().numpy())
        return np.concatenate(parts, axis=1)

    def features(self, wave: np.ndarray, sample_rate: int, fps: float) -> np.ndarray:
        roll = self.roll(wave, sample_rate)
        model_fps = self.sample_rate / self.hop
        n = max(2, int(math.ceil(roll.shape[1] / model_fps * fps)))
        # average-pool the model's frames onto the DTW grid, each to the nearest DTW frame (both
        # grids' frames are centred on their times)
        idx = np.minimum(np.round(np.arange(roll.shape[1]) / model_fps * fps).astype(int), n - 1)
        pooled = np.zeros((roll.shape[0], n))
        np.add.at(pooled.T, idx, roll.T)
        pooled /= np.maximum(np.bincount(idx, minlength=n), 1)[None]
        silent = pooled.max(axis=0) < 0.2
        return np.concatenate([_normalise(pooled, silent), ONSET_WEIGHT * _onset_channel(pooled)[None]], axis=0)


def midi_notes(path: str | Path) -> np.ndarray:
    from wss_ray.data.score import load_notes

    try:
        return load_notes(path)
    except ScoreError as e:
        raise AlignmentError(str(e)) from None


def warp_map(al: Alignment, end: float) -> tuple[np.ndarray, np.ndarray]:
    """(score_s, audio_s) samples of the alignment covering a score that lasts until ``end``
    (extended at slope 1 past the path), strictly increasing, for :func:`wss_ray.data.warp.warp_midi`."""
    src = np.unique(np.concatenate([al.score_s, [max(end, float(al.score_s[-1])) + 1.0]]))
    dst = al.to_audio(src)
    ramp = 1e-6 * np.arange(len(dst))   # to_audio is non-decreasing; a MIDI tempo map needs increasing
    return src, np.maximum.accumulate(dst - ramp) + ramp


def align_file(audio: str | Path, midi: str | Path, out: str | Path, checkpoint: str | None = None,
               log=print, max_cost: float = MAX_COST_RATIO) -> Alignment:
    """``wss-ray align``: the MIDI file warped onto the recording, written to ``out`` (every event
    kept: notes, controls, programs, velocities)."""
    from wss_ray.atomic import check_out_file
    from wss_ray.audio_io import open_audio, read_finite
    from wss_ray.data.slakh import SlakhError
    from wss_ray.data.warp import midi_span, warp_midi

    for p, what in ((audio, "audio file"), (midi, "MIDI file")):
        if Path(p).is_dir():
            raise ValueError(f"{p}: is a folder, not a {what}")
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: no such {what}")
    check_max_cost(max_cost)
    out = check_out_file(out, [audio, midi])
    reader = open_audio(audio)
    try:
        wave = read_finite(reader, 0, reader.frames)
        sr = reader.sample_rate
    finally:
        reader.close()
    notes = midi_notes(midi)
    transcriber = RollTranscriber.load(checkpoint) if checkpoint else None
    al = align_notes(notes, wave, sr, "transcriptor" if transcriber else "salience", transcriber,
                     what=f"{midi} vs {audio}", max_cost=max_cost)
    # the MIDI's events keep their ticks; only its tempo map is rewritten (pretty_midi's adjust_times
    # would snap notes to the tick grid and drop controls)
    try:
        warp_midi(midi, out, *warp_map(al, midi_span(midi)[1]))
    except SlakhError as e:   # its wording is about corpus warps; say what failed here
        raise AlignmentError(f"{midi}: the aligned score cannot be written to {out}: {e}") from None
    s = al.summary(notes)
    log(f"[align] {midi} -> {out}: first note moved {s['shift_s']:+.2f} s, the score stretched x{s['stretch']:.3f}; "
        f"cost {s['check_ratio']:.2f} of chance (limit {max_cost}; aligned by {al.feature}, "
        f"{al.fps:.1f} frames/s; onsets then moved onto the attacks by {s.get('onset_move_ms', 0):.0f} ms median)")
    return al
