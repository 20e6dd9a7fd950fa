"""Inference: a trained model applied to audio. :class:`Separator` (the Python API, also used by
the benchmarks) turns any-length audio into per-instrument estimates and, optionally, a
transcription; :func:`separate_files` is ``wss-ray separate``: audio files in, stem WAVs and
MIDI out.

Audio streams through in overlapping chunks: a file is read block by block and each
instrument's WAV is written as soon as a stretch of it is final, so memory stays flat
whatever the file's length.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import numpy as np
import torch

from wss_ray.atomic import atomic_path, check_out_folder
from wss_ray.audio_io import ArrayReader, mono_waveform, open_audio, read_finite, wav_writer
from wss_ray.checkpoint import CheckpointError, build_model, load_checkpoint
from wss_ray.data.score import harmonic_basis, soft_score_mask
from wss_ray.dsp import STFT, resample
from wss_ray.midi_out import RollCollector, roll_to_midi
from wss_ray.separation import Estimates, estimate
from wss_ray.streaming import ProgressBar, fit_length, overlap_add_stream

SEPARATOR_STAGES = ("separator", "finetune", "baseline", "supervised")
# score-informed separation: how far from a note's harmonics (frames of 16 ms, STFT bins) its
# energy is kept, what is kept elsewhere, and how many harmonics each instrument's notes keep
# (the distorted guitar's energy reaches far above its 10th harmonic). Chosen on the validation
# split of the demo corpus: BENCHMARKS.md.
SCORE_TOLERANCE = {"time_tol": 2, "freq_tol": 1, "floor": 0.0}
SCORE_HARMONICS = {"piano": 10, "guitar": 30, "bass": 10}


def check_chunk_seconds(chunk_seconds: float, name: str = "chunk_seconds") -> float:
    # a chunk is held in memory at once: an hour is plenty, a tenth of a second is the least useful
    ok = isinstance(chunk_seconds, (int, float)) and not isinstance(chunk_seconds, bool)
    if not (ok and math.isfinite(chunk_seconds) and 0.1 <= chunk_seconds <= 3600):
        raise ValueError(f"{name}: need a number of seconds between 0.1 and 3600, got {chunk_seconds!r}")
    return float(chunk_seconds)


class Separator:
    """A trained separator (and its transcriptor, when the checkpoint holds one)."""

    def __init__(self, separator, meta: dict, transcriptor=None, device: str = "cpu"):
        self.meta = meta
        # the signal settings the model was trained with: the data manifest's, recorded in the
        # checkpoint (older checkpoints: the config's data section, which matched it)
        data = meta.get("signal") or (meta.get("config") or {}).get("data")
        try:
            self.sample_rate, self.n_fft, self.hop = int(data["sample_rate"]), int(data["n_fft"]), int(data["hop"])
            self.pitch_min, self.pitch_max = int(data["pitch_min"]), int(data["pitch_max"])
            self.instruments = list(meta["instruments"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{meta.get('_path', 'checkpoint')}: meta.json lacks the signal settings "
                                  "(signal or config.data: sample_rate, n_fft, hop, pitch_min, pitch_max) or instruments") from None
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA GPU is visible to torch")
        self.separator = separator.to(self.device).eval()
        self.transcriptor = transcriptor.to(self.device).eval() if transcriptor is not None else None
        self.stft = STFT(self.n_fft, self.hop)
        self._basis = None
        self.score_tolerance = dict(SCORE_TOLERANCE)
        self.score_harmonics = dict(SCORE_HARMONICS)

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, device: str = "cpu") -> Separator:
        """``path`` None: the shipped model (models/default, or $WSS_RAY_MODEL)."""
        if path is None:
            from wss_ray.checkpoint import default_checkpoint

            path = default_checkpoint()
        payload, meta = load_checkpoint(path, stages=SEPARATOR_STAGES, purpose="separation")
        t = build_model(payload, "transcriptor") if "transcriptor" in payload["models"] else None
        return cls(build_model(payload, "separator"), meta, t, device)

    @property
    def system(self) -> str:
        v = self.meta.get("variant")
        name = f"{self.meta['stage']}[{v}]" if v else self.meta["stage"]
        trial = (self.meta.get("tune") or {}).get("trial")
        return f"{name}@{trial}" if trial else name

    @property
    def fps(self) -> float:
        return self.sample_rate / self.hop

    @torch.no_grad()
    def separate_batch(self, mix: torch.Tensor, score_roll: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) at the model's rate -> (B, K, L): a mask backbone's masks applied to the mixture
        STFT (its phase), a waveform backbone's own waveforms.

        ``score_roll`` (B, K, P, N) on the STFT frame grid: score-informed separation, each
        instrument's estimate kept only near the harmonics of its notes (:func:`soft_score_mask`)."""
        est = self.estimates(mix)
        gain = None if score_roll is None else self.score_mask(score_roll)
        return est.waveforms(self.stft, mix.shape[-1], gain)

    @torch.no_grad()
    def separate_batch_scored(self, mix: torch.Tensor, score_roll: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score-free, score-informed) estimates of one forward pass (evaluate's two rows)."""
        est = self.estimates(mix)
        return est.waveforms(self.stft, mix.shape[-1]), est.waveforms(self.stft, mix.shape[-1], self.score_mask(score_roll))

    @torch.no_grad()
    def estimates(self, mix: torch.Tensor) -> Estimates:
        """One separator pass over mixtures (B, L) at the model's rate."""
        return estimate(self.separator, mix.to(self.device), self.stft)

    def score_mask(self, score_roll: torch.Tensor) -> torch.Tensor:
        return soft_score_mask(score_roll.to(self.device), self.basis, **self.score_tolerance)

    @property
    def basis(self) -> torch.Tensor:
        """(K, P, F) harmonic basis of each instrument (score-informed separation)."""
        if self._basis is None:
            self._basis = torch.stack([harmonic_basis(self.sample_rate, self.n_fft, self.pitch_min, self.pitch_max,
                                                      self.score_harmonics.get(name, 10))
                                       for name in self.instruments]).to(self.device)
        return self._basis

    @torch.no_grad()
    def transcribe_batch(self, mix: torch.Tensor) -> torch.Tensor:
        """(B, L) -> roll probabilities (B, K, P, N)."""
        self._need_transcriptor()
        return torch.sigmoid(self.transcriptor(self.stft(mix.to(self.device)).abs())["roll"].float())

    def aligner(self):
        """This model's transcriptor as an alignment feature (None without one)."""
        from wss_ray.align import RollTranscriber

        if self.transcriptor is None:
            return None
        return RollTranscriber(self.transcriptor, self.sample_rate, self.n_fft, self.hop, self.pitch_min,
                               self.pitch_max, name=self.system)

    def guide(self, score: str | Path, waveform: np.ndarray, sample_rate: int, what: str = "", max_cost=None):
        """A score of this recording, aligned to it (:func:`wss_ray.score_informed.guide_for`)."""
        from wss_ray.score_informed import guide_for

        return guide_for(score, waveform, sample_rate, self.instruments, self.aligner(), what=what,
                         max_cost=max_cost)

    def _need_transcriptor(self) -> None:
        if self.transcriptor is None:
            raise CheckpointError(f"{self.system}: the checkpoint holds no transcriptor (train a separator "
                                  "or finetune stage to separate and transcribe)")

    @torch.no_grad()
    def stream(self, reader, chunk_seconds: float = 10.0, roll: RollCollector | None = None,
               progress=None, guide=None) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
        """Separate a reader (``.read(start, n)``, ``.frames``, ``.sample_rate``) chunk by chunk.

        Yields (start, estimates (K, n) at the reader's rate, mixture (n,)) in order. Given a
        ``roll``, the transcriptor's roll of the whole input is assembled in it as well. Given a
        ``guide`` (:class:`wss_ray.score_informed.ScoreGuide`), separation is score-informed.
        """
        if roll is not None:
            self._need_transcriptor()
        sr, n = reader.sample_rate, reader.frames
        check_chunk_seconds(chunk_seconds)
        chunk = max(int(chunk_seconds * sr), 2 * self.hop)
        # a clip shorter than a chunk is processed at its own length, not padded to a chunk
        chunk = min(chunk, max(n + n % 2, 2 * self.hop))
        chunk -= chunk % 2
        fps = self.fps
        read = partial(read_finite, reader)

        def fn(x_in: np.ndarray, start: int) -> torch.Tensor:
            x = resample(torch.as_tensor(np.ascontiguousarray(x_in, dtype=np.float32))[None], sr,
                          self.sample_rate)
            # a clip shorter than one STFT window (tens of ms) is zero-padded to one window, then
            # cut back: the centred STFT cannot reflect-pad a shorter signal
            length = x.shape[-1]
            x = torch.nn.functional.pad(x, (0, max(0, self.n_fft - length)))
            score = None if guide is None else guide.roll(start / sr, x.shape[-1] // self.hop + 1, self.sample_rate,
                                                          self.hop, self.pitch_min, self.pitch_max)[None]
            est = self.separate_batch(x, score)[0].float().cpu()[..., :length]
            if roll is not None:
                probs = self.transcribe_batch(x)[0].cpu().numpy()[..., :length // self.hop + 1]
                roll.place(probs, start, chunk, n, sr, fps)
            return fit_length(resample(est, self.sample_rate, sr), len(x_in))

        for start, est in overlap_add_stream(fn, read, n, chunk, progress):
            if est.shape[1]:
                yield start, est, read(start, est.shape[1])

    def separate(self, waveform: torch.Tensor | np.ndarray, sample_rate: int, chunk_seconds: float = 10.0,
                 progress=None, score: str | Path | None = None, max_cost: float | None = None) -> dict[str, torch.Tensor]:
        """Mono waveform (L,) at any rate -> {instrument: (L,)} at the same rate, plus "residual"
        (mixture minus the estimates, so everything sums back to the input).

        ``score``: a MIDI file of this recording (any tempo or offset): aligned to it, then each
        instrument keeps only what lies near the harmonics of its notes; an instrument the score
        does not have is silent. A score of another piece raises an AlignmentError (``max_cost``:
        the alignment check's limit, for a partial score)."""
        wave = mono_waveform(waveform)
        guide = self.guide(score, wave, sample_rate, max_cost=max_cost) if score is not None else None
        blocks = list(self.stream(ArrayReader(wave, sample_rate), chunk_seconds, progress=progress, guide=guide))
        est = torch.cat([b for _, b, _ in blocks], dim=1) if blocks else torch.zeros(len(self.instruments), 0)
        out = {name: est[i] for i, name in enumerate(self.instruments)}
        out["residual"] = torch.as_tensor(wave) - est.sum(0)
        return out

    def transcribe(self, waveform: torch.Tensor | np.ndarray, sample_rate: int, chunk_seconds: float = 10.0,
                   threshold: float = 0.5, min_seconds: float = 0.05):
        """Mono waveform -> pretty_midi.PrettyMIDI with one instrument track per separated instrument."""
        wave = mono_waveform(waveform)
        roll = RollCollector(threshold)
        for _ in self.stream(ArrayReader(wave, sample_rate), chunk_seconds, roll=roll):
            pass
        return self.roll_to_midi(roll.roll, min_seconds)

    def roll_to_midi(self, roll: np.ndarray, min_seconds: float = 0.05):
        """(K, P, N) roll of this model's instruments -> pretty_midi.PrettyMIDI."""
        return roll_to_midi(roll, self.instruments, self.fps, self.pitch_min, min_seconds)


def separate_files(paths: list[str], checkpoint: str | None, out: str, midi: bool = False, device: str = "cpu",
                   chunk_seconds: float = 10.0, log=print, progress_stream=None, score: str | None = None,
                   max_cost: float | None = None) -> list[Path]:
    """Separate each file into <out>/<file stem>/{instrument}.wav + residual.wav (+ transcription.mid),
    at the input's sample rate and length. Files appear only when complete (temp name, then rename).

    ``score``: the MIDI score of the (one) input: score-informed separation (:meth:`Separator.separate`)."""
    if score is not None and len(paths) != 1:
        raise ValueError(f"--score: one audio file at a time (a score belongs to one recording), got {len(paths)}")
    if score is not None and Path(score).is_dir():
        raise ValueError(f"{score}: is a folder, not a MIDI file")
    if score is not None and not Path(score).is_file():
        raise FileNotFoundError(f"{score}: no such MIDI file")
    if max_cost is not None and score is None:
        raise ValueError("--max-cost: only used with --score (the alignment check's limit)")
    if max_cost is not None:
        from wss_ray.align import check_max_cost

        check_max_cost(max_cost)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        what = "a directory, not an audio file" if Path(missing[0]).is_dir() else "no such audio file"
        raise FileNotFoundError(f"{missing[0]}: {what}")
    seen: dict[str, str] = {}
    for p in paths:  # one folder per input, named by the file's stem: two inputs must not share one
        stem = Path(p).stem
        if stem in seen:
            raise ValueError(f"{p}: would write to the same output folder as {seen[stem]} "
                             f"({Path(out) / stem}); separate them in two runs or rename one")
        seen[stem] = p
    check_out_folder(out)
    if checkpoint is None:
        from wss_ray.checkpoint import default_checkpoint

        checkpoint = default_checkpoint()
        log(f"[separate] model: {checkpoint} (the shipped model; --checkpoint for another)")
    sep = Separator.from_checkpoint(checkpoint, device)
    if midi:
        sep._need_transcriptor()
    written = []
    for path in paths:
        reader = open_audio(path)
        sr = reader.sample_rate
        guide = None
        if score is not None:
            try:   # the whole recording once, to align the score to it (before any output exists)
                guide = sep.guide(score, read_finite(reader, 0, reader.frames), sr, what=f"{score} vs {path}",
                                  max_cost=max_cost)
            except BaseException:
                reader.close()
                raise
            al = guide.alignment
            log(f"[separate] score {score}: aligned ({al.feature}; cost {al.check_ratio:.2f} of chance, score "
                f"stretched x{al.stretch:.3f}); {guide.describe()}")
        folder = Path(out) / Path(path).stem
        made = [d for d in (folder, *folder.parents) if not d.exists()]   # removed again on failure
        names = sep.instruments + ["residual"]
        targets = [folder / f"{name}.wav" for name in names] + ([folder / "transcription.mid"] if midi else [])
        seconds = reader.frames / sr
        bar = (ProgressBar(f"[separate] {Path(path).name}", seconds, progress_stream) if seconds > chunk_seconds
               else None)
        t0 = time.perf_counter()
        roll = RollCollector() if midi else None
        try:
            with ExitStack() as outputs:
                # unwound last-in first-out: the sinks close before any rename, and entering the
                # targets in reverse renames the stems in order and the MIDI last
                tmps = {t: outputs.enter_context(atomic_path(t)) for t in reversed(targets)}
                sinks = {name: outputs.enter_context(wav_writer(tmps[t], sr)) for name, t in zip(names, targets)}
                for _, est, mix in sep.stream(reader, chunk_seconds, roll=roll, progress=bar, guide=guide):
                    est_np = est.numpy()
                    for k, name in enumerate(sep.instruments):
                        sinks[name].write(est_np[k])
                    sinks["residual"].write(mix - est_np.sum(0))
                if midi:
                    sep.roll_to_midi(roll.roll).write(str(tmps[targets[-1]]))
        except BaseException:
            for d in made:  # innermost first: only the folders this call created, and only if empty
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
            raise
        finally:
            reader.close()
        written += targets
        took = time.perf_counter() - t0
        log(f"[separate] {path} -> {folder} ({', '.join(names)}{', transcription.mid' if midi else ''}; "
            f"{seconds:.1f} s of audio in {took:.1f} s, {seconds / max(took, 1e-9):.3g}x realtime)")
    return written
