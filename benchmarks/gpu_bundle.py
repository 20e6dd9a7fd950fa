"""Pack what `benchmarks/gpu_check.py` needs on a bare GPU machine (no FluidSynth, no Ray, no
package index): a synthetic Slakh-format corpus rendered here, its stems re-encoded as Vorbis
(about an eighth of 16-bit PCM; fine for training data, the mixture is the sum of the decoded
stems), and the small pure-Python wheels the reader needs (soundfile with its libsndfile,
pretty_midi, mir_eval and their dependencies), for CPython 3.12 on manylinux x86_64.

    python benchmarks/gpu_bundle.py --out gpu_bundle [--tracks 48] [--seconds 16] [--seed 21] [--scores 16]

``--scores N`` also renders N excerpts of real compositions (music21's scores, as the pipeline's
``score_benchmark``) into ``<out>/scores``: the second test set of `benchmarks/gpu_pipeline.py`.
``--test-corpus`` also renders the test suite's small corpus into ``<out>/test_corpus`` (FLAC, as
the tests render it) so that `tests/test_gpu.py` runs there: ``WSS_TEST_CORPUS=<out>/test_corpus``.

On the GPU machine:

    pip install --no-index --no-deps gpu_bundle/wheels/*.whl
    python benchmarks/gpu_check.py --corpus gpu_bundle/corpus
"""
from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import soundfile as sf

from wss_ray.data.synth import synthesize_corpus

# what the reader, the MIDI parser and the transcription metric import, and theirs
WHEELS = ("soundfile", "cffi", "pycparser", "pretty_midi", "mido", "packaging", "six", "importlib_resources",
          "mir_eval", "decorator",
          # wss_ray.models imports the Open-Unmix backbone's reference implementation (and its tqdm)
          "openunmix", "tqdm",
          # wss_ray.config validates with pydantic (not in a bare torch image)
          "pydantic", "pydantic_core", "annotated_types", "typing_inspection")
# pip matches a manylinux tag exactly: name the ones binary wheels are published under
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def to_vorbis(corpus: Path, quality: float = 0.4) -> tuple[int, int]:
    """Stems to .ogg in place (the mix file goes: the default mixture is the sum of the
    targets); returns bytes before and after."""
    before = after = 0
    for stem in sorted(corpus.glob("*/Track*/stems/*.flac")):
        x, sr = sf.read(stem, dtype="float32")
        ogg = stem.with_suffix(".ogg")
        sf.write(ogg, x, sr, format="OGG", subtype="VORBIS", compression_level=quality)
        before += stem.stat().st_size
        after += ogg.stat().st_size
        stem.unlink()
    for mix in corpus.glob("*/Track*/mix.flac"):
        before += mix.stat().st_size
        mix.unlink()
    return before, after


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_bundle")
    ap.add_argument("--tracks", type=int, default=48)
    ap.add_argument("--seconds", type=float, default=16.0)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--scores", type=int, default=0, help="excerpts of real compositions to render (0: none)")
    ap.add_argument("--test-corpus", action="store_true", help="also the test suite's corpus (tests/conftest.py)")
    ap.add_argument("--quality", type=float, default=0.4, help="Vorbis compression level (0 best, 1 smallest)")
    args = ap.parse_args()
    out = Path(args.out)
    corpus = out / "corpus"
    if corpus.exists():
        shutil.rmtree(corpus)
    synthesize_corpus(corpus, args.tracks, args.seconds, args.seed, sample_rate=16000, workers=args.workers)
    before, after = to_vorbis(corpus, args.quality)
    print(f"[bundle] corpus: {args.tracks} tracks x {args.seconds:g} s, FLAC {before / 2**20:.1f} MiB -> "
          f"Vorbis {after / 2**20:.1f} MiB")
    if args.scores:
        from wss_ray.data.scores import render_score_corpus

        scores = out / "scores"
        shutil.rmtree(scores, ignore_errors=True)
        render_score_corpus(scores, args.scores, args.seconds, args.seed, sample_rate=16000, workers=args.workers)
        before, after = to_vorbis(scores, args.quality)
        print(f"[bundle] real compositions: FLAC {before / 2**20:.1f} MiB -> Vorbis {after / 2**20:.1f} MiB")
    if args.test_corpus:
        import os

        tiny = "/usr/share/sounds/sf2/TimGM6mb.sf2"   # as tests/conftest.py: its soundfont when installed
        shutil.rmtree(out / "test_corpus", ignore_errors=True)
        synthesize_corpus(out / "test_corpus", tracks=6, seconds=6, seed=3, sample_rate=22050, workers=args.workers,
                          soundfont=tiny if os.path.isfile(tiny) else None)
    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    pins = []
    for w in WHEELS:
        # this machine's version when the index has its 3.12 wheel, else the newest it has
        for spec in (f"{w}=={importlib.metadata.version(w)}", w):
            done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                                   "--python-version", "3.12", "--implementation", "cp",
                                   *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(wheels), spec], capture_output=True, text=True)
            if done.returncode == 0:
                pins.append(spec)
                break
        else:
            raise SystemExit(f"gpu_bundle: error: no CPython 3.12 wheel of {w}: {done.stderr.strip().splitlines()[-1]}")
    size = sum(p.stat().st_size for p in wheels.iterdir())
    print(f"[bundle] {len(list(wheels.iterdir()))} wheels, {size / 2**20:.1f} MiB: {', '.join(pins)}")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"[bundle] {out}: {total / 2**20:.1f} MiB in all")


if __name__ == "__main__":
    main()
