#!/usr/bin/env python3
"""Sharded scoring on Ray: one task per shard, merged exactly into the summary of one run.

Each shard pair (a logits file and its targets file) is scored by one Ray task with
``xent.score_files`` where the task lands: on a GPU (``num_gpus=1``) when the cluster has
GPUs, otherwise on the CPU path. Every task returns the shard's ``xent.Summary``; summaries
hold exact integer sums, so the merged result is, to the last digit, what one ``xent score``
over all shards gives (on the same kind of device). The driver prints what ``xent merge``
prints, then how many shards the result covers.

On a laptop (Ray starts a local cluster inside this process)::

    python ray_eval.py --logits 'shards/*.npy' --targets 'shards/*-targets.npy'

On a cluster: start Ray on every node, then run the driver on any of them::

    ray start --head --port=6379                # on the head node
    ray start --address=HEAD:6379               # on every other node
    python ray_eval.py --address auto --logits '/shared/eval/*.safetensors' \\
        --targets '/shared/eval/*-targets.npy' --summary-out merged.json

Tasks open the paths as the driver names them, on whichever node they run: put the shards on
storage every node sees (NFS, a shared volume, a FUSE-mounted bucket) under the same path.

Inputs: ``--logits`` and ``--targets`` each take paths, globs and directories (a directory gives
its .npy/.safetensors files), sorted, then paired in order; the counts must match. A file matched
by both (``shards/*.npy`` also matches ``shards/x-targets.npy``) is taken as targets.

A shard that still fails after ``--retries`` retries (a corrupt file, a node that died) is
reported by name with its error; the others are merged, and the result says how many shards it
covers. A partial result never passes for a whole one: the exit code is 1 unless
``--allow-partial``, ``--summary-out`` is only written for a whole result (or with
``--allow-partial``), and the JSON carries ``shards_total``, ``shards_covered`` and ``missing``.

``--shift`` is exact across shards too: sequences never span files (each shard's last row of
each sequence is dropped), so per-shard scoring equals one run over all files.

GPU note: xent opens its GPU through wgpu (Vulkan), which does not follow the
``CUDA_VISIBLE_DEVICES`` Ray sets for a ``num_gpus=1`` task. Each GPU task therefore sets
``XENT_ADAPTER`` to the GPU id Ray gave it (``ray.get_gpu_ids()``), so that tasks on a node with
several GPUs each open their own. xent counts adapters hardware first, in the drivers' order —
PCI bus order on NVIDIA, which is Ray's/CUDA's numbering with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
(the usual case for identical GPUs); ``xent info`` lists the adapters with their PCI ids.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

import ray
import xent

Device = Literal["auto", "gpu", "cpu"]

# --------------------------------------------------------------------------------------------
# The task: runs on a worker.
# --------------------------------------------------------------------------------------------


def pin_adapter(gpu_ids: list) -> None:
    """Points xent at the GPU Ray assigned this task (``XENT_ADAPTER``), when it is one numeric id."""
    if len(gpu_ids) == 1 and str(gpu_ids[0]).isdigit():
        os.environ["XENT_ADAPTER"] = str(gpu_ids[0])


@ray.remote(max_retries=2, retry_exceptions=True)
def score_shard(
    name: str, logits: str, targets: str, device: Device, ignore_index: int, shift: bool, chunk_mib: int
) -> dict[str, Any]:
    """Scores one shard pair where the task runs; returns its Summary and where/how it ran."""
    import socket

    if device == "gpu":
        pin_adapter(ray.get_gpu_ids())
    start = time.perf_counter()
    summary = xent.score_files(
        logits,
        targets,
        device=device,
        ignore_index=ignore_index,
        shift=shift,
        chunk_mib=chunk_mib,
        progress=False,
    )
    return {
        "name": name,
        "summary": summary,
        "wall_seconds": time.perf_counter() - start,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        # Peak resident set of this worker process so far, KiB: workers are reused, so this is the
        # worker's peak over every task it ran.
        "worker_peak_rss_kib": peak_rss_kib(),
    }


def peak_rss_kib() -> int:
    """This process's peak RSS in KiB: VmHWM on Linux (ru_maxrss there also counts the image of
    the process that spawned this one, before exec), else ru_maxrss (bytes on macOS)."""
    import resource

    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss


if __name__ != "__main__":
    # Imported as a module (a notebook, a test): ship the task's code to the workers by value, so
    # they need not import this file (they have only their own sys.path). Run as a script, the
    # task lives in __main__ and goes by value anyway.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --------------------------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------------------------


def expand(args: Sequence[str], flag: str) -> list[str]:
    """Paths, globs and directories to a sorted list of files, as the xent CLI reads them."""
    out: list[str] = []
    for arg in args:
        if os.path.isdir(arg):
            files = sorted(
                os.path.join(arg, f) for f in os.listdir(arg) if f.endswith((".npy", ".safetensors"))
            )
            if not files:
                raise SystemExit(f"ray_eval: error: {flag} {arg}: directory holds no .npy or .safetensors files")
            out.extend(files)
        elif glob.has_magic(arg):
            files = sorted(glob.glob(arg))
            if not files:
                raise SystemExit(f"ray_eval: error: {flag} {arg}: pattern matches no files")
            out.extend(files)
        else:
            out.append(arg)
    return out


def pair_shards(logits_args: Sequence[str], targets_args: Sequence[str]) -> list[tuple[str, str, str]]:
    """(name, logits, targets) for every shard: both lists sorted and paired in order."""
    targets = sorted(set(expand(targets_args, "--targets")))
    taken = {os.path.abspath(t) for t in targets}
    logits = sorted({p for p in expand(logits_args, "--logits") if os.path.abspath(p) not in taken})
    if not logits:
        raise SystemExit("ray_eval: error: --logits names no files (besides the targets)")
    if len(logits) != len(targets):
        raise SystemExit(
            f"ray_eval: error: {len(logits)} logits files but {len(targets)} targets files: "
            "give one targets file per logits file (they are paired after sorting)"
        )
    base = [os.path.basename(p) for p in logits]
    # A shard is named by its file name, or by its path where two shards share a file name.
    names = base if len(set(base)) == len(base) else logits
    return list(zip(names, logits, targets))


def one_line(err: BaseException) -> str:
    """The one-line message of a task's failure: xent's own message (it names the file)."""
    cause = getattr(err, "cause", None)  # RayTaskError wraps the exception the task raised
    if isinstance(cause, BaseException):
        err = cause
    text = str(err).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


@dataclass
class Result:
    """The merged summary of the shards that finished, and which did not."""

    summary: xent.Summary
    shards_total: int
    covered: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # shard name -> one-line error
    wall_seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.failed and len(self.covered) == self.shards_total

    def coverage_line(self) -> str:
        line = f"covered {len(self.covered)} of {self.shards_total} shards"
        if self.failed:
            line += "; missing: " + ", ".join(self.failed)
        return line

    def to_dict(self) -> dict[str, Any]:
        """The merged summary's JSON (mergeable by ``xent merge``) plus the coverage."""
        d = json.loads(self.summary.to_json())
        d.update(
            shards_total=self.shards_total,
            shards_covered=len(self.covered),
            missing=list(self.failed),
            errors=dict(self.failed),
            wall_seconds=self.wall_seconds,
        )
        return d


def plan_resources(device: Device, cpus_per_task: Optional[int], shards: int) -> tuple[Device, dict[str, Any]]:
    """The device each task scores on, and the resources it asks Ray for."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "auto":
        device = "gpu" if gpus > 0 else "cpu"
    if device == "gpu" and gpus <= 0:
        raise ValueError("device 'gpu', but the cluster has no GPUs (ray.cluster_resources())")
    if cpus_per_task is None:
        if device == "gpu":
            cpus_per_task = 1
        else:
            # Enough threads to fill the cluster when shards are few, never more than a node has.
            node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
            total, biggest = int(sum(node_cpus)), int(max(node_cpus, default=1))
            cpus_per_task = max(1, min(biggest, total // max(shards, 1)))
    options: dict[str, Any] = {
        "num_cpus": cpus_per_task,
        "num_gpus": 1 if device == "gpu" else 0,
        # xent's CPU path runs on a rayon pool of this many threads, not one per core of the node.
        "runtime_env": {"env_vars": {"RAYON_NUM_THREADS": str(cpus_per_task)}},
    }
    return device, options


def run(
    shards: Sequence[tuple[str, str, str]],
    *,
    device: Device = "auto",
    retries: int = 2,
    ignore_index: int = -100,
    shift: bool = False,
    chunk_mib: int = 64,
    cpus_per_task: Optional[int] = None,
    log=None,
) -> Result:
    """Scores every shard as a Ray task (Ray must be initialised) and merges what finished.

    Progress goes to ``log`` (default: ``sys.stderr`` at the time of the call)."""
    log = sys.stderr if log is None else log
    device, options = plan_resources(device, cpus_per_task, len(shards))
    print(
        f"ray_eval: {len(shards)} shards on the {device}, {options['num_cpus']} CPU(s)"
        f"{' + 1 GPU' if options['num_gpus'] else ''} per task, up to {retries} retries",
        file=log,
    )
    task = score_shard.options(max_retries=retries, retry_exceptions=True, **options)
    start = time.perf_counter()
    pending = {
        task.remote(name, lg, tg, device, ignore_index, shift, chunk_mib): name for name, lg, tg in shards
    }
    result = Result(summary=xent.Summary(), shards_total=len(shards))
    done = 0
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                name = pending.pop(ref)
                done += 1
                try:
                    out = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - every failure is reported, by shard
                    result.failed[name] = one_line(e)
                    tries = f"after {retries + 1} attempt(s)" if retries >= 0 else "(retries exhausted)"
                    print(
                        f"[{done}/{len(shards)}] {name}: FAILED {tries}: {result.failed[name]}",
                        file=log,
                        flush=True,
                    )
                    continue
                s = out["summary"]
                result.summary = result.summary + s
                result.covered.append(out)
                print(f"[{done}/{len(shards)}] {name}: {s.tokens} tokens, ppl {s.perplexity:.2f}", file=log, flush=True)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    result.wall_seconds = time.perf_counter() - start
    return result


def human(summary: xent.Summary) -> str:
    """What ``xent merge`` prints for a merged summary: ``str(summary)`` once it is a merge, or
    the same text built from the fields (one shard, or none, keeps its own device name)."""
    if summary.device == "merged":
        return str(summary)

    def f(x: float, digits: int) -> str:  # Rust prints NaN as "NaN", Python as "nan"
        return "NaN" if math.isnan(x) else f"{x:.{digits}f}"

    return (
        f"xent: {summary.tokens} tokens scored, {summary.ignored} ignored, "
        f"on the merged summaries in {summary.seconds:.3f} s\n"
        f"  mean nll      {f(summary.mean_nll, 6)} nats ({f(summary.bits_per_token, 6)} bits/token)\n"
        f"  perplexity    {f(summary.perplexity, 4)} ± {f(summary.ppl_stderr, 4)}\n"
        f"  accuracy      {f(summary.accuracy, 4)}\n"
    )


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="See the module docstring for cluster use.")
    p.add_argument("--logits", nargs="+", required=True, help="logits files, globs or directories")
    p.add_argument("--targets", nargs="+", required=True, help="targets files, globs or directories")
    p.add_argument("--address", default=None, help="Ray cluster: 'auto', HOST:PORT; default: start a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local cluster (without --address)")
    p.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="auto: the GPU (num_gpus=1 per task) when the cluster has GPUs, else the CPU")
    p.add_argument("--retries", type=int, default=2, help="Ray retries per shard, exceptions included (default 2)")
    p.add_argument("--shift", action="store_true", help="causal-LM shift (targets are the input ids)")
    p.add_argument("--ignore-index", type=int, default=-100)
    p.add_argument("--chunk-mib", type=int, default=64, help="MiB of logits each task reads at once")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs each task asks for and xent threads it runs (default: fill the cluster, 1 on GPUs)")
    p.add_argument("--summary-out", default=None, help="write the merged summary (+ coverage) as JSON")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (text goes to stderr)")
    p.add_argument("--allow-partial", action="store_true", help="exit 0 even when some shards failed")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    shards = pair_shards(args.logits, args.targets)
    if args.summary_out is not None and not args.summary_out.endswith(".json"):
        raise SystemExit(f"ray_eval: error: {args.summary_out}: --summary-out writes .json")

    started = False
    init_seconds = 0.0
    # stdout holds the result only (with --json, one JSON object): Ray's own lines (worker output,
    # "(raylet) Task ... failed ... will be retried") go to stderr while Ray runs.
    with contextlib.redirect_stdout(sys.stderr):
        if not ray.is_initialized():  # a caller that already connected (a notebook, a test) keeps its connection
            t0 = time.perf_counter()
            ray.init(address=args.address, num_cpus=args.num_cpus if args.address is None else None)
            init_seconds = time.perf_counter() - t0
            started = True
        try:
            try:
                result = run(
                    shards,
                    device=args.device,
                    retries=args.retries,
                    ignore_index=args.ignore_index,
                    shift=args.shift,
                    chunk_mib=args.chunk_mib,
                    cpus_per_task=args.cpus_per_task,
                )
            except ValueError as e:
                raise SystemExit(f"ray_eval: error: {e}") from None
        finally:
            if started:
                ray.shutdown()

    report = result.to_dict()
    report["init_seconds"] = init_seconds
    text = sys.stderr if args.json else sys.stdout
    print(human(result.summary), end="", file=text)
    print(result.coverage_line(), file=text, flush=True)
    if args.json:
        report["shards"] = [
            {k: v for k, v in c.items() if k != "summary"} | {"tokens": c["summary"].tokens} for c in result.covered
        ]
        print(json.dumps(report, separators=(",", ":")), flush=True)

    if args.summary_out is not None:
        if result.complete or args.allow_partial:
            out = {k: v for k, v in report.items() if k not in ("shards", "init_seconds", "wall_seconds")}
            write_atomic(args.summary_out, json.dumps(out, separators=(",", ":")) + "\n")
        else:
            print(
                f"ray_eval: not writing {args.summary_out}: the result covers {len(result.covered)} of "
                f"{result.shards_total} shards (--allow-partial writes it, with its coverage)",
                file=sys.stderr,
            )
    if not result.covered:
        return 1
    if result.failed and not args.allow_partial:
        print(f"ray_eval: {len(result.failed)} shard(s) failed: partial result (exit 1)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
