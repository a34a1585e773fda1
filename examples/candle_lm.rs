//! A small decoder-only transformer in candle (candle-core ops only, random weights from a fixed
//! seed), a forward pass on candle's CPU, and its language-modelling loss two ways on the same
//! logits tensor: through `xent::candle` (read in place, one pass per row) and through candle's
//! own composed `log_softmax + gather` — each timed and checked against the f64 reference.
//!
//! Run: `cargo run --release --features candle --example candle_lm`
//! (`-- --small` or `XENT_EXAMPLE_SMALL=1` for a quick run: vocab 1000, d_model 64, sequence 32).
//! Exits non-zero if either loss is off the reference beyond its tolerance.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use xent::{Logits, Options, Summary, Targets};

/// Model and batch sizes.
#[derive(Debug, Clone, Copy)]
struct Config {
    vocab: usize,
    d_model: usize,
    heads: usize,
    layers: usize,
    seq: usize,
    batch: usize,
}

impl Config {
    const FULL: Config = Config { vocab: 32_000, d_model: 256, heads: 4, layers: 2, seq: 128, batch: 4 };
    const SMALL: Config = Config { vocab: 1000, d_model: 64, heads: 2, layers: 2, seq: 32, batch: 2 };
}

/// One pre-norm transformer block: causal self-attention and a GELU MLP, each with a residual.
struct Block {
    norm1: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    norm2: Tensor,
    up: Tensor,
    down: Tensor,
}

struct Model {
    cfg: Config,
    embed: Tensor,
    pos: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    head: Tensor,
}

/// Weights drawn from N(0, std²) with xent's seeded generator, so every run sees the same model.
fn normal(rng: &mut xent::synth::Rng, dims: (usize, usize), std: f64) -> Result<Tensor> {
    let v: Vec<f32> = (0..dims.0 * dims.1).map(|_| (rng.normal() * std) as f32).collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

impl Model {
    fn new(cfg: Config, seed: u64) -> Result<Self> {
        let mut rng = xent::synth::Rng::new(seed);
        let d = cfg.d_model;
        let ones = || Tensor::ones(d, DType::F32, &Device::Cpu);
        let w = 1.0 / (d as f64).sqrt();
        let blocks = (0..cfg.layers)
            .map(|_| {
                Ok(Block {
                    norm1: ones()?,
                    wq: normal(&mut rng, (d, d), w)?,
                    wk: normal(&mut rng, (d, d), w)?,
                    wv: normal(&mut rng, (d, d), w)?,
                    wo: normal(&mut rng, (d, d), w / 2.0)?,
                    norm2: ones()?,
                    up: normal(&mut rng, (d, 4 * d), w)?,
                    down: normal(&mut rng, (4 * d, d), w / 4.0)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Model {
            cfg,
            embed: normal(&mut rng, (cfg.vocab, d), 1.0)?,
            pos: normal(&mut rng, (cfg.seq, d), 0.1)?,
            blocks,
            norm: ones()?,
            // Logits of unit spread: an untrained model, a little worse than uniform.
            head: normal(&mut rng, (d, cfg.vocab), w)?,
        })
    }

    /// `tokens` `[B, T]` (i64) to logits `[B, T, vocab]` (f32).
    fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let Config { d_model: d, heads, seq: t, batch: b, vocab, .. } = self.cfg;
        let hd = d / heads;
        let mut x = self.embed.index_select(&tokens.flatten_all()?, 0)?.reshape((b, t, d))?.broadcast_add(&self.pos)?;
        // Causal mask: -inf above the diagonal.
        let mask: Vec<f32> = (0..t * t).map(|k| if k % t > k / t { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (t, t), &Device::Cpu)?;
        for blk in &self.blocks {
            let h = rms_norm(&x, &blk.norm1)?.reshape((b * t, d))?;
            let split = |w: &Tensor| -> Result<Tensor> {
                Ok(h.matmul(w)?.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()?)
            };
            let (q, k, v) = (split(&blk.wq)?, split(&blk.wk)?, split(&blk.wv)?);
            let att = q.matmul(&k.t()?.contiguous()?)?.affine(1.0 / (hd as f64).sqrt(), 0.0)?.broadcast_add(&mask)?;
            let y = softmax_last(&att)?.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((b * t, d))?;
            x = (x + y.matmul(&blk.wo)?.reshape((b, t, d))?)?;
            let h = rms_norm(&x, &blk.norm2)?.reshape((b * t, d))?;
            let m = h.matmul(&blk.up)?.gelu()?.matmul(&blk.down)?;
            x = (x + m.reshape((b, t, d))?)?;
        }
        let h = rms_norm(&x, &self.norm)?.reshape((b * t, d))?;
        Ok(h.matmul(&self.head)?.reshape((b, t, vocab))?)
    }
}

/// RMS norm over the last dimension: `x / sqrt(mean(x²) + eps) * weight`.
fn rms_norm(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let rms = x.sqr()?.mean_keepdim(D::Minus1)?.affine(1.0, 1e-5)?.sqrt()?;
    Ok(x.broadcast_div(&rms)?.broadcast_mul(weight)?)
}

/// Softmax over the last dimension, max-subtracted.
fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let e = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// candle's own per-token loss: candle-nn's `log_softmax` (which candle-core does not have) in
/// the candle-core ops it is made of, then `gather` at the targets and a negation.
fn candle_nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let diff = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
    let log_sm = diff.broadcast_sub(&diff.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    // candle's gather needs contiguous indices.
    let idx = targets.contiguous()?.unsqueeze(D::Minus1)?;
    Ok(log_sm.gather(&idx, D::Minus1)?.squeeze(D::Minus1)?.neg()?)
}

/// Largest |got - want| and whether every row is within `atol + rtol·|want|`.
fn against(got: &[f32], want: &[xent::reference::RefRow], atol: f64, rtol: f64) -> (f64, usize) {
    let mut worst = 0f64;
    let mut bad = 0;
    for (g, w) in got.iter().zip(want) {
        let err = (f64::from(*g) - w.nll).abs();
        worst = worst.max(err);
        bad += usize::from(err.is_nan() || err > atol + rtol * w.nll.abs());
    }
    (worst, bad)
}

fn main() -> Result<()> {
    let small = std::env::args().any(|a| a == "--small") || std::env::var("XENT_EXAMPLE_SMALL").as_deref() == Ok("1");
    let cfg = if small { Config::SMALL } else { Config::FULL };
    println!(
        "model: {} layers, d_model {}, {} heads, vocab {}; batch {} x sequence {} (candle CPU)",
        cfg.layers, cfg.d_model, cfg.heads, cfg.vocab, cfg.batch, cfg.seq
    );
    let model = Model::new(cfg, 42)?;

    // A batch of token sequences, one longer than the context: inputs are tokens[:, :T], targets
    // tokens[:, 1:] — a strided view, which xent reads through its layout.
    let mut rng = xent::synth::Rng::new(7);
    let tokens: Vec<i64> = (0..cfg.batch * (cfg.seq + 1)).map(|_| rng.below(cfg.vocab) as i64).collect();
    let tokens = Tensor::from_vec(tokens, (cfg.batch, cfg.seq + 1), &Device::Cpu)?;
    let inputs = tokens.narrow(1, 0, cfg.seq)?.contiguous()?;
    let targets = tokens.narrow(1, 1, cfg.seq)?;

    let t0 = Instant::now();
    let logits = model.forward(&inputs)?;
    println!("forward: {:.1} ms -> logits {:?} {:?}", ms(t0), logits.dims(), logits.dtype());

    // The f64 oracle over the very same bytes.
    let flat_targets: Vec<i64> = targets.contiguous()?.flatten_all()?.to_vec1()?;
    let want = xent::candle::with_logits(&logits, |x: Logits<'_>| {
        xent::reference::score(x, Targets::I64(&flat_targets), &Options::default())
    })??;

    // Each side warmed once (thread pool, page faults) and then timed once, xent first: what runs
    // right after candle's loss (which frees two [B, T, vocab] temporaries) is slowed down by it.
    xent::candle::cross_entropy(&logits, &targets)?;
    let t0 = Instant::now();
    let rows = xent::candle::score(&logits, &targets, &Options::default())?;
    let xent_ms = ms(t0);
    let t0 = Instant::now();
    let nll = xent::candle::cross_entropy(&logits, &targets)?;
    let xent_tensor_ms = ms(t0);
    candle_nll(&logits, &targets)?;
    let t0 = Instant::now();
    let peer = candle_nll(&logits, &targets)?;
    let candle_ms = ms(t0);

    let xent_nll: Vec<f32> = nll.flatten_all()?.to_vec1()?;
    let candle_loss: Vec<f32> = peer.flatten_all()?.to_vec1()?;
    let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
    let ref_mean = want.iter().map(|r| r.nll).sum::<f64>() / want.len() as f64;
    // xent is held to the tolerance of its own tests; candle's f32 sum of exps to a looser one.
    let (xent_tol, candle_tol) = ((1e-6, 2e-6), (1e-4, 1e-5));
    let (xent_err, xent_bad) = against(&xent_nll, &want, xent_tol.0, xent_tol.1);
    let (candle_err, candle_bad) = against(&candle_loss, &want, candle_tol.0, candle_tol.1);
    let summary = Summary::of(&rows);

    println!("reference (f64):     mean nll {ref_mean:.6}");
    println!(
        "xent::candle:        mean nll {:.6}  {xent_tensor_ms:7.2} ms (score: {xent_ms:.2} ms)  max |err| {xent_err:.2e}  rows off: {xent_bad}",
        mean(&xent_nll)
    );
    println!(
        "candle log_softmax:  mean nll {:.6}  {candle_ms:7.2} ms                      max |err| {candle_err:.2e}  rows off: {candle_bad}",
        mean(&candle_loss)
    );
    println!(
        "speed-up {:.1}x; perplexity {:.2}, accuracy {:.4} over {} tokens",
        candle_ms / xent_tensor_ms,
        summary.perplexity(),
        summary.accuracy(),
        summary.tokens
    );
    if xent_bad > 0 || candle_bad > 0 {
        bail!("losses disagree with the f64 reference: xent {xent_bad} rows off, candle {candle_bad} rows off");
    }
    Ok(())
}

fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}
