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
    // Worst error as a fraction of the tolerance the tests hold (1e-7 + 1e-4 * kld per token).
    let worst = |rows: &[xent::kld::KldRow]| {
        rows.iter()
            .zip(&reference)
            .map(|(g, r)| (f64::from(g.kld) - r.kld).abs() / (1e-7 + 1e-4 * r.kld))
            .fold(0.0, f64::max)
    };
    println!("cpu fast path: worst kld error {:.3} of the tolerance", worst(&cpu));
    anyhow::ensure!(worst(&cpu) <= 1.0, "the CPU path is outside its tolerance");
    if let Ok(gpu) = GpuContext::new() {
        let on_gpu = gpu.kld(base, test, targets, &opts)?;
        println!("gpu ({}): worst kld error {:.3} of the tolerance", gpu.adapter_info().name, worst(&on_gpu));
        anyhow::ensure!(worst(&on_gpu) <= 1.0, "the GPU path is outside its tolerance");
    }
    print!("{}", KldSummary::of(&cpu).human());
    Ok(())
}
