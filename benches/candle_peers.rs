//! candle's own per-token loss against `xent::candle`, in the same process, on the same tensors.
//!
//! The peer is candle-nn's `log_softmax` written in the candle-core ops it is made of
//! (`x - max`, `exp`, `sum`, `log`, subtract), then `gather` at the targets and a negation;
//! xent is `xent::candle::cross_entropy` on the same candle tensor, read in place. Each side runs
//! once to warm up, then `XENT_PEERS_REPS` times (default 5), xent's block first; the table gives
//! the median and range, the logits' bytes over the median, the ratio, and each side's worst
//! error against the f64 reference with the rows beyond `1e-6 + 2e-6·|ref|`.
//!
//! `cargo bench --features candle --bench candle_peers`
//! Shapes: `XENT_PEERS_SHAPES=256x32000:f32,64x128256:bf16` (rows x vocab : f32 | f16 | bf16).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use xent::{Dtype, Options, Targets};

const DEFAULT_SHAPES: &str = "256x32000:f32,256x32000:bf16,64x128256:f32,64x128256:bf16,2048x128256:f32";
const ATOL: f64 = 1e-6;
const RTOL: f64 = 2e-6;

/// candle's composed loss: candle-nn's `log_softmax` in candle-core ops, `gather`, negate.
fn candle_nll(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let diff = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
    let log_sm = diff.broadcast_sub(&diff.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    log_sm.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)?.neg()
}

/// One side's timings (seconds, sorted) and its last output.
struct Side {
    times: Vec<f64>,
    nll: Vec<f32>,
}

impl Side {
    fn median_ms(&self) -> f64 {
        self.times[self.times.len() / 2] * 1e3
    }
    fn range_ms(&self) -> String {
        format!("{:.2}–{:.2}", self.times[0] * 1e3, self.times[self.times.len() - 1] * 1e3)
    }
}

/// Runs `f` once to warm up, then `reps` timed times.
fn time(reps: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<Side> {
    let mut nll = f()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t0 = Instant::now();
        nll = f()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(Side { times, nll: nll.to_dtype(DType::F32)?.to_vec1()? })
}

fn parse_shape(s: &str) -> Result<(usize, usize, Dtype)> {
    let (dims, dtype) = s.split_once(':').unwrap_or((s, "f32"));
    let (rows, vocab) = dims.split_once('x').context("shape must be ROWSxVOCAB[:dtype]")?;
    Ok((rows.trim().parse()?, vocab.trim().parse()?, dtype.trim().parse()?))
}

fn to_tensor(x: Vec<f32>, rows: usize, vocab: usize, dtype: Dtype) -> Result<Tensor> {
    let dims = (rows, vocab);
    Ok(match dtype {
        Dtype::F32 => Tensor::from_vec(x, dims, &Device::Cpu)?,
        Dtype::F16 => Tensor::from_vec(x.into_iter().map(half::f16::from_f32).collect::<Vec<_>>(), dims, &Device::Cpu)?,
        Dtype::BF16 => {
            Tensor::from_vec(x.into_iter().map(half::bf16::from_f32).collect::<Vec<_>>(), dims, &Device::Cpu)?
        }
    })
}

/// Worst |got - ref| and the number of rows beyond the tolerance (NaN counts as beyond).
fn errors(got: &[f32], want: &[xent::reference::RefRow]) -> (f64, usize) {
    got.iter().zip(want).fold((0f64, 0usize), |(worst, bad), (g, w)| {
        let e = (f64::from(*g) - w.nll).abs();
        (worst.max(e), bad + usize::from(e.is_nan() || e > ATOL + RTOL * w.nll.abs()))
    })
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let shapes = std::env::var("XENT_PEERS_SHAPES").unwrap_or_else(|_| DEFAULT_SHAPES.into());
    let reps: usize = std::env::var("XENT_PEERS_REPS").ok().map(|s| s.parse()).transpose()?.unwrap_or(5).max(1);
    println!(
        "candle 0.11 CPU peers: candle-core log_softmax + gather vs xent::candle::cross_entropy ({} threads, {}), median of {reps}",
        rayon::current_num_threads(),
        xent::cpu::isa()
    );
    println!(
        "| rows x vocab | dtype | side | median ms | range ms | GB/s | vs candle | worst abs err | rows off (of) |\n|---|---|---|---:|---:|---:|---:|---:|---:|"
    );
    let mut failed = false;
    for spec in shapes.split(',').filter(|s| !s.trim().is_empty()) {
        let (rows, vocab, dtype) = parse_shape(spec)?;
        let (x, t) = xent::synth::eval_set(rows, vocab, 5, -100);
        // The peer has no ignore index: every row gets a real target.
        let t: Vec<i64> = t.into_iter().map(|v| v.max(0)).collect();
        let logits = to_tensor(x, rows, vocab, dtype)?;
        let targets = Tensor::from_vec(t.clone(), rows, &Device::Cpu)?;
        let bytes = (rows * vocab * dtype.size()) as f64;
        let want =
            xent::candle::with_logits(&logits, |l| xent::reference::score(l, Targets::I64(&t), &Options::default()))??;

        // Each side in a block of its own (one warm-up, then the timed runs): candle's loss
        // allocates and frees three [rows, vocab] temporaries, and on this VM whatever runs
        // right after that is measurably slower, so alternating would charge candle's cost to xent.
        let ours = time(reps, || Ok(xent::candle::cross_entropy(&logits, &targets)?))?;
        let peer = match time(reps, || Ok(candle_nll(&logits, &targets)?)) {
            Ok(side) => Some(side),
            Err(e) => {
                println!("| {rows} x {vocab} | {dtype} | candle | unsupported: {e} | | | | | |");
                None
            }
        };
        let (ours_err, ours_bad) = errors(&ours.nll, &want);
        let ours_ms = ours.median_ms();
        let ratio = peer.as_ref().map(|p| p.median_ms() / ours_ms);
        if let Some(p) = &peer {
            let (err, bad) = errors(&p.nll, &want);
            let ms = p.median_ms();
            println!(
                "| {rows} x {vocab} | {dtype} | candle log_softmax+gather | {ms:.2} | {} | {:.2} | 1.00x | {err:.2e} | {bad} ({rows}) |",
                p.range_ms(),
                bytes / ms / 1e6
            );
        }
        println!(
            "| {rows} x {vocab} | {dtype} | xent::candle | {ours_ms:.2} | {} | {:.2} | {} | {ours_err:.2e} | {ours_bad} ({rows}) |",
            ours.range_ms(),
            bytes / ours_ms / 1e6,
            ratio.map_or("-".into(), |r| format!("{r:.1}x faster"))
        );
        failed |= ours_bad > 0;
    }
    if failed {
        bail!("xent::candle disagrees with the f64 reference");
    }
    Ok(())
}
