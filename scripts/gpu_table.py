#!/usr/bin/env python3
"""Prints the GPU check's table from the JSON files under the folder given (stdlib only)."""
import glob
import json
import os
import sys

out = sys.argv[1]
rows = []
ceiling = None
adapter = "?"
for f in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
    try:
        b = json.load(open(f))
    except (OSError, ValueError) as e:
        print(f"{f}: unreadable ({e})")
        continue
    adapter, ceiling = b["adapter"], b["gpu_copy_gb_per_s"]
    print(f"{os.path.basename(f)}: empty dispatch round trip {b['empty_round_trip_ms']:.3f} ms")
    for r in b["results"]:
        rows.append((r["rows"], r["vocab"], r["dtype"], "xent " + r["path"], r["ms"], r["gb_per_s"], r["pct_of_ceiling"], r["plan"]))
# `xent bench --train` files: loss + gradient, each row with its own ceiling (bytes 2R + 1W).
for f in sorted(glob.glob(os.path.join(out, "train_*.json"))):
    try:
        b = json.load(open(f))
    except (OSError, ValueError) as e:
        print(f"{f}: unreadable ({e})")
        continue
    for r in b["results"]:
        rows.append((r["rows"], r["vocab"], r["dtype"], "xent " + r["path"], r["ms"], r["gb_per_s"],
                     r["pct_of_ceiling"], r["plan"]))
torch = {}
for name in ("torch.json", "torch_kld.json", "torch_train.json"):
    tpath = os.path.join(out, name)
    if not os.path.exists(tpath):
        continue
    t = json.load(open(tpath))
    torch = t if name == "torch.json" else (torch or t)
    for r in t["results"]:
        pct = 100 * r["gb_per_s"] / ceiling if ceiling else float("nan")
        rows.append((r["rows"], r["vocab"], r["dtype"], r["path"], r["ms"], r["gb_per_s"], pct, t["device"]))

print(f"adapter: {adapter}; xent copy ceiling {ceiling} GB/s (read + written)"
      + (f"; torch copy ceiling {torch['copy_gb_per_s']:.1f} GB/s" if torch else ""))
print(f"{'rows':>6} {'vocab':>7} {'dtype':>5}  {'path':<32} {'ms':>10} {'GB/s':>9} {'%ceil':>6}  plan")
for r in sorted(rows, key=lambda r: (r[0], r[1], r[2], r[3])):
    print(f"{r[0]:>6} {r[1]:>7} {r[2]:>5}  {r[3]:<32} {r[4]:>10.3f} {r[5]:>9.1f} {r[6]:>5.1f}%  {r[7]}")
if "agreement" in torch:
    a = torch["agreement"]
    print(f"agreement with torch float64 over {a['rows']} rows: max |diff| {a['max_abs']:.3e}, "
          f"max rel {a['max_rel']:.3e}, within 1e-6 + 2e-6|ref|: {a['within_1e-6_2e-6']}")
s = os.path.join(out, "agree_score.json")
if os.path.exists(s):
    print("xent score on the agreement input:", open(s).read().strip())
