"""Training paths a GPU takes, checked on the CPU: frozen critics in a mode cuDNN's RNN
backward accepts, the plain (Ray-free) loop every stage runs through, and random-offset
training windows (in the plain loop and through Ray Data)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from wss_ray.checkpoint import load_checkpoint, read_meta
from wss_ray.data.contract import to_tensors
from wss_ray.data import dataset as dataset_mod
from wss_ray.data.dataset import load_manifest, random_windows, weak_dataset
from wss_ray.models import MaskSeparator, Transcriptor
from wss_ray.stages.base import StepContext, cpu_precision, freeze, outside_graph
from wss_ray.stages.runner import train_local

STAGES = [("transcriptor", None), ("classifier", None), ("supervised", None), ("separator", "transcriptor"),
          ("baseline", "classifier"), ("finetune", "separator")]


@pytest.fixture
def cudnn_rule():
    """cuDNN's rule, enforced on the CPU: an RNN whose input needs a gradient must be in
    training mode ("cudnn RNN backward can only be called in training mode")."""

    def hook(module, args):
        if isinstance(module, nn.RNNBase) and torch.is_grad_enabled() and not module.training \
                and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            raise RuntimeError("cudnn RNN backward can only be called in training mode")

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    yield
    handle.remove()


def test_every_stage_trains_in_the_plain_loop_under_the_cudnn_rule(features, small_cfg, tmp_path, cudnn_rule,
                                                                       benchmark):
    import copy

    cfg = copy.deepcopy(small_cfg)
    for s in cfg.stages.values():
        s.steps, s.checkpoint_every, s.batch_size = 2, 1, 4   # a validation between the two steps
    ckpt = {}
    for stage, parent in STAGES:
        lines = []
        ckpt[stage] = train_local(stage, cfg, features, tmp_path / stage, parent=ckpt.get(parent),
                                  log=lines.append)
        meta = read_meta(ckpt[stage])
        assert meta["step"] == 2 and meta["stage"] == stage and meta["trained_by"] == "train_local"
        assert meta["precision"] == cpu_precision(cfg.ray.cpu_precision)
        assert meta["parents"] == ([str(ckpt[parent].resolve())] if parent else [])
        assert np.isfinite(meta["metrics"]["loss"])
    # the GPU check's step timer sets modes as the runner does (a frozen critic in eval mode
    # would break on CUDA)
    gpu_check = benchmark("gpu_check")
    from wss_ray.data.dataset import load_split

    for stage, parent in (("separator", "transcriptor"), ("baseline", "classifier")):
        row = gpu_check.step_speed(stage, cfg, load_manifest(features), load_split(features, "train"), ckpt[parent],
                                   torch.device("cpu"), steps=2, warmup=1)
        assert row["windows_per_s"] > 0
    # a frozen critic is never stepped: the separator stage hands its parent's transcriptor on as is
    before = load_checkpoint(ckpt["transcriptor"])[0]["models"]["transcriptor"]["state"]
    after = load_checkpoint(ckpt["separator"])[0]["models"]["transcriptor"]["state"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_loop_reads_loss_terms_only_when_it_logs_or_checkpoints():
    """A step's terms stay on the device (reading one is a host sync, the GPU's idle time):
    the loop turns them into numbers only at log and checkpoint steps."""
    from types import SimpleNamespace

    from wss_ray.stages.runner import fit

    class Term:   # a loss term that counts how often it is read as a number
        reads = 0

        def __float__(self):
            Term.reads += 1
            return 0.5

    class Recipe:
        name = "counting"

        def update(self, batch, models, opts, ctx, step):
            return {"loss": Term()}

    stage = SimpleNamespace(steps=20, checkpoint_every=10, lr_schedule="constant", val_batches=0)
    ctx = SimpleNamespace(stage=stage, device=torch.device("cpu"))
    saved, lines = [], []
    fit(Recipe(), ctx, {}, {}, train_batches=lambda epoch: [{"x": torch.zeros(1)}] * 20, val_batches=lambda: [],
        on_checkpoint=lambda step, m: saved.append((step, m)), log=lines.append)
    assert Term.reads == 10                        # logged every 2 steps (checkpoints fall on logged steps)
    assert [st for st, _ in saved] == [10, 20] and all(isinstance(m["loss"], float) for _, m in saved)
    assert len(lines) == 10 and "loss=0.5000" in lines[-1]


def test_frozen_critic_is_deterministic_and_differentiable_through():
    t = Transcriptor(16000, 1024, 3, 21, 108, channels=4, hidden=16, dropout=0.5)
    t.trunk.rnn = nn.GRU(16, 16, num_layers=2, batch_first=True, bidirectional=True, dropout=0.5)
    freeze(t)
    rnns = [m for m in t.modules() if isinstance(m, nn.RNNBase)]
    assert rnns and all(m.training and m.dropout == 0 for m in rnns)
    assert not any(m.training for m in t.modules() if isinstance(m, (nn.Dropout, nn.BatchNorm1d, nn.BatchNorm2d)))
    assert not any(p.requires_grad for p in t.parameters())
    x = torch.rand(2, 513, 20, requires_grad=True)
    a, b = t(x)["roll"], t(x)["roll"]
    assert torch.equal(a, b)
    a.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def _track_truth(features, split, track, manifest):
    """The track's whole audio and roll, stitched from its grid chunks independently of the
    code under test: chunk c covers samples c*L.., its frames 0..N-2 then the closing frame."""
    tab = pq.read_table(features / split / "features" / f"{track}.parquet").sort_by("chunk")
    b = to_tensors(tab, manifest)
    audio = b["mix"].reshape(-1).numpy()
    roll = torch.cat([b["roll"][i, ..., :-1] for i in range(len(b["roll"]))] + [b["roll"][-1, ..., -1:]], -1)
    return audio, roll.numpy()


def test_random_windows_slice_audio_and_roll_on_one_grid(features):
    m = load_manifest(features)
    L, hop, N = m["chunk_samples"], m["hop"], m["n_frames"]
    table = pa.concat_tables([pq.read_table(p) for p in sorted((features / "train" / "features").glob("*.parquet"))])
    win = random_windows(table, m, np.random.default_rng(0))
    assert win.schema == table.schema and win.num_rows == table.num_rows
    starts = win.column("start").to_numpy()
    assert (starts % L != 0).mean() > 0.5 and (starts % hop == 0).all()
    b = to_tensors(win, m)
    truth = {}
    for i, (track, start) in enumerate(zip(win.column("track").to_pylist(), starts)):
        if track not in truth:
            truth[track] = _track_truth(features, "train", track, m)
        audio, roll = truth[track]
        np.testing.assert_array_equal(b["mix"][i].numpy(), audio[start:start + L])
        np.testing.assert_array_equal(b["roll"][i].numpy(), roll[..., start // hop:start // hop + N])
        assert b["active"][i].tolist() == (roll[..., start // hop:start // hop + N].max(axis=(1, 2)) > 0).tolist()
    # a track's last chunk has no successor: it stays on the grid
    last = {t: max(c for tt, c in zip(table.column("track").to_pylist(), table.column("chunk").to_pylist()) if tt == t)
            for t in truth}
    for track, chunk, start in zip(win.column("track").to_pylist(), win.column("chunk").to_pylist(), starts):
        if chunk == last[track]:
            assert start == chunk * L


def test_ray_training_reader_draws_windows_and_validation_does_not(features, ray_local):
    m = load_manifest(features)
    L = m["chunk_samples"]
    rows = weak_dataset(features, "train", repeat=2, seed=1, windows=True).take_all()
    starts = np.array([r["start"] for r in rows])
    assert (starts % L != 0).mean() > 0.5
    row = rows[int(np.argmax(starts % L))]
    audio, _ = _track_truth(features, "train", row["track"], m)
    np.testing.assert_array_equal(np.asarray(row["mix"]), audio[row["start"]:row["start"] + L])
    val = weak_dataset(features, "validation").take_all()
    assert all(r["start"] % L == 0 for r in val)
    # the copies of a chunk are spread over the stream, not served back to back; a stream of
    # more copies with the same seed replays the copies drawn for the shorter one (a pipeline's
    # stages differ only in how many they need) and draws only the rest
    from wss_ray.data import dataset as held

    before = set(held._held)
    stream = weak_dataset(features, "train", repeat=8, seed=1, windows=True).take_all()
    assert len(set(held._held) - before) == 6
    drawn = {(r["track"], r["chunk"], r["start"]) for r in stream}
    assert {(r["track"], r["chunk"], r["start"]) for r in rows} <= drawn
    tracks = [r["track"] for r in stream]
    assert len(tracks) == 8 * len(rows) // 2
    runs, n = [], 1
    for a, b in zip(tracks, tracks[1:]):
        if a == b:
            n += 1
        else:
            runs.append(n)
            n = 1
    per_track = max(r["chunk"] for r in stream) + 1
    # a run is one track's block; the 8 copies of a track served together would make runs of 8 blocks
    assert np.median(runs + [n]) <= 2 * per_track, (np.median(runs), per_track)


def test_broken_checkpoints_are_named_not_traced(tmp_path, capsys):
    import json

    import soundfile as sf

    from wss_ray.checkpoint import make_model, save_checkpoint
    from wss_ray.cli import main

    sep = make_model("MaskSeparator", {"n_bins": 513, "n_sources": 3, "hidden": 8, "layers": 1})
    meta = {"stage": "separator", "variant": "c+h", "instruments": ["piano", "guitar", "bass"],
            "signal": {"sample_rate": 16000, "n_fft": 1024, "hop": 256, "pitch_min": 21, "pitch_max": 108}}
    good = save_checkpoint(tmp_path / "good", {"separator": sep}, meta)
    sf.write(tmp_path / "song.wav", np.zeros(8000, np.float32), 16000)

    def run(ck) -> str:
        code = main(["separate", str(tmp_path / "song.wav"), "--checkpoint", str(ck), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    assert main(["separate", str(tmp_path / "song.wav"), "--checkpoint", str(good), "--out", str(tmp_path / "o")]) == 0
    import shutil

    for name, damage, words in (
            ("text", lambda d: (d / "model.pt").write_text("not a model"), "model.pt: not a readable"),
            ("truncated", lambda d: (d / "model.pt").write_bytes((good / "model.pt").read_bytes()[:300]),
             "model.pt: not a readable"),
            ("badjson", lambda d: (d / "meta.json").write_text("{nope"), "meta.json: not valid JSON"),
            ("noconfig", lambda d: (d / "meta.json").write_text(json.dumps({"stage": "separator"})),
             "meta.json lacks the signal settings")):
        ck = tmp_path / name
        shutil.copytree(good, ck)
        damage(ck)
        assert words in run(ck)
    # a stage's output folder instead of its checkpoint: the error points one level down
    shutil.copytree(good, tmp_path / "stage" / "checkpoint")
    assert f"its stage checkpoint is {tmp_path / 'stage' / 'checkpoint'}" in run(tmp_path / "stage")


def test_training_refuses_a_config_that_disagrees_with_the_features(features, small_cfg, tmp_path):
    import copy

    from wss_ray.config import ConfigError

    cfg = copy.deepcopy(small_cfg)
    cfg.data.sample_rate = 22050
    made_with = small_cfg.data.sample_rate   # what the features fixture was made with
    assert made_with != 22050
    with pytest.raises(ConfigError, match=f"data.sample_rate: the config says 22050, the features .* {made_with}"):
        train_local("transcriptor", cfg, features, tmp_path / "t")


def test_cpu_bf16_runs_convolutions_in_bf16_and_recurrences_in_fp32(small_cfg):
    import copy

    seen = []
    sep = MaskSeparator(513, 3, hidden=16, layers=1)
    t = Transcriptor(16000, 1024, 3, 21, 108, channels=4, hidden=16)
    for rnn in (sep.blstm, t.trunk.rnn):
        rnn.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    convs = []
    t.trunk.conv[0].register_forward_hook(lambda m, args, out: convs.append(out.dtype))
    mag = torch.rand(2, 513, 20)
    ref_s, ref_t = sep(mag), t(mag)["roll"]
    cfg = copy.deepcopy(small_cfg)
    manifest = {"n_fft": 1024, "hop": 256}
    for setting, want in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        cfg.ray.cpu_precision = setting
        ctx = StepContext(cfg, cfg.stages["separator"], manifest, torch.device("cpu"))
        assert ctx.precision == setting
        seen.clear(), convs.clear()
        with ctx.autocast():
            out_s, out_t = sep(mag), t(mag)["roll"]
        assert convs == [want]
        assert seen == [torch.float32, torch.float32]          # recurrences never in bf16
        convs.clear()
        with ctx.autocast(validating=True):                     # validation: fp32 on any CPU
            t(mag)
        assert convs == [torch.float32]
        # bf16 changes the numbers by rounding only
        torch.testing.assert_close(out_s.float(), ref_s, atol=0.02, rtol=0)
        torch.testing.assert_close(out_t.float(), ref_t, atol=0.1, rtol=0.05)
    assert cpu_precision("auto") in ("bf16", "fp32") and cpu_precision("fp32") == "fp32"


def test_a_critic_outside_the_graph_passes_gradients_to_its_input_only():
    t = Transcriptor(16000, 1024, 3, 21, 108, channels=4, hidden=16)
    mag = torch.rand(2, 513, 12, requires_grad=True)
    t(mag)["roll"].sum().backward()
    want = mag.grad.clone()
    t.zero_grad(set_to_none=True)
    mag.grad = None
    with outside_graph(t) as critic:
        out = critic(mag)["roll"].sum()
    assert all(p.requires_grad for p in t.parameters())     # restored for the critic's own update
    out.backward()
    assert all(p.grad is None for p in t.parameters())
    torch.testing.assert_close(mag.grad, want)


def _one_step_separator(features, small_cfg, tmp_path):
    """A config of one-step stages and a separator checkpoint trained with it (on a
    one-step transcriptor): parents for fine-tuning's unit checks."""
    import copy

    cfg = copy.deepcopy(small_cfg)
    for s in cfg.stages.values():
        s.steps, s.checkpoint_every, s.batch_size = 1, 1, 2
    t = train_local("transcriptor", cfg, features, tmp_path / "t", log=None)
    return cfg, train_local("separator", cfg, features, tmp_path / "s", parent=str(t), log=None)


def test_finetune_separator_update_computes_no_transcriptor_weight_gradient(features, small_cfg, tmp_path):
    from wss_ray.data.dataset import iter_local
    from wss_ray.stages import RECIPES

    cfg, sep = _one_step_separator(features, small_cfg, tmp_path)
    recipe = RECIPES["finetune"]
    ctx = StepContext(cfg, cfg.stages["finetune"], load_manifest(features), torch.device("cpu"),
                      load_checkpoint(sep)[0])
    models = recipe.build(ctx)
    batch = next(iter_local(features, "train", 2))
    terms, _ = recipe.s_losses(batch, models, ctx)
    terms["loss"].backward()
    assert all(p.grad is None for p in models["transcriptor"].parameters())
    assert all(p.requires_grad for p in models["transcriptor"].parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models["separator"].parameters())


def test_finetune_transcriptor_learns_from_separations_only_as_configured(features, small_cfg, tmp_path):
    """lambda_sep weighs T's cooperative term on separated sources (no ATL); at 0, T's update
    reads real mixtures only (the paper's step 3). ATL judges the separations whatever it is."""
    from wss_ray.data.dataset import iter_local
    from wss_ray.losses import transcription_loss
    from wss_ray.stages import RECIPES

    cfg, sep = _one_step_separator(features, small_cfg, tmp_path)
    recipe = RECIPES["finetune"]
    batch = next(iter_local(features, "train", 2))

    def t_terms(**settings):
        stage = cfg.stages["finetune"].model_copy(update=settings)
        ctx = StepContext(cfg, stage, load_manifest(features), torch.device("cpu"), load_checkpoint(sep)[0])
        models = recipe.build(ctx)
        with torch.no_grad():
            out = ctx.separate(models["separator"], batch)
            terms = recipe.t_losses(batch, models, ctx, out.spec)
            own = transcription_loss(models["transcriptor"](out.mix_mag), batch["roll"], stage.pos_weight)
        return terms, own

    terms, own = t_terms(adversarial=[], lambda_sep=0.0)
    assert "t_sep" not in terms
    assert torch.allclose(terms["loss"], cfg.stages["finetune"].lambda_t * own)
    terms, own = t_terms(adversarial=[], lambda_sep=0.5)
    assert torch.allclose(terms["loss"], cfg.stages["finetune"].lambda_t * own + 0.5 * terms["t_sep"])
    # ATL is weighed by lambda_adv whatever lambda_sep says
    terms, own = t_terms(adversarial=["atl"], lambda_sep=0.0, lambda_adv=0.3)
    assert torch.allclose(terms["loss"], cfg.stages["finetune"].lambda_t * own + 0.3 * terms["t_sep"])
    # AML with and without the separations beside it in T's batch: the same recomposition term
    terms0, _ = t_terms(adversarial=["aml"], lambda_sep=0.0)
    terms1, _ = t_terms(adversarial=["aml"], lambda_sep=1.0)
    assert "t_sep" not in terms0 and "t_sep" in terms1
    assert torch.allclose(terms0["t_real"], terms1["t_real"], atol=1e-6)


def test_stages_of_a_pipeline_reuse_the_splits_read_before(features, ray_local, tmp_path):
    import os
    import shutil

    def rows(ds):
        return sorted((r["track"], r["chunk"], r["start"]) for r in ds.take_all())

    a = weak_dataset(features, "train", repeat=3, seed=5, windows=True)
    held = len(dataset_mod._held)
    assert held >= 1
    b = weak_dataset(features, "train", repeat=3, seed=5, windows=True)
    assert len(dataset_mod._held) == held and rows(a) == rows(b)      # read and drawn once
    weak_dataset(features, "train", repeat=3, seed=6, windows=True)
    assert len(dataset_mod._held) == held + 3                        # other seed: other windows, one per copy
    val = weak_dataset(features, "validation")
    assert weak_dataset(features, "validation") is val
    # a rewritten shard is read again
    copy = tmp_path / "features"
    shutil.copytree(features, copy)
    first = weak_dataset(copy, "validation")
    shard = sorted((copy / "validation" / "features").glob("*.parquet"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert weak_dataset(copy, "validation") is not first
    assert rows(weak_dataset(copy, "validation")) == rows(val)


def test_weight_averages_are_what_validation_scores_and_a_resume_continues():
    """stages.<stage>.ema: after every step the average moves (1 - ema) of the way to the
    trained weights (the first step copies them); validation reads the average, not the
    trained weights; a resumed average continues from the checkpoint's instead of restarting."""
    from types import SimpleNamespace

    from wss_ray.stages.averaging import WeightAverages
    from wss_ray.stages.runner import fit

    class Recipe:
        name = "averaged"

        def update(self, batch, models, opts, ctx, step):
            with torch.no_grad():
                models["m"].weight.add_(1.0)   # trained weight after step n: n
            return {"loss": torch.tensor(0.0)}

        def validate(self, batch, models, ctx):
            return {"val_w": float(models["m"].weight)}

    def run(averages, models, steps, start=0):
        stage = SimpleNamespace(steps=steps, checkpoint_every=1, lr_schedule="constant", val_batches=1)
        ctx = SimpleNamespace(stage=stage, device=torch.device("cpu"))
        seen = []
        fit(Recipe(), ctx, models, {}, train_batches=lambda epoch: [{"x": torch.zeros(1)}] * steps,
            val_batches=lambda: [{"x": torch.zeros(1)}], on_checkpoint=lambda step, m: seen.append(m["val_w"]),
            start_step=start, averages=averages)
        return seen

    def model():
        m = nn.Linear(1, 1, bias=False)
        m.weight.data.zero_()
        return {"m": m}

    models = model()
    averages = WeightAverages(models, ("m",), decay=0.5)
    expected, avg = [], None
    for n in range(1, 5):
        avg = float(n) if avg is None else 0.5 * avg + 0.5 * n
        expected.append(avg)
    assert run(averages, models, 4) == pytest.approx(expected)         # 1, 1.5, 2.25, 3.125
    assert float(models["m"].weight) == 4.0                            # training itself untouched
    assert float(averages.held(models)["m"].weight) == pytest.approx(3.125)
    assert averages.trained(models) == {"m": models["m"]}

    # resumed at step 4 from the checkpoint's average: step 5 lerps from it, no fresh copy
    state = {"m": {"state": averages.held(models)["m"].state_dict()}}
    fresh = model()
    fresh["m"].weight.data.fill_(4.0)
    resumed = WeightAverages(fresh, ("m",), decay=0.5)
    resumed.load(state, step=4)
    assert run(resumed, fresh, 5, start=4) == pytest.approx([0.5 * 3.125 + 0.5 * 5])

    # ema 0: nothing is averaged, validation reads the trained weights
    plain = model()
    assert run(WeightAverages(plain, ("m",), decay=0.0), plain, 2) == [1.0, 2.0]


def test_an_averaged_stage_checkpoint_serves_the_average_and_keeps_the_trained_weights(features, small_cfg,
                                                                                    tmp_path):
    """The checkpoint's models (what a child stage, evaluate and separate read) are the average;
    the trained weights ride along for a resume only, and export leaves them behind."""
    import copy

    from wss_ray.checkpoint import export_model

    cfg = copy.deepcopy(small_cfg)
    s = cfg.stages["supervised"]
    s.steps, s.checkpoint_every, s.batch_size = 3, 3, 2
    plain = load_checkpoint(train_local("supervised", cfg, features, tmp_path / "plain", log=None))[0]
    s.ema = 0.5
    ckpt = train_local("supervised", cfg, features, tmp_path / "sup", log=None)
    payload, meta = load_checkpoint(ckpt)
    held, trained = payload["models"]["separator"]["state"], payload["trained"]["separator"]["state"]
    # the same seeded run without averaging ends at the trained weights; the average is elsewhere
    same = plain["models"]["separator"]["state"]
    assert "trained" not in plain and held.keys() == trained.keys() == same.keys()
    assert all(torch.equal(trained[k], same[k]) for k in same)
    assert any(v.is_floating_point() and not torch.equal(held[k], trained[k]) for k, v in held.items())
    assert meta["config"]["stages"]["supervised"]["ema"] == 0.5
    exported = torch.load(export_model(ckpt, tmp_path / "exported") / "model.pt", weights_only=True)
    assert all(torch.equal(v.half() if v.is_floating_point() else v, exported["models"]["separator"]["state"][k])
               for k, v in held.items())


@pytest.mark.parametrize("carry", [False, True])
def test_finetune_separator_optimizer_continues_the_parents_only_when_asked(features, small_cfg, tmp_path, carry):
    """stages.finetune.continue_optimizer: the separator's AdamW starts from the parent
    checkpoint's moment estimates, at the fine-tuning stage's own lr; otherwise cold."""
    import copy

    from wss_ray.stages import RECIPES

    cfg, sep = _one_step_separator(features, small_cfg, tmp_path)
    cfg.stages["finetune"].continue_optimizer = carry
    cfg.stages["finetune"].lr = 1.234e-4
    parent = load_checkpoint(sep)[0]
    saved = copy.deepcopy(parent["optim"]["separator"]["state"])   # load_state_dict shares the tensors
    ctx = StepContext(cfg, cfg.stages["finetune"], load_manifest(features), torch.device("cpu"), parent)
    recipe = RECIPES["finetune"]
    models = recipe.build(ctx)
    opt = recipe.optimizers(models, ctx)["separator"]
    assert [g["lr"] for g in opt.param_groups] == [1.234e-4] and "initial_lr" not in opt.param_groups[0]
    if carry:
        assert opt.state_dict()["state"].keys() == saved.keys() and saved
        assert all(torch.equal(opt.state_dict()["state"][i]["exp_avg_sq"], saved[i]["exp_avg_sq"]) for i in saved)
    else:
        assert not opt.state


def test_continuing_the_optimizer_refuses_a_parent_without_one(features, small_cfg, tmp_path):
    """An exported separator keeps its stage but not its optimizer: asked to continue it, the
    stage is refused before training, naming the checkpoint."""
    from wss_ray.checkpoint import CheckpointError, export_model

    cfg, sep = _one_step_separator(features, small_cfg, tmp_path)
    exported = export_model(sep, tmp_path / "exported")
    cfg.stages["finetune"].continue_optimizer = True
    with pytest.raises(CheckpointError, match=f"{exported}.*no separator optimizer state"):
        train_local("finetune", cfg, features, tmp_path / "ft", parent=str(exported), log=None)
    cfg.stages["finetune"].steps = 1
    assert train_local("finetune", cfg, features, tmp_path / "ft", parent=str(sep), log=None).is_dir()


def _origins(batch: dict, out: dict) -> dict:
    """(i, j) -> (w, g) for each audible source j of augmented window i: it is g times source j
    of window w of ``batch`` (asserted: exactly one window fits)."""
    stems, new = batch["stems"], out["stems"]
    found = {}
    for i in range(new.shape[0]):
        for j in range(new.shape[1]):
            if new[i, j].abs().amax() == 0:
                continue   # a silent source: any window's silence would do
            fits = []
            for w in range(stems.shape[0]):
                ref = stems[w, j]
                if ref.abs().amax() > 0:
                    g = float((new[i, j] * ref).sum() / (ref * ref).sum())
                    if torch.allclose(new[i, j], g * ref, atol=1e-6):
                        fits.append((w, g))
            assert len(fits) == 1, (i, j, fits)
            found[i, j] = fits[0]
    return found


def test_supervised_augmentation_draws_each_source_from_another_window_scaled_and_sums_them(features, small_cfg,
                                                                                           tmp_path, monkeypatch):
    """stages.supervised.gain_min/gain_max/remix, Open-Unmix's training augmentation, on real
    windows: each audible source of a new window is one window's source scaled by its own gain in
    the range, each source column draws on its own permutation of the batch, its roll and
    activity follow it, the new mixture is the new sources plus its window's residual; training
    steps augment, validation never does."""
    import copy

    from wss_ray.config import ConfigError, load_config
    from wss_ray.data.dataset import load_split
    from wss_ray.stages import supervised as sup_mod

    m = load_manifest(features)
    batch = to_tensors(load_split(features, "train", with_stems=True).slice(0, 8), m)
    assert sup_mod.augment(batch, small_cfg.stages["supervised"]) is batch   # the default: the windows as read
    s = copy.deepcopy(small_cfg.stages["supervised"])
    s.gain_min, s.gain_max = 0.25, 1.25
    for remix in (False, True):
        s.remix = remix
        torch.manual_seed(0)
        out = sup_mod.augment(batch, s)
        torch.testing.assert_close(out["mix"], batch["mix"] - batch["stems"].sum(1) + out["stems"].sum(1))
        found = _origins(batch, out)
        assert all(0.25 <= g <= 1.25 for _, g in found.values())
        by_window = {}
        for (i, j), (w, g) in found.items():
            assert torch.equal(out["roll"][i, j], batch["roll"][w, j]) and out["active"][i, j] == batch["active"][w, j]
            by_window.setdefault(i, []).append((w, g))
        # a gain per source, not one per window
        assert any(len({round(g, 4) for _, g in v}) > 1 for v in by_window.values())
        if not remix:
            assert all(w == i for (i, _), (w, _) in found.items())
            continue
        for j in range(batch["stems"].shape[1]):   # a permutation: no window's source used twice
            column = [w for (i, jj), (w, _) in found.items() if jj == j]
            assert len(set(column)) == len(column)
        assert any(w != i for (i, _), (w, _) in found.items())
        # each source its own permutation: some new window mixes sources of different windows
        assert any(len({w for w, _ in v}) > 1 for v in by_window.values())
    with pytest.raises(ConfigError, match="stages.supervised.gain_min"):
        load_config(None, ["stages.supervised.gain_max=0.5"])
    # training steps augment, validation reads the windows as read: the plain loop, two steps
    calls = []
    real = sup_mod.augment
    monkeypatch.setattr(sup_mod, "augment", lambda b, st: calls.append(1) or real(b, st))
    cfg = copy.deepcopy(small_cfg)
    sup = cfg.stages["supervised"]
    sup.steps, sup.checkpoint_every, sup.batch_size = 2, 2, 4
    sup.gain_min, sup.gain_max, sup.remix = 0.25, 1.25, True
    meta = read_meta(train_local("supervised", cfg, features, tmp_path / "sup", log=None))
    assert len(calls) == 2 and meta["config"]["stages"]["supervised"]["remix"] is True
    assert np.isfinite(meta["metrics"]["loss"]) and np.isfinite(meta["metrics"]["val_si_sdr"])


def test_supervised_snr_loss_is_what_the_stage_fits_in_training_and_validation(features, small_cfg, tmp_path,
                                                                               monkeypatch):
    """stages.supervised.loss=snr: the plain loop's training steps and validation both score the
    waveforms with losses.supervised_snr_loss and no spectral loss; an unknown loss is refused
    naming the field."""
    import copy

    from wss_ray.config import ConfigError, load_config
    from wss_ray.stages import supervised as sup_mod

    cfg = copy.deepcopy(small_cfg)
    sup = cfg.stages["supervised"]
    sup.steps, sup.checkpoint_every, sup.batch_size = 2, 2, 4
    used = []
    for name in ("supervised_snr_loss", "supervised_loss", "supervised_spectrum_loss"):
        fn = getattr(sup_mod, name)
        monkeypatch.setattr(sup_mod, name, lambda *a, _f=fn, _n=name: used.append(_n) or _f(*a))
    sup.loss = "snr"
    meta = read_meta(train_local("supervised", cfg, features, tmp_path / "snr", log=None))
    assert set(used) == {"supervised_snr_loss"} and len(used) > 2
    assert meta["config"]["stages"]["supervised"]["loss"] == "snr" and np.isfinite(meta["metrics"]["loss"])
    with pytest.raises(ConfigError, match="stages.supervised.loss"):
        load_config(None, ["stages.supervised.loss=sisdr"])
