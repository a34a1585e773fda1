//! Score an evaluation set stored as several shards, then show that scoring the shards one at a
//! time (as a cluster would) and merging their summaries gives exactly the same result.
//!
//! Run: `cargo run --release --example score_shards` (writes a small generated set to a
//! temporary folder; pass a folder to keep it: `... --example score_shards -- ./evalset`).

use anyhow::{Context, Result};
use xent::eval::{evaluate, Engine, EvalOptions, Shard};
use xent::{GpuContext, Summary};

fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("xent-evalset"));
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;

    // Four shards of 96 tokens over a 32k vocabulary, bf16 logits, i64 targets.
    let (rows, vocab) = (96, 32_000);
    let mut shards = Vec::new();
    for i in 0..4u64 {
        let (x, t) = xent::synth::eval_set(rows, vocab, i, -100);
        let bytes = xent::Dtype::BF16.encode(&x);
        let logits = dir.join(format!("logits-{i:02}.safetensors"));
        let mut file = xent::io::safetensors_header("logits", "BF16", &[rows, vocab], bytes.len());
        file.extend_from_slice(&bytes);
        xent::io::write_atomic(&logits, &file)?;
        let targets = dir.join(format!("targets-{i:02}.npy"));
        xent::io::write_npy(&targets, "<i8", &[rows], bytemuck::cast_slice(&t))?;
        shards.push(Shard {
            logits: xent::io::open(&logits, None, &["logits"])?,
            targets: xent::io::open(&targets, None, &["targets"])?,
        });
    }

    let gpu = GpuContext::new().ok();
    let engine = gpu.as_ref().map_or(Engine::Cpu, Engine::Gpu);
    let opts = EvalOptions::default();

    // One run over every shard.
    let all = evaluate(engine, &shards, &opts, &mut |_, _| Ok(()))?.summary;
    // Each shard alone, merged afterwards.
    let mut merged = Summary::default();
    for shard in shards.chunks(1) {
        merged.merge(&evaluate(engine, shard, &opts, &mut |_, _| Ok(()))?.summary);
    }

    println!("shards in {} scored on the {}", dir.display(), if gpu.is_some() { "GPU" } else { "CPU" });
    println!("tokens {} (ignored {})", all.tokens, all.ignored);
    println!(
        "perplexity {:.6} ± {:.6}, bits/token {:.6}",
        all.perplexity(),
        all.perplexity_stderr(),
        all.bits_per_token()
    );
    println!("merged shard summaries equal the one-run summary exactly: {}", merged == all);
    anyhow::ensure!(merged == all, "merged summaries differ from the one-run summary");
    Ok(())
}
