"""Inference: the one routine that turns any-length audio into per-instrument estimates
(chunked, overlap-add), used by ``wss-ray separate``, evaluation and the benchmarks."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from wss_ray.checkpoint import CheckpointError, build_model, load_checkpoint
from wss_ray.dsp import STFT, resample

SEPARATOR_STAGES = ("separator", "finetune", "baseline", "supervised")


class Separator:
    """A trained separator (and its transcriptor, when the checkpoint holds one)."""

    def __init__(self, separator, meta: dict, transcriptor=None, device: str = "cpu"):
        self.meta = meta
        data = meta["config"]["data"]
        self.sample_rate, self.n_fft, self.hop = data["sample_rate"], data["n_fft"], data["hop"]
        self.instruments = list(meta["instruments"])
        self.pitch_min = data["pitch_min"]
        self.device = torch.device(device)
        self.separator = separator.to(self.device).eval()
        self.transcriptor = transcriptor.to(self.device).eval() if transcriptor is not None else None
        self.stft = STFT(self.n_fft, self.hop)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> "Separator":
        payload, meta = load_checkpoint(path, stages=SEPARATOR_STAGES, purpose="separation")
        t = build_model(payload, "transcriptor") if "transcriptor" in payload["models"] else None
        return cls(build_model(payload, "separator"), meta, t, device)

    @property
    def system(self) -> str:
        v = self.meta.get("variant")
        name = f"{self.meta['stage']}[{v}]" if v else self.meta["stage"]
        trial = (self.meta.get("tune") or {}).get("trial")
        return f"{name}@{trial}" if trial else name

    @torch.no_grad()
    def separate_batch(self, mix: torch.Tensor) -> torch.Tensor:
        """(B, L) at the model's rate -> (B, K, L): masks applied to the mixture STFT (its phase)."""
        spec = self.stft(mix.to(self.device))
        masks = self.separator(spec.abs())
        return self.stft.inverse(masks.float() * spec[:, None], mix.shape[-1])

    @torch.no_grad()
    def transcribe_batch(self, mix: torch.Tensor) -> torch.Tensor:
        """(B, L) -> roll probabilities (B, K, P, N)."""
        if self.transcriptor is None:
            raise CheckpointError(f"{self.system}: the checkpoint holds no transcriptor")
        return torch.sigmoid(self.transcriptor(self.stft(mix.to(self.device)).abs())["roll"].float())

    @torch.no_grad()
    def separate(self, waveform: torch.Tensor | np.ndarray, sample_rate: int, chunk_seconds: float = 10.0,
                 progress=None) -> dict[str, torch.Tensor]:
        """Mono waveform (L,) at any rate -> {instrument: (L,)} at the same rate, plus "residual".

        Chunks of ``chunk_seconds`` overlap by a quarter and are cross-faded with a Hann-squared
        window that sums to one, so memory stays flat for long files and seams vanish.
        """
        wave = torch.as_tensor(np.asarray(waveform, dtype=np.float32))
        if wave.ndim != 1:
            raise ValueError(f"expected a mono waveform (L,), got shape {tuple(wave.shape)}")
        x = resample(wave[None], sample_rate, self.sample_rate)[0]
        est = overlap_add(self.separate_batch, x, int(chunk_seconds * self.sample_rate), len(self.instruments),
                          progress=progress)
        est = resample(est, self.sample_rate, sample_rate)[:, :len(wave)]
        if est.shape[1] < len(wave):
            est = torch.nn.functional.pad(est, (0, len(wave) - est.shape[1]))
        out = {name: est[i] for i, name in enumerate(self.instruments)}
        out["residual"] = wave - est.sum(0)
        return out


def overlap_add(fn, x: torch.Tensor, chunk: int, k: int, progress=None) -> torch.Tensor:
    """Apply fn: (B, chunk) -> (B, k, chunk) over x (L,) with 50%-overlap sin² cross-fades."""
    n = len(x)
    if n <= chunk:
        return fn(torch.nn.functional.pad(x, (0, chunk - n))[None])[0, :, :n].cpu()
    hop = chunk // 2
    n_chunks = math.ceil(max(n - chunk, 0) / hop) + 1
    total = (n_chunks - 1) * hop + chunk
    padded = torch.nn.functional.pad(x, (0, total - n))
    window = torch.sin(torch.pi * (torch.arange(chunk) + 0.5) / chunk) ** 2  # sums to 1 at 50% overlap
    out = torch.zeros(k, total)
    weight = torch.zeros(total)
    for i in range(n_chunks):
        s = i * hop
        w = window.clone()
        if i == 0:
            w[:hop] = 1.0
        if i == n_chunks - 1:
            w[hop:] = 1.0
        out[:, s:s + chunk] += fn(padded[s:s + chunk][None])[0].cpu() * w
        weight[s:s + chunk] += w
        if progress:
            progress(i + 1, n_chunks)
    return out[:, :n] / weight[:n].clamp(min=1e-8)


def roll_to_notes(roll: np.ndarray, fps: float, pitch_min: int, threshold: float = 0.5,
                  min_frames: int = 2) -> list[tuple[float, float, int]]:
    """(P, N) probabilities -> notes (start s, end s, pitch): runs above threshold, at least min_frames."""
    notes = []
    on = roll >= threshold
    for p in range(on.shape[0]):
        row = np.concatenate([[False], on[p], [False]]).astype(np.int8)
        d = np.diff(row)
        for a, b in zip(np.nonzero(d == 1)[0], np.nonzero(d == -1)[0]):
            if b - a >= min_frames:
                notes.append((a / fps, b / fps, pitch_min + p))
    return notes


def read_any_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Any common format -> mono float32 (channels averaged) and its rate."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return data.mean(axis=1), int(sr)
    except Exception as sf_error:  # soundfile lacks some codecs (older libsndfile: no mp3)
        try:
            import torchaudio

            wave, sr = torchaudio.load(str(path))
            return wave.mean(0).numpy(), int(sr)
        except Exception:
            raise ValueError(f"{path}: unreadable audio ({sf_error})") from None


def separate_files(paths: list[str], checkpoint: str, out: str, midi: bool = False, device: str = "cpu",
                   chunk_seconds: float = 10.0, log=print) -> list[Path]:
    import soundfile as sf

    sep = Separator.from_checkpoint(checkpoint, device)
    if midi and sep.transcriptor is None:
        raise CheckpointError(f"{checkpoint}: --midi needs a checkpoint holding a transcriptor "
                              "(separator or finetune stage)")
    written = []
    for path in paths:
        wave, sr = read_any_audio(path)
        folder = Path(out) / Path(path).stem
        folder.mkdir(parents=True, exist_ok=True)

        def progress(i, n, name=Path(path).name):
            log(f"[separate] {name}: chunk {i}/{n}")

        est = sep.separate(wave, sr, chunk_seconds, progress=progress if len(wave) > chunk_seconds * sr else None)
        for name, x in est.items():
            target = folder / f"{name}.wav"
            tmp = folder / f".{name}.wav.tmp"
            sf.write(str(tmp), x.numpy(), sr, format="WAV", subtype="FLOAT")
            tmp.replace(target)
            written.append(target)
        if midi:
            written.append(write_midi(sep, wave, sr, folder / "transcription.mid", chunk_seconds))
        log(f"[separate] {path} -> {folder} ({', '.join(est)})")
    return written


def write_midi(sep: Separator, wave: np.ndarray, sr: int, target: Path, chunk_seconds: float) -> Path:
    import pretty_midi

    x = resample(torch.as_tensor(wave)[None], sr, sep.sample_rate)[0]
    chunk = int(chunk_seconds * sep.sample_rate) // sep.hop * sep.hop
    fps = sep.sample_rate / sep.hop
    rolls = []
    for s in range(0, len(x), chunk):
        seg = x[s:s + chunk]
        seg = torch.nn.functional.pad(seg, (0, chunk - len(seg)))
        rolls.append(sep.transcribe_batch(seg[None])[0, :, :, :chunk // sep.hop].cpu().numpy())
    roll = np.concatenate(rolls, axis=-1)
    programs = {"piano": 0, "guitar": 30, "bass": 33}
    midi = pretty_midi.PrettyMIDI()
    for k, name in enumerate(sep.instruments):
        inst = pretty_midi.Instrument(program=programs.get(name, 0), name=name)
        for a, b, p in roll_to_notes(roll[k], fps, sep.pitch_min):
            inst.notes.append(pretty_midi.Note(velocity=90, pitch=int(p), start=a, end=b))
        midi.instruments.append(inst)
    tmp = target.with_name(f".{target.name}.tmp")
    midi.write(str(tmp))
    tmp.replace(target)
    return target

