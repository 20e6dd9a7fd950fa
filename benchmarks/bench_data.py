"""Data benchmarks, measured side by side in one run:
- synthetic corpus rendering rate (audio seconds per wall second), 1 vs 2 processes;
- featurization rate on Ray Data, 1 vs 2 parallel tasks;
- ingest: batches/s of the Ray Data reader into a consumer doing a fixed amount of torch
  work per batch, divided by the same loop over in-memory tensors.

    python benchmarks/bench_data.py [--tracks 12] [--seconds 16] [--work-ms 0]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from wss_ray.config import DataConfig, RayConfig
from wss_ray.data.contract import to_tensors
from wss_ray.data.dataset import iter_local, load_manifest, weak_dataset
from wss_ray.data.featurize import featurize
from wss_ray.data.synth import synthesize_corpus
from wss_ray.ray_session import ensure_ray


def consumer(m: dict):
    """Realistic per-batch compute: one forward+backward of the demo transcriptor."""
    from wss_ray.dsp import STFT
    from wss_ray.losses import transcription_loss
    from wss_ray.models import Transcriptor

    model = Transcriptor(m["sample_rate"], m["n_fft"], len(m["instruments"]), m["pitch_min"], m["pitch_max"],
                         channels=8, hidden=64, bins_per_semitone=1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    stft = STFT(m["n_fft"], m["hop"])

    def work(batch):
        loss = transcription_loss(model(stft(batch["mix"]).abs()), batch["roll"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return work


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tracks", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=16)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="wss-bench-"))
    results = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                          f"{__import__('os').cpu_count()} CPUs"}
    try:
        for workers in (1, 2):
            out = tmp / f"corpus{workers}"
            r = synthesize_corpus(out, args.tracks, args.seconds, seed=1, sample_rate=44100, workers=workers,
                                  log=lambda s: None)
            results[f"synth_audio_s_per_s_{workers}w"] = r["audio_s"] / r["wall_s"]
        ensure_ray(RayConfig())
        cfg = DataConfig()
        for workers in (1, 2):
            cfg.workers = workers
            out = tmp / f"features{workers}"
            m = featurize(tmp / "corpus1", out, cfg, log=lambda s: None)
            results[f"featurize_audio_s_per_s_{workers}w"] = m["_run"]["audio_s"] / m["_run"]["wall_s"]
        data = tmp / "features2"
        m = load_manifest(data)
        work = consumer(m)
        # in-memory reference: the same batches, already tensors
        mem = [b for b in iter_local(data, "train", args.batch_size, drop_last=True)]
        reps = -(-args.batches // len(mem))
        mem = (mem * reps)[:args.batches]
        for b in mem[:3]:
            work(b)
        t = time.time()
        for b in mem:
            work(b)
        mem_rate = len(mem) / (time.time() - t)
        rows = m["splits"]["train"]["chunks"]
        ds = weak_dataset(data, "train", repeat=-(-args.batches * args.batch_size // rows) + 1, seed=0)
        n = 0
        t = None
        for arrow in ds.iter_batches(batch_size=args.batch_size, batch_format="pyarrow", drop_last=True,
                                     local_shuffle_buffer_size=4 * args.batch_size):
            work(to_tensors(arrow, m))
            n += 1
            if n == 3:  # exclude pipeline start-up, as for the in-memory warm-up
                t = time.time()
            if n == args.batches + 3:
                break
        ray_rate = (n - 3) / (time.time() - t)
        results.update({"ingest_in_memory_batches_per_s": mem_rate, "ingest_ray_data_batches_per_s": ray_rate,
                        "ingest_ratio": ray_rate / mem_rate})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=2))
    print(f"synth: {results['synth_audio_s_per_s_1w']:.0f} vs {results['synth_audio_s_per_s_2w']:.0f} audio s/s "
          f"(1 vs 2 processes, x{results['synth_audio_s_per_s_2w'] / results['synth_audio_s_per_s_1w']:.2f})")
    print(f"featurize: {results['featurize_audio_s_per_s_1w']:.1f} vs {results['featurize_audio_s_per_s_2w']:.1f} "
          f"audio s/s (1 vs 2 Ray tasks, x{results['featurize_audio_s_per_s_2w'] / results['featurize_audio_s_per_s_1w']:.2f})")
    print(f"ingest: Ray Data {results['ingest_ray_data_batches_per_s']:.2f} batches/s vs in-memory "
          f"{results['ingest_in_memory_batches_per_s']:.2f} batches/s -> ratio {results['ingest_ratio']:.3f}")


if __name__ == "__main__":
    main()
