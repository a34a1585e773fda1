//! `xent bench`: the GPU kernel and the CPU paths timed on generated logits, against measured ceilings.
//! With `--kld`, KL divergence between generated pairs of models' logits instead of cross-entropy.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use xent::{Dtype, GpuContext, Logits, Options, Targets};

use super::{auto_device, num, DtypeArg};

/// `--device` of `xent bench`: which paths to time.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BenchDevice {
    Auto,
    Gpu,
    Cpu,
    All,
}

/// Flags of `xent bench`.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Rows of generated logits (a comma-separated list for a table).
    #[arg(long, value_delimiter = ',', default_value = "1,256")]
    rows: Vec<usize>,
    /// Vocabulary sizes (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "128256")]
    vocab: Vec<usize>,
    /// Logits dtypes (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "f32,bf16")]
    dtype: Vec<DtypeArg>,
    /// Which paths to time: all that exist, the GPU, the CPU, or auto (the GPU, or the CPU when the
    /// only adapter is a software one, as score decides).
    #[arg(long, value_enum, default_value = "all")]
    device: BenchDevice,
    /// Timed runs per path (the median is reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Also time the single-threaded f64 reference (slow).
    #[arg(long)]
    reference: bool,
    /// Time KL divergence instead of cross-entropy: generated pairs (the test is the base plus noise
    /// of 0.01, both of each `--dtype`), with targets; bytes and GB/s count both inputs.
    #[arg(long)]
    kld: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
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

/// Runs `xent bench`.
///
/// # Errors
/// A bad flag, or a failing device with `--device gpu`.
pub fn run(a: &BenchArgs) -> Result<()> {
    if a.vocab.contains(&0) {
        bail!("--vocab must be at least 1");
    }
    // `auto` decides as every command does (a software adapter is passed over for the CPU);
    // `all` times whatever exists, a software adapter included.
    let gpu = match a.device {
        BenchDevice::Cpu => None,
        BenchDevice::Auto => auto_device(),
        BenchDevice::Gpu => Some(GpuContext::new()?),
        BenchDevice::All => match GpuContext::new() {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("xent: bench: {e}; timing the CPU only");
                None
            }
        },
    };
    let want_cpu = matches!(a.device, BenchDevice::Cpu | BenchDevice::All) || gpu.is_none();
    // KLD reads two inputs of the shape.
    let inputs = if a.kld { 2 } else { 1 };
    let largest = (a.rows.iter().max().copied().unwrap_or(1))
        .checked_mul(a.vocab.iter().max().copied().unwrap_or(1))
        .and_then(|n| n.checked_mul(4 * inputs))
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
    let out = if a.kld { kld_cases(a, gpu.as_ref(), want_cpu)? } else { score_cases(a, gpu.as_ref(), want_cpu)? };
    if a.json {
        println!("{}", bench_json(&ceilings, &out));
    } else {
        print_bench(&ceilings, &out, if a.kld { "KL divergence; bytes = base + test" } else { "cross-entropy" });
    }
    Ok(())
}

/// One generated case: what every row of its table shares.
#[derive(Clone, Copy)]
struct Case {
    rows: usize,
    vocab: usize,
    dtype: Dtype,
    /// Bytes one run reads (both inputs for KLD).
    bytes: u64,
}

impl Case {
    fn row(&self, path: &'static str, plan: String, seconds: f64, gpu: bool) -> BenchRow {
        BenchRow { rows: self.rows, vocab: self.vocab, dtype: self.dtype, path, plan, seconds, bytes: self.bytes, gpu }
    }
}

/// Cross-entropy: every (dtype, vocab, rows) case on the paths asked for.
fn score_cases(a: &BenchArgs, gpu: Option<&GpuContext>, want_cpu: bool) -> Result<Vec<BenchRow>> {
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
                let case = Case { rows, vocab, dtype, bytes: n };
                let row = |path, plan, seconds, gpu| case.row(path, plan, seconds, gpu);
                if let Some(ctx) = gpu {
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
    Ok(out)
}

/// Noise between the generated base and test logits: a good quantisation (KLD ~ 1e-4 … 1e-3).
const KLD_NOISE: f32 = 0.01;

/// One generated KLD case: base and test logits of one dtype, and targets (`-100` ignored).
struct KldCase<'a> {
    case: Case,
    base: Logits<'a>,
    test: Logits<'a>,
    targets: &'a [i64],
    opts: Options,
    iters: usize,
}

/// KL divergence: every (dtype, vocab, rows) case, generated by [`xent::synth::kld_pair`] (test =
/// base + noise of [`KLD_NOISE`], the same dtype on both sides), on the paths asked for.
fn kld_cases(a: &BenchArgs, gpu: Option<&GpuContext>, want_cpu: bool) -> Result<Vec<BenchRow>> {
    let mut out = Vec::new();
    for &dtype in &a.dtype {
        let dtype: Dtype = dtype.into();
        for &vocab in &a.vocab {
            for &rows in &a.rows {
                let (x, y, t) = xent::synth::kld_pair(rows, vocab, 7, KLD_NOISE);
                // Encode one side at a time, freeing its f32 copy before the next (peak memory).
                let base_bytes = dtype.encode(&x);
                drop(x);
                let test_bytes = dtype.encode(&y);
                drop(y);
                let k = KldCase {
                    case: Case { rows, vocab, dtype, bytes: (base_bytes.len() + test_bytes.len()) as u64 },
                    base: Logits::from_bytes(&base_bytes, dtype, rows, vocab)?,
                    test: Logits::from_bytes(&test_bytes, dtype, rows, vocab)?,
                    targets: &t,
                    opts: Options::default(),
                    iters: a.iters,
                };
                if let Some(ctx) = gpu {
                    out.extend(gpu_kld_rows(ctx, &k)?);
                }
                if want_cpu {
                    let targets = || Some(Targets::I64(k.targets));
                    let s = time(k.iters, || Ok(xent::kld::cpu::kld(k.base, k.test, targets(), &k.opts)?))?;
                    let threads = format!("{} threads", rayon::current_num_threads());
                    out.push(k.case.row("cpu kld fast", threads, s, false));
                    if a.reference {
                        let s = time(1, || Ok(xent::kld::reference::kld(k.base, k.test, targets(), &k.opts)?))?;
                        out.push(k.case.row("cpu kld reference", "f64, 1 thread".into(), s, false));
                    }
                }
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// GPU KLD rows.
// ---------------------------------------------------------------------------------------------

/// The GPU rows of one KLD case, in this order (the same ceiling as the cross-entropy rows: the
/// adapter's copy bandwidth):
/// - "gpu kld fused kernel": the kernel on resident base and test buffers rotated over 256 MiB,
///   device time (`xent::bench::KldResident`, as `Resident` for cross-entropy);
/// - "gpu kld unfused baseline": log-softmax of both sides written out, then the sum
///   (`xent::bench::KldUnfused`, f32 inputs that fit one binding);
/// - "gpu kld end-to-end": [`GpuContext::kld`] from host memory, streamed.
///
/// # Errors
/// A device error.
fn gpu_kld_rows(ctx: &GpuContext, k: &KldCase<'_>) -> Result<Vec<BenchRow>> {
    let targets = || Some(Targets::I64(k.targets));
    let kernel_targets = xent::kld::reference::kernel_targets(k.base, k.test, targets(), &k.opts)?;
    let mut rows = Vec::new();
    let plan = ctx.plan_kld(k.base.rows() as u64, k.base.vocab() as u32).to_string();
    {
        let resident = xent::bench::KldResident::rotating(ctx, k.base, k.test, &kernel_targets, 256 << 20)?;
        let t = time_gpu(k.iters, || resident.run())?;
        rows.push(k.case.row("gpu kld fused kernel", plan, t.best(), true));
    }
    if let Ok(unfused) = xent::bench::KldUnfused::new(ctx, k.base, k.test) {
        let t = time_gpu(k.iters, || unfused.run())?;
        rows.push(k.case.row("gpu kld unfused baseline", "log_softmax x2 + sum".into(), t.best(), true));
    }
    let e2e = time(k.iters, || Ok(ctx.kld(k.base, k.test, targets(), &k.opts)?))?;
    rows.push(k.case.row("gpu kld end-to-end", format!("ring of {}", xent::RING), e2e, true));
    Ok(rows)
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

fn print_bench(c: &Ceilings, rows: &[BenchRow], what: &str) {
    println!("xent bench ({what}) — adapter: {}", c.adapter);
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
