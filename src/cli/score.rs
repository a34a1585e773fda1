//! `xent score`: cross-entropy, perplexity and accuracy of logits against targets, streamed in chunks.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use xent::Options;

use super::{
    check_output, distinct_outputs, expand, num, output_kind, pick_device, progress_bar, stage_safetensors, DeviceArg,
    Kind,
};

/// Flags of `xent score`.
#[derive(clap::Args)]
pub struct ScoreArgs {
    /// Logits: .npy (<f4, <f2) or .safetensors (F32, F16, BF16), shape [N, V] or [B, T, V].
    /// Several files, a glob ("shards/*.npy") or a directory (its .npy/.safetensors files, sorted by name).
    #[arg(long, required = true, num_args = 1..)]
    logits: Vec<PathBuf>,
    /// Targets: .npy (<i8, <i4, <u4) or .safetensors (I64, I32, U32), shape [N] or [B, T]; one per logits file, same order.
    #[arg(long, required = true, num_args = 1..)]
    targets: Vec<PathBuf>,
    /// Where to run: the GPU, the CPU, or the GPU when a hardware one exists (said on stderr; a software
    /// adapter such as lavapipe is slower than the CPU path, so auto passes it over).
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Target value whose rows are skipped (nll 0, not in the mean).
    #[arg(long, default_value_t = -100, allow_hyphen_values = true)]
    ignore_index: i64,
    /// Causal-LM convention: targets are the input ids; position t is scored against label t+1 and
    /// the last position of each sequence is dropped.
    #[arg(long)]
    shift: bool,
    /// Sequence boundaries over all rows (.npy or .safetensors integers [S+1], from 0 to N); by default
    /// the rows of [B, T, V] logits are the sequences.
    #[arg(long)]
    offsets: Option<PathBuf>,
    /// Write each scored row's nll (nats, 0.0 where ignored): .npy (<f4 [N]) or .safetensors (nll, lse, correct).
    #[arg(long)]
    per_token: Option<PathBuf>,
    /// Write per-sequence results (tokens, sum of log-probabilities, is_greedy): .jsonl or .safetensors.
    #[arg(long)]
    per_sequence: Option<PathBuf>,
    /// Write the summary with its exact sums, for `xent merge`.
    #[arg(long)]
    summary_out: Option<PathBuf>,
    /// Print one JSON object on stdout (human text goes to stderr).
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Tensor name of the logits in .safetensors files (default: the only tensor, or "logits").
    #[arg(long)]
    logits_key: Option<String>,
    /// Tensor name of the targets in .safetensors files (default: the only tensor, or "targets"/"labels").
    #[arg(long)]
    targets_key: Option<String>,
    /// MiB of logits per chunk read and scored at once.
    #[arg(long, default_value_t = 64)]
    chunk_mib: u64,
}

/// Runs `xent score`.
///
/// # Errors
/// A bad flag or input file, a failing device, or an output that cannot be written.
pub fn run(a: &ScoreArgs) -> Result<()> {
    let logits_paths = expand(&a.logits).context("--logits")?;
    let targets_paths = expand(&a.targets).context("--targets")?;
    if logits_paths.len() != targets_paths.len() {
        bail!(
            "{} logits file{} but {} targets file{}: give one targets file per logits file, in the same order",
            logits_paths.len(),
            if logits_paths.len() == 1 { "" } else { "s" },
            targets_paths.len(),
            if targets_paths.len() == 1 { "" } else { "s" }
        );
    }
    // Every output's format is checked before any work, so a typo costs nothing.
    check_output(&a.per_token, "--per-token", &[Kind::Npy, Kind::Safetensors])?;
    check_output(&a.per_sequence, "--per-sequence", &[Kind::Jsonl, Kind::Safetensors])?;
    check_output(&a.summary_out, "--summary-out", &[Kind::Json])?;
    distinct_outputs(&[
        ("--per-token", a.per_token.as_deref()),
        ("--per-sequence", a.per_sequence.as_deref()),
        ("--summary-out", a.summary_out.as_deref()),
    ])?;
    let gpu = pick_device(a.device)?;
    // Timed from opening the inputs to the last result (device creation excluded, as documented).
    let start = Instant::now();
    let shards = logits_paths
        .iter()
        .zip(&targets_paths)
        .map(|(l, t)| {
            Ok(xent::eval::Shard {
                logits: xent::io::open(l, a.logits_key.as_deref(), &["logits"])?,
                targets: xent::io::open(t, a.targets_key.as_deref(), &["targets", "labels"])?,
            })
        })
        .collect::<xent::Result<Vec<_>>>()?;
    let layout = xent::eval::check_shards(&shards)?;
    let offsets = a.offsets.as_deref().map(xent::io::read_offsets).transpose()?;
    if a.per_sequence.is_some() && offsets.is_none() && shards.iter().any(|s| s.logits.shape.len() != 3) {
        bail!("--per-sequence needs [B, T, V] logits (one sequence per row of B) or --offsets");
    }
    let opts = xent::eval::EvalOptions {
        options: Options { ignore_index: a.ignore_index },
        shift: a.shift,
        offsets,
        per_token: a.per_token.is_some(),
        per_token_extra: a.per_token.as_deref().is_some_and(|p| output_kind(p).ok() == Some(Kind::Safetensors)),
        per_sequence: a.per_sequence.is_some(),
        chunk_bytes: a.chunk_mib.max(1) << 20,
    };
    let engine = match &gpu {
        Some(ctx) => xent::eval::Engine::Gpu(ctx),
        None => xent::eval::Engine::Cpu,
    };
    let bar = progress_bar(layout.bytes, !a.quiet && !a.json && std::io::stdout().is_terminal());
    let mut rows_done = 0u64;
    let mut progress = |rows: u64, bytes: u64| {
        rows_done += rows;
        bar.inc(bytes);
        let secs = bar.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!("{:.0} tokens/s", rows_done as f64 / secs));
        Ok(())
    };
    let result = xent::eval::evaluate(engine, &shards, &opts, &mut progress);
    bar.finish_and_clear();
    let result = result?;
    let seconds = start.elapsed().as_secs_f64();
    let device = if gpu.is_some() { "gpu" } else { "cpu" };
    // Every output is written in full before any appears at its path.
    let mut outputs = Vec::new();
    if let (Some(path), Some(pt)) = (&a.per_token, &result.per_token) {
        outputs.push(stage_per_token(path, pt)?);
    }
    if let (Some(path), Some(seqs)) = (&a.per_sequence, &result.per_sequence) {
        outputs.push(stage_per_sequence(path, seqs)?);
    }
    let json = result.summary.to_json(device, seconds);
    if let Some(path) = &a.summary_out {
        outputs.push(xent::io::stage(path, format!("{json}\n").as_bytes())?);
    }
    xent::io::commit_all(outputs)?;
    let text = result.summary.human(device, seconds);
    if a.json {
        eprint!("{text}");
        println!("{json}");
    } else {
        print!("{text}");
    }
    Ok(())
}

fn stage_per_token(path: &Path, pt: &xent::eval::PerToken) -> Result<xent::io::AtomicWriter> {
    Ok(match output_kind(path)? {
        Kind::Npy => xent::io::stage_npy(path, "<f4", &[pt.nll.len()], bytemuck::cast_slice(&pt.nll))?,
        Kind::Safetensors => {
            let n = pt.nll.len();
            let tensors = [
                ("correct", safetensors::Dtype::U8, &pt.correct[..]),
                ("lse", safetensors::Dtype::F32, bytemuck::cast_slice(&pt.lse)),
                ("nll", safetensors::Dtype::F32, bytemuck::cast_slice(&pt.nll)),
            ];
            stage_safetensors(path, &tensors.map(|(name, d, b)| (name, d, vec![n], b)))?
        }
        _ => bail!("{}: --per-token writes .npy or .safetensors", path.display()),
    })
}

fn stage_per_sequence(path: &Path, seqs: &[xent::eval::SequenceResult]) -> Result<xent::io::AtomicWriter> {
    Ok(match output_kind(path)? {
        Kind::Jsonl => {
            let mut text = String::new();
            for s in seqs {
                text.push_str(&format!(
                    "{{\"tokens\":{},\"sum_logprob\":{},\"is_greedy\":{}}}\n",
                    s.tokens,
                    num(s.sum_logprob),
                    s.is_greedy
                ));
            }
            xent::io::stage(path, text.as_bytes())?
        }
        Kind::Safetensors => {
            let tokens: Vec<i64> = seqs.iter().map(|s| s.tokens as i64).collect();
            let sums: Vec<f64> = seqs.iter().map(|s| s.sum_logprob).collect();
            let greedy: Vec<u8> = seqs.iter().map(|s| u8::from(s.is_greedy)).collect();
            let n = vec![seqs.len()];
            stage_safetensors(
                path,
                &[
                    ("is_greedy", safetensors::Dtype::U8, n.clone(), &greedy[..]),
                    ("sum_logprob", safetensors::Dtype::F64, n.clone(), bytemuck::cast_slice(&sums)),
                    ("tokens", safetensors::Dtype::I64, n, bytemuck::cast_slice(&tokens)),
                ],
            )?
        }
        _ => bail!("{}: --per-sequence writes .jsonl or .safetensors", path.display()),
    })
}
