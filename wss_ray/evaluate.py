"""Evaluation like the paper's Table 1: SI-SDR per instrument on the chunks where that
instrument's reference is audible, for the input mixture, the oracle ideal ratio mask and
every checkpoint; frame-level transcription P/R/F1 (mir_eval.multipitch) for the
transcriptors the checkpoints hold.

The main table is over **multi-source chunks** (at least two targets audible): where one
instrument plays alone the mixture *is* its reference and scores +30 dB or more, which lifts
the mixture row's mean and hides every separator's gain. The all-chunks table comes beside it.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import torch

from wss_ray.atomic import atomic_path, check_out_folder, write_text
from wss_ray.config import Config
from wss_ray.data.contract import MODEL_SIGNAL_KEYS
from wss_ray.data.dataset import iter_local, load_manifest
from wss_ray.dsp import STFT, midi_to_hz
from wss_ray.losses import SILENCE_PEAK, si_sdr
from wss_ray.separate import Separator

PAPER_ORDER = ("bass", "guitar", "piano")
# the separation problem: chunks where at least this many targets are audible
MIN_SOURCES = 2
RESULTS_VERSION = 2


def oracle_irm(spec: torch.Tensor, stems_spec: torch.Tensor, stft: STFT, length: int) -> torch.Tensor:
    """Ideal ratio mask |S_k| / Σ_j |S_j| on the mixture STFT: the ceiling of mask-based separation."""
    mag = stems_spec.abs()
    mask = mag / mag.sum(dim=1, keepdim=True).clamp(min=1e-8)
    return stft.inverse(mask * spec[:, None], length)


def multipitch_prf(pred: np.ndarray, ref: np.ndarray, fps: float, pitch_min: int) -> tuple[float, float, float]:
    """Frame-level P/R/F1 with mir_eval.multipitch on binary (P, N) rolls."""
    import mir_eval

    times = np.arange(ref.shape[1]) / fps
    hz = np.array([float(midi_to_hz(pitch_min + p)) for p in range(ref.shape[0])])
    ref_f = [hz[np.nonzero(ref[:, n])[0]] for n in range(ref.shape[1])]
    est_f = [hz[np.nonzero(pred[:, n])[0]] for n in range(pred.shape[1])]
    if not any(len(f) for f in ref_f) and not any(len(f) for f in est_f):
        return 1.0, 1.0, 1.0
    scores = mir_eval.multipitch.evaluate(times, ref_f, times, est_f)
    p, r = scores["Precision"], scores["Recall"]
    return float(p), float(r), float(2 * p * r / (p + r) if p + r > 0 else 0.0)


def expand_checkpoints(paths: list[str]) -> list[str]:
    """A Tune experiment folder (or its best.json) stands for every trial that left a
    checkpoint, so a sweep over masks or adversarial losses gives one row per trial."""
    out = []
    for p in paths:
        record = Path(p) / "best.json" if Path(p).is_dir() else Path(p)
        if record.suffix == ".json" and record.is_file():
            try:
                rec = json.loads(record.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{record}: not valid JSON ({e})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("trials"), list):
                raise ValueError(f"{record}: not a Tune handoff record (no 'trials' list); pass a checkpoint "
                                 "folder, a Tune experiment folder or its best.json")
            if not all(isinstance(t, dict) and isinstance(t.get("checkpoint", ""), (str, type(None)))
                       for t in rec["trials"]):
                raise ValueError(f"{record}: not a Tune handoff record (each trial must be an object whose "
                                 "'checkpoint' is a path)")
            ok = [t["checkpoint"] for t in rec["trials"] if t.get("status") == "ok" and t.get("checkpoint")]
            if not ok:
                raise ValueError(f"{record}: no trial finished with a checkpoint")
            out += ok
        else:
            out.append(p)
    return out


def batch_tracks(batch: dict, mask: torch.Tensor) -> str:
    """Which chunks of a batch a mask selects, as words (track/chunk when the batch has them)."""
    idx = torch.nonzero(mask).flatten().tolist()
    if "track" in batch:
        return ", ".join(f"{batch['track'][i]}#{int(batch['chunk'][i])}" for i in idx[:5])
    return f"{len(idx)} chunk(s)"


def table_rows(scores: dict, multi: dict, insts: list[str], only_multi: bool) -> list[dict]:
    """Mean/median SI-SDR per (system, instrument) over the audible chunks (only the
    multi-source ones when asked)."""
    rows = []
    for sysname, per_inst in scores.items():
        for k, inst in enumerate(insts):
            v = np.array(per_inst[k])
            if only_multi:
                v = v[np.array(multi[k], bool)] if len(v) else v
            rows.append({"system": sysname, "instrument": inst,
                         "si_sdr_mean": float(v.mean()) if len(v) else float("nan"),
                         "si_sdr_median": float(np.median(v)) if len(v) else float("nan"),
                         "n_chunks": int(len(v))})
    return rows


def rows_of(results) -> list[dict]:
    """The main table's rows of a results.json (version 2: multi-source; version 1: a list)."""
    if isinstance(results, list):
        return results
    return results["multi_source"]["rows"]


def evaluate(checkpoints: list[str], data: str | Path, out: str | Path, split: str = "test",
             cfg: Config | None = None, examples: int = 0, batch_size: int = 16, log=print,
             device: str = "cpu", score_informed: bool = False) -> list[dict]:
    """Score every checkpoint on ``split``; writes results.{md,csv,json,png} and the per-chunk
    distribution plot; returns the multi-source table's rows. On failure nothing this call
    created is left behind (folders, example WAVs).

    ``score_informed``: also a "<system>+score" row per checkpoint, its masks restricted to the
    harmonics of the chunk's score (the features' rolls: the exact score, or the aligned one
    for features made with ``--align``), as ``wss-ray separate --score`` does."""
    out = check_out_folder(out)
    made = [d for d in (out / "examples", out, *out.parents) if not d.exists()]   # innermost first
    try:
        return _evaluate(checkpoints, data, out, split, examples, batch_size, log, device, score_informed)
    except BaseException:
        if out / "examples" in made:
            shutil.rmtree(out / "examples", ignore_errors=True)
        for d in made:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise


def _evaluate(checkpoints, data, out: Path, split, examples, batch_size, log, device,
              score_informed: bool = False) -> list[dict]:
    import soundfile as sf

    manifest = load_manifest(data)
    insts = manifest["instruments"]
    checkpoints = expand_checkpoints(checkpoints)
    seps = [Separator.from_checkpoint(c, device=device) for c in checkpoints]
    for c, s in zip(checkpoints, seps):
        if s.instruments != insts:
            raise ValueError(f"{c}: trained on {s.instruments}, the data has {insts}")
        for key in MODEL_SIGNAL_KEYS:
            if getattr(s, key) != manifest[key]:
                raise ValueError(f"{c}: trained with {key}={getattr(s, key)}, the features in {data} have "
                                 f"{manifest[key]}")
    names, seen = [], {}
    for s in seps:
        n = s.system
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    systems = ["mixture", "oracle_irm"] + names + ([f"{n}+score" for n in names] if score_informed else [])
    stft = STFT(manifest["n_fft"], manifest["hop"])
    scores = {s: [[] for _ in insts] for s in systems}
    multi = [[] for _ in insts]          # per instrument, per scored chunk: multi-source or not
    rolls_ref, rolls_est = [], {n: [] for n, s in zip(names, seps) if s.transcriptor is not None}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ex_left = examples
    n_chunks = n_multi = 0
    for batch in iter_local(data, split, batch_size, with_stems=True):
        mix, refs = batch["mix"], batch["stems"]
        L = mix.shape[-1]
        spec = stft(mix)
        audible = refs.abs().amax(dim=-1) > SILENCE_PEAK                      # (B, K)
        several = audible.sum(dim=1) >= MIN_SOURCES                            # (B,)
        n_multi += int(several.sum())
        for k in range(len(insts)):
            multi[k] += several[audible[:, k]].tolist()
        ests = {"mixture": mix[:, None].expand_as(refs), "oracle_irm": oracle_irm(spec, stft(refs), stft, L)}
        for n, s in zip(names, seps):
            if score_informed:   # one forward pass for both rows
                free, scored = s.separate_batch_scored(mix, batch["roll"])
                ests[n], ests[f"{n}+score"] = free.cpu(), scored.cpu()
            else:
                ests[n] = s.separate_batch(mix).cpu()
            if n in rolls_est:
                rolls_est[n].append((s.transcribe_batch(mix).cpu() > 0.5).numpy())
        rolls_ref.append(batch["roll"].numpy() > 0.5)
        for sysname, est in ests.items():
            sdr = si_sdr(est, refs)
            if not torch.isfinite(sdr[audible]).all():
                bad = batch_tracks(batch, (~torch.isfinite(sdr) & audible).any(dim=1))
                raise ValueError(f"{sysname}: non-finite SI-SDR on {data}/{split} ({bad}): a NaN/Inf estimate or "
                                 "reference; a mean around it would look valid, so nothing is reported")
            for k in range(len(insts)):
                scores[sysname][k] += sdr[:, k][audible[:, k]].tolist()
        for i in range(min(ex_left, len(mix))):
            sr = manifest["sample_rate"]
            # each example folder replaced whole: a re-evaluation never mixes old and new WAVs
            with atomic_path(out / "examples" / f"example{examples - ex_left + 1:02d}", directory=True) as folder:
                sf.write(folder / "mixture.wav", mix[i].numpy(), sr)
                for k, inst in enumerate(insts):
                    sf.write(folder / f"reference_{inst}.wav", refs[i, k].numpy(), sr)
                    for n in names:
                        sf.write(folder / f"{n.replace('[', '_').replace(']', '').replace('+', '-')}_{inst}.wav",
                                 ests[n][i, k].numpy(), sr)
            ex_left -= 1
        n_chunks += len(mix)
    if n_chunks == 0:
        raise ValueError(f"{data}/{split}: no chunks to evaluate")

    rows_all = table_rows(scores, multi, insts, only_multi=False)
    rows = table_rows(scores, multi, insts, only_multi=True)
    trans = []
    if rolls_est:
        ref = np.concatenate(rolls_ref)                              # (C, K, P, N)
        fps = manifest["sample_rate"] / manifest["hop"]
        for n, parts in rolls_est.items():
            est = np.concatenate(parts)
            for k, inst in enumerate(insts):
                flat = lambda r: np.concatenate(list(r[:, k]), axis=-1)  # chunks side by side in time
                p, r, f = multipitch_prf(flat(est), flat(ref), fps, manifest["pitch_min"])
                trans.append({"system": n, "instrument": inst, "precision": p, "recall": r, "f1": f})
    table = (results_markdown(rows, trans, insts, split, n_multi,
                              title=f"multi-source chunks (at least {MIN_SOURCES} targets audible)")
             + "\n" + results_markdown(rows_all, [], insts, split, n_chunks, title="all chunks", gap=False))
    per_chunk = {s: {inst: [round(v, 3) for v, m in zip(scores[s][k], multi[k]) if m] for k, inst in enumerate(insts)}
                 for s in systems}
    results = {"version": RESULTS_VERSION, "split": split, "data_fingerprint": manifest["fingerprint"],
               "multi_source": {"min_sources": MIN_SOURCES, "chunks": n_multi, "rows": rows,
                                "per_chunk_si_sdr": per_chunk},
               "all_chunks": {"chunks": n_chunks, "rows": rows_all}}
    write_text(out / "results.json", json.dumps(results, indent=2))
    write_text(out / "transcription.json", json.dumps(trans, indent=2))
    with atomic_path(out / "results.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["table"] + list(rows[0]))
        w.writeheader()
        w.writerows([{"table": "multi_source", **r} for r in rows] + [{"table": "all_chunks", **r} for r in rows_all])
    write_text(out / "results.md", table)
    from wss_ray.plots import plot_distributions, plot_results

    plot_results(rows, out / "results.png", f"SI-SDR (dB) on {split}, mean over multi-source chunks")
    plot_distributions(per_chunk, out / "results_distribution.png",
                       f"SI-SDR (dB) per multi-source chunk on {split}")
    log(table)
    log(f"[evaluate] results in {out}/results.{{md,csv,json,png}}, results_distribution.png"
        + (f"; examples in {out}/examples" if examples else ""))
    return rows


# below this mixture -> supervised distance (dB), "gap closed" percentages are noise
MIN_GAP_DB = 1.0


def results_markdown(rows: list[dict], trans: list[dict], insts: list[str], split: str, n_chunks: int,
                     title: str = "", gap: bool = True) -> str:
    order = [i for i in PAPER_ORDER if i in insts] + [i for i in insts if i not in PAPER_ORDER]
    by = {(r["system"], r["instrument"]): r for r in rows}
    systems = list(dict.fromkeys(r["system"] for r in rows))

    def avg(sysname, key):
        return float(np.nanmean([by[(sysname, i)][key] for i in insts]))

    has_gap = gap and "mixture" in systems and "supervised" in systems
    lo = avg("mixture", "si_sdr_mean") if has_gap else float("nan")
    gap_db = avg("supervised", "si_sdr_mean") - lo if has_gap else float("nan")
    lines = [f"SI-SDR (dB) on {split}{', ' + title if title else ''}: {n_chunks} chunks; mean over chunks "
             f"where the reference is audible (median in parentheses)", ""]
    head = "| system | " + " | ".join(order) + " | avg |" + (" gap closed |" if has_gap else "")
    lines += [head, "|" + "---|" * (len(order) + 2 + has_gap)]
    for s in systems:
        cells = [f"{by[(s, i)]['si_sdr_mean']:.2f} ({by[(s, i)]['si_sdr_median']:.2f})"
                 if by[(s, i)]["n_chunks"] else "–" for i in order]
        line = f"| {s} | " + " | ".join(cells) + f" | {avg(s, 'si_sdr_mean'):.2f} |"
        if has_gap:
            if gap_db >= MIN_GAP_DB:
                line += f" {(avg(s, 'si_sdr_mean') - lo) / gap_db * 100:.0f}% |"
            else:
                line += " – |"
        lines.append(line)
    lines.append("")
    if has_gap and not gap_db >= MIN_GAP_DB:
        lines += [f"gap closed: left out, the supervised separator is {gap_db:.2f} dB above the mixture on "
                  f"average (under {MIN_GAP_DB:g} dB: shares of so narrow a gap mean nothing; train longer)", ""]
    lines.append("n_chunks per instrument: " + ", ".join(f"{i} {by[(systems[0], i)]['n_chunks']}" for i in order))
    if trans:
        lines += ["", "Frame-level transcription (mir_eval.multipitch) of the transcriptor each checkpoint holds",
                  "", "| system | " + " | ".join(f"{i} P/R/F1" for i in order) + " |",
                  "|" + "---|" * (len(order) + 1)]
        tb = {(t["system"], t["instrument"]): t for t in trans}
        for s in dict.fromkeys(t["system"] for t in trans):
            lines.append(f"| {s} | " + " | ".join(
                f"{tb[(s, i)]['precision']:.2f}/{tb[(s, i)]['recall']:.2f}/{tb[(s, i)]['f1']:.2f}" for i in order) + " |")
    return "\n".join(lines) + "\n"


# the paper's ordering, best first; "finetune" stands for the best fine-tuned row
PAPER_ORDERING = ("supervised", "finetune", "separator[c+h]", "baseline", "mixture")


def _avg(rows: list[dict], system: str) -> float:
    """A row's average over instruments, as the results table computes it (instruments with no
    multi-source chunk left out)."""
    v = [r["si_sdr_mean"] for r in rows if r["system"] == system]
    return float(np.nanmean(v)) if v and not np.isnan(v).all() else float("nan")


def _spread(v: list[float]) -> str:
    """mean ± sample standard deviation (ddof=1: with 2-3 seeds the population figure
    understates the spread)."""
    v = [x for x in v if not np.isnan(x)]
    if not v:
        return "–"
    return f"{np.mean(v):.2f} ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def ordering_holds(rows: list[dict]) -> bool | None:
    """Whether the multi-source averages follow the paper's ordering (None: a row is missing)."""
    systems = {r["system"] for r in rows}
    fine = [s for s in systems if s.startswith("finetune") and not s.endswith("+score")]
    finite = [f for f in fine if not np.isnan(_avg(rows, f))]
    chain = [s if s != "finetune" else (max(finite, key=lambda f: _avg(rows, f)) if finite else None)
             for s in PAPER_ORDERING]
    if any(s is None or s not in systems for s in chain):
        return None
    avgs = [_avg(rows, s) for s in chain]
    if np.isnan(avgs).any():
        return None
    return all(a > b for a, b in zip(avgs, avgs[1:]))


def seeds_markdown(per_seed: dict[int, list[dict]], insts: list[str], title: str) -> tuple[str, dict]:
    """Mean ± standard deviation over seeds of each row's multi-source SI-SDR, and whether the
    paper's ordering holds in each seed."""
    order = [i for i in PAPER_ORDER if i in insts] + [i for i in insts if i not in PAPER_ORDER]
    systems = list(dict.fromkeys(r["system"] for rows in per_seed.values() for r in rows))
    lines = [f"{title}: mean ± sample std over seeds {sorted(per_seed)} (multi-source chunks)", "",
             "| system | " + " | ".join(order) + " | avg |", "|" + "---|" * (len(order) + 2)]
    summary: dict = {"seeds": sorted(per_seed), "rows": {}}
    for s in systems:
        cells, per_inst = [], {}
        for i in order:
            v = [r["si_sdr_mean"] for rows in per_seed.values() for r in rows if r["system"] == s and r["instrument"] == i]
            per_inst[i] = v
            cells.append(_spread(v))
        avg = [_avg(rows, s) for rows in per_seed.values() if any(r["system"] == s for r in rows)]
        summary["rows"][s] = {**per_inst, "avg": avg}
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {_spread(avg)} |")
    holds = {seed: ordering_holds(rows) for seed, rows in per_seed.items()}
    summary["ordering_holds"] = holds
    lines += ["", "paper ordering (" + " > ".join(PAPER_ORDERING) + ") on the average: "
              + ", ".join(f"seed {k} {'holds' if v else 'n/a' if v is None else 'fails'}" for k, v in holds.items())]
    return "\n".join(lines) + "\n", summary
