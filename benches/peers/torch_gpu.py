#!/usr/bin/env python3
"""PyTorch peers for the GPU check: F.cross_entropy(reduction='none') eager and under
torch.compile, timed with CUDA events (median of many after warm-up), on the shapes xent bench
uses, plus torch's own copy ceiling and an agreement check against xent's per-token output.
With --train, the loss and its gradient instead: F.cross_entropy (mean, as `xent bench --train`)
forward and backward() on a leaf tensor of logits, eager and compiled; bytes count 2 reads + 1
write of the logits, as xent's rows do.

Runs on CUDA when present, else on the CPU (so the script can be tested anywhere).
Usage: torch_gpu.py --shapes 8192x128256,1x256000 --dtypes f32,bf16 --out results.json
                    [--agree LOGITS.npy TARGETS.npy XENT_NLL.npy] [--kld | --train]
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def timer(device):
    """Returns a function timing fn() in seconds: CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(fn):
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
    return run


def median_time(fn, device, warmup=3, iters=20):
    run = timer(device)
    for _ in range(warmup):
        run(fn)
    return statistics.median(run(fn) for _ in range(iters))


def copy_ceiling(device, nbytes=1 << 30):
    n = nbytes // 4
    src = torch.empty(n, device=device)
    dst = torch.empty(n, device=device)
    secs = median_time(lambda: dst.copy_(src), device, iters=10)
    return 2 * nbytes / secs


def kld(a, b):
    """Per-token KL(P_a || Q_b) as people write it in PyTorch, plus both argmaxes (same-top)."""
    k = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1)
    return k, a.argmax(-1), b.argmax(-1)


def train_step(x, t):
    """One training step's loss part, as people write it: forward, then backward() into x.grad."""
    x.grad = None  # no accumulation into a previous gradient
    F.cross_entropy(x, t).backward()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="8192x128256")
    p.add_argument("--dtypes", default="f32,f16,bf16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--agree", nargs=3, metavar=("LOGITS", "TARGETS", "XENT_NLL"))
    p.add_argument("--kld", action="store_true",
                   help="time per-token KL divergence of two models' logits (kl_div of both log_softmax, plus both argmaxes)")
    p.add_argument("--train", action="store_true",
                   help="time F.cross_entropy forward + backward() on a leaf tensor (mean), eager and compiled")
    p.add_argument("--out", required=True)
    a = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "copy_gb_per_s": copy_ceiling(device) / 1e9, "results": []}
    compiled = None
    if not a.no_compile:
        try:
            # dynamic=True: one compilation per dtype rather than per shape, to fit a short GPU session.
            fn = kld if a.kld else (lambda x, t: F.cross_entropy(x, t, reduction="none"))
            if a.train:
                fn = lambda x, t: F.cross_entropy(x, t)  # noqa: E731 - backward() is called on its result
            compiled = torch.compile(fn, dynamic=True)
        except Exception as e:  # noqa: BLE001 - report and go on without it
            print(f"torch.compile unavailable: {e}", file=sys.stderr)

    for shape in a.shapes.split(","):
        rows, vocab = map(int, shape.split("x"))
        for dname in a.dtypes.split(","):
            dtype = DTYPES[dname]
            g = torch.Generator(device=device).manual_seed(0)
            x = (torch.randn(rows, vocab, device=device, generator=g) * 2).to(dtype)
            if a.train:
                x.requires_grad_()
                t = torch.randint(0, vocab, (rows,), device=device, generator=g)
                nbytes = 3 * x.numel() * x.element_size()
                eager, name = (lambda: train_step(x, t)), "torch fwd+bwd"

                def compiled_step():
                    x.grad = None
                    compiled(x, t).backward()
            elif a.kld:
                # The test model: the base plus noise 0.01; both inputs are read, so both count.
                t = (x.float() + 0.01 * torch.randn(rows, vocab, device=device, generator=g)).to(dtype)
                nbytes = 2 * x.numel() * x.element_size()
                eager, name = (lambda: kld(x, t)), "torch kld"
            else:
                t = torch.randint(0, vocab, (rows,), device=device, generator=g)
                nbytes = x.numel() * x.element_size()
                eager, name = (lambda: F.cross_entropy(x, t, reduction="none")), "torch"
            if a.train:
                compiled_fn = compiled_step if compiled else None
                compiled_name = "torch.compile fwd+bwd"
            else:
                compiled_fn = (lambda: compiled(x, t)) if compiled else None
                compiled_name = f"{name}.compile" if a.kld else "torch.compile"
            for path, fn in [(f"{name} eager", eager), (compiled_name, compiled_fn)]:
                if fn is None:
                    continue
                try:
                    secs = median_time(fn, device, iters=a.iters)
                except Exception as e:  # noqa: BLE001
                    print(f"{path} {shape} {dname}: {e}", file=sys.stderr)
                    continue
                result["results"].append({"rows": rows, "vocab": vocab, "dtype": dname, "path": path,
                                          "ms": secs * 1e3, "gb_per_s": nbytes / secs / 1e9})
            del x, t

    if a.agree:
        logits, targets, nll = (np.load(f) for f in a.agree)
        x = torch.from_numpy(logits.astype(np.float64)).to(device)
        t = torch.from_numpy(targets.astype(np.int64)).to(device)
        ref = F.cross_entropy(x.reshape(-1, x.shape[-1]), t.reshape(-1), reduction="none", ignore_index=-100)
        ours = torch.from_numpy(nll.astype(np.float64)).to(device)
        diff = (ours - ref).abs()
        rel = diff / ref.abs().clamp_min(1e-30)
        result["agreement"] = {"rows": int(ref.numel()), "max_abs": float(diff.max()), "max_rel": float(rel.max()),
                               "within_1e-6_2e-6": bool((diff <= 1e-6 + 2e-6 * ref.abs()).all())}

    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
