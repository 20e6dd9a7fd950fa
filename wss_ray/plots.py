"""Pictures of what a model did: the mixture spectrogram with each instrument's mask, the score
drawn over the spectrogram, and the results table as a bar chart. PNG files via matplotlib's
Agg backend (no display needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from wss_ray.atomic import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
    finally:
        _pyplot().close(fig)
    return path


def _db(mag: np.ndarray) -> np.ndarray:
    return 20 * np.log10(np.maximum(mag, 1e-5))


def plot_masks(mag: np.ndarray, masks: np.ndarray, instruments: list[str], sample_rate: int, hop: int,
               path: str | Path, title: str = "") -> Path:
    """mag (F, N) mixture magnitude; masks (K, F, N) in [0, 1]: one panel each, mixture on top."""
    plt = _pyplot()
    k = len(instruments)
    fig, axes = plt.subplots(k + 1, 1, figsize=(9, 2.2 * (k + 1)), sharex=True)
    extent = [0, mag.shape[1] * hop / sample_rate, 0, sample_rate / 2000]
    im = axes[0].imshow(_db(mag), origin="lower", aspect="auto", extent=extent, cmap="magma")
    axes[0].set_title(f"mixture (dB){' - ' + title if title else ''}")
    fig.colorbar(im, ax=axes[0])
    for i, inst in enumerate(instruments):
        im = axes[i + 1].imshow(masks[i], origin="lower", aspect="auto", extent=extent, vmin=0, vmax=1,
                                cmap="viridis")
        axes[i + 1].set_title(f"mask: {inst}")
        fig.colorbar(im, ax=axes[i + 1])
    for ax in axes:
        ax.set_ylabel("kHz")
    axes[-1].set_xlabel("time (s)")
    return _save(fig, path)


def plot_score_overlay(mag: np.ndarray, roll: np.ndarray, instruments: list[str], sample_rate: int, n_fft: int,
                       hop: int, pitch_min: int, path: str | Path, title: str = "") -> Path:
    """The score (roll (K, P, N)) drawn at each note's fundamental over the mixture spectrogram."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    t_end = mag.shape[1] * hop / sample_rate
    ax.imshow(_db(mag), origin="lower", aspect="auto", extent=[0, t_end, 0, sample_rate / 2], cmap="gray_r")
    colors = ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple"]
    for k, inst in enumerate(instruments):
        p_idx, n_idx = np.nonzero(roll[k])
        hz = 440.0 * 2 ** ((pitch_min + p_idx - 69) / 12)
        ax.scatter(n_idx * hop / sample_rate, hz, s=2, c=colors[k % len(colors)], label=inst)
    ax.set_ylim(0, min(sample_rate / 2, 4000))
    ax.set_xlabel("time (s)")
    ax.set_ylabel("Hz")
    ax.set_title(f"score over the mixture{' - ' + title if title else ''}")
    ax.legend(loc="upper right", markerscale=4)
    return _save(fig, path)


def plot_results(rows: list[dict], path: str | Path, title: str = "SI-SDR (dB), mean over audible chunks") -> Path:
    """Grouped bars: one group per instrument, one bar per system (rows of results.json)."""
    plt = _pyplot()
    systems = list(dict.fromkeys(r["system"] for r in rows))
    insts = list(dict.fromkeys(r["instrument"] for r in rows))
    by = {(r["system"], r["instrument"]): r["si_sdr_mean"] for r in rows}
    width = 0.8 / max(len(systems), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(insts) * max(1, len(systems) / 3)), 4))
    x = np.arange(len(insts))
    for i, s in enumerate(systems):
        ax.bar(x + i * width - 0.4 + width / 2, [by.get((s, inst), np.nan) for inst in insts], width, label=s)
    ax.set_xticks(x, insts)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_ylabel("dB")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_distributions(per_chunk: dict[str, dict[str, list[float]]], path: str | Path,
                       title: str = "SI-SDR (dB) per chunk") -> Path:
    """Box plots of per-chunk SI-SDR: one panel per instrument, one box per system."""
    plt = _pyplot()
    systems = list(per_chunk)
    insts = list(next(iter(per_chunk.values()), {}))
    fig, axes = plt.subplots(1, max(len(insts), 1), figsize=(4 + 1.6 * len(insts) * max(1, len(systems) / 4), 4.5),
                             sharey=True, squeeze=False)
    for ax, inst in zip(axes[0], insts):
        data = [per_chunk[s][inst] or [np.nan] for s in systems]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(np.arange(1, len(systems) + 1), systems, rotation=60, ha="right", fontsize=7)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"{inst} ({len(per_chunk[systems[0]][inst])} chunks)")
    axes[0][0].set_ylabel("dB")
    fig.suptitle(title)
    return _save(fig, path)


def plot_examples(checkpoint: str, data: str | Path, out: str | Path, split: str = "test", n: int = 2,
                  log=print) -> list[Path]:
    """Mask and score-overlay PNGs for the first ``n`` chunks of a split that hold notes."""
    from wss_ray.data.dataset import iter_local, load_manifest
    from wss_ray.separate import Separator

    sep = Separator.from_checkpoint(checkpoint)
    m = load_manifest(data)
    written: list[Path] = []
    out = Path(out)
    i = 0
    for batch in iter_local(data, split, 8, with_stems=False):
        for mix, roll in zip(batch["mix"], batch["roll"]):
            if i >= n:
                break
            if not roll.any():
                continue
            i += 1
            est = sep.estimates(mix[None])
            # a waveform backbone has no masks: its effective mask |STFT(ŝ_k)| / |X|, clipped
            masks = est.masks if est.masks is not None else (est.mag / est.mix_mag[:, None].clamp_min(1e-8)).clamp(0, 1)
            masks = masks[0].float().cpu().numpy()
            mag = est.mix_mag[0].cpu().numpy()
            written.append(plot_masks(mag, masks, m["instruments"], m["sample_rate"], m["hop"],
                                      out / f"example{i:02d}_masks.png", sep.system))
            written.append(plot_score_overlay(mag, roll.numpy(), m["instruments"], m["sample_rate"], m["n_fft"],
                                              m["hop"], m["pitch_min"], out / f"example{i:02d}_score.png"))
        if i >= n:
            break
    log(f"[plot] {len(written)} PNG(s) in {out}")
    return written
