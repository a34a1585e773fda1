//! Trains a small decoder-only language model on burn's autodiff wgpu backend twice from the same
//! seed — once with burn's own `CrossEntropyLoss`, once with `xent::burn::train::cross_entropy`,
//! whose backward is xent's fused loss-and-gradient kernel writing the gradient over the logits —
//! and prints both loss curves, the time per step and the peak GPU memory of each.
//!
//! The data is generated: sequences over a few hundred "active" token ids spread across the
//! vocabulary, each token followed by a fixed successor 90% of the time (a seeded random
//! permutation), so the loss falls from ln(V) towards the noise's entropy. The last sequence of
//! every batch ends in padding (ignored targets).
//!
//! Each loss runs in a fresh process (this example runs itself with `--variant burn|xent`) so
//! that each peak memory figure is its own: the high-water mark of the memory burn's allocator
//! (cubecl) reserved — the pages of its pools at their most — plus the bytes in use after the
//! forward and after the backward (the largest over the steps). xent's own buffers (a few bytes
//! per row: targets, scales, records) are not in cubecl's pools and are not counted.
//!
//! Run: `cargo run --release --features burn,candle --example burn_train`
//! (`-- --small` for a quick check: tiny sizes, a few steps; `-- --steps N`).
//!
//! Exits non-zero if the two curves differ by more than the tolerance (relative, per step), or
//! if a loss is not finite.

use std::process::Command;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use burn::module::{Module, Param};
use burn::nn::attention::{generate_autoregressive_mask, MhaInput, MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::gelu;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use serde_json::{json, Value};
use xent::synth::Rng;
use xent::train::LossOptions;

/// Model, batch and schedule.
#[derive(Debug, Clone, Copy)]
struct Config {
    vocab: usize,
    d_model: usize,
    heads: usize,
    layers: usize,
    seq: usize,
    batch: usize,
    /// Token ids the data uses (spread over the vocabulary).
    active: usize,
    steps: usize,
    /// Print the curves every this many steps.
    every: usize,
    lr: f64,
    /// Largest relative difference of the two curves at a step.
    tolerance: f64,
}

impl Config {
    const FULL: Config = Config {
        vocab: 32_000,
        d_model: 128,
        heads: 4,
        layers: 2,
        seq: 64,
        batch: 4,
        active: 512,
        steps: 300,
        every: 20,
        lr: 2e-3,
        tolerance: 5e-3,
    };
    const SMALL: Config = Config {
        vocab: 1000,
        d_model: 32,
        heads: 2,
        layers: 1,
        seq: 16,
        batch: 2,
        active: 40,
        steps: 12,
        every: 1,
        lr: 2e-3,
        tolerance: 1e-3,
    };
}

/// Token id reserved for padding: never a real target, so burn's `pad_tokens` can name it.
const PAD: usize = 0;

/// One pre-norm transformer block: causal multi-head self-attention and a GELU MLP, each with a
/// residual connection.
#[derive(Module, Debug)]
struct Block {
    norm1: LayerNorm,
    attn: MultiHeadAttention,
    norm2: LayerNorm,
    up: Linear,
    down: Linear,
}

/// Token embedding + learned positions, the blocks, a final norm and the LM head.
#[derive(Module, Debug)]
struct Lm {
    embed: Embedding,
    pos: Embedding,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Linear,
}

/// A parameter drawn from N(0, std²) on the host with xent's seeded generator: the same model on
/// every run and every driver.
fn normal<const D: usize>(rng: &mut Rng, shape: [usize; D], std: f64, device: &Device) -> Param<Tensor<D>> {
    let values: Vec<f32> = (0..shape.iter().product()).map(|_| (rng.normal() * std) as f32).collect();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

/// A linear layer `[d_in] -> [d_out]` with N(0, std²) weights and, if any, a zero bias.
fn linear(rng: &mut Rng, (d_in, d_out): (usize, usize), std: f64, bias: bool, device: &Device) -> Linear {
    let mut layer = LinearConfig::new(d_in, d_out).with_bias(bias).with_initializer(Initializer::Zeros).init(device);
    layer.weight = normal(rng, [d_in, d_out], std, device);
    layer
}

impl Lm {
    fn new(cfg: Config, seed: u64, device: &Device) -> Self {
        let mut rng = Rng::new(seed);
        let d = cfg.d_model;
        let w = 1.0 / (d as f64).sqrt();
        let blocks = (0..cfg.layers)
            .map(|_| {
                let mut attn = MultiHeadAttentionConfig::new(d, cfg.heads)
                    .with_dropout(0.0)
                    .with_initializer(Initializer::Zeros)
                    .init(device);
                attn.query = linear(&mut rng, (d, d), w, true, device);
                attn.key = linear(&mut rng, (d, d), w, true, device);
                attn.value = linear(&mut rng, (d, d), w, true, device);
                attn.output = linear(&mut rng, (d, d), w / 2.0, true, device);
                Block {
                    norm1: LayerNormConfig::new(d).init(device),
                    attn,
                    norm2: LayerNormConfig::new(d).init(device),
                    up: linear(&mut rng, (d, 4 * d), w, true, device),
                    down: linear(&mut rng, (4 * d, d), w / 4.0, true, device),
                }
            })
            .collect();
        let mut embed = EmbeddingConfig::new(cfg.vocab, d).with_initializer(Initializer::Zeros).init(device);
        embed.weight = normal(&mut rng, [cfg.vocab, d], 1.0, device);
        let mut pos = EmbeddingConfig::new(cfg.seq, d).with_initializer(Initializer::Zeros).init(device);
        pos.weight = normal(&mut rng, [cfg.seq, d], 0.1, device);
        Lm {
            embed,
            pos,
            blocks,
            norm: LayerNormConfig::new(d).init(device),
            head: linear(&mut rng, (d, cfg.vocab), w, false, device),
        }
    }

    /// `tokens` `[B, T]` to logits `[B, T, vocab]`.
    fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [b, t] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<1, Int>::arange(0..t as i64, &device).reshape([1, t]);
        let mut x = self.embed.forward(tokens) + self.pos.forward(positions);
        let causal: Tensor<3, Bool> = generate_autoregressive_mask(b, t, &device);
        for blk in &self.blocks {
            let h = blk.norm1.forward(x.clone());
            let attn = blk.attn.forward(MhaInput::self_attn(h).mask_attn(causal.clone()));
            x = x + attn.context;
            let h = blk.norm2.forward(x.clone());
            x = x + blk.down.forward(gelu(blk.up.forward(h)));
        }
        self.head.forward(self.norm.forward(x))
    }
}

/// The generated language: `active` token ids, each followed by its successor 90% of the time.
struct Data {
    ids: Vec<i64>,
    next: Vec<usize>,
    rng: Rng,
}

impl Data {
    fn new(cfg: Config, seed: u64) -> Self {
        let mut rng = Rng::new(seed);
        // Ids 1..vocab (0 is the pad), spread out; a random permutation as the successor map.
        let ids: Vec<i64> = (0..cfg.active).map(|i| (1 + i * (cfg.vocab - 1) / cfg.active) as i64).collect();
        let mut next: Vec<usize> = (0..cfg.active).collect();
        for i in (1..next.len()).rev() {
            next.swap(i, rng.below(i + 1));
        }
        Data { ids, next, rng }
    }

    /// Inputs and targets `[B·T]`; the last sequence's final T/8 targets are padding (-100).
    fn batch(&mut self, cfg: Config) -> (Vec<i64>, Vec<i64>) {
        let (b, t) = (cfg.batch, cfg.seq);
        let (mut inputs, mut targets) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
        for _ in 0..b {
            let mut s = self.rng.below(self.ids.len());
            let mut seq = vec![self.ids[s]];
            for _ in 0..t {
                s = if self.rng.uniform() < 0.9 { self.next[s] } else { self.rng.below(self.ids.len()) };
                seq.push(self.ids[s]);
            }
            inputs.extend_from_slice(&seq[..t]);
            targets.extend_from_slice(&seq[1..]);
        }
        for x in &mut targets[b * t - t / 8..] {
            *x = -100;
        }
        (inputs, targets)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    Burn,
    Xent,
}

/// One training run in this process; its results as JSON.
fn train(cfg: Config, variant: Variant) -> Result<Value> {
    let (b, t, v) = (cfg.batch, cfg.seq, cfg.vocab);
    let n = b * t;
    // The same device setup for both runs: xent meets burn's wgpu device before its first tensor.
    let plain = xent::burn::device()?;
    let adapter = xent::burn::context(&plain)?.adapter_info().clone();
    let device = plain.clone().autodiff();
    let mut model = Lm::new(cfg, 42, &device);
    let mut optim = AdamConfig::new().init();
    let mut data = Data::new(cfg, 7);
    let burn_loss = CrossEntropyLossConfig::new().with_pad_tokens(Some(vec![PAD])).init(&device);
    let opts = LossOptions::default();
    let sync = || plain.sync().map_err(|e| anyhow!("device sync: {e:?}"));
    let in_use = || plain.memory_pool_usage().map_or(0, |u| u.bytes_in_use);

    let (mut losses, mut fwd_ms, mut bwd_ms, mut opt_ms) = (vec![], vec![], vec![], vec![]);
    let (mut in_use_fwd, mut in_use_bwd) = (0u64, 0u64);
    for step in 0..cfg.steps {
        let (inputs, targets) = data.batch(cfg);
        let inputs = Tensor::<2, Int>::from_data(TensorData::new(inputs, [b, t]), &device);
        let t0 = Instant::now();
        let loss = match variant {
            // The logits are a temporary: nothing holds them when the backward runs, so xent
            // writes their gradient over them.
            Variant::Xent => {
                let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [b, t]), &device);
                xent::burn::train::cross_entropy(&model.forward(inputs), &targets, &opts)?
            }
            Variant::Burn => {
                let targets: Vec<i64> = targets.iter().map(|&x| if x == -100 { PAD as i64 } else { x }).collect();
                let targets = Tensor::<1, Int>::from_data(TensorData::new(targets, [n]), &device);
                burn_loss.forward(model.forward(inputs).reshape([n, v]), targets)
            }
        };
        let value = loss.clone().inner().into_scalar::<f32>();
        fwd_ms.push(ms(t0));
        in_use_fwd = in_use_fwd.max(in_use());
        if !value.is_finite() {
            bail!("{variant:?}: loss {value} at step {step}");
        }
        losses.push(value);
        let t0 = Instant::now();
        let grads = loss.backward();
        sync()?;
        bwd_ms.push(ms(t0));
        in_use_bwd = in_use_bwd.max(in_use());
        let t0 = Instant::now();
        let grads = GradientsParams::from_grads(grads, &model);
        model = optim.step(cfg.lr, model, grads);
        sync()?;
        opt_ms.push(ms(t0));
        if step % cfg.every == 0 || step + 1 == cfg.steps {
            eprintln!("  {variant:?} step {step:4}: loss {value:.5}");
        }
    }
    // The high-water mark of the pages cubecl's pools reserved.
    let pools = plain.memory_pool_report().unwrap_or_default();
    let peak: u64 = pools.iter().map(|p| p.page_size * p.pages_peak).sum();
    let stats = xent::burn::train::backward_stats();
    Ok(json!({
        "adapter": format!("{} ({:?})", adapter.name, adapter.backend),
        "losses": losses,
        "fwd_ms": fwd_ms,
        "bwd_ms": bwd_ms,
        "opt_ms": opt_ms,
        "peak_reserved": peak,
        "reserved_now": plain.memory_pool_usage().map_or(0, |u| u.bytes_reserved),
        "in_use_fwd": in_use_fwd,
        "in_use_bwd": in_use_bwd,
        "in_place": stats.in_place,
        "separate": stats.separate,
        "shared": stats.shared,
        "staged": stats.staged,
    }))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let small = args.iter().any(|a| a == "--small");
    let mut cfg = if small { Config::SMALL } else { Config::FULL };
    if let Some(steps) = value_arg(&args, "--steps")? {
        cfg.steps = steps.parse().with_context(|| format!("--steps {steps}"))?;
    }
    if cfg.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if let Some(variant) = value_arg(&args, "--variant")? {
        let variant = match variant.as_str() {
            "burn" => Variant::Burn,
            "xent" => Variant::Xent,
            other => bail!("--variant {other}: expected burn or xent"),
        };
        println!("{}", train(cfg, variant)?);
        return Ok(());
    }

    println!(
        "LM: {} layers, d_model {}, {} heads, vocab {}; batch {} x sequence {} ({} targets a step, {} ignored); \
         Adam lr {}, {} steps, same seed, each loss in its own process",
        cfg.layers,
        cfg.d_model,
        cfg.heads,
        cfg.vocab,
        cfg.batch,
        cfg.seq,
        cfg.batch * cfg.seq,
        cfg.seq / 8,
        cfg.lr,
        cfg.steps
    );
    let exe = std::env::current_exe()?;
    let mut runs = Vec::new();
    for variant in ["burn", "xent"] {
        eprintln!("{variant}:");
        let out = Command::new(&exe)
            .args(&args[1..])
            .args(["--variant", variant])
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running the {variant} variant"))?;
        if !out.status.success() {
            bail!("the {variant} run failed ({})", out.status);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text.lines().last().ok_or_else(|| anyhow!("the {variant} run printed nothing"))?;
        runs.push(serde_json::from_str::<Value>(line).with_context(|| format!("the {variant} run's result"))?);
    }
    let (burn, xent) = (&runs[0], &runs[1]);
    let floats = |r: &Value, key: &str| -> Vec<f64> {
        r[key].as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default()
    };
    let (lb, lx) = (floats(burn, "losses"), floats(xent, "losses"));
    println!("adapter: {}", xent["adapter"].as_str().unwrap_or("?"));
    println!("{:>6}  {:>22}  {:>22}  {:>10}", "step", "burn CrossEntropyLoss", "xent::burn::train", "|Δ|/loss");
    let mut worst = 0f64;
    for (step, (b, x)) in lb.iter().zip(&lx).enumerate() {
        let rel = (b - x).abs() / b.abs();
        worst = worst.max(if rel.is_nan() { f64::INFINITY } else { rel });
        if step % cfg.every == 0 || step + 1 == cfg.steps {
            println!("{step:>6}  {b:>22.5}  {x:>22.5}  {rel:>10.1e}");
        }
    }
    let warm = if cfg.steps > 10 { 5 } else { 1.min(cfg.steps - 1) };
    let median = |r: &Value, key: &str| {
        let mut v = floats(r, key)[warm..].to_vec();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mib = |r: &Value, key: &str| r[key].as_f64().unwrap_or(0.0) / (1 << 20) as f64;
    println!(
        "time per step, median of steps {warm}..{} (forward + loss, backward, optimizer; each ended by a device sync):",
        cfg.steps
    );
    for (name, r) in [("burn", burn), ("xent", xent)] {
        let (f, b, o) = (median(r, "fwd_ms"), median(r, "bwd_ms"), median(r, "opt_ms"));
        println!("  {name}: {:8.1} ms  ({f:.1} + {b:.1} + {o:.1})", f + b + o);
    }
    println!("GPU memory (burn's allocator, cubecl): peak reserved = its pools' pages at their most; in use = the largest after a forward / after a backward:");
    for (name, r) in [("burn", burn), ("xent", xent)] {
        println!(
            "  {name}: peak reserved {:7.1} MiB, in use {:7.1} / {:7.1} MiB",
            mib(r, "peak_reserved"),
            mib(r, "in_use_fwd"),
            mib(r, "in_use_bwd")
        );
    }
    println!(
        "xent's backward: {} in place, {} into a new tensor ({} of them in the logits' buffer), {} staged; logits {:.1} MiB",
        xent["in_place"],
        xent["separate"],
        xent["shared"],
        xent["staged"],
        (cfg.batch * cfg.seq * cfg.vocab * 4) as f64 / (1 << 20) as f64
    );
    println!(
        "loss: {:.4} -> {:.4} (burn), {:.4} -> {:.4} (xent); largest |Δ|/loss over the curve {worst:.1e} (tolerance {:.0e})",
        lb[0],
        lb[lb.len() - 1],
        lx[0],
        lx[lx.len() - 1],
        cfg.tolerance
    );
    if lb.len() != cfg.steps || lx.len() != cfg.steps {
        bail!("a run stopped early: {} and {} of {} steps", lb.len(), lx.len(), cfg.steps);
    }
    if worst > cfg.tolerance {
        bail!("the two loss curves diverge: largest relative difference {worst:.2e} > {:.0e}", cfg.tolerance);
    }
    Ok(())
}

/// The value after `name` on the command line, if `name` is there.
fn value_arg(args: &[String], name: &str) -> Result<Option<String>> {
    let Some(i) = args.iter().position(|a| a == name) else { return Ok(None) };
    Ok(Some(args.get(i + 1).ok_or_else(|| anyhow!("{name} needs a value"))?.clone()))
}

fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}
