"""The real datasets' layouts, read unchanged: BabySlakh (flat, 16 kHz WAV, every
``audio_rendered`` false) and Slakh2100 flac_redux (split folders, 44.1 kHz FLAC, ``audio_dir``
relative to the split folder). Metadata comes from tests/fixtures/slakh (the real files' form);
the audio and MIDI are rendered here with FluidSynth, one short part per stem."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pretty_midi
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import yaml

from wss_ray.data.contract import to_tensors
from wss_ray.data.dataset import load_manifest
from wss_ray.data.featurize import featurize
from wss_ray.data.slakh import list_tracks, load_track, read_sources

FIXTURES = Path(__file__).parent / "fixtures" / "slakh"
SECONDS = 2.0
# one part per stem: (pitch, start, end); distinct pitches show which stem reached which roll
PARTS = {"S00": (52, 0.1, 0.8), "S01": (60, 0.1, 1.9), "S02": (64, 0.3, 1.2), "S03": (40, 0.2, 1.8),
         "S04": (67, 0.5, 1.9), "S05": (55, 0.1, 1.0), "S06": (84, 0.1, 0.5), "S07": (69, 0.2, 1.5),
         "S08": (57, 1.0, 1.7), "S09": (36, 0.0, 1.9), "S10": (72, 0.6, 1.6)}
EXPECTED = {"piano": ["S02"], "guitar": ["S00", "S08"], "bass": ["S03"]}
IGNORED = {"S01", "S04", "S05", "S06", "S07", "S09", "S10"}   # organs, strings, effect, clean guitar, drums


def render_track(fixture: Path, track: Path, sr: int, fmt: str, soundfont: str) -> None:
    """Copy the fixture's metadata.yaml as is and render every stem it has a file for, where
    the metadata's (split-relative or track-relative) audio_dir says."""
    track.mkdir(parents=True)
    shutil.copy(fixture / "metadata.yaml", track / "metadata.yaml")
    meta = yaml.safe_load((track / "metadata.yaml").read_text())
    base = track.parent if meta["audio_dir"].startswith(track.name + "/") else track
    stems_dir, midi_dir = base / meta["audio_dir"], base / meta["midi_dir"]
    stems_dir.mkdir(parents=True, exist_ok=True)
    midi_dir.mkdir(parents=True, exist_ok=True)
    n = int(SECONDS * sr)
    mix = np.zeros(n)
    rendered_everything = all(not s["audio_rendered"] for s in meta["stems"].values())  # BabySlakh
    for sid, info in meta["stems"].items():
        pitch, start, end = PARTS[sid]
        m = pretty_midi.PrettyMIDI()
        inst = pretty_midi.Instrument(program=info["program_num"], is_drum=info["is_drum"])
        inst.notes.append(pretty_midi.Note(velocity=100, pitch=pitch, start=start, end=end))
        m.instruments.append(inst)
        m.write(str(midi_dir / f"{sid}.mid"))
        if not (info["audio_rendered"] or rendered_everything):
            continue  # flac_redux's S06: listed, never rendered, no file
        x = np.zeros(n)
        y = inst.fluidsynth(fs=sr, synthesizer=soundfont)[:n]
        x[:len(y)] = 0.2 * y
        sf.write(stems_dir / f"{sid}.{fmt}", x, sr, subtype="PCM_16")
        mix += sf.read(stems_dir / f"{sid}.{fmt}")[0]
    sf.write(track / f"mix.{fmt}", mix, sr, subtype="PCM_16")


@pytest.fixture(scope="module")
def real_layouts(tmp_path_factory, soundfont) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("real")
    baby = root / "babyslakh_16k"
    render_track(FIXTURES / "babyslakh_16k" / "Track00001", baby / "Track00001", 16000, "wav", soundfont)
    redux = root / "slakh2100_flac_redux"
    render_track(FIXTURES / "slakh2100_flac_redux" / "train" / "Track00001", redux / "train" / "Track00001",
                 44100, "flac", soundfont)
    # another split folder, as in the real download
    render_track(FIXTURES / "slakh2100_flac_redux" / "train" / "Track00001", redux / "omitted" / "Track00001",
                 44100, "flac", soundfont)
    return {"baby": baby, "redux": redux}


def test_fixtures_are_the_real_form():
    baby = yaml.safe_load((FIXTURES / "babyslakh_16k" / "Track00001" / "metadata.yaml").read_text())
    redux = yaml.safe_load((FIXTURES / "slakh2100_flac_redux" / "train" / "Track00001" / "metadata.yaml").read_text())
    for meta in (baby, redux):
        assert {"UUID", "audio_dir", "lmd_midi_dir", "midi_dir", "normalization_factor", "normalized",
                "overall_gain", "stems", "target_peak"} == set(meta)
        assert len(meta["stems"]) == 11
        for info in meta["stems"].values():
            assert {"audio_rendered", "inst_class", "integrated_loudness", "is_drum", "midi_program_name",
                    "midi_saved", "plugin_name", "program_num"} == set(info)
    assert baby["audio_dir"] == "stems" and not any(s["audio_rendered"] or s["midi_saved"]
                                                    for s in baby["stems"].values())
    assert redux["audio_dir"] == "Track00001/stems" and redux["midi_dir"] == "Track00001/MIDI"
    assert [k for k, s in redux["stems"].items() if not s["audio_rendered"]] == ["S06"]


def test_flat_corpus_splits_and_a_grown_corpus_is_refused(tmp_path, ray_local, data_cfg, soundfont):
    from wss_ray.data.slakh import flat_splits

    names = [Path(f"Track{i:05d}") for i in range(20, 0, -1)]
    got = flat_splits(names)
    assert [s for s, _ in got] == ["train"] * 14 + ["validation"] * 3 + ["test"] * 3     # BabySlakh's 20
    assert [t.name for s, t in got if s == "test"] == ["Track00018", "Track00019", "Track00020"]
    # featurized, then the flat folder grows: a track whose split would change is refused by name
    root = tmp_path / "flat"
    for i in (1, 2, 3, 4, 5, 6, 7):
        render_track(FIXTURES / "babyslakh_16k" / "Track00001", root / f"Track{i:05d}", 16000, "wav", soundfont)
    featurize(root, tmp_path / "feat", data_cfg, log=lambda line: None)
    render_track(FIXTURES / "babyslakh_16k" / "Track00001", root / "Track00008", 16000, "wav", soundfont)
    with pytest.raises(ValueError, match="Track00006: the corpus puts this track in 'train', the features .* 'validation'"):
        featurize(root, tmp_path / "feat", data_cfg, log=lambda line: None)


def test_both_flavours_are_recognised(real_layouts):
    assert [(s, t.name) for s, t in list_tracks(real_layouts["baby"])] == [("train", "Track00001")]
    assert sorted((s, t.name) for s, t in list_tracks(real_layouts["redux"])) == [
        ("omitted", "Track00001"), ("train", "Track00001")]


@pytest.mark.parametrize("flavour", ["baby", "redux"])
def test_stems_map_to_targets(real_layouts, data_cfg, flavour):
    track = real_layouts[flavour] / ("Track00001" if flavour == "baby" else "train/Track00001")
    src = read_sources("train", track, data_cfg)
    m = src.mapping()
    assert m["mapped"] == EXPECTED
    assert set(m["ignored"]) == IGNORED
    assert m["ignored"]["S09"] == "drums"
    assert "program 26" in m["ignored"]["S07"] and "program 48" in m["ignored"]["S04"]
    # the two distorted guitars are summed into the guitar target, nothing else is
    audio = load_track(src, data_cfg)
    s00, sr = sf.read(src.stems["guitar"][0], dtype="float32")
    s08, _ = sf.read(src.stems["guitar"][1], dtype="float32")
    np.testing.assert_allclose(audio.stems[1], s00 + s08, atol=1e-6)
    assert audio.sample_rate == (16000 if flavour == "baby" else 44100) == sr
    assert [sorted(set(n[:, 2].astype(int))) for n in audio.notes] == [[64], [52, 57], [40]]


def test_unrendered_target_without_file_is_absent_and_extra_files_are_noted(tmp_path, data_cfg, soundfont):
    fixture = FIXTURES / "slakh2100_flac_redux" / "train" / "Track00001"
    track = tmp_path / "train" / "Track00001"
    render_track(fixture, track, 16000, "flac", soundfont)
    meta = yaml.safe_load((track / "metadata.yaml").read_text())
    meta["stems"]["S03"]["audio_rendered"] = False        # the bass: listed, never rendered
    (track / "metadata.yaml").write_text(yaml.safe_dump(meta))
    (track / "stems" / "S03.flac").unlink()
    shutil.copy(track / "stems" / "S00.flac", track / "stems" / "S11.flac")   # on disk, not in the metadata
    src = read_sources("train", track, data_cfg)
    assert "bass" not in src.stems and "no audio file" in src.ignored["S03"]
    assert src.notes == ["S11.flac: no entry in metadata.yaml, ignored"]
    assert load_track(src, data_cfg).stems[2].max() == 0


def test_renamed_copy_reads_its_own_stems(real_layouts, tmp_path, data_cfg):
    """flac_redux's audio_dir names the original folder; a copy under another name must not
    read the original's stems through it."""
    split = tmp_path / "train"
    shutil.copytree(real_layouts["redux"] / "train" / "Track00001", split / "Track00001")
    shutil.copytree(split / "Track00001", split / "Track00002")
    x, sr = sf.read(split / "Track00002" / "stems" / "S02.flac")
    sf.write(split / "Track00002" / "stems" / "S02.flac", 0.5 * x, sr, subtype="PCM_16")
    a = load_track(read_sources("train", split / "Track00001", data_cfg), data_cfg)
    b = load_track(read_sources("train", split / "Track00002", data_cfg), data_cfg)
    np.testing.assert_allclose(b.stems[0], 0.5 * a.stems[0], atol=2 / 32768)


def test_featurize_and_stats_on_real_layouts(real_layouts, tmp_path, ray_local, data_cfg):
    for flavour, src_root in real_layouts.items():
        out = tmp_path / f"feat_{flavour}"
        m = featurize(src_root, out, data_cfg)
        assert not m["_run"]["bad_tracks"], m["_run"]["bad_tracks"]
        report = json.loads((out / "featurize_report.json").read_text())
        keys = ["train/Track00001"] + (["omitted/Track00001"] if flavour == "redux" else [])
        assert sorted(report["tracks"]) == sorted(keys)
        for key in keys:
            assert report["tracks"][key]["mapped"] == EXPECTED
            assert set(report["tracks"][key]["ignored"]) == IGNORED
        manifest = load_manifest(out)
        batch = to_tensors(pq.read_table(out / "train" / "features" / "Track00001.parquet"), manifest)
        roll = batch["roll"].amax(dim=(0, 3))          # (K, P): which pitches each target holds
        pitches = [sorted((roll[k].nonzero().flatten() + manifest["pitch_min"]).tolist()) for k in range(3)]
        assert pitches == [[64], [52, 57], [40]]       # clean guitar (69), organs, strings absent
        stems = pq.read_table(out / "train" / "stems" / "Track00001.parquet").column("stems")
        stems = stems.combine_chunks().flatten().to_numpy().reshape(len(batch["mix"]), 3, -1)
        np.testing.assert_allclose(batch["mix"].numpy(), stems.sum(1), atol=1e-5)  # the three targets only
        assert (np.abs(stems).max(-1) > 1e-3).all(axis=0).tolist() == [True, True, True]

    cli = [sys.executable, "-m", "wss_ray.cli", "data", "stats"]
    out = subprocess.run(cli + [str(real_layouts["redux"])], capture_output=True, text=True, check=True).stdout
    assert "train/Track00001: piano <- S02; guitar <- S00+S08; bass <- S03" in out
    assert "S09 ignored: drums" in out and "S07 ignored: Guitar program 26 (Electric Guitar (jazz))" in out
    assert "2 track(s), 2 usable" in out
    out = subprocess.run(cli + [str(tmp_path / "feat_redux")], capture_output=True, text=True, check=True).stdout
    assert "train:" in out and "audible targets per chunk" in out
    assert "omitted/Track00001: piano <- S02; guitar <- S00+S08; bass <- S03; 7 stem(s) ignored" in out
