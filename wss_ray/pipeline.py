"""The stage graph from one config: data -> transcriptor -> separator(s) -> finetune(s),
classifier -> baseline, supervised -> evaluation. A stage whose final checkpoint exists is
reused, so an interrupted pipeline resumes where it stopped."""
from __future__ import annotations

import copy
import time
from pathlib import Path

from wss_ray.checkpoint import CHECKPOINT_DIR, META_FILE
from wss_ray.config import Config
from wss_ray.stages.runner import run_name, train_stage


def _variant(cfg: Config, stage: str, **fields) -> Config:
    v = copy.deepcopy(cfg)
    for k, val in fields.items():
        setattr(v.stages[stage], k, list(val))
    return v


def stage_plan(cfg: Config, swept: frozenset[str] | set[str] = frozenset()) -> list[tuple[str, str, Config, str | None]]:
    """(row key, stage, the stage's config, its parent's row key) for ``pipeline.stages``,
    parents first: the separator once per ``separator_variants`` mask set, fine-tuning once per
    ``finetune_variants`` adversary set from the separator with its masks (else the last one).
    A stage in ``swept`` is one row under its own name (its sweep holds the variants). Shared
    by the Ray pipeline and the GPU script, so both train the same rows."""
    wanted, p = set(cfg.pipeline.stages), cfg.pipeline
    plan: list[tuple[str, str, Config, str | None]] = []
    if "transcriptor" in wanted:
        plan.append(("transcriptor", "transcriptor", cfg, None))
    separators: dict[tuple, str] = {}
    if "separator" in wanted:
        if "separator" in swept:
            separators[("swept",)] = "separator"
            plan.append(("separator", "separator", cfg, "transcriptor"))
        else:
            for masks in p.separator_variants:
                key = separators[tuple(masks)] = f"separator[{'+'.join(masks)}]"
                plan.append((key, "separator", _variant(cfg, "separator", masks=masks), "transcriptor"))
    if "finetune" in wanted:
        if not separators:
            raise ValueError("pipeline.stages: finetune needs the separator stage")
        parent = separators.get(tuple(cfg.stages["finetune"].masks), list(separators.values())[-1])
        if "finetune" in swept:
            plan.append(("finetune", "finetune", cfg, parent))
        else:
            for adv in p.finetune_variants:
                plan.append((f"finetune[{'+'.join(adv) or 'none'}]", "finetune",
                             _variant(cfg, "finetune", adversarial=adv), parent))
    if "classifier" in wanted:
        plan.append(("classifier", "classifier", cfg, None))
    if "baseline" in wanted:
        plan.append(("baseline", "baseline", cfg, "classifier"))
    if "supervised" in wanted:
        plan.append(("supervised", "supervised", cfg, None))
    keys = {key for key, *_ in plan}
    for _, stage, _, parent in plan:
        if parent and parent not in keys:
            raise ValueError(f"pipeline.stages: {stage} needs the {parent.split('[')[0]} stage")
    return plan


def runs_at_once(ray_cfg, cores: int | None = None) -> int:
    """How many runs of ``ray_cfg`` the cluster holds at once, at most ``side_by_side``, with
    2 logical CPUs left over for Ray Data's tasks (with none left it starves and hangs). A local
    instance's logical CPUs outnumber its cores, so there the runs must also find a core per
    CPU they reserve: on 2 cores two runs side by side each stepped 1.8-2.25x slower, and the
    demo took 1502 s against 1426 one after another (BENCHMARKS.md)."""
    import ray

    from wss_ray.config import local_cores
    from wss_ray.ray_session import is_local

    total = ray.cluster_resources()
    n = min(ray_cfg.side_by_side, int((total.get("CPU", 0) - 2) // (ray_cfg.workers * ray_cfg.cpus_per_worker)))
    if cores is None and is_local():
        cores = local_cores()
    if cores is not None:
        n = min(n, ray_cfg.runs_on(cores))
    if ray_cfg.use_gpu:
        n = min(n, int(total.get("GPU", 0) // (ray_cfg.workers * ray_cfg.gpus_per_worker)))
    return max(1, n)


def run_plan(plan: list[tuple[str, str, Config, str | None]], train, at_once: int = 1,
             log=print) -> dict[str, Path]:
    """``train(stage, cfg, parent checkpoint)`` for each row of ``plan`` (``stage_plan``) once
    its parent's checkpoint exists, in plan order, at most ``at_once`` at a time: each in a
    thread of its own that waits on its Ray Train job. A seed's results do not depend on it
    (each worker computes alike whatever runs beside it). After a failure nothing new starts;
    the runs already going finish (their checkpoints are kept for the next try), then the
    first error is raised."""
    done: dict[str, Path] = {}
    if at_once <= 1:
        for key, name, scfg, parent in plan:
            done[key] = train(name, scfg, done[parent] if parent else None)
        return done
    import queue
    import threading

    finished: queue.Queue = queue.Queue()
    waiting, running, error = list(plan), set(), None

    def run(key: str, name: str, scfg: Config, parent: Path | None) -> None:
        try:
            finished.put((key, train(name, scfg, parent), None))
        except BaseException as e:  # handed to the main thread, which raises it
            finished.put((key, None, e))

    while True:
        for row in list(waiting):
            key, name, scfg, parent = row
            if error is not None or len(running) >= at_once:
                break
            if parent and parent not in done:
                continue
            waiting.remove(row)
            running.add(key)
            # a daemon: Ctrl-C ends the process (and the local Ray instance) without waiting for it
            threading.Thread(target=run, args=(key, name, scfg, done[parent] if parent else None),
                             name=f"run-{key}", daemon=True).start()
        if not running:
            break
        try:
            key, path, e = finished.get()
        except KeyboardInterrupt:
            # Ray Train stops a run on Ctrl-C from the main thread only; these runs are in
            # threads: a local instance goes down with them (a cluster's runs end with this
            # driver, which owns them)
            from wss_ray.ray_session import stop_local

            log(f"[pipeline] interrupted: stopping {', '.join(sorted(running))}")
            stop_local()
            raise
        running.discard(key)
        if e is None:
            done[key] = path
        elif error is None:
            error = e
            if running:
                log(f"[pipeline] {key} failed; waiting for {', '.join(sorted(running))} to finish "
                    "(a finished run is kept for the next try)")
    if error is not None:
        raise error
    if waiting:  # cannot happen for a stage_plan: parents come first
        raise RuntimeError(f"runs left without their parent: {[row[0] for row in waiting]}")
    return {key: done[key] for key, *_ in plan}  # plan order (the table's rows), not the order they ended in


def prepare_data(cfg: Config, out: Path, log=print) -> Path:
    from wss_ray.data.featurize import featurize
    from wss_ray.data.synth import synthesize_corpus

    corpus, features = out / "corpus", out / "features"
    if not cfg.synth.enabled and not corpus.is_dir():
        raise ValueError("the pipeline has no data: set synth.enabled: true in the config or pass --data")
    if cfg.synth.enabled:
        s = cfg.synth
        synthesize_corpus(corpus, s.tracks, s.seconds, s.seed, soundfont=s.soundfont or None,
                          sample_rate=s.sample_rate, workers=s.workers, audio_format=s.audio_format,
                          splits=s.splits, log=log)
    featurize(corpus, features, cfg.data, cfg.ray, log=log)
    return features


def prepare_scores(cfg: Config, out: Path, log=print) -> Path | None:
    """The real-composition test set (``pipeline.score_benchmark`` excerpts), featurized; None
    (with a line saying why) when music21 is not installed."""
    from wss_ray.data.featurize import featurize
    from wss_ray.data.scores import render_score_corpus

    try:
        import music21  # noqa: F401
    except ImportError:
        log("[pipeline] score benchmark skipped: music21 is not installed (pip install 'wss-ray[bench]')")
        return None
    corpus, features = out / "scores_corpus", out / "scores_features"
    s = cfg.synth
    render_score_corpus(corpus, cfg.pipeline.score_benchmark, s.seconds, s.seed, soundfont=s.soundfont or None,
                        sample_rate=s.sample_rate, workers=s.workers, log=log)
    featurize(corpus, features, cfg.data, cfg.ray, log=log)
    return features


def run_pipeline(cfg: Config, out: str | Path, data: str | Path | None = None, log=print,
                 scores_data: Path | None = None) -> list[dict]:
    from wss_ray.data.dataset import release_held
    from wss_ray.evaluate import evaluate

    t0 = time.time()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    features = Path(data).resolve() if data else prepare_data(cfg, out, log)
    if cfg.pipeline.score_benchmark and scores_data is None:
        scores_data = prepare_scores(cfg, out, log)
    trained: dict[str, Path] = {}

    sweeps: dict[str, str] = {}   # stage -> Tune experiment folder (every trial is evaluated)

    def folder_of(name: str, scfg: Config) -> Path:
        return out / "checkpoints" / (f"tune-{name}" if name in cfg.pipeline.sweeps else run_name(name, scfg))

    def stage(name: str, scfg: Config, parent: Path | None = None) -> Path:
        swept = name in cfg.pipeline.sweeps
        folder = folder_of(name, scfg)
        final = folder / CHECKPOINT_DIR
        if (final / META_FILE).is_file():
            log(f"[pipeline] {folder.name}: reusing finished checkpoint {final}")
            if swept:
                sweeps[name] = str(out / "tune" / f"tune-{name}")
            return final
        if swept:
            return sweep(name, scfg, folder, parent)
        return train_stage(name, scfg, features, out=folder, parent=str(parent) if parent else None, log=log)

    def sweep(name: str, scfg: Config, folder: Path, parent: Path | None) -> Path:
        from ray.train import Checkpoint

        from wss_ray.stages.runner import export_checkpoint
        from wss_ray.tune import load_space, run_sweep

        space = load_space(cfg.pipeline.sweeps[name], name, scfg)
        log(f"[pipeline] {folder.name}: sweeping {space.source} ({space.n_trials} trials)")
        record = run_sweep(name, scfg, space, features, parent=str(parent) if parent else None,
                           storage=str(out / "tune"), name=f"tune-{name}", log=log)
        sweeps[name] = record["experiment"]
        # the best trial becomes this stage's checkpoint: the next stage and a rerun use it
        return export_checkpoint(Checkpoint(record["checkpoint"]), folder)

    from wss_ray.ray_session import ensure_ray
    from wss_ray.stages.runner import driver_preserve_order

    plan = stage_plan(cfg, swept=set(cfg.pipeline.sweeps))
    at_once = 1
    # a sweep runs its own trials side by side; a rerun whose every run has finished needs no Ray
    if not cfg.pipeline.sweeps and any(not (folder_of(name, scfg) / CHECKPOINT_DIR / META_FILE).is_file()
                                       for _, name, scfg, _ in plan):
        ensure_ray(cfg.ray)
        at_once = runs_at_once(cfg.ray)
    if at_once > 1:
        log(f"[pipeline] up to {at_once} runs train side by side where neither needs the other's checkpoint")
    # Ray Data's driver-wide setting, set once for every run here (a run's own set-and-restore
    # would race with another run's in a second thread)
    with driver_preserve_order(cfg.ray.preserve_order):
        trained.update(run_plan(plan, stage, at_once, log))
    release_held()   # the splits kept for the next stage: evaluation reads its own

    # a swept stage contributes its Tune experiment: one row per trial (the paper's ablations)
    evaluated = [sweeps.get(k, str(p)) for k, p in trained.items() if k not in ("transcriptor", "classifier")]
    rows = []
    if evaluated:
        rows = evaluate(evaluated, features, out / "results", split=cfg.pipeline.eval_split, cfg=cfg,
                        examples=cfg.pipeline.examples, log=log)
        if cfg.pipeline.examples:
            from wss_ray.plots import plot_examples

            seps = [p for k, p in trained.items() if k not in ("transcriptor", "classifier")]
            weak = [p for k, p in trained.items() if k.startswith(("finetune", "separator"))]
            plot_examples(str((weak or seps)[-1]), features, out / "results" / "plots",
                          split=cfg.pipeline.eval_split, n=cfg.pipeline.examples, log=log)
        if scores_data is not None:
            log("[pipeline] second test set: real compositions (music21 scores)")
            evaluate(evaluated, scores_data, out / "results" / "scores", split="test", cfg=cfg, log=log)
    log(f"[pipeline] finished in {time.time() - t0:.0f} s; checkpoints in {out / 'checkpoints'}, "
        f"results in {out / 'results'} (results.md/.csv/.json, results.png, examples/ WAVs, plots/ PNGs)")
    return rows


def run_seeds(cfg: Config, out: str | Path, seeds: int, data: str | Path | None = None, log=print) -> dict:
    """The pipeline once per seed (``seed``, ``seed + 1``, ...) on the same data, each into
    ``<out>/seed<k>``; then every row's mean ± std over seeds, and whether the paper's ordering
    holds in each, in ``<out>/results_seeds.md`` / ``.json``."""
    import json

    from wss_ray.atomic import write_text
    from wss_ray.evaluate import rows_of, seeds_markdown

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    features = Path(data).resolve() if data else prepare_data(cfg, out, log)
    scores = prepare_scores(cfg, out, log) if cfg.pipeline.score_benchmark else None
    per_seed, per_seed_scores = {}, {}
    for k in range(seeds):
        v = copy.deepcopy(cfg)
        v.seed = cfg.seed + k
        log(f"[pipeline] seed {v.seed} ({k + 1}/{seeds})")
        run_pipeline(v, out / f"seed{v.seed}", data=features, log=log, scores_data=scores)
        res = out / f"seed{v.seed}" / "results"
        per_seed[v.seed] = rows_of(json.loads((res / "results.json").read_text()))
        if (res / "scores" / "results.json").is_file():
            per_seed_scores[v.seed] = rows_of(json.loads((res / "scores" / "results.json").read_text()))
    insts = cfg.data.instruments
    text, summary = seeds_markdown(per_seed, insts, f"SI-SDR (dB) on {cfg.pipeline.eval_split}")
    result = {"main": summary}
    if per_seed_scores:
        more, result["scores"] = seeds_markdown(per_seed_scores, insts, "SI-SDR (dB) on real compositions")
        text += "\n" + more
    write_text(out / "results_seeds.md", text)
    write_text(out / "results_seeds.json", json.dumps(result, indent=2))
    log(text)
    log(f"[pipeline] {seeds} seeds: {out / 'results_seeds.md'}")
    return result
