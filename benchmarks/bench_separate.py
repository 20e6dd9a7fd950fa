"""Separation speed and memory of `wss-ray separate` (the streaming file path), side by side.

    python benchmarks/bench_separate.py [--checkpoint CKPT] [--seconds 60] [--long-minutes 10] [--midi]

Without --checkpoint, an untrained model of the demo size (configs/demo.yaml) is used: speed
does not depend on the weights. Every measurement runs in a fresh process (clean thread
setting, clean peak-RSS counter) on 44.1 kHz stereo 16-bit WAV files written here, so it
includes decoding, resampling to the model rate and back, and writing every output WAV.

Prints: x realtime on 1 CPU thread vs 2 (and on CUDA when torch sees a GPU); peak RSS of a
short file vs a long one (flat means the streaming works) vs the in-memory Python API on the
long one. Needs torch, torchaudio and soundfile only (no Ray), so it runs on a GPU box as is.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_untrained_checkpoint(path: Path, config: Path) -> Path:
    from wss_ray.checkpoint import make_model, save_checkpoint
    from wss_ray.config import load_config

    cfg = load_config(config)
    d = cfg.data
    k = len(d.instruments)
    sep = make_model("MaskSeparator", {"n_bins": d.n_fft // 2 + 1, "n_sources": k, "hidden": cfg.models.separator.hidden,
                                       "layers": cfg.models.separator.layers, "dropout": 0.0})
    t = cfg.models.transcriptor
    tr = make_model("Transcriptor", {"sample_rate": d.sample_rate, "n_fft": d.n_fft, "n_sources": k,
                                     "pitch_min": d.pitch_min, "pitch_max": d.pitch_max, "channels": t.channels,
                                     "hidden": t.hidden, "bins_per_semitone": t.bins_per_semitone, "dropout": 0.0})
    meta = {"stage": "separator", "instruments": list(d.instruments), "variant": "untrained",
            "config": {"data": {"sample_rate": d.sample_rate, "n_fft": d.n_fft, "hop": d.hop,
                                "pitch_min": d.pitch_min}}}
    return save_checkpoint(path, {"separator": sep, "transcriptor": tr}, meta)


def write_test_wav(path: Path, seconds: float, sr: int = 44100) -> None:
    """Stereo tones plus noise, written block by block so the parent stays small too."""
    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    with sf.SoundFile(str(path), "w", samplerate=sr, channels=2, subtype="PCM_16") as f:
        done, block = 0, sr * 10
        total = int(seconds * sr)
        while done < total:
            n = min(block, total - done)
            t = (done + np.arange(n)) / sr
            x = 0.2 * np.sin(2 * np.pi * 110 * t) + 0.1 * np.sin(2 * np.pi * 440 * t) + 0.02 * rng.standard_normal(n)
            f.write(np.stack([x, 0.8 * x], axis=1).astype("float32"))
            done += n


def child(args: dict) -> dict:
    """One measurement, in its own process."""
    import resource

    import torch

    torch.set_num_threads(args["threads"])
    from wss_ray.audio_io import read_any_audio
    from wss_ray.separate import Separator, separate_files

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        if args["mode"] == "api":  # the notebook path: whole waveform in memory
            wave, sr = read_any_audio(args["file"])
            Separator.from_checkpoint(args["checkpoint"], args["device"]).separate(wave, sr)
        else:
            separate_files([args["file"]], args["checkpoint"], out, midi=args["midi"], device=args["device"],
                           log=lambda *_: None, progress_stream=open(os.devnull, "w"))
        if args["device"] == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    import soundfile as sf

    seconds = sf.info(args["file"]).duration
    return {"wall_s": wall, "audio_s": seconds, "x_realtime": seconds / wall,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(**kw) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(kw)], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"measurement {kw} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="separator/finetune checkpoint (default: untrained demo-size model)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="model size when untrained")
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the speed-test file")
    ap.add_argument("--long-minutes", type=float, default=10.0, help="length of the memory-test file")
    ap.add_argument("--midi", action="store_true", help="also transcribe (--midi) in the speed runs")
    ap.add_argument("--repeats", type=int, default=2, help="speed runs per setting; the best is kept")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ck = a.checkpoint or str(make_untrained_checkpoint(tmp / "untrained", Path(a.config)))
        short, long = tmp / "short.wav", tmp / "long.wav"
        write_test_wav(short, a.seconds)
        write_test_wav(long, a.long_minutes * 60)
        print(f"model: {ck if a.checkpoint else 'untrained, sizes of ' + a.config}; "
              f"files: {a.seconds:.0f} s and {a.long_minutes:.0f} min, 44.1 kHz stereo; midi={a.midi}")
        base = {"checkpoint": ck, "midi": a.midi, "mode": "files", "device": "cpu"}
        speed = {}
        for threads in (1, 2):
            runs = [measure(**base, file=str(short), threads=threads) for _ in range(a.repeats)]
            speed[threads] = max(runs, key=lambda r: r["x_realtime"])
            print(f"cpu, {threads} thread(s): {speed[threads]['x_realtime']:.1f}x realtime "
                  f"({speed[threads]['audio_s']:.0f} s in {speed[threads]['wall_s']:.2f} s)")
        print(f"ratio 2 threads / 1 thread: {speed[2]['x_realtime'] / speed[1]['x_realtime']:.2f}")
        if torch.cuda.is_available():
            gpu = max((measure(**{**base, "device": "cuda"}, file=str(short), threads=2) for _ in range(a.repeats)),
                      key=lambda r: r["x_realtime"])
            print(f"cuda ({torch.cuda.get_device_name(0)}): {gpu['x_realtime']:.1f}x realtime, "
                  f"ratio to 1 CPU thread {gpu['x_realtime'] / speed[1]['x_realtime']:.1f}")
        mem_short = measure(**base, file=str(short), threads=2)
        mem_long = measure(**base, file=str(long), threads=2)
        mem_api = measure(**{**base, "mode": "api"}, file=str(long), threads=2)
        print(f"peak RSS, streaming: {mem_short['peak_rss_mb']:.0f} MB for {a.seconds:.0f} s, "
              f"{mem_long['peak_rss_mb']:.0f} MB for {a.long_minutes:.0f} min "
              f"(ratio {mem_long['peak_rss_mb'] / mem_short['peak_rss_mb']:.2f}; "
              f"{mem_long['x_realtime']:.1f}x realtime)")
        print(f"peak RSS, in-memory API on the {a.long_minutes:.0f} min file: {mem_api['peak_rss_mb']:.0f} MB "
              f"(ratio to streaming {mem_api['peak_rss_mb'] / mem_long['peak_rss_mb']:.2f})")


if __name__ == "__main__":
    main()
