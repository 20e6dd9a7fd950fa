"""Inference: the one routine that turns any-length audio into per-instrument estimates (and,
optionally, a transcription), used by ``wss-ray separate``, the Python API and the benchmarks.

Audio streams through in overlapping chunks: a file is read block by block and each
instrument's WAV is written as soon as a stretch of it is final, so memory stays flat
whatever the file's length.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from wss_ray.checkpoint import CheckpointError, build_model, load_checkpoint
from wss_ray.dsp import STFT, resample

SEPARATOR_STAGES = ("separator", "finetune", "baseline", "supervised")
GM_PROGRAMS = {"piano": 0, "guitar": 30, "bass": 33}  # program of each instrument in the written MIDI


def _fit(x: torch.Tensor, n: int) -> torch.Tensor:
    """Trim or zero-pad the last axis to n samples (resampling rounds lengths)."""
    if x.shape[-1] >= n:
        return x[..., :n]
    return torch.nn.functional.pad(x, (0, n - x.shape[-1]))


class ArrayReader:
    """A mono waveform held in memory, read like a file."""

    def __init__(self, wave: np.ndarray, sample_rate: int, name: str = "waveform"):
        self.wave, self.sample_rate, self.frames, self.name = wave, int(sample_rate), len(wave), name

    def read(self, start: int, length: int) -> np.ndarray:
        seg = self.wave[start:start + length]
        return np.pad(seg, (0, length - len(seg))) if len(seg) < length else seg


class AudioReader:
    """A sound file read forward in blocks, channels averaged to mono (the documented downmix).

    Reads only move forward (chunks overlap, so the overlap is kept in a buffer), which keeps
    compressed formats (MP3, OGG) from seeking and memory bounded by one chunk.
    """

    def __init__(self, path: str | Path):
        import soundfile as sf

        self.path = Path(path)
        self.name = self.path.name
        try:
            self._file = sf.SoundFile(str(self.path))
        except (RuntimeError, OSError, ValueError, TypeError) as e:  # LibsndfileError is a RuntimeError
            raise ValueError(f"{self.path}: unreadable audio ({e})") from None
        self.sample_rate, self.frames = int(self._file.samplerate), int(self._file.frames)
        self._buf = np.zeros(0, dtype=np.float32)
        self._buf_start = 0

    def read(self, start: int, length: int) -> np.ndarray:
        if start < self._buf_start:
            raise ValueError(f"{self.path}: reads must move forward ({start} < {self._buf_start})")
        drop = min(start - self._buf_start, len(self._buf))
        self._buf, self._buf_start = self._buf[drop:], self._buf_start + drop
        if self._buf_start < start:  # a jump past the buffer
            self._file.seek(start)
            self._buf, self._buf_start = np.zeros(0, dtype=np.float32), start
        need = start + length - (self._buf_start + len(self._buf))
        if need > 0:
            try:
                block = self._file.read(need, dtype="float32", always_2d=True)
            except (RuntimeError, OSError, ValueError) as e:
                raise ValueError(f"{self.path}: unreadable audio at sample {start} ({e})") from None
            self._buf = np.concatenate([self._buf, block.mean(axis=1)])
        seg = self._buf[start - self._buf_start:start - self._buf_start + length]
        return np.pad(seg, (0, length - len(seg))) if len(seg) < length else seg

    def close(self) -> None:
        self._file.close()


def open_audio(path: str | Path):
    """A reader for any common format: WAV, FLAC, OGG (Vorbis, Opus) stream from disk; MP3
    (libsndfile >= 1.1) and anything soundfile cannot open (then torchaudio) are decoded whole."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    try:
        reader = AudioReader(path)
    except ValueError as sf_error:
        try:
            import torchaudio

            wave, sr = torchaudio.load(str(path))
        except (RuntimeError, OSError, ValueError, ImportError):
            raise sf_error from None
        return ArrayReader(wave.mean(0).numpy(), int(sr), path.name)
    if reader.frames == 0:
        reader.close()
        raise ValueError(f"{path}: the file holds no audio")
    if reader._file.format == "MP3":
        # libsndfile's MP3 decoder (1.2.2) returns time-shifted samples on every read after the
        # first, block size or seek notwithstanding, and its frame count is an estimate
        # (libsndfile issue #1001); one whole-file read is correct, so MP3 is decoded in memory.
        try:
            data = reader._file.read(dtype="float32", always_2d=True)
        except (RuntimeError, OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable audio ({e})") from None
        finally:
            reader.close()
        return ArrayReader(data.mean(axis=1), reader.sample_rate, path.name)
    return reader


def read_any_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Any common format -> mono float32 (channels averaged) and its rate, in memory."""
    reader = open_audio(path)
    wave = reader.read(0, reader.frames)
    if isinstance(reader, AudioReader):
        reader.close()
    return np.ascontiguousarray(wave, dtype=np.float32), reader.sample_rate


def overlap_add_stream(fn: Callable[[np.ndarray, int], torch.Tensor], read: Callable[[int, int], np.ndarray],
                       n: int, chunk: int, progress=None) -> Iterator[tuple[int, torch.Tensor]]:
    """Apply fn(x (chunk,), start) -> (K, chunk) over a signal of n samples with 50%-overlap
    sin² cross-fades, yielding finished blocks (start, (K, length)) in order.

    sin²(π(t+½)/C) + cos²(...) = 1, so two overlapping windows sum to exactly one and no
    normalisation (and no whole-signal weight buffer) is needed; the first half of the first
    chunk and the last half of the last are taken whole.
    """
    chunk = max(2, chunk - chunk % 2)
    if n <= chunk:
        yield 0, fn(read(0, chunk), 0)[:, :n]
        if progress:
            progress(1, 1)
        return
    hop = chunk // 2
    n_chunks = math.ceil((n - chunk) / hop) + 1
    window = torch.sin(torch.pi * (torch.arange(chunk) + 0.5) / chunk) ** 2
    tail = None
    for i in range(n_chunks):
        s = i * hop
        w = window.clone()
        if i == 0:
            w[:hop] = 1.0
        if i == n_chunks - 1:
            w[hop:] = 1.0
        y = fn(read(s, chunk), s) * w
        yield s, (y[:, :hop] if tail is None else tail + y[:, :hop])
        tail = y[:, hop:]
        if progress:
            progress(i + 1, n_chunks)
    s = (n_chunks - 1) * hop + hop
    yield s, tail[:, :n - s]


def overlap_add(fn, x: torch.Tensor, chunk: int, k: int, progress=None) -> torch.Tensor:
    """In-memory form of :func:`overlap_add_stream`: fn (B, chunk) -> (B, k, chunk) over x (L,)."""
    blocks = overlap_add_stream(lambda seg, _s: fn(torch.as_tensor(seg)[None])[0].cpu(),
                                lambda s, length: _fit(x[s:s + length], length), len(x), chunk, progress)
    out = torch.cat([b for _, b in blocks], dim=1)
    assert out.shape == (k, len(x))
    return out


def roll_to_notes(roll: np.ndarray, fps: float, pitch_min: int, threshold: float = 0.5,
                  min_seconds: float = 0.05) -> list[tuple[float, float, int]]:
    """(P, N) probabilities -> notes (start s, end s, pitch): runs at or above threshold lasting
    at least min_seconds (shorter blips are mostly onsets of a neighbour or a harmonic).

    0.05 s (4 frames at 62.5 fps) was chosen on held-out synthetic stems with the demo model:
    note-onset F1 rose by 0.03-0.05 per instrument over a 2-frame minimum.
    """
    min_frames = max(1, math.ceil(min_seconds * fps - 1e-9))
    notes = []
    on = roll >= threshold
    for p in range(on.shape[0]):
        row = np.concatenate([[False], on[p], [False]]).astype(np.int8)
        d = np.diff(row)
        for a, b in zip(np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]):
            if b - a >= min_frames:
                notes.append((a / fps, b / fps, pitch_min + p))
    return notes


class ProgressBar:
    """A one-line bar on a terminal; on a log (not a tty) a line every tenth of the work."""

    def __init__(self, label: str, seconds: float, stream=None):
        self.label, self.seconds, self.stream = label, seconds, stream or sys.stderr
        self.t0, self.last_tenth = time.perf_counter(), -1
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, i: int, n: int) -> None:
        elapsed = time.perf_counter() - self.t0
        speed = self.seconds * i / n / max(elapsed, 1e-9)
        text = f"[separate] {self.label} {i}/{n} chunks, {speed:.1f}x realtime"
        if self.tty:
            bar = "#" * (20 * i // n)
            self.stream.write(f"\r[{bar:<20}] {text}" + ("\n" if i == n else ""))
            self.stream.flush()
        elif 10 * i // n > self.last_tenth:
            self.last_tenth = 10 * i // n
            print(text, file=self.stream, flush=True)


class RollCollector:
    """The boolean instrument-pitch roll (K, P, frames) of a whole input, assembled from
    overlapping chunks: each frame is taken from the chunk whose middle it lies in, so the
    transcriptor's BLSTM sees context on both sides of it."""

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold
        self.roll: np.ndarray | None = None

    def place(self, probs: np.ndarray, start: int, chunk: int, n: int, sr: int, fps: float) -> None:
        """``probs`` (K, P, N): the chunk starting at sample ``start`` (of ``n``), hop chunk // 2."""
        hop = chunk // 2
        if self.roll is None:
            self.roll = np.zeros(probs.shape[:2] + (math.ceil(n / sr * fps) + 1,), dtype=bool)
        first, last = start == 0, start + chunk >= n
        lo = 0 if first else start + hop // 2                      # the part of the signal this chunk owns
        hi = n if (last or n <= chunk) else start + hop // 2 + hop
        f0 = round(start / sr * fps)
        a, b = round(lo / sr * fps), min(round(hi / sr * fps), self.roll.shape[-1])
        ja, jb = a - f0, min(b - f0, probs.shape[-1])
        if jb > ja:
            self.roll[:, :, a:a + jb - ja] = probs[:, :, ja:jb] >= self.threshold


class Separator:
    """A trained separator (and its transcriptor, when the checkpoint holds one)."""

    def __init__(self, separator, meta: dict, transcriptor=None, device: str = "cpu"):
        self.meta = meta
        # the signal settings the model was trained with: the data manifest's, recorded in the
        # checkpoint (older checkpoints: the config's data section, which matched it)
        data = meta.get("signal") or (meta.get("config") or {}).get("data")
        try:
            self.sample_rate, self.n_fft, self.hop = int(data["sample_rate"]), int(data["n_fft"]), int(data["hop"])
            self.pitch_min = int(data["pitch_min"])
            self.instruments = list(meta["instruments"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{meta.get('_path', 'checkpoint')}: meta.json lacks the signal settings "
                                  "(signal or config.data: sample_rate, n_fft, hop, pitch_min) or instruments") from None
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda: no CUDA GPU is visible to torch")
        self.separator = separator.to(self.device).eval()
        self.transcriptor = transcriptor.to(self.device).eval() if transcriptor is not None else None
        self.stft = STFT(self.n_fft, self.hop)

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
    def separate_batch(self, mix: torch.Tensor) -> torch.Tensor:
        """(B, L) at the model's rate -> (B, K, L): masks applied to the mixture STFT (its phase)."""
        spec = self.stft(mix.to(self.device))
        masks = self.separator(spec.abs())
        return self.stft.inverse(masks.float() * spec[:, None], mix.shape[-1])

    @torch.no_grad()
    def transcribe_batch(self, mix: torch.Tensor) -> torch.Tensor:
        """(B, L) -> roll probabilities (B, K, P, N)."""
        self._need_transcriptor()
        return torch.sigmoid(self.transcriptor(self.stft(mix.to(self.device)).abs())["roll"].float())

    def _need_transcriptor(self) -> None:
        if self.transcriptor is None:
            raise CheckpointError(f"{self.system}: the checkpoint holds no transcriptor (train a separator "
                                  "or finetune stage to separate and transcribe)")

    @torch.no_grad()
    def stream(self, reader, chunk_seconds: float = 10.0, roll: RollCollector | None = None,
               progress=None) -> Iterator[tuple[int, torch.Tensor, np.ndarray]]:
        """Separate a reader (``.read(start, n)``, ``.frames``, ``.sample_rate``) chunk by chunk.

        Yields (start, estimates (K, n) at the reader's rate, mixture (n,)) in order. Given a
        ``roll``, the transcriptor's roll of the whole input is assembled in it as well.
        """
        if roll is not None:
            self._need_transcriptor()
        sr, n = reader.sample_rate, reader.frames
        if chunk_seconds <= 0:
            raise ValueError(f"chunk_seconds must be positive, got {chunk_seconds}")
        chunk = max(int(chunk_seconds * sr), 2 * self.hop)
        # a clip shorter than a chunk is processed at its own length, not padded to a chunk
        chunk = min(chunk, max(n + n % 2, 2 * self.hop))
        chunk -= chunk % 2
        fps = self.fps
        where = getattr(reader, "path", reader.name)

        def read(start: int, length: int) -> np.ndarray:
            # one NaN or Inf would turn a whole chunk of every output into NaN: refuse it
            seg = reader.read(start, length)
            bad = np.flatnonzero(~np.isfinite(seg))
            if len(bad):
                raise ValueError(f"{where}: non-finite sample (NaN or Inf) at {(start + bad[0]) / sr:.3f} s; "
                                 "separation needs finite audio")
            return seg

        def fn(x_in: np.ndarray, start: int) -> torch.Tensor:
            x = resample(torch.as_tensor(np.ascontiguousarray(x_in, dtype=np.float32))[None], sr,
                          self.sample_rate)
            est = self.separate_batch(x)[0].float().cpu()
            if roll is not None:
                roll.place(self.transcribe_batch(x)[0].cpu().numpy(), start, chunk, n, sr, fps)
            return _fit(resample(est, self.sample_rate, sr), len(x_in))

        for start, est in overlap_add_stream(fn, read, n, chunk, progress):
            if est.shape[1]:
                yield start, est, read(start, est.shape[1])

    def separate(self, waveform: torch.Tensor | np.ndarray, sample_rate: int, chunk_seconds: float = 10.0,
                 progress=None) -> dict[str, torch.Tensor]:
        """Mono waveform (L,) at any rate -> {instrument: (L,)} at the same rate, plus "residual"
        (mixture minus the estimates, so everything sums back to the input)."""
        wave = np.asarray(waveform, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"expected a mono waveform (L,), got shape {tuple(wave.shape)}")
        blocks = list(self.stream(ArrayReader(wave, sample_rate), chunk_seconds, progress=progress))
        est = torch.cat([b for _, b, _ in blocks], dim=1) if blocks else torch.zeros(len(self.instruments), 0)
        out = {name: est[i] for i, name in enumerate(self.instruments)}
        out["residual"] = torch.as_tensor(wave) - est.sum(0)
        return out

    def transcribe(self, waveform: torch.Tensor | np.ndarray, sample_rate: int, chunk_seconds: float = 10.0,
                   threshold: float = 0.5, min_seconds: float = 0.05):
        """Mono waveform -> pretty_midi.PrettyMIDI with one instrument track per separated instrument."""
        wave = np.asarray(waveform, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"expected a mono waveform (L,), got shape {tuple(wave.shape)}")
        roll = RollCollector(threshold)
        for _ in self.stream(ArrayReader(wave, sample_rate), chunk_seconds, roll=roll):
            pass
        return self.roll_to_midi(roll.roll, min_seconds)

    def roll_to_midi(self, roll: np.ndarray, min_seconds: float = 0.05):
        import pretty_midi

        midi = pretty_midi.PrettyMIDI()
        for k, name in enumerate(self.instruments):
            inst = pretty_midi.Instrument(program=GM_PROGRAMS.get(name, 0), name=name)
            for a, b, p in roll_to_notes(roll[k], self.fps, self.pitch_min, 0.5, min_seconds):
                inst.notes.append(pretty_midi.Note(velocity=90, pitch=int(p), start=a, end=b))
            midi.instruments.append(inst)
        return midi


def separate_files(paths: list[str], checkpoint: str | None, out: str, midi: bool = False, device: str = "cpu",
                   chunk_seconds: float = 10.0, log=print, progress_stream=None) -> list[Path]:
    """Separate each file into <out>/<file stem>/{instrument}.wav + residual.wav (+ transcription.mid),
    at the input's sample rate and length. Files appear only when complete (temp name, then rename)."""
    import soundfile as sf

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
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
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
        folder = Path(out) / Path(path).stem
        made = [d for d in (folder, *folder.parents) if not d.exists()]   # removed again on failure
        folder.mkdir(parents=True, exist_ok=True)
        names = sep.instruments + ["residual"]
        tmps = {name: folder / f".{name}.wav.tmp" for name in names}
        midi_tmp = folder / ".transcription.mid.tmp"
        sinks = {}
        seconds = reader.frames / sr
        bar = ProgressBar(Path(path).name, seconds, progress_stream) if seconds > chunk_seconds else None
        t0 = time.perf_counter()
        roll = RollCollector() if midi else None
        try:
            for name in names:
                sinks[name] = sf.SoundFile(str(tmps[name]), "w", samplerate=sr, channels=1, format="WAV",
                                           subtype="FLOAT")
            for _, est, mix in sep.stream(reader, chunk_seconds, roll=roll, progress=bar):
                est_np = est.numpy()
                for k, name in enumerate(sep.instruments):
                    sinks[name].write(est_np[k])
                sinks["residual"].write(mix - est_np.sum(0))
            for sink in sinks.values():
                sink.close()
            if midi:
                sep.roll_to_midi(roll.roll).write(str(midi_tmp))
        except BaseException:
            for name in names:
                if name in sinks:
                    sinks[name].close()
                tmps[name].unlink(missing_ok=True)
            midi_tmp.unlink(missing_ok=True)
            for d in made:  # innermost first: only the folders this call created, and only if empty
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
            raise
        finally:
            if isinstance(reader, AudioReader):
                reader.close()
        for name in names:
            target = folder / f"{name}.wav"
            tmps[name].replace(target)
            written.append(target)
        if midi:
            target = folder / "transcription.mid"
            midi_tmp.replace(target)
            written.append(target)
        took = time.perf_counter() - t0
        log(f"[separate] {path} -> {folder} ({', '.join(names)}{', transcription.mid' if midi else ''}; "
            f"{seconds:.1f} s of audio in {took:.1f} s, {seconds / max(took, 1e-9):.3g}x realtime)")
    return written
