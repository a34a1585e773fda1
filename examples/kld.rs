//! Compare a "quantised" model with its base: KL divergence, same-top rate and Δp over the same
//! tokens, on the CPU fast path and (when an adapter exists) the GPU, checked against the f64
//! reference; then the llama.cpp-style statistics of the run.
//!
//! Run: `cargo run --release --example kld`

use anyhow::Result;
use xent::kld::summary::KldSummary;
use xent::{Dtype, GpuContext, Logits, Options, Targets};

fn main() -> Result<()> {
    // 64 tokens over a 32k vocabulary: a bf16 base model, and a test model whose logits carry
    // noise of 0.05 (a decent 4-bit quantisation) stored as f16: the dtypes need not match.
    let (rows, vocab) = (64, 32_000);
    let (a, b, targets) = xent::synth::kld_pair(rows, vocab, 7, 0.05);
    let (a, b) = (Dtype::BF16.encode(&a), Dtype::F16.encode(&b));
    let base = Logits::from_bytes(&a, Dtype::BF16, rows, vocab)?;
    let test = Logits::from_bytes(&b, Dtype::F16, rows, vocab)?;
    let targets = Some(Targets::I64(&targets));
    let opts = Options::default();

    let cpu = xent::kld::cpu::kld(base, test, targets, &opts)?;
    let reference = xent::kld::reference::kld(base, test, targets, &opts)?;
    let worst = cpu.iter().zip(&reference).map(|(g, r)| (f64::from(g.kld) - r.kld).abs()).fold(0.0, f64::max);
    println!("cpu fast path: worst |kld - f64 reference| = {worst:.2e} nats");
    if let Ok(gpu) = GpuContext::new() {
        let on_gpu = gpu.kld(base, test, targets, &opts)?;
        let worst = on_gpu.iter().zip(&reference).map(|(g, r)| (f64::from(g.kld) - r.kld).abs()).fold(0.0, f64::max);
        println!("gpu ({}): worst |kld - f64 reference| = {worst:.2e} nats", gpu.adapter_info().name);
    }
    print!("{}", KldSummary::of(&cpu).human());
    Ok(())
}
