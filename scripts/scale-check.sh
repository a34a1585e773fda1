#!/usr/bin/env bash
# The 10 GB check of the huge-evaluation-set issue, in one run: for each dtype, generate shards
# (once) totalling ~10 GB, warm the page cache, time `xent bench` on the same vocab and dtype, then
# `xent score` over all shards under /usr/bin/time -v (peak resident memory), on each device;
# and check that merged per-shard summaries equal the one-run summary.
#   DIR=/tmp/ten DEVICES="cpu gpu" WARM=read bash scripts/scale-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${DIR:-/tmp/xent-ten}
DEVICES=${DEVICES:-cpu gpu}
XENT=${XENT:-target/release/xent}
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
VOCAB=128256
for DTYPE in bf16 f32; do
  ROWS=$([ "$DTYPE" = bf16 ] && echo 10000 || echo 5000)
  mkdir -p "$DIR/$DTYPE"
  for i in 0 1 2 3; do
    [ -f "$DIR/$DTYPE/logits-$i.safetensors" ] || "$XENT" gen --rows "$ROWS" --vocab "$VOCAB" --dtype "$DTYPE" --seed "$i" \
      --logits "$DIR/$DTYPE/logits-$i.safetensors" --targets "$DIR/$DTYPE/targets-$i.npy" 2>/dev/null
  done
  BYTES=$(cat "$DIR/$DTYPE"/logits-*.safetensors | wc -c)
  # Warm the page cache. WARM=read (the default) first drops clean caches where permitted, so the
  # cache holds the shards as read from disk (large folios: cheap to map); WARM=as-is keeps
  # whatever is cached, e.g. the generator's writes (4 KiB pages: mapping costs CPU time).
  if [ "${WARM:-read}" = read ] && sync && (echo 1 >/proc/sys/vm/drop_caches) 2>/dev/null; then
    echo "page cache: dropped, then read from disk" >&2
  else
    echo "page cache: as it was (drop not requested or not permitted)" >&2
  fi
  cat "$DIR/$DTYPE"/logits-*.safetensors >/dev/null
  for DEV in $DEVICES; do
    BENCH=$("$XENT" bench --device "$DEV" --rows 2048 --vocab "$VOCAB" --dtype "$DTYPE" --iters 5 --json)
    /usr/bin/time -v "$XENT" score --device "$DEV" --logits "$DIR/$DTYPE/logits-*.safetensors" \
      --targets "$DIR/$DTYPE/targets-*.npy" --json --summary-out "$DIR/$DTYPE-$DEV-all.json" \
      >"$DIR/score.json" 2>"$DIR/time.txt"
    RSS=$(grep "Maximum resident" "$DIR/time.txt" | awk '{print $NF}')
    for i in 0 1 2 3; do
      "$XENT" score --device "$DEV" --quiet --logits "$DIR/$DTYPE/logits-$i.safetensors" --targets "$DIR/$DTYPE/targets-$i.npy" \
        --summary-out "$DIR/$DTYPE-$DEV-$i.json" >/dev/null 2>&1
    done
    MERGED=$("$XENT" merge --json "$DIR/$DTYPE-$DEV"-[0-3].json)
    # The whole set ${REPEATS:-5} more times, for a median: on the dev VM the first read of freshly
    # cached pages is slower than later ones (a plain populate-and-sum shows it too), and the
    # machine is noisy.
    AGAIN=$(for _ in $(seq "${REPEATS:-5}"); do
      "$XENT" score --device "$DEV" --quiet --json --logits "$DIR/$DTYPE/logits-*.safetensors" \
        --targets "$DIR/$DTYPE/targets-*.npy" 2>/dev/null
    done | python3 -c 'import json, sys; print(json.dumps([json.loads(l)["seconds"] for l in sys.stdin]))')
    python3 - "$BYTES" "$RSS" "$DTYPE" "$DEV" "$BENCH" "$(cat "$DIR/score.json")" "$MERGED" "$AGAIN" <<'PY'
import json, sys
nbytes, rss, dtype, dev = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
bench, score, merged, again = (json.loads(a) for a in sys.argv[5:9])
path = "cpu fast" if dev == "cpu" else "gpu end-to-end (streamed)"
ref = next(r["gb_per_s"] for r in bench["results"] if r["path"] == path)
kernel = next((r["gb_per_s"] for r in bench["results"] if r["path"] == "gpu fused kernel"), None)
got = nbytes / score["seconds"] / 1e9
same = all(score[k] == merged[k] for k in ("tokens", "mean_nll", "perplexity", "ppl_stderr", "accuracy", "sum_nll_fixed"))
extra = f", {100 * got / kernel:.0f}% of the kernel alone" if kernel else ""
print(f"{dtype} {dev}: {nbytes / 1e9:.2f} GB in {score['seconds']:.2f} s = {got:.2f} GB/s; bench '{path}' {ref:.2f} GB/s "
      f"-> {100 * got / ref:.0f}%{extra}; peak RSS {rss / 1024:.0f} MiB; merged == one run: {same}")
med = sorted(again)[len(again) // 2]
print(f"  repeated runs: {' '.join(f'{t:.2f}' for t in again)} s; median {med:.2f} s = {nbytes / med / 1e9:.2f} GB/s "
      f"-> {100 * nbytes / med / 1e9 / ref:.0f}% of bench")
PY
  done
done
