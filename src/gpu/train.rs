//! The fused loss-and-gradient kernel (`shaders/train.wgsl`): its job, its plan, its encoding, and
//! its host-slice entry points.
//!
//! Per row, pass 1 reads the logits once for the online max and sum of exponentials (and, with
//! label smoothing, `Σ w_j z_j` kept relative to the running max) and writes a [`TrainRow`];
//! pass 2 reads them again and writes `∂L/∂logits` in the logits' dtype (computed in f32), over
//! the logits themselves or into another buffer. The maths is [`crate::train`]'s.
//!
//! Plans are those of the forward kernel: short rows share a workgroup; long rows too few to fill
//! the device are split over several workgroups — pass 1 per part, `combine` per row, then pass 2
//! per part (`grad`) — so a single row of 256000 logits still spreads over the whole GPU; an
//! unsplit row does both passes in one workgroup, back to back. 16-bit words shared by two rows
//! are written by a last small pass (`edges`): see the shader's header.

use std::ops::Range;
use std::sync::mpsc;

use wgpu::util::DeviceExt;

use super::{buffer_entry, check_region, grid, layout_entry, Entry, GpuContext, Kernel, Params, PipelineKey, Plan};
use crate::error::{Error, Result};
use crate::problem::{Dtype, Logits, Targets, IGNORED_TARGET};
use crate::train::{prepare, reduce, LossOptions, LossOutput, Prepared, TrainRow, Upstream};

/// Bytes of one [`TrainRow`] in the output buffer.
pub const TRAIN_ROW_BYTES: u64 = std::mem::size_of::<TrainRow>() as u64;

/// Where [`GpuContext::encode_loss_and_grad`] writes the gradient.
#[derive(Debug, Clone, Copy)]
pub enum GradOutput<'a> {
    /// No gradient: only the per-row loss and lse (one read of the logits).
    None,
    /// Over the logits, in place: the logits buffer is bound read-write and each row's logits are
    /// replaced by their gradient (same dtype, offset and stride). Nothing outside the rows changes.
    InPlace,
    /// Into a region of a buffer, in the logits' dtype: row `r`'s gradient is elements
    /// `[r * row_stride, r * row_stride + vocab)` from byte `offset`.
    ///
    /// The buffer may be the logits' own (engines sub-allocate tensors from shared buffers) when
    /// the two regions — from the word holding each one's first element to the word holding its
    /// last — do not overlap, and both fit one storage binding together (the span from the lower
    /// region's start to the higher one's end, per chunk of rows): the logits are then bound
    /// read-write once, as in place.
    Buffer {
        /// Buffer receiving the gradient (usage must include `STORAGE`); not one holding
        /// targets, scales, weights or results.
        buffer: &'a wgpu::Buffer,
        /// Byte offset of row 0's first gradient element; a multiple of the element size. For
        /// 16-bit dtypes, the same element parity as `logits_offset` (see [`TrainEncodeJob`]).
        offset: u64,
        /// Elements between the starts of consecutive rows (`>= vocab`); for 16-bit dtypes, the
        /// same parity as the logits' `row_stride`.
        row_stride: u64,
    },
}

/// Per-class weights on the device: `vocab` little-endian f32 from byte `offset` of `buffer`.
#[derive(Debug, Clone, Copy)]
pub struct ClassWeights<'a> {
    /// Buffer holding the weights (usage must include `STORAGE`).
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset of class 0's weight; a multiple of 4.
    pub offset: u64,
}

/// One loss-and-gradient job over buffers the caller owns: what
/// [`GpuContext::encode_loss_and_grad`] records.
///
/// Layout, as [`crate::EncodeJob`]: row `r`'s logits are elements
/// `[r * row_stride, r * row_stride + vocab)` counted from byte `logits_offset` of `logits`,
/// little-endian `dtype`. Per row, from
/// their offsets: a `u32` target (`ignore` marks the row ignored), an f32 **scale** — the factor
/// the row's gradient is multiplied by: the upstream gradient, divided by the mean's denominator
/// for a mean, 0 for ignored rows ([`crate::train::prepare`] computes them) — and one
/// [`TrainRow`] written to `output`. The options are [`LossOptions`]' (the reduction lives in the
/// scales); the class weights, when given, are a device buffer.
///
/// Invariants, checked by [`GpuContext::encode_loss_and_grad`] ([`Error::Buffer`] unless said):
/// - every buffer has `STORAGE` usage and holds its region; the logits (and a separate gradient)
///   extend to the 4-byte word holding their last element;
/// - `logits_offset` (and a gradient's offset) are multiples of the element size;
///   `targets_offset`, `scale_offset` and the weights' offset of 4; `output_offset` of 8;
/// - [`Error::Shape`]: `vocab > 0`; with more than one row, every row stride `>= vocab`; a row
///   (and the weights) fit one storage binding;
/// - for f16/bf16 with a separate gradient, `offset / 2 ≡ logits_offset / 2` and `row_stride ≡
///   logits row_stride` (mod 2): a gradient element shares its word with the same neighbour as
///   its logit;
/// - a buffer written by the job (`output`, the gradient's buffer — the logits in place) is not
///   also bound for anything else: not read-only elsewhere (wgpu refuses that in one dispatch)
///   and not twice writable (bindings would alias); the one exception is a gradient in the
///   logits' buffer, in a region apart from theirs (see [`GradOutput::Buffer`]);
/// - [`Error::Argument`]: `label_smoothing` in `[0, 1]`, `z_loss` finite and `>= 0`, `softcap`
///   finite and `> 0`.
///
/// Targets and weights are not validated (they live on the device): a target `>= vocab` other
/// than `ignore` gives the row a NaN loss and a NaN gradient.
#[derive(Debug, Clone, Copy)]
pub struct TrainEncodeJob<'a> {
    /// Buffer holding the logits (usage must include `STORAGE`).
    pub logits: &'a wgpu::Buffer,
    /// Byte offset of row 0's first logit; a multiple of the element size.
    pub logits_offset: u64,
    /// Element type of the logits (and of the gradient).
    pub dtype: Dtype,
    /// Elements between the starts of consecutive rows (`>= vocab`).
    pub row_stride: u64,
    /// Number of rows.
    pub rows: u64,
    /// Logits per row.
    pub vocab: u32,
    /// Buffer of `u32` targets.
    pub targets: &'a wgpu::Buffer,
    /// Byte offset of row 0's target; a multiple of 4.
    pub targets_offset: u64,
    /// Target value meaning "ignore this row" (loss 0, gradient 0). `None` ignores no valid
    /// target ([`IGNORED_TARGET`] still reads as ignored).
    pub ignore: Option<u32>,
    /// Buffer of f32 per-row gradient scales.
    pub scale: &'a wgpu::Buffer,
    /// Byte offset of row 0's scale; a multiple of 4.
    pub scale_offset: u64,
    /// Class weights (`None`: all 1).
    pub weight: Option<ClassWeights<'a>>,
    /// Label smoothing ε in `[0, 1]`.
    pub label_smoothing: f32,
    /// z-loss coefficient (`c · lse²` per row).
    pub z_loss: f32,
    /// Soft-cap of the logits.
    pub softcap: Option<f32>,
    /// Buffer receiving one [`TrainRow`] per row.
    pub output: &'a wgpu::Buffer,
    /// Byte offset of row 0's result; a multiple of 8.
    pub output_offset: u64,
    /// Where the gradient goes.
    pub grad: GradOutput<'a>,
}

/// Flags of the shader's `TrainParams`.
const WRITE_GRAD: u32 = 2;
const WEIGHT_TOTAL_BUFFER: u32 = 4;

/// `PipelineKey::features` of the training kernel: the options compiled in (the shader's
/// `SMOOTHING`, `SOFTCAP` and `WEIGHTED` override constants).
pub(super) const FEATURE_SMOOTHING: u32 = 1;
pub(super) const FEATURE_SOFTCAP: u32 = 2;
pub(super) const FEATURE_WEIGHTED: u32 = 4;

/// The override constants of `features` for `kernel` (none but for the training kernel).
pub(super) fn feature_constants(kernel: Kernel, features: u32) -> Vec<(&'static str, f64)> {
    match kernel {
        Kernel::TrainSeparate | Kernel::TrainInPlace => {
            [("SMOOTHING", FEATURE_SMOOTHING), ("SOFTCAP", FEATURE_SOFTCAP), ("WEIGHTED", FEATURE_WEIGHTED)]
                .iter()
                .map(|&(name, bit)| (name, if features & bit != 0 { 1.0 } else { 0.0 }))
                .collect()
        }
        Kernel::Forward | Kernel::Kld => Vec::new(),
    }
}

/// Mirror of the shader's `TrainParams`: the shared [`Params`], then the loss options.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct TrainParams {
    base: Params,
    label_smoothing: f32,
    z_loss: f32,
    softcap: f32,
    weight_total: f32,
    scale_offset: u32,
    weight_offset: u32,
    flags: u32,
    pad: u32,
}

/// Bindings of the training kernels (see `shaders/train.wgsl`): 0 and 7 the uniform (two views),
/// 1 the logits (read-write in place), 2 targets, 3 results, 4 scales, 5 partials, 6 a separate
/// gradient, 8 class weights, 9 their sum. At most eight storage buffers: WebGPU's default limit.
pub(super) fn layout_entries(in_place: bool) -> Vec<wgpu::BindGroupLayoutEntry> {
    use wgpu::BufferBindingType as B;
    let read = B::Storage { read_only: true };
    let write = B::Storage { read_only: false };
    let mut entries = vec![
        layout_entry(0, B::Uniform),
        layout_entry(1, if in_place { write } else { read }),
        layout_entry(2, read),
        layout_entry(3, write),
        layout_entry(4, read),
        layout_entry(5, write),
        layout_entry(7, B::Uniform),
        layout_entry(8, read),
        layout_entry(9, write),
    ];
    if !in_place {
        entries.push(layout_entry(6, write));
    }
    entries
}

impl GpuContext {
    /// The layout the training kernel will use for `rows` rows of `vocab` logits: the forward
    /// kernel's planner ([`GpuContext::plan`]) with its thresholds. A split row costs two extra
    /// small passes (`combine`, and pass 2 reading the row's lse back), which its parts amortise.
    pub fn plan_train(&self, rows: u64, vocab: u32) -> Plan {
        self.plan_with(Kernel::TrainSeparate, rows, vocab, 32_768, 16_384)
    }

    /// Most rows one training dispatch covers for dense rows of `vocab` logits (the gradient in
    /// place): limited by the storage binding and the 2-D dispatch size.
    ///
    /// # Errors
    /// [`Error::Shape`] when one row exceeds a binding.
    pub fn rows_per_chunk_train(&self, dtype: Dtype, vocab: u64) -> Result<u64> {
        self.rows_per_chunk_for(Kernel::TrainInPlace, &[(dtype, vocab)], vocab)
    }

    /// Records the fused loss-and-gradient kernel over `job` into `encoder`: no submit, no sync,
    /// no copy. Chunked automatically when the job exceeds a binding or a dispatch; every pass
    /// of every chunk goes in one compute pass.
    ///
    /// # Errors
    /// [`Error::Buffer`], [`Error::Shape`] or [`Error::Argument`] when an invariant of
    /// [`TrainEncodeJob`] does not hold.
    pub fn encode_loss_and_grad(&self, encoder: &mut wgpu::CommandEncoder, job: &TrainEncodeJob<'_>) -> Result<()> {
        self.encode_loss_and_grad_timed(encoder, job, None)
    }

    /// [`GpuContext::encode_loss_and_grad`], with the compute pass writing `timestamps` at its
    /// start and end (the device needs `Features::TIMESTAMP_QUERY`).
    ///
    /// # Errors
    /// As [`GpuContext::encode_loss_and_grad`].
    pub fn encode_loss_and_grad_timed(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        job: &TrainEncodeJob<'_>,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        let vocab = u64::from(job.vocab);
        let es = job.dtype.size() as u64;
        if vocab == 0 {
            return Err(Error::Shape("vocab is 0".into()));
        }
        crate::train::check_scalars(job.label_smoothing, job.z_loss, job.softcap)?;
        // A gradient in its own region of the logits' buffer is written by the in-place kernel
        // (one read-write binding spanning both regions), at its own offsets.
        let shared = matches!(job.grad, GradOutput::Buffer { buffer, .. } if buffer == job.logits);
        let (kernel, grad) = match job.grad {
            GradOutput::None => (Kernel::TrainSeparate, None),
            GradOutput::InPlace => (Kernel::TrainInPlace, Some((job.logits, job.logits_offset, job.row_stride))),
            GradOutput::Buffer { buffer, offset, row_stride } => {
                (if shared { Kernel::TrainInPlace } else { Kernel::TrainSeparate }, Some((buffer, offset, row_stride)))
            }
        };
        for (name, stride) in [("logits", Some(job.row_stride)), ("gradient", grad.map(|g| g.2))] {
            let Some(stride) = stride else { continue };
            if stride < vocab && job.rows > 1 {
                return Err(Error::Shape(format!("{name} row_stride {stride} is less than vocab {vocab}")));
            }
            if stride > u64::from(u32::MAX) {
                return Err(Error::Shape(format!("{name} row_stride {stride} does not fit in u32")));
            }
        }
        if job.rows == 0 {
            return Ok(());
        }
        if !job.logits_offset.is_multiple_of(es) || grad.is_some_and(|g| !g.1.is_multiple_of(es)) {
            return Err(Error::Buffer("logits and gradient offsets must be multiples of the element size".into()));
        }
        let weight_offset = job.weight.map_or(0, |w| w.offset);
        if !job.targets_offset.is_multiple_of(4)
            || !job.scale_offset.is_multiple_of(4)
            || !weight_offset.is_multiple_of(4)
            || !job.output_offset.is_multiple_of(TRAIN_ROW_BYTES)
        {
            return Err(Error::Buffer(format!(
                "targets, scale and weight offsets must be multiples of 4, output_offset of {TRAIN_ROW_BYTES}"
            )));
        }
        if let (GradOutput::Buffer { offset, row_stride, .. }, 2) = (job.grad, es) {
            if (offset / 2 + job.logits_offset / 2) % 2 == 1 || ((row_stride + job.row_stride) % 2 == 1 && job.rows > 1)
            {
                return Err(Error::Buffer(
                    "a 16-bit gradient must have the logits' element parity: offset / 2 and row_stride \
                     congruent mod 2 to the logits'"
                        .into(),
                ));
            }
        }
        // Aliasing: a buffer the job writes is bound once, never beside another view of itself.
        let in_place = matches!(job.grad, GradOutput::InPlace) || shared;
        let mut bound: Vec<(&str, &wgpu::Buffer, bool)> = vec![
            ("logits", job.logits, in_place),
            ("targets", job.targets, false),
            ("scale", job.scale, false),
            ("output", job.output, true),
        ];
        if let Some(w) = job.weight {
            bound.push(("weight", w.buffer, false));
        }
        if let (GradOutput::Buffer { buffer, .. }, false) = (job.grad, shared) {
            bound.push(("gradient", buffer, true));
        }
        for (i, (a, abuf, awrite)) in bound.iter().enumerate() {
            for (b, bbuf, bwrite) in &bound[i + 1..] {
                if (*awrite || *bwrite) && abuf == bbuf {
                    return Err(Error::Buffer(format!(
                        "the {a} and {b} buffers are one buffer, which the job writes: use separate buffers"
                    )));
                }
            }
        }
        let overflow = || Error::Buffer("a region's end overflows u64".into());
        let end_of = |offset: u64, stride: u64| {
            (job.rows - 1)
                .checked_mul(stride)
                .and_then(|e| e.checked_add(vocab))
                .and_then(|e| e.checked_mul(es))
                .and_then(|e| e.checked_add(offset))
                .ok_or_else(overflow)
        };
        let per_row = |offset: u64, bytes: u64| {
            job.rows.checked_mul(bytes).and_then(|b| b.checked_add(offset)).ok_or_else(overflow)
        };
        let logits_end = end_of(job.logits_offset, job.row_stride)?.next_multiple_of(4);
        check_region("logits", job.logits, logits_end)?;
        if let GradOutput::Buffer { buffer, offset, row_stride } = job.grad {
            let grad_end = end_of(offset, row_stride)?.next_multiple_of(4);
            check_region("gradient", buffer, grad_end)?;
            // Whole words: a word holding an element of each would be rewritten under a reader.
            if shared && offset / 4 * 4 < logits_end && job.logits_offset / 4 * 4 < grad_end {
                return Err(Error::Buffer(format!(
                    "the gradient's region (bytes {offset}..{grad_end}) overlaps the logits' ({}..{logits_end}) \
                     in their shared buffer: use GradOutput::InPlace, or regions apart",
                    job.logits_offset
                )));
            }
        }
        check_region("targets", job.targets, per_row(job.targets_offset, 4)?)?;
        check_region("scale", job.scale, per_row(job.scale_offset, 4)?)?;
        check_region("output", job.output, per_row(job.output_offset, TRAIN_ROW_BYTES)?)?;
        if let Some(w) = job.weight {
            check_region("weight", w.buffer, w.offset.checked_add(4 * vocab).ok_or_else(overflow)?)?;
        }

        let align = u64::from(self.device.limits().min_storage_buffer_offset_alignment);
        if 4 * vocab + align + 4 > self.max_binding {
            return Err(Error::Shape(format!("{vocab} class weights exceed this adapter's largest storage binding")));
        }
        let mut layout = vec![(job.dtype, job.row_stride)];
        if let GradOutput::Buffer { row_stride, .. } = job.grad {
            layout.push((job.dtype, row_stride));
        }
        let mut chunk = self.rows_per_chunk_for(kernel, &layout, vocab)?;
        if let (GradOutput::Buffer { offset, row_stride, .. }, true) = (job.grad, shared) {
            // One binding spans both regions' rows of a chunk: at most the widest distance between
            // a row's logits and its gradient (at the first or last row) plus the rows themselves.
            let start_gap = |r: u64| {
                let a = i128::from(job.logits_offset) + i128::from(r) * i128::from(job.row_stride * es);
                let b = i128::from(offset) + i128::from(r) * i128::from(row_stride * es);
                (a - b).unsigned_abs()
            };
            let gap = start_gap(0).max(start_gap(job.rows - 1));
            let stride = job.row_stride.max(row_stride).max(1);
            let room = u128::from(self.max_binding.saturating_sub(align + 4));
            let fits = room.checked_sub(gap + u128::from(vocab * es)).map(|left| left / u128::from(stride * es) + 1);
            match fits {
                Some(rows) => chunk = chunk.min(rows.min(u128::from(u64::MAX)) as u64),
                None => {
                    return Err(Error::Buffer(format!(
                        "the gradient's region is {gap} bytes from the logits' in their shared buffer: \
                         together they exceed this adapter's largest storage binding ({} bytes); use another buffer",
                        self.max_binding
                    )))
                }
            }
        }
        let n_chunks = job.rows.div_ceil(chunk);
        let params_size = std::mem::size_of::<Params>() as u64;
        let train_size = std::mem::size_of::<TrainParams>() as u64;
        let uniform_stride =
            train_size.next_multiple_of(u64::from(self.device.limits().min_uniform_buffer_offset_alignment));
        let smoothing = job.label_smoothing > 0.0;
        let flags =
            grad.map_or(0, |_| WRITE_GRAD) | if job.weight.is_some() && smoothing { WEIGHT_TOTAL_BUFFER } else { 0 };
        let features = if smoothing { FEATURE_SMOOTHING } else { 0 }
            | if job.softcap.is_some() { FEATURE_SOFTCAP } else { 0 }
            | if job.weight.is_some() { FEATURE_WEIGHTED } else { 0 };
        let weights_window = job.weight.map(|w| self.window(w.buffer, w.offset, w.offset + 4 * vocab, 4));

        struct ChunkPlan {
            plan: Plan,
            rows: u64,
            windows: [super::Window; 4],
            grad: Option<super::Window>,
            groups: (u32, u32),
            edges: bool,
        }
        let mut uniform_bytes = vec![0u8; (n_chunks * uniform_stride) as usize];
        let mut chunks = Vec::with_capacity(n_chunks as usize);
        let mut partial_count = 0u64;
        for c in 0..n_chunks {
            let r0 = c * chunk;
            let rows = chunk.min(job.rows - r0);
            let plan = self.plan_train(rows, job.vocab);
            let split_len = job.vocab.div_ceil(plan.split).next_multiple_of(8);
            let split = job.vocab.div_ceil(split_len);
            let plan = Plan { split, ..plan };
            // Every row keeps its final state there, split or not (the shader's `finish`).
            partial_count = partial_count.max(rows * u64::from(split));
            let rows_window = |buffer, offset: u64, stride: u64| {
                let start = offset + r0 * stride * es;
                self.window(buffer, start, start + ((rows - 1) * stride + vocab) * es, es)
            };
            let per_row_window = |buffer, offset: u64, bytes: u64| {
                self.window(buffer, offset + r0 * bytes, offset + (r0 + rows) * bytes, bytes)
            };
            let mut logits = rows_window(job.logits, job.logits_offset, job.row_stride);
            let grad_window = match job.grad {
                GradOutput::Buffer { buffer, offset, row_stride } => Some(rows_window(buffer, offset, row_stride)),
                _ => None,
            };
            // Shared: one window over both regions, each side's first element counted from it.
            let mut shared_b_first = None;
            if let (true, Some(g)) = (shared, &grad_window) {
                let (a0, b0) = (logits.offset + logits.first * es, g.offset + g.first * es);
                let start = logits.offset.min(g.offset);
                let end = (logits.offset + logits.size).max(g.offset + g.size);
                logits = super::Window { offset: start, size: end - start, first: (a0 - start) / es };
                shared_b_first = Some((b0 - start) / es);
            }
            let grad_window = if shared { None } else { grad_window };
            let targets = per_row_window(job.targets, job.targets_offset, 4);
            let scale = per_row_window(job.scale, job.scale_offset, 4);
            let output = per_row_window(job.output, job.output_offset, TRAIN_ROW_BYTES);
            let (b_offset, b_stride) = match (&grad_window, job.grad, shared_b_first) {
                (_, GradOutput::Buffer { row_stride, .. }, Some(first)) => (first, row_stride),
                (Some(w), GradOutput::Buffer { row_stride, .. }, _) => (w.first, row_stride),
                _ => (logits.first, job.row_stride),
            };
            let groups = grid((rows * u64::from(split)).div_ceil(u64::from(plan.rows_per_workgroup)));
            let params = TrainParams {
                base: Params {
                    rows: rows as u32,
                    vocab: job.vocab,
                    targets_offset: targets.first as u32,
                    out_offset: output.first as u32,
                    ignore: job.ignore.unwrap_or(IGNORED_TARGET),
                    groups_x: groups.0,
                    split,
                    split_len,
                    a_offset: logits.first as u32,
                    a_stride: job.row_stride as u32,
                    b_offset: b_offset as u32,
                    b_stride: b_stride as u32,
                },
                label_smoothing: job.label_smoothing,
                z_loss: job.z_loss,
                softcap: job.softcap.unwrap_or(0.0),
                weight_total: if job.weight.is_some() { 0.0 } else { job.vocab as f32 },
                scale_offset: scale.first as u32,
                weight_offset: weights_window.as_ref().map_or(0, |w| w.first as u32),
                flags,
                pad: 0,
            };
            let slot = (c * uniform_stride) as usize;
            uniform_bytes[slot..slot + train_size as usize].copy_from_slice(bytemuck::bytes_of(&params));
            // Words two rows of this dispatch share exist only for 16-bit gradients of dense rows
            // with an odd vocabulary or an odd first element (the shader's `shares_with_next`).
            let edges =
                grad.is_some() && es == 2 && rows > 1 && b_stride == vocab && (vocab % 2 == 1 || b_offset % 2 == 1);
            chunks.push(ChunkPlan {
                plan,
                rows,
                windows: [logits, targets, scale, output],
                grad: grad_window,
                groups,
                edges,
            });
        }

        let device = &self.device;
        let uniforms = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("xent train params"),
            contents: &uniform_bytes,
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let small = |label: &str| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let weight_total = small("xent train class weight sum");
        let no_weights = job.weight.is_none().then(|| small("xent train no class weights"));
        let no_grad = matches!(job.grad, GradOutput::None).then(|| small("xent train no gradient"));
        let partials = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("xent train row states"),
            size: (partial_count * kernel.partial_bytes()).next_multiple_of(16),
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });

        let layout = &self.modules(kernel).layout;
        let key = |plan: &Plan, entry: Entry| PipelineKey {
            kernel,
            dtypes: [job.dtype, job.dtype],
            workgroup_size: self.workgroup_size,
            rows_per_workgroup: if entry == Entry::Main { plan.rows_per_workgroup } else { 1 },
            reduction: if entry == Entry::Main { plan.reduction } else { super::Reduction::Workgroup },
            entry,
            features,
        };
        let name = kernel.name();
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(&format!("xent {name}")),
            timestamp_writes: timestamps,
        });
        for (c, ch) in chunks.iter().enumerate() {
            let [logits, targets, scale, output] = &ch.windows;
            let slot = c as u64 * uniform_stride;
            let mut entries = vec![
                buffer_entry(0, &uniforms, slot, params_size),
                buffer_entry(1, job.logits, logits.offset, logits.size),
                buffer_entry(2, job.targets, targets.offset, targets.size),
                buffer_entry(3, job.output, output.offset, output.size),
                buffer_entry(4, job.scale, scale.offset, scale.size),
                buffer_entry(5, &partials, 0, partials.size()),
                buffer_entry(7, &uniforms, slot, train_size),
                buffer_entry(9, &weight_total, 0, 16),
            ];
            entries.push(match (&weights_window, job.weight, &no_weights) {
                (Some(w), Some(cw), _) => buffer_entry(8, cw.buffer, w.offset, w.size),
                (_, _, Some(none)) => buffer_entry(8, none, 0, 16),
                _ => unreachable!("weights or their placeholder"),
            });
            match (job.grad, &ch.grad, &no_grad) {
                (GradOutput::Buffer { buffer, .. }, Some(w), _) => {
                    entries.push(buffer_entry(6, buffer, w.offset, w.size))
                }
                (GradOutput::None, _, Some(none)) => entries.push(buffer_entry(6, none, 0, 16)),
                _ => {} // in place, or in the logits' buffer: no binding 6
            }
            let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&format!("xent {name} bind group")),
                layout,
                entries: &entries,
            });
            pass.set_bind_group(0, &bind_group, &[]);
            if c == 0 && flags & WEIGHT_TOTAL_BUFFER != 0 && grad.is_some() {
                pass.set_pipeline(&self.pipeline(key(&ch.plan, Entry::SumWeights)));
                pass.dispatch_workgroups(1, 1, 1);
            }
            pass.set_pipeline(&self.pipeline(key(&ch.plan, Entry::Main)));
            pass.dispatch_workgroups(ch.groups.0, ch.groups.1, 1);
            if ch.plan.split > 1 {
                let combine = grid(ch.rows.div_ceil(64));
                pass.set_pipeline(&self.pipeline(key(&ch.plan, Entry::Combine)));
                pass.dispatch_workgroups(combine.0, combine.1, 1);
                if grad.is_some() {
                    pass.set_pipeline(&self.pipeline(key(&ch.plan, Entry::Grad)));
                    pass.dispatch_workgroups(ch.groups.0, ch.groups.1, 1);
                }
            }
            if ch.edges {
                let edges = grid((ch.rows - 1).div_ceil(64));
                pass.set_pipeline(&self.pipeline(key(&ch.plan, Entry::Edges)));
                pass.dispatch_workgroups(edges.0, edges.1, 1);
            }
        }
        Ok(())
    }

    /// Loss and gradient of host logits on the GPU: validates everything ([`prepare`]), uploads
    /// the rows in chunks that fit the bindings (through a ring, so that upload, kernel and
    /// readback overlap), computes, and reads back the per-row results and — when `grad` is given
    /// (same dtype and length as the logits' bytes) — the gradient into it. On the device each
    /// chunk's gradient is written over its own logits: one buffer per chunk, not two.
    ///
    /// # Errors
    /// As [`prepare`]; [`Error::Shape`] when `grad` is not as long as the logits or a row exceeds
    /// a binding; [`Error::Gpu`] if the device reports an error.
    pub fn loss_and_grad(
        &self,
        logits: Logits<'_>,
        targets: Targets<'_>,
        opts: &LossOptions<'_>,
        upstream: Upstream<'_>,
        grad: Option<&mut [u8]>,
    ) -> Result<LossOutput> {
        let prepared = prepare(logits, targets, opts, upstream)?;
        if let Some(g) = &grad {
            if g.len() != logits.bytes().len() {
                return Err(Error::Shape(format!(
                    "the gradient holds {} bytes for {} bytes of logits",
                    g.len(),
                    logits.bytes().len()
                )));
            }
        }
        let shape = HostShape { dtype: logits.dtype(), rows: logits.rows(), vocab: logits.vocab() };
        self.loss_and_grad_host(shape, opts, &prepared, HostIo::Separate { logits: logits.bytes(), grad })
    }

    /// [`GpuContext::loss_and_grad`] with the gradient written back over `logits` (host bytes of
    /// `dtype`, `vocab` per row, row-major): no second host buffer. On the device the kernel
    /// writes over the logits buffer itself.
    ///
    /// # Errors
    /// As [`GpuContext::loss_and_grad`]; [`Error::Shape`] when the bytes are not whole rows.
    pub fn loss_and_grad_in_place(
        &self,
        logits: &mut [u8],
        dtype: Dtype,
        vocab: usize,
        targets: Targets<'_>,
        opts: &LossOptions<'_>,
        upstream: Upstream<'_>,
    ) -> Result<LossOutput> {
        let row_bytes = vocab.checked_mul(dtype.size()).filter(|&b| b > 0);
        let rows = row_bytes.map_or(0, |b| logits.len() / b);
        let (shape, prepared) = {
            let x = Logits::from_bytes(logits, dtype, rows, vocab)?;
            (HostShape { dtype, rows, vocab }, prepare(x, targets, opts, upstream)?)
        };
        self.loss_and_grad_host(shape, opts, &prepared, HostIo::InPlace(logits))
    }

    /// The ring behind the host entry points: [`RING`](crate::RING) slots, each a chunk of rows
    /// uploaded, computed in place and read back (results and gradient in one readback buffer).
    fn loss_and_grad_host(
        &self,
        shape: HostShape,
        opts: &LossOptions<'_>,
        prepared: &Prepared,
        mut io: HostIo<'_>,
    ) -> Result<LossOutput> {
        let HostShape { dtype, rows, vocab } = shape;
        let finish = |out: Vec<TrainRow>| LossOutput {
            loss: reduce(&out, opts.reduction, prepared.weight_sum),
            rows: out,
            weight_sum: prepared.weight_sum,
        };
        if rows == 0 {
            return Ok(finish(Vec::new()));
        }
        let want_grad = io.wants_grad();
        let row_bytes = (vocab * dtype.size()) as u64;
        let total = row_bytes * rows as u64;
        let chunk_rows = self
            .rows_per_chunk_train(dtype, vocab as u64)?
            .min(((total / 4).clamp(8 << 20, 64 << 20) / row_bytes).max(1))
            .min(rows as u64) as usize;
        let n_slots = rows.div_ceil(chunk_rows).min(crate::RING);
        self.in_error_scopes(|| {
            let device = &self.device;
            use wgpu::BufferUsages as U;
            let make = |label: &str, size: u64, usage| {
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: size.next_multiple_of(16).max(16),
                    usage,
                    mapped_at_creation: false,
                })
            };
            let weights = opts.weight.map(|w| {
                device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("xent train class weights"),
                    contents: bytemuck::cast_slice(w),
                    usage: U::STORAGE,
                })
            });
            let chunk_bytes = chunk_rows as u64 * row_bytes;
            let result_bytes = chunk_rows as u64 * TRAIN_ROW_BYTES;
            let grad_back = if want_grad { chunk_bytes.next_multiple_of(4) } else { 0 };
            let slots: Vec<Slot> = (0..n_slots)
                .map(|_| Slot {
                    logits: make("xent train logits", chunk_bytes, U::STORAGE | U::COPY_DST | U::COPY_SRC),
                    targets: make("xent train targets", chunk_rows as u64 * 4, U::STORAGE | U::COPY_DST),
                    scale: make("xent train scale", chunk_rows as u64 * 4, U::STORAGE | U::COPY_DST),
                    output: make("xent train output", result_bytes, U::STORAGE | U::COPY_SRC),
                    readback: make("xent train readback", result_bytes + grad_back, U::MAP_READ | U::COPY_DST),
                })
                .collect();
            let mut results = Vec::with_capacity(rows);
            let mut in_flight: std::collections::VecDeque<InFlight> = Default::default();
            for (k, r0) in (0..rows).step_by(chunk_rows).enumerate() {
                let r1 = (r0 + chunk_rows).min(rows);
                if in_flight.len() == n_slots {
                    let f = in_flight.pop_front().expect("a chunk in flight");
                    self.complete_train_chunk(&slots[f.slot], f, row_bytes, &mut io, &mut results)?;
                }
                let slot = &slots[k % n_slots];
                let n = (r1 - r0) as u64;
                crate::stream::write_padded(
                    &self.queue,
                    &slot.logits,
                    io.input(r0 * row_bytes as usize..r1 * row_bytes as usize),
                );
                self.queue.write_buffer(&slot.targets, 0, bytemuck::cast_slice(&prepared.targets[r0..r1]));
                self.queue.write_buffer(&slot.scale, 0, bytemuck::cast_slice(&prepared.scale[r0..r1]));
                let mut encoder =
                    device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("xent train chunk") });
                self.encode_loss_and_grad(
                    &mut encoder,
                    &TrainEncodeJob {
                        logits: &slot.logits,
                        logits_offset: 0,
                        dtype,
                        row_stride: vocab as u64,
                        rows: n,
                        vocab: vocab as u32,
                        targets: &slot.targets,
                        targets_offset: 0,
                        ignore: Some(IGNORED_TARGET),
                        scale: &slot.scale,
                        scale_offset: 0,
                        weight: weights.as_ref().map(|buffer| ClassWeights { buffer, offset: 0 }),
                        label_smoothing: opts.label_smoothing,
                        z_loss: opts.z_loss,
                        softcap: opts.softcap,
                        output: &slot.output,
                        output_offset: 0,
                        grad: if want_grad { GradOutput::InPlace } else { GradOutput::None },
                    },
                )?;
                let rb = n * TRAIN_ROW_BYTES;
                encoder.copy_buffer_to_buffer(&slot.output, 0, &slot.readback, 0, rb);
                let gb = if want_grad { (n * row_bytes).next_multiple_of(4) } else { 0 };
                if want_grad {
                    encoder.copy_buffer_to_buffer(&slot.logits, 0, &slot.readback, rb, gb);
                }
                let submission = self.queue.submit([encoder.finish()]);
                let (tx, rx) = mpsc::channel();
                slot.readback.slice(..rb + gb).map_async(wgpu::MapMode::Read, move |r| {
                    let _ = tx.send(r);
                });
                in_flight.push_back(InFlight { slot: k % n_slots, rows: r0..r1, submission, mapped: rx });
            }
            while let Some(f) = in_flight.pop_front() {
                self.complete_train_chunk(&slots[f.slot], f, row_bytes, &mut io, &mut results)?;
            }
            Ok(finish(results))
        })
    }

    /// Waits for a chunk and copies its results and gradient out.
    fn complete_train_chunk(
        &self,
        slot: &Slot,
        f: InFlight,
        row_bytes: u64,
        io: &mut HostIo<'_>,
        results: &mut Vec<TrainRow>,
    ) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait { submission_index: Some(f.submission), timeout: None })
            .map_err(|e| Error::Gpu(e.to_string()))?;
        match f.mapped.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::Gpu(format!("reading results back: {e}"))),
            Err(e) => return Err(Error::Gpu(e.to_string())),
        }
        // A failed chunk lands in the context's store on a device of our own: report it rather
        // than read a buffer the chunk never wrote.
        self.check_device_errors()?;
        let n = (f.rows.end - f.rows.start) as u64;
        let rb = (n * TRAIN_ROW_BYTES) as usize;
        let gb = (n * row_bytes) as usize;
        {
            let want_grad = io.wants_grad();
            let view = slot
                .readback
                .slice(..(rb + if want_grad { gb.next_multiple_of(4) } else { 0 }) as u64)
                .get_mapped_range()
                .map_err(|e| Error::Gpu(e.to_string()))?;
            results.extend(bytemuck::pod_collect_to_vec::<u8, TrainRow>(&view[..rb]));
            if let Some(out) = io.output() {
                let start = f.rows.start * row_bytes as usize;
                out[start..start + gb].copy_from_slice(&view[rb..rb + gb]);
            }
        }
        slot.readback.unmap();
        Ok(())
    }
}

/// Shape of a host job.
#[derive(Debug, Clone, Copy)]
struct HostShape {
    dtype: Dtype,
    rows: usize,
    vocab: usize,
}

/// Where a host job's logits come from and its gradient goes.
enum HostIo<'a> {
    /// Logits read from one slice, the gradient (if wanted) written to another.
    Separate { logits: &'a [u8], grad: Option<&'a mut [u8]> },
    /// The gradient written over the logits.
    InPlace(&'a mut [u8]),
}

impl HostIo<'_> {
    fn wants_grad(&self) -> bool {
        !matches!(self, HostIo::Separate { grad: None, .. })
    }
    fn input(&self, range: Range<usize>) -> &[u8] {
        match self {
            HostIo::Separate { logits, .. } => &logits[range],
            HostIo::InPlace(x) => &x[range],
        }
    }
    fn output(&mut self) -> Option<&mut [u8]> {
        match self {
            HostIo::Separate { grad, .. } => grad.as_deref_mut(),
            HostIo::InPlace(x) => Some(x),
        }
    }
}

/// One chunk's device buffers in the host ring.
struct Slot {
    logits: wgpu::Buffer,
    targets: wgpu::Buffer,
    scale: wgpu::Buffer,
    output: wgpu::Buffer,
    readback: wgpu::Buffer,
}

struct InFlight {
    slot: usize,
    rows: Range<usize>,
    submission: wgpu::SubmissionIndex,
    mapped: mpsc::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
}
