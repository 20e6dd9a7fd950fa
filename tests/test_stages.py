"""Every stage through real Ray Train (2 workers, gloo) on tiny data; the smoke pipeline end to
end; fault tolerance; lineage; stage checks; weak stages never read stems."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from wss_ray.checkpoint import CheckpointError, read_meta
from wss_ray.stages.runner import train_stage

ROWS = {"mixture", "oracle_irm", "separator[c+h]", "finetune[c+h+aml+atl]", "baseline", "supervised"}


def test_smoke_pipeline_writes_every_row(pipeline_out, features):
    res = json.loads((pipeline_out / "results" / "results.json").read_text())
    assert res["version"] == 2 and res["split"] == "test"
    for table in ("multi_source", "all_chunks"):
        rows = res[table]["rows"]
        assert {r["system"] for r in rows} == ROWS
        assert all(set(r) == {"system", "instrument", "si_sdr_mean", "si_sdr_median", "n_chunks"} for r in rows)
        assert {r["instrument"] for r in rows} == {"piano", "guitar", "bass"}
    md = (pipeline_out / "results" / "results.md").read_text()
    assert "| supervised |" in md and "gap closed" in md
    # the multi-source table leads, the all-chunks table follows
    assert md.index("multi-source chunks") < md.index("all chunks")
    assert (pipeline_out / "results" / "results_distribution.png").stat().st_size > 1000
    assert list((pipeline_out / "results" / "examples").glob("*/mixture.wav"))
    trans = json.loads((pipeline_out / "results" / "transcription.json").read_text())
    assert {t["system"] for t in trans} == {"separator[c+h]", "finetune[c+h+aml+atl]"}


def test_multi_source_table_matches_an_independent_count(pipeline_out, features):
    """The mixture row recomputed from the stems shards with numpy: audible = peak above
    1e-3, multi-source = two or more audible, SI-SDR by its formula."""
    import numpy as np
    import pyarrow.parquet as pq

    k = 3
    sdr = {i: [] for i in range(k)}
    sdr_all = {i: [] for i in range(k)}
    for shard in sorted((features / "test" / "stems").glob("*.parquet")):
        feats = pq.read_table(features / "test" / "features" / shard.name).sort_by("chunk")
        stems = pq.read_table(shard).sort_by("chunk")
        mix = feats.column("mix").combine_chunks().flatten().to_numpy().reshape(feats.num_rows, -1).astype(np.float64)
        ref = stems.column("stems").combine_chunks().flatten().to_numpy().reshape(stems.num_rows, k, -1).astype(np.float64)
        for c in range(len(mix)):
            audible = np.abs(ref[c]).max(-1) > 1e-3
            x = mix[c] - mix[c].mean()     # zero-mean SI-SDR, as the paper's metric
            for i in np.nonzero(audible)[0]:
                s = ref[c, i] - ref[c, i].mean()
                target = (x @ s) / (s @ s) * s
                v = 10 * np.log10((target @ target) / ((x - target) @ (x - target)))
                sdr_all[i].append(v)
                if audible.sum() >= 2:
                    sdr[i].append(v)
    res = json.loads((pipeline_out / "results" / "results.json").read_text())
    for table, want in (("multi_source", sdr), ("all_chunks", sdr_all)):
        got = {r["instrument"]: r for r in res[table]["rows"] if r["system"] == "mixture"}
        for i, inst in enumerate(["piano", "guitar", "bass"]):
            assert got[inst]["n_chunks"] == len(want[i])
            if want[i]:
                assert abs(got[inst]["si_sdr_mean"] - np.mean(want[i])) < 0.05


def test_lineage_metadata(pipeline_out, features):
    ck = pipeline_out / "checkpoints"
    fingerprint = json.loads((features / "manifest.json").read_text())["fingerprint"]
    expect = {"transcriptor": None, "separator-c-h": "transcriptor", "finetune-c-h-aml-atl": "separator-c-h",
              "classifier": None, "baseline": "classifier", "supervised": None}
    for name, parent in expect.items():
        meta = read_meta(ck / name / "checkpoint")
        assert meta["stage"] == name.split("-")[0]
        assert meta["data_fingerprint"] == fingerprint
        assert meta["config"]["stages"][meta["stage"]]["steps"] == meta["step"]
        assert meta["code_revision"] and meta["instruments"] == ["piano", "guitar", "bass"]
        # "auto" is decided once by the driver, and the workers computed at what it decided
        assert meta["precision"] == meta["config"]["ray"]["cpu_precision"] in ("bf16", "fp32")
        if parent:
            assert meta["parents"] == [str((ck / parent / "checkpoint").resolve())]
        else:
            assert meta["parents"] == []
    assert read_meta(ck / "finetune-c-h-aml-atl" / "checkpoint")["variant"] == "c+h+aml+atl"


def test_training_metrics_go_to_tensorboard(pipeline_out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(pipeline_out / "checkpoints" / "finetune-c-h-aml-atl" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    # loss terms separately, validation metrics, learning rates of both models
    assert {"finetune/tr", "finetune/c_mix", "finetune/h_mix", "finetune/aml_s", "finetune/t_sep",
            "finetune/val_loss", "finetune/lr_separator", "finetune/lr_transcriptor"} <= tags
    assert [e.step for e in acc.Scalars("finetune/loss")] == [1, 2, 3, 4]


def test_resuming_a_finished_pipeline_retrains_nothing(pipeline_out, features, small_cfg):
    from wss_ray.pipeline import run_pipeline

    models = sorted(pipeline_out.glob("checkpoints/*/checkpoint/model.pt"))
    before = {p: p.stat().st_mtime_ns for p in models}
    lines = []
    run_pipeline(small_cfg, pipeline_out, data=features, log=lines.append)
    assert {p: p.stat().st_mtime_ns for p in models} == before
    assert sum("reusing finished checkpoint" in line for line in lines) == 6
    assert not any("] training:" in line for line in lines), lines


@pytest.mark.parametrize("ema", [0.0, 0.5])
def test_worker_failure_is_retried_and_resumes(tmp_path, features, small_cfg, ema):
    """With weight averaging (ema > 0) the checkpoints a Ray worker writes hold the average as
    the models and the trained weights under "trained", and a resumed run continues both."""
    import copy

    import torch

    cfg = copy.deepcopy(small_cfg)
    cfg.stages["transcriptor"].ema = ema
    marker = tmp_path / "failed-once"
    final = train_stage("transcriptor", cfg, features, out=tmp_path / "t", fail_once_at=4,
                        fail_marker=str(marker))
    assert marker.read_text() == "4"
    meta = read_meta(final)
    # checkpoints at steps 3 and 6: the retried worker group resumed at 3, then finished
    assert meta["step"] == 6 and meta["resumed_from"] == [3]
    payload = torch.load(final / "model.pt", weights_only=True)
    assert ("trained" in payload) == (ema > 0)
    if ema:
        held, trained = payload["models"]["transcriptor"]["state"], payload["trained"]["transcriptor"]["state"]
        assert any(not torch.equal(held[k], trained[k]) for k in held)


@pytest.mark.parametrize("workers", [1, 2])
def test_preserve_order_makes_a_run_reproducible(tmp_path, features, small_cfg, workers):
    """Seeds fix initial weights and shuffles; ray.preserve_order also fixes the order in which
    Ray Data delivers blocks and, with two DDP workers, which rows each worker gets, so two runs
    end with identical weights. (This corpus is too small for a streaming split's timing to
    show; the next test checks the mechanism that removes it.)"""
    import copy

    import torch

    cfg = copy.deepcopy(small_cfg)
    cfg.ray.workers, cfg.ray.preserve_order = workers, True
    cfg.stages["transcriptor"].steps = 6
    from wss_ray.data.dataset import release_held

    runs = []
    for i in range(2):
        release_held()   # each run reads (and orders) its blocks itself, as in a new process
        runs.append(train_stage("transcriptor", cfg, features, out=tmp_path / f"run{i}", log=lambda *_: None))
    a, b = (torch.load(r / "model.pt", weights_only=True)["models"]["transcriptor"]["state"] for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_preserve_order_deals_rows_by_rank_instead_of_a_streaming_split(tmp_path, features, small_cfg):
    """A streaming split hands blocks to whichever worker asks first, so with several workers the
    rows each one trains on follow timing. Under ray.preserve_order the stream is left unsplit
    and each worker keeps rows rank, rank + world, ... of every batch of batch * world rows: the
    workers' rows partition the stream, the same in every run, and each gets full batches."""
    import copy

    import torch

    from wss_ray.data.dataset import load_manifest, weak_dataset
    from wss_ray.stages.runner import _arrow_batches, build_trainer

    cfg = copy.deepcopy(small_cfg)
    cfg.ray.workers, cfg.ray.preserve_order = 2, True
    trainer = build_trainer("transcriptor", cfg, features, None, name="t", storage=str(tmp_path))
    assert trainer.data_config._datasets_to_split == []
    assert trainer.train_loop_config["deal_rows"] is True
    cfg.ray.preserve_order = False   # the default keeps Ray's split: no read of the data per worker
    trainer = build_trainer("transcriptor", cfg, features, None, name="t", storage=str(tmp_path))
    assert trainer.train_loop_config["deal_rows"] is False

    manifest = load_manifest(features)
    ds = weak_dataset(features, "train", 1, seed=0)
    whole = [b["mix"] for b in _arrow_batches(ds.iterator(), manifest, 4, seed=5)]
    ranks = [[b["mix"] for b in _arrow_batches(ds.iterator(), manifest, 2, 5, rank, 2)] for rank in (0, 1)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) > 0
    for w, r0, r1 in zip(whole, *ranks):
        assert r0.shape[0] == r1.shape[0] == 2                     # full batches on both workers
        assert torch.equal(w[0::2], r0) and torch.equal(w[1::2], r1)


def test_weak_stage_never_opens_stems(tmp_path, features, small_cfg, pipeline_out):
    nostems = tmp_path / "features"
    shutil.copytree(features, nostems)
    for d in nostems.glob("*/stems"):
        shutil.rmtree(d)
    parent = pipeline_out / "checkpoints" / "transcriptor" / "checkpoint"
    final = train_stage("separator", small_cfg, nostems, out=tmp_path / "s", parent=str(parent))
    assert read_meta(final)["step"] == small_cfg.stages["separator"].steps
    from wss_ray.data.dataset import DataError

    with pytest.raises(DataError, match="train/stems: no Parquet shards"):
        train_stage("supervised", small_cfg, nostems, out=tmp_path / "sup")


def test_wrong_parent_or_checkpoint_is_a_clear_error(tmp_path, features, small_cfg, pipeline_out):
    ck = pipeline_out / "checkpoints"
    with pytest.raises(CheckpointError, match="'transcriptor' checkpoint; stage 'finetune' needs a separator"):
        train_stage("finetune", small_cfg, features, out=tmp_path / "x", parent=str(ck / "transcriptor"))
    with pytest.raises(CheckpointError, match="needs --parent"):
        train_stage("separator", small_cfg, features, out=tmp_path / "y")
    from wss_ray.evaluate import evaluate

    with pytest.raises(CheckpointError, match="'classifier' checkpoint; separation needs one of"):
        evaluate([str(ck / "classifier" / "checkpoint")], features, tmp_path / "ev")
    # a checkpoint made for another instrument list
    other = tmp_path / "other"
    shutil.copytree(ck / "transcriptor" / "checkpoint", other)
    meta = json.loads((other / "meta.json").read_text())
    meta["instruments"] = ["piano", "bass"]
    (other / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="trained on instruments"):
        train_stage("separator", small_cfg, features, out=tmp_path / "z", parent=str(other))


@pytest.mark.parametrize("cmd", ["train", "evaluate", "pipeline", "separate"])
def test_cli_help_explains_every_option(cmd):
    import argparse

    from wss_ray.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[cmd]
    for action in parser._actions:
        assert action.help, f"wss-ray {cmd}: option {action.option_strings or action.dest} has no help text"
    res = subprocess.run([sys.executable, "-m", "wss_ray.cli", cmd, "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and f"usage: wss-ray {cmd}" in res.stdout


def test_bad_config_values_name_the_field(tmp_path):
    from wss_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="stages.separator.masks"):
        load_config(None, ["stages.separator.masks=[c, x]"])
    with pytest.raises(ConfigError, match="stages.transcriptor.lr: must be > 0"):
        load_config(None, ["stages.transcriptor.lr=-1"])
    with pytest.raises(ConfigError, match="unknown setting.*data.sample_rat"):
        load_config(None, ["data.sample_rat=8000"])
    with pytest.raises(ConfigError, match="data.chunk_seconds"):
        load_config(None, ["data.chunk_seconds=1.0"])
    with pytest.raises(ConfigError, match="ray.placement_strategy: 'spread' is not one of"):
        load_config(None, ["ray.placement_strategy=spread"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("ray:\n  workers: two\n")
    with pytest.raises(ConfigError, match="ray.workers: expected an integer"):
        load_config(bad)
    # numbers parse as YAML 1.2 does: the CLI help's own example is a float, in --set and in files
    assert load_config(None, ["stages.separator.lr=3e-4"]).stages["separator"].lr == 0.0003
    good = tmp_path / "good.yaml"
    good.write_text("stages:\n  separator: {lr: 1e-3, weight_decay: 2E-5}\n")
    assert load_config(good).stages["separator"].weight_decay == 0.00002
    for over, field in (("stages.separator.lr=.inf", "stages.separator.lr"),
                        ("stages.separator.grad_clip=.inf", "stages.separator.grad_clip"),
                        ("stages.finetune.weight_decay=.nan", "stages.finetune.weight_decay"),
                        ("data.chunk_seconds=.inf", "data.chunk_seconds")):
        with pytest.raises(ConfigError, match=f"{field}: must be a finite number"):
            load_config(None, [over])
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage\x81")
    with pytest.raises(ConfigError, match="binary.yaml: not valid YAML"):
        load_config(binary)


def test_each_stage_has_only_its_own_settings():
    from wss_ray.config import ConfigError, load_config

    # an adversarial weight means nothing to the transcriptor; a mask list nothing to the baseline
    for over, needle in (("stages.transcriptor.lambda_adv=2", "unknown setting(s) stages.transcriptor.lambda_adv"),
                         ("stages.baseline.masks=[c]", "unknown setting(s) stages.baseline.masks"),
                         ("stages.classifier.pos_weight=3", "unknown setting(s) stages.classifier.pos_weight"),
                         ("stages.baseline.lambda_tr=2", "renamed stages.baseline.lambda_cls"),
                         ("stages.separator.adversarial=[aml]", "unknown setting(s) stages.separator.adversarial"),
                         ("models.separator.hidden=2.5", "models.separator.hidden: expected an integer, got 2.5"),
                         ("pipeline.stages=[transcriptor, foo]", "pipeline.stages[1]: 'foo' is not one of")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [over])
        assert needle in str(e.value), (over, str(e.value))
    cfg = load_config(None, ["stages.baseline.lambda_cls=0.5", "stages.finetune.adversarial=[aml]"])
    assert cfg.stages["baseline"].lambda_cls == 0.5 and cfg.stages["finetune"].adversarial == ["aml"]
    # every preset the project ships still loads
    for preset in sorted((Path(__file__).parent.parent / "configs").glob("*.yaml")):
        load_config(preset)


def test_stage_plan_puts_parents_first_and_names_a_missing_one():
    """The rows the Ray pipeline and the GPU script both train: every variant of the ablation
    preset, each after its parent; a stage whose parent stage is left out is refused by name."""
    from wss_ray.config import load_config
    from wss_ray.pipeline import stage_plan

    repo = Path(__file__).parent.parent
    plan = stage_plan(load_config(repo / "configs" / "ablation.yaml"))
    keys = [key for key, *_ in plan]
    assert keys[:4] == ["transcriptor", "separator[c]", "separator[h]", "separator[c+h]"]
    for i, (key, stage, cfg, parent) in enumerate(plan):
        assert parent is None or parent in keys[:i], key
        if stage == "separator":
            assert key == f"separator[{'+'.join(cfg.stages['separator'].masks)}]"
        if stage == "finetune":   # from the separator with fine-tuning's masks
            assert parent == "separator[c+h]" and key == f"finetune[{'+'.join(cfg.stages['finetune'].adversarial) or 'none'}]"
    assert [k for k in keys if k.startswith("finetune")] == ["finetune[none]", "finetune[aml]", "finetune[atl]"]
    # a swept stage is one row; its variants live in the sweep
    swept = stage_plan(load_config(repo / "configs" / "ablation.yaml"), swept={"separator"})
    assert [k for k, *_ in swept if k.startswith("separator")] == ["separator"]
    for stages, needle in ((["baseline", "supervised"], "baseline needs the classifier stage"),
                           (["separator"], "separator needs the transcriptor stage"),
                           (["transcriptor", "finetune"], "finetune needs the separator stage")):
        with pytest.raises(ValueError, match=needle):
            stage_plan(load_config(None, [f"pipeline.stages=[{', '.join(stages)}]"]))


def test_run_plan_starts_a_run_once_its_parent_ended_and_at_most_so_many_at_once():
    """The pipeline's scheduler, with stand-in runs (threads that sleep): every run after its
    parent, never more than ``at_once`` together, the independent chains overlapping, the
    result in plan order whatever order the runs end in."""
    import threading
    import time

    from wss_ray.config import load_config
    from wss_ray.pipeline import run_plan, stage_plan

    plan = stage_plan(load_config(Path(__file__).parent.parent / "configs" / "demo.yaml"))
    seconds = {"transcriptor": 0.3, "separator": 0.2, "finetune": 0.1, "classifier": 0.05,
               "baseline": 0.05, "supervised": 0.1}
    lock, events, now = threading.Lock(), [], {"running": 0, "most": 0}

    def train(stage, cfg, parent):
        with lock:
            now["running"] += 1
            now["most"] = max(now["most"], now["running"])
            events.append(("start", stage, parent))
        time.sleep(seconds[stage])
        with lock:
            now["running"] -= 1
            events.append(("end", stage, None))
        return Path(f"/ckpt/{stage}")

    done = run_plan(plan, train, at_once=2)
    assert list(done) == [key for key, *_ in plan]          # the table's row order
    assert now["most"] == 2
    ended = []
    for kind, stage, parent in events:
        if kind == "start" and parent is not None:
            assert parent.name in ended, (stage, parent, ended)
        if kind == "end":
            ended.append(stage)
    # the classifier's chain and the supervised run ended while the transcriptor's chain ran
    assert ended.index("supervised") < ended.index("finetune")

    events.clear()
    now["most"] = 0
    assert list(run_plan(plan, train, at_once=1)) == list(done)
    assert now["most"] == 1
    assert [stage for kind, stage, _ in events if kind == "start"] == [stage for _, stage, *_ in plan]


def test_run_plan_after_a_failure_starts_nothing_new_and_lets_the_running_end():
    import threading
    import time

    from wss_ray.config import load_config
    from wss_ray.pipeline import run_plan, stage_plan

    plan = stage_plan(load_config(Path(__file__).parent.parent / "configs" / "demo.yaml"))
    started, ended, lock = [], [], threading.Lock()

    def train(stage, cfg, parent):
        with lock:
            started.append(stage)
        if stage == "classifier":
            raise ValueError("features/manifest.json: bad field")
        time.sleep(0.3)
        with lock:
            ended.append(stage)
        return Path(stage)

    lines = []
    with pytest.raises(ValueError, match="bad field"):
        run_plan(plan, train, at_once=2, log=lines.append)
    assert sorted(started) == ["classifier", "transcriptor"] and ended == ["transcriptor"]
    assert any("classifier failed; waiting for transcriptor" in line for line in lines), lines


def test_a_run_beside_another_ends_as_it_does_alone(tmp_path, features, small_cfg):
    """Under ray.preserve_order a run's weights do not depend on what trains beside it: the
    classifier trained alone and trained side by side with the transcriptor end identical."""
    import copy

    import torch

    from wss_ray.data.dataset import release_held
    from wss_ray.pipeline import run_plan, runs_at_once, stage_plan
    from wss_ray.stages.runner import driver_preserve_order

    cfg = copy.deepcopy(small_cfg)
    # one worker each: two runs then leave Ray Data 2 of the default instance's 4 logical CPUs
    cfg.ray.workers, cfg.ray.preserve_order = 1, True
    cfg.stages["classifier"].steps = cfg.stages["transcriptor"].steps = 4
    cfg.pipeline.stages = ["transcriptor", "classifier"]
    # where the pipeline would put them side by side: a core for each CPU they reserve
    assert runs_at_once(cfg.ray, cores=2) == 2 and runs_at_once(cfg.ray, cores=1) == 1

    def train(out):
        return lambda stage, c, parent: train_stage(stage, c, features, out=out / stage, log=lambda *_: None)

    # as run_pipeline does: Ray Data's driver-wide setting set once around the runs (a run's
    # own set-and-restore would race with the other thread's)
    with driver_preserve_order(True):
        release_held()
        alone = run_plan([row for row in stage_plan(cfg) if row[0] == "classifier"], train(tmp_path / "alone"))
        release_held()
        beside = run_plan(stage_plan(cfg), train(tmp_path / "beside"), at_once=2)
    a, b = (torch.load(r["classifier"] / "model.pt", weights_only=True)["models"]["classifier"]["state"]
            for r in (alone, beside))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_recipes_declare_tunables_that_exist_on_their_stage():
    from wss_ray.config import Config
    from wss_ray.stages import RECIPES

    stages, models = Config().stages, Config().models
    for name, recipe in RECIPES.items():
        fields = set(type(stages[name]).model_fields)
        assert recipe.tunable and recipe.tunable <= fields, (name, recipe.tunable - fields)
        assert recipe.creates is None or hasattr(models, recipe.creates), name
    # the critic's loss weights belong to the stages that have a critic, not to every stage
    assert "lambda_adv" in RECIPES["finetune"].tunable and "lambda_adv" not in type(stages["separator"]).model_fields
    assert "lambda_cls" in RECIPES["baseline"].tunable and "lambda_tr" not in RECIPES["baseline"].tunable


def test_separate_any_file_with_a_trained_checkpoint(tmp_path, pipeline_out):
    import numpy as np
    import pretty_midi
    import soundfile as sf

    from wss_ray.separate import separate_files

    ck = pipeline_out / "checkpoints" / "finetune-c-h-aml-atl" / "checkpoint"
    sr = 22050
    t = np.arange(int(3.3 * sr)) / sr
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 110 * t)], axis=1)
    sf.write(tmp_path / "song.flac", stereo.astype(np.float32), sr)
    import io

    lines, bar = [], io.StringIO()
    written = separate_files([str(tmp_path / "song.flac")], str(ck), str(tmp_path / "out"), midi=True,
                             chunk_seconds=1.0, log=lines.append, progress_stream=bar)
    names = sorted(p.name for p in written)
    assert names == ["bass.wav", "guitar.wav", "piano.wav", "residual.wav", "transcription.mid"]
    total = np.zeros(len(t))
    for name in ("piano", "guitar", "bass", "residual"):
        x, rate = sf.read(tmp_path / "out" / "song" / f"{name}.wav")
        assert rate == sr and len(x) == len(t)
        total += x
    stored, _ = sf.read(tmp_path / "song.flac")  # the 16-bit FLAC, not the float array it came from
    np.testing.assert_allclose(total, stored.mean(axis=1), atol=1e-5)  # documented downmix: channel mean
    pretty_midi.PrettyMIDI(str(tmp_path / "out" / "song" / "transcription.mid"))
    # progress on files longer than a chunk (a line per tenth when not a terminal), speed at the end
    assert "chunks" in bar.getvalue() and bar.getvalue().count("\n") <= 11
    assert any("x realtime" in line for line in lines)
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        separate_files([str(tmp_path / "nope.wav")], str(ck), str(tmp_path / "out"))
    with pytest.raises(CheckpointError, match="'transcriptor' checkpoint"):
        separate_files([str(tmp_path / "song.flac")], str(pipeline_out / "checkpoints" / "transcriptor" / "checkpoint"),
                       str(tmp_path / "out"))


@pytest.mark.parametrize("fmt,sr,channels", [("MP3", 44100, 2), ("OGG", 48000, 2), ("WAV", 8000, 1)])
def test_separate_common_formats_keep_length_and_rate(tmp_path, pipeline_out, fmt, sr, channels):
    import numpy as np
    import soundfile as sf

    from wss_ray.separate import separate_files

    ck = pipeline_out / "checkpoints" / "separator-c-h" / "checkpoint"
    t = np.arange(int(2.5 * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 196 * t) * (1 + np.sin(2 * np.pi * 2 * t)) / 2
    song = tmp_path / f"song.{fmt.lower()}"
    sf.write(song, np.stack([x] * channels, axis=1).astype(np.float32), sr, format=fmt)
    decoded, rate = sf.read(song, dtype="float32", always_2d=True)  # what the codec gives back
    separate_files([str(song)], str(ck), str(tmp_path / "out"), chunk_seconds=1.0, log=lambda *_: None)
    total = np.zeros(len(decoded))
    for name in ("piano", "guitar", "bass", "residual"):
        y, r = sf.read(tmp_path / "out" / "song" / f"{name}.wav")
        assert r == rate == sr and len(y) == len(decoded)
        total += y
    np.testing.assert_allclose(total, decoded.mean(axis=1), atol=1e-5)


def test_streaming_file_path_matches_the_python_api(tmp_path, pipeline_out):
    """The file path reads forward in blocks of about one chunk and gives what the in-memory API
    gives for the same chunking, and a mid-file failure leaves no output file behind."""
    import numpy as np
    import soundfile as sf

    from wss_ray import Separator
    from wss_ray.audio_io import AudioReader
    from wss_ray.separate import separate_files

    ck = pipeline_out / "checkpoints" / "finetune-c-h-aml-atl" / "checkpoint"
    sr = 22050
    rng = np.random.default_rng(1)
    x = (0.1 * rng.standard_normal(int(7.3 * sr))).astype(np.float32)
    sf.write(tmp_path / "long.wav", x, sr, subtype="FLOAT")
    biggest = []
    original = AudioReader.read

    def spy(self, start, length):
        out = original(self, start, length)
        biggest.append(len(self._buf))
        return out

    AudioReader.read = spy
    try:
        separate_files([str(tmp_path / "long.wav")], str(ck), str(tmp_path / "out"), chunk_seconds=1.0,
                       log=lambda *_: None)
    finally:
        AudioReader.read = original
    assert max(biggest) <= sr * 1.0 + 2  # one chunk, never the file
    api = Separator.from_checkpoint(ck).separate(x, sr, chunk_seconds=1.0)
    for name, est in api.items():
        y, _ = sf.read(tmp_path / "out" / "long" / f"{name}.wav", dtype="float32")
        np.testing.assert_allclose(y, est.numpy(), atol=1e-6)

    def broken(self, start, length):
        if start > sr * 3:
            raise ValueError("disk gone")
        return original(self, start, length)

    AudioReader.read = broken
    try:
        with pytest.raises(ValueError, match="disk gone"):
            separate_files([str(tmp_path / "long.wav")], str(ck), str(tmp_path / "half"), chunk_seconds=1.0)
    finally:
        AudioReader.read = original
    assert not list((tmp_path / "half").rglob("*.wav")) and not list((tmp_path / "half").rglob(".*tmp*"))


def test_separate_refuses_bad_audio_clearly(tmp_path, pipeline_out):
    import numpy as np
    import soundfile as sf

    from wss_ray.cli import main
    from wss_ray.separate import separate_files

    ck = str(pipeline_out / "checkpoints" / "separator-c-h" / "checkpoint")
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(ValueError, match="corrupt.wav: unreadable audio"):
        separate_files([str(tmp_path / "corrupt.wav")], ck, str(tmp_path / "out"))
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="empty.wav: the file holds no audio"):
        separate_files([str(tmp_path / "empty.wav")], ck, str(tmp_path / "out"))
    sf.write(tmp_path / "ok.wav", np.zeros(1600, dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="chunk_seconds: need a number of seconds between 0.1 and 3600"):
        separate_files([str(tmp_path / "ok.wav")], ck, str(tmp_path / "out"), chunk_seconds=0)
    assert main(["separate", str(tmp_path / "corrupt.wav"), "--checkpoint", ck, "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o" / "corrupt").exists() or not list((tmp_path / "o" / "corrupt").iterdir())


def test_overlap_add_has_no_seams():
    import torch

    from wss_ray.streaming import overlap_add

    x = torch.randn(10_000)
    # a pointwise "model": overlap-add must reproduce it exactly, whatever the chunking
    fn = lambda seg: torch.stack([seg * 0.5, seg * 0.25], dim=1)
    out = overlap_add(fn, x, 1024, 2)
    torch.testing.assert_close(out, torch.stack([x * 0.5, x * 0.25]))


def test_pictures_of_masks_score_and_results(tmp_path, pipeline_out, features):
    """The pipeline draws the results bar chart and example mask/score PNGs; `wss-ray plot`
    draws them for any checkpoint."""
    from matplotlib.image import imread

    from wss_ray.cli import main

    res = pipeline_out / "results"
    assert imread(res / "results.png").shape[0] > 100
    assert sorted(p.name for p in (res / "plots").glob("*.png")) == ["example01_masks.png", "example01_score.png"]
    ck = pipeline_out / "checkpoints" / "separator-c-h" / "checkpoint"
    assert main(["plot", str(ck), "--data", str(features), "--out", str(tmp_path), "--examples", "2",
                 "--results", str(res / "results.json")]) == 0
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "results.png" in names and sum(n.endswith("_masks.png") for n in names) >= 1
    img = imread(tmp_path / "example01_masks.png")
    assert img.shape[0] > 300 and img.std() > 0.01  # four panels, not a blank canvas
    assert main(["plot", str(pipeline_out / "checkpoints" / "transcriptor" / "checkpoint"), "--data", str(features),
                 "--out", str(tmp_path / "bad")]) == 2  # a transcriptor holds no separator: clear error


def test_gap_closed_is_left_out_when_the_gap_is_too_narrow():
    from wss_ray.evaluate import results_markdown

    def rows(supervised_db):
        return [{"system": s, "instrument": i, "si_sdr_mean": v, "si_sdr_median": v, "n_chunks": 4}
                for s, v in [("mixture", 1.0), ("separator[c+h]", 2.0), ("supervised", supervised_db)]
                for i in ("bass", "piano")]

    wide = results_markdown(rows(5.0), [], ["bass", "piano"], "test", 4)
    assert "| separator[c+h] | 2.00 (2.00) | 2.00 (2.00) | 2.00 | 25% |" in wide
    narrow = results_markdown(rows(1.2), [], ["bass", "piano"], "test", 4)
    assert "| separator[c+h] | 2.00 (2.00) | 2.00 (2.00) | 2.00 | – |" in narrow
    assert "0.20 dB above the mixture" in narrow and "%" not in narrow


def test_seed_table_and_paper_ordering():
    from wss_ray.evaluate import ordering_holds, seeds_markdown

    def rows(**avg):
        return [{"system": s, "instrument": i, "si_sdr_mean": v, "si_sdr_median": v, "n_chunks": 4}
                for s, v in avg.items() for i in ("bass", "guitar", "piano")]

    good = rows(mixture=-3.0, baseline=-1.0, **{"separator[c+h]": 0.0, "finetune[c+h]": 1.0,
                                                "finetune[c+h+aml]": 1.5}, supervised=2.0)
    bad = rows(mixture=-3.0, baseline=0.5, **{"separator[c+h]": 0.0, "finetune[c+h]": 1.0}, supervised=2.0)
    assert ordering_holds(good) is True and ordering_holds(bad) is False
    assert ordering_holds(rows(mixture=0.0, supervised=1.0)) is None
    text, summary = seeds_markdown({0: good, 1: bad}, ["piano", "guitar", "bass"], "t")
    # baseline: -1.0 and 0.5 -> mean -0.25, sample std sqrt(((-0.75)^2 + 0.75^2) / 1) = 1.0607
    assert "| baseline | -0.25 ± 1.06 | -0.25 ± 1.06 | -0.25 ± 1.06 | -0.25 ± 1.06 |" in text
    assert summary["ordering_holds"] == {0: True, 1: False} and "seed 0 holds, seed 1 fails" in text
    # an instrument with no multi-source chunk (NaN) is left out of a row's average, as in the table
    holey = [dict(r, si_sdr_mean=float("nan")) if r["instrument"] == "piano" else r for r in good]
    assert ordering_holds(holey) is True
    empty = [dict(r, si_sdr_mean=float("nan")) for r in good]
    assert ordering_holds(empty) is None


def test_export_half_precision_keeps_lineage_and_separates(pipeline_out, tmp_path, monkeypatch):
    import numpy as np
    import soundfile as sf
    import torch

    from wss_ray.checkpoint import export_model, load_checkpoint
    from wss_ray.cli import main
    from wss_ray.separate import Separator

    src = pipeline_out / "checkpoints" / "finetune-c-h-aml-atl" / "checkpoint"
    out = export_model(src, tmp_path / "default")
    payload, meta = load_checkpoint(out)
    assert sorted(payload["models"]) == ["separator", "transcriptor"] and payload["optim"] == {}
    assert all(v.dtype == torch.float16 for m in payload["models"].values() for v in m["state"].values()
               if v.is_floating_point())
    assert meta["exported"]["from"] == str(src.resolve()) and meta["parents"] == read_meta(src)["parents"]
    assert (out / "model.pt").stat().st_size < 0.6 * (src / "model.pt").stat().st_size
    mix = torch.randn(2, 16000) * 0.1
    full, half = Separator.from_checkpoint(src).separate_batch(mix), Separator.from_checkpoint(out).separate_batch(mix)
    assert (full - half).abs().max() < 1e-2 * full.abs().max()
    # `separate` without --checkpoint takes the shipped model ($WSS_RAY_MODEL points at this one)
    monkeypatch.setenv("WSS_RAY_MODEL", str(out))
    sf.write(tmp_path / "song.wav", np.asarray(mix[0]), 16000)
    assert main(["separate", str(tmp_path / "song.wav"), "--out", str(tmp_path / "sep")]) == 0
    assert sorted(p.name for p in (tmp_path / "sep" / "song").iterdir()) == [
        "bass.wav", "guitar.wav", "piano.wav", "residual.wav"]
    monkeypatch.setenv("WSS_RAY_MODEL", str(tmp_path / "nowhere"))
    assert main(["separate", str(tmp_path / "song.wav"), "--out", str(tmp_path / "sep2")]) == 2


def test_separate_refuses_what_would_come_out_wrong(pipeline_out, tmp_path):
    import numpy as np
    import soundfile as sf

    from wss_ray.cli import main
    from wss_ray.separate import Separator

    ck = str(pipeline_out / "checkpoints" / "finetune-c-h-aml-atl" / "checkpoint")
    x = (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32)
    x[8000] = np.inf
    sf.write(tmp_path / "inf.wav", x, 16000, subtype="FLOAT")
    out = tmp_path / "out"
    assert main(["separate", str(tmp_path / "inf.wav"), "--checkpoint", ck, "--out", str(out)]) == 2
    assert not out.exists()                       # nothing left behind, not even an empty folder
    sep = Separator.from_checkpoint(ck)
    with pytest.raises(ValueError, match=r"non-finite sample \(NaN or Inf\) at 0.500 s"):
        sep.separate(x, 16000)
    with pytest.raises(ValueError, match="mono"):
        sep.transcribe(np.zeros((2, 16000), np.float32), 16000)
    # two inputs that would share one output folder
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    x[8000] = 0
    sf.write(tmp_path / "a" / "song.wav", x, 16000)
    sf.write(tmp_path / "b" / "song.flac", x, 16000)
    assert main(["separate", str(tmp_path / "a" / "song.wav"), str(tmp_path / "b" / "song.flac"),
                 "--checkpoint", ck, "--out", str(out)]) == 2
    assert main(["separate", str(tmp_path / "a"), "--checkpoint", ck, "--out", str(out)]) == 2
    assert not out.exists()


def test_evaluate_refuses_nan_scores_and_non_tune_json(pipeline_out, features, tmp_path):
    import torch

    from wss_ray.checkpoint import load_checkpoint, save_checkpoint
    from wss_ray.cli import main
    from wss_ray.models import MaskSeparator

    ck = pipeline_out / "checkpoints" / "separator-c-h" / "checkpoint"
    (tmp_path / "any.json").write_text('{"hello": 1}')
    out = tmp_path / "res"
    assert main(["evaluate", str(tmp_path / "any.json"), "--data", str(features), "--out", str(out)]) == 2
    # a diverged model: one NaN weight makes every estimate NaN; no average is printed around it
    payload, meta = load_checkpoint(ck)
    sep = MaskSeparator(**payload["models"]["separator"]["kwargs"])
    sep.load_state_dict(payload["models"]["separator"]["state"])
    with torch.no_grad():
        sep.out.bias[0] = float("nan")
    sep.init_kwargs = payload["models"]["separator"]["kwargs"]
    save_checkpoint(tmp_path / "nan", {"separator": sep}, meta)
    assert main(["evaluate", str(tmp_path / "nan"), "--data", str(features), "--out", str(out),
                 "--examples", "2"]) == 2
    assert not out.exists()


def test_bad_arguments_are_refused_before_anything_starts(tmp_path, capsys):
    from wss_ray.cli import main

    for argv in (["separate", "x.wav", "--chunk-seconds", "nan"], ["separate", "x.wav", "--chunk-seconds", "inf"],
                 ["separate", "x.wav", "--chunk-seconds", "1e8"], ["data", "featurize", "--slakh", str(tmp_path),
                                                                   "--out", str(tmp_path / "f"), "--workers", "-2"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("--chunk-seconds" in err or "--workers" in err)
    assert not (tmp_path / "f").exists()
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "song.wav", np.zeros(1600, np.float32), 16000)
    (tmp_path / "afile").write_text("x")
    for argv in (["separate", str(tmp_path / "song.wav"), "--checkpoint", str(tmp_path), "--out", str(tmp_path / "afile")],
                 ["evaluate", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "afile")],
                 ["data", "featurize", "--slakh", str(tmp_path), "--out", str(tmp_path / "afile")],
                 ["separate", str(tmp_path / ("x" * 300 + ".wav")), "--checkpoint", str(tmp_path), "--out", "o"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("afile" in err or "xxxx" in err), err
