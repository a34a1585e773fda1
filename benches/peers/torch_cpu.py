#!/usr/bin/env python3
"""PyTorch CPU peer: F.cross_entropy(reduction='none') on the shapes of `xent bench --device cpu`.

Median of many runs after warm-up, inputs generated once (not timed). Prints one JSON line per
shape. Not part of the test suite; run it in a virtual environment with torch installed:
    python3 -m venv .venv && .venv/bin/pip install torch numpy
    .venv/bin/python benches/peers/torch_cpu.py --shapes 2048x128256,256x32000 --dtypes f32,bf16
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="2048x128256,256x32000")
    p.add_argument("--dtypes", default="f32")
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    for shape in a.shapes.split(","):
        rows, vocab = map(int, shape.split("x"))
        for d in a.dtypes.split(","):
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(rows, vocab, generator=g) * 2).to(DTYPES[d])
            t = torch.randint(0, vocab, (rows,), generator=g)
            F.cross_entropy(x, t, reduction="none")  # warm-up
            times = []
            for _ in range(a.iters):
                s = time.perf_counter()
                F.cross_entropy(x, t, reduction="none")
                times.append(time.perf_counter() - s)
            secs = statistics.median(times)
            nbytes = x.numel() * x.element_size()
            print(json.dumps({"peer": "torch", "version": torch.__version__, "threads": torch.get_num_threads(),
                              "rows": rows, "vocab": vocab, "dtype": d, "ms": secs * 1e3,
                              "gb_per_s": nbytes / secs / 1e9, "tokens_per_s": rows / secs}))


if __name__ == "__main__":
    main()
