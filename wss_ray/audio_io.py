"""Audio in and out for inference: sound files and in-memory waveforms read as mono in blocks,
refused with the file and time when they hold what would spoil a separation, and the WAV
files the estimates are written to.

soundfile (libsndfile) is the one reader: torchaudio 2.11's loader needs torchcodec, which is
not installed, so a format libsndfile cannot open is refused with its error, naming the file.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


# rates a recording can have; outside them a caller mixed up arguments (sr=1 would upsample
# 16000-fold and run for hours)
MIN_RATE, MAX_RATE = 1000, 768000


def check_sample_rate(sample_rate, name: str = "sample_rate") -> int:
    ok = isinstance(sample_rate, (int, float, np.integer, np.floating)) and not isinstance(sample_rate, bool)
    if not ok or not math.isfinite(sample_rate) or sample_rate != int(sample_rate) \
            or not MIN_RATE <= sample_rate <= MAX_RATE:
        raise ValueError(f"{name}: need a whole number of samples per second between {MIN_RATE} and {MAX_RATE}, "
                         f"got {sample_rate!r}")
    return int(sample_rate)


class ArrayReader:
    """A mono waveform held in memory, read like a file."""

    def __init__(self, wave: np.ndarray, sample_rate: int, name: str = "waveform"):
        self.wave, self.frames, self.name = wave, len(wave), name
        self.sample_rate = check_sample_rate(sample_rate)

    def read(self, start: int, length: int) -> np.ndarray:
        seg = self.wave[start:start + length]
        return np.pad(seg, (0, length - len(seg))) if len(seg) < length else seg

    def close(self) -> None:
        pass


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


def open_audio(path: str | Path) -> AudioReader | ArrayReader:
    """A reader for any format libsndfile reads: WAV, FLAC, OGG (Vorbis, Opus) stream from disk;
    MP3 (libsndfile >= 1.1) is decoded whole."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    reader = AudioReader(path)
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
    reader.close()
    return np.ascontiguousarray(wave, dtype=np.float32), reader.sample_rate


def mono_waveform(waveform) -> np.ndarray:
    """A caller's waveform as float32 (L,); one with channels is refused rather than downmixed
    here, since which downmix is right is the caller's to say."""
    wave = np.asarray(waveform, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"expected a mono waveform (L,), got shape {tuple(wave.shape)}")
    return wave


def read_finite(reader, start: int, length: int) -> np.ndarray:
    """``reader.read(start, length)``, refusing a NaN or Inf sample with where it lies: one
    would turn a whole chunk of every output into NaN."""
    seg = reader.read(start, length)
    bad = np.flatnonzero(~np.isfinite(seg))
    if len(bad):
        where = getattr(reader, "path", reader.name)
        raise ValueError(f"{where}: non-finite sample (NaN or Inf) at {(start + bad[0]) / reader.sample_rate:.3f} s; "
                         "separation needs finite audio")
    return seg


def wav_writer(path: str | Path, sample_rate: int):
    """An open mono 32-bit float WAV (float: an estimate may exceed full scale, and clipping or
    rounding it would break the sum back to the input); ``.write(block)`` appends."""
    import soundfile as sf

    return sf.SoundFile(str(path), "w", samplerate=sample_rate, channels=1, format="WAV", subtype="FLOAT")
