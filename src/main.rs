//! `xent`: cross-entropy, perplexity and accuracy over `.npy` / `.safetensors` logits, on the GPU.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use xent::{Dtype, GpuContext, Logits, Options, RowLoss, Summary, Targets};

#[derive(Parser)]
#[command(
    name = "xent",
    version,
    about = "Fused cross-entropy over huge logits on the GPU (wgpu), checked against an f64 CPU reference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score logits against targets: mean nll, perplexity ± stderr, bits per token, accuracy.
    Score(ScoreArgs),
    /// Time the GPU kernel and the CPU paths on generated logits.
    Bench(BenchArgs),
    /// Show the adapter, backend, features and the limits the kernels plan with.
    Info,
    /// Generate a realistic evaluation set, score it on GPU and CPU, show agreement and speed.
    Demo(DemoArgs),
    /// Write a generated evaluation set (Zipf-like logits, sampled targets) to files, in bounded memory.
    Gen(GenArgs),
    /// Merge summaries of shards scored separately (`score --summary-out`): exactly the summary of one run.
    Merge(MergeArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    Auto,
    Gpu,
    Cpu,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BenchDevice {
    Auto,
    Gpu,
    Cpu,
    All,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DtypeArg> for Dtype {
    fn from(d: DtypeArg) -> Dtype {
        match d {
            DtypeArg::F32 => Dtype::F32,
            DtypeArg::F16 => Dtype::F16,
            DtypeArg::Bf16 => Dtype::BF16,
        }
    }
}

#[derive(clap::Args)]
struct ScoreArgs {
    /// Logits: .npy (<f4, <f2) or .safetensors (F32, F16, BF16), shape [N, V] or [B, T, V].
    /// Several files, a glob ("shards/*.npy") or a directory (its .npy/.safetensors files, sorted by name).
    #[arg(long, required = true, num_args = 1..)]
    logits: Vec<PathBuf>,
    /// Targets: .npy (<i8, <i4, <u4) or .safetensors (I64, I32, U32), shape [N] or [B, T]; one per logits file, same order.
    #[arg(long, required = true, num_args = 1..)]
    targets: Vec<PathBuf>,
    /// Where to run: the GPU, the CPU, or the GPU when one exists (said on stderr).
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

#[derive(clap::Args)]
struct MergeArgs {
    /// Summary files written by `xent score --summary-out`.
    #[arg(required = true)]
    summaries: Vec<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Write the merged summary (mergeable again).
    #[arg(long)]
    summary_out: Option<PathBuf>,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Rows of generated logits (a comma-separated list for a table).
    #[arg(long, value_delimiter = ',', default_value = "1,256")]
    rows: Vec<usize>,
    /// Vocabulary sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "128256")]
    vocab: Vec<usize>,
    /// Logits dtypes (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32,bf16")]
    dtype: Vec<DtypeArg>,
    /// Which paths to time.
    #[arg(long, value_enum, default_value = "all")]
    device: BenchDevice,
    /// Timed runs per path (the median is reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Also time the single-threaded f64 reference (slow).
    #[arg(long)]
    reference: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct DemoArgs {
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

#[derive(clap::Args)]
struct GenArgs {
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
    /// Output logits file, .npy or .safetensors (tensor "logits").
    #[arg(long)]
    logits: PathBuf,
    /// Output targets file (i64), .npy or .safetensors (tensor "targets").
    #[arg(long)]
    targets: PathBuf,
}

fn main() -> ExitCode {
    quiet_headless_vulkan();
    let cli = Cli::parse();
    on_sigbus_exit_cleanly();
    let result = match cli.command {
        Command::Score(a) => score(&a),
        Command::Bench(a) => bench(&a),
        Command::Info => info(),
        Command::Demo(a) => demo(&a),
        Command::Gen(a) => gen(&a),
        Command::Merge(a) => merge(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Without `XDG_RUNTIME_DIR` (a headless machine, a container, CI), Mesa's Vulkan drivers print
/// "error: XDG_RUNTIME_DIR is invalid or not set" twice while probing for a Wayland display that
/// xent never uses: the line is harmless but reads like a failure. Point it at the temporary
/// directory when it is unset, first thing, while the process has one thread.
fn quiet_headless_vulkan() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
}

/// Input files are read through memory maps where that is zero-copy; if another process truncates a
/// file in the instant between a block's population (checked) and its reads, the kernel raises
/// SIGBUS. Turn that into the same kind of one-line error as every other bad input, with a
/// non-zero exit. Outputs are only written after scoring, so nothing is left half-written.
/// Linux only: that is where the zero-copy path runs, and where a stack overflow raises SIGSEGV
/// (not SIGBUS), so std's overflow report is not shadowed.
fn on_sigbus_exit_cleanly() {
    #[cfg(target_os = "linux")]
    {
        /// `si_code` of a SIGBUS for an access to a nonexistent part of a mapped object (Linux's
        /// asm-generic/siginfo.h; the libc crate does not export it for Linux).
        const BUS_ADRERR: libc::c_int = 2;
        extern "C" fn handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
            const MSG: &[u8] = b"xent: error: an input file was truncated or replaced while being read (SIGBUS)\n";
            // SAFETY: the kernel passes a valid siginfo_t with SA_SIGINFO; write(2), _exit(2) and
            // signal(2) are async-signal-safe.
            unsafe {
                if (*info).si_code == BUS_ADRERR {
                    libc::write(2, MSG.as_ptr().cast(), MSG.len());
                    libc::_exit(1);
                }
                // Any other bus error (a hardware memory error, a misaligned access) is not ours
                // to explain: restore the default action, and returning re-raises it.
                libc::signal(libc::SIGBUS, libc::SIG_DFL);
            }
        }
        // SAFETY: installs a handler that only calls async-signal-safe functions.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction =
                handler as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    }
}

/// The GPU context, or `None` for the CPU, as `--device` asks.
fn pick_device(device: DeviceArg) -> Result<Option<GpuContext>> {
    match device {
        DeviceArg::Cpu => Ok(None),
        DeviceArg::Gpu => Ok(Some(GpuContext::new().context("--device gpu")?)),
        DeviceArg::Auto => match GpuContext::new() {
            Ok(ctx) => {
                eprintln!("xent: device auto: using the GPU ({})", ctx.adapter_info().name);
                Ok(Some(ctx))
            }
            Err(e) => {
                eprintln!("xent: device auto: {e}; using the CPU");
                Ok(None)
            }
        },
    }
}

fn score(a: &ScoreArgs) -> Result<()> {
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
    let check = |p: &Option<PathBuf>, flag: &str, allowed: &[Kind]| -> Result<()> {
        match p {
            Some(p) if !allowed.contains(&output_kind(p)?) => {
                bail!(
                    "{}: {flag} writes {}",
                    p.display(),
                    allowed.iter().map(|k| k.ext()).collect::<Vec<_>>().join(" or ")
                )
            }
            _ => Ok(()),
        }
    };
    check(&a.per_token, "--per-token", &[Kind::Npy, Kind::Safetensors])?;
    check(&a.per_sequence, "--per-sequence", &[Kind::Jsonl, Kind::Safetensors])?;
    check(&a.summary_out, "--summary-out", &[Kind::Json])?;
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
    let offsets = a.offsets.as_deref().map(read_offsets).transpose()?;
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
    let json = json_summary(&result.summary, device, seconds);
    if let Some(path) = &a.summary_out {
        outputs.push(xent::io::stage(path, format!("{json}\n").as_bytes())?);
    }
    xent::io::commit_all(outputs)?;
    let text = human_summary(&result.summary, device, seconds);
    if a.json {
        eprint!("{text}");
        println!("{json}");
    } else {
        print!("{text}");
    }
    Ok(())
}

/// Output formats, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Npy,
    Safetensors,
    Jsonl,
    Json,
}

impl Kind {
    fn ext(self) -> &'static str {
        match self {
            Kind::Npy => ".npy",
            Kind::Safetensors => ".safetensors",
            Kind::Jsonl => ".jsonl",
            Kind::Json => ".json",
        }
    }
}

fn output_kind(p: &Path) -> Result<Kind> {
    match p.extension().and_then(|e| e.to_str()) {
        Some("npy") => Ok(Kind::Npy),
        Some("safetensors") => Ok(Kind::Safetensors),
        Some("jsonl") => Ok(Kind::Jsonl),
        Some("json") => Ok(Kind::Json),
        _ => bail!("{}: unknown output extension (expected .npy, .safetensors, .jsonl or .json)", p.display()),
    }
}

/// Paths, globs and directories to a sorted, non-empty list of files.
fn expand(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for arg in args {
        let text = arg.to_string_lossy();
        if arg.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(arg)
                .with_context(|| format!("{}: cannot list", arg.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "npy" || e == "safetensors"))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("{}: directory holds no .npy or .safetensors files", arg.display());
            }
            out.extend(files);
        } else if text.contains(['*', '?', '[']) {
            let mut files: Vec<PathBuf> =
                glob::glob(&text).with_context(|| format!("{text}: bad pattern"))?.filter_map(|p| p.ok()).collect();
            files.sort();
            if files.is_empty() {
                bail!("{text}: pattern matches no files");
            }
            out.extend(files);
        } else {
            out.push(arg.clone());
        }
    }
    if out.is_empty() {
        bail!("no files given");
    }
    Ok(out)
}

fn read_offsets(path: &Path) -> Result<Vec<u64>> {
    let t = xent::io::open(path, None, &["offsets"])?;
    if t.shape.len() != 1 {
        bail!("{}: offsets must have rank 1 [S+1], found shape {:?}", t.name, t.shape);
    }
    let v = t.targets().map_err(|_| anyhow!("{}: offsets must be i64, i32 or u32", t.name))?;
    (0..v.len()).map(|i| u64::try_from(v.get(i)).map_err(|_| anyhow!("{}: offset {i} is negative", t.name))).collect()
}

fn progress_bar(total: u64, visible: bool) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg} ETA {eta}")
    {
        bar.set_style(style);
    }
    bar
}

/// Refuses two output flags naming one file (one would silently replace the other).
fn distinct_outputs(outputs: &[(&str, Option<&Path>)]) -> Result<()> {
    let given: Vec<(&str, PathBuf)> = outputs
        .iter()
        .filter_map(|(flag, p)| p.map(|p| (*flag, std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))))
        .collect();
    for (i, (flag, p)) in given.iter().enumerate() {
        if let Some((other, _)) = given[..i].iter().find(|(_, q)| q == p) {
            bail!("{}: {other} and {flag} name the same file", p.display());
        }
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

fn stage_safetensors(
    path: &Path,
    tensors: &[(&str, safetensors::Dtype, Vec<usize>, &[u8])],
) -> Result<xent::io::AtomicWriter> {
    let views = tensors
        .iter()
        .map(|(name, d, shape, b)| Ok((name.to_string(), safetensors::tensor::TensorView::new(*d, shape.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let bytes = safetensors::serialize(views, None).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(xent::io::stage(path, &bytes)?)
}

fn merge(a: &MergeArgs) -> Result<()> {
    let mut total = Summary::default();
    let mut seconds = 0.0;
    for path in &a.summaries {
        let bytes = std::fs::read(path).with_context(|| path.display().to_string())?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| anyhow!("{}: not JSON: {e}", path.display()))?;
        let count = |k: &str| {
            v.get(k).and_then(serde_json::Value::as_u64).ok_or_else(|| {
                anyhow!("{}: not an xent summary (no count '{k}'; write one with score --summary-out)", path.display())
            })
        };
        let exact = |k: &str| {
            v.get(k).and_then(serde_json::Value::as_str).and_then(|s| s.parse::<i128>().ok()).ok_or_else(|| {
                anyhow!(
                    "{}: not an xent summary (no exact sum '{k}'; write one with score --summary-out)",
                    path.display()
                )
            })
        };
        total.merge(&Summary {
            tokens: count("tokens")?,
            ignored: count("ignored")?,
            correct: count("correct")?,
            nan: count("nan")?,
            infinite: count("infinite")?,
            sum_nll_fixed: exact("sum_nll_fixed")?,
            sum_nll_sq_fixed: exact("sum_nll_sq_fixed")?,
        });
        seconds += v.get("seconds").and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    }
    let json = json_summary(&total, "merged", seconds);
    if let Some(path) = &a.summary_out {
        if output_kind(path)? != Kind::Json {
            bail!("{}: --summary-out writes .json", path.display());
        }
        xent::io::write_atomic(path, format!("{json}\n").as_bytes())?;
    }
    if a.json {
        println!("{json}");
    } else {
        print!("{}", human_summary(&total, "merged summaries", seconds));
    }
    Ok(())
}

fn human_summary(s: &Summary, device: &str, seconds: f64) -> String {
    format!(
        "xent: {} tokens scored, {} ignored, on the {device} in {seconds:.3} s\n  \
         mean nll      {:.6} nats ({:.6} bits/token)\n  \
         perplexity    {:.4} ± {:.4}\n  \
         accuracy      {:.4}\n",
        s.tokens,
        s.ignored,
        s.mean_nll(),
        s.bits_per_token(),
        s.perplexity(),
        s.perplexity_stderr(),
        s.accuracy()
    )
}

/// JSON number, or null where JSON has none (NaN, ±inf).
fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

/// The contract's fields, then the exact sums that make summaries mergeable.
fn json_summary(s: &Summary, device: &str, seconds: f64) -> String {
    format!(
        "{{\"tokens\":{},\"ignored\":{},\"mean_nll\":{},\"bits_per_token\":{},\"perplexity\":{},\"ppl_stderr\":{},\"accuracy\":{},\"device\":\"{device}\",\"seconds\":{},\"correct\":{},\"nan\":{},\"infinite\":{},\"sum_nll_fixed\":\"{}\",\"sum_nll_sq_fixed\":\"{}\"}}",
        s.tokens,
        s.ignored,
        num(s.mean_nll()),
        num(s.bits_per_token()),
        num(s.perplexity()),
        num(s.perplexity_stderr()),
        num(s.accuracy()),
        num(seconds),
        s.correct,
        s.nan,
        s.infinite,
        s.sum_nll_fixed,
        s.sum_nll_sq_fixed
    )
}

fn time<T>(iters: usize, mut f: impl FnMut() -> Result<T>) -> Result<f64> {
    f()?; // warm-up
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(xent::bench::median(times))
}

/// One measured path of one case.
struct BenchRow {
    rows: usize,
    vocab: usize,
    dtype: Dtype,
    path: &'static str,
    plan: String,
    seconds: f64,
    bytes: u64,
    /// Which ceiling the percentage is of: the GPU copy or the CPU read bandwidth.
    gpu: bool,
}

/// Adapter-wide figures measured once per run.
struct Ceilings {
    adapter: String,
    gpu_copy: f64,
    empty_round_trip: f64,
    cpu_read: f64,
}

fn bench(a: &BenchArgs) -> Result<()> {
    if a.vocab.contains(&0) {
        bail!("--vocab must be at least 1");
    }
    let want_gpu = matches!(a.device, BenchDevice::Gpu | BenchDevice::All | BenchDevice::Auto);
    let gpu = if want_gpu {
        match GpuContext::new() {
            Ok(c) => Some(c),
            Err(e) if a.device == BenchDevice::Gpu => return Err(e.into()),
            Err(e) => {
                eprintln!("xent: bench: {e}; timing the CPU only");
                None
            }
        }
    } else {
        None
    };
    let want_cpu = matches!(a.device, BenchDevice::Cpu | BenchDevice::All) || gpu.is_none();
    let largest = (a.rows.iter().max().copied().unwrap_or(1))
        .checked_mul(a.vocab.iter().max().copied().unwrap_or(1))
        .and_then(|n| n.checked_mul(4))
        .context("--rows x --vocab overflows")?;
    // Ceilings: a copy of at least 256 MiB (several times any L2) and the CPU reading as much.
    let probe = (largest as u64).clamp(256 << 20, 1 << 30);
    let ceilings = Ceilings {
        adapter: gpu.as_ref().map_or("none".into(), |g| g.adapter_info().name.clone()),
        gpu_copy: gpu
            .as_ref()
            .map(|g| xent::bench::copy_ceiling(g, probe / 2, a.iters))
            .transpose()?
            .unwrap_or(f64::NAN),
        empty_round_trip: gpu
            .as_ref()
            .map(|g| xent::bench::empty_round_trip(g, a.iters))
            .transpose()?
            .unwrap_or(f64::NAN),
        cpu_read: if want_cpu { xent::bench::cpu_read_bandwidth(probe as usize, a.iters.min(5)) } else { f64::NAN },
    };
    let opts = Options::default();
    let mut out = Vec::new();
    for &dtype in &a.dtype {
        let dtype: Dtype = dtype.into();
        for &vocab in &a.vocab {
            for &rows in &a.rows {
                let (x, t) = xent::synth::eval_set(rows, vocab, 7, -100);
                let bytes = dtype.encode(&x);
                drop(x);
                let logits = Logits::from_bytes(&bytes, dtype, rows, vocab)?;
                let targets = xent::validate_targets(Targets::I64(&t), rows, vocab, &opts)?;
                let n = bytes.len() as u64;
                let row = |path, plan: String, seconds, gpu| BenchRow {
                    rows,
                    vocab,
                    dtype,
                    path,
                    plan,
                    seconds,
                    bytes: n,
                    gpu,
                };
                if let Some(ctx) = &gpu {
                    let plan = ctx.plan(rows as u64, vocab as u32).to_string();
                    // Rotate copies totalling at least 256 MiB so each run reads memory, not cache.
                    let resident = xent::bench::Resident::rotating(ctx, logits, &targets, 256 << 20)?;
                    let kernel = time_gpu(a.iters, || resident.run())?;
                    out.push(row("gpu fused kernel", plan.clone(), kernel.best(), true));
                    out.push(row("gpu fused round trip", plan.clone(), kernel.wall, true));
                    drop(resident);
                    if let Ok(unfused) = xent::bench::Unfused::new(ctx, logits, &targets) {
                        let t = time_gpu(a.iters, || unfused.run())?;
                        out.push(row("gpu unfused baseline", "log_softmax + gather".into(), t.best(), true));
                    }
                    let chunk = (n / 4).clamp(8 << 20, 64 << 20);
                    let upload = time(a.iters, || Ok(xent::bench::upload_alone(ctx, logits, chunk)?))?;
                    out.push(row("gpu upload alone", format!("{chunk} B chunks"), upload, true));
                    let e2e = time(a.iters, || Ok(ctx.score(logits, Targets::I64(&t), &opts)?))?;
                    out.push(row("gpu end-to-end (streamed)", format!("ring of {}", xent::RING), e2e, true));
                }
                if want_cpu {
                    let s = time(a.iters, || Ok(xent::cpu::score(logits, Targets::I64(&t), &opts)?))?;
                    out.push(row("cpu fast", format!("{} threads", rayon::current_num_threads()), s, false));
                    if a.reference {
                        let s = time(1, || Ok(xent::reference::score(logits, Targets::I64(&t), &opts)?))?;
                        out.push(row("cpu reference", "f64, 1 thread".into(), s, false));
                    }
                }
            }
        }
    }
    if a.json {
        println!("{}", bench_json(&ceilings, &out));
    } else {
        print_bench(&ceilings, &out);
    }
    Ok(())
}

fn time_gpu(iters: usize, mut f: impl FnMut() -> xent::Result<xent::bench::Timing>) -> Result<xent::bench::Timing> {
    f()?; // warm-up: pipelines compiled, buffers resident
    let mut wall = Vec::new();
    let mut device = Vec::new();
    for _ in 0..iters.max(1) {
        let t = f()?;
        wall.push(t.wall);
        device.extend(t.device);
    }
    let device = (!device.is_empty()).then(|| xent::bench::median(device));
    Ok(xent::bench::Timing { wall: xent::bench::median(wall), device })
}

fn pct(r: &BenchRow, c: &Ceilings) -> f64 {
    let ceiling = if r.gpu { c.gpu_copy } else { c.cpu_read };
    100.0 * (r.bytes as f64 / r.seconds) / ceiling
}

fn print_bench(c: &Ceilings, rows: &[BenchRow]) {
    println!("xent bench — adapter: {}", c.adapter);
    println!(
        "  gpu copy ceiling {:.2} GB/s (read + written); empty dispatch round trip {:.3} ms; cpu read {:.2} GB/s",
        c.gpu_copy / 1e9,
        c.empty_round_trip * 1e3,
        c.cpu_read / 1e9
    );
    println!(
        "  {:>6} {:>8} {:>5}  {:<26} {:<40} {:>10} {:>9} {:>7}",
        "rows", "vocab", "dtype", "path", "plan", "ms", "GB/s", "% ceil"
    );
    for r in rows {
        println!(
            "  {:>6} {:>8} {:>5}  {:<26} {:<40} {:>10.3} {:>9.2} {:>6.1}%",
            r.rows,
            r.vocab,
            r.dtype,
            r.path,
            r.plan,
            r.seconds * 1e3,
            r.bytes as f64 / r.seconds / 1e9,
            pct(r, c)
        );
    }
}

fn bench_json(c: &Ceilings, rows: &[BenchRow]) -> String {
    let results: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"rows\":{},\"vocab\":{},\"dtype\":\"{}\",\"path\":\"{}\",\"plan\":\"{}\",\"ms\":{},\"gb_per_s\":{},\"pct_of_ceiling\":{}}}",
                r.rows,
                r.vocab,
                r.dtype,
                r.path,
                r.plan,
                num(r.seconds * 1e3),
                num(r.bytes as f64 / r.seconds / 1e9),
                num(pct(r, c))
            )
        })
        .collect();
    format!(
        "{{\"adapter\":\"{}\",\"gpu_copy_gb_per_s\":{},\"empty_round_trip_ms\":{},\"cpu_read_gb_per_s\":{},\"results\":[{}]}}",
        c.adapter.replace('"', "'"),
        num(c.gpu_copy / 1e9),
        num(c.empty_round_trip * 1e3),
        num(c.cpu_read / 1e9),
        results.join(",")
    )
}

fn info() -> Result<()> {
    let ctx = GpuContext::new()?;
    let i = ctx.adapter_info();
    let l = ctx.device().limits();
    let f = ctx.device().features();
    println!("adapter        {}", i.name);
    println!("backend        {:?} ({:?})", i.backend, i.device_type);
    println!("driver         {} {}", i.driver, i.driver_info);
    println!("subgroup size  {}..{}", i.subgroup_min_size, i.subgroup_max_size);
    println!(
        "features       SUBGROUP {}, TIMESTAMP_QUERY {}, SHADER_F16 {} (f16/bf16 logits are unpacked in core WGSL, no feature needed)",
        f.contains(wgpu::Features::SUBGROUP),
        f.contains(wgpu::Features::TIMESTAMP_QUERY),
        f.contains(wgpu::Features::SHADER_F16),
    );
    println!("max storage binding          {} bytes", l.max_storage_buffer_binding_size);
    println!("max buffer                   {} bytes", l.max_buffer_size);
    println!("storage offset alignment     {} bytes", l.min_storage_buffer_offset_alignment);
    println!("workgroup storage            {} bytes", l.max_compute_workgroup_storage_size);
    println!("workgroups per dimension     {}", l.max_compute_workgroups_per_dimension);
    println!("kernel workgroup size        {}", ctx.workgroup_size());
    for (dtype, vocab) in [(Dtype::F32, 128_256), (Dtype::BF16, 128_256), (Dtype::F32, 1_000_000)] {
        println!(
            "rows per chunk {dtype:>4} x {vocab:<9} {}",
            ctx.rows_per_chunk(dtype, vocab, vocab).map_or_else(|e| e.to_string(), |n| n.to_string())
        );
    }
    Ok(())
}

fn demo(a: &DemoArgs) -> Result<()> {
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
    print!("{}", human_summary(&summary, "cpu reference", ref_s));
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

fn gen(a: &GenArgs) -> Result<()> {
    if a.vocab == 0 {
        bail!("--vocab must be at least 1");
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
