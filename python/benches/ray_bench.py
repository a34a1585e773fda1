#!/usr/bin/env python3
"""Ray sharded scoring vs one ``xent score`` process, for BENCHMARKS.md.

Writes 8 shards of [2048, 32000] bf16 logits (.safetensors, BF16) with int64 targets (.npy) under
``--dir`` (kept and reused when present), then times, ``--repeats`` times each (medians reported):

- ``xent score --device cpu --json`` over all shards, one process (``--xent-bin``);
- ``ray_eval.py --device cpu --json`` as its own process, starting a local ``--num-cpus`` cluster:
  launch to exit, ``ray.init``, and submit-to-merged;
- ``ray_eval.run`` in this process on an already running local cluster (workers warm after the
  first repeat): submit-to-merged.

Peak RSS: the single process's (GNU ``/usr/bin/time -f %M``, as BENCHMARKS.md measures it), and
the largest peak of any Ray worker that scored (each task returns its worker's VmHWM), next to an
idle worker's after ``import xent``. The merged summaries of every run are checked equal to the single
process's (exact sums). Inputs are read from the page cache after the first run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "ray_eval.py"
EXACT = ("tokens", "ignored", "correct", "nan", "infinite", "sum_nll_fixed", "sum_nll_sq_fixed")


def write_safetensors_bf16(path: Path, name: str, bits: np.ndarray) -> None:
    """A one-tensor .safetensors file of BF16 (``bits``: the uint16 patterns), written by hand."""
    header = json.dumps(
        {name: {"dtype": "BF16", "shape": list(bits.shape), "data_offsets": [0, bits.nbytes]}},
        separators=(",", ":"),
    ).encode()
    header += b" " * (-len(header) % 8)  # pad so the data starts 8-byte aligned (spaces are allowed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little"))
        fh.write(header)
        fh.write(np.ascontiguousarray(bits, dtype="<u2").tobytes())
    os.replace(tmp, path)


def generate(d: Path, shards: int, rows: int, vocab: int) -> tuple[list[str], list[str]]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    logits, targets = [], []
    want = rows * vocab * 2
    for i in range(shards):
        lp, tp = d / f"shard-{i:03d}.safetensors", d / f"shard-{i:03d}-targets.npy"
        logits.append(str(lp))
        targets.append(str(tp))
        if lp.exists() and tp.exists() and lp.stat().st_size > want:
            continue
        print(f"writing {lp} ...", file=sys.stderr, flush=True)
        x = rng.standard_normal((rows, vocab), dtype=np.float32) * 2.5
        t = rng.integers(0, vocab, size=rows, dtype=np.int64)
        hit = rng.random(rows) < 0.35
        x[np.arange(rows)[hit], t[hit]] += 8.0
        t[rng.random(rows) < 0.02] = -100
        # f32 -> bf16, round to nearest even, as a model would emit it.
        u = x.view(np.uint32)
        bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        del x, u
        write_safetensors_bf16(lp, "logits", bits)
        np.save(tp, t)
    return logits, targets


def run_timed(cmd: list[str]) -> tuple[float, int, str, str]:
    """Runs cmd; returns (wall seconds, peak RSS KiB of the process itself, stdout, stderr).

    The peak RSS comes from GNU time (``/usr/bin/time -f %M``), as in BENCHMARKS.md: the
    ru_maxrss that wait4 reports for a child spawned straight from this process would also count
    this process's own peak (Python spawns with vfork, and exec keeps the old image's peak).
    """
    import tempfile

    timer = ["/usr/bin/time", "-f", "peak-rss-kib %M"] if os.path.exists("/usr/bin/time") else []
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        rc = subprocess.run(timer + cmd, stdout=out, stderr=err, text=True).returncode
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if rc != 0:
        raise SystemExit(f"{cmd[0]} failed ({rc}):\n{stderr}")
    rss = -1
    if timer:
        last = stderr.rstrip().rsplit("\n", 1)[-1]
        rss = int(last.split()[1]) if last.startswith("peak-rss-kib ") else -1
    return wall, rss, stdout, stderr


def load_example():
    spec = importlib.util.spec_from_file_location("ray_eval", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["ray_eval"] = mod
    spec.loader.exec_module(mod)
    return mod


def exact(d) -> dict:
    obj = json.loads(d) if isinstance(d, str) else d
    return {k: obj[k] for k in EXACT}


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/xent-ray-bench")
    ap.add_argument("--xent-bin", default="/work/main/target/release/xent")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    a = ap.parse_args()

    logits, targets = generate(Path(a.dir), a.shards, a.rows, a.vocab)
    d = Path(a.dir)
    lglob, tglob = str(d / "shard-*.safetensors"), str(d / "shard-*-targets.npy")
    gib = sum(os.path.getsize(p) for p in logits) / 2**30

    # (a) one xent process over every shard. (A warm-up run first: page cache, as for every run.)
    cli = [a.xent_bin, "score", "--logits", lglob, "--targets", tglob, "--device", "cpu", "--json", "--quiet"]
    run_timed(cli)
    a_wall, a_rss, a_sec = [], [], []
    for _ in range(a.repeats):
        wall, rss, out, _ = run_timed(cli)
        res = json.loads(out)
        a_wall.append(wall)
        a_rss.append(rss)
        a_sec.append(res["seconds"])
    reference = exact(res)
    tokens = res["tokens"]

    # (b) the example as its own driver, starting a local cluster each time.
    script = [sys.executable, str(EXAMPLE), "--logits", lglob, "--targets", tglob, "--device", "cpu", "--json",
              "--num-cpus", str(a.num_cpus)]
    b_wall, b_init, b_score, b_rss = [], [], [], []
    for _ in range(a.repeats):
        wall, _, out, err = run_timed(script)
        rep = json.loads(out)
        assert rep["shards_covered"] == a.shards, err
        assert exact(rep) == reference, (exact(rep), reference)
        b_wall.append(wall)
        b_init.append(rep["init_seconds"])
        b_score.append(rep["wall_seconds"])
        b_rss.append(max(s["worker_peak_rss_kib"] for s in rep["shards"]))

    # (c) run() in this process on a running cluster.
    import ray

    ray_eval = load_example()
    t0 = time.perf_counter()
    ray.init(num_cpus=a.num_cpus, include_dashboard=False)
    c_init = time.perf_counter() - t0

    peak_rss_kib = ray_eval.peak_rss_kib

    @ray.remote(num_cpus=1)
    def idle_worker_rss() -> int:
        import xent  # noqa: F401

        return peak_rss_kib()

    idle_rss = ray.get(idle_worker_rss.remote())
    shards = ray_eval.pair_shards([lglob], [tglob])
    c_score, c_rss = [], []
    for _ in range(a.repeats):
        r = ray_eval.run(shards, device="cpu", log=open(os.devnull, "w"))
        assert r.complete and exact(r.summary.to_json()) == reference
        c_score.append(r.wall_seconds)
        c_rss.append(max(s["worker_peak_rss_kib"] for s in r.covered))
    ray.shutdown()

    mib = lambda kib: f"{kib / 1024:.0f} MiB"  # noqa: E731
    rate = lambda s: f"{tokens / s / 1e3:.1f}k"  # noqa: E731
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(
        f"\n{a.shards} shards of [{a.rows}, {a.vocab}] bf16 ({gib:.2f} GiB, {tokens} scored tokens), "
        f"CPU path; {os.cpu_count()} cores ({cpu}), local Ray cluster of {a.num_cpus} CPUs; "
        f"medians of {a.repeats}; inputs in the page cache. Merged summaries equal the single run's exact sums.\n"
    )
    print("| run | wall (s) | scoring (s) | tokens/s (scoring) | ray.init (s) | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| `xent score` one process | {med(a_wall):.2f} | {med(a_sec):.2f} | {rate(med(a_sec))} | – "
          f"| {mib(max(a_rss))} (process) |")
    print(f"| `ray_eval.py`, local cluster started by the script | {med(b_wall):.2f} | {med(b_score):.2f} "
          f"| {rate(med(b_score))} | {med(b_init):.2f} | {mib(max(b_rss))} (max worker) |")
    print(f"| `ray_eval.run`, cluster already running | – | {med(c_score):.2f} | {rate(med(c_score))} "
          f"| ({c_init:.2f}, once) | {mib(max(c_rss))} (max worker) |")
    print(f"\nAn idle Ray worker after `import xent`: {mib(idle_rss)} peak RSS. "
          f"Raw: xent {a_wall}, script {b_wall} / init {b_init} / scoring {b_score}, warm {c_score}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
