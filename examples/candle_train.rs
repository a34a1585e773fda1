//! Training with candle on the CPU, the loss two ways: a small next-token model (an embedding
//! and an output projection, both candle `Var`s) learns generated sequences with plain SGD, once
//! with candle's own composed cross-entropy and once with `xent::candle::train::cross_entropy`
//! (whose backward is xent's fast CPU gradient), from the same seed. Prints both loss curves,
//! their largest relative difference, and the time per step of each.
//!
//! Run: `cargo run --release --features candle --example candle_train`
//! (`-- --small` for a quick run). Exits non-zero if the curves differ beyond f32 noise or the
//! loss does not fall.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var, D};
use xent::train::LossOptions;

/// Model, batch and schedule.
#[derive(Debug, Clone, Copy)]
struct Config {
    vocab: usize,
    d_model: usize,
    batch_tokens: usize,
    steps: usize,
    lr: f64,
}

impl Config {
    const FULL: Config = Config { vocab: 32_000, d_model: 128, batch_tokens: 1024, steps: 100, lr: 20.0 };
    const SMALL: Config = Config { vocab: 500, d_model: 32, batch_tokens: 128, steps: 30, lr: 5.0 };
}

/// candle's composed mean loss: candle-nn's `log_softmax` in candle-core ops, `gather`, mean.
fn candle_loss(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let diff = logits.broadcast_sub(&logits.max_keepdim(D::Minus1)?)?;
    let log_sm = diff.broadcast_sub(&diff.exp()?.sum_keepdim(D::Minus1)?.log()?)?;
    log_sm.gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?.squeeze(D::Minus1)?.neg()?.mean_all()
}

/// One training run: the loss per step and the median time per step (forward, loss, backward,
/// update).
fn train(cfg: Config, use_xent: bool) -> Result<(Vec<f32>, f64)> {
    let mut rng = xent::synth::Rng::new(42);
    let mut init = |n: usize, scale: f64| -> Vec<f32> { (0..n).map(|_| (scale * rng.normal()) as f32).collect() };
    let embed = Var::from_vec(init(cfg.vocab * cfg.d_model, 1.0), (cfg.vocab, cfg.d_model), &Device::Cpu)?;
    let head = Var::from_vec(
        init(cfg.d_model * cfg.vocab, 1.0 / (cfg.d_model as f64).sqrt()),
        (cfg.d_model, cfg.vocab),
        &Device::Cpu,
    )?;
    // Data with structure to learn: the next token is a fixed function of the current one
    // (a permutation of the vocabulary), except one time in five.
    let mut data = xent::synth::Rng::new(7);
    let opts = LossOptions::default();
    let (mut losses, mut times) = (Vec::with_capacity(cfg.steps), Vec::with_capacity(cfg.steps));
    for _ in 0..cfg.steps {
        let current: Vec<u32> = (0..cfg.batch_tokens).map(|_| data.below(cfg.vocab) as u32).collect();
        let next: Vec<u32> = current
            .iter()
            .map(|&c| if data.below(5) == 0 { data.below(cfg.vocab) as u32 } else { (c * 7 + 3) % cfg.vocab as u32 })
            .collect();
        let inputs = Tensor::from_vec(current, cfg.batch_tokens, &Device::Cpu)?;
        let targets = Tensor::from_vec(next, cfg.batch_tokens, &Device::Cpu)?;
        let start = Instant::now();
        let logits = embed.as_tensor().index_select(&inputs, 0)?.matmul(head.as_tensor())?;
        let loss = if use_xent {
            xent::candle::train::cross_entropy(&logits, &targets, &opts)?
        } else {
            candle_loss(&logits, &targets)?
        };
        let grads = loss.backward()?;
        for var in [&embed, &head] {
            let g = grads.get(var.as_tensor()).context("a parameter without a gradient")?;
            var.set(&(var.as_tensor() - (g * cfg.lr)?)?)?;
        }
        times.push(start.elapsed().as_secs_f64());
        losses.push(loss.to_scalar::<f32>()?);
    }
    times.sort_by(f64::total_cmp);
    Ok((losses, times[times.len() / 2]))
}

fn main() -> Result<()> {
    let small = std::env::args().any(|a| a == "--small");
    let cfg = if small { Config::SMALL } else { Config::FULL };
    println!(
        "next-token model: vocab {}, d_model {}, {} tokens a step, SGD lr {}, {} steps, same seed (candle CPU, {} threads)",
        cfg.vocab,
        cfg.d_model,
        cfg.batch_tokens,
        cfg.lr,
        cfg.steps,
        rayon::current_num_threads()
    );
    let (theirs, t_theirs) = train(cfg, false)?;
    let (ours, t_ours) = train(cfg, true)?;
    println!("{:>6} {:>14} {:>14}", "step", "candle loss", "xent loss");
    let every = (cfg.steps / 10).max(1);
    for s in (0..cfg.steps).filter(|s| s % every == 0 || s + 1 == cfg.steps) {
        println!("{s:>6} {:>14.5} {:>14.5}", theirs[s], ours[s]);
    }
    let worst = ours.iter().zip(&theirs).map(|(a, b)| ((a - b) / b).abs()).fold(0f32, f32::max);
    println!(
        "time per step (median; forward, loss, backward, update): candle {:.1} ms, xent {:.1} ms ({:.2}x)",
        t_theirs * 1e3,
        t_ours * 1e3,
        t_theirs / t_ours
    );
    println!("largest relative difference between the curves: {worst:.1e}");
    if worst > 1e-3 {
        bail!("the two losses' curves differ by {worst:.1e} (more than f32 noise)");
    }
    if ours[cfg.steps - 1] > 0.8 * ours[0] {
        bail!("the loss did not fall: {} -> {}", ours[0], ours[cfg.steps - 1]);
    }
    Ok(())
}
