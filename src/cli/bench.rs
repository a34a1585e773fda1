//! `xent bench`: the GPU kernel and the CPU paths timed on generated logits, against measured ceilings.
//! With `--kld`, KL divergence between generated pairs of models' logits instead of cross-entropy;
//! with `--train`, the loss and its gradient with respect to the logits (training).

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
    /// Time the loss and its gradient (training) instead: in place and into a separate buffer,
    /// bytes = 2 reads + 1 write of the logits, against the copy bandwidth of a buffer of the
    /// same size measured in the same run.
    #[arg(long, conflicts_with = "kld")]
    train: bool,
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
    if a.train {
        return train::run(a, gpu.as_ref(), want_cpu);
    }
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

// ---------------------------------------------------------------------------------------------
// `--train`: the loss and its gradient.
// ---------------------------------------------------------------------------------------------

/// `xent bench --train`: one function per path ([`train::cpu_rows`]; a GPU path adds its own
/// beside it), each row carrying the ceiling it is judged against, measured in the same run.
mod train {
    use anyhow::Result;
    use xent::train::LossOptions;
    use xent::{Dtype, GpuContext, Logits, Targets};

    use super::{num, time, time_gpu, BenchArgs};

    /// One generated case: logits of one dtype and their targets (2% ignored, as
    /// [`xent::synth::eval_set`] makes them), default options (mean, as `F.cross_entropy`).
    pub(super) struct TrainCase<'a> {
        pub rows: usize,
        pub vocab: usize,
        pub dtype: Dtype,
        pub logits: Logits<'a>,
        pub targets: &'a [i64],
        pub opts: LossOptions<'a>,
        pub iters: usize,
    }

    impl TrainCase<'_> {
        /// Bytes one run moves at the floor: the logits read twice (statistics, then gradient)
        /// and the gradient written once.
        pub fn bytes(&self) -> u64 {
            3 * self.logits.bytes().len() as u64
        }
    }

    /// One measured path of one case, with its ceiling.
    pub(super) struct TrainBenchRow {
        pub rows: usize,
        pub vocab: usize,
        pub dtype: Dtype,
        pub path: &'static str,
        pub plan: String,
        pub seconds: f64,
        /// Bytes counted: 2 reads + 1 write of the logits.
        pub bytes: u64,
        /// What the ceiling is, and its bytes per second.
        pub ceiling: &'static str,
        pub ceiling_bytes_per_s: f64,
    }

    impl TrainBenchRow {
        fn gb_per_s(&self) -> f64 {
            self.bytes as f64 / self.seconds / 1e9
        }
        fn pct(&self) -> f64 {
            100.0 * (self.bytes as f64 / self.seconds) / self.ceiling_bytes_per_s
        }
    }

    /// What the CPU ceiling is.
    const CPU_COPY: &str = "cpu copy";

    pub(super) fn run(a: &BenchArgs, gpu: Option<&GpuContext>, want_cpu: bool) -> Result<()> {
        let mut out = Vec::new();
        // The GPU ceiling, once per run: a device-to-device copy at least as large as the largest
        // case (at least 256 MiB, several times any L2), read + written bytes per second.
        let largest =
            a.rows.iter().max().copied().unwrap_or(1) as u64 * a.vocab.iter().max().copied().unwrap_or(1) as u64 * 4;
        let gpu_copy = gpu
            .map(|g| xent::bench::copy_ceiling(g, largest.clamp(256 << 20, 1 << 30) / 2, a.iters))
            .transpose()?
            .unwrap_or(f64::NAN);
        for &dtype in &a.dtype {
            let dtype: Dtype = dtype.into();
            for &vocab in &a.vocab {
                for &rows in &a.rows {
                    let (x, t) = xent::synth::eval_set(rows, vocab, 7, -100);
                    let bytes = dtype.encode(&x);
                    drop(x);
                    let case = TrainCase {
                        rows,
                        vocab,
                        dtype,
                        logits: Logits::from_bytes(&bytes, dtype, rows, vocab)?,
                        targets: &t,
                        opts: LossOptions::default(),
                        iters: a.iters,
                    };
                    if let Some(ctx) = gpu {
                        out.extend(gpu_rows(ctx, &case, gpu_copy)?);
                    }
                    if want_cpu {
                        out.extend(cpu_rows(&case)?);
                    }
                }
            }
        }
        if a.json {
            println!("{}", json(&out));
        } else {
            print(&out);
        }
        Ok(())
    }

    /// The CPU rows of one case: in place and into a separate buffer
    /// ([`xent::bench::time_train_cpu`]), against the copy of a buffer of the logits' size on
    /// every thread, timed in the same run (read + written bytes per second).
    pub(super) fn cpu_rows(c: &TrainCase<'_>) -> Result<Vec<TrainBenchRow>> {
        let t = xent::bench::time_train_cpu(c.logits, Targets::I64(c.targets), &c.opts, c.iters)?;
        let copy = 2.0 * c.logits.bytes().len() as f64 / t.copy;
        let plan = format!("{} threads, {}", rayon::current_num_threads(), xent::cpu::isa());
        let row = |path, seconds| TrainBenchRow {
            rows: c.rows,
            vocab: c.vocab,
            dtype: c.dtype,
            path,
            plan: plan.clone(),
            seconds,
            bytes: c.bytes(),
            ceiling: CPU_COPY,
            ceiling_bytes_per_s: copy,
        };
        Ok(vec![row("cpu loss+grad in place", t.in_place), row("cpu loss+grad separate", t.separate)])
    }

    /// What the GPU ceiling is.
    const GPU_COPY: &str = "gpu copy";

    /// The GPU rows of one case, against the adapter's copy bandwidth measured in the same run
    /// (`gpu_copy`, read + written bytes per second):
    /// - "gpu loss+grad in place" / "gpu loss+grad separate": the fused kernel on resident
    ///   logits rotated over 256 MiB ([`xent::bench::TrainResident`]), device time;
    /// - "gpu loss+grad unfused": log-softmax written out, then the gradient from it
    ///   ([`xent::bench::TrainUnfused`]; f32 that fits one binding);
    /// - "gpu loss+grad end-to-end": [`GpuContext::loss_and_grad`] from host memory and back.
    ///
    /// Bytes are those of the fused floor (2 reads + 1 write of the logits) on every row, so
    /// that GB/s compare the same work.
    pub(super) fn gpu_rows(ctx: &GpuContext, c: &TrainCase<'_>, gpu_copy: f64) -> Result<Vec<TrainBenchRow>> {
        let up = xent::train::Upstream::Scalar(1.0);
        let p = xent::train::prepare(c.logits, Targets::I64(c.targets), &c.opts, up)?;
        let row = |path, plan: String, seconds| TrainBenchRow {
            rows: c.rows,
            vocab: c.vocab,
            dtype: c.dtype,
            path,
            plan,
            seconds,
            bytes: c.bytes(),
            ceiling: GPU_COPY,
            ceiling_bytes_per_s: gpu_copy,
        };
        let mut out = Vec::new();
        let plan = ctx.plan_train(c.rows as u64, c.vocab as u32).to_string();
        for (in_place, path) in [(true, "gpu loss+grad in place"), (false, "gpu loss+grad separate")] {
            let resident =
                xent::bench::TrainResident::rotating(ctx, c.logits, &p.targets, &p.scale, in_place, 256 << 20)?;
            out.push(row(path, plan.clone(), time_gpu(c.iters, || resident.run())?.best()));
        }
        // The baseline has no ignored rows: their targets become class 0.
        let targets: Vec<u32> = p.targets.iter().map(|&t| if t == xent::IGNORED_TARGET { 0 } else { t }).collect();
        if let Ok(unfused) = xent::bench::TrainUnfused::new(ctx, c.logits, &targets, &p.scale) {
            let t = time_gpu(c.iters, || unfused.run())?;
            out.push(row("gpu loss+grad unfused", "log_softmax + gradient pass".into(), t.best()));
        }
        let mut grad = vec![0u8; c.logits.bytes().len()];
        let e2e = time(c.iters, || {
            Ok(ctx.loss_and_grad(c.logits, Targets::I64(c.targets), &c.opts, up, Some(&mut grad))?)
        })?;
        out.push(row("gpu loss+grad end-to-end", format!("ring of {}", xent::RING), e2e));
        Ok(out)
    }

    fn print(rows: &[TrainBenchRow]) {
        println!("xent bench --train (cross-entropy loss + gradient; bytes = 2 reads + 1 write of the logits)");
        println!(
            "  ceiling '{CPU_COPY}': memcpy of a buffer of the logits' size, one piece per thread, \
             read + written bytes per second, median, same run"
        );
        if rows.iter().any(|r| r.ceiling == GPU_COPY) {
            println!(
                "  ceiling '{GPU_COPY}': device-to-device copy of at least 256 MiB, read + written bytes per second, \
                 median, same run; gpu kernel rows are device time (timestamps) on resident logits"
            );
        }
        println!(
            "  {:>6} {:>8} {:>5}  {:<26} {:<22} {:>10} {:>9} {:>12} {:>7}",
            "rows", "vocab", "dtype", "path", "plan", "ms", "GB/s", "ceiling GB/s", "% ceil"
        );
        for r in rows {
            println!(
                "  {:>6} {:>8} {:>5}  {:<26} {:<22} {:>10.3} {:>9.2} {:>12.2} {:>6.1}%",
                r.rows,
                r.vocab,
                r.dtype,
                r.path,
                r.plan,
                r.seconds * 1e3,
                r.gb_per_s(),
                r.ceiling_bytes_per_s / 1e9,
                r.pct()
            );
        }
    }

    fn json(rows: &[TrainBenchRow]) -> String {
        let results: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{{\"rows\":{},\"vocab\":{},\"dtype\":\"{}\",\"path\":\"{}\",\"plan\":\"{}\",\"ms\":{},\"gb_per_s\":{},\"ceiling\":\"{}\",\"ceiling_gb_per_s\":{},\"pct_of_ceiling\":{}}}",
                    r.rows,
                    r.vocab,
                    r.dtype,
                    r.path,
                    r.plan,
                    num(r.seconds * 1e3),
                    num(r.gb_per_s()),
                    r.ceiling,
                    num(r.ceiling_bytes_per_s / 1e9),
                    num(r.pct())
                )
            })
            .collect();
        format!("{{\"train\":true,\"bytes\":\"2 reads + 1 write\",\"results\":[{}]}}", results.join(","))
    }
}
