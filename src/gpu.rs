//! The GPU context and the two entry points built on the fused kernel:
//! [`GpuContext::encode`] (caller's buffers, caller's encoder) and [`GpuContext::score`] (host slices).
//!
//! Chunking lives here, once: a job is cut into runs of rows whose logits, targets and outputs
//! each fit one storage binding, whose binding offsets respect the adapter's alignment, and whose
//! workgroup count fits a 2-D dispatch. Both entry points go through [`GpuContext::encode`].

use std::collections::HashMap;
use std::sync::Mutex;

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::problem::{validate_targets, Dtype, Logits, Options, RowLoss, Targets, IGNORED_TARGET};
use crate::stream::Stream;

/// The WGSL sources, by name. A kernel module is the common part followed by one reduction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Shader {
    /// Row scan, merge, result writing and the `combine` pass for split rows.
    ForwardCommon,
    /// Reduction through workgroup memory.
    ReduceWorkgroup,
    /// Reduction through subgroup operations.
    ReduceSubgroup,
}

impl Shader {
    fn source(self) -> &'static str {
        match self {
            Shader::ForwardCommon => include_str!("../shaders/forward_common.wgsl"),
            Shader::ReduceWorkgroup => include_str!("../shaders/reduce_workgroup.wgsl"),
            Shader::ReduceSubgroup => include_str!("../shaders/reduce_subgroup.wgsl"),
        }
    }
}

/// How partial results of a row are combined inside a workgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// A tree in workgroup memory: every adapter.
    Workgroup,
    /// Subgroup operations (`Features::SUBGROUP`), any subgroup size.
    Subgroup,
}

/// How the kernel lays rows over workgroups; chosen by [`GpuContext::plan`] from the shape
/// and the adapter, shown by `xent bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Plan {
    /// How a workgroup reduces.
    pub reduction: Reduction,
    /// Rows sharing one workgroup (short rows); a power of two dividing the workgroup size.
    pub rows_per_workgroup: u32,
    /// Workgroups per row (few, long rows); partial results are merged by a second pass.
    pub split: u32,
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = match self.reduction {
            Reduction::Workgroup => "workgroup",
            Reduction::Subgroup => "subgroup",
        };
        write!(f, "{r} reduce, {} row/wg, split {}", self.rows_per_workgroup, self.split)
    }
}

/// Entry points of a kernel module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Entry {
    /// The fused scan and reduction.
    Main,
    /// Merging the parts of split rows.
    Combine,
}

/// Compile-time choices of a pipeline: one compiled pipeline per distinct key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PipelineKey {
    dtype: Dtype,
    workgroup_size: u32,
    rows_per_workgroup: u32,
    reduction: Reduction,
    entry: Entry,
}

/// Mirror of the shader's `Params` uniform.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    vocab: u32,
    row_stride: u32,
    logits_offset: u32,
    targets_offset: u32,
    out_offset: u32,
    ignore: u32,
    groups_x: u32,
    split: u32,
    split_len: u32,
    _pad: [u32; 2],
}

/// Bytes of one partial state of a split row in the shader (`State`: five 4-byte fields).
const PARTIAL_BYTES: u64 = 20;

/// Workgroups the planner wants in flight before it splits rows: enough to cover every compute
/// unit of a large GPU several times over (an H200 has 132 SMs).
const TARGET_GROUPS: u64 = 1024;

/// Bytes of one [`RowLoss`] in the output buffer.
pub const ROW_LOSS_BYTES: u64 = std::mem::size_of::<RowLoss>() as u64;

/// Most workgroups along one dispatch dimension (WebGPU's guaranteed minimum, and NVIDIA's).
const MAX_GROUPS_PER_DIM: u32 = 65_535;

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

/// A window of a buffer bound for one chunk: aligned byte offset, size, and the element index
/// (in units of `unit` bytes) of the wanted start within the window.
struct Window {
    offset: u64,
    size: u64,
    first: u64,
}

/// Device, queue, compiled pipelines and the limits the kernels plan with.
pub struct GpuContext {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
    workgroup_module: wgpu::ShaderModule,
    subgroup_module: Option<wgpu::ShaderModule>,
    pipelines: Mutex<HashMap<PipelineKey, wgpu::ComputePipeline>>,
    /// Bound as `partials` when no row is split (a binding must always be present).
    no_partials: wgpu::Buffer,
    workgroup_size: u32,
    max_binding: u64,
    forced_plan: Option<Plan>,
    /// Errors the device raised outside any error scope (only collected on devices this
    /// context created: an engine's device keeps the engine's own handler).
    uncaptured: std::sync::Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .field("workgroup_size", &self.workgroup_size)
            .field("max_binding", &self.max_binding)
            .finish()
    }
}

impl GpuContext {
    /// Opens the best adapter (high performance; `WGPU_BACKEND` and `WGPU_ADAPTER_NAME` are honoured)
    /// with every limit it offers, so that bindings can be as large as the hardware allows.
    ///
    /// # Errors
    /// [`Error::NoAdapter`] when no adapter exists or the device cannot be opened.
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async())
    }

    /// Async form of [`GpuContext::new`].
    ///
    /// # Errors
    /// As [`GpuContext::new`].
    pub async fn new_async() -> Result<Self> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        // Vulkan, Metal, DX12 (and WebGPU in a browser); GL only when asked for by WGPU_BACKEND.
        let desc_backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY);
        desc.backends = desc_backends;
        let instance = wgpu::Instance::new(desc);
        let adapter = match std::env::var("WGPU_ADAPTER_NAME") {
            // wgpu's own helper for this variable panics when nothing matches: an error is kinder.
            Ok(name) => {
                let wanted = name.to_lowercase();
                let adapters = instance.enumerate_adapters(desc_backends).await;
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                adapters
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&wanted))
                    .ok_or_else(|| Error::NoAdapter(format!("WGPU_ADAPTER_NAME={name} matches none of {names:?}")))?
            }
            Err(_) => instance
                .request_adapter(&wgpu::RequestAdapterOptions {
                    power_preference: wgpu::PowerPreference::HighPerformance,
                    ..Default::default()
                })
                .await
                .map_err(|e| Error::NoAdapter(e.to_string()))?,
        };
        let wanted = wgpu::Features::TIMESTAMP_QUERY
            | wgpu::Features::TIMESTAMP_QUERY_INSIDE_ENCODERS
            | wgpu::Features::SUBGROUP;
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("xent"),
                required_features: adapter.features() & wanted,
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::NoAdapter(format!("{}: {e}", adapter.get_info().name)))?;
        let ctx = Self::from_device(device, queue);
        // wgpu's default handler panics; on our own device, keep the error for the caller instead.
        let sink = ctx.uncaptured.clone();
        ctx.device.on_uncaptured_error(std::sync::Arc::new(move |e: wgpu::Error| {
            // Only the first error is kept: it is the cause, and the store stays bounded.
            let mut errors = sink.lock().unwrap_or_else(|p| p.into_inner());
            if errors.is_empty() {
                errors.push(e.to_string());
            }
        }));
        Ok(ctx)
    }

    /// Wraps a device and queue the caller already has (an inference engine's), reading its limits.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let limits = device.limits();
        let info = device.adapter_info();
        let workgroup_size =
            256.min(limits.max_compute_invocations_per_workgroup).min(limits.max_compute_workgroup_size_x);
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("xent forward bind group layout"),
            entries: &[
                layout_entry(0, wgpu::BufferBindingType::Uniform),
                layout_entry(1, wgpu::BufferBindingType::Storage { read_only: true }),
                layout_entry(2, wgpu::BufferBindingType::Storage { read_only: true }),
                layout_entry(3, wgpu::BufferBindingType::Storage { read_only: false }),
                layout_entry(4, wgpu::BufferBindingType::Storage { read_only: true }),
                layout_entry(5, wgpu::BufferBindingType::Storage { read_only: false }),
            ],
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("xent forward pipeline layout"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let module = |label, reduce: Shader| {
            let source = format!("{}\n{}", Shader::ForwardCommon.source(), reduce.source());
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            })
        };
        let workgroup_module = module("xent forward (workgroup reduce)", Shader::ReduceWorkgroup);
        let subgroup_module = device
            .features()
            .contains(wgpu::Features::SUBGROUP)
            .then(|| module("xent forward (subgroup reduce)", Shader::ReduceSubgroup));
        let no_partials = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("xent no partials"),
            size: 32,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        // Capped at 4 GiB - 1 so that element indices inside one window fit the shader's u32.
        let max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size).min(u64::from(u32::MAX));
        GpuContext {
            device,
            queue,
            info,
            layout,
            pipeline_layout,
            workgroup_module,
            subgroup_module,
            pipelines: Mutex::new(HashMap::new()),
            no_partials,
            workgroup_size,
            max_binding,
            forced_plan: None,
            uncaptured: Default::default(),
        }
    }

    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }
    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }
    /// The adapter's description (name, backend, driver).
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }
    /// Invocations per workgroup of the forward kernel.
    pub fn workgroup_size(&self) -> u32 {
        self.workgroup_size
    }
    /// Largest storage binding the planner uses, in bytes.
    pub fn max_binding_bytes(&self) -> u64 {
        self.max_binding
    }

    /// Lowers the largest binding the planner will use (never raises it above the device's limit).
    /// Tests use this to force many chunks on small inputs.
    pub fn set_max_binding_bytes(&mut self, bytes: u64) {
        let limit = self.device.limits().max_storage_buffer_binding_size.min(u64::from(u32::MAX));
        self.max_binding = bytes.min(limit).max(1024);
    }

    /// A pipeline from a standalone WGSL module with an automatic layout (benchmark baselines).
    pub(crate) fn auxiliary_pipeline(&self, label: &str, source: &str, entry: &str) -> wgpu::ComputePipeline {
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(label),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        })
    }

    /// The first device error raised outside an error scope since the last call, if any (only on
    /// devices made by [`GpuContext::new`]).
    ///
    /// # Errors
    /// [`Error::Gpu`] with the device's message.
    pub fn check_device_errors(&self) -> Result<()> {
        let first = {
            let mut errors = self.uncaptured.lock().unwrap_or_else(|p| p.into_inner());
            let first = errors.first().cloned();
            errors.clear();
            first
        };
        first.map_or(Ok(()), |e| Err(Error::Gpu(e)))
    }

    /// Makes every later job use `plan` (or, with `None`, the planner's choice again).
    /// Tests use this to run every reduction path on one adapter; a subgroup plan on a device
    /// without `Features::SUBGROUP`, or an impossible rows-per-workgroup, falls back safely.
    pub fn force_plan(&mut self, plan: Option<Plan>) {
        self.forced_plan = plan;
    }

    /// Whether the subgroup reduction is available on this device.
    pub fn has_subgroups(&self) -> bool {
        self.subgroup_module.is_some()
    }

    /// The layout the kernel will use for `rows` rows of `vocab` logits.
    ///
    /// Short rows are packed several to a workgroup (about one lane per 16 logits); when rows
    /// are too few to give 1024 workgroups and are long, each is split over several
    /// workgroups of at least 16k logits and merged by a second pass; subgroup operations
    /// reduce whenever the device has them and a workgroup holds one row part.
    pub fn plan(&self, rows: u64, vocab: u32) -> Plan {
        let wg = self.workgroup_size;
        let plan = self.forced_plan.unwrap_or_else(|| {
            let rows_per_workgroup = if wg.is_power_of_two() && vocab <= 2048 {
                wg / vocab.div_ceil(16).next_power_of_two().min(wg)
            } else {
                1
            };
            // Parts of at least 16k logits: smaller ones measured slower on lavapipe (8 x 32000 f32:
            // 1.47 ms split 7 ways, 0.58 ms whole) and gain nothing on a GPU, where 16k logits
            // already give each of 256 invocations 16 vector loads.
            let split = if rows_per_workgroup == 1 && rows < TARGET_GROUPS && vocab >= 32_768 {
                TARGET_GROUPS.div_ceil(rows.max(1)).min(u64::from(vocab / 16_384)).clamp(1, 256) as u32
            } else {
                1
            };
            Plan { reduction: Reduction::Subgroup, rows_per_workgroup, split }
        });
        // Make any plan (a forced one included) safe for this device and shape.
        let rows_per_workgroup =
            if wg.is_power_of_two() && plan.rows_per_workgroup.is_power_of_two() && plan.rows_per_workgroup <= wg {
                plan.rows_per_workgroup
            } else {
                1
            };
        // Parts of at least 8 logits, and few enough that the partial results of every row fit in
        // one binding and the workgroups in one dispatch grid.
        let max_parts =
            (self.device.limits().max_storage_buffer_binding_size / PARTIAL_BYTES).min(65_535 * 65_535) / rows.max(1);
        let split = if rows_per_workgroup == 1 {
            plan.split.clamp(1, vocab.div_ceil(8)).min(max_parts.clamp(1, u64::from(u32::MAX)) as u32)
        } else {
            1
        };
        let reduction =
            if self.has_subgroups() && rows_per_workgroup == 1 { plan.reduction } else { Reduction::Workgroup };
        Plan { reduction, rows_per_workgroup, split }
    }

    fn pipeline(&self, key: PipelineKey) -> wgpu::ComputePipeline {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(key)
            .or_insert_with(|| {
                let dtype_code = match key.dtype {
                    Dtype::F32 => 0.0,
                    Dtype::F16 => 1.0,
                    Dtype::BF16 => 2.0,
                };
                let module = match (key.reduction, &self.subgroup_module) {
                    (Reduction::Subgroup, Some(m)) if key.entry == Entry::Main => m,
                    _ => &self.workgroup_module,
                };
                let (entry, label) = match key.entry {
                    Entry::Main => ("main", "xent forward"),
                    Entry::Combine => ("combine", "xent combine split rows"),
                };
                self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(label),
                    layout: Some(&self.pipeline_layout),
                    module,
                    entry_point: Some(entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &[
                            ("DTYPE", dtype_code),
                            ("WG_SIZE", f64::from(key.workgroup_size)),
                            ("ROWS_PER_WG", f64::from(key.rows_per_workgroup)),
                        ],
                        // Every workgroup variable is written before it is read.
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                })
            })
            .clone()
    }

    /// Most rows one dispatch covers for a given layout: limited by the storage binding (logits,
    /// outputs) and the 2-D dispatch size. Larger jobs are split into chunks of this many rows.
    ///
    /// # Errors
    /// [`Error::Shape`] when not even one row fits a binding.
    pub fn rows_per_chunk(&self, dtype: Dtype, row_stride: u64, vocab: u64) -> Result<u64> {
        let align = u64::from(self.device.limits().min_storage_buffer_offset_alignment);
        let es = dtype.size() as u64;
        // Worst-case slack a window needs: offset rounded down to `align`, end rounded up to 4.
        let room = self.max_binding.saturating_sub(align + 4);
        if vocab * es > room {
            return Err(Error::Shape(format!(
                "a row of {vocab} {dtype} logits ({} bytes) exceeds this adapter's largest storage binding ({} bytes)",
                vocab * es,
                self.max_binding
            )));
        }
        let by_logits = (room / es - vocab) / row_stride.max(1) + 1;
        let by_output = room / ROW_LOSS_BYTES;
        let by_dispatch = u64::from(MAX_GROUPS_PER_DIM) * u64::from(MAX_GROUPS_PER_DIM);
        Ok(by_logits.min(by_output).min(by_dispatch).min(u64::from(u32::MAX)))
    }

    /// Records the fused forward kernel over `job` into `encoder`: no submit, no sync, no copy.
    /// Chunked automatically when the job exceeds a binding or a dispatch.
    ///
    /// Targets are not validated here (they live on the device): an out-of-range target gives a
    /// NaN `nll` and the [`RowLoss::BAD_TARGET`] flag for its row.
    ///
    /// # Errors
    /// [`Error::Buffer`] when a region lies outside its buffer, is misaligned, or a buffer lacks
    /// `STORAGE` usage; [`Error::Shape`] when `vocab` is 0, `row_stride < vocab`, or one row is
    /// larger than a binding.
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
        let es = job.dtype.size() as u64;
        let vocab = u64::from(job.vocab);
        if vocab == 0 {
            return Err(Error::Shape("vocab is 0".into()));
        }
        if job.row_stride < vocab && job.rows > 1 {
            return Err(Error::Shape(format!("row_stride {} is less than vocab {vocab}", job.row_stride)));
        }
        if job.rows == 0 {
            return Ok(());
        }
        if !job.logits_offset.is_multiple_of(es)
            || !job.targets_offset.is_multiple_of(4)
            || !job.output_offset.is_multiple_of(ROW_LOSS_BYTES)
        {
            return Err(Error::Buffer(
                "logits_offset must be a multiple of the element size, targets_offset of 4, output_offset of 16".into(),
            ));
        }
        if job.row_stride > u64::from(u32::MAX) {
            return Err(Error::Shape(format!("row_stride {} does not fit in u32", job.row_stride)));
        }
        let overflow = || Error::Buffer("a region's end overflows u64".into());
        let logits_end = (job.rows - 1)
            .checked_mul(job.row_stride)
            .and_then(|e| e.checked_add(vocab))
            .and_then(|e| e.checked_mul(es))
            .and_then(|e| e.checked_add(job.logits_offset))
            .ok_or_else(overflow)?;
        // The logits are bound as whole 4-byte words.
        check_region("logits", job.logits, logits_end.next_multiple_of(4))?;
        check_region(
            "targets",
            job.targets,
            job.rows.checked_mul(4).and_then(|b| b.checked_add(job.targets_offset)).ok_or_else(overflow)?,
        )?;
        check_region(
            "output",
            job.output,
            job.rows.checked_mul(ROW_LOSS_BYTES).and_then(|b| b.checked_add(job.output_offset)).ok_or_else(overflow)?,
        )?;

        let chunk = self.rows_per_chunk(job.dtype, job.row_stride, vocab)?;
        // Each chunk's parameters sit at an offset that is a multiple of the adapter's alignment.
        let uniform_stride = (std::mem::size_of::<Params>() as u64)
            .next_multiple_of(u64::from(self.device.limits().min_uniform_buffer_offset_alignment));
        let n_chunks = job.rows.div_ceil(chunk);

        // Plan every chunk first: its layout, windows and uniform slot.
        struct ChunkPlan {
            plan: Plan,
            logits: Window,
            targets: Window,
            output: Window,
            groups: (u32, u32),
            combine_groups: (u32, u32),
        }
        let mut uniform_bytes = vec![0u8; (n_chunks * uniform_stride) as usize];
        let mut chunks = Vec::with_capacity(n_chunks as usize);
        let mut partial_count = 0u64;
        for c in 0..n_chunks {
            let r0 = c * chunk;
            let rows = chunk.min(job.rows - r0);
            let plan = self.plan(rows, job.vocab);
            let split_len = job.vocab.div_ceil(plan.split).next_multiple_of(8);
            let split = job.vocab.div_ceil(split_len);
            let plan = Plan { split, ..plan };
            if split > 1 {
                partial_count = partial_count.max(rows * u64::from(split));
            }
            let start = job.logits_offset + r0 * job.row_stride * es;
            let end = start + ((rows - 1) * job.row_stride + vocab) * es;
            let logits = self.window(job.logits, start, end, es);
            let targets =
                self.window(job.targets, job.targets_offset + r0 * 4, job.targets_offset + (r0 + rows) * 4, 4);
            let output = self.window(
                job.output,
                job.output_offset + r0 * ROW_LOSS_BYTES,
                job.output_offset + (r0 + rows) * ROW_LOSS_BYTES,
                ROW_LOSS_BYTES,
            );
            let groups = grid((rows * u64::from(split)).div_ceil(u64::from(plan.rows_per_workgroup)));
            let params = Params {
                rows: rows as u32,
                vocab: job.vocab,
                row_stride: job.row_stride as u32,
                logits_offset: logits.first as u32,
                targets_offset: targets.first as u32,
                out_offset: output.first as u32,
                ignore: job.ignore.unwrap_or(IGNORED_TARGET),
                groups_x: groups.0,
                split,
                split_len,
                _pad: [0; 2],
            };
            let slot = (c * uniform_stride) as usize;
            uniform_bytes[slot..slot + std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(&params));
            chunks.push(ChunkPlan { plan, logits, targets, output, groups, combine_groups: grid(rows.div_ceil(64)) });
        }
        if chunks.iter().any(|c| c.logits.size < 16) {
            return Err(Error::Buffer("the logits buffer must hold at least 16 bytes from the window start".into()));
        }
        let uniforms = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("xent params"),
            contents: &uniform_bytes,
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let partials = (partial_count > 0).then(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("xent split-row partials"),
                size: partial_count * PARTIAL_BYTES,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        });

        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("xent forward"),
            timestamp_writes: timestamps,
        });
        for (c, ch) in chunks.iter().enumerate() {
            let partials_buf = match (&partials, ch.plan.split > 1) {
                (Some(p), true) => p,
                _ => &self.no_partials,
            };
            // The vec4 view covers whole 16-byte words only; the scalar view the whole window.
            let vec_size = (ch.logits.size / 16 * 16).max(16);
            let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("xent forward bind group"),
                layout: &self.layout,
                entries: &[
                    buffer_entry(0, &uniforms, c as u64 * uniform_stride, std::mem::size_of::<Params>() as u64),
                    buffer_entry(1, job.logits, ch.logits.offset, vec_size),
                    buffer_entry(2, job.targets, ch.targets.offset, ch.targets.size),
                    buffer_entry(3, job.output, ch.output.offset, ch.output.size),
                    buffer_entry(4, job.logits, ch.logits.offset, ch.logits.size),
                    buffer_entry(5, partials_buf, 0, partials_buf.size()),
                ],
            });
            let key = PipelineKey {
                dtype: job.dtype,
                workgroup_size: self.workgroup_size,
                rows_per_workgroup: ch.plan.rows_per_workgroup,
                reduction: ch.plan.reduction,
                entry: Entry::Main,
            };
            pass.set_pipeline(&self.pipeline(key));
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(ch.groups.0, ch.groups.1, 1);
            if ch.plan.split > 1 {
                let key = PipelineKey {
                    rows_per_workgroup: 1,
                    reduction: Reduction::Workgroup,
                    entry: Entry::Combine,
                    ..key
                };
                pass.set_pipeline(&self.pipeline(key));
                pass.dispatch_workgroups(ch.combine_groups.0, ch.combine_groups.1, 1);
            }
        }
        Ok(())
    }

    /// The aligned window of `buffer` covering bytes `[start, end)`, counting `first` in `unit`s.
    fn window(&self, buffer: &wgpu::Buffer, start: u64, end: u64, unit: u64) -> Window {
        let align = u64::from(self.device.limits().min_storage_buffer_offset_alignment);
        let offset = start / align * align;
        let end = end.next_multiple_of(4).min(buffer.size());
        // At least 16 bytes where the buffer has them: the vec4 view of the logits needs one whole element.
        // Rounded down to whole words (a storage binding's size must be): the bytes needed are.
        let size = (end - offset).max(16.min(buffer.size() - offset)) / 4 * 4;
        Window { offset, size, first: (start - offset) / unit }
    }

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
        // Chunks of a quarter of the input (so that at least a few overlap), 8 to 64 MiB.
        let chunk_bytes = (logits.bytes().len() as u64 / 4).clamp(8 << 20, 64 << 20);
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let result = (|| {
            let mut stream = Stream::new(self, logits.dtype(), logits.vocab() as u32, chunk_bytes)?;
            let mut out = stream.push(logits, targets)?;
            out.extend(stream.finish()?);
            Ok(out)
        })();
        if let Some(e) = pollster::block_on(oom.pop()) {
            return Err(Error::Gpu(e.to_string()));
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(e.to_string()));
        }
        result
    }
}

/// A 2-D grid of `groups` workgroups: x up to 65,535, then y.
fn grid(groups: u64) -> (u32, u32) {
    let x = groups.clamp(1, u64::from(MAX_GROUPS_PER_DIM)) as u32;
    (x, groups.div_ceil(u64::from(x)).max(1) as u32)
}

fn layout_entry(binding: u32, ty: wgpu::BufferBindingType) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: false, min_binding_size: None },
        count: None,
    }
}

fn buffer_entry(binding: u32, buffer: &wgpu::Buffer, offset: u64, size: u64) -> wgpu::BindGroupEntry<'_> {
    wgpu::BindGroupEntry {
        binding,
        resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer,
            offset,
            size: std::num::NonZeroU64::new(size),
        }),
    }
}

fn check_region(what: &str, buffer: &wgpu::Buffer, end: u64) -> Result<()> {
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(Error::Buffer(format!("the {what} buffer lacks STORAGE usage")));
    }
    if end > buffer.size() {
        return Err(Error::Buffer(format!(
            "the {what} region ends at byte {end}, past the buffer's {} bytes",
            buffer.size()
        )));
    }
    Ok(())
}

/// The one readback helper: map, one poll, copy out, unmap.
///
/// # Errors
/// [`Error::Gpu`] if mapping fails or the device is lost.
pub fn read_buffer(device: &wgpu::Device, buffer: &wgpu::Buffer, size: u64, dst: &mut [u8]) -> Result<()> {
    let slice = buffer.slice(..size);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Gpu(e.to_string()))?;
    rx.recv().map_err(|e| Error::Gpu(e.to_string()))?.map_err(|e| Error::Gpu(e.to_string()))?;
    {
        let view = slice.get_mapped_range().map_err(|e| Error::Gpu(e.to_string()))?;
        dst.copy_from_slice(&view[..dst.len()]);
    }
    buffer.unmap();
    Ok(())
}
