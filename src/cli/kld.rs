//! `xent kld`: KL divergence of a test model's logits from a base model's, over the same tokens,
//! with llama.cpp's statistics; the base may be a llama.cpp `--kl-divergence-base` file.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use xent::kld::eval::{KldEvalOptions, KldEvalResult, KldPerToken, KldShard, LlamaTest};
use xent::llamacpp::{is_base_file, BaseFile};
use xent::Options;

use super::{
    check_output, distinct_outputs, expand, output_kind, pick_device, progress_bar, stage_safetensors, DeviceArg, Kind,
};

/// Flags of `xent kld`.
#[derive(clap::Args)]
pub struct KldArgs {
    /// Base model: logits (.npy / .safetensors, [N, V] or [B, T, V]; several files, a glob or a directory),
    /// or one llama.cpp base file (--kl-divergence-base; recognised by its magic).
    #[arg(long, required = true, num_args = 1..)]
    base: Vec<PathBuf>,
    /// Test model's logits over the same tokens: the same shapes and vocab, any float dtype, one file per
    /// base file. With a llama.cpp base: another base file, [n_chunk, n_ctx, V] logits or one row per record.
    #[arg(long, required = true, num_args = 1..)]
    logits: Vec<PathBuf>,
    /// Targets (one file per base file): adds both perplexities and Δp. Not with a llama.cpp base (its tokens are the targets).
    #[arg(long, num_args = 1..)]
    targets: Vec<PathBuf>,
    /// Causal-LM convention: targets are the input ids; position t is scored against label t+1 and
    /// the last position of each sequence is dropped.
    #[arg(long)]
    shift: bool,
    /// Target value whose rows are left out of every statistic (default -100).
    #[arg(long, allow_hyphen_values = true)]
    ignore_index: Option<i64>,
    /// Where to run: the GPU, the CPU, or the GPU when a hardware one exists (said on stderr).
    /// A llama.cpp base is always compared on the CPU, as llama.cpp does.
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Write each row's KLD (nats, 0.0 where ignored): .npy (<f4 [N]) or .safetensors (kld, same_top,
    /// and with targets nll_base, nll_test, dp).
    #[arg(long)]
    per_token: Option<PathBuf>,
    /// Write the summary with its exact sums and sketches, for `xent merge`.
    #[arg(long)]
    summary_out: Option<PathBuf>,
    /// Print one JSON object on stdout (human text goes to stderr).
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// MiB of logits (both sides) per chunk read and compared at once.
    #[arg(long, default_value_t = 64)]
    chunk_mib: u64,
    /// Tokens whose values are kept for exact percentiles (llama.cpp's sort); beyond, a sketch of
    /// relative accuracy 6.1e-5 keeps memory bounded.
    #[arg(long, default_value_t = xent::kld::summary::DEFAULT_BUDGET)]
    percentile_budget: u64,
    /// Tensor name of the logits in .safetensors files (both sides; default: the only tensor, or "logits").
    #[arg(long)]
    logits_key: Option<String>,
    /// Tensor name of the targets in .safetensors files (default: the only tensor, or "targets"/"labels").
    #[arg(long)]
    targets_key: Option<String>,
}

/// A comparison run given a progress callback.
type Compare<'a> = dyn FnMut(&mut dyn FnMut(u64, u64) -> xent::Result<()>) -> xent::Result<KldEvalResult> + 'a;

/// Runs `xent kld`.
///
/// # Errors
/// A bad flag or input file, a failing device, or an output that cannot be written.
pub fn run(a: &KldArgs) -> Result<()> {
    let base_paths = expand(&a.base).context("--base")?;
    let test_paths = expand(&a.logits).context("--logits")?;
    let target_paths = if a.targets.is_empty() { Vec::new() } else { expand(&a.targets).context("--targets")? };
    check_output(&a.per_token, "--per-token", &[Kind::Npy, Kind::Safetensors])?;
    check_output(&a.summary_out, "--summary-out", &[Kind::Json])?;
    distinct_outputs(&[("--per-token", a.per_token.as_deref()), ("--summary-out", a.summary_out.as_deref())])?;
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    if test_paths.len() != base_paths.len() {
        bail!(
            "{} base file{} but {} test logits file{}: give one --logits file per --base file, in the same order",
            base_paths.len(),
            plural(base_paths.len()),
            test_paths.len(),
            plural(test_paths.len())
        );
    }
    let llama = base_paths.iter().any(|p| is_base_file(p));
    if llama {
        if base_paths.len() != 1 {
            bail!("a llama.cpp base file is compared alone: give one --base file and one --logits input");
        }
        if !target_paths.is_empty() {
            bail!("--targets with a llama.cpp base file: its tokens are the targets");
        }
        if a.shift {
            bail!("--shift with a llama.cpp base file: its records already predict the next token");
        }
        if a.ignore_index.is_some() {
            bail!("--ignore-index with a llama.cpp base file: every record is scored, as llama.cpp does");
        }
    } else if !target_paths.is_empty() && target_paths.len() != base_paths.len() {
        bail!(
            "{} base file{} but {} targets file{}: give one --targets file per --base file",
            base_paths.len(),
            plural(base_paths.len()),
            target_paths.len(),
            plural(target_paths.len())
        );
    }
    let opts = KldEvalOptions {
        options: a.ignore_index.map_or_else(Options::default, |ignore_index| Options { ignore_index }),
        shift: a.shift,
        per_token: a.per_token.is_some(),
        // nll_base, nll_test and dp exist only with targets (a llama.cpp base has them from its tokens).
        per_token_extra: (llama || !target_paths.is_empty())
            && a.per_token.as_deref().is_some_and(|p| output_kind(p).ok() == Some(Kind::Safetensors)),
        chunk_bytes: a.chunk_mib.max(1) << 20,
        percentile_budget: a.percentile_budget,
    };
    let gpu = if llama {
        if a.device != DeviceArg::Cpu {
            eprintln!(
                "xent: device {}: using the CPU (a llama.cpp base file is compared with llama.cpp's own definitions, on the CPU)",
                if a.device == DeviceArg::Gpu { "gpu" } else { "auto" }
            );
        }
        None
    } else {
        pick_device(a.device)?
    };
    let start = Instant::now();
    let visible = !a.quiet && !a.json && std::io::stdout().is_terminal();
    let run_with_bar = |total: u64, f: &mut Compare<'_>| {
        let bar = progress_bar(total, visible);
        let mut rows_done = 0u64;
        let mut progress = |rows: u64, bytes: u64| {
            rows_done += rows;
            bar.inc(bytes);
            bar.set_message(format!("{:.0} tokens/s", rows_done as f64 / bar.elapsed().as_secs_f64().max(1e-9)));
            Ok(())
        };
        let r = f(&mut progress);
        bar.finish_and_clear();
        r
    };
    let result = if llama {
        let base = BaseFile::open(&base_paths[0])?;
        let test = if is_base_file(&test_paths[0]) {
            LlamaTest::Base(BaseFile::open(&test_paths[0])?)
        } else {
            LlamaTest::Logits(xent::io::open(&test_paths[0], a.logits_key.as_deref(), &["logits"])?)
        };
        let total = (base.records() * base.n_vocab() * 6) as u64;
        run_with_bar(total, &mut |p| xent::kld::eval::evaluate_llama(&base, &test, &opts, p))?
    } else {
        let shards = base_paths
            .iter()
            .enumerate()
            .map(|(i, b)| {
                Ok(KldShard {
                    base: xent::io::open(b, a.logits_key.as_deref(), &["logits"])?,
                    test: xent::io::open(&test_paths[i], a.logits_key.as_deref(), &["logits"])?,
                    targets: target_paths
                        .get(i)
                        .map(|t| xent::io::open(t, a.targets_key.as_deref(), &["targets", "labels"]))
                        .transpose()?,
                })
            })
            .collect::<xent::Result<Vec<_>>>()?;
        let layout = xent::kld::eval::check_kld_shards(&shards)?;
        let engine = match &gpu {
            Some(ctx) => xent::eval::Engine::Gpu(ctx),
            None => xent::eval::Engine::Cpu,
        };
        run_with_bar(layout.bytes, &mut |p| xent::kld::eval::evaluate_kld(engine, &shards, &opts, p))?
    };
    let seconds = start.elapsed().as_secs_f64();
    let device = if gpu.is_some() { "gpu" } else { "cpu" };
    let mut outputs = Vec::new();
    if let (Some(path), Some(pt)) = (&a.per_token, &result.per_token) {
        outputs.push(stage_per_token(path, pt)?);
    }
    let stats = result.summary.stats();
    let json = result.summary.report_json_with(&stats, device, seconds);
    if let Some(path) = &a.summary_out {
        let full = result.summary.to_json_with(&stats, device, seconds);
        outputs.push(xent::io::stage(path, format!("{full}\n").as_bytes())?);
    }
    xent::io::commit_all(outputs)?;
    let text = result.summary.human_with(&stats);
    if a.json {
        eprint!("{text}");
        println!("{json}");
    } else {
        print!("{text}");
    }
    Ok(())
}

fn stage_per_token(path: &Path, pt: &KldPerToken) -> Result<xent::io::AtomicWriter> {
    let n = pt.kld.len();
    Ok(match output_kind(path)? {
        Kind::Npy => xent::io::stage_npy(path, "<f4", &[n], bytemuck::cast_slice(&pt.kld))?,
        _ => {
            let mut tensors = vec![
                ("kld", safetensors::Dtype::F32, bytemuck::cast_slice::<f32, u8>(&pt.kld)),
                ("same_top", safetensors::Dtype::U8, &pt.same_top[..]),
            ];
            if pt.nll_base.len() == n && n > 0 {
                tensors.push(("dp", safetensors::Dtype::F32, bytemuck::cast_slice(&pt.dp)));
                tensors.push(("nll_base", safetensors::Dtype::F32, bytemuck::cast_slice(&pt.nll_base)));
                tensors.push(("nll_test", safetensors::Dtype::F32, bytemuck::cast_slice(&pt.nll_test)));
            }
            tensors.sort_by_key(|t| t.0);
            let tensors: Vec<_> = tensors.into_iter().map(|(name, d, b)| (name, d, vec![n], b)).collect();
            stage_safetensors(path, &tensors)?
        }
    })
}
