"""Bad input a new user tried (second probe), without Ray: each gives one clear error naming
the file, option or argument, and leaves nothing behind. Uses the shipped model."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from wss_ray.checkpoint import SHIPPED_MODEL, CheckpointError


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "wss_ray.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_an_empty_model_file_is_named_not_traced(tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(SHIPPED_MODEL, ck)
    (ck / "model.pt").write_bytes(b"")
    from wss_ray.checkpoint import load_checkpoint

    with pytest.raises(CheckpointError, match=r"ck/model.pt: not a readable wss-ray model file \(EOFError"):
        load_checkpoint(ck)


@pytest.mark.parametrize("body, needle", [("[1]", "expected a JSON object, got list"),
                                          ('{"sample_rate": 16000,', "not valid JSON"),
                                          ("", "not valid JSON")])
def test_a_damaged_manifest_is_named(tmp_path, body, needle):
    from wss_ray.data.dataset import DataError, load_manifest

    (tmp_path / "manifest.json").write_text(body)
    with pytest.raises(DataError, match=f"manifest.json: {needle}"):
        load_manifest(tmp_path)
    res = _cli("data", "stats", str(tmp_path))
    assert res.returncode == 2 and "Traceback" not in res.stderr and "manifest.json" in res.stderr


def test_a_tune_record_with_foreign_trials_is_refused(tmp_path):
    from wss_ray.evaluate import expand_checkpoints

    for trials in ([1], [{"status": "ok", "checkpoint": 5}]):
        (tmp_path / "t.json").write_text(json.dumps({"trials": trials}))
        with pytest.raises(ValueError, match="t.json: not a Tune handoff record"):
            expand_checkpoints([str(tmp_path / "t.json")])


def test_an_over_long_output_name_is_refused_before_anything_is_made(tmp_path):
    wav = tmp_path / "clip.wav"
    sf.write(wav, np.zeros(1600, np.float32), 16000)
    long = "x" * 300
    for args in (["separate", str(wav), "--out", f"made/{long}/c"],
                 ["data", "featurize", "--slakh", str(tmp_path), "--out", f"made/{long}"]):
        res = _cli(*args, cwd=tmp_path)
        assert res.returncode == 2 and "longer than this filesystem allows" in res.stderr, res.stderr
        assert not (tmp_path / "made").exists()


def test_the_api_checks_rate_and_chunk_and_takes_clips_shorter_than_a_window():
    from wss_ray import Separator

    sep = Separator.from_checkpoint()
    x = np.zeros(16000, np.float32)
    for sr in (0, 0.5, -16000, float("nan"), "16000", 16000.5, 1):
        with pytest.raises(ValueError, match="sample_rate: need a whole number of samples per second"):
            sep.separate(x, sr)
    for seconds in (1e-6, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="chunk_seconds: need a number of seconds between 0.1 and 3600"):
            sep.separate(x, 16000, chunk_seconds=seconds)
    # 20 ms at 16 kHz is shorter than one STFT window (1024): padded inside, returned at its length
    clip = (np.random.default_rng(0).standard_normal(320) * 0.1).astype(np.float32)
    out = sep.separate(clip, 16000)
    assert all(v.shape == (320,) for v in out.values())
    np.testing.assert_allclose(sum(out.values()).numpy(), clip, atol=1e-5)  # residual closes the sum
    assert len(sep.transcribe(clip, 16000).instruments) == len(sep.instruments)


def test_config_mistakes_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sample_rate: [1,\n  hop: 3\n")
    for args, needle in ((["--config", str(bad)], "bad.yaml: not valid YAML at line"),
                         (["--config", str(tmp_path)], "is a folder, not a YAML file"),
                         (["--set", "=3"], "expected key=value with a dotted setting name")):
        res = _cli("data", "stats", str(tmp_path), *args)
        assert res.returncode == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
