"""Separator checkpoints scored with and without Open-Unmix's Wiener post-filters
(``openunmix.filtering.wiener``, which the reference's ``Separator`` runs at inference) on the
multi-source table: ``raw`` (the masks on the mixture, what ``separate``/``evaluate`` do),
``softmask`` (the estimates' magnitudes as ratio masks, so the estimates sum to the mixture) and
``em1`` (one expectation-maximisation iteration, the reference's default). Mask backbones only:
a waveform backbone's estimates are its own.

    python benchmarks/bench_postfilter.py CKPT [CKPT ...] --data FEATURES [--split validation]
        [--filters raw softmask em1] [--out DIR]

The library's inference is unchanged: ``evaluate`` has no post-filter hook, so the bench swaps
``Estimates.spectra`` for the run. Writes ``postfilter.json`` and ``postfilter.md`` into --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from openunmix.filtering import wiener

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo, without an install
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_backbones import averages  # noqa: E402
from wss_ray import separation  # noqa: E402
from wss_ray.evaluate import evaluate  # noqa: E402

FILTERS = {"raw": None, "softmask": (0, True), "em1": (1, False)}


def postfilter(est_spec: torch.Tensor, mix_spec: torch.Tensor, name: str) -> torch.Tensor:
    """Source spectra (B, K, F, N) after the post-filter ``name`` (a key of FILTERS), from the
    masked estimates ``est_spec`` and the mixture's STFT ``mix_spec`` (B, F, N)."""
    if FILTERS[name] is None:
        return est_spec
    iterations, softmask = FILTERS[name]
    out = []
    for v, x in zip(est_spec.abs(), mix_spec):
        # the reference's layout: (frames, bins, channels, sources) and (frames, bins, channels, 2);
        # float64 as the reference's EM is ill-conditioned in float32 on near-silent bins
        v = v.permute(2, 1, 0)[:, :, None].double()
        x = torch.view_as_real(x.T.contiguous())[:, :, None].double()
        y = wiener(v, x, iterations, softmask=softmask)             # (frames, bins, 1, 2, sources)
        out.append(torch.view_as_complex(y[:, :, 0].permute(3, 1, 0, 2).contiguous()))
    return torch.stack(out).to(est_spec.dtype)


@contextlib.contextmanager
def filtered(name: str):
    """Every mask backbone's estimates, inside the block, go through ``postfilter(name)``."""
    spectra = separation.Estimates.spectra

    def patched(self, stft):
        spec = spectra(self, stft)
        return spec if self.masks is None else postfilter(spec, self.spec, name)

    separation.Estimates.spectra = patched
    try:
        yield
    finally:
        separation.Estimates.spectra = spectra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--data", required=True, help="features (a featurized folder)")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--filters", nargs="+", default=list(FILTERS), choices=list(FILTERS))
    ap.add_argument("--out", default="bench_postfilter")
    a = ap.parse_args()
    from wss_ray.separate import Separator

    for c in a.checkpoints:
        # a waveform backbone (Conv-TasNet, Open-Unmix on its own STFT) has no masks on the
        # project's STFT to filter: its columns would all be its raw figure
        if separation.domain(Separator.from_checkpoint(c).separator) == "wave":
            print(f"bench_postfilter: {c}: a waveform backbone; the post-filters act on mask backbones' estimates",
                  file=sys.stderr)
            sys.exit(2)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"data": a.data, "split": a.split, "checkpoints": a.checkpoints, "avg": {}}
    for name in a.filters:
        with filtered(name):
            table = evaluate(a.checkpoints, a.data, out / name, split=a.split, log=lambda *_: None)
        report["avg"][name] = averages(table)
        print(f"[bench_postfilter] {name}: " + ", ".join(f"{s} {v:.2f}" for s, v in report["avg"][name].items()),
              flush=True)
    (out / "postfilter.json").write_text(json.dumps(report, indent=2))
    systems = list(next(iter(report["avg"].values())))
    lines = [f"Multi-source SI-SDR avg (dB) on {a.data} / {a.split}, by post-filter", "",
             "| system | " + " | ".join(a.filters) + " |", "|---|" + "---|" * len(a.filters)]
    lines += [f"| {s} | " + " | ".join(f"{report['avg'][f][s]:.2f}" for f in a.filters) + " |" for s in systems]
    # evaluate names the checkpoints' rows by their stage (a repeat gets "#2", "#3", ...)
    lines += ["", "checkpoints, in order: " + ", ".join(a.checkpoints)]
    (out / "postfilter.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
