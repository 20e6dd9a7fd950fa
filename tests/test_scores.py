"""The real-composition test corpus: music21's public-domain scores, parts given to bass,
guitar and piano by register, rendered in the Slakh layout and read by the Slakh reader."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import yaml

from wss_ray.data.scores import PIECES, ScoreCorpusError, piece_parts, render_score_corpus
from wss_ray.data.slakh import list_tracks, load_track, read_sources


def test_no_bach_anywhere():
    assert not [p for p in PIECES if "bach" in p.lower()]
    with pytest.raises(ScoreCorpusError, match="Bach is kept for an independent check"):
        piece_parts("bach/bwv66.6.mxl")


def test_quartet_parts_map_by_register_and_render(tmp_path, soundfont, data_cfg):
    parts = piece_parts("mozart/k156/movement1.mxl")
    assert [t for t, _ in parts].count("bass") == 1 and [t for t, _ in parts].count("piano") == 1
    assert [t for t, _ in parts].count("guitar") == 2                   # the inner voices
    for target, notes in parts:
        lo, hi = {"bass": (28, 60), "guitar": (40, 84), "piano": (21, 108)}[target]
        assert lo <= notes[:, 2].min() and notes[:, 2].max() <= hi
    render_score_corpus(tmp_path / "sc", n=2, seconds=4, seed=1, soundfont=soundfont, sample_rate=16000,
                        workers=1, pieces=("mozart/k156/movement1.mxl",), log=lambda line: None)
    tracks = list_tracks(tmp_path / "sc")
    assert [s for s, _ in tracks] == ["test", "test"]
    for _, t in tracks:
        meta = yaml.safe_load((t / "metadata.yaml").read_text())
        assert meta["synthetic"]["mode"].startswith("mozart/k156/movement1.mxl@")
        src = read_sources("test", t, data_cfg)
        assert len(src.stems["guitar"]) == 2 and len(src.stems["bass"]) == 1 and len(src.stems["piano"]) == 1
        audio = load_track(src, data_cfg)
        assert (np.abs(audio.stems).max(axis=1) > 0.01).all()           # every target sounds
        mix, _ = sf.read(t / "mix.flac", dtype="int16")
        total = sum(sf.read(p, dtype="int16")[0].astype(np.int64) for p in sorted((t / "stems").glob("*.flac")))
        assert np.array_equal(total, mix.astype(np.int64))


def test_pieces_parsed_side_by_side_give_the_same_excerpts_in_order():
    from wss_ray.data.scores import excerpts

    # a piece music21 cannot expand sits between two that it can: skipped with its line either way
    pieces = ("mozart/k156/movement1.mxl", "haydn/opus74no1/movement3.mxl", "mozart/k155/movement2.mxl",
              "mozart/k156/movement2.mxl")
    runs = {}
    for workers in (1, 2):
        lines: list[str] = []
        runs[workers] = (excerpts(pieces, 3, 8.0, log=lines.append, workers=workers), lines)
    (one, lines1), (two, lines2) = runs[1], runs[2]
    assert lines1 == lines2 and lines1[0].startswith("[scores] skipped haydn/opus74no1/movement3.mxl: unreadable")
    assert [(e["piece"], e["start"]) for e in one] == [(e["piece"], e["start"]) for e in two]
    assert [e["piece"] for e in one] == ["mozart/k156/movement1.mxl"] * 2 + ["mozart/k155/movement2.mxl"]
    for a, b in zip(one, two):
        assert [t for t, _ in a["parts"]] == [t for t, _ in b["parts"]]
        assert all(np.array_equal(x, y) for (_, x), (_, y) in zip(a["parts"], b["parts"]))
