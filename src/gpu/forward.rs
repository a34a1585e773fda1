//! The fused cross-entropy kernel (`shaders/forward.wgsl`): its job, its plan, its encoding.
//!
//! One pass per row: online max and sum of exponentials, the target's logit and the first
//! argmax; one [`RowLoss`] per row.

use super::{GpuContext, Job, Kernel, Plan, Side};
use crate::error::Result;
use crate::problem::{Dtype, RowLoss, IGNORED_TARGET};

/// Bytes of one [`RowLoss`] in the output buffer.
pub const ROW_LOSS_BYTES: u64 = std::mem::size_of::<RowLoss>() as u64;

/// One scoring job over buffers the caller owns: what [`GpuContext::encode`] records.
///
/// Row `r`'s logits are elements `[r * row_stride, r * row_stride + vocab)` counted from byte
/// `logits_offset` of `logits`, little-endian `dtype`. Targets are `u32`, one per row, from byte
/// `targets_offset`; a target equal to `ignore` marks the row ignored. Results are [`RowLoss`]
/// records (16 bytes) from byte `output_offset` of `output`.
#[derive(Debug, Clone, Copy)]
pub struct EncodeJob<'a> {
    /// Buffer holding the logits (usage must include `STORAGE`).
    pub logits: &'a wgpu::Buffer,
    /// Byte offset of row 0's first logit; a multiple of the element size. The buffer must extend
    /// to the 4-byte word holding the last logit (f16/bf16 logits are read as whole words).
    pub logits_offset: u64,
    /// Element type of the logits.
    pub dtype: Dtype,
    /// Elements between the starts of consecutive rows (`>= vocab`).
    pub row_stride: u64,
    /// Number of rows.
    pub rows: u64,
    /// Logits per row.
    pub vocab: u32,
    /// Buffer of `u32` targets (usage must include `STORAGE`).
    pub targets: &'a wgpu::Buffer,
    /// Byte offset of row 0's target; a multiple of 4.
    pub targets_offset: u64,
    /// Target value meaning "ignore this row". `None` ignores no valid target (the kernel's own
    /// sentinel, `u32::MAX`, still reads as ignored).
    pub ignore: Option<u32>,
    /// Buffer receiving one [`RowLoss`] per row (usage must include `STORAGE`).
    pub output: &'a wgpu::Buffer,
    /// Byte offset of row 0's result; a multiple of 16.
    pub output_offset: u64,
}

impl GpuContext {
    /// The layout the forward kernel will use for `rows` rows of `vocab` logits.
    ///
    /// Short rows are packed several to a workgroup (about one lane per 16 logits); when rows
    /// are too few to give 1024 workgroups and are long, each is split over several
    /// workgroups of at least 16k logits and merged by a second pass; subgroup operations
    /// reduce whenever the device has them and a workgroup holds one row part.
    pub fn plan(&self, rows: u64, vocab: u32) -> Plan {
        // Parts of at least 16k logits: smaller ones measured slower on lavapipe (8 x 32000 f32:
        // 1.47 ms split 7 ways, 0.58 ms whole) and gain nothing on a GPU, where 16k logits
        // already give each of 256 invocations 16 vector loads.
        self.plan_with(Kernel::Forward, rows, vocab, 32_768, 16_384)
    }

    /// Most rows one dispatch covers for a given layout: limited by the storage binding (logits,
    /// outputs) and the 2-D dispatch size. Larger jobs are split into chunks of this many rows.
    ///
    /// # Errors
    /// [`crate::Error::Shape`] when not even one row fits a binding.
    pub fn rows_per_chunk(&self, dtype: Dtype, row_stride: u64, vocab: u64) -> Result<u64> {
        self.rows_per_chunk_for(Kernel::Forward, &[(dtype, row_stride)], vocab)
    }

    /// Records the fused forward kernel over `job` into `encoder`: no submit, no sync, no copy.
    /// Chunked automatically when the job exceeds a binding or a dispatch.
    ///
    /// Targets are not validated here (they live on the device): an out-of-range target gives a
    /// NaN `nll` and the [`RowLoss::BAD_TARGET`] flag for its row.
    ///
    /// # Errors
    /// [`crate::Error::Buffer`] when a region lies outside its buffer, is misaligned, or a buffer
    /// lacks `STORAGE` usage; [`crate::Error::Shape`] when `vocab` is 0, `row_stride < vocab`, or
    /// one row is larger than a binding.
    pub fn encode(&self, encoder: &mut wgpu::CommandEncoder, job: &EncodeJob<'_>) -> Result<()> {
        self.encode_timed(encoder, job, None)
    }

    /// [`GpuContext::encode`], with the compute pass writing `timestamps` at its start and end
    /// (the device needs `Features::TIMESTAMP_QUERY`). All chunks share one pass, so the two
    /// timestamps bracket the whole job.
    ///
    /// # Errors
    /// As [`GpuContext::encode`].
    pub fn encode_timed(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        job: &EncodeJob<'_>,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        let side = Side {
            name: "logits",
            buffer: job.logits,
            offset: job.logits_offset,
            dtype: job.dtype,
            row_stride: job.row_stride,
        };
        let inner = Job {
            kernel: Kernel::Forward,
            sides: [Some(side), None],
            rows: job.rows,
            vocab: job.vocab,
            targets: job.targets,
            targets_offset: job.targets_offset,
            ignore: job.ignore.unwrap_or(IGNORED_TARGET),
            output: job.output,
            output_offset: job.output_offset,
        };
        self.encode_job(encoder, &inner, |rows| self.plan(rows, job.vocab), timestamps)
    }
}
