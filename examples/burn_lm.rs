//! A small decoder-only transformer in burn (burn-nn modules, random weights from a fixed seed), a
//! forward pass on burn's wgpu backend, and its language-modelling loss two ways on the same logits
//! tensor: through `xent::burn` (xent's fused kernel on burn's own device, over the buffer that
//! holds the logits) and through burn's own `CrossEntropyLoss` — each timed and checked against
//! the f64 reference on the logits read back to the host.
//!
//! Run: `cargo run --release --features burn --example burn_lm`
//! (`-- --small` or `XENT_EXAMPLE_SMALL=1` for a quick run: vocab 2000, d_model 64, sequence 32;
//! `-- --vocab N` / `-- --batch N` for other sizes, e.g. `--vocab 128256 --batch 1`).
//!
//! Exits non-zero if xent's loss (its mean, or any token's nll) is off the reference beyond its
//! tolerance. burn's loss is printed with its error and its rows off; it fails the run only with
//! `--strict` (or `XENT_EXAMPLE_STRICT=1`), since burn's `log_softmax` is known to give wrong rows
//! at large vocabularies on some drivers (lavapipe; see BENCHMARKS.md).

use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use burn::module::{Module, Param};
use burn::nn::attention::{generate_autoregressive_mask, MhaInput, MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::activation::{gelu, log_softmax};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use xent::synth::Rng;
use xent::{Logits, Options, Targets};

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
    const SMALL: Config = Config { vocab: 2000, d_model: 64, heads: 2, layers: 2, seq: 32, batch: 2 };
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

/// A parameter drawn from N(0, std²) on the host with xent's seeded generator, so that the model
/// is the same on every driver (burn's own random kernels draw differently from one adapter to
/// another, even under the same seed).
fn normal<const D: usize>(rng: &mut Rng, shape: [usize; D], std: f64, device: &Device) -> Param<Tensor<D>> {
    let values: Vec<f32> = (0..shape.iter().product()).map(|_| (rng.normal() * std) as f32).collect();
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

/// A linear layer `[d_in] -> [d_out]` with N(0, std²) weights and, if any, a zero bias.
fn linear(rng: &mut Rng, (d_in, d_out): (usize, usize), std: f64, bias: bool, device: &Device) -> Linear {
    // Zeros: burn's parameters are initialised lazily, so the weight replaced below is never drawn.
    let mut layer = LinearConfig::new(d_in, d_out).with_bias(bias).with_initializer(Initializer::Zeros).init(device);
    // burn's default (row) layout stores the weight as [d_in, d_out].
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
            // Scaled so that logits spread over a few nats (std ~2 after the unit-variance norm),
            // as a trained model's do, rather than the near-uniform rows of a default init.
            head: linear(&mut rng, (d, cfg.vocab), 2.0 * w, false, device),
        }
    }

    /// `tokens` `[B, T]` to logits `[B, T, vocab]`.
    fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [b, t] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<1, Int>::arange(0..t as i64, &device).reshape([1, t]);
        // [B, T, d] + [1, T, d], broadcast over the batch.
        let mut x = self.embed.forward(tokens) + self.pos.forward(positions);
        // `true` above the diagonal: a position sees itself and those before it.
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

/// How a loss compares with the reference: its mean's relative error, and per token the largest
/// |got - want| and the number of tokens beyond `atol + rtol·|want|` (ignored tokens skipped).
struct Check {
    mean_rel: f64,
    worst: f64,
    off: usize,
}

fn check(mean: f64, ref_mean: f64, per_token: &[f32], want: &[xent::reference::RefRow], tol: (f64, f64)) -> Check {
    let mut worst = 0f64;
    let mut off = 0;
    for (g, w) in per_token.iter().zip(want).filter(|(_, w)| !w.ignored) {
        let err = (f64::from(*g) - w.nll).abs();
        worst = worst.max(err);
        off += usize::from(err.is_nan() || err > tol.0 + tol.1 * w.nll.abs());
    }
    if per_token.len() != want.len() {
        off += want.len().abs_diff(per_token.len());
    }
    let mean_rel = ((mean - ref_mean) / ref_mean).abs();
    Check { mean_rel: if mean_rel.is_nan() { f64::INFINITY } else { mean_rel }, worst, off }
}

/// Median wall time (ms) of `runs` calls of `f` after one warm-up call; `f` ends with a device sync.
fn time<T>(runs: usize, mut f: impl FnMut() -> Result<T>) -> Result<(T, f64)> {
    let mut out = f()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        out = f()?;
        times.push(ms(t0));
    }
    times.sort_by(f64::total_cmp);
    Ok((out, times[times.len() / 2]))
}

fn main() -> Result<()> {
    let flag = |arg: &str, env: &str| {
        std::env::args().any(|a| a == arg) || std::env::var(env).is_ok_and(|v| !v.is_empty() && v != "0")
    };
    let small = flag("--small", "XENT_EXAMPLE_SMALL");
    let strict = flag("--strict", "XENT_EXAMPLE_STRICT");
    let mut cfg = if small { Config::SMALL } else { Config::FULL };
    // `--vocab N` / `--batch N`: another vocabulary (e.g. 128256, Llama 3's) or batch size.
    if let Some(vocab) = number_arg("--vocab")? {
        cfg.vocab = vocab;
    }
    if let Some(batch) = number_arg("--batch")? {
        cfg.batch = batch;
    }
    if cfg.vocab < 2 || cfg.batch == 0 {
        bail!("--vocab must be at least 2 (token 0 is the pad) and --batch at least 1");
    }
    let (b, t, v) = (cfg.batch, cfg.seq, cfg.vocab);
    let n = b * t;
    let runs = 5;

    // The device first: xent must meet burn's wgpu device before its first tensor.
    let device = xent::burn::device()?;
    let adapter = xent::burn::context(&device)?.adapter_info().clone();
    println!(
        "model: {} layers, d_model {}, {} heads, vocab {v}; batch {b} x sequence {t} (burn wgpu: {}, {:?})",
        cfg.layers, cfg.d_model, cfg.heads, adapter.name, adapter.backend
    );
    let t0 = Instant::now();
    let model = Lm::new(cfg, 42, &device);
    let init_ms = ms(t0);

    // A batch of token sequences one longer than the context (ids 1..vocab; 0 is the pad): inputs
    // are tokens[:, :T], targets tokens[:, 1:]. The last sequence is shorter — its final T/8
    // targets are padding — and one target in the middle of the first is masked too.
    let mut rng = Rng::new(7);
    let tokens: Vec<Vec<i64>> = (0..b).map(|_| (0..=t).map(|_| 1 + rng.below(v - 1) as i64).collect()).collect();
    let inputs: Vec<i64> = tokens.iter().flat_map(|s| s[..t].iter().copied()).collect();
    let mut targets: Vec<i64> = tokens.iter().flat_map(|s| s[1..].iter().copied()).collect();
    for i in ((b - 1) * t + t - t / 8..n).chain([t / 2]) {
        targets[i] = -100;
    }
    let ignored = targets.iter().filter(|&&x| x == -100).count();
    let counted = n - ignored;
    // burn's CrossEntropyLoss takes pad token ids (usize), not a negative ignore index, and gathers
    // at every target: its targets carry the pad id where xent's carry -100.
    let burn_targets: Vec<i64> = targets.iter().map(|&x| if x == -100 { PAD as i64 } else { x }).collect();

    let inputs = Tensor::<2, Int>::from_data(TensorData::new(inputs, [b, t]), &device);
    let targets_xent = Tensor::<2, Int>::from_data(TensorData::new(targets.clone(), [b, t]), &device);
    let targets_burn = Tensor::<1, Int>::from_data(TensorData::new(burn_targets, [n]), &device);

    // Forward, then wait for it: the losses below are timed on logits that already exist.
    let t0 = Instant::now();
    let warm = model.forward(inputs.clone());
    device.sync().map_err(|e| anyhow!("forward: {e:?}"))?;
    drop(warm);
    let first_ms = ms(t0);
    let t0 = Instant::now();
    let logits = model.forward(inputs);
    device.sync().map_err(|e| anyhow!("forward: {e:?}"))?;
    println!(
        "forward: {:.1} ms -> logits {:?} {:?} (weights drawn in {init_ms:.0} ms; first forward, kernels compiled and tuned, {first_ms:.0} ms)",
        ms(t0),
        logits.dims(),
        logits.dtype()
    );

    // The f64 oracle over the logits read back to the host.
    let t0 = Instant::now();
    let host = logits.try_to_data().map_err(|e| anyhow!("reading the logits back: {e}"))?;
    let host: &[f32] = host.as_slice().map_err(|e| anyhow!("reading the logits back: {e:?}"))?;
    let want = xent::reference::score(Logits::f32(host, v)?, Targets::I64(&targets), &Options::default())?;
    let ref_mean = want.iter().map(|r| r.nll).sum::<f64>() / counted as f64;
    let ref_ms = ms(t0);

    let sync = || device.sync().map_err(|e| anyhow!("device sync: {e:?}"));
    let opts = Options { ignore_index: -100 };
    // Per token, xent is held to the tolerance of its own tests; burn's f32 composition to a
    // looser one. The means: 1e-4 relative (f32).
    let mean_tol = 1e-4;
    let (xent_tol, burn_tol) = ((1e-6, 2e-6), (1e-4, 1e-5));
    println!(
        "reference (f64):        mean nll {ref_mean:.6} over {counted} tokens ({ignored} ignored)  [{ref_ms:.0} ms on the host]"
    );

    // (b) burn's own loss on the same logits, as [B·T, V] (a free reshape of a contiguous tensor).
    let loss_fn: CrossEntropyLoss = CrossEntropyLossConfig::new().with_pad_tokens(Some(vec![PAD])).init(&device);
    let (burn_loss, burn_ms) = time(runs, || {
        let loss = loss_fn.forward(logits.clone().reshape([n, v]), targets_burn.clone());
        sync()?;
        Ok(loss)
    })?;
    // burn's per-token values, by the ops its loss is made of (log_softmax, gather, negation), to
    // see which rows its mean is made of.
    let burn_nll = log_softmax(logits.clone().reshape([n, v]), 1).gather(1, targets_burn.reshape([n, 1])).neg();
    let burn_mean = f64::from(burn_loss.into_scalar::<f32>());
    let burn_nll = burn_nll.into_data().try_into_vec_as::<f32>().map_err(|e| anyhow!("{e:?}"))?;
    let bc = check(burn_mean, ref_mean, &burn_nll, &want, burn_tol);
    println!(
        "burn CrossEntropyLoss:  mean nll {burn_mean:.6}  {burn_ms:8.2} ms  rel err {:.2e}  per token (log_softmax + gather): max |err| {:.2e}, {} off (tol {:.0e} + {:.0e}·|ref|)",
        bc.mean_rel, bc.worst, bc.off, burn_tol.0, burn_tol.1
    );

    // (a) xent in place: the per-token nll on burn's device, its mean as a burn scalar.
    let ((xent_nll, xent_loss), xent_ms) = time(runs, || {
        let nll = xent::burn::cross_entropy_with(&logits, &targets_xent, &opts)
            .context("xent::burn::cross_entropy_with on the model's logits")?;
        let loss = nll.clone().sum().div_scalar(counted as f32);
        sync()?;
        Ok((nll, loss))
    })?;
    let xent_mean = f64::from(xent_loss.into_scalar::<f32>());
    let xent_nll = xent_nll.into_data().try_into_vec_as::<f32>().map_err(|e| anyhow!("{e:?}"))?;
    let xc = check(xent_mean, ref_mean, &xent_nll, &want, xent_tol);
    let xent_ignored_nonzero = xent_nll.iter().zip(&want).filter(|(x, w)| w.ignored && **x != 0.0).count();
    println!(
        "xent::burn:             mean nll {xent_mean:.6}  {xent_ms:8.2} ms  rel err {:.2e}  per token: max |xent nll - ref nll| {:.2e}, {} off (tol {:.0e} + {:.0e}·|ref|)",
        xc.mean_rel, xc.worst, xc.off, xent_tol.0, xent_tol.1
    );
    // The same kernel's records read back to the host, as a Summary.
    let (summary, summary_ms) = time(runs, || {
        xent::burn::summary(&logits, &targets_xent, &opts).context("xent::burn::summary on the model's logits")
    })?;
    println!(
        "xent::burn::summary:    mean nll {:.6}  {summary_ms:8.2} ms  (records read back to the host)",
        summary.mean_nll()
    );
    println!(
        "speed-up {:.1}x (median of {runs} after a warm-up, each with a device sync); perplexity {:.2}, accuracy {:.4}",
        burn_ms / xent_ms,
        summary.perplexity(),
        summary.accuracy()
    );

    let xent_bad = xc.mean_rel > mean_tol
        || xc.off > 0
        || xent_ignored_nonzero > 0
        || summary.tokens != counted as u64
        || ((summary.mean_nll() - ref_mean) / ref_mean).abs() > mean_tol;
    let burn_bad = bc.mean_rel > mean_tol || bc.off > 0;
    if burn_bad {
        println!(
            "WARNING: burn's CrossEntropyLoss is off the f64 reference (mean rel err {:.2e}, {} of {counted} tokens off) \
             on {}: burn's own loss, not xent's{}",
            bc.mean_rel,
            bc.off,
            adapter.name,
            if strict { "" } else { " (not an error without --strict)" }
        );
    }
    if xent_bad {
        bail!(
            "xent's loss disagrees with the f64 reference: mean rel err {:.2e} (tol {mean_tol:.0e}), {} tokens off, \
             {xent_ignored_nonzero} ignored tokens non-zero, summary over {} tokens (want {counted})",
            xc.mean_rel,
            xc.off,
            summary.tokens
        );
    }
    if strict && burn_bad {
        bail!("burn's loss disagrees with the f64 reference (--strict)");
    }
    Ok(())
}

/// The number after `name` on the command line, if `name` is there.
fn number_arg(name: &str) -> Result<Option<usize>> {
    let args: Vec<String> = std::env::args().collect();
    let Some(i) = args.iter().position(|a| a == name) else { return Ok(None) };
    let n = args.get(i + 1).ok_or_else(|| anyhow!("{name} needs a number"))?;
    Ok(Some(n.parse().with_context(|| format!("{name} {n}"))?))
}

fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1e3
}
