"""The `wss-ray` command: parse, build the config, call one function."""
from __future__ import annotations

import argparse
import sys

from wss_ray.config import STAGE_NAMES, ConfigError, load_config, revalidated

# the alignment check's default limit, for the help texts (wss_ray.align.MAX_COST_RATIO; kept here
# so `wss-ray -h` does not import librosa)
MAX_COST_RATIO = 0.8


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML preset (configs/*.yaml); defaults apply when omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set stages.separator.lr=3e-4 (repeatable)")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own logs (workers, Train, Data) here instead of only in Ray's log files")


def _cmd_synth(a) -> int:
    from wss_ray.data.synth import synthesize_corpus

    synthesize_corpus(a.out, a.tracks, a.seconds, a.seed, soundfont=a.soundfont, sample_rate=a.sample_rate,
                      workers=a.workers, audio_format=a.format, splits=a.splits)
    return 0


def _cmd_scores(a) -> int:
    from wss_ray.data.scores import render_score_corpus

    render_score_corpus(a.out, a.excerpts, a.seconds, a.seed, soundfont=a.soundfont, sample_rate=a.sample_rate,
                        workers=a.workers)
    return 0


def _cmd_warp(a) -> int:
    from wss_ray.data.warp import warp_corpus

    warp_corpus(a.src, a.out, a.seed, max_offset=a.max_offset, max_tempo=a.max_tempo, drift=a.drift)
    return 0


def _cmd_featurize(a) -> int:
    from wss_ray.data.featurize import featurize

    cfg = load_config(a.config, a.overrides)
    if a.workers:
        cfg.data.workers = a.workers
    manifest = featurize(a.slakh, a.out, cfg.data, cfg.ray, align=a.align, max_cost=a.max_cost)
    return 1 if manifest["_run"]["bad_tracks"] and a.strict else 0


def _cmd_stats(a) -> int:
    from pathlib import Path

    from wss_ray.data.contract import MANIFEST
    from wss_ray.data.stats import corpus_stats, feature_stats

    if (Path(a.dir) / MANIFEST).is_file():
        feature_stats(a.dir)
        return 0
    cfg = load_config(a.config, a.overrides)
    tracks = corpus_stats(a.dir, cfg.data)
    return 1 if a.strict and any("error" in v for v in tracks.values()) else 0


def _cmd_train(a) -> int:
    from wss_ray.stages.runner import train_stage

    cfg = load_config(a.config, a.overrides)
    if a.workers:
        cfg.ray.workers = a.workers
    if a.gpu:
        cfg.ray.use_gpu = True
    if a.storage:
        cfg.ray.storage = a.storage
    cfg.ray = revalidated(cfg.ray)  # the options may have made it inconsistent (a shared GPU, say)
    path = train_stage(a.stage, cfg, a.data, out=a.out, parent=a.parent)
    print(f"[train] {a.stage} checkpoint: {path}")
    return 0


def _cmd_tune(a) -> int:
    from wss_ray.tune import load_space, run_sweep

    cfg = load_config(a.config, a.overrides)
    if a.workers:
        cfg.ray.workers = a.workers
        cfg.ray = revalidated(cfg.ray)
    space = load_space(a.space, a.stage, cfg)
    run_sweep(a.stage, cfg, space, a.data, parent=a.parent, storage=a.storage, name=a.name, samples=a.samples,
              gpus_per_trial=a.gpus_per_trial, concurrent=a.concurrent)
    return 0


def _cmd_plot(a) -> int:
    import json
    from pathlib import Path

    from wss_ray.evaluate import rows_of
    from wss_ray.plots import plot_examples, plot_results

    plot_examples(a.checkpoint, a.data, a.out, split=a.split, n=a.examples)
    if a.results:
        path = plot_results(rows_of(json.loads(Path(a.results).read_text())), Path(a.out) / "results.png")
        print(f"[plot] {path}")
    return 0


def _cmd_evaluate(a) -> int:
    from wss_ray.evaluate import evaluate

    cfg = load_config(a.config, a.overrides)
    rows = evaluate(a.checkpoints, a.data, a.out, split=a.split, cfg=cfg, examples=a.examples,
                    score_informed=a.score_informed)
    return 0 if rows else 1


def _cmd_pipeline(a) -> int:
    from wss_ray.pipeline import run_pipeline

    cfg = load_config(a.config, a.overrides)
    if a.seeds < 1:
        raise ValueError(f"--seeds: need at least 1, got {a.seeds}")
    if a.seeds > 1:
        from wss_ray.pipeline import run_seeds

        run_seeds(cfg, a.out, a.seeds, data=a.data)
    else:
        run_pipeline(cfg, a.out, data=a.data)
    return 0


def _cmd_export(a) -> int:
    from wss_ray.checkpoint import export_model

    note = {"note": a.note} if a.note else None
    path = export_model(a.checkpoint, a.out, note=note, run_root=a.run_root)
    size = sum(p.stat().st_size for p in path.iterdir())
    print(f"[export] {path} ({size / 2**20:.1f} MiB, float16)")
    return 0


def _cmd_separate(a) -> int:
    from wss_ray.separate import check_chunk_seconds, separate_files

    check_chunk_seconds(a.chunk_seconds, "--chunk-seconds")  # before the checkpoint loads

    separate_files(a.audio, a.checkpoint, a.out, midi=a.midi, device=a.device, chunk_seconds=a.chunk_seconds,
                   score=a.score, max_cost=a.max_cost)
    return 0


def _cmd_align(a) -> int:
    from wss_ray.align import align_file

    align_file(a.audio, a.midi, a.out, checkpoint=a.checkpoint, max_cost=a.max_cost)
    return 0


def _max_cost_arg(p: argparse.ArgumentParser, when: str, default: float | None = None) -> None:
    """--max-cost, for every command that aligns a score."""
    p.add_argument("--max-cost", type=float, default=default, metavar="X",
                   help=f"{when}The alignment check: refuse an alignment whose cost is above this share "
                        f"of chance, in (0, 1] (default {MAX_COST_RATIO}); raise it for a score with only some of "
                        "the parts that play")


def _render_args(p: argparse.ArgumentParser) -> None:
    """What FluidSynth rendering takes, for every command that renders a corpus."""
    p.add_argument("--soundfont", help="General MIDI .sf2 (default: FluidR3_GM from fluid-soundfont-gm)")
    p.add_argument("--sample-rate", type=int, default=44100, help="rendering rate in Hz (default 44100, as Slakh)")
    p.add_argument("--workers", type=int, default=2, help="parallel processes rendering (and, for `data scores`, parsing the scores) (default 2)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wss-ray", description=(
        "Score-supervised music source separation (Hung, Wichern, Le Roux, ICASSP 2021) on Ray."))
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make and featurize corpora").add_subparsers(dest="data_cmd", required=True)
    p = data.add_parser("synth", help="render a synthetic Slakh-format corpus from procedural MIDI with FluidSynth")
    p.add_argument("--out", required=True, help="corpus folder to create (train/validation/test inside)")
    p.add_argument("--tracks", type=int, default=12, help="number of songs (default 12)")
    p.add_argument("--seconds", type=float, default=16.0, help="length of each song in seconds (default 16)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the corpus is a pure function of it")
    _render_args(p)
    p.add_argument("--format", choices=("flac", "wav"), default="flac", help="audio format (default flac)")
    p.add_argument("--splits", nargs=3, type=float, metavar=("TRAIN", "VALIDATION", "TEST"), default=None,
                   help="share of the songs in each split, summing to 1 (default 0.7 0.15 0.15); "
                        "0 0 1 makes a held-out test corpus (with another --seed than the training corpus)")
    p.set_defaults(func=_cmd_synth)

    p = data.add_parser("scores", help="render a test corpus of real compositions (music21's public-domain "
                                       "string quartets and a sonata; parts -> bass/guitar/piano by register)")
    p.add_argument("--out", required=True, help="corpus folder to create (all excerpts in test/)")
    p.add_argument("--excerpts", type=int, default=24, help="number of excerpts (default 24)")
    p.add_argument("--seconds", type=float, default=16.0, help="length of each excerpt (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the General MIDI program choices")
    _render_args(p)
    p.set_defaults(func=_cmd_scores)

    p = data.add_parser("warp", help="copy a corpus with its MIDI time-warped (offset, tempo, smooth drift) and "
                                     "the exact warp in each track's warp.json, to measure alignment against")
    p.add_argument("--in", dest="src", metavar="CORPUS", required=True, help="Slakh-layout corpus to copy")
    p.add_argument("--out", required=True, help="corpus folder to create, same layout (audio hard-linked if possible); "
                                                "tracks already in it are kept when they were made with the same "
                                                "--seed and bounds, and the run is refused when not")
    p.add_argument("--seed", type=int, required=True,
                   help="random seed, 0 or more; each track's warp follows from it and its name")
    p.add_argument("--max-offset", type=float, default=1.0,
                   help="score start off by up to this many seconds, 0..10 (default 1)")
    p.add_argument("--max-tempo", type=float, default=0.10,
                   help="score tempo off by up to this fraction, 0 or more and below 0.5 (default 0.10)")
    p.add_argument("--drift", type=float, default=0.25,
                   help="smooth local drift up to this many seconds, 0..0.5 (default 0.25)")
    p.set_defaults(func=_cmd_warp)

    p = data.add_parser("featurize", help="tracks -> Parquet chunks with score features (Ray Data)")
    p.add_argument("--slakh", required=True, help="Slakh2100-layout folder (real or synthetic)")
    p.add_argument("--out", required=True, help="feature folder (manifest.json, <split>/features, <split>/stems)")
    p.add_argument("--workers", type=int, default=0, help="parallel tasks (default: data.workers of the config)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any track failed")
    p.add_argument("--align", metavar="CKPT|salience",
                   help="the scores are not aligned to the audio: align each track's MIDI to its mix first, with "
                        "this checkpoint's transcriptor or the score-free 'salience' feature (see `wss-ray align`)")
    _max_cost_arg(p, "With --align; a track above the limit is named and skipped. ")
    _config_args(p)
    p.set_defaults(func=_cmd_featurize)

    p = data.add_parser("stats", help="what a corpus holds: per track, which stems map to which target "
                                      "(and why others are ignored); for a featurized folder, chunks "
                                      "with 0..K audible targets per split")
    p.add_argument("dir", help="a Slakh2100-layout corpus, or a featurized folder (with manifest.json)")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any track is unusable")
    _config_args(p)
    p.set_defaults(func=_cmd_stats)

    p = sub.add_parser("train", help="train one stage as a Ray Train job")
    p.add_argument("stage", choices=STAGE_NAMES, help="which stage of the method to train")
    p.add_argument("--data", required=True, help="featurized data folder (with manifest.json)")
    p.add_argument("--parent", help="parent stage checkpoint folder (transcriptor for separator, "
                                    "separator for finetune, classifier for baseline)")
    p.add_argument("--out", help="where the final checkpoint goes (default runs/<stage>)")
    p.add_argument("--workers", type=int, default=0, help="Ray Train workers (default: ray.workers)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, NCCL and bf16 autocast")
    p.add_argument("--storage", help="Ray Train storage path or URI (s3://, gs://, NFS); default <out>/ray")
    _config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("tune", help="Ray Tune sweep over one stage (ASHA), with a handoff record for the next")
    p.add_argument("stage", choices=STAGE_NAMES, help="which stage to sweep")
    p.add_argument("--space", required=True, help="search space YAML (tune_spaces/<stage>.yaml)")
    p.add_argument("--data", required=True, help="featurized data folder (with manifest.json)")
    p.add_argument("--parent", help="parent checkpoint, stage folder, handoff record or Tune experiment folder")
    p.add_argument("--samples", type=int, default=0, help="trials per grid point (default: the space's samples)")
    p.add_argument("--storage", help="where the experiment goes: a folder or URI (s3://, gs://); default runs/")
    p.add_argument("--name", help="experiment name (default tune-<stage>); an existing one is resumed")
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs per trial, split over its workers (fractions share a GPU; default 0 = CPU)")
    p.add_argument("--concurrent", type=int, default=0,
                   help="trials at once (default: 1 on a local instance, what the CPUs hold on a cluster)")
    p.add_argument("--workers", type=int, default=0, help="Ray Train workers per trial (default: ray.workers)")
    _config_args(p)
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser("evaluate", help="SI-SDR table (like the paper's Table 1) and transcription metrics")
    p.add_argument("checkpoints", nargs="+", help="stage checkpoint folders holding a separator")
    p.add_argument("--data", required=True, help="featurized data folder")
    p.add_argument("--out", required=True, help="writes results.md, results.csv, results.json here")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--examples", type=int, default=0, help="also write this many example separations (WAV)")
    p.add_argument("--score-informed", action="store_true",
                   help="also score each checkpoint with its masks restricted to the harmonics of the chunk's score "
                        "(a '<system>+score' row, as `separate --score` does)")
    _config_args(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("plot", help="PNGs: mixture spectrogram with each mask, score overlay, results bar chart")
    p.add_argument("checkpoint", help="a checkpoint holding a separator")
    p.add_argument("--data", required=True, help="featurized data folder (the chunks to draw)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--split", default="test", help="split to draw chunks from (default test)")
    p.add_argument("--examples", type=int, default=2, help="chunks to draw (default 2)")
    p.add_argument("--results", help="a results.json from evaluate: also draw its bar chart")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("pipeline", help="data -> all stages -> evaluation, resumable")
    p.add_argument("--out", required=True, help="output folder (corpus, features, checkpoints, results)")
    p.add_argument("--data", help="use this featurized folder instead of making one")
    p.add_argument("--seeds", type=int, default=1,
                   help="run the whole pipeline for this many seeds (seed, seed+1, ...) on the same data and "
                        "report each row's mean ± std and whether the paper's ordering holds per seed")
    _config_args(p)
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("export", help="an inference-only copy of a checkpoint: float16 weights of the separator "
                                      "(and transcriptor), no optimizer state, lineage kept in meta.json")
    p.add_argument("checkpoint", help="a separator, finetune, baseline or supervised checkpoint")
    p.add_argument("--out", required=True, help="folder to write (e.g. models/default)")
    p.add_argument("--run-root", help="lineage paths under this folder are recorded relative to it (<run>/...)")
    p.add_argument("--note", help="a line recorded in meta.json's exported record (how it was trained, chosen)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("separate", help="separate (and transcribe) any audio file with a trained checkpoint")
    p.add_argument("audio", nargs="+", help="audio files (wav, flac, ogg, mp3, ...)")
    p.add_argument("--checkpoint", help="a checkpoint holding a separator (default: the model shipped in "
                                        "models/default, see the README)")
    p.add_argument("--out", default="separated", help="output folder; one sub-folder per input (default separated)")
    p.add_argument("--midi", action="store_true", help="also write the transcription (needs a transcriptor)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs (default cpu)")
    p.add_argument("--chunk-seconds", type=float, default=10.0, help="processing chunk length (default 10)")
    p.add_argument("--score", metavar="MIDI",
                   help="the song's score (one input file): aligned to the recording, then each instrument keeps "
                        "only what is near the harmonics of its notes; an instrument the score lacks is silent")
    _max_cost_arg(p, "With --score. ")
    p.set_defaults(func=_cmd_separate)

    p = sub.add_parser("align", help="align a MIDI file to a recording (DTW): the score's notes, tempo and "
                                     "controls moved onto the recording's time line")
    p.add_argument("audio", help="the recording (wav, flac, ogg, ...)")
    p.add_argument("midi", help="its score as a MIDI file (any tempo, offset, expressive timing)")
    p.add_argument("--out", required=True, help="the aligned MIDI file to write (replaced if it exists; never "
                                                "one of the inputs)")
    p.add_argument("--checkpoint", help="align with this checkpoint's transcriptor (transcriptor, separator or "
                                        "finetune stage); default: a score-free spectral feature")
    _max_cost_arg(p, "A score of another piece, or over twice as long or short, is refused. ", MAX_COST_RATIO)
    p.set_defaults(func=_cmd_align)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "verbose", False):
        import os

        from wss_ray.ray_session import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    workers = getattr(args, "workers", 0)
    if workers is not None and workers < 0:  # before anything (Ray, a checkpoint) starts
        print(f"wss-ray: error: --workers: need a positive number, got {workers}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ConfigError, OSError, ValueError, RuntimeError) as e:  # OSError: a name too long, a full disk
        print(f"wss-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
