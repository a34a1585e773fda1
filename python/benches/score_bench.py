"""xent.score from Python against the same work without Python, and against PyTorch.

Measures, in one process and one run (issue 11's figures for BENCHMARKS.md):
  - xent.score(logits, targets, device="cpu") on a numpy [rows, vocab] float32 array;
  - `xent bench --device cpu` (the CLI's own timing of the same path, same shape) in between;
  - torch.nn.functional.cross_entropy(reduction="none") on the same array (torch.from_numpy:
    no copy), when torch is importable (not a dependency of the package or of CI);
  - peak resident memory before and after the first xent.score: the logits are read in place,
    so the peak grows by the outputs (a few bytes per row), not by a copy of the array.

Usage: python benches/score_bench.py [--rows 2048] [--vocab 128256] [--repeats 7] [--xent-bin PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

import xent


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def median_ms(f, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cli_ms(xent_bin: str, rows: int, vocab: int, repeats: int) -> float:
    out = subprocess.run(
        [xent_bin, "bench", "--rows", str(rows), "--vocab", str(vocab), "--dtype", "f32", "--device", "cpu",
         "--iters", str(repeats), "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    rows_ = [r for r in json.loads(out)["results"] if r["path"] == "cpu fast"]
    return rows_[0]["ms"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--repeats", type=int, default=7)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--xent-bin", default=os.path.join(here, "..", "..", "target", "release", "xent"))
    a = ap.parse_args()

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((a.rows, a.vocab), dtype=np.float32)
    targets = rng.integers(0, a.vocab, a.rows, dtype=np.int64)
    gib = logits.nbytes / 2**30

    before_peak, before_now = peak_rss_mib(), current_rss_mib()
    first = xent.score(logits, targets, device="cpu")
    after_peak = peak_rss_mib()
    print(f"logits {a.rows} x {a.vocab} f32: {gib:.2f} GiB", file=sys.stderr)
    print(
        f"resident before the first xent.score: {before_now:.0f} MiB (peak {before_peak:.0f} MiB); "
        f"peak after: {after_peak:.0f} MiB (+{after_peak - before_peak:.0f} MiB)",
        file=sys.stderr,
    )

    py1 = median_ms(lambda: xent.score(logits, targets, device="cpu"), a.repeats)
    cli = cli_ms(a.xent_bin, a.rows, a.vocab, a.repeats)
    py2 = median_ms(lambda: xent.score(logits, targets, device="cpu"), a.repeats)
    py = statistics.median([py1, py2])

    torch_ms = None
    try:
        import torch
        import torch.nn.functional as F

        x, t = torch.from_numpy(logits), torch.from_numpy(targets)
        ref = F.cross_entropy(x, t, reduction="none").numpy()
        worst = float(np.max(np.abs(ref - first.nll)))
        torch_ms = median_ms(lambda: F.cross_entropy(x, t, reduction="none"), a.repeats)
        print(f"torch {torch.__version__} ({torch.get_num_threads()} threads); max |xent - torch| nll {worst:.2e}",
              file=sys.stderr)
    except ImportError:
        print("torch not importable: its column is skipped", file=sys.stderr)

    print(f"| path | median ms | GB/s | vs xent.score |")
    print(f"|---|---:|---:|---:|")
    gb = logits.nbytes / 1e9
    print(f"| xent.score (Python, numpy in place) | {py:.1f} | {gb / py * 1e3:.2f} | 1.00 |")
    print(f"|   (first / second block) | {py1:.1f} / {py2:.1f} | | |")
    print(f"| xent bench --device cpu (CLI) | {cli:.1f} | {gb / cli * 1e3:.2f} | {cli / py:.2f} |")
    if torch_ms is not None:
        print(f"| torch F.cross_entropy(reduction='none') | {torch_ms:.1f} | {gb / torch_ms * 1e3:.2f} | "
              f"{torch_ms / py:.2f} |")
    print(f"\npeak RSS growth over the first xent.score of a {gib:.2f} GiB array: "
          f"{after_peak - before_peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
