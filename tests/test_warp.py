"""`wss-ray data warp`: a corpus copied with its MIDI time-warped, the exact warp kept; every note
of the warped scores maps back onto the audio through warp.json within 1 ms."""
from __future__ import annotations

import filecmp
import json
import os
import shutil
from pathlib import Path

import mido
import numpy as np
import pretty_midi
import pytest

from wss_ray.cli import main
from wss_ray.data.slakh import SlakhError, list_tracks
from wss_ray.data.warp import (MAX_DRIFT_SLOPE, STEP_S, load_warp, random_warp, score_to_audio, warp_corpus,
                               warp_midi, warp_track)


def _midis(track):
    return sorted(p.relative_to(track) for p in track.rglob("*.mid"))


@pytest.fixture(scope="module")
def warped(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("warped") / "w"
    lines = []
    assert warp_corpus(corpus, out, seed=7, log=lines.append) == len(list_tracks(corpus))
    return out, lines


def test_random_warp_is_increasing_and_within_bounds():
    firsts = []
    for seed in range(200):
        a, s = random_warp(seed, 30.0, max_offset=1.0, max_tempo=0.10, drift=0.25)
        assert a[0] == 0 and a[-1] >= 30 and np.allclose(np.diff(a), STEP_S)
        slope = np.diff(s) / np.diff(a)
        assert slope.min() > 0
        assert 0.9 - MAX_DRIFT_SLOPE - 1e-3 <= slope.min() and slope.max() <= 1.1 + MAX_DRIFT_SLOPE + 1e-3
        assert abs(s[0]) <= 1.0 + 0.25
        # the global tempo: the drift (|d| <= 0.25 s) moves the mean slope over 30 s by < 2%
        mean = (s[-1] - s[0]) / (a[-1] - a[0])
        assert 0.9 - 0.02 <= mean <= 1.1 + 0.02
        firsts.append(s[0])
        np.testing.assert_array_equal(s, random_warp(seed, 30.0)[1])   # a pure function of the seed
    assert len(set(firsts)) == 200
    assert min(firsts) < -0.5 and max(firsts) > 0.5                   # offsets both ways
    a, s = random_warp(3, 10.0, max_offset=0.5, max_tempo=0.0, drift=0.0)
    np.testing.assert_allclose(np.diff(s), np.diff(a), atol=2e-6)     # no tempo, no drift: a pure offset
    # the same seed gives the same warp whatever the length (parameters drawn first)
    np.testing.assert_array_equal(random_warp(5, 10.0)[1], random_warp(5, 60.0)[1][:len(random_warp(5, 10.0)[1])])


def test_every_warped_note_maps_back_onto_the_audio(corpus, warped):
    out, _ = warped
    moved = []
    for split, track in list_tracks(corpus):
        dst = out / track.relative_to(corpus)
        audio_s, score_s = load_warp(dst)
        rec = json.loads((dst / "warp.json").read_text())
        assert rec["version"] == 1 and abs(rec["tempo_ratio"] - 1) <= 0.10 and 0 <= rec["drift_s"] <= 0.25
        assert np.interp(0.0, audio_s, score_s) == pytest.approx(rec["offset_s"], abs=0.25 + 1e-6)
        assert len(_midis(track)) >= 2 and _midis(track) == _midis(dst)   # MIDI/*.mid and all_src.mid
        for rel in _midis(track):
            before, after = pretty_midi.PrettyMIDI(str(track / rel)), pretty_midi.PrettyMIDI(str(dst / rel))
            assert len(before.instruments) == len(after.instruments)
            for ib, ia in zip(before.instruments, after.instruments):
                assert (ib.program, ib.is_drum, len(ib.notes)) == (ia.program, ia.is_drum, len(ia.notes))
                nb = sorted((n.start, n.pitch, n.velocity, n.end) for n in ib.notes)
                na = sorted((n.start, n.pitch, n.velocity, n.end) for n in ia.notes)
                assert [n[1:3] for n in nb] == [n[1:3] for n in na]
                start_b, end_b = np.array([n[0] for n in nb]), np.array([n[3] for n in nb])
                start_a, end_a = np.array([n[0] for n in na]), np.array([n[3] for n in na])
                np.testing.assert_allclose(score_to_audio(start_a, audio_s, score_s), start_b, atol=1e-3)
                np.testing.assert_allclose(score_to_audio(end_a, audio_s, score_s), end_b, atol=1e-3)
                assert start_a.min() >= 0
                moved.append(np.abs(start_a - start_b).max())
    assert max(moved) > 0.1   # the scores did move


def test_audio_and_metadata_are_the_same_files(corpus, warped):
    out, _ = warped
    for _, track in list_tracks(corpus):
        dst = out / track.relative_to(corpus)
        src_files = sorted(p.relative_to(track) for p in track.rglob("*") if p.is_file())
        dst_files = sorted(p.relative_to(dst) for p in dst.rglob("*") if p.is_file())
        assert dst_files == sorted(src_files + [Path("warp.json")])
        for rel in src_files:
            if rel.suffix != ".mid":
                assert filecmp.cmp(track / rel, dst / rel, shallow=False), rel
    assert [s for s, _ in list_tracks(out)] == [s for s, _ in list_tracks(corpus)]   # splits kept


def test_rerun_keeps_tracks_and_a_seed_gives_one_warp(corpus, warped, tmp_path):
    out, lines = warped
    assert any("tracks warped" in line and "±10%" in line for line in lines)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("warp.json")}
    again = []
    assert warp_corpus(corpus, out, seed=7, log=again.append) == 0
    assert "0 tracks warped" in again[-1] and {p: p.stat().st_mtime_ns for p in out.rglob("warp.json")} == stamps
    _, track = list_tracks(corpus)[0]
    rel = track.relative_to(corpus)
    warp_track(track, tmp_path / "a", seed=123)
    warp_track(track, tmp_path / "b", seed=123)
    warp_track(track, tmp_path / "c", seed=124)
    assert (tmp_path / "a" / "warp.json").read_bytes() == (tmp_path / "b" / "warp.json").read_bytes()
    assert (tmp_path / "a" / "warp.json").read_bytes() != (tmp_path / "c" / "warp.json").read_bytes()
    for m in _midis(track):
        assert (tmp_path / "a" / m).read_bytes() == (tmp_path / "b" / m).read_bytes()
    # the corpus run derives each track's seed from the corpus seed and the track's name
    from wss_ray.data.warp import track_seed

    rec = json.loads((out / rel / "warp.json").read_text())
    assert rec["seed"] == track_seed(7, track.name) and rec["corpus_seed"] == 7
    with pytest.raises(SlakhError, match="warped copy"):   # warping a warped copy would lose the first warp
        warp_track(out / rel, tmp_path / "d", seed=1)


def test_rerun_with_another_seed_or_bounds_is_refused(corpus, warped, tmp_path):
    out, _ = warped
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    n = len(list_tracks(corpus))
    with pytest.raises(ValueError, match=rf"warp\.json: made with --seed 7, this run asks for --seed 8 \({n} tracks "
                                         r"of --out differ\); use another --out or delete them"):
        warp_corpus(corpus, out, seed=8, log=lambda line: None)
    with pytest.raises(ValueError, match=r"warp\.json: made with --max-tempo 0\.1 --drift 0\.25, this run asks for "
                                         r"--max-tempo 0\.2 --drift 0\.3 "):
        warp_corpus(corpus, out, seed=7, max_tempo=0.2, drift=0.3, log=lambda line: None)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps   # nothing written, nothing left
    # a track folder that is not a warped track is not taken for one
    _, track = list_tracks(corpus)[0]
    dst = tmp_path / "o" / track.relative_to(corpus)
    dst.mkdir(parents=True)
    with pytest.raises(SlakhError, match=rf"{dst.name}: already in --out but has no warp\.json.*delete {dst}"):
        warp_corpus(corpus, tmp_path / "o", seed=7, log=lambda line: None)
    (dst / "warp.json").write_text("{not json")
    with pytest.raises(SlakhError, match=rf"{dst.name}/warp\.json: unreadable \(JSONDecodeError"):
        warp_corpus(corpus, tmp_path / "o", seed=7, log=lambda line: None)
    assert [p for p in (tmp_path / "o").rglob("*") if p.is_file()] == [dst / "warp.json"]


def test_warping_a_warped_copy_leaves_nothing(warped, tmp_path, capsys):
    out, _ = warped
    with pytest.raises(SlakhError, match="warp.json: the track is a warped copy"):
        warp_corpus(out, tmp_path / "a", seed=1, log=lambda line: None)
    assert main(["data", "warp", "--in", str(out / "test"), "--out", str(tmp_path / "b" / "c"), "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the track is a warped copy" in err[0]
    assert list(tmp_path.iterdir()) == []


def _flat(corpus, folder, n):
    tracks = [t for _, t in list_tracks(corpus)][:n]
    for t in tracks:
        shutil.copytree(t, folder / t.name, copy_function=os.link)
    return [folder / t.name for t in tracks]


def _spoil(track):
    midi = sorted((track / "MIDI").glob("*.mid"))[0]
    midi.unlink()   # a hard link to the shared corpus: replaced, not written through
    midi.write_bytes(b"not a MIDI file")
    return midi


def test_a_bad_track_is_named_and_the_others_are_written(corpus, tmp_path, capsys):
    good, bad, good2 = _flat(corpus, tmp_path / "flat", 3)
    midi = _spoil(bad)
    out = tmp_path / "out"
    assert main(["data", "warp", "--in", str(tmp_path / "flat"), "--out", str(out), "--seed", "1"]) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wss-ray: error: 1 of 3 tracks failed (the first: {bad.name}: {midi}: "
                                               "unreadable MIDI file"), err
    assert err[0].endswith(f"the 2 others are in {out}, and a rerun keeps them")
    assert f"[warp] FAILED {bad.name}: {midi}: unreadable MIDI file" in cap.out
    assert "2 tracks warped, 0 kept, 1 failed" in cap.out
    assert sorted(p.name for p in out.iterdir()) == sorted([good.name, good2.name])   # no temporary left
    assert all((out / t.name / "warp.json").is_file() for t in (good, good2))
    # a corpus whose only track fails leaves no folder behind
    _spoil(_flat(corpus, tmp_path / "one" / "test", 1)[0])
    with pytest.raises(SlakhError, match=r"1 of 1 tracks failed \(the first: test/.*; none written$"):
        warp_corpus(tmp_path / "one" / "test", tmp_path / "x" / "y", seed=1, log=lambda line: None)
    assert not (tmp_path / "x").exists()


def test_flat_corpus_and_split_folder_keep_their_layout(corpus, tmp_path):
    tracks = [t for _, t in list_tracks(corpus)][:2]
    flat = tmp_path / "flat"
    for t in tracks:
        shutil.copytree(t, flat / t.name, copy_function=os.link)
    assert warp_corpus(flat, tmp_path / "wf", seed=1, log=lambda line: None) == 2
    assert sorted(p.name for p in (tmp_path / "wf").iterdir()) == sorted(t.name for t in tracks)
    split = corpus / "test"
    assert warp_corpus(split, tmp_path / "ws", seed=1, log=lambda line: None) == len(list_tracks(split))
    assert [s for s, _ in list_tracks(tmp_path / "ws")] == ["test"] * len(list_tracks(split))


def test_out_inside_or_equal_to_in_is_refused(corpus, tmp_path):
    for out in (corpus, corpus / "warped", corpus / "train"):
        with pytest.raises(ValueError, match="overlaps --in"):
            warp_corpus(corpus, out, seed=1, log=lambda line: None)
    assert not (corpus / "warped").exists()
    with pytest.raises(SlakhError, match="no Track folders"):
        warp_corpus(tmp_path, tmp_path / "out", seed=1)


@pytest.mark.parametrize("args,option", [
    (["--max-offset", "11"], "--max-offset"), (["--max-offset", "-1"], "--max-offset"),
    (["--max-tempo", "0.5"], "--max-tempo"), (["--max-tempo", "nan"], "--max-tempo"),
    (["--drift", "-0.1"], "--drift"), (["--drift", "0.6"], "--drift"), (["--seed", "-1"], "--seed"),
])
def test_cli_refuses_bad_bounds(corpus, tmp_path, capsys, args, option):
    argv = ["data", "warp", "--in", str(corpus), "--out", str(tmp_path / "o"), "--seed", "1"] + args
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wss-ray: error: {option}:"), err
    assert not (tmp_path / "o").exists()


def _hand_made(path, resolution, first_note):
    """Controls at 0 s, pitch bends, a tempo change, a drum track: what real Slakh MIDI holds."""
    pm = pretty_midi.PrettyMIDI(resolution=resolution, initial_tempo=100)
    bass = pretty_midi.Instrument(program=33)
    for i in range(40):
        t = first_note + i * 0.37
        bass.notes.append(pretty_midi.Note(40 + i % 12, 60 + i, t, t + 0.3))
    bass.control_changes += [pretty_midi.ControlChange(7, 100, 0.0), pretty_midi.ControlChange(10, 64, 0.0),
                             pretty_midi.ControlChange(64, 127, first_note + 3.0)]
    bass.pitch_bends += [pretty_midi.PitchBend(300, first_note + 1.0), pretty_midi.PitchBend(0, first_note + 1.2)]
    drums = pretty_midi.Instrument(program=0, is_drum=True)
    drums.notes.append(pretty_midi.Note(36, 100, first_note + 2.0, first_note + 2.1))
    pm.instruments += [bass, drums]
    pm.write(str(path))
    mid = mido.MidiFile(str(path))   # a tempo change, 100 -> 140 bpm, 5 s after the first note
    tick = int(round((first_note + 5.0) * 100 / 60 * resolution))
    ticks = np.cumsum([m.time for m in mid.tracks[0]])
    at = int(np.searchsorted(ticks, tick, side="right"))
    mid.tracks[0].insert(at, mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(140), time=0))
    absolute = list(ticks[:at]) + [tick] + list(ticks[at:])
    for m, t, prev in zip(mid.tracks[0], absolute, [0] + absolute[:-1]):
        m.time = int(t - prev)
    mid.save(str(path))
    pm = pretty_midi.PrettyMIDI(str(path))
    assert len(pm.get_tempo_changes()[0]) == 2
    return pm


@pytest.mark.parametrize("resolution", [96, 220, 480])
@pytest.mark.parametrize("start", [-0.4, 0.0, 0.7])
def test_warp_midi_keeps_every_event(tmp_path, resolution, start):
    first_note = 1.0
    before = _hand_made(tmp_path / "a.mid", resolution, first_note)
    a, s = random_warp(11, 30.0, drift=0.25)
    s = s - s[0] + start   # score time at audio 0: before 0 s (cut), at it, after it (a lead-in)
    assert warp_midi(tmp_path / "a.mid", tmp_path / "b.mid", a, s) == 41
    after = pretty_midi.PrettyMIDI(str(tmp_path / "b.mid"))
    for ib, ia in zip(before.instruments, after.instruments):
        assert (ib.program, ib.is_drum) == (ia.program, ia.is_drum)
        np.testing.assert_allclose(score_to_audio([n.start for n in ia.notes], a, s), [n.start for n in ib.notes],
                                   atol=1e-3)
        assert [(c.number, c.value) for c in ia.control_changes] == [(c.number, c.value) for c in ib.control_changes]
        assert [b.pitch for b in ia.pitch_bends] == [b.pitch for b in ib.pitch_bends]
        np.testing.assert_allclose(score_to_audio([b.time for b in ia.pitch_bends], a, s),
                                   [b.time for b in ib.pitch_bends], atol=1e-3)
    ccs = after.instruments[0].control_changes
    assert min(c.time for c in ccs) >= 0
    np.testing.assert_allclose(ccs[2].time, np.interp(before.instruments[0].control_changes[2].time, a, s), atol=1e-3)


def test_warp_midi_refuses_notes_before_zero_and_a_short_map(tmp_path):
    _hand_made(tmp_path / "a.mid", 220, 0.5)
    a, s = random_warp(1, 30.0)
    with pytest.raises(SlakhError, match=r"a\.mid: its note at 0\.\d+ s would move to -0\.\d+ s, before 0 s"):
        warp_midi(tmp_path / "a.mid", tmp_path / "b.mid", a, s - np.interp(0.5, a, s) - 0.5)
    with pytest.raises(SlakhError, match=r"a\.mid: runs to .* past the warp's end"):
        warp_midi(tmp_path / "a.mid", tmp_path / "b.mid", a[:40], s[:40])
    assert not (tmp_path / "b.mid").exists()


def test_a_tempo_slower_than_midi_allows_is_named(tmp_path):
    _hand_made(tmp_path / "a.mid", 220, 0.5)
    # 50 ms of the file stretched over 99 s: a tempo slower than 24 bits of µs per quarter note
    a, s = np.array([0.0, 1.0, 1.05, 30.0]), np.array([0.0, 1.0, 100.0, 129.0])
    with pytest.raises(SlakhError, match=r"a\.mid: the warp holds the score still for too long at 1\.00 s \(.*a MIDI "
                                         r"tempo cannot be slower than 16\.78 s per quarter note\)"):
        warp_midi(tmp_path / "a.mid", tmp_path / "b.mid", a, s)
    assert not (tmp_path / "b.mid").exists()


def test_a_file_that_fails_its_check_is_not_written(tmp_path, monkeypatch):
    from wss_ray.data import warp

    _hand_made(tmp_path / "a.mid", 220, 0.5)
    monkeypatch.setattr(warp, "TOLERANCE_S", -1.0)   # no file can pass
    with pytest.raises(SlakhError, match=r"b\.mid: a warped note is .* ms from where the warp puts it"):
        warp_midi(tmp_path / "a.mid", tmp_path / "b.mid", *random_warp(1, 30.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mid"]


def test_load_warp_names_a_damaged_file(tmp_path):
    with pytest.raises(SlakhError, match="warp.json: missing"):
        load_warp(tmp_path)
    (tmp_path / "warp.json").write_text("{not json")
    with pytest.raises(SlakhError, match="warp.json: not valid JSON"):
        load_warp(tmp_path)
    (tmp_path / "warp.json").write_text(json.dumps({"version": 1, "audio_s": [0, 1, 2], "score_s": [0, 2, 1]}))
    with pytest.raises(SlakhError, match="warp.json: damaged warp map .*strictly increasing"):
        load_warp(tmp_path)
    (tmp_path / "warp.json").write_text(json.dumps({"version": 1, "audio_s": [0, 1]}))
    with pytest.raises(SlakhError, match="warp.json: damaged warp map"):
        load_warp(tmp_path)


def test_score_to_audio_inverts_the_map():
    a, s = random_warp(2, 20.0)
    t = np.linspace(0, 20, 999)
    np.testing.assert_allclose(score_to_audio(np.interp(t, a, s), a, s), t, atol=1e-9)
    # outside the map: continued at its end slopes
    assert score_to_audio(s[0] - 1.0, a, s) < 0 and score_to_audio(s[-1] + 1.0, a, s) > a[-1]
