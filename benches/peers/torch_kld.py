#!/usr/bin/env python3
"""PyTorch CPU peer for `xent bench --device cpu --kld`: per-token KL divergence as people write it,

    F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction='none').sum(-1)

plus both argmaxes (`a.argmax(-1)`, `b.argmax(-1)`), for base logits `a` and test logits `b = a + noise`.

`--compute native` (the default) runs every op in the input dtype, as torch does when handed bf16
logits (its CPU kernels accumulate the softmax sums in float internally but every tensor they
write is bf16); `--compute upcast` converts both inputs with `.float()` first, inside the timed
region, as careful code does. Each JSON line says which (`compute`).

Threads: `torch.set_num_threads` = the cores this process may run on. Inputs generated once (not
timed); median of `--iters` runs after one warm-up. Bytes (for GB/s) are both inputs', as xent
counts them. Not part of the test suite; run it in a virtual environment with torch installed:
    python3 -m venv .venv && .venv/bin/pip install torch numpy
    .venv/bin/python benches/peers/torch_kld.py --shapes 2048x128256,256x32000 --dtypes f32,bf16
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def kld(a, b, upcast):
    if upcast:
        a, b = a.float(), b.float()
    k = F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="none").sum(-1)
    return k, a.argmax(-1), b.argmax(-1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="2048x128256,256x32000")
    p.add_argument("--dtypes", default="f32,bf16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--noise", type=float, default=0.01, help="std of the test's noise (xent bench --kld: 0.01)")
    p.add_argument("--compute", choices=["native", "upcast"], default="native")
    a = p.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(cores)
    upcast = a.compute == "upcast"
    for shape in a.shapes.split(","):
        rows, vocab = map(int, shape.split("x"))
        for d in a.dtypes.split(","):
            g = torch.Generator().manual_seed(0)
            x = torch.randn(rows, vocab, generator=g) * 2
            y = (x + a.noise * torch.randn(rows, vocab, generator=g)).to(DTYPES[d])
            x = x.to(DTYPES[d])
            with torch.inference_mode():
                kld(x, y, upcast)  # warm-up
                times = []
                for _ in range(a.iters):
                    s = time.perf_counter()
                    kld(x, y, upcast)
                    times.append(time.perf_counter() - s)
            secs = statistics.median(times)
            nbytes = 2 * x.numel() * x.element_size()
            print(json.dumps({"peer": "torch", "version": torch.__version__, "threads": torch.get_num_threads(),
                              "compute": "f32 (upcast)" if upcast else d, "rows": rows, "vocab": vocab,
                              "dtype": d, "ms": secs * 1e3, "gb_per_s": nbytes / secs / 1e9,
                              "tokens_per_s": rows / secs}), flush=True)
            del x, y


if __name__ == "__main__":
    main()
