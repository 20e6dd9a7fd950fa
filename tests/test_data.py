"""Data contract: synthetic corpus, Slakh reader, score features, featurization, readers."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pretty_midi
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch
import yaml

from wss_ray.config import DataConfig
from wss_ray.data.contract import shard_files, to_tensors
from wss_ray.data.dataset import DataError, iter_local, load_manifest, supervised_dataset, weak_dataset
from wss_ray.data.featurize import featurize
from wss_ray.data.score import (harmonic_basis, harmonic_masks, harmonic_masks_reference, load_notes,
                                notes_to_roll)
from wss_ray.data.slakh import SlakhError, list_tracks, load_track, read_sources
from wss_ray.data.synth import SynthError, find_soundfont, synthesize_corpus

SR = 16000


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------- synthetic corpus

def test_synth_layout_and_mix_is_sum_of_stems(corpus):
    tracks = list_tracks(corpus)
    assert {s for s, _ in tracks} == {"train", "validation", "test"}
    assert len(tracks) == 6
    programs = set()
    for _, t in tracks:
        meta = yaml.safe_load((t / "metadata.yaml").read_text())
        assert {"UUID", "audio_dir", "midi_dir", "stems", "normalized", "overall_gain"} <= set(meta)
        mix, sr = sf.read(t / "mix.flac", dtype="int16")
        assert sr == 22050
        total = np.zeros(len(mix), np.int64)
        for sid, info in meta["stems"].items():
            assert {"audio_rendered", "inst_class", "program_num", "is_drum", "midi_program_name",
                    "plugin_name", "integrated_loudness", "midi_saved"} <= set(info)
            stem, _ = sf.read(t / "stems" / f"{sid}.flac", dtype="int16")
            total += stem
            assert (t / "MIDI" / f"{sid}.mid").is_file()
            programs.add(info["program_num"])
        assert np.array_equal(total, mix.astype(np.int64)), f"{t}: mix != sum of stems"
        assert (t / "all_src.mid").is_file()
        # the audio is music, not silence
        assert np.abs(mix).max() > 1000
    assert len(programs) >= 4, "programs should vary within classes across songs"


def test_synth_is_deterministic_and_resumable(tmp_path, soundfont, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    synthesize_corpus(a, 3, 3, seed=11, soundfont=soundfont, sample_rate=16000, workers=1)
    synthesize_corpus(b, 3, 3, seed=11, soundfont=soundfont, sample_rate=16000, workers=2)
    assert _tree_hash(a) == _tree_hash(b)
    assert "3/3" in capsys.readouterr().out  # progress output
    res = synthesize_corpus(a, 3, 3, seed=11, soundfont=soundfont, sample_rate=16000, workers=1)
    assert res["rendered"] == 0  # finished tracks are kept, not redone
    c = tmp_path / "c"
    synthesize_corpus(c, 3, 3, seed=12, soundfont=soundfont, sample_rate=16000, workers=1)
    assert _tree_hash(a) != _tree_hash(c)


def test_synth_splits_make_a_held_out_test_corpus_of_the_same_songs(tmp_path, soundfont, capsys):
    from wss_ray.cli import main

    common = ["--tracks", "3", "--seconds", "2", "--seed", "11", "--sample-rate", "16000", "--workers", "1",
              "--soundfont", soundfont]
    assert main(["data", "synth", "--out", str(tmp_path / "held"), *common, "--splits", "0", "0", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "held").iterdir()) == ["test"]
    assert len(list((tmp_path / "held" / "test").iterdir())) == 3
    # a song is a function of the seed and its index, not of its split
    assert main(["data", "synth", "--out", str(tmp_path / "usual"), *common]) == 0
    usual = {t.name: t for t in (tmp_path / "usual").glob("*/Track*")}
    for t in (tmp_path / "held" / "test").iterdir():
        assert _tree_hash(t) == _tree_hash(usual[t.name])
    capsys.readouterr()
    assert main(["data", "synth", "--out", str(tmp_path / "bad"), *common, "--splits", "0.5", "0.5", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--splits" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "bad").exists()


def test_synth_songs_vary(tmp_path):
    from wss_ray.data.synth import compose

    songs = [compose(5, i, 8.0) for i in range(12)]
    assert len({s.tempo for s in songs}) > 4 and len({s.key for s in songs}) > 4
    assert any(len(s.parts) < 3 for s in songs), "some songs must lack an instrument"
    bass = [n.pitch for s in songs if "bass" in s.parts for n in s.parts["bass"].notes]
    piano = [n.pitch for s in songs if "piano" in s.parts for n in s.parts["piano"].notes]
    assert np.median(bass) < np.median(piano)


def test_missing_soundfont_is_a_clear_error(tmp_path):
    with pytest.raises(SynthError, match="soundfont not found"):
        find_soundfont(str(tmp_path / "nope.sf2"))


# ---------------------------------------------------------------- score features

def test_known_note_lands_on_right_pitch_and_frames(tmp_path):
    midi = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program=0)
    inst.notes.append(pretty_midi.Note(velocity=100, pitch=69, start=0.5, end=1.0))
    midi.instruments.append(inst)
    midi.write(str(tmp_path / "a.mid"))
    notes = load_notes(tmp_path / "a.mid")
    roll = notes_to_roll(notes, 100, SR, 256, 21, 108)
    # frame n is at n*256/16000 s: 0.5 s -> 31.25 -> first frame 32; 1.0 s -> 62.5 -> last 62
    on = np.nonzero(roll)
    assert set(on[0]) == {69 - 21}
    assert on[1].min() == 32 and on[1].max() == 62
    # the same note seen from a chunk starting at frame 40
    part = notes_to_roll(notes, 10, SR, 256, 21, 108, start_frame=40)
    assert part[48].all() and part.sum() == 10


def test_empty_midi_is_an_error(tmp_path):
    pretty_midi.PrettyMIDI().write(str(tmp_path / "empty.mid"))
    with pytest.raises(ValueError, match="empty.mid: MIDI file has no pitched notes"):
        load_notes(tmp_path / "empty.mid")


def test_harmonic_masks_match_loop_reference_and_hand_check():
    rng = np.random.default_rng(0)
    roll = (rng.random((2, 3, 88, 5)) < 0.02).astype(np.float32)
    basis = harmonic_basis(SR, 1024, 21, 108, n_harmonics=10)
    fast = harmonic_masks(torch.from_numpy(roll), basis).numpy()
    slow = harmonic_masks_reference(roll, SR, 1024, 21, n_harmonics=10)
    assert fast.shape == (2, 3, 513, 5)
    np.testing.assert_array_equal(fast, slow)
    # hand check: A4 = 440 Hz, bins of 15.625 Hz: harmonic h at 28.16*h bins
    one = np.zeros((1, 1, 88, 1), np.float32)
    one[0, 0, 69 - 21, 0] = 1
    h = harmonic_masks(torch.from_numpy(one), basis)[0, 0, :, 0].numpy()
    on = set(np.nonzero(h)[0])
    # h=1 at 28.16 bins, tolerance 1 bin -> {28, 29}; h=2 at 56.32, half a semitone = 1.65 bins
    assert {28, 29} <= on and 27 not in on and {55, 56, 57} <= on and 58 not in on
    assert 10 not in on and 42 not in on and 300 not in on     # between/above harmonics
    assert max(on) <= 10 * 28.16 * 2 ** (1 / 24) + 1


# ---------------------------------------------------------------- real Slakh layout

def _slakh_track(root: Path, name="Track00001", split="train", sr=SR, seconds=2.0, stems=None,
                 fmt="wav") -> Path:
    """A track exactly in Slakh2100's layout, including stems that map to no target."""
    t = root / split / name
    (t / "stems").mkdir(parents=True)
    (t / "MIDI").mkdir()
    n = int(seconds * sr)
    stems = stems or {
        "S00": ("Piano", 0, "Acoustic Grand Piano", 60, False),
        "S01": ("Guitar", 30, "Distortion Guitar", 52, False),
        "S02": ("Bass", 33, "Electric Bass (finger)", 40, False),
        "S03": ("Drums", 0, "Drums", 36, True),
        "S04": ("Guitar", 25, "Acoustic Guitar (steel)", 64, False),  # clean guitar: not a target
    }
    meta = {"UUID": "0" * 32, "audio_dir": "stems", "lmd_midi_dir": "lmd_matched/x.mid", "midi_dir": "MIDI",
            "normalization_factor": -13.0, "normalized": True, "overall_gain": 0.8, "stems": {},
            "target_peak": -1.0}
    mix = np.zeros(n, np.float32)
    for i, (sid, (cls, prog, pname, pitch, drum)) in enumerate(stems.items()):
        tt = np.arange(n) / sr
        x = (0.1 * np.sin(2 * np.pi * 440 * 2 ** ((pitch - 69) / 12) * tt)).astype(np.float32)
        sf.write(t / "stems" / f"{sid}.{fmt}", x, sr)
        mix += x
        m = pretty_midi.PrettyMIDI()
        inst = pretty_midi.Instrument(program=prog, is_drum=drum)
        inst.notes.append(pretty_midi.Note(velocity=90, pitch=pitch, start=0.25, end=1.25))
        m.instruments.append(inst)
        m.write(str(t / "MIDI" / f"{sid}.mid"))
        meta["stems"][sid] = {"audio_rendered": True, "inst_class": cls, "integrated_loudness": -20.0,
                              "is_drum": drum, "midi_program_name": pname, "midi_saved": True,
                              "plugin_name": "x.nkm", "program_num": prog}
    sf.write(t / f"mix.{fmt}", mix, sr)
    (t / "metadata.yaml").write_text(yaml.safe_dump(meta))
    return t


def test_slakh_reader_maps_stems_to_targets(tmp_path, data_cfg):
    t = _slakh_track(tmp_path)
    src = read_sources("train", t, data_cfg)
    assert {k: [p.name for p in v] for k, v in src.stems.items()} == {
        "piano": ["S00.wav"], "guitar": ["S01.wav"], "bass": ["S02.wav"]}
    audio = load_track(src, data_cfg)
    assert audio.stems.shape == (3, 2 * SR)
    # with sum_of_targets the clean guitar and drums are not in the mixture
    np.testing.assert_allclose(audio.mix, audio.stems.sum(0), atol=1e-6)
    assert [n[0, 2] for n in audio.notes] == [60, 52, 40]


def test_slakh_unrendered_and_absent_instruments(tmp_path, data_cfg):
    t = _slakh_track(tmp_path, stems={"S00": ("Piano", 1, "Bright", 60, False),
                                      "S01": ("Bass", 34, "Electric Bass (pick)", 40, False)})
    meta = yaml.safe_load((t / "metadata.yaml").read_text())
    meta["stems"]["S01"]["audio_rendered"] = False
    (t / "metadata.yaml").write_text(yaml.safe_dump(meta))
    (t / "stems" / "S01.wav").unlink()   # unrendered: no file (with a file, the stem would count)
    audio = load_track(read_sources("train", t, data_cfg), data_cfg)
    assert audio.stems[1:].sum() == 0 and len(audio.notes[1]) == 0 and len(audio.notes[2]) == 0
    data_cfg.require_all = True
    with pytest.raises(SlakhError, match=r"Track00001: lacks instrument\(s\) \['guitar', 'bass'\]"):
        read_sources("train", t, data_cfg)


def _break(t: Path, how: str) -> str:
    """Damage a track one way; returns the file name the error must mention."""
    if how == "corrupt_audio":
        (t / "stems" / "S01.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
        return "S01.wav"
    if how == "empty_midi":
        pretty_midi.PrettyMIDI().write(str(t / "MIDI" / "S02.mid"))
        return "S02.mid"
    if how == "missing_stems":
        import shutil
        shutil.rmtree(t / "stems")
        return "stems"
    if how == "short_stem":
        x, sr = sf.read(t / "stems" / "S00.wav")
        sf.write(t / "stems" / "S00.wav", x[: len(x) // 2], sr)
        return "S00.wav"
    if how == "sample_rate":
        x, sr = sf.read(t / "stems" / "S02.wav")
        sf.write(t / "stems" / "S02.wav", x, 22050)
        return "S02.wav"
    if how == "nan_audio":
        x, sr = sf.read(t / "stems" / "S00.wav", dtype="float32")
        x[sr // 2] = np.nan   # a float WAV can hold NaN
        sf.write(t / "stems" / "S00.wav", x, sr, subtype="FLOAT")
        return "S00.wav: non-finite sample (NaN or Inf) at 0.500 s"
    if how == "unknown_class":
        meta = yaml.safe_load((t / "metadata.yaml").read_text())
        meta["stems"]["S04"]["inst_class"] = "Kazoo"
        (t / "metadata.yaml").write_text(yaml.safe_dump(meta))
        return "metadata.yaml"
    raise AssertionError(how)


BAD = ["corrupt_audio", "empty_midi", "missing_stems", "short_stem", "sample_rate", "unknown_class", "nan_audio"]


@pytest.mark.parametrize("how", BAD)
def test_bad_track_error_names_the_file(tmp_path, data_cfg, how):
    t = _slakh_track(tmp_path)
    name = _break(t, how)
    with pytest.raises(SlakhError) as err:
        load_track(read_sources("train", t, data_cfg), data_cfg)
    assert name in str(err.value) and "Track00001" in str(err.value)


def test_empty_input_folder_is_an_error(tmp_path):
    with pytest.raises(SlakhError, match=f"{tmp_path}: no Track folders"):
        list_tracks(tmp_path)


def test_featurize_reports_bad_tracks_and_keeps_the_rest(tmp_path, ray_local, data_cfg, capsys):
    root = tmp_path / "slakh"
    for i, how in enumerate(BAD + [None], 1):
        t = _slakh_track(root, name=f"Track{i:05d}")
        if how:
            _break(t, how)
    out = tmp_path / "feat"
    m = featurize(root, out, data_cfg)
    bad = json.loads((out / "featurize_report.json").read_text())["bad_tracks"]
    assert len(bad) == len(BAD) and m["splits"]["train"]["tracks"] == 1
    assert "FAILED" in capsys.readouterr().out
    # a hand-made note lands in the features: piano at MIDI 60 from 0.25 s to 1.25 s
    tab = pq.read_table(out / "train" / "features" / f"Track{len(BAD) + 1:05d}.parquet")
    batch = to_tensors(tab, m)
    roll = batch["roll"][0]
    assert roll[0, 60 - 21].nonzero().flatten().tolist() == list(range(16, 65))  # from ceil(0.25*62.5)=16 to the last frame (64)
    assert roll[1, 52 - 21].sum() > 0 and roll[2, 40 - 21].sum() > 0
    assert batch["active"][0].tolist() == [1, 1, 1]


# ---------------------------------------------------------------- featurized corpus

def test_schema_and_manifest(features, small_cfg):
    m = load_manifest(features)
    cfg = small_cfg.data
    assert m["schema_version"] == 1 and m["sample_rate"] == cfg.sample_rate
    assert m["instruments"] == ["piano", "guitar", "bass"] and m["hop"] == cfg.hop
    # expected sizes from the config's inputs, not its derived properties: a chunk is chunk_seconds
    # of audio, and a roll has one column per frame of torch's own centred STFT of such a chunk
    L = m["chunk_samples"]
    assert abs(L - cfg.chunk_seconds * cfg.sample_rate) < 1
    N = torch.stft(torch.zeros(L), cfg.n_fft, cfg.hop, window=torch.hann_window(cfg.n_fft), center=True,
                   return_complex=True).shape[-1]
    assert m["n_frames"] == N
    assert len(m["fingerprint"]) == 16
    assert set(m["splits"]) == {"train", "validation", "test"}
    f = pq.read_schema(next((features / "train" / "features").glob("*.parquet")))
    assert f.names == ["track", "chunk", "start", "mix", "roll", "active"]
    assert f.field("roll").type.list_size == 3 * 88 * N
    s = pq.read_schema(next((features / "train" / "stems").glob("*.parquet")))
    assert s.names == ["track", "chunk", "stems"]
    for b in iter_local(features, "train", 4, with_stems=True):
        assert b["mix"].shape == (len(b["mix"]), L)
        assert b["roll"].shape[1:] == (3, 88, N)
        torch.testing.assert_close(b["mix"], b["stems"].sum(1), atol=1e-5, rtol=0)
        # clip activity is "any note in the chunk"
        assert torch.equal(b["active"], (b["roll"].amax(dim=(2, 3)) > 0).float())


def test_weak_reader_cannot_yield_stems(features, tmp_path):
    import shutil

    ds = weak_dataset(features, "train")
    assert "stems" not in ds.schema().names
    # by construction: with every stems folder gone, the weak reader still works, the supervised fails
    copy = tmp_path / "nostems"
    shutil.copytree(features, copy)
    for d in copy.glob("*/stems"):
        shutil.rmtree(d)
    m = load_manifest(copy)
    n = sum(len(to_tensors(b, m)["mix"]) for b in weak_dataset(copy, "train").iter_batches(
        batch_size=4, batch_format="pyarrow"))
    assert n == m["splits"]["train"]["chunks"]
    with pytest.raises(DataError, match="train/stems: no Parquet shards"):
        supervised_dataset(copy, "train").take(1)


def test_ray_reader_equals_local_reader(features):
    m = load_manifest(features)
    ray_rows = {}
    for b in supervised_dataset(features, "validation").iter_batches(batch_size=3, batch_format="pyarrow"):
        t = to_tensors(b, m)
        for i, (tr, ch) in enumerate(zip(b.column("track").to_pylist(), b.column("chunk").to_pylist())):
            ray_rows[(tr, ch)] = (t["mix"][i], t["stems"][i])
    local = list(iter_local(features, "validation", 100, with_stems=True))[0]
    assert len(ray_rows) == len(local["mix"])
    for (mix, stems) in ray_rows.values():
        j = int(torch.argmin((local["mix"] - mix).abs().sum(1)))
        assert torch.equal(local["mix"][j], mix) and torch.equal(local["stems"][j], stems)


def test_featurize_refuses_other_settings(features, corpus, small_cfg):
    made_with = small_cfg.data.hop   # what the features fixture was made with
    cfg = DataConfig(**{**small_cfg.data.__dict__, "hop": made_with // 2})
    with pytest.raises(ValueError, match=f"hop={made_with}, the config asks for {made_with // 2}"):
        featurize(corpus, features, cfg)


def _rows(out: Path) -> list[tuple]:
    rows = []
    for f in sorted(out.glob("*/*/*.parquet")):
        t = pq.read_table(f)
        for i in range(t.num_rows):
            r = t.slice(i, 1).to_pylist()[0]
            rows.append((f.parent.name, r["track"], r["chunk"],
                         hashlib.sha1(json.dumps(r, default=str).encode()).hexdigest()))
    return sorted(rows)


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL a run and every process it started, as a power cut would.

    Ray puts its worker processes in their own process groups, so killing the driver's group
    leaves a worker free to finish its task and write one more shard after the "crash".
    Stopping the tree first keeps the parent links intact while it is collected.
    """
    stopped: set[int] = set()
    for _ in range(3):
        for p in ({pid} | _descendants(pid)) - stopped:
            try:
                os.kill(p, signal.SIGSTOP)
                stopped.add(p)
            except ProcessLookupError:
                pass
    for p in stopped:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_resume_after_killed_featurization(corpus, tmp_path, ray_local):
    clean = tmp_path / "clean"
    cfg_args = ["--set", "data.chunk_seconds=1.024"]
    cmd = [sys.executable, "-m", "wss_ray.cli", "data", "featurize", "--slakh", str(corpus), "--workers", "1"]
    subprocess.run(cmd + ["--out", str(clean)] + cfg_args, check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(killed)] + cfg_args, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not shard_files(killed, "*/features/*.parquet"):
        time.sleep(0.05)
    _kill_tree(proc.pid)
    proc.wait()
    done_before = len(shard_files(killed, "*/features/*.parquet"))  # not the hidden one being written
    assert 0 < done_before < 6, "the kill should land mid-run"
    res = subprocess.run(cmd + ["--out", str(killed)] + cfg_args, check=True, capture_output=True, text=True)
    assert f"{done_before} already done" in res.stdout
    assert _rows(killed) == _rows(clean)
    assert not list(killed.glob("*/*/.*tmp*"))
    assert json.loads((killed / "manifest.json").read_text())["fingerprint"] == \
        json.loads((clean / "manifest.json").read_text())["fingerprint"]


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        load_manifest(tmp_path)
