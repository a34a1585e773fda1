//! Training on candle's CPU tensors: candle's own composed loss against
//! `xent::candle::train::cross_entropy`, forward + `backward()`, in the same process, on the
//! same `Var`.
//!
//! The peer is the mean cross-entropy in candle-core ops as candle-nn composes it (`x - max`,
//! `exp`, `sum`, `log`, subtract, `gather`, negate, mean), differentiated by candle's autograd;
//! xent is one op whose backward is the fast CPU gradient. Each side runs once to warm up, then
//! `XENT_PEERS_REPS` times (default 5), xent's block first; the table gives the median and
//! range of forward + backward, the ratio, each side's largest gradient error against the f64
//! reference (relative to the gradient's largest magnitude), and — to show where xent's time
//! goes — the median of the same loss and gradient through `xent::train::cpu::loss_and_grad`
//! alone, outside candle (candle's backward then adds the gradient to a zero tensor of its own).
//!
//! `cargo bench --features candle --bench candle_train_peers`
//! Shapes: `XENT_PEERS_SHAPES=256x32000:f32,64x128256:bf16` (rows x vocab : f32 | f16 | bf16).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use xent::train::{LossOptions, Upstream};
use xent::{Dtype, Logits, Targets};

const DEFAULT_SHAPES: &str = "256x32000:f32,256x32000:bf16,64x128256:f32,64x128256:bf16,1024x128256:f32";

/// candle's composed mean loss: candle-nn's `log_softmax` in candle-core ops, `gather`, mean.
fn candle_loss(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let diff = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
    let log_sm = diff.broadcast_sub(&diff.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    log_sm.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)?.neg()?.mean_all()
}

/// Forward + backward timings (seconds, sorted) and the last gradient, as f32.
fn time(reps: usize, var: &Var, mut loss: impl FnMut(&Tensor) -> Result<Tensor>) -> Result<(Vec<f64>, Vec<f32>)> {
    let mut run = || -> Result<(f64, Vec<f32>)> {
        let start = Instant::now();
        let l = loss(var.as_tensor())?;
        let grads = l.backward()?;
        let g = grads.get(var.as_tensor()).context("no gradient for the logits")?.clone();
        let seconds = start.elapsed().as_secs_f64();
        Ok((seconds, g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?))
    };
    let mut last = run()?.1;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let (t, g) = run()?;
        times.push(t);
        last = g;
    }
    times.sort_by(f64::total_cmp);
    Ok((times, last))
}

fn main() -> Result<()> {
    let reps: usize = std::env::var("XENT_PEERS_REPS").map_or(Ok(5), |v| v.parse()).context("XENT_PEERS_REPS")?;
    let shapes = std::env::var("XENT_PEERS_SHAPES").unwrap_or_else(|_| DEFAULT_SHAPES.to_string());
    println!(
        "candle training loss, forward + backward, {} threads, median (range) of {reps}",
        rayon::current_num_threads()
    );
    println!(
        "{:>14} {:>5} {:>24} {:>24} {:>7} {:>19} {:>16}",
        "rows x vocab",
        "dtype",
        "candle composed (ms)",
        "xent::candle::train (ms)",
        "ratio",
        "error candle / xent",
        "xent alone (ms)"
    );
    for shape in shapes.split(',') {
        let (dims, dtype) = shape.split_once(':').context("shape rows x vocab : dtype")?;
        let (rows, vocab) = dims.split_once('x').context("shape rows x vocab")?;
        let (rows, vocab): (usize, usize) = (rows.parse()?, vocab.parse()?);
        let dtype = match dtype {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            other => bail!("dtype {other}: f32, f16 or bf16"),
        };
        let mut rng = xent::synth::Rng::new(7);
        let x: Vec<f32> = (0..rows * vocab).map(|_| 2.0 * rng.normal() as f32).collect();
        let t: Vec<u32> = (0..rows).map(|_| rng.below(vocab) as u32).collect();
        let logits = Tensor::from_vec(x, (rows, vocab), &Device::Cpu)?.to_dtype(dtype)?;
        let targets = Tensor::from_vec(t, rows, &Device::Cpu)?;
        let var = Var::from_tensor(&logits)?;
        let opts = LossOptions::default();
        let (ours, g_ours) = time(reps, &var, |x| Ok(xent::candle::train::cross_entropy(x, &targets, &opts)?))?;
        let (theirs, g_theirs) = time(reps, &var, |x| Ok(candle_loss(x, &targets)?))?;
        // The f64 reference on exactly the values the tensor holds.
        let xd = match dtype {
            DType::F32 => Dtype::F32,
            DType::F16 => Dtype::F16,
            _ => Dtype::BF16,
        };
        let rounded = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bytes = xd.encode(&rounded);
        let view = Logits::from_bytes(&bytes, xd, rows, vocab)?;
        let t64: Vec<i64> = targets.to_vec1::<u32>()?.iter().map(|&v| i64::from(v)).collect();
        let want = xent::train::reference::cross_entropy(view, Targets::I64(&t64), &opts, Upstream::Scalar(1.0))?;
        let scale = want.grad.iter().fold(0f64, |a, v| a.max(v.abs())).max(f64::MIN_POSITIVE);
        let error =
            |g: &[f32]| g.iter().zip(&want.grad).fold(0f64, |a, (p, q)| a.max((f64::from(*p) - q).abs())) / scale;
        // The same loss and gradient outside candle.
        let mut alone = Vec::with_capacity(reps);
        let mut grad = vec![0u8; bytes.len()];
        for _ in 0..=reps {
            let start = Instant::now();
            xent::train::cpu::loss_and_grad(view, Targets::I64(&t64), &opts, Upstream::Scalar(1.0), Some(&mut grad))?;
            alone.push(start.elapsed().as_secs_f64());
        }
        alone.remove(0);
        alone.sort_by(f64::total_cmp);
        let ms = |t: &[f64]| format!("{:.1} ({:.1}–{:.1})", t[t.len() / 2] * 1e3, t[0] * 1e3, t[t.len() - 1] * 1e3);
        println!(
            "{:>14} {:>5} {:>24} {:>24} {:>6.2}× {:>9.1e} / {:.1e} {:>16.1}",
            format!("{rows}x{vocab}"),
            format!("{dtype:?}").to_lowercase(),
            ms(&theirs),
            ms(&ours),
            theirs[theirs.len() / 2] / ours[ours.len() / 2],
            error(&g_theirs),
            error(&g_ours),
            alone[alone.len() / 2] * 1e3
        );
    }
    Ok(())
}
