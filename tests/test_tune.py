"""Ray Tune sweeps: space validation, a real 2-trial sweep whose best checkpoint feeds the next
stage, and an interrupted sweep that resumes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wss_ray.config import ConfigError
from wss_ray.tune import load_space

ROOT = Path(__file__).parent.parent
SPACE = """stage: separator
params:
  masks: {grid: [[c], [c, h]]}
  lambda_tr: {uniform: [0.5, 2.0]}
"""


@pytest.mark.parametrize("stage", ["transcriptor", "separator", "finetune", "baseline"])
def test_shipped_spaces_validate(stage, small_cfg):
    space = load_space(ROOT / "tune_spaces" / f"{stage}.yaml", stage, small_cfg)
    assert space.n_trials >= 3 and space.dims


@pytest.mark.parametrize("body, needle", [
    ("params: {lambda_tr: {uniform: [2, 1]}}", "low 2 must be below high 1"),
    ("params: {lambda_tr: {gaussian: [0, 1]}}", "unknown sampler 'gaussian'"),
    ("params: {lamda_tr: {uniform: [0, 1]}}", "'lamda_tr' is not a setting"),
    ("params: {beta: {uniform: [0, 1]}}", "'beta' is not a setting that acts on stage 'separator'"),
    ("params: {masks: {grid: [[c], [x]]}}", "params.masks: value ['x'] is invalid"),
    ("params: {lr: {loguniform: [0, 1]}}", "low must be > 0"),
    ("params: {steps: {choice: [1, 2]}}", "not a setting that acts"),
    ("params: {models.transcriptor.hidden: {choice: [8]}}", "does not act on stage 'separator'"),
    ("stage: finetune\nparams: {lr: {uniform: [0.1, 1]}}", "this space is for 'finetune'"),
    ("sampels: 2\nparams: {lr: {uniform: [0.1, 1]}}", "unknown key(s) ['sampels']"),
    ("params: {}", "at least one entry"),
])
def test_bad_spaces_name_file_and_key(tmp_path, small_cfg, body, needle):
    p = tmp_path / "space.yaml"
    p.write_text(body)
    with pytest.raises(ConfigError) as e:
        load_space(p, "separator", small_cfg)
    assert needle in str(e.value) and str(p) in str(e.value)


@pytest.fixture(scope="module")
def transcriptor_ckpt(pipeline_out):
    # the session's smoke pipeline already trained one (conftest); a sweep only reads its parent
    path = pipeline_out / "checkpoints" / "transcriptor" / "checkpoint"
    assert (path / "meta.json").is_file()
    return path


def test_sweep_picks_best_and_hands_off(tmp_path, features, small_cfg, transcriptor_ckpt):
    from wss_ray.checkpoint import read_meta
    from wss_ray.stages.runner import train_stage
    from wss_ray.tune import run_sweep

    (tmp_path / "space.yaml").write_text(SPACE)
    space = load_space(tmp_path / "space.yaml", "separator", small_cfg)
    record = run_sweep("separator", small_cfg, space, features, parent=str(transcriptor_ckpt),
                       storage=str(tmp_path / "tune"), name="sweep")
    exp = tmp_path / "tune" / "sweep"
    on_disk = json.loads((exp / "best.json").read_text())
    assert on_disk["checkpoint"] == record["checkpoint"] and len(on_disk["trials"]) == 2
    assert {tuple(t["params"]["stages.separator.masks"]) for t in on_disk["trials"]} == {("c",), ("c", "h")}
    finished = [t for t in on_disk["trials"] if t["val_score"] is not None]
    full = [t for t in finished if t["step"] == small_cfg.stages["separator"].steps]
    assert record["value"] == min(t["val_score"] for t in full)
    meta = read_meta(record["checkpoint"])
    assert meta["stage"] == "separator" and meta["tune"]["trial"] == record["trial"]
    assert meta["config"]["stages"]["separator"]["masks"] == record["params"]["stages.separator.masks"]
    # trial logs readable by TensorBoard
    assert list(exp.glob("*/tensorboard/events.out.tfevents.*"))
    # stage 3 starts from the best trial, given the experiment folder
    cfg = small_cfg
    ft = train_stage("finetune", cfg, features, out=tmp_path / "ft", parent=str(exp))
    assert read_meta(ft)["parents"] == [str(Path(record["checkpoint"]).resolve())]


PROBE = """
import ray
from wss_ray.ray_session import ensure_ray

ensure_ray()

@ray.remote
class Alive:
    def ping(self):
        return 1

@ray.remote
def state_of(actor_id):
    from ray.util.state import get_actor
    return get_actor(actor_id, timeout=30).state

a = Alive.remote()
ray.get(a.ping.remote())
print("STATE", ray.get(state_of.remote(a._actor_id.hex())))
"""


def test_workers_find_their_own_cluster_beside_another(ray_local):
    """Ray Train's placement-group cleaner asks the state API, from a worker, whether a trial's
    controller is gone. With a second Ray instance on the machine (here: the test session's) a
    worker that has to guess the address fails, and a stopped trial's CPUs are never freed (a
    resumed sweep hung on that). Workers of a local instance are told its address."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    res = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300,
                         cwd=ROOT)
    assert "STATE ALIVE" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]


def test_interrupted_sweep_resumes(tmp_path, features, transcriptor_ckpt):
    """A sweep killed mid-run (SIGKILL of its process group) is restored by rerunning the same
    command: trials already finished are not rerun."""
    (tmp_path / "space.yaml").write_text(SPACE)
    cmd = [sys.executable, "-m", "wss_ray.cli", "tune", "separator", "--space", str(tmp_path / "space.yaml"),
           "--data", str(features), "--parent", str(transcriptor_ckpt), "--storage", str(tmp_path / "tune"),
           "--name", "sweep", "--config", str(ROOT / "configs" / "smoke.yaml")]
    env = {**os.environ, "RAY_ADDRESS": ""}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    exp = tmp_path / "tune" / "sweep"
    deadline = time.time() + 240
    # wait for the first trial's first report, then kill everything
    while time.time() < deadline and not list(exp.glob("*/result.json")) or not any(
            p.stat().st_size for p in exp.glob("*/result.json")):
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "the sweep never reported"
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (exp / "best.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming" in done.stdout + done.stderr
    record = json.loads((exp / "best.json").read_text())
    assert len(record["trials"]) == 2 and all(t["status"] == "ok" for t in record["trials"])


def test_pipeline_sweeps_a_stage_and_evaluates_every_trial(tmp_path, features, small_cfg):
    """pipeline.sweeps: the separator is swept over its mask combinations; its best trial is the
    stage's checkpoint and every trial is a row of the results table (the paper's ablation)."""
    import copy

    from wss_ray.checkpoint import read_meta
    from wss_ray.pipeline import run_pipeline

    (tmp_path / "space.yaml").write_text(SPACE)
    cfg = copy.deepcopy(small_cfg)
    cfg.pipeline.stages = ["transcriptor", "separator"]
    cfg.pipeline.sweeps = {"separator": str(tmp_path / "space.yaml")}
    cfg.pipeline.examples = 0
    run_pipeline(cfg, tmp_path / "out", data=features)
    rows = json.loads((tmp_path / "out" / "results" / "results.json").read_text())["multi_source"]["rows"]
    trial_rows = {r["system"] for r in rows if r["system"].startswith("separator")}
    assert {s.split("@")[0] for s in trial_rows} == {"separator[c]", "separator[c+h]"} and len(trial_rows) == 2
    best = json.loads((tmp_path / "out" / "tune" / "tune-separator" / "best.json").read_text())
    meta = read_meta(tmp_path / "out" / "checkpoints" / "tune-separator" / "checkpoint")
    assert meta["tune"]["trial"] == best["trial"]
