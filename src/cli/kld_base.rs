//! `xent kld-base`: writes a llama.cpp `--kl-divergence-base` file from logits and tokens, so that
//! llama.cpp (or `xent kld --base`) can compare other models against it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};

/// Flags of `xent kld-base`.
#[derive(clap::Args)]
pub struct KldBaseArgs {
    /// Base logits [n_chunk, n_ctx, V] (.npy / .safetensors, f32, f16 or bf16): positions n_ctx/2 .. n_ctx-2
    /// of each chunk are stored, as llama.cpp does.
    #[arg(long)]
    logits: PathBuf,
    /// The tokens [n_chunk, n_ctx] (integers), stored in the file; position t+1's token is the target of position t.
    #[arg(long)]
    tokens: PathBuf,
    /// The base file to write (written atomically: nothing at the path unless complete).
    #[arg(long)]
    out: PathBuf,
    /// Tensor name of the logits in a .safetensors file (default: the only tensor, or "logits").
    #[arg(long)]
    logits_key: Option<String>,
}

/// Runs `xent kld-base`.
///
/// # Errors
/// A bad input file or shape, or an output that cannot be written.
pub fn run(a: &KldBaseArgs) -> Result<()> {
    if a.out == a.logits || a.out == a.tokens {
        bail!("{}: --out names an input file", a.out.display());
    }
    let start = Instant::now();
    let logits = xent::io::open(&a.logits, a.logits_key.as_deref(), &["logits"])?;
    let tokens = xent::io::open(&a.tokens, None, &["tokens", "input_ids", "targets", "labels"])?;
    xent::llamacpp::write_base_file(&logits, &tokens, &a.out)?;
    let base = xent::llamacpp::BaseFile::open(&a.out)?;
    eprintln!(
        "xent kld-base: wrote {} (n_ctx {}, n_vocab {}, n_chunk {}: {} records) in {:.2} s",
        a.out.display(),
        base.n_ctx(),
        base.n_vocab(),
        base.n_chunk(),
        base.records(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
