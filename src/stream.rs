//! Streaming: inputs larger than device memory, or arriving in pieces, scored through a ring of
//! device and staging buffers so that the upload of chunk k+1, the kernel on chunk k and the
//! readback of chunk k-1 overlap. Memory stays bounded by the ring, whatever the input size.

use std::collections::VecDeque;
use std::sync::mpsc;

use crate::error::{Error, Result};
use crate::gpu::{EncodeJob, GpuContext, ROW_LOSS_BYTES};
use crate::problem::{Dtype, Logits, RowLoss, IGNORED_TARGET};

/// Chunks in flight at once: one uploading, one computing, one reading back.
pub const RING: usize = 3;

struct Slot {
    logits: wgpu::Buffer,
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

/// A scoring stream over one layout (dtype, vocab): push rows in any number of pieces, get
/// results back in order as chunks complete.
///
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
pub struct Stream<'c> {
    ctx: &'c GpuContext,
    dtype: Dtype,
    vocab: u32,
    chunk_rows: u64,
    slots: Vec<Slot>,
    next: usize,
    in_flight: VecDeque<InFlight>,
    poison: Vec<u8>,
}

impl std::fmt::Debug for Stream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("dtype", &self.dtype)
            .field("vocab", &self.vocab)
            .field("chunk_rows", &self.chunk_rows)
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

impl<'c> Stream<'c> {
    /// A stream whose chunks hold at most `chunk_bytes` of logits (and always fit one binding).
    /// Device memory used: [`RING`] chunks of logits, targets and results, plus staging.
    ///
    /// # Errors
    /// [`Error::Shape`] when vocab is 0 or one row exceeds a binding.
    pub fn new(ctx: &'c GpuContext, dtype: Dtype, vocab: u32, chunk_bytes: u64) -> Result<Self> {
        if vocab == 0 {
            return Err(Error::Shape("vocab is 0".into()));
        }
        let row_bytes = u64::from(vocab) * dtype.size() as u64;
        let chunk_rows =
            ctx.rows_per_chunk(dtype, u64::from(vocab), u64::from(vocab))?.min((chunk_bytes / row_bytes).max(1));
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
                logits: make("xent stream logits", chunk_rows * row_bytes, U::STORAGE | U::COPY_DST),
                targets: make("xent stream targets", chunk_rows * 4, U::STORAGE | U::COPY_DST),
                output: make("xent stream output", chunk_rows * ROW_LOSS_BYTES, U::STORAGE | U::COPY_SRC | U::COPY_DST),
                readback: make("xent stream readback", chunk_rows * ROW_LOSS_BYTES, U::MAP_READ | U::COPY_DST),
            })
            .collect();
        Ok(Stream {
            ctx,
            dtype,
            vocab,
            chunk_rows,
            slots,
            next: 0,
            in_flight: VecDeque::new(),
            // Poison: an unwritten result reads as NaN with every flag set, never a plausible row.
            poison: vec![0xff; (chunk_rows * ROW_LOSS_BYTES) as usize],
        })
    }

    /// Rows per chunk.
    pub fn chunk_rows(&self) -> u64 {
        self.chunk_rows
    }

    /// Queues `logits` with validated targets (see [`crate::validate_targets`]) and returns the
    /// results of every chunk that has completed meanwhile, in input order.
    ///
    /// # Errors
    /// [`Error::Shape`] when the logits' dtype or vocab differ from the stream's, or the target
    /// count differs from the rows; [`Error::Gpu`] on a device error.
    pub fn push(&mut self, logits: Logits<'_>, targets: &[u32]) -> Result<Vec<RowLoss>> {
        if logits.dtype() != self.dtype || logits.vocab() != self.vocab as usize {
            return Err(Error::Shape(format!(
                "stream is {} x {}, pushed {} x {}",
                self.dtype,
                self.vocab,
                logits.dtype(),
                logits.vocab()
            )));
        }
        if targets.len() != logits.rows() {
            return Err(Error::RowMismatch { logits_rows: logits.rows(), targets_rows: targets.len() });
        }
        let mut done = Vec::new();
        let rows = logits.rows() as u64;
        for r0 in (0..rows).step_by(self.chunk_rows as usize) {
            let n = self.chunk_rows.min(rows - r0);
            // Back-pressure: the slot about to be reused must have finished its last chunk.
            if self.in_flight.len() == RING {
                done.extend(self.complete_oldest()?);
            }
            let piece = logits.slice_rows(r0 as usize, (r0 + n) as usize);
            self.submit(piece, &targets[r0 as usize..(r0 + n) as usize])?;
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

    /// Waits for every queued chunk and returns their results, in input order.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn finish(mut self) -> Result<Vec<RowLoss>> {
        let mut done = Vec::new();
        while !self.in_flight.is_empty() {
            done.extend(self.complete_oldest()?);
        }
        Ok(done)
    }

    fn submit(&mut self, logits: Logits<'_>, targets: &[u32]) -> Result<()> {
        let ctx = self.ctx;
        let slot = &self.slots[self.next];
        let n = logits.rows() as u64;
        write_padded(ctx.queue(), &slot.logits, logits.bytes());
        ctx.queue().write_buffer(&slot.targets, 0, bytemuck::cast_slice(targets));
        ctx.queue().write_buffer(&slot.output, 0, &self.poison[..(n * ROW_LOSS_BYTES) as usize]);
        let mut encoder =
            ctx.device().create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("xent stream chunk") });
        ctx.encode(
            &mut encoder,
            &EncodeJob {
                logits: &slot.logits,
                logits_offset: 0,
                dtype: self.dtype,
                row_stride: u64::from(self.vocab),
                rows: n,
                vocab: self.vocab,
                targets: &slot.targets,
                targets_offset: 0,
                ignore: Some(IGNORED_TARGET),
                output: &slot.output,
                output_offset: 0,
            },
        )?;
        encoder.copy_buffer_to_buffer(&slot.output, 0, &slot.readback, 0, n * ROW_LOSS_BYTES);
        let submission = ctx.queue().submit([encoder.finish()]);
        // Ask for the readback now; it resolves when this submission completes.
        let (tx, rx) = mpsc::channel();
        slot.readback.slice(..n * ROW_LOSS_BYTES).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.in_flight.push_back(InFlight { slot: self.next, rows: n, submission, mapped: rx });
        self.next = (self.next + 1) % RING;
        Ok(())
    }

    fn complete_oldest(&mut self) -> Result<Vec<RowLoss>> {
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
    fn read_oldest(&mut self) -> Result<Vec<RowLoss>> {
        // On a device of our own, an error (a failed chunk) lands in the context's store rather
        // than a scope: report it instead of reading a readback buffer the chunk never wrote.
        self.ctx.check_device_errors()?;
        let Some(f) = self.in_flight.pop_front() else { return Ok(Vec::new()) };
        let slot = &self.slots[f.slot];
        let bytes = f.rows * ROW_LOSS_BYTES;
        let out = {
            let view = slot.readback.slice(..bytes).get_mapped_range().map_err(|e| Error::Gpu(e.to_string()))?;
            bytemuck::pod_collect_to_vec::<u8, RowLoss>(&view)
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
