#!/usr/bin/env bash
# The scale check of the KL-divergence issue, in one run: 4 base + 4 test bf16 shards of ~2.6 GB
# each (2 x 10 GB; the test is the base plus noise 0.05, same tokens), generated once; warm the page
# cache; time `xent bench --kld` on the same vocab and dtype; then `xent kld` over all shards under
# /usr/bin/time -v (peak resident memory) on each device, and check that merged per-shard summaries
# equal the one-run summary (exact sums to the last digit; percentiles from merged sketches).
#   DIR=/tmp/kld-ten DEVICES="cpu gpu" bash scripts/kld-scale-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${DIR:-/tmp/xent-kld-ten}
DEVICES=${DEVICES:-cpu gpu}
XENT=${XENT:-target/release/xent}
ROWS=${ROWS:-10000}
SHARDS=${SHARDS:-4}
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
VOCAB=128256
mkdir -p "$DIR"
last=$((SHARDS - 1))
for i in $(seq 0 $last); do
  [ -f "$DIR/base-$i.safetensors" ] || "$XENT" gen --rows "$ROWS" --vocab "$VOCAB" --dtype bf16 --seed "$i" \
    --logits "$DIR/base-$i.safetensors" --targets "$DIR/targets-$i.npy" 2>/dev/null
  [ -f "$DIR/test-$i.safetensors" ] || "$XENT" gen --rows "$ROWS" --vocab "$VOCAB" --dtype bf16 --seed "$i" --noise 0.05 \
    --logits "$DIR/test-$i.safetensors" --targets "$DIR/ttmp-$i.npy" 2>/dev/null
done
BYTES=$(cat "$DIR"/base-*.safetensors "$DIR"/test-*.safetensors | wc -c)
if sync && (echo 1 >/proc/sys/vm/drop_caches) 2>/dev/null; then echo "page cache: dropped, then read" >&2; fi
cat "$DIR"/base-*.safetensors "$DIR"/test-*.safetensors >/dev/null
for DEV in $DEVICES; do
  BENCH=$("$XENT" bench --kld --device "$DEV" --rows 2048 --vocab "$VOCAB" --dtype bf16 --iters 5 --json)
  /usr/bin/time -v "$XENT" kld --device "$DEV" --base "$DIR/base-*.safetensors" --logits "$DIR/test-*.safetensors" \
    --targets "$DIR/targets-*.npy" --json >"$DIR/kld.json" 2>"$DIR/time.txt"
  RSS=$(grep "Maximum resident" "$DIR/time.txt" | awk '{print $NF}')
  for i in $(seq 0 $last); do
    "$XENT" kld --device "$DEV" --quiet --base "$DIR/base-$i.safetensors" --logits "$DIR/test-$i.safetensors" \
      --targets "$DIR/targets-$i.npy" --summary-out "$DIR/$DEV-$i.json" >/dev/null 2>&1
  done
  "$XENT" merge --json "$DIR/$DEV"-[0-9]*.json >"$DIR/merged.json"
  echo "$BENCH" >"$DIR/bench.json"
  python3 - "$BYTES" "$RSS" "$DEV" "$DIR/bench.json" "$DIR/kld.json" "$DIR/merged.json" <<'PY'
import json, sys
nbytes, rss, dev = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
bench, one, merged = (json.load(open(a)) for a in sys.argv[4:7])
path = "cpu kld fast" if dev == "cpu" else "gpu kld end-to-end"
ref = next((r["gb_per_s"] for r in bench["results"] if r["path"] == path), float("nan"))
got = nbytes / one["seconds"] / 1e9
exact = [k for k in one if k not in ("seconds", "device", "percentiles") and not k.startswith(("kld_p", "dp_p")) and "median" not in k and "sketch" not in k]
same = all(one[k] == merged[k] for k in exact)
worst = max(abs(one[k] - merged[k]) / max(abs(one[k]), 1e-12) for k in one if k.startswith(("kld_p", "dp_p")) and one[k] is not None)
print(f"bf16 kld {dev}: {nbytes / 1e9:.2f} GB (both sides) in {one['seconds']:.2f} s = {got:.2f} GB/s; bench '{path}' {ref:.2f} GB/s "
      f"-> {100 * got / ref:.0f}%; peak RSS {rss / 1024:.0f} MiB; merged == one run on {len(exact)} exact fields: {same}; "
      f"merged sketch percentiles within {worst:.1e} (relative) of the one run's {one['percentiles']} ones")
print(f"  kld_mean {one['kld_mean']:.6g}, same_top {one['same_top']:.4f}, ppl_base {one['ppl_base']:.4f}, ppl_test {one['ppl_test']:.4f}")
PY
done
