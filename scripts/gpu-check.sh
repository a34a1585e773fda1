#!/usr/bin/env bash
# One-shot GPU check (see ../shared/GPU-CHECK.md). Runs on the GPU machine from the repository
# root, with the prebuilt binaries in .gpu/ (or target/release/ here), and writes everything under
# $OUT (./gpu-out when unset), printing a short table last.
#
#   XENT_CHECK_SCALE=small bash scripts/gpu-check.sh    # the same steps on small shapes (lavapipe)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
XENT=.gpu/xent
[ -x "$XENT" ] || XENT=target/release/xent
PY=${PYTHON:-python3}
log() { echo "== $*" | tee -a "$OUT/log.txt"; }

if [ "${XENT_CHECK_SCALE:-full}" = small ]; then
  BIG1="256"; V1=128256; BIG2="128"; V2=131072; SMALL_ROWS="1,8,64"; SMALL_V=256000; AGREE="64x32000"; ITERS=3
else
  BIG1="8192"; V1=128256; BIG2="16384"; V2=131072; SMALL_ROWS="1,8,64"; SMALL_V=256000; AGREE="1024x128256"; ITERS=10
fi

log "adapter"
if ! "$XENT" info >"$OUT/info.txt" 2>&1; then
  for icd in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json; do
    [ -f "$icd" ] && export VK_DRIVER_FILES="$icd" && break
  done
  "$XENT" info >"$OUT/info.txt" 2>&1 || { cat "$OUT/info.txt"; echo "no adapter: stopping"; exit 1; }
fi
cat "$OUT/info.txt"

log "xent bench: ${BIG1} x ${V1}, ${BIG2} x ${V2}, (${SMALL_ROWS}) x ${SMALL_V}, 1024 x ${V1} (unfused fits one binding)"
"$XENT" bench --device gpu --rows "$BIG1" --vocab "$V1" --dtype f32,f16,bf16 --iters "$ITERS" --json >"$OUT/bench_a.json" 2>>"$OUT/log.txt"
"$XENT" bench --device gpu --rows "$BIG2" --vocab "$V2" --dtype f32,f16,bf16 --iters "$ITERS" --json >"$OUT/bench_b.json" 2>>"$OUT/log.txt"
"$XENT" bench --device gpu --rows "$SMALL_ROWS" --vocab "$SMALL_V" --dtype f32,bf16 --iters "$ITERS" --json >"$OUT/bench_c.json" 2>>"$OUT/log.txt"
"$XENT" bench --device gpu --rows 1024 --vocab "$V1" --dtype f32 --iters "$ITERS" --json >"$OUT/bench_d.json" 2>>"$OUT/log.txt"

log "xent bench --kld: ${BIG1} x ${V1} and (${SMALL_ROWS}) x ${SMALL_V}, base and test of one dtype"
"$XENT" bench --kld --device gpu --rows "$BIG1" --vocab "$V1" --dtype f32,bf16 --iters "$ITERS" --json >"$OUT/bench_kld_a.json" 2>>"$OUT/log.txt"
"$XENT" bench --kld --device gpu --rows "$SMALL_ROWS" --vocab "$SMALL_V" --dtype f32 --iters "$ITERS" --json >"$OUT/bench_kld_b.json" 2>>"$OUT/log.txt"

log "xent bench --train: loss + gradient, ${BIG1} x ${V1} (f32, bf16), 1024 x ${V1} (the unfused baseline fits one binding), (${SMALL_ROWS}) x ${SMALL_V}"
# Bytes are 2 reads + 1 write of the logits; "% ceil" is of the copy ceiling measured in the same run.
"$XENT" bench --train --device gpu --rows "$BIG1" --vocab "$V1" --dtype f32,bf16 --iters "$ITERS" --json >"$OUT/train_a.json" 2>>"$OUT/log.txt"
"$XENT" bench --train --device gpu --rows 1024 --vocab "$V1" --dtype f32 --iters "$ITERS" --json >"$OUT/train_b.json" 2>>"$OUT/log.txt"
"$XENT" bench --train --device gpu --rows "$SMALL_ROWS" --vocab "$SMALL_V" --dtype f32 --iters "$ITERS" --json >"$OUT/train_c.json" 2>>"$OUT/log.txt"

log "agreement input: ${AGREE} f32, scored by xent"
ROWS=${AGREE%x*}; VOCAB=${AGREE#*x}
"$XENT" gen --rows "$ROWS" --vocab "$VOCAB" --logits "$OUT/agree_logits.npy" --targets "$OUT/agree_targets.npy" 2>>"$OUT/log.txt"
"$XENT" score --device gpu --logits "$OUT/agree_logits.npy" --targets "$OUT/agree_targets.npy" \
  --per-token "$OUT/agree_nll.npy" --json >"$OUT/agree_score.json" 2>>"$OUT/log.txt"

log "torch peers (eager, torch.compile) and agreement"
if $PY -c "import torch, numpy" 2>/dev/null; then
  $PY benches/peers/torch_gpu.py --shapes "${BIG1}x${V1},${BIG2}x${V2},1x${SMALL_V},8x${SMALL_V},64x${SMALL_V}" \
    --dtypes f32,f16,bf16 --iters "$ITERS" --out "$OUT/torch.json" \
    --agree "$OUT/agree_logits.npy" "$OUT/agree_targets.npy" "$OUT/agree_nll.npy" >/dev/null 2>>"$OUT/log.txt" \
    || echo "torch peers failed (see log)" | tee -a "$OUT/log.txt"
  $PY benches/peers/torch_gpu.py --kld --shapes "${BIG1}x${V1},1x${SMALL_V},64x${SMALL_V}" --dtypes f32,bf16 \
    --iters "$ITERS" --out "$OUT/torch_kld.json" >/dev/null 2>>"$OUT/log.txt" \
    || echo "torch kld peers failed (see log)" | tee -a "$OUT/log.txt"
  # Loss + gradient: F.cross_entropy forward and backward() on a leaf tensor, eager and compiled.
  $PY benches/peers/torch_gpu.py --train --shapes "${BIG1}x${V1},1024x${V1},1x${SMALL_V},64x${SMALL_V}" \
    --dtypes f32,bf16 --iters "$ITERS" --out "$OUT/torch_train.json" >/dev/null 2>>"$OUT/log.txt" \
    || echo "torch train peers failed (see log)" | tee -a "$OUT/log.txt"
else
  echo "no torch here: peers skipped" | tee -a "$OUT/log.txt"
fi
rm -f "$OUT/agree_logits.npy"

log "table"
$PY scripts/gpu_table.py "$OUT" | tee "$OUT/table.txt"
