//! Measurement helpers shared by `xent bench` and the criterion benches: the kernel on resident
//! data (rotated over several copies so caches do not flatter), the copy ceiling of the same
//! adapter, an empty dispatch's round trip, the unfused baseline, upload alone, and the CPU's
//! memory read bandwidth; for KL divergence, the fused kernel on resident pairs ([`KldResident`])
//! and its unfused baseline ([`KldUnfused`]); for the loss and its gradient, the fused kernel on
//! resident rows ([`TrainResident`]) and its unfused baseline ([`TrainUnfused`]).

use std::time::Instant;

use crate::error::{Error, Result};
use crate::gpu::{
    read_buffer, EncodeJob, GpuContext, GradOutput, KldEncodeJob, TrainEncodeJob, KLD_ROW_BYTES, ROW_LOSS_BYTES,
    TRAIN_ROW_BYTES,
};
use crate::kld::KldRow;
use crate::problem::{Dtype, Logits, RowLoss, IGNORED_TARGET};
use crate::train::TrainRow;

/// One timed run.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Seconds from submit to the device being idle again, measured on the host.
    pub wall: f64,
    /// Seconds between the start and end timestamps on the device, when it has them.
    pub device: Option<f64>,
}

impl Timing {
    /// Device time when known, else wall time.
    pub fn best(&self) -> f64 {
        self.device.unwrap_or(self.wall)
    }
}

/// Two timestamp queries and the buffers to read them.
#[derive(Debug)]
struct Timer {
    queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
}

impl Timer {
    fn new(ctx: &GpuContext) -> Option<Timer> {
        let device = ctx.device();
        device.features().contains(wgpu::Features::TIMESTAMP_QUERY).then(|| Timer {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("xent timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolve: buffer(
                ctx,
                "xent timestamp resolve",
                16,
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            ),
            read: buffer(ctx, "xent timestamp read", 16, wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST),
        })
    }

    fn pass_writes(&self) -> wgpu::ComputePassTimestampWrites<'_> {
        wgpu::ComputePassTimestampWrites {
            query_set: &self.queries,
            beginning_of_pass_write_index: Some(0),
            end_of_pass_write_index: Some(1),
        }
    }

    fn resolve(&self, encoder: &mut wgpu::CommandEncoder) {
        encoder.resolve_query_set(&self.queries, 0..2, &self.resolve, 0);
        encoder.copy_buffer_to_buffer(&self.resolve, 0, &self.read, 0, 16);
    }

    fn seconds(&self, ctx: &GpuContext) -> Result<f64> {
        let mut ticks = [0u64; 2];
        read_buffer(ctx.device(), &self.read, 16, bytemuck::cast_slice_mut(&mut ticks))?;
        let period = f64::from(ctx.queue().get_timestamp_period());
        Ok(ticks[1].saturating_sub(ticks[0]) as f64 * period * 1e-9)
    }
}

fn entry(binding: u32, buf: &wgpu::Buffer) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry { binding, resource: buf.as_entire_binding() }
}

fn buffer(ctx: &GpuContext, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
    ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: size.next_multiple_of(16).max(16),
        usage,
        mapped_at_creation: false,
    })
}

/// Submits `encoder` and waits for the device to be idle; returns the wall time.
fn submit_wait(ctx: &GpuContext, encoder: wgpu::CommandEncoder) -> Result<f64> {
    let start = Instant::now();
    ctx.queue().submit([encoder.finish()]);
    ctx.device().poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Gpu(e.to_string()))?;
    let secs = start.elapsed().as_secs_f64();
    ctx.check_device_errors()?;
    Ok(secs)
}

/// Resolves `timer`'s queries into `encoder`, submits it, waits, and returns the wall time and
/// (with a timer) the device time of the pass it timed.
fn finish_timed(ctx: &GpuContext, mut encoder: wgpu::CommandEncoder, timer: Option<&Timer>) -> Result<Timing> {
    if let Some(t) = timer {
        t.resolve(&mut encoder);
    }
    let wall = submit_wait(ctx, encoder)?;
    let device = timer.map(|t| t.seconds(ctx)).transpose()?;
    Ok(Timing { wall, device })
}

/// Uploads `bytes` into a new storage buffer in 64 MiB pieces (bounded staging memory).
fn upload(ctx: &GpuContext, label: &str, bytes: &[u8]) -> Result<wgpu::Buffer> {
    upload_with(ctx, label, bytes, wgpu::BufferUsages::empty())
}

/// [`upload`], the buffer also having `usage` (beside `STORAGE | COPY_DST`).
fn upload_with(ctx: &GpuContext, label: &str, bytes: &[u8], usage: wgpu::BufferUsages) -> Result<wgpu::Buffer> {
    let size = (bytes.len() as u64).next_multiple_of(16).max(16);
    if size > ctx.device().limits().max_buffer_size {
        return Err(Error::Shape(format!(
            "{size} bytes exceed this device's largest buffer ({} bytes)",
            ctx.device().limits().max_buffer_size
        )));
    }
    let buf = buffer(ctx, label, size, wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | usage);
    const PIECE: usize = 64 << 20;
    for (i, piece) in bytes.chunks(PIECE).enumerate() {
        let mut padded = piece.to_vec();
        padded.resize(piece.len().next_multiple_of(4), 0);
        ctx.queue().write_buffer(&buf, (i * PIECE) as u64, &padded);
        ctx.queue().submit([]);
    }
    ctx.device().poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Gpu(e.to_string()))?;
    Ok(buf)
}

/// Logits, targets and outputs uploaded once, ready to be scored again and again — the way an
/// engine calls [`GpuContext::encode`]. Several copies of the logits can be kept and rotated so
/// that each run reads memory, not a cache still warm from the previous run.
#[derive(Debug)]
pub struct Resident<'c> {
    ctx: &'c GpuContext,
    copies: Vec<wgpu::Buffer>,
    next: std::cell::Cell<usize>,
    targets: wgpu::Buffer,
    output: wgpu::Buffer,
    readback: wgpu::Buffer,
    rows: u64,
    vocab: u32,
    dtype: Dtype,
    timer: Option<Timer>,
}

impl<'c> Resident<'c> {
    /// Uploads `logits` and validated `targets` (see [`crate::validate_targets`]) once.
    ///
    /// # Errors
    /// [`Error::Shape`] when the logits exceed the device's largest buffer; [`Error::Gpu`] on a device error.
    pub fn new(ctx: &'c GpuContext, logits: Logits<'_>, targets: &[u32]) -> Result<Self> {
        Self::rotating(ctx, logits, targets, 0)
    }

    /// Like [`Resident::new`], with enough copies of the logits (at most 16) that they total at
    /// least `min_total_bytes`; runs cycle through the copies.
    ///
    /// # Errors
    /// As [`Resident::new`].
    pub fn rotating(ctx: &'c GpuContext, logits: Logits<'_>, targets: &[u32], min_total_bytes: u64) -> Result<Self> {
        let bytes = (logits.bytes().len() as u64).max(1);
        let n = min_total_bytes.div_ceil(bytes).clamp(1, 16);
        let copies = (0..n).map(|_| upload(ctx, "xent resident logits", logits.bytes())).collect::<Result<Vec<_>>>()?;
        let rows = logits.rows() as u64;
        use wgpu::BufferUsages as U;
        let targets_buf = upload(ctx, "xent resident targets", bytemuck::cast_slice(targets))?;
        Ok(Resident {
            ctx,
            copies,
            next: std::cell::Cell::new(0),
            targets: targets_buf,
            output: buffer(ctx, "xent resident output", rows * ROW_LOSS_BYTES, U::STORAGE | U::COPY_SRC),
            readback: buffer(ctx, "xent resident readback", rows * ROW_LOSS_BYTES, U::MAP_READ | U::COPY_DST),
            rows,
            vocab: logits.vocab() as u32,
            dtype: logits.dtype(),
            timer: Timer::new(ctx),
        })
    }

    /// Copies of the logits being rotated.
    pub fn copies(&self) -> usize {
        self.copies.len()
    }

    /// Bytes of logits one run reads.
    pub fn logits_bytes(&self) -> u64 {
        self.rows * u64::from(self.vocab) * self.dtype.size() as u64
    }

    /// Runs the kernel once, over the next copy, and waits for it.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn run(&self) -> Result<Timing> {
        let i = self.next.get();
        self.next.set((i + 1) % self.copies.len());
        let job = EncodeJob {
            logits: &self.copies[i],
            logits_offset: 0,
            dtype: self.dtype,
            row_stride: u64::from(self.vocab),
            rows: self.rows,
            vocab: self.vocab,
            targets: &self.targets,
            targets_offset: 0,
            ignore: Some(IGNORED_TARGET),
            output: &self.output,
            output_offset: 0,
        };
        let mut encoder = self.ctx.device().create_command_encoder(&Default::default());
        self.ctx.encode_timed(&mut encoder, &job, self.timer.as_ref().map(Timer::pass_writes))?;
        finish_timed(self.ctx, encoder, self.timer.as_ref())
    }

    /// Reads back the results of the last run.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn results(&self) -> Result<Vec<RowLoss>> {
        if self.rows == 0 {
            return Ok(Vec::new());
        }
        let mut encoder = self.ctx.device().create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&self.output, 0, &self.readback, 0, self.rows * ROW_LOSS_BYTES);
        self.ctx.queue().submit([encoder.finish()]);
        let mut out = vec![RowLoss { nll: 0.0, lse: 0.0, argmax: 0, flags: 0 }; self.rows as usize];
        read_buffer(self.ctx.device(), &self.readback, self.rows * ROW_LOSS_BYTES, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }
}

/// The adapter's memory ceiling: a device-to-device copy of `bytes`, in bytes moved (read plus
/// written) per second — timestamps inside the encoder when the device has them, else wall time.
///
/// # Errors
/// [`Error::Gpu`] on a device error.
pub fn copy_ceiling(ctx: &GpuContext, bytes: u64, iters: usize) -> Result<f64> {
    let bytes = bytes.min(ctx.device().limits().max_buffer_size / 16 * 16).max(16);
    use wgpu::BufferUsages as U;
    let src = buffer(ctx, "xent ceiling src", bytes, U::COPY_SRC);
    let dst = buffer(ctx, "xent ceiling dst", bytes, U::COPY_DST);
    let inside = ctx.device().features().contains(wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS);
    let timer = if inside { Timer::new(ctx) } else { None };
    let mut times = Vec::new();
    for i in 0..=iters.max(1) {
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        if let Some(t) = &timer {
            encoder.write_timestamp(&t.queries, 0);
        }
        encoder.copy_buffer_to_buffer(&src, 0, &dst, 0, bytes);
        if let Some(t) = &timer {
            encoder.write_timestamp(&t.queries, 1);
            t.resolve(&mut encoder);
        }
        let wall = submit_wait(ctx, encoder)?;
        let secs = match &timer {
            Some(t) => t.seconds(ctx)?,
            None => wall,
        };
        if i > 0 {
            times.push(secs); // the first run is warm-up
        }
    }
    Ok(2.0 * bytes as f64 / median(times))
}

/// Median wall time of submitting one empty workgroup and waiting for the device to be idle:
/// the floor under any single dispatch's round trip.
///
/// # Errors
/// [`Error::Gpu`] on a device error.
pub fn empty_round_trip(ctx: &GpuContext, iters: usize) -> Result<f64> {
    let pipeline = ctx.auxiliary_pipeline("xent empty", "@compute @workgroup_size(1) fn main() {}", "main");
    let mut times = Vec::new();
    for i in 0..=iters.max(1) {
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.dispatch_workgroups(1, 1, 1);
        }
        let wall = submit_wait(ctx, encoder)?;
        if i > 0 {
            times.push(wall);
        }
    }
    Ok(median(times))
}

/// The unfused baseline on resident f32 logits: log-softmax written to a `[rows, vocab]` buffer,
/// then a gather (`shaders/unfused.wgsl`).
#[derive(Debug)]
pub struct Unfused<'c> {
    ctx: &'c GpuContext,
    softmax: wgpu::ComputePipeline,
    gather: wgpu::ComputePipeline,
    softmax_group: wgpu::BindGroup,
    gather_group: wgpu::BindGroup,
    nll: wgpu::Buffer,
    read: wgpu::Buffer,
    rows: u32,
    timer: Option<Timer>,
}

impl<'c> Unfused<'c> {
    /// Uploads f32 `logits` and validated `targets`; allocates the `[rows, vocab]` log-probabilities.
    ///
    /// # Errors
    /// [`Error::Dtype`] for logits other than f32; [`Error::Shape`] when the logits or the
    /// log-probabilities exceed one binding (the baseline does not chunk).
    pub fn new(ctx: &'c GpuContext, logits: Logits<'_>, targets: &[u32]) -> Result<Self> {
        if logits.dtype() != Dtype::F32 {
            return Err(Error::Dtype {
                dtype: logits.dtype().to_string(),
                expected: "the unfused baseline is f32 only".into(),
            });
        }
        let bytes = logits.bytes().len() as u64;
        if bytes > ctx.max_binding_bytes() || logits.rows() > 65_535 * 65_535 {
            return Err(Error::Shape(format!("the unfused baseline needs {bytes} bytes in one binding")));
        }
        const SOURCE: &str = include_str!("../shaders/unfused.wgsl");
        let softmax = ctx.auxiliary_pipeline("xent unfused log_softmax", SOURCE, "log_softmax");
        let gather = ctx.auxiliary_pipeline("xent unfused gather", SOURCE, "gather");
        use wgpu::BufferUsages as U;
        let rows = logits.rows() as u32;
        let params = [rows, logits.vocab() as u32, 0, 0];
        let params = {
            let b = buffer(ctx, "xent unfused params", 16, U::UNIFORM | U::COPY_DST);
            ctx.queue().write_buffer(&b, 0, bytemuck::cast_slice(&params));
            b
        };
        let x = upload(ctx, "xent unfused logits", logits.bytes())?;
        let logprobs = buffer(ctx, "xent unfused logprobs", bytes, U::STORAGE);
        let t = upload(ctx, "xent unfused targets", bytemuck::cast_slice(targets))?;
        let nll = buffer(ctx, "xent unfused nll", u64::from(rows) * 4, U::STORAGE | U::COPY_SRC);
        let read = buffer(ctx, "xent unfused read", u64::from(rows) * 4, U::MAP_READ | U::COPY_DST);
        let softmax_group = ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("xent unfused log_softmax"),
            layout: &softmax.get_bind_group_layout(0),
            entries: &[entry(0, &params), entry(1, &x), entry(2, &logprobs)],
        });
        let gather_group = ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("xent unfused gather"),
            layout: &gather.get_bind_group_layout(0),
            entries: &[entry(0, &params), entry(2, &logprobs), entry(3, &t), entry(4, &nll)],
        });
        Ok(Unfused { ctx, softmax, gather, softmax_group, gather_group, nll, read, rows, timer: Timer::new(ctx) })
    }

    /// Runs log-softmax then gather once (one pass, two dispatches) and waits.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn run(&self) -> Result<Timing> {
        let mut encoder = self.ctx.device().create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("xent unfused"),
                timestamp_writes: self.timer.as_ref().map(Timer::pass_writes),
            });
            let gx = self.rows.clamp(1, 65_535);
            pass.set_pipeline(&self.softmax);
            pass.set_bind_group(0, &self.softmax_group, &[]);
            pass.dispatch_workgroups(gx, self.rows.div_ceil(gx), 1);
            pass.set_pipeline(&self.gather);
            pass.set_bind_group(0, &self.gather_group, &[]);
            pass.dispatch_workgroups(self.rows.div_ceil(64), 1, 1);
        }
        finish_timed(self.ctx, encoder, self.timer.as_ref())
    }

    /// The per-row nll of the last run.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn results(&self) -> Result<Vec<f32>> {
        let mut encoder = self.ctx.device().create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&self.nll, 0, &self.read, 0, u64::from(self.rows) * 4);
        self.ctx.queue().submit([encoder.finish()]);
        let mut out = vec![0f32; self.rows as usize];
        read_buffer(self.ctx.device(), &self.read, u64::from(self.rows) * 4, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }
}

/// Base and test logits, targets and outputs uploaded once, ready for the fused KLD kernel again
/// and again — the way an engine calls [`GpuContext::encode_kld`]. Like [`Resident`], several
/// copies of the pair can be rotated so that each run reads memory, not a warm cache.
#[derive(Debug)]
pub struct KldResident<'c> {
    ctx: &'c GpuContext,
    copies: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    next: std::cell::Cell<usize>,
    targets: wgpu::Buffer,
    output: wgpu::Buffer,
    readback: wgpu::Buffer,
    rows: u64,
    vocab: u32,
    dtypes: (Dtype, Dtype),
    timer: Option<Timer>,
}

impl<'c> KldResident<'c> {
    /// Uploads `base` and `test` logits (same rows and vocab; dtypes may differ) and kernel-form
    /// `targets` (see [`crate::kld::reference::kernel_targets`]) once, with enough copies of the
    /// pair (at most 16) that they total at least `min_total_bytes`.
    ///
    /// # Errors
    /// [`Error::Shape`] when the sides differ in shape or exceed the device's largest buffer;
    /// [`Error::Gpu`] on a device error.
    pub fn rotating(
        ctx: &'c GpuContext,
        base: Logits<'_>,
        test: Logits<'_>,
        targets: &[u32],
        min_total_bytes: u64,
    ) -> Result<Self> {
        if base.rows() != test.rows() || base.vocab() != test.vocab() || targets.len() != base.rows() {
            return Err(Error::Shape(format!(
                "base {} x {}, test {} x {}, {} targets",
                base.rows(),
                base.vocab(),
                test.rows(),
                test.vocab(),
                targets.len()
            )));
        }
        let bytes = (base.bytes().len() + test.bytes().len()).max(1) as u64;
        let n = min_total_bytes.div_ceil(bytes).clamp(1, 16);
        let copies = (0..n)
            .map(|_| {
                Ok((upload(ctx, "xent resident base", base.bytes())?, upload(ctx, "xent resident test", test.bytes())?))
            })
            .collect::<Result<Vec<_>>>()?;
        let rows = base.rows() as u64;
        use wgpu::BufferUsages as U;
        Ok(KldResident {
            ctx,
            copies,
            next: std::cell::Cell::new(0),
            targets: upload(ctx, "xent resident targets", bytemuck::cast_slice(targets))?,
            output: buffer(ctx, "xent resident kld output", rows * KLD_ROW_BYTES, U::STORAGE | U::COPY_SRC),
            readback: buffer(ctx, "xent resident kld readback", rows * KLD_ROW_BYTES, U::MAP_READ | U::COPY_DST),
            rows,
            vocab: base.vocab() as u32,
            dtypes: (base.dtype(), test.dtype()),
            timer: Timer::new(ctx),
        })
    }

    /// Copies of the pair being rotated.
    pub fn copies(&self) -> usize {
        self.copies.len()
    }

    /// Bytes of logits (both sides) one run reads.
    pub fn logits_bytes(&self) -> u64 {
        self.rows * u64::from(self.vocab) * (self.dtypes.0.size() + self.dtypes.1.size()) as u64
    }

    /// Runs the fused KLD kernel once, over the next copy, and waits for it.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn run(&self) -> Result<Timing> {
        let i = self.next.get();
        self.next.set((i + 1) % self.copies.len());
        let v = u64::from(self.vocab);
        let job = KldEncodeJob {
            base: &self.copies[i].0,
            base_offset: 0,
            base_dtype: self.dtypes.0,
            base_row_stride: v,
            test: &self.copies[i].1,
            test_offset: 0,
            test_dtype: self.dtypes.1,
            test_row_stride: v,
            rows: self.rows,
            vocab: self.vocab,
            targets: &self.targets,
            targets_offset: 0,
            ignore: Some(IGNORED_TARGET),
            output: &self.output,
            output_offset: 0,
        };
        let mut encoder = self.ctx.device().create_command_encoder(&Default::default());
        self.ctx.encode_kld_timed(&mut encoder, &job, self.timer.as_ref().map(Timer::pass_writes))?;
        finish_timed(self.ctx, encoder, self.timer.as_ref())
    }

    /// Reads back the results of the last run.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn results(&self) -> Result<Vec<KldRow>> {
        if self.rows == 0 {
            return Ok(Vec::new());
        }
        let bytes = self.rows * KLD_ROW_BYTES;
        let mut encoder = self.ctx.device().create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&self.output, 0, &self.readback, 0, bytes);
        self.ctx.queue().submit([encoder.finish()]);
        let mut out = vec![KldRow::default(); self.rows as usize];
        read_buffer(self.ctx.device(), &self.readback, bytes, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }
}

/// The unfused KLD baseline on resident f32 pairs: `log_softmax` of both sides written out to
/// `[rows, vocab]` buffers (`shaders/unfused.wgsl`), then a per-row sum of `p·(log p − log q)`
/// (`shaders/kld_unfused.wgsl`) — what `F.kl_div(F.log_softmax(b), F.log_softmax(a),
/// log_target=True).sum(-1)` does.
#[derive(Debug)]
pub struct KldUnfused<'c> {
    ctx: &'c GpuContext,
    softmax: wgpu::ComputePipeline,
    sum: wgpu::ComputePipeline,
    softmax_groups: [wgpu::BindGroup; 2],
    sum_group: wgpu::BindGroup,
    kld: wgpu::Buffer,
    read: wgpu::Buffer,
    rows: u32,
    timer: Option<Timer>,
}

impl<'c> KldUnfused<'c> {
    /// Uploads f32 `base` and `test` logits; allocates both `[rows, vocab]` log-probabilities.
    ///
    /// # Errors
    /// [`Error::Dtype`] for logits other than f32; [`Error::Shape`] when the sides differ in
    /// shape, or a side exceeds one binding (the baseline does not chunk).
    pub fn new(ctx: &'c GpuContext, base: Logits<'_>, test: Logits<'_>) -> Result<Self> {
        for x in [base, test] {
            if x.dtype() != Dtype::F32 {
                return Err(Error::Dtype {
                    dtype: x.dtype().to_string(),
                    expected: "the unfused KLD baseline is f32 only".into(),
                });
            }
        }
        if base.rows() != test.rows() || base.vocab() != test.vocab() {
            return Err(Error::Shape("the unfused KLD baseline needs base and test of one shape".into()));
        }
        let bytes = base.bytes().len() as u64;
        if bytes > ctx.max_binding_bytes() || base.rows() > 65_535 * 65_535 {
            return Err(Error::Shape(format!("the unfused KLD baseline needs {bytes} bytes in one binding")));
        }
        const SOFTMAX: &str = include_str!("../shaders/unfused.wgsl");
        const SUM: &str = include_str!("../shaders/kld_unfused.wgsl");
        let softmax = ctx.auxiliary_pipeline("xent unfused log_softmax", SOFTMAX, "log_softmax");
        let sum = ctx.auxiliary_pipeline("xent unfused kld sum", SUM, "kld_sum");
        use wgpu::BufferUsages as U;
        let rows = base.rows() as u32;
        let params = {
            let b = buffer(ctx, "xent unfused kld params", 16, U::UNIFORM | U::COPY_DST);
            ctx.queue().write_buffer(&b, 0, bytemuck::cast_slice(&[rows, base.vocab() as u32, 0, 0]));
            b
        };
        let logits = [upload(ctx, "xent unfused base", base.bytes())?, upload(ctx, "xent unfused test", test.bytes())?];
        let logprobs = [
            buffer(ctx, "xent unfused log p", bytes, U::STORAGE),
            buffer(ctx, "xent unfused log q", bytes, U::STORAGE),
        ];
        let kld = buffer(ctx, "xent unfused kld", u64::from(rows) * 4, U::STORAGE | U::COPY_SRC);
        let read = buffer(ctx, "xent unfused kld read", u64::from(rows) * 4, U::MAP_READ | U::COPY_DST);
        let softmax_group = |k: usize| {
            ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("xent unfused log_softmax"),
                layout: &softmax.get_bind_group_layout(0),
                entries: &[entry(0, &params), entry(1, &logits[k]), entry(2, &logprobs[k])],
            })
        };
        let softmax_groups = [softmax_group(0), softmax_group(1)];
        let sum_group = ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("xent unfused kld sum"),
            layout: &sum.get_bind_group_layout(0),
            entries: &[entry(0, &params), entry(1, &logprobs[0]), entry(2, &logprobs[1]), entry(3, &kld)],
        });
        Ok(KldUnfused { ctx, softmax, sum, softmax_groups, sum_group, kld, read, rows, timer: Timer::new(ctx) })
    }

    /// Runs both log-softmaxes then the sum once (one pass, three dispatches) and waits.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn run(&self) -> Result<Timing> {
        let mut encoder = self.ctx.device().create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("xent unfused kld"),
                timestamp_writes: self.timer.as_ref().map(Timer::pass_writes),
            });
            let gx = self.rows.clamp(1, 65_535);
            pass.set_pipeline(&self.softmax);
            for group in &self.softmax_groups {
                pass.set_bind_group(0, group, &[]);
                pass.dispatch_workgroups(gx, self.rows.div_ceil(gx), 1);
            }
            pass.set_pipeline(&self.sum);
            pass.set_bind_group(0, &self.sum_group, &[]);
            pass.dispatch_workgroups(gx, self.rows.div_ceil(gx), 1);
        }
        finish_timed(self.ctx, encoder, self.timer.as_ref())
    }

    /// The per-row KLD of the last run.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn results(&self) -> Result<Vec<f32>> {
        let mut encoder = self.ctx.device().create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&self.kld, 0, &self.read, 0, u64::from(self.rows) * 4);
        self.ctx.queue().submit([encoder.finish()]);
        let mut out = vec![0f32; self.rows as usize];
        read_buffer(self.ctx.device(), &self.read, u64::from(self.rows) * 4, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------
// GPU loss and gradient (issue 12): the fused kernel on resident rows, and its unfused baseline.
// ---------------------------------------------------------------------------------------------

/// A storage buffer holding `bytes` (padded to 16), readable back by a copy.
fn upload_readable(ctx: &GpuContext, label: &str, bytes: &[u8]) -> Result<wgpu::Buffer> {
    upload_with(ctx, label, bytes, wgpu::BufferUsages::COPY_SRC)
}

/// Copies `size` bytes of `src` out through a staging buffer.
fn read_back(ctx: &GpuContext, src: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
    let staging = buffer(
        ctx,
        "xent read back",
        size.next_multiple_of(4),
        wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
    );
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(src, 0, &staging, 0, size.next_multiple_of(4));
    ctx.queue().submit([encoder.finish()]);
    let mut out = vec![0u8; size as usize];
    read_buffer(ctx.device(), &staging, size, &mut out)?;
    Ok(out)
}

/// Logits, targets and per-row scales uploaded once, ready for the fused loss-and-gradient kernel
/// again and again — the way a training step calls [`GpuContext::encode_loss_and_grad`]. Copies
/// of the logits are rotated as in [`Resident`]. In place, each run replaces a copy's logits by
/// their gradient, which the copy's next run then reads as logits: the same work on other values
/// (all finite), so the timing stands.
#[derive(Debug)]
pub struct TrainResident<'c> {
    ctx: &'c GpuContext,
    copies: Vec<wgpu::Buffer>,
    next: std::cell::Cell<usize>,
    targets: wgpu::Buffer,
    scale: wgpu::Buffer,
    output: wgpu::Buffer,
    /// The separate gradient buffer (`None`: in place).
    grad: Option<wgpu::Buffer>,
    rows: u64,
    vocab: u32,
    dtype: Dtype,
    timer: Option<Timer>,
}

impl<'c> TrainResident<'c> {
    /// Uploads `logits`, kernel-form `targets` and per-row `scale`s (see
    /// [`crate::train::prepare`]) with enough copies of the logits (at most 16) to total at least
    /// `min_total_bytes`; the gradient goes over the logits (`in_place`) or into a buffer of its own.
    ///
    /// # Errors
    /// [`Error::Shape`] when targets or scales are not one per row; [`Error::Gpu`] on a device error.
    pub fn rotating(
        ctx: &'c GpuContext,
        logits: Logits<'_>,
        targets: &[u32],
        scale: &[f32],
        in_place: bool,
        min_total_bytes: u64,
    ) -> Result<Self> {
        if targets.len() != logits.rows() || scale.len() != logits.rows() {
            return Err(Error::Shape(format!(
                "{} rows, {} targets, {} scales",
                logits.rows(),
                targets.len(),
                scale.len()
            )));
        }
        let bytes = (logits.bytes().len() as u64).max(1);
        let n = min_total_bytes.div_ceil(bytes).clamp(1, 16);
        let copies = (0..n)
            .map(|_| upload_readable(ctx, "xent train resident logits", logits.bytes()))
            .collect::<Result<_>>()?;
        let rows = logits.rows() as u64;
        use wgpu::BufferUsages as U;
        Ok(TrainResident {
            ctx,
            copies,
            next: std::cell::Cell::new(0),
            targets: upload_readable(ctx, "xent train resident targets", bytemuck::cast_slice(targets))?,
            scale: upload_readable(ctx, "xent train resident scale", bytemuck::cast_slice(scale))?,
            output: buffer(ctx, "xent train resident output", rows * TRAIN_ROW_BYTES, U::STORAGE | U::COPY_SRC),
            grad: (!in_place).then(|| buffer(ctx, "xent train resident gradient", bytes, U::STORAGE | U::COPY_SRC)),
            rows,
            vocab: logits.vocab() as u32,
            dtype: logits.dtype(),
            timer: Timer::new(ctx),
        })
    }

    /// Copies of the logits being rotated.
    pub fn copies(&self) -> usize {
        self.copies.len()
    }

    /// Bytes of logits one run reads (twice) and of gradient it writes (once).
    pub fn logits_bytes(&self) -> u64 {
        self.rows * u64::from(self.vocab) * self.dtype.size() as u64
    }

    /// The layout the kernel uses.
    pub fn plan(&self) -> crate::Plan {
        self.ctx.plan_train(self.rows, self.vocab)
    }

    /// Runs the kernel once (loss and gradient, no options), over the next copy, and waits.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn run(&self) -> Result<Timing> {
        let i = self.next.get();
        self.next.set((i + 1) % self.copies.len());
        let v = u64::from(self.vocab);
        let job = TrainEncodeJob {
            logits: &self.copies[i],
            logits_offset: 0,
            dtype: self.dtype,
            row_stride: v,
            rows: self.rows,
            vocab: self.vocab,
            targets: &self.targets,
            targets_offset: 0,
            ignore: Some(IGNORED_TARGET),
            scale: &self.scale,
            scale_offset: 0,
            weight: None,
            label_smoothing: 0.0,
            z_loss: 0.0,
            softcap: None,
            output: &self.output,
            output_offset: 0,
            grad: match &self.grad {
                Some(buffer) => GradOutput::Buffer { buffer, offset: 0, row_stride: v },
                None => GradOutput::InPlace,
            },
        };
        let mut encoder = self.ctx.device().create_command_encoder(&Default::default());
        self.ctx.encode_loss_and_grad_timed(&mut encoder, &job, self.timer.as_ref().map(Timer::pass_writes))?;
        finish_timed(self.ctx, encoder, self.timer.as_ref())
    }

    /// The per-row results of the last run.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn results(&self) -> Result<Vec<TrainRow>> {
        let bytes = read_back(self.ctx, &self.output, self.rows * TRAIN_ROW_BYTES)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// The gradient of the last run, as bytes of the logits' dtype.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn gradient(&self) -> Result<Vec<u8>> {
        let last = (self.next.get() + self.copies.len() - 1) % self.copies.len();
        read_back(self.ctx, self.grad.as_ref().unwrap_or(&self.copies[last]), self.logits_bytes())
    }
}

/// The unfused loss-and-gradient baseline on resident f32 logits: `log_softmax` written to a
/// `[rows, vocab]` buffer (`shaders/unfused.wgsl`), then a pass reading it back into the gradient
/// and the loss (`shaders/train_unfused.wgsl`) — the two kernels an eager framework runs, with
/// the log-probabilities between them.
#[derive(Debug)]
pub struct TrainUnfused<'c> {
    ctx: &'c GpuContext,
    softmax: wgpu::ComputePipeline,
    grad_pipeline: wgpu::ComputePipeline,
    softmax_group: wgpu::BindGroup,
    grad_group: wgpu::BindGroup,
    grad: wgpu::Buffer,
    loss: wgpu::Buffer,
    rows: u32,
    bytes: u64,
    timer: Option<Timer>,
}

impl<'c> TrainUnfused<'c> {
    /// Uploads f32 `logits`, validated `targets` (all in range: the baseline has no ignored rows)
    /// and per-row `scale`s; allocates the log-probabilities and the gradient.
    ///
    /// # Errors
    /// [`Error::Dtype`] for logits other than f32; [`Error::Shape`] when the logits exceed one
    /// binding (the baseline does not chunk) or targets and scales are not one per row.
    pub fn new(ctx: &'c GpuContext, logits: Logits<'_>, targets: &[u32], scale: &[f32]) -> Result<Self> {
        if logits.dtype() != Dtype::F32 {
            return Err(Error::Dtype {
                dtype: logits.dtype().to_string(),
                expected: "the unfused training baseline is f32 only".into(),
            });
        }
        let bytes = logits.bytes().len() as u64;
        if bytes > ctx.max_binding_bytes() || logits.rows() > 65_535 * 65_535 {
            return Err(Error::Shape(format!("the unfused training baseline needs {bytes} bytes in one binding")));
        }
        if targets.len() != logits.rows() || scale.len() != logits.rows() {
            return Err(Error::Shape("the unfused training baseline needs one target and one scale per row".into()));
        }
        const SOFTMAX: &str = include_str!("../shaders/unfused.wgsl");
        const GRAD: &str = include_str!("../shaders/train_unfused.wgsl");
        let softmax = ctx.auxiliary_pipeline("xent unfused log_softmax", SOFTMAX, "log_softmax");
        let grad_pipeline = ctx.auxiliary_pipeline("xent unfused gradient", GRAD, "grad_from_logprobs");
        use wgpu::BufferUsages as U;
        let rows = logits.rows() as u32;
        let params = buffer(ctx, "xent unfused train params", 16, U::UNIFORM | U::COPY_DST);
        ctx.queue().write_buffer(&params, 0, bytemuck::cast_slice(&[rows, logits.vocab() as u32, 0, 0]));
        let x = upload_readable(ctx, "xent unfused train logits", logits.bytes())?;
        let logprobs = buffer(ctx, "xent unfused train logprobs", bytes, U::STORAGE);
        let t = upload_readable(ctx, "xent unfused train targets", bytemuck::cast_slice(targets))?;
        let s = upload_readable(ctx, "xent unfused train scale", bytemuck::cast_slice(scale))?;
        let grad = buffer(ctx, "xent unfused train gradient", bytes, U::STORAGE | U::COPY_SRC);
        let loss = buffer(ctx, "xent unfused train loss", u64::from(rows) * 4, U::STORAGE | U::COPY_SRC);
        let softmax_group = ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("xent unfused log_softmax"),
            layout: &softmax.get_bind_group_layout(0),
            entries: &[entry(0, &params), entry(1, &x), entry(2, &logprobs)],
        });
        let grad_group = ctx.device().create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("xent unfused gradient"),
            layout: &grad_pipeline.get_bind_group_layout(0),
            entries: &[
                entry(0, &params),
                entry(1, &logprobs),
                entry(2, &t),
                entry(3, &s),
                entry(4, &grad),
                entry(5, &loss),
            ],
        });
        Ok(TrainUnfused {
            ctx,
            softmax,
            grad_pipeline,
            softmax_group,
            grad_group,
            grad,
            loss,
            rows,
            bytes,
            timer: Timer::new(ctx),
        })
    }

    /// Runs log-softmax then the gradient pass once (one pass, two dispatches) and waits.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn run(&self) -> Result<Timing> {
        let mut encoder = self.ctx.device().create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("xent unfused train"),
                timestamp_writes: self.timer.as_ref().map(Timer::pass_writes),
            });
            let gx = self.rows.clamp(1, 65_535);
            pass.set_pipeline(&self.softmax);
            pass.set_bind_group(0, &self.softmax_group, &[]);
            pass.dispatch_workgroups(gx, self.rows.div_ceil(gx), 1);
            pass.set_pipeline(&self.grad_pipeline);
            pass.set_bind_group(0, &self.grad_group, &[]);
            pass.dispatch_workgroups(gx, self.rows.div_ceil(gx), 1);
        }
        finish_timed(self.ctx, encoder, self.timer.as_ref())
    }

    /// The per-row loss and the f32 gradient of the last run.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn results(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let loss = read_back(self.ctx, &self.loss, u64::from(self.rows) * 4)?;
        let grad = read_back(self.ctx, &self.grad, self.bytes)?;
        Ok((bytemuck::pod_collect_to_vec(&loss), bytemuck::pod_collect_to_vec(&grad)))
    }
}

/// Wall time to move `logits` host-to-device through the same chunking as [`crate::Stream`]
/// (`write_buffer` into a ring of [`crate::RING`] buffers), with no kernel: the upload-alone
/// time that streaming's overlap is judged against.
///
/// # Errors
/// [`Error::Gpu`] on a device error.
pub fn upload_alone(ctx: &GpuContext, logits: Logits<'_>, chunk_bytes: u64) -> Result<f64> {
    let rb = logits.row_bytes() as u64;
    let chunk_rows = ctx
        .rows_per_chunk(logits.dtype(), logits.vocab() as u64, logits.vocab() as u64)?
        .min((chunk_bytes / rb).max(1));
    let ring: Vec<wgpu::Buffer> = (0..crate::RING)
        .map(|_| {
            buffer(ctx, "xent upload ring", chunk_rows * rb, wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST)
        })
        .collect();
    let start = Instant::now();
    let mut pending: std::collections::VecDeque<wgpu::SubmissionIndex> = Default::default();
    for (k, r0) in (0..logits.rows() as u64).step_by(chunk_rows as usize).enumerate() {
        let n = chunk_rows.min(logits.rows() as u64 - r0);
        if pending.len() == crate::RING {
            let idx = pending.pop_front().expect("non-empty");
            ctx.device()
                .poll(wgpu::PollType::Wait { submission_index: Some(idx), timeout: None })
                .map_err(|e| Error::Gpu(e.to_string()))?;
        }
        crate::stream::write_padded(
            ctx.queue(),
            &ring[k % crate::RING],
            logits.slice_rows(r0 as usize, (r0 + n) as usize).bytes(),
        );
        pending.push_back(ctx.queue().submit([]));
    }
    ctx.device().poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Gpu(e.to_string()))?;
    Ok(start.elapsed().as_secs_f64())
}

/// Copies `src` into `dst` (the same length) on every rayon thread, one contiguous piece each,
/// with the standard library's `copy_from_slice` (`memcpy`): the CPU copy ceiling of
/// `xent bench --train`.
pub fn par_copy(src: &[u8], dst: &mut [u8]) {
    use rayon::prelude::*;
    let piece = src.len().div_ceil(rayon::current_num_threads()).max(1);
    dst.par_chunks_mut(piece).zip(src.par_chunks(piece)).for_each(|(d, s)| d.copy_from_slice(s));
}

/// The CPU loss and gradient timed in the same run as the copy that is its ceiling.
#[derive(Debug, Clone, Copy)]
pub struct TrainCpuTiming {
    /// Median seconds of [`crate::train::cpu::loss_and_grad_in_place`].
    pub in_place: f64,
    /// Median seconds of [`crate::train::cpu::loss_and_grad`] into a separate buffer (allocated
    /// and written once before timing).
    pub separate: f64,
    /// Median seconds of [`par_copy`] of the logits (the restore before each in-place run): the
    /// copy bandwidth is twice the logits' bytes over this.
    pub copy: f64,
}

/// Times the CPU loss and gradient on `logits`: each in-place run works on a buffer first restored
/// from `logits` by [`par_copy`] (timed apart: the copy bandwidth, same size, same run), so every
/// run sees the same values and none finds its input in cache; runs into a separate buffer
/// alternate with them. Medians of `iters` after a warm-up of each.
///
/// # Errors
/// As [`crate::train::cpu::loss_and_grad`].
pub fn time_train_cpu(
    logits: Logits<'_>,
    targets: crate::Targets<'_>,
    opts: &crate::train::LossOptions<'_>,
    iters: usize,
) -> Result<TrainCpuTiming> {
    use crate::train::{cpu, Upstream};
    let mut work = vec![0u8; logits.bytes().len()];
    let mut grad = vec![0u8; logits.bytes().len()];
    let (mut in_place, mut separate, mut copy) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..=iters.max(1) {
        let t = Instant::now();
        par_copy(logits.bytes(), &mut work);
        let c = t.elapsed().as_secs_f64();
        let t = Instant::now();
        cpu::loss_and_grad_in_place(&mut work, logits.dtype(), logits.vocab(), targets, opts, Upstream::Scalar(1.0))?;
        let p = t.elapsed().as_secs_f64();
        let t = Instant::now();
        cpu::loss_and_grad(logits, targets, opts, Upstream::Scalar(1.0), Some(&mut grad))?;
        let s = t.elapsed().as_secs_f64();
        if i > 0 {
            in_place.push(p);
            separate.push(s);
            copy.push(c);
        }
    }
    Ok(TrainCpuTiming { in_place: median(in_place), separate: median(separate), copy: median(copy) })
}

/// The CPU's memory read bandwidth in bytes per second: every thread summing its share of a
/// buffer of `bytes` (larger than the caches), median of `iters` after a warm-up.
pub fn cpu_read_bandwidth(bytes: usize, iters: usize) -> f64 {
    use rayon::prelude::*;
    let words = vec![1u64; bytes / 8];
    let mut times = Vec::new();
    for i in 0..=iters.max(1) {
        let start = Instant::now();
        let sum: u64 = words.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b))).sum();
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        if i > 0 {
            times.push(secs);
        }
    }
    (words.len() * 8) as f64 / median(times)
}

/// Median of a list (NaN when empty).
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}
