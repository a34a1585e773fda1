//! Score host logits on the GPU and on the CPU reference, and summarise.
//!
//! Run: `cargo run --release --example quickstart`

use anyhow::Result;
use xent::{GpuContext, Logits, Options, Summary, Targets};

fn main() -> Result<()> {
    let (rows, vocab) = (256, 32_000);
    let (x, targets) = xent::synth::eval_set(rows, vocab, 1, -100);
    let logits = Logits::f32(&x, vocab)?;
    let opts = Options::default();

    let gpu = GpuContext::new()?;
    let on_gpu = gpu.score(logits, Targets::I64(&targets), &opts)?;
    let reference = xent::reference::score(logits, Targets::I64(&targets), &opts)?;
    let worst = on_gpu.iter().zip(&reference).map(|(g, r)| (f64::from(g.nll) - r.nll).abs()).fold(0.0, f64::max);

    let s = Summary::of(&on_gpu);
    println!("adapter       {}", gpu.adapter_info().name);
    println!("tokens        {} ({} ignored)", s.tokens, s.ignored);
    println!("perplexity    {:.3} ± {:.3}", s.perplexity(), s.perplexity_stderr());
    println!("bits/token    {:.4}", s.bits_per_token());
    println!("accuracy      {:.4}", s.accuracy());
    println!("max |gpu - reference| = {worst:.2e} nats");
    Ok(())
}
