"""Streaming overlap-add: a chunk-wise model applied over a signal of any length with
cross-faded 50%-overlapping chunks, each finished stretch handed on as soon as it is final, so
memory stays flat whatever the length.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch


def fit_length(x: torch.Tensor, n: int) -> torch.Tensor:
    """Trim or zero-pad the last axis to n samples (resampling rounds lengths)."""
    if x.shape[-1] >= n:
        return x[..., :n]
    return torch.nn.functional.pad(x, (0, n - x.shape[-1]))


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
                                lambda s, length: fit_length(x[s:s + length], length), len(x), chunk, progress)
    out = torch.cat([b for _, b in blocks], dim=1)
    assert out.shape == (k, len(x))
    return out


class ProgressBar:
    """A ``progress`` for :func:`overlap_add_stream`: a one-line bar on a terminal; on a log (not
    a tty) a line every tenth of the work."""

    def __init__(self, label: str, seconds: float, stream=None):
        self.label, self.seconds, self.stream = label, seconds, stream or sys.stderr
        self.t0, self.last_tenth = time.perf_counter(), -1
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, i: int, n: int) -> None:
        elapsed = time.perf_counter() - self.t0
        speed = self.seconds * i / n / max(elapsed, 1e-9)
        text = f"{self.label} {i}/{n} chunks, {speed:.1f}x realtime"
        if self.tty:
            bar = "#" * (20 * i // n)
            self.stream.write(f"\r[{bar:<20}] {text}" + ("\n" if i == n else ""))
            self.stream.flush()
        elif 10 * i // n > self.last_tenth:
            self.last_tenth = 10 * i // n
            print(text, file=self.stream, flush=True)
