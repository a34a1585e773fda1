#!/usr/bin/env python3
"""PyTorch CPU peer for `xent bench --train`: F.cross_entropy forward + backward() on a leaf tensor.

The loss and the gradient with respect to the logits, the way a training step computes them:
`loss = F.cross_entropy(x, t)` (reduction mean, the default) then `loss.backward()`, with `x` a leaf
that requires grad and `x.grad` set to None before each step (as `zero_grad(set_to_none=True)`
does, torch's default), so each backward allocates and writes the gradient as training would.
Logits `randn * 2` of each dtype, targets uniform (as benches/peers/torch_cpu.py), generated once,
not timed. Median of `--iters` timed steps after one warm-up step. Prints one JSON line per case.
Not part of the test suite; torch is installed in /work/peers-venv:
    /work/peers-venv/bin/python benches/peers/train_torch_cpu.py --shapes 2048x128256 --dtypes f32,bf16
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def step(x, t):
    x.grad = None
    loss = F.cross_entropy(x, t)
    loss.backward()
    return loss


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="2048x128256")
    p.add_argument("--dtypes", default="f32,bf16")
    p.add_argument("--iters", type=int, default=5)
    a = p.parse_args()
    for shape in a.shapes.split(","):
        rows, vocab = map(int, shape.split("x"))
        for d in a.dtypes.split(","):
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(rows, vocab, generator=g) * 2).to(DTYPES[d]).requires_grad_(True)
            t = torch.randint(0, vocab, (rows,), generator=g)
            step(x, t)  # warm-up
            times = []
            for _ in range(a.iters):
                s = time.perf_counter()
                step(x, t)
                times.append(time.perf_counter() - s)
            secs = statistics.median(times)
            nbytes = x.numel() * x.element_size()
            print(json.dumps({"peer": "torch", "what": "cross_entropy forward + backward", "version": torch.__version__,
                              "threads": torch.get_num_threads(), "rows": rows, "vocab": vocab, "dtype": d,
                              "ms": secs * 1e3, "gb_per_s_2r1w": 3 * nbytes / secs / 1e9}))


if __name__ == "__main__":
    main()
