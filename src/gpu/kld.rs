//! The fused KL-divergence kernel (`shaders/kld.wgsl`): its job, its plan, its encoding.
//!
//! Both rows of a pair — base logits `a` and test logits `b`, each f32, f16 or bf16 — are read
//! once, together; one [`KldRow`] per row (KLD, both nlls and Δp with a target, both argmaxes).
//! The maths is [`crate::kld::math`]'s, in f32.

use super::{GpuContext, Job, Kernel, Plan, Side};
use crate::error::Result;
use crate::kld::KldRow;
use crate::problem::{Dtype, IGNORED_TARGET};

/// Bytes of one [`KldRow`] in the output buffer.
pub const KLD_ROW_BYTES: u64 = std::mem::size_of::<KldRow>() as u64;

/// One KLD job over buffers the caller owns: what [`GpuContext::encode_kld`] records.
///
/// Row `r`'s base logits are elements `[r * base_row_stride, r * base_row_stride + vocab)`
/// counted from byte `base_offset` of `base`, little-endian `base_dtype`; the test logits likewise
/// (the two sides may differ in buffer, offset, stride and dtype). Targets are `u32`, one per row,
/// from byte `targets_offset`: a class index, [`crate::kld::NO_TARGET`] (distribution statistics
/// only), or `ignore` (the row is ignored). Results are [`KldRow`] records (32 bytes) from byte
/// `output_offset` of `output`.
#[derive(Debug, Clone, Copy)]
pub struct KldEncodeJob<'a> {
    /// Buffer holding the base logits (usage must include `STORAGE`).
    pub base: &'a wgpu::Buffer,
    /// Byte offset of row 0's first base logit; a multiple of the element size. The buffer must
    /// extend to the 4-byte word holding the last logit.
    pub base_offset: u64,
    /// Element type of the base logits.
    pub base_dtype: Dtype,
    /// Elements between the starts of consecutive base rows (`>= vocab`).
    pub base_row_stride: u64,
    /// Buffer holding the test logits (usage must include `STORAGE`; may be `base`).
    pub test: &'a wgpu::Buffer,
    /// Byte offset of row 0's first test logit; a multiple of the element size.
    pub test_offset: u64,
    /// Element type of the test logits.
    pub test_dtype: Dtype,
    /// Elements between the starts of consecutive test rows (`>= vocab`).
    pub test_row_stride: u64,
    /// Number of rows.
    pub rows: u64,
    /// Logits per row (both sides).
    pub vocab: u32,
    /// Buffer of `u32` targets (usage must include `STORAGE`).
    pub targets: &'a wgpu::Buffer,
    /// Byte offset of row 0's target; a multiple of 4.
    pub targets_offset: u64,
    /// Target value meaning "ignore this row". `None` ignores no valid target (the kernels' own
    /// sentinel, [`crate::IGNORED_TARGET`], still reads as ignored).
    pub ignore: Option<u32>,
    /// Buffer receiving one [`KldRow`] per row (usage must include `STORAGE`).
    pub output: &'a wgpu::Buffer,
    /// Byte offset of row 0's result; a multiple of 32.
    pub output_offset: u64,
}

impl GpuContext {
    /// The layout the KLD kernel will use for `rows` row pairs of `vocab` logits: the planner of
    /// [`GpuContext::plan`] (rows per workgroup for short rows, split rows for few long ones,
    /// subgroup reduction where the device has it), with the same thresholds: a KLD element costs
    /// three `exp`s against the forward kernel's one, but reads twice the bytes, so the balance
    /// of memory and arithmetic per part is alike.
    pub fn plan_kld(&self, rows: u64, vocab: u32) -> Plan {
        self.plan_with(Kernel::Kld, rows, vocab, 32_768, 16_384)
    }

    /// Most row pairs one KLD dispatch covers: limited by the storage binding (each side's
    /// logits, the outputs) and the 2-D dispatch size.
    ///
    /// # Errors
    /// [`crate::Error::Shape`] when not even one row of a side fits a binding.
    pub fn rows_per_chunk_kld(&self, base: (Dtype, u64), test: (Dtype, u64), vocab: u64) -> Result<u64> {
        self.rows_per_chunk_for(Kernel::Kld, &[base, test], vocab)
    }

    /// Records the fused KLD kernel over `job` into `encoder`: no submit, no sync, no copy.
    /// Chunked automatically when the job exceeds a binding or a dispatch.
    ///
    /// Targets are not validated here: one `>= vocab` (other than [`crate::kld::NO_TARGET`] and
    /// the ignore value) gives NaN `nll_base`, `nll_test` and `dp` and the
    /// [`KldRow::BAD_TARGET`] flag for its row.
    ///
    /// # Errors
    /// [`crate::Error::Buffer`] when a region lies outside its buffer, is misaligned, or a buffer
    /// lacks `STORAGE` usage; [`crate::Error::Shape`] when `vocab` is 0, a row stride is less than
    /// `vocab`, or one row is larger than a binding.
    pub fn encode_kld(&self, encoder: &mut wgpu::CommandEncoder, job: &KldEncodeJob<'_>) -> Result<()> {
        self.encode_kld_timed(encoder, job, None)
    }

    /// [`GpuContext::encode_kld`], with the compute pass writing `timestamps` at its start and
    /// end (the device needs `Features::TIMESTAMP_QUERY`).
    ///
    /// # Errors
    /// As [`GpuContext::encode_kld`].
    pub fn encode_kld_timed(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        job: &KldEncodeJob<'_>,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        let base = Side {
            name: "base",
            buffer: job.base,
            offset: job.base_offset,
            dtype: job.base_dtype,
            row_stride: job.base_row_stride,
        };
        let test = Side {
            name: "test",
            buffer: job.test,
            offset: job.test_offset,
            dtype: job.test_dtype,
            row_stride: job.test_row_stride,
        };
        let inner = Job {
            kernel: Kernel::Kld,
            sides: [Some(base), Some(test)],
            rows: job.rows,
            vocab: job.vocab,
            targets: job.targets,
            targets_offset: job.targets_offset,
            ignore: job.ignore.unwrap_or(IGNORED_TARGET),
            output: job.output,
            output_offset: job.output_offset,
        };
        self.encode_job(encoder, &inner, |rows| self.plan_kld(rows, job.vocab), timestamps)
    }
}
