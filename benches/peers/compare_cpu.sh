#!/usr/bin/env bash
# xent's fast CPU path against PyTorch and optax (jax.jit) on the same shapes, in one run, on this
# machine; prints a table with the ratios the CPU issue asks for. Peers need a virtual environment:
#   python3 -m venv .venv && .venv/bin/pip install torch numpy "jax[cpu]" optax
#   PYTHON=.venv/bin/python bash benches/peers/compare_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
XENT=${XENT:-target/release/xent}
[ -x "$XENT" ] || cargo build --release --quiet
OUT=$(mktemp -d)
ITERS=${ITERS:-10}
"$XENT" bench --device cpu --rows 2048 --vocab 128256 --dtype f32,bf16 --iters "$ITERS" --json >"$OUT/xent_a.json"
"$XENT" bench --device cpu --rows 256 --vocab 32000 --dtype f32,bf16 --iters "$ITERS" --json >"$OUT/xent_b.json"
$PY benches/peers/torch_cpu.py --shapes 2048x128256,256x32000 --dtypes f32,bf16 --iters "$ITERS" >"$OUT/torch.jsonl"
$PY benches/peers/jax_cpu.py --shapes 2048x128256,256x32000 --dtypes f32,bf16 --iters "$ITERS" >"$OUT/jax.jsonl"
$PY - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
rows, read = {}, None
for f in sorted(glob.glob(os.path.join(out, "xent_*.json"))):
    b = json.load(open(f))
    read = b["cpu_read_gb_per_s"]
    for r in b["results"]:
        if r["path"] == "cpu fast":
            rows[(r["rows"], r["vocab"], r["dtype"], "xent")] = r
for peer in ("torch", "jax"):
    for line in open(os.path.join(out, f"{peer}.jsonl")):
        r = json.loads(line)
        rows[(r["rows"], r["vocab"], r["dtype"], peer)] = r
print(f"cpu read bandwidth (xent bench, same run): {read:.1f} GB/s")
print(f"{'shape':>14} {'dtype':>5} {'xent GB/s':>10} {'torch':>8} {'optax':>8} {'x torch':>8} {'x optax':>8} {'% read':>7} {'xent tok/s':>11}")
for (n, v, d, who) in sorted(rows):
    if who != "xent":
        continue
    x = rows[(n, v, d, "xent")]["gb_per_s"]
    t = rows.get((n, v, d, "torch"), {}).get("gb_per_s", float("nan"))
    j = rows.get((n, v, d, "jax"), {}).get("gb_per_s", float("nan"))
    tok = n / (rows[(n, v, d, "xent")]["ms"] / 1e3)
    print(f"{n:>6}x{v:<7} {d:>5} {x:>10.2f} {t:>8.2f} {j:>8.2f} {x/t:>8.2f} {x/j:>8.2f} {100*x/read:>6.1f}% {tok:>11.0f}")
PY
rm -rf "$OUT"
