//! `xent`: cross-entropy, perplexity and accuracy over `.npy` / `.safetensors` logits, on the GPU.

use std::path::PathBuf;
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
    #[arg(long)]
    logits: PathBuf,
    /// Targets: .npy (<i8, <i4, <u4) or .safetensors (I64, I32, U32), shape [N] or [B, T].
    #[arg(long)]
    targets: PathBuf,
    /// Where to run: the GPU, the CPU, or the GPU when one exists (said on stderr).
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Target value whose rows are skipped (nll 0, not in the mean).
    #[arg(long, default_value_t = -100, allow_hyphen_values = true)]
    ignore_index: i64,
    /// Write each row's nll (nats, 0.0 where ignored) as a <f4 .npy of shape [N].
    #[arg(long)]
    per_token: Option<PathBuf>,
    /// Print one JSON object on stdout (human text goes to stderr).
    #[arg(long)]
    json: bool,
    /// Tensor name of the logits in a .safetensors file (default: its only tensor, or "logits").
    #[arg(long)]
    logits_key: Option<String>,
    /// Tensor name of the targets in a .safetensors file (default: its only tensor, or "targets"/"labels").
    #[arg(long)]
    targets_key: Option<String>,
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
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Score(a) => score(&a),
        Command::Bench(a) => bench(&a),
        Command::Info => info(),
        Command::Demo(a) => demo(&a),
        Command::Gen(a) => gen(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xent: error: {e:#}");
            ExitCode::FAILURE
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
    let gpu = pick_device(a.device)?;
    let opts = Options { ignore_index: a.ignore_index };
    // Timed from opening the inputs to the last result (device creation excluded, as documented).
    let start = Instant::now();
    let lt = xent::io::open(&a.logits, a.logits_key.as_deref(), &["logits"])?;
    let tt = xent::io::open(&a.targets, a.targets_key.as_deref(), &["targets", "labels"])?;
    let logits = lt.logits()?;
    let targets = tt.targets()?;
    check_shapes(&lt, &tt, logits, targets)?;
    let rows = run(gpu.as_ref(), logits, targets, &opts).map_err(|e| match e {
        xent::Error::TargetOutOfRange { .. } | xent::Error::RowMismatch { .. } => anyhow!("{}: {e}", tt.name),
        other => anyhow!(other),
    })?;
    let summary = Summary::of(&rows);
    let seconds = start.elapsed().as_secs_f64();
    if let Some(path) = &a.per_token {
        let nll: Vec<f32> = rows.iter().map(|r| r.nll).collect();
        xent::io::write_npy_f32(path, &nll)?;
    }
    let device = if gpu.is_some() { "gpu" } else { "cpu" };
    let text = human_summary(&summary, device, seconds);
    if a.json {
        eprint!("{text}");
        println!("{}", json_summary(&summary, device, seconds));
    } else {
        print!("{text}");
    }
    Ok(())
}

fn check_shapes(lt: &xent::io::Tensor, tt: &xent::io::Tensor, logits: Logits<'_>, targets: Targets<'_>) -> Result<()> {
    let (ls, ts) = (&lt.shape, &tt.shape);
    if logits.rows() != targets.len() || (ls.len() == 3 && ts.len() == 2 && ls[..2] != ts[..]) {
        bail!(
            "{} has shape {ls:?} ({} rows) but {} has shape {ts:?} ({} targets): they must agree",
            lt.name,
            logits.rows(),
            tt.name,
            targets.len()
        );
    }
    Ok(())
}

fn run(
    gpu: Option<&GpuContext>,
    logits: Logits<'_>,
    targets: Targets<'_>,
    opts: &Options,
) -> xent::Result<Vec<RowLoss>> {
    match gpu {
        Some(ctx) => ctx.score(logits, targets, opts),
        None => xent::cpu::score(logits, targets, opts),
    }
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

fn json_summary(s: &Summary, device: &str, seconds: f64) -> String {
    format!(
        "{{\"tokens\":{},\"ignored\":{},\"mean_nll\":{},\"bits_per_token\":{},\"perplexity\":{},\"ppl_stderr\":{},\"accuracy\":{},\"device\":\"{device}\",\"seconds\":{}}}",
        s.tokens,
        s.ignored,
        num(s.mean_nll()),
        num(s.bits_per_token()),
        num(s.perplexity()),
        num(s.perplexity_stderr()),
        num(s.accuracy()),
        num(seconds)
    )
}

/// Converts generated f32 logits to `dtype` bytes.
fn to_bytes(x: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => bytemuck::cast_slice(x).to_vec(),
        Dtype::F16 => x.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        Dtype::BF16 => x.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
    }
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
    let largest = a.rows.iter().max().copied().unwrap_or(1) * a.vocab.iter().max().copied().unwrap_or(1) * 4;
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
                let bytes = to_bytes(&x, dtype);
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
        lw.write(&to_bytes(&x, dtype))?;
    }
    let tb: &[u8] = bytemuck::cast_slice(&targets);
    let mut tw = xent::io::AtomicWriter::create(&a.targets)?;
    tw.write(&if is_st(&a.targets) {
        xent::io::safetensors_header("targets", "I64", &[a.rows], tb.len())
    } else {
        xent::io::npy_header("<i8", &[a.rows])
    })?;
    tw.write(tb)?;
    lw.finish()?;
    tw.finish()?;
    eprintln!("xent gen: wrote {} ({} x {} {dtype}) and {}", a.logits.display(), a.rows, a.vocab, a.targets.display());
    Ok(())
}
