#!/usr/bin/env bash
# xent's fast CPU KL-divergence path against PyTorch on the same shapes, in one run, on this machine;
# prints a table with the ratios issue 9 asks for (2048 x 128256 f32: >= 60% of the read bandwidth
# measured in the same run, >= 5x torch). GB/s count both inputs (base + test). torch runs in the
# input dtype ("torch") and, for bf16, also with both inputs upcast to f32 ("torch up").
# Peers need a virtual environment:
#   python3 -m venv .venv && .venv/bin/pip install torch numpy
#   PYTHON=.venv/bin/python bash benches/peers/compare_kld_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
XENT=${XENT:-target/release/xent}
[ -x "$XENT" ] || cargo build --release --quiet
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
ITERS=${ITERS:-10}
SHAPES=2048x128256,256x32000
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
"$XENT" bench --device cpu --kld --rows 2048 --vocab 128256 --dtype f32,bf16 --iters "$ITERS" --json >"$OUT/xent_a.json"
"$XENT" bench --device cpu --kld --rows 256 --vocab 32000 --dtype f32,bf16 --iters "$ITERS" --json >"$OUT/xent_b.json"
$PY benches/peers/torch_kld.py --shapes "$SHAPES" --dtypes f32,bf16 --iters "$ITERS" >"$OUT/torch.jsonl"
$PY benches/peers/torch_kld.py --shapes "$SHAPES" --dtypes bf16 --iters "$ITERS" --compute upcast >"$OUT/torch_up.jsonl"
echo "load after:  $(cut -d' ' -f1-3 /proc/loadavg)" >&2
$PY - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
rows, reads = {}, []
for f in sorted(glob.glob(os.path.join(out, "xent_*.json"))):
    b = json.load(open(f))
    reads.append(b["cpu_read_gb_per_s"])
    for r in b["results"]:
        if r["path"] == "cpu kld fast":
            r["read"] = b["cpu_read_gb_per_s"]
            rows[(r["rows"], r["vocab"], r["dtype"], "xent")] = r
for peer in ("torch", "torch_up"):
    for line in open(os.path.join(out, f"{peer}.jsonl")):
        r = json.loads(line)
        rows[(r["rows"], r["vocab"], r["dtype"], peer)] = r
nan = float("nan")
print("cpu read bandwidth (xent bench, same run): " + ", ".join(f"{x:.1f}" for x in reads) + " GB/s")
print(f"{'shape':>14} {'dtype':>5} {'xent GB/s':>10} {'torch':>8} {'torch up':>9} {'x torch':>8} {'% read':>7} {'xent tok/s':>11}")
for (n, v, d, who) in sorted(rows):
    if who != "xent":
        continue
    r = rows[(n, v, d, "xent")]
    x = r["gb_per_s"]
    t = rows.get((n, v, d, "torch"), {}).get("gb_per_s", nan)
    u = rows.get((n, v, d, "torch_up"), {}).get("gb_per_s", nan)
    tok = n / (r["ms"] / 1e3)
    print(f"{n:>6}x{v:<7} {d:>5} {x:>10.2f} {t:>8.2f} {u:>9.2f} {x/t:>8.2f} {100*x/r['read']:>6.1f}% {tok:>11.0f}")
PY
