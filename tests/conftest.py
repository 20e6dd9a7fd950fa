"""Shared fixtures: one small synthetic corpus rendered with a tiny soundfont, featurized
once through Ray Data on the default local Ray settings, reused by every test."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from wss_ray.config import DataConfig, load_config

TINY_SF2 = "/usr/share/sounds/sf2/TimGM6mb.sf2"


@pytest.fixture(scope="session")
def soundfont() -> str:
    from wss_ray.data.synth import find_soundfont

    return str(find_soundfont(TINY_SF2 if os.path.isfile(TINY_SF2) else None))


@pytest.fixture(scope="session")
def ray_local():
    from wss_ray.ray_session import ensure_ray

    ensure_ray()  # the default local settings are what is under test
    yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="session")
def benchmark():
    """``benchmark("gpu_check")``: a script of benchmarks/ as a module (it is not a package)."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def small_cfg():
    return load_config(Path(__file__).parent.parent / "configs" / "smoke.yaml")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, request) -> Path:
    """Rendered here with FluidSynth; ``WSS_TEST_CORPUS`` names one rendered elsewhere instead
    (a bare GPU machine has no FluidSynth: `benchmarks/gpu_bundle.py --test-corpus` packs it)."""
    from wss_ray.data.synth import synthesize_corpus

    if os.environ.get("WSS_TEST_CORPUS"):
        return Path(os.environ["WSS_TEST_CORPUS"])
    out = tmp_path_factory.mktemp("corpus")
    synthesize_corpus(out, tracks=6, seconds=6, seed=3, soundfont=request.getfixturevalue("soundfont"),
                      sample_rate=22050, workers=2)
    return out


@pytest.fixture(scope="session")
def features(tmp_path_factory, corpus, small_cfg, request) -> Path:
    """Featurized through Ray Data on the default local Ray settings; where Ray is not
    installed (a bare GPU machine running tests/test_gpu.py) in this process instead."""
    import importlib.util

    from wss_ray.data.featurize import featurize

    out = tmp_path_factory.mktemp("features")
    if importlib.util.find_spec("ray") is None:
        featurize(corpus, out, small_cfg.data, engine="local")
    else:
        request.getfixturevalue("ray_local")
        featurize(corpus, out, small_cfg.data, small_cfg.ray)
    return out


@pytest.fixture(scope="session")
def pipeline_out(tmp_path_factory, features, small_cfg) -> Path:
    """The smoke pipeline trained once (every stage, through Ray Train) and evaluated; tests
    read its checkpoints and results (one re-runs it, which must change no checkpoint)."""
    from wss_ray.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("pipeline")
    run_pipeline(small_cfg, out, data=features)
    return out


@pytest.fixture
def data_cfg() -> DataConfig:
    return DataConfig(chunk_seconds=1.024)


# Fixtures that start (or need) a local Ray instance, or a cluster: a test using any of them is
# marked ``ray`` without anyone having to remember to; ``make test-fast`` leaves those out.
RAY_FIXTURES = {"ray_local", "features", "pipeline_out", "transcriptor_ckpt", "cluster", "trained"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
