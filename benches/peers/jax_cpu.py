#!/usr/bin/env python3
"""JAX CPU peer: optax.softmax_cross_entropy_with_integer_labels under jax.jit, on the shapes of
`xent bench --device cpu`. Median of many runs after warm-up and compilation (not timed).
Not part of the test suite; run it in a virtual environment:
    python3 -m venv .venv && .venv/bin/pip install "jax[cpu]" optax
    .venv/bin/python benches/peers/jax_cpu.py --shapes 2048x128256,256x32000 --dtypes f32,bf16
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="2048x128256,256x32000")
    p.add_argument("--dtypes", default="f32")
    p.add_argument("--iters", type=int, default=10)
    a = p.parse_args()
    loss = jax.jit(optax.softmax_cross_entropy_with_integer_labels)
    for shape in a.shapes.split(","):
        rows, vocab = map(int, shape.split("x"))
        for d in a.dtypes.split(","):
            kx, kt = jax.random.split(jax.random.PRNGKey(0))
            x = (jax.random.normal(kx, (rows, vocab)) * 2).astype(DTYPES[d])
            t = jax.random.randint(kt, (rows,), 0, vocab)
            loss(x, t).block_until_ready()  # compile and warm up
            times = []
            for _ in range(a.iters):
                s = time.perf_counter()
                loss(x, t).block_until_ready()
                times.append(time.perf_counter() - s)
            secs = statistics.median(times)
            nbytes = x.size * x.dtype.itemsize
            print(json.dumps({"peer": "optax+jax.jit", "version": jax.__version__, "rows": rows, "vocab": vocab,
                              "dtype": d, "ms": secs * 1e3, "gb_per_s": nbytes / secs / 1e9,
                              "tokens_per_s": rows / secs}))


if __name__ == "__main__":
    main()
