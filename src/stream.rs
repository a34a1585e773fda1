//! Streaming: inputs larger than device memory, or arriving in pieces, run through a ring of
//! device and staging buffers so that the upload of chunk k+1, the kernel on chunk k and the
//! readback of chunk k-1 overlap. Memory stays bounded by the ring, whatever the input size.
//!
//! One ring serves every kernel: [`Stream`] is generic over a [`StreamKernel`] (what a chunk
//! uploads, records and reads back): [`ScoreKernel`] (the default, cross-entropy) and
//! [`KldKernel`] (KL divergence between two inputs, [`KldStream`]). The host-slice entry points
//! [`GpuContext::score`] and [`GpuContext::kld`] are built here, on the ring: this module sits
//! above `crate::gpu`, which knows nothing of it.

use std::collections::VecDeque;
use std::sync::mpsc;

use crate::error::{Error, Result};
use crate::gpu::{EncodeJob, GpuContext, KldEncodeJob};
use crate::kld::KldRow;
use crate::problem::{validate_targets, Dtype, Logits, Options, RowLoss, Targets, IGNORED_TARGET};

/// Chunks in flight at once: one uploading, one computing, one reading back.
pub const RING: usize = 3;

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::ScoreKernel {}
    impl Sealed for super::KldKernel {}
}

/// A kernel the ring can drive: the layout of its inputs, and how one chunk of dense rows in the
/// ring's buffers is recorded. Implemented by [`ScoreKernel`] and [`KldKernel`] (sealed).
pub trait StreamKernel: sealed::Sealed + std::fmt::Debug {
    /// One row's result, as the kernel writes it.
    type Row: bytemuck::Pod;
    /// Element type of each logits input, in order.
    fn dtypes(&self) -> &[Dtype];
    /// Logits per row (every input).
    fn vocab(&self) -> u32;
    /// Most dense rows one dispatch covers on `ctx`.
    ///
    /// # Errors
    /// [`Error::Shape`] when one row exceeds a binding.
    fn max_chunk_rows(&self, ctx: &GpuContext) -> Result<u64>;
    /// Records the kernel over `rows` dense rows: `inputs[k]` holds input k's logits from byte 0,
    /// `targets` the `u32` targets, `output` receives the results.
    ///
    /// # Errors
    /// As [`GpuContext::encode`] / [`GpuContext::encode_kld`].
    fn encode(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &[wgpu::Buffer],
        targets: &wgpu::Buffer,
        output: &wgpu::Buffer,
        rows: u64,
    ) -> Result<()>;
}

/// Cross-entropy over one input of `dtype` logits (the forward kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScoreKernel {
    dtype: [Dtype; 1],
    vocab: u32,
}

impl StreamKernel for ScoreKernel {
    type Row = RowLoss;
    fn dtypes(&self) -> &[Dtype] {
        &self.dtype
    }
    fn vocab(&self) -> u32 {
        self.vocab
    }
    fn max_chunk_rows(&self, ctx: &GpuContext) -> Result<u64> {
        let v = u64::from(self.vocab);
        ctx.rows_per_chunk(self.dtype[0], v, v)
    }
    fn encode(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &[wgpu::Buffer],
        targets: &wgpu::Buffer,
        output: &wgpu::Buffer,
        rows: u64,
    ) -> Result<()> {
        ctx.encode(
            encoder,
            &EncodeJob {
                logits: &inputs[0],
                logits_offset: 0,
                dtype: self.dtype[0],
                row_stride: u64::from(self.vocab),
                rows,
                vocab: self.vocab,
                targets,
                targets_offset: 0,
                ignore: Some(IGNORED_TARGET),
                output,
                output_offset: 0,
            },
        )
    }
}

/// KL divergence between base and test logits (the KLD kernel); inputs `[base, test]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KldKernel {
    dtypes: [Dtype; 2],
    vocab: u32,
}

impl StreamKernel for KldKernel {
    type Row = KldRow;
    fn dtypes(&self) -> &[Dtype] {
        &self.dtypes
    }
    fn vocab(&self) -> u32 {
        self.vocab
    }
    fn max_chunk_rows(&self, ctx: &GpuContext) -> Result<u64> {
        let v = u64::from(self.vocab);
        ctx.rows_per_chunk_kld((self.dtypes[0], v), (self.dtypes[1], v), v)
    }
    fn encode(
        &self,
        ctx: &GpuContext,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &[wgpu::Buffer],
        targets: &wgpu::Buffer,
        output: &wgpu::Buffer,
        rows: u64,
    ) -> Result<()> {
        let v = u64::from(self.vocab);
        ctx.encode_kld(
            encoder,
            &KldEncodeJob {
                base: &inputs[0],
                base_offset: 0,
                base_dtype: self.dtypes[0],
                base_row_stride: v,
                test: &inputs[1],
                test_offset: 0,
                test_dtype: self.dtypes[1],
                test_row_stride: v,
                rows,
                vocab: self.vocab,
                targets,
                targets_offset: 0,
                ignore: Some(IGNORED_TARGET),
                output,
                output_offset: 0,
            },
        )
    }
}

struct Slot {
    inputs: Vec<wgpu::Buffer>,
    targets: wgpu::Buffer,
    output: wgpu::Buffer,
    readback: wgpu::Buffer,
}

struct InFlight {
    slot: usize,
    rows: u64,
    submission: wgpu::SubmissionIndex,
    mapped: mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
}

/// A stream over one layout (dtypes, vocab) of one kernel: push rows in any number of pieces,
/// get results back in order as chunks complete.
///
/// Cross-entropy (the default kernel, [`ScoreKernel`]):
/// ```no_run
/// # fn main() -> xent::Result<()> {
/// let ctx = xent::GpuContext::new()?;
/// let mut stream = xent::Stream::new(&ctx, xent::Dtype::F32, 32_000, 64 << 20)?;
/// let mut results = Vec::new();
/// # let pieces: Vec<(Vec<f32>, Vec<u32>)> = Vec::new();
/// for (logits, targets) in &pieces {
///     results.extend(stream.push(xent::Logits::f32(logits, 32_000)?, targets)?);
/// }
/// results.extend(stream.finish()?);
/// # Ok(()) }
/// ```
///
/// KL divergence ([`KldStream`]), base and test pieces side by side:
/// ```no_run
/// # fn main() -> xent::Result<()> {
/// use xent::{Dtype, Logits};
/// let ctx = xent::GpuContext::new()?;
/// let mut stream = xent::Stream::kld(&ctx, Dtype::BF16, Dtype::F16, 32_000, 64 << 20)?;
/// let mut results = Vec::new();
/// # let pieces: Vec<(Vec<half::bf16>, Vec<half::f16>, Vec<u32>)> = Vec::new();
/// for (base, test, targets) in &pieces {
///     results.extend(stream.push(Logits::bf16(base, 32_000)?, Logits::f16(test, 32_000)?, targets)?);
/// }
/// results.extend(stream.finish()?);
/// # Ok(()) }
/// ```
pub struct Stream<'c, K: StreamKernel = ScoreKernel> {
    ctx: &'c GpuContext,
    kernel: K,
    chunk_rows: u64,
    slots: Vec<Slot>,
    next: usize,
    in_flight: VecDeque<InFlight>,
    poison: Vec<u8>,
}

/// The KLD stream: [`Stream::kld`], then [`Stream::push`] with base and test pieces.
pub type KldStream<'c> = Stream<'c, KldKernel>;

impl<K: StreamKernel> std::fmt::Debug for Stream<'_, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("kernel", &self.kernel)
            .field("chunk_rows", &self.chunk_rows)
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

impl<'c> Stream<'c, ScoreKernel> {
    /// A cross-entropy stream whose chunks hold at most `chunk_bytes` of logits (and always fit
    /// one binding). Device memory used: [`RING`] chunks of logits, targets and results, plus
    /// staging.
    ///
    /// # Errors
    /// [`Error::Shape`] when vocab is 0 or one row exceeds a binding.
    pub fn new(ctx: &'c GpuContext, dtype: Dtype, vocab: u32, chunk_bytes: u64) -> Result<Self> {
        Self::with_kernel(ctx, ScoreKernel { dtype: [dtype], vocab }, chunk_bytes)
    }

    /// Queues `logits` with validated targets (see [`crate::validate_targets`]) and returns the
    /// results of every chunk that has completed meanwhile, in input order.
    ///
    /// # Errors
    /// [`Error::Shape`] when the logits' dtype or vocab differ from the stream's;
    /// [`Error::RowMismatch`] when the target count differs from the rows; [`Error::Gpu`] on a
    /// device error.
    pub fn push(&mut self, logits: Logits<'_>, targets: &[u32]) -> Result<Vec<RowLoss>> {
        self.push_inputs(&[logits], targets)
    }
}

impl<'c> Stream<'c, KldKernel> {
    /// A KLD stream: base logits of `base_dtype` against test logits of `test_dtype`, both with
    /// `vocab` logits per row; chunks hold at most `chunk_bytes` of logits of both sides together
    /// (and always fit one binding per side). Device memory used: [`RING`] chunks of both sides'
    /// logits, targets and results, plus staging.
    ///
    /// # Errors
    /// [`Error::Shape`] when vocab is 0 or one row exceeds a binding.
    pub fn kld(
        ctx: &'c GpuContext,
        base_dtype: Dtype,
        test_dtype: Dtype,
        vocab: u32,
        chunk_bytes: u64,
    ) -> Result<KldStream<'c>> {
        Self::with_kernel(ctx, KldKernel { dtypes: [base_dtype, test_dtype], vocab }, chunk_bytes)
    }

    /// Queues a piece of row pairs — `base` and `test` logits of the same rows, with kernel-form
    /// targets (a class index, [`crate::kld::NO_TARGET`] or [`IGNORED_TARGET`]; see
    /// [`crate::kld::reference::kernel_targets`]) — and returns the results of every chunk that
    /// has completed meanwhile, in input order.
    ///
    /// # Errors
    /// [`Error::Shape`] when a side's dtype or vocab differ from the stream's, or the sides'
    /// rows differ; [`Error::RowMismatch`] when the target count differs from the rows;
    /// [`Error::Gpu`] on a device error.
    pub fn push(&mut self, base: Logits<'_>, test: Logits<'_>, targets: &[u32]) -> Result<Vec<KldRow>> {
        if base.rows() != test.rows() {
            return Err(Error::Shape(format!("base piece has {} rows, test piece {}", base.rows(), test.rows())));
        }
        self.push_inputs(&[base, test], targets)
    }
}

impl<'c, K: StreamKernel> Stream<'c, K> {
    fn with_kernel(ctx: &'c GpuContext, kernel: K, chunk_bytes: u64) -> Result<Self> {
        let vocab = u64::from(kernel.vocab());
        if vocab == 0 {
            return Err(Error::Shape("vocab is 0".into()));
        }
        let row_bytes: u64 = kernel.dtypes().iter().map(|d| vocab * d.size() as u64).sum();
        let result_bytes = std::mem::size_of::<K::Row>() as u64;
        let chunk_rows = kernel.max_chunk_rows(ctx)?.min((chunk_bytes / row_bytes).max(1));
        let device = ctx.device();
        use wgpu::BufferUsages as U;
        let make = |label: &str, size: u64, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: size.next_multiple_of(16).max(16),
                usage,
                mapped_at_creation: false,
            })
        };
        let slots = (0..RING)
            .map(|_| Slot {
                inputs: kernel
                    .dtypes()
                    .iter()
                    .map(|d| make("xent stream logits", chunk_rows * vocab * d.size() as u64, U::STORAGE | U::COPY_DST))
                    .collect(),
                targets: make("xent stream targets", chunk_rows * 4, U::STORAGE | U::COPY_DST),
                output: make("xent stream output", chunk_rows * result_bytes, U::STORAGE | U::COPY_SRC | U::COPY_DST),
                readback: make("xent stream readback", chunk_rows * result_bytes, U::MAP_READ | U::COPY_DST),
            })
            .collect();
        Ok(Stream {
            ctx,
            kernel,
            chunk_rows,
            slots,
            next: 0,
            in_flight: VecDeque::new(),
            // Poison: an unwritten result reads as NaN with every flag set, never a plausible row.
            poison: vec![0xff; (chunk_rows * result_bytes) as usize],
        })
    }

    /// Rows per chunk.
    pub fn chunk_rows(&self) -> u64 {
        self.chunk_rows
    }

    /// Waits for every queued chunk and returns their results, in input order.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn finish(mut self) -> Result<Vec<K::Row>> {
        let mut done = Vec::new();
        while !self.in_flight.is_empty() {
            done.extend(self.complete_oldest()?);
        }
        Ok(done)
    }

    fn push_inputs(&mut self, inputs: &[Logits<'_>], targets: &[u32]) -> Result<Vec<K::Row>> {
        let vocab = self.kernel.vocab() as usize;
        for (x, &dtype) in inputs.iter().zip(self.kernel.dtypes()) {
            if x.dtype() != dtype || x.vocab() != vocab {
                return Err(Error::Shape(format!("stream is {dtype} x {vocab}, pushed {} x {}", x.dtype(), x.vocab())));
            }
        }
        let rows = inputs[0].rows();
        if targets.len() != rows {
            return Err(Error::RowMismatch { logits_rows: rows, targets_rows: targets.len() });
        }
        let mut done = Vec::new();
        let rows = rows as u64;
        for r0 in (0..rows).step_by(self.chunk_rows as usize) {
            let n = self.chunk_rows.min(rows - r0);
            // Back-pressure: the slot about to be reused must have finished its last chunk.
            if self.in_flight.len() == RING {
                done.extend(self.complete_oldest()?);
            }
            let (a, b) = (r0 as usize, (r0 + n) as usize);
            self.submit(inputs, a, b, &targets[a..b])?;
        }
        // Collect whatever else has already finished, without waiting.
        self.ctx.device().poll(wgpu::PollType::Poll).map_err(|e| Error::Gpu(e.to_string()))?;
        while let Some(front) = self.in_flight.front() {
            match front.mapped.try_recv() {
                Ok(Ok(())) => done.extend(self.read_oldest()?),
                Ok(Err(e)) => return Err(Error::Gpu(format!("reading results back: {e}"))),
                Err(_) => break, // not finished yet
            }
        }
        Ok(done)
    }

    /// Uploads rows `r0..r1` of every input and records the kernel over them.
    fn submit(&mut self, inputs: &[Logits<'_>], r0: usize, r1: usize, targets: &[u32]) -> Result<()> {
        let ctx = self.ctx;
        let slot = &self.slots[self.next];
        let n = (r1 - r0) as u64;
        let result_bytes = n * std::mem::size_of::<K::Row>() as u64;
        for (x, buf) in inputs.iter().zip(&slot.inputs) {
            write_padded(ctx.queue(), buf, x.slice_rows(r0, r1).bytes());
        }
        ctx.queue().write_buffer(&slot.targets, 0, bytemuck::cast_slice(targets));
        ctx.queue().write_buffer(&slot.output, 0, &self.poison[..result_bytes as usize]);
        let mut encoder =
            ctx.device().create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("xent stream chunk") });
        self.kernel.encode(ctx, &mut encoder, &slot.inputs, &slot.targets, &slot.output, n)?;
        encoder.copy_buffer_to_buffer(&slot.output, 0, &slot.readback, 0, result_bytes);
        let submission = ctx.queue().submit([encoder.finish()]);
        // Ask for the readback now; it resolves when this submission completes.
        let (tx, rx) = mpsc::channel();
        slot.readback.slice(..result_bytes).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.in_flight.push_back(InFlight { slot: self.next, rows: n, submission, mapped: rx });
        self.next = (self.next + 1) % RING;
        Ok(())
    }

    fn complete_oldest(&mut self) -> Result<Vec<K::Row>> {
        let Some(front) = self.in_flight.front() else { return Ok(Vec::new()) };
        self.ctx
            .device()
            .poll(wgpu::PollType::Wait { submission_index: Some(front.submission.clone()), timeout: None })
            .map_err(|e| Error::Gpu(e.to_string()))?;
        match front.mapped.recv() {
            Ok(Ok(())) => self.read_oldest(),
            Ok(Err(e)) => Err(Error::Gpu(e.to_string())),
            Err(e) => Err(Error::Gpu(e.to_string())),
        }
    }

    /// Reads the oldest chunk, whose mapping has resolved.
    fn read_oldest(&mut self) -> Result<Vec<K::Row>> {
        // On a device of our own, an error (a failed chunk) lands in the context's store rather
        // than a scope: report it instead of reading a readback buffer the chunk never wrote.
        self.ctx.check_device_errors()?;
        let Some(f) = self.in_flight.pop_front() else { return Ok(Vec::new()) };
        let slot = &self.slots[f.slot];
        let bytes = f.rows * std::mem::size_of::<K::Row>() as u64;
        let out = {
            let view = slot.readback.slice(..bytes).get_mapped_range().map_err(|e| Error::Gpu(e.to_string()))?;
            bytemuck::pod_collect_to_vec::<u8, K::Row>(&view)
        };
        slot.readback.unmap();
        Ok(out)
    }
}

/// `write_buffer` needs a multiple of 4 bytes: the last partial word is padded with zeros.
pub(crate) fn write_padded(queue: &wgpu::Queue, buffer: &wgpu::Buffer, bytes: &[u8]) {
    let whole = bytes.len() / 4 * 4;
    if whole > 0 {
        queue.write_buffer(buffer, 0, &bytes[..whole]);
    }
    if whole < bytes.len() {
        let mut tail = [0u8; 4];
        tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
        queue.write_buffer(buffer, whole as u64, &tail);
    }
}

/// Chunks of a quarter of the input (so that at least a few overlap), 8 to 64 MiB.
fn host_chunk_bytes(total: u64) -> u64 {
    (total / 4).clamp(8 << 20, 64 << 20)
}

impl GpuContext {
    /// Scores host logits on the GPU: validates targets, uploads chunk by chunk, runs the fused
    /// kernel, reads back one [`RowLoss`] per row.
    ///
    /// # Errors
    /// As [`validate_targets`], and [`Error::Gpu`] if the device reports an error.
    pub fn score(&self, logits: Logits<'_>, targets: Targets<'_>, opts: &Options) -> Result<Vec<RowLoss>> {
        let t = validate_targets(targets, logits.rows(), logits.vocab(), opts)?;
        self.score_validated(logits, &t)
    }

    /// [`GpuContext::score`] with targets already in kernel form (see [`validate_targets`]).
    /// Goes through a [`Stream`] so that upload, kernel and readback overlap.
    pub(crate) fn score_validated(&self, logits: Logits<'_>, targets: &[u32]) -> Result<Vec<RowLoss>> {
        if logits.rows() == 0 {
            return Ok(Vec::new());
        }
        let chunk_bytes = host_chunk_bytes(logits.bytes().len() as u64);
        self.in_error_scopes(|| {
            let mut stream = Stream::new(self, logits.dtype(), logits.vocab() as u32, chunk_bytes)?;
            let mut out = stream.push(logits, targets)?;
            out.extend(stream.finish()?);
            Ok(out)
        })
    }

    /// KL divergence between host base and test logits on the GPU, one [`KldRow`] per row: both
    /// rows of each pair read once, together (dtypes may differ). Without targets every row gets
    /// only the distribution statistics (KLD, argmaxes, same top); with them also `nll_base`,
    /// `nll_test` and `dp`, and rows whose target is `opts.ignore_index` are ignored.
    ///
    /// # Errors
    /// [`Error::Shape`] when the two sides differ in rows or vocab; as [`validate_targets`];
    /// [`Error::Gpu`] if the device reports an error.
    pub fn kld(
        &self,
        base: Logits<'_>,
        test: Logits<'_>,
        targets: Option<Targets<'_>>,
        opts: &Options,
    ) -> Result<Vec<KldRow>> {
        let t = crate::kld::reference::kernel_targets(base, test, targets, opts)?;
        self.kld_validated(base, test, &t)
    }

    /// [`GpuContext::kld`] with shapes checked and targets in kernel form (see
    /// [`crate::kld::reference::kernel_targets`]), through a [`KldStream`].
    pub(crate) fn kld_validated(&self, base: Logits<'_>, test: Logits<'_>, targets: &[u32]) -> Result<Vec<KldRow>> {
        if base.rows() == 0 {
            return Ok(Vec::new());
        }
        let chunk_bytes = host_chunk_bytes((base.bytes().len() + test.bytes().len()) as u64);
        self.in_error_scopes(|| {
            let mut stream = Stream::kld(self, base.dtype(), test.dtype(), base.vocab() as u32, chunk_bytes)?;
            let mut out = stream.push(base, test, targets)?;
            out.extend(stream.finish()?);
            Ok(out)
        })
    }
}
