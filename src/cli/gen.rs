//! `xent gen`: a generated evaluation set written to files in bounded memory.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use xent::Dtype;

use super::{distinct_outputs, DtypeArg};

/// Flags of `xent gen`.
#[derive(clap::Args)]
pub struct GenArgs {
    /// Rows (tokens).
    #[arg(long)]
    rows: usize,
    /// Vocabulary size.
    #[arg(long)]
    vocab: usize,
    /// Logits dtype (bf16 needs a .safetensors output).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Seed of the generator.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Add Gaussian noise of this standard deviation to every logit: the same seed with and without
    /// --noise gives a base model and a perturbed "test" model over the same tokens (for `xent kld`).
    #[arg(long)]
    noise: Option<f32>,
    /// Output logits file, .npy or .safetensors (tensor "logits").
    #[arg(long)]
    logits: PathBuf,
    /// Output targets file (i64), .npy or .safetensors (tensor "targets").
    #[arg(long)]
    targets: PathBuf,
}

/// Runs `xent gen`.
///
/// # Errors
/// A bad flag, or an output that cannot be written.
pub fn run(a: &GenArgs) -> Result<()> {
    if a.vocab == 0 {
        bail!("--vocab must be at least 1");
    }
    if a.noise.is_some_and(|n| !n.is_finite() || n < 0.0) {
        bail!("--noise must be a finite standard deviation >= 0");
    }
    let dtype: Dtype = a.dtype.into();
    let is_st = |p: &PathBuf| p.extension().is_some_and(|e| e == "safetensors");
    let is_npy = |p: &PathBuf| p.extension().is_some_and(|e| e == "npy");
    for p in [&a.logits, &a.targets] {
        if !is_st(p) && !is_npy(p) {
            bail!("{}: unknown extension: expected .npy or .safetensors", p.display());
        }
    }
    distinct_outputs(&[("--logits", Some(&a.logits)), ("--targets", Some(&a.targets))])?;
    if dtype == Dtype::BF16 && is_npy(&a.logits) {
        bail!("{}: .npy has no bf16 dtype; write bf16 logits to a .safetensors file", a.logits.display());
    }
    let shape = [a.rows, a.vocab];
    let bytes =
        a.rows.checked_mul(a.vocab).and_then(|n| n.checked_mul(dtype.size())).context("--rows x --vocab overflows")?;
    let mut lw = xent::io::AtomicWriter::create(&a.logits)?;
    lw.write(&if is_st(&a.logits) {
        let st = match dtype {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
        };
        xent::io::safetensors_header("logits", st, &shape, bytes)
    } else {
        xent::io::npy_header(if dtype == Dtype::F32 { "<f4" } else { "<f2" }, &shape)
    })?;
    let generator = xent::synth::Generator::new(a.vocab, a.seed, -100);
    let block = ((64usize << 20) / (4 * a.vocab)).max(1);
    let mut targets = vec![0i64; a.rows];
    let mut x = Vec::new();
    for r0 in (0..a.rows).step_by(block) {
        let n = block.min(a.rows - r0);
        x.resize(n * a.vocab, 0f32);
        generator.fill(r0, &mut x, &mut targets[r0..r0 + n]);
        if let Some(noise) = a.noise {
            xent::synth::perturb(&mut x, a.vocab, r0, a.seed, noise);
        }
        lw.write(&dtype.encode(&x))?;
    }
    let tb: &[u8] = bytemuck::cast_slice(&targets);
    let mut tw = xent::io::AtomicWriter::create(&a.targets)?;
    tw.write(&if is_st(&a.targets) {
        xent::io::safetensors_header("targets", "I64", &[a.rows], tb.len())
    } else {
        xent::io::npy_header("<i8", &[a.rows])
    })?;
    tw.write(tb)?;
    xent::io::commit_all(vec![lw, tw])?;
    eprintln!("xent gen: wrote {} ({} x {} {dtype}) and {}", a.logits.display(), a.rows, a.vocab, a.targets.display());
    Ok(())
}
