//! `xent demo`: a generated evaluation set scored by the f64 reference, the CPU fast path and the GPU.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use xent::{Dtype, GpuContext, Logits, Options, RowLoss, Summary, Targets};

/// Flags of `xent demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Rows of the generated evaluation set.
    #[arg(long, default_value_t = 768)]
    rows: usize,
    /// Vocabulary size (GPT-2's by default).
    #[arg(long, default_value_t = 50_257)]
    vocab: usize,
    /// Seed of the generator.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

/// Runs `xent demo`.
///
/// # Errors
/// A bad flag, or GPU results that disagree between two runs.
pub fn run(a: &DemoArgs) -> Result<()> {
    if a.vocab == 0 || a.rows == 0 {
        bail!("--rows and --vocab must be at least 1");
    }
    a.rows.checked_mul(a.vocab).and_then(|n| n.checked_mul(4)).context("--rows x --vocab overflows")?;
    let opts = Options::default();
    println!(
        "xent demo: generating {} rows x {} vocab of Zipf-like logits (f32, {:.1} MB), seed {}",
        a.rows,
        a.vocab,
        (a.rows * a.vocab * 4) as f64 / 1e6,
        a.seed
    );
    let (x, t) = xent::synth::eval_set(a.rows, a.vocab, a.seed, opts.ignore_index);
    let logits = Logits::f32(&x, a.vocab)?;
    let targets = Targets::I64(&t);

    let t0 = Instant::now();
    let reference = xent::reference::score(logits, targets, &opts)?;
    let ref_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let fast = xent::cpu::score(logits, targets, &opts)?;
    let fast_s = t0.elapsed().as_secs_f64();

    let gpu = match GpuContext::new() {
        Ok(ctx) => Some(ctx),
        Err(e) => {
            println!(
                "  no GPU: {e} (install a Vulkan driver, or Mesa's lavapipe: apt-get install mesa-vulkan-drivers)"
            );
            None
        }
    };
    let mut summary = Summary::default();
    reference.iter().for_each(|r| summary.add(r.nll, r.ignored, r.correct));
    print!("{}", summary.human("cpu reference", ref_s));
    println!("  {:<34} {:>10} {:>10} {:>16}", "path", "ms", "GB/s", "max |err| (nats)");
    let gb = x.len() as f64 * 4.0 / 1e9;
    let report = |name: &str, secs: f64, rows: &[RowLoss]| {
        let err = worst_error(rows, &reference);
        println!("  {name:<34} {:>10.2} {:>10.2} {:>16.2e}", secs * 1e3, gb / secs, err);
    };
    println!("  {:<34} {:>10.2} {:>10.2} {:>16}", "cpu reference (f64, 1 thread)", ref_s * 1e3, gb / ref_s, "-");
    report(&format!("cpu fast ({} threads)", rayon::current_num_threads()), fast_s, &fast);
    if let Some(ctx) = gpu {
        let chunk = ctx.rows_per_chunk(Dtype::F32, a.vocab as u64, a.vocab as u64)?;
        let rows = ctx.score(logits, targets, &opts)?; // warm: pipeline compiled, buffers paged in
        let t0 = Instant::now();
        let rows2 = ctx.score(logits, targets, &opts)?;
        let gpu_s = t0.elapsed().as_secs_f64();
        if rows.iter().zip(&rows2).any(|(a, b)| a.nll.to_bits() != b.nll.to_bits()) {
            bail!("two GPU runs over the same input disagree");
        }
        report("gpu end-to-end (streamed)", gpu_s, &rows2);
        let bindings = (a.rows as u64).div_ceil(chunk);
        println!(
            "  adapter: {} ({:?}); at most {chunk} rows fit one storage binding: {bindings} binding{} needed",
            ctx.adapter_info().name,
            ctx.adapter_info().backend,
            if bindings == 1 { "" } else { "s" }
        );
        let agree = Summary::of(&rows2);
        println!("  gpu perplexity {:.6} vs reference {:.6}", agree.perplexity(), summary.perplexity());
    }
    Ok(())
}

/// Largest |got - ref| in nll over rows, NaN-aware (both NaN counts as agreement).
fn worst_error(got: &[RowLoss], reference: &[xent::reference::RefRow]) -> f64 {
    got.iter()
        .zip(reference)
        .map(|(g, r)| {
            let g = f64::from(g.nll);
            if g.is_nan() && r.nll.is_nan() || g == r.nll {
                0.0
            } else {
                (g - r.nll).abs()
            }
        })
        .fold(0.0, f64::max)
}
