//! The GPU context every kernel shares, and the execution plumbing they all go through once:
//! device and queue, limits, the pipeline cache, plans, chunking and binding windows.
//!
//! A kernel is a WGSL file with one Rust module that plans and encodes it ([`forward`]: the
//! fused cross-entropy, [`kld`]: the fused KL divergence, [`train`]: the loss and its gradient);
//! all are built on the shared online-softmax pieces (`shaders/online_softmax.wgsl`) and the
//! reductions (`shaders/reduce_*.wgsl`). A job is cut into chunks of rows whose inputs, targets and outputs
//! each fit one storage binding, whose binding offsets respect the adapter's alignment, and whose
//! workgroup count fits a 2-D dispatch; each chunk is dispatched under a [`Plan`].
//!
//! Layers: this module knows nothing of streams or host slices; `crate::stream` (the ring and the
//! host-slice entry points `score` and `kld`) is built on top of it. The one exception is
//! [`train`], whose host entry points keep a ring of their own beside its encoder: their results
//! include a gradient as large as the input, which the per-row results of `Stream` do not fit.

mod forward;
mod kld;
mod train;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::problem::Dtype;

pub use forward::{EncodeJob, ROW_LOSS_BYTES};
pub use kld::{KldEncodeJob, KLD_ROW_BYTES};
pub use train::{ClassWeights, GradOutput, TrainEncodeJob, TRAIN_ROW_BYTES};

/// The WGSL sources, by name. A kernel module is the shared part, the kernel's own file and one
/// reduction (see [`Kernel::sources`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Shader {
    /// NaN / +inf tests, 16-bit unpacking, online (max, sum) and argmax: every kernel's core.
    OnlineSoftmax,
    /// The fused cross-entropy: scan, merge, finish, `combine`.
    Forward,
    /// The forward state combined over a subgroup.
    ForwardSubgroup,
    /// The fused KL divergence: scan of both rows, merge, finish, `combine`.
    Kld,
    /// The KLD state combined over a subgroup.
    KldSubgroup,
    /// Loss and gradient: passes 1 and 2, `grad`, `edges`, `sum_weights`.
    Train,
    /// The training kernel's bindings with the gradient in a buffer of its own.
    TrainSeparate,
    /// The training kernel's bindings with the gradient over the logits.
    TrainInPlace,
    /// The training state combined over a subgroup.
    TrainSubgroup,
    /// `emit` and the `combine` pass for split rows (any kernel, after its own file).
    SplitRows,
    /// Reduction through workgroup memory (any kernel).
    ReduceWorkgroup,
    /// Reduction through subgroup operations (any kernel, after its `*Subgroup` part).
    ReduceSubgroup,
}

impl Shader {
    fn source(self) -> &'static str {
        match self {
            Shader::OnlineSoftmax => include_str!("../../shaders/online_softmax.wgsl"),
            Shader::Forward => include_str!("../../shaders/forward.wgsl"),
            Shader::ForwardSubgroup => include_str!("../../shaders/forward_subgroup.wgsl"),
            Shader::Kld => include_str!("../../shaders/kld.wgsl"),
            Shader::KldSubgroup => include_str!("../../shaders/kld_subgroup.wgsl"),
            Shader::Train => include_str!("../../shaders/train.wgsl"),
            Shader::TrainSeparate => include_str!("../../shaders/train_separate.wgsl"),
            Shader::TrainInPlace => include_str!("../../shaders/train_in_place.wgsl"),
            Shader::TrainSubgroup => include_str!("../../shaders/train_subgroup.wgsl"),
            Shader::SplitRows => include_str!("../../shaders/split_rows.wgsl"),
            Shader::ReduceWorkgroup => include_str!("../../shaders/reduce_workgroup.wgsl"),
            Shader::ReduceSubgroup => include_str!("../../shaders/reduce_subgroup.wgsl"),
        }
    }
}

/// The kernels of the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    /// Cross-entropy over one input (`shaders/forward.wgsl`).
    Forward,
    /// KL divergence between two inputs (`shaders/kld.wgsl`).
    Kld,
    /// Loss and gradient (`shaders/train.wgsl`), the gradient into a buffer of its own (or none).
    TrainSeparate,
    /// Loss and gradient, the gradient written over the logits.
    TrainInPlace,
}

impl Kernel {
    /// The files of one module, in order.
    fn sources(self, reduction: Reduction) -> Vec<Shader> {
        let (own, sub): (&[Shader], Shader) = match self {
            Kernel::Forward => (&[Shader::Forward], Shader::ForwardSubgroup),
            Kernel::Kld => (&[Shader::Kld], Shader::KldSubgroup),
            Kernel::TrainSeparate => (&[Shader::TrainSeparate, Shader::Train], Shader::TrainSubgroup),
            Kernel::TrainInPlace => (&[Shader::TrainInPlace, Shader::Train], Shader::TrainSubgroup),
        };
        let mut files = vec![Shader::OnlineSoftmax];
        files.extend_from_slice(own);
        files.push(Shader::SplitRows);
        match reduction {
            // The subgroup part is left out: it does not compile without Features::SUBGROUP.
            Reduction::Workgroup => files.push(Shader::ReduceWorkgroup),
            Reduction::Subgroup => files.extend([sub, Shader::ReduceSubgroup]),
        }
        files
    }

    fn name(self) -> &'static str {
        match self {
            Kernel::Forward => "forward",
            Kernel::Kld => "kld",
            Kernel::TrainSeparate => "train",
            Kernel::TrainInPlace => "train in place",
        }
    }

    /// Logits inputs (sides).
    fn sides(self) -> usize {
        match self {
            Kernel::Forward | Kernel::TrainSeparate | Kernel::TrainInPlace => 1,
            Kernel::Kld => 2,
        }
    }

    /// Bytes of one row's result.
    fn row_bytes(self) -> u64 {
        match self {
            Kernel::Forward => ROW_LOSS_BYTES,
            Kernel::Kld => KLD_ROW_BYTES,
            Kernel::TrainSeparate | Kernel::TrainInPlace => TRAIN_ROW_BYTES,
        }
    }

    /// Largest per-row record one binding holds for every row of a chunk: the result, and for
    /// the training kernel its kept state (one per row, split or not).
    fn per_row_bytes(self) -> u64 {
        match self {
            Kernel::Forward | Kernel::Kld => self.row_bytes(),
            Kernel::TrainSeparate | Kernel::TrainInPlace => self.row_bytes().max(self.partial_bytes()),
        }
    }

    /// Bytes of one partial state of a split row (the shader's `State`).
    fn partial_bytes(self) -> u64 {
        match self {
            Kernel::Forward | Kernel::TrainSeparate | Kernel::TrainInPlace => 20,
            Kernel::Kld => 56,
        }
    }

    /// Bindings: 0 uniform params, 1 side a as vec4<u32>, 2 targets, 3 output, 4 side a as u32,
    /// 5 partials, then for a second side 6 (vec4) and 7 (u32). Seven storage buffers at most:
    /// within WebGPU's default of eight per stage.
    fn layout_entries(self) -> Vec<wgpu::BindGroupLayoutEntry> {
        use wgpu::BufferBindingType as B;
        let read = B::Storage { read_only: true };
        let write = B::Storage { read_only: false };
        if let Kernel::TrainSeparate | Kernel::TrainInPlace = self {
            return train::layout_entries(self == Kernel::TrainInPlace);
        }
        let mut entries = vec![
            layout_entry(0, B::Uniform),
            layout_entry(1, read),
            layout_entry(2, read),
            layout_entry(3, write),
            layout_entry(4, read),
            layout_entry(5, write),
        ];
        if self.sides() == 2 {
            entries.extend([layout_entry(6, read), layout_entry(7, read)]);
        }
        entries
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

/// How a kernel lays rows over workgroups; chosen by [`GpuContext::plan`] (or
/// [`GpuContext::plan_kld`]) from the shape and the adapter, shown by `xent bench`.
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
    /// Training: pass 2 (the gradient) over the parts of split rows.
    Grad,
    /// Training: the 16-bit words two rows share.
    Edges,
    /// Training: the sum of the class weights.
    SumWeights,
}

/// Compile-time choices of a pipeline: one compiled pipeline per distinct key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PipelineKey {
    kernel: Kernel,
    /// Element type of each side (the forward kernel uses the first).
    dtypes: [Dtype; 2],
    workgroup_size: u32,
    rows_per_workgroup: u32,
    reduction: Reduction,
    entry: Entry,
    /// Options a kernel compiles in or out (the training kernel's `SMOOTHING`, `SOFTCAP`,
    /// `WEIGHTED`: `train::FEATURE_*`); 0 for the others.
    features: u32,
}

/// One kernel's bind group layout and shader modules.
struct Modules {
    layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
    workgroup: wgpu::ShaderModule,
    subgroup: Option<wgpu::ShaderModule>,
}

impl Modules {
    fn new(device: &wgpu::Device, kernel: Kernel) -> Modules {
        let name = kernel.name();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(&format!("xent {name} bind group layout")),
            entries: &kernel.layout_entries(),
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(&format!("xent {name} pipeline layout")),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let module = |reduction: Reduction| {
            let source: Vec<&str> = kernel.sources(reduction).iter().map(|s| s.source()).collect();
            let label = match reduction {
                Reduction::Workgroup => format!("xent {name} (workgroup reduce)"),
                Reduction::Subgroup => format!("xent {name} (subgroup reduce)"),
            };
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&label),
                source: wgpu::ShaderSource::Wgsl(source.join("\n").into()),
            })
        };
        let workgroup = module(Reduction::Workgroup);
        let subgroup = device.features().contains(wgpu::Features::SUBGROUP).then(|| module(Reduction::Subgroup));
        Modules { layout, pipeline_layout, workgroup, subgroup }
    }
}

/// Mirror of the shaders' `Params` uniform, shared by every kernel (side b unused by the forward).
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    vocab: u32,
    targets_offset: u32,
    out_offset: u32,
    ignore: u32,
    groups_x: u32,
    split: u32,
    split_len: u32,
    a_offset: u32,
    a_stride: u32,
    b_offset: u32,
    b_stride: u32,
}

/// Workgroups the planner wants in flight before it splits rows: enough to cover every compute
/// unit of a large GPU several times over (an H200 has 132 SMs).
const TARGET_GROUPS: u64 = 1024;

/// Most workgroups along one dispatch dimension (WebGPU's guaranteed minimum, and NVIDIA's).
const MAX_GROUPS_PER_DIM: u32 = 65_535;

/// One side of a job: a region of logits in a caller's buffer.
#[derive(Debug, Clone, Copy)]
struct Side<'a> {
    name: &'static str,
    buffer: &'a wgpu::Buffer,
    /// Byte offset of row 0's first logit.
    offset: u64,
    dtype: Dtype,
    /// Elements between the starts of consecutive rows.
    row_stride: u64,
}

/// A job of any kernel, as the chunking code sees it.
#[derive(Debug, Clone, Copy)]
struct Job<'a> {
    kernel: Kernel,
    /// `kernel.sides()` of them.
    sides: [Option<Side<'a>>; 2],
    rows: u64,
    vocab: u32,
    targets: &'a wgpu::Buffer,
    targets_offset: u64,
    ignore: u32,
    output: &'a wgpu::Buffer,
    output_offset: u64,
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
    forward: Modules,
    /// Compiled on first use.
    kld: OnceLock<Modules>,
    /// The training kernel, gradient separate and in place; compiled on first use.
    train: [OnceLock<Modules>; 2],
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

/// The backends xent opens: those `WGPU_BACKEND` names, else Vulkan, Metal, DX12 (and WebGPU in
/// a browser); GL only when asked for.
fn backends() -> wgpu::Backends {
    wgpu::Backends::from_env().unwrap_or(wgpu::Backends::PRIMARY)
}

/// `adapters` in the order `XENT_ADAPTER` counts them: hardware first (discrete, integrated,
/// virtual, other), software renderers last; within a kind, as the drivers list them.
fn ordered(mut adapters: Vec<wgpu::Adapter>) -> Vec<wgpu::Adapter> {
    let rank = |t: wgpu::DeviceType| match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    adapters.sort_by_key(|a| rank(a.get_info().device_type));
    adapters
}

/// Every adapter this machine offers, in the order the `XENT_ADAPTER` variable counts them
/// (index 0 first): hardware first (discrete, integrated, virtual, other), software renderers
/// last; within a kind, as the drivers list them. On a node with several identical GPUs that is
/// normally their PCI bus order, which is also CUDA's order when `CUDA_DEVICE_ORDER=PCI_BUS_ID`.
pub fn adapters() -> Vec<wgpu::AdapterInfo> {
    let instance = instance();
    let list = pollster::block_on(instance.enumerate_adapters(backends()));
    ordered(list).iter().map(wgpu::Adapter::get_info).collect()
}

/// A wgpu instance over [`backends`].
fn instance() -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends();
    wgpu::Instance::new(desc)
}

impl GpuContext {
    /// Opens the best adapter (high performance) with every limit it offers, so that bindings
    /// can be as large as the hardware allows. `XENT_ADAPTER=N` opens the `N`-th adapter of
    /// [`adapters`] instead (one GPU per process on a multi-GPU node; `xent info` lists them);
    /// wgpu's `WGPU_BACKEND` and `WGPU_ADAPTER_NAME` (a part of the adapter's name) are honoured.
    ///
    /// # Errors
    /// [`Error::NoAdapter`] when no adapter exists, `XENT_ADAPTER` or `WGPU_ADAPTER_NAME` names
    /// none, or the device cannot be opened.
    pub fn new() -> Result<Self> {
        pollster::block_on(Self::new_async())
    }

    /// Async form of [`GpuContext::new`].
    ///
    /// # Errors
    /// As [`GpuContext::new`].
    pub async fn new_async() -> Result<Self> {
        let instance = instance();
        let by_index = std::env::var("XENT_ADAPTER").ok().filter(|v| !v.trim().is_empty());
        let adapter = match (by_index, std::env::var("WGPU_ADAPTER_NAME")) {
            (Some(v), _) => {
                let adapters = ordered(instance.enumerate_adapters(backends()).await);
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                let n = names.len();
                let i: usize = v.trim().parse().map_err(|_| {
                    Error::NoAdapter(format!(
                        "XENT_ADAPTER={v} is not an adapter index (0, 1, ...; {n} here: {names:?})"
                    ))
                })?;
                adapters.into_iter().nth(i).ok_or_else(|| {
                    let s = if n == 1 { "" } else { "s" };
                    Error::NoAdapter(format!("XENT_ADAPTER={i}, but this machine has {n} adapter{s}: {names:?}"))
                })?
            }
            // wgpu's own helper for this variable panics when nothing matches: an error is kinder.
            (None, Ok(name)) => {
                let wanted = name.to_lowercase();
                let adapters = instance.enumerate_adapters(backends()).await;
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                adapters
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&wanted))
                    .ok_or_else(|| Error::NoAdapter(format!("WGPU_ADAPTER_NAME={name} matches none of {names:?}")))?
            }
            (None, Err(_)) => instance
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
        let forward = Modules::new(&device, Kernel::Forward);
        let no_partials = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("xent no partials"),
            size: 64,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        // Capped at 4 GiB - 1 so that element indices inside one window fit the shader's u32.
        let max_binding = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size).min(u64::from(u32::MAX));
        GpuContext {
            device,
            queue,
            info,
            forward,
            kld: OnceLock::new(),
            train: Default::default(),
            pipelines: Mutex::new(HashMap::new()),
            no_partials,
            workgroup_size,
            max_binding,
            forced_plan: None,
            uncaptured: Default::default(),
        }
    }

    /// Runs `f` inside validation and out-of-memory error scopes: device errors come back as
    /// [`Error::Gpu`], not panics.
    pub(crate) fn in_error_scopes<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let scope = self.device().push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = self.device().push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let result = f();
        if let Some(e) = pollster::block_on(oom.pop()) {
            return Err(Error::Gpu(e.to_string()));
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(e.to_string()));
        }
        result
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
    /// Invocations per workgroup of the kernels.
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

    /// Makes every later job of every kernel use `plan` (or, with `None`, the planner's choice
    /// again). Tests use this to run every reduction path on one adapter; a subgroup plan on a
    /// device without `Features::SUBGROUP`, or an impossible rows-per-workgroup, falls back safely.
    pub fn force_plan(&mut self, plan: Option<Plan>) {
        self.forced_plan = plan;
    }

    /// Whether the subgroup reduction is available on this device.
    pub fn has_subgroups(&self) -> bool {
        self.forward.subgroup.is_some()
    }

    /// The planner shared by the kernels: short rows are packed several to a workgroup (about one
    /// lane per 16 logits); when rows are too few to give [`TARGET_GROUPS`] workgroups and are at
    /// least `split_from` long, each is split over several workgroups of at least `part_min`
    /// logits and merged by a second pass; subgroup operations reduce whenever the device has
    /// them and a workgroup holds one row part. A forced plan replaces the choice; either is then
    /// made safe for the device and the shape.
    fn plan_with(&self, kernel: Kernel, rows: u64, vocab: u32, split_from: u32, part_min: u32) -> Plan {
        let wg = self.workgroup_size;
        let plan = self.forced_plan.unwrap_or_else(|| {
            let rows_per_workgroup = if wg.is_power_of_two() && vocab <= 2048 {
                wg / vocab.div_ceil(16).next_power_of_two().min(wg)
            } else {
                1
            };
            let split = if rows_per_workgroup == 1 && rows < TARGET_GROUPS && vocab >= split_from {
                TARGET_GROUPS.div_ceil(rows.max(1)).min(u64::from(vocab / part_min)).clamp(1, 256) as u32
            } else {
                1
            };
            Plan { reduction: Reduction::Subgroup, rows_per_workgroup, split }
        });
        let rows_per_workgroup =
            if wg.is_power_of_two() && plan.rows_per_workgroup.is_power_of_two() && plan.rows_per_workgroup <= wg {
                plan.rows_per_workgroup
            } else {
                1
            };
        // Parts of at least 8 logits, and few enough that the partial results of every row fit in
        // one binding and the workgroups in one dispatch grid.
        let max_parts = (self.device.limits().max_storage_buffer_binding_size / kernel.partial_bytes())
            .min(65_535 * 65_535)
            / rows.max(1);
        let split = if rows_per_workgroup == 1 {
            plan.split.clamp(1, vocab.div_ceil(8)).min(max_parts.clamp(1, u64::from(u32::MAX)) as u32)
        } else {
            1
        };
        let reduction =
            if self.has_subgroups() && rows_per_workgroup == 1 { plan.reduction } else { Reduction::Workgroup };
        Plan { reduction, rows_per_workgroup, split }
    }

    fn modules(&self, kernel: Kernel) -> &Modules {
        match kernel {
            Kernel::Forward => &self.forward,
            Kernel::Kld => self.kld.get_or_init(|| Modules::new(&self.device, Kernel::Kld)),
            Kernel::TrainSeparate => self.train[0].get_or_init(|| Modules::new(&self.device, Kernel::TrainSeparate)),
            Kernel::TrainInPlace => self.train[1].get_or_init(|| Modules::new(&self.device, Kernel::TrainInPlace)),
        }
    }

    fn pipeline(&self, key: PipelineKey) -> wgpu::ComputePipeline {
        let mut cache = self.pipelines.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry(key)
            .or_insert_with(|| {
                let code = |d: Dtype| match d {
                    Dtype::F32 => 0.0,
                    Dtype::F16 => 1.0,
                    Dtype::BF16 => 2.0,
                };
                let modules = self.modules(key.kernel);
                let module = match (key.reduction, &modules.subgroup) {
                    (Reduction::Subgroup, Some(m)) if key.entry == Entry::Main => m,
                    _ => &modules.workgroup,
                };
                let (entry, what) = match key.entry {
                    Entry::Main => ("main", ""),
                    Entry::Combine => ("combine", " combine split rows"),
                    Entry::Grad => ("grad", " gradient of split rows"),
                    Entry::Edges => ("edges", " shared 16-bit words"),
                    Entry::SumWeights => ("sum_weights", " class weight sum"),
                };
                let label = format!("xent {}{what}", key.kernel.name());
                let shape =
                    [("WG_SIZE", f64::from(key.workgroup_size)), ("ROWS_PER_WG", f64::from(key.rows_per_workgroup))];
                let dtypes: &[(&str, f64)] = match key.kernel {
                    Kernel::Forward | Kernel::TrainSeparate | Kernel::TrainInPlace => &[("DTYPE", code(key.dtypes[0]))],
                    Kernel::Kld => &[("DTYPE_A", code(key.dtypes[0])), ("DTYPE_B", code(key.dtypes[1]))],
                };
                let features = train::feature_constants(key.kernel, key.features);
                let constants: Vec<(&str, f64)> = dtypes.iter().copied().chain(shape).chain(features).collect();
                self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&label),
                    layout: Some(&modules.pipeline_layout),
                    module,
                    entry_point: Some(entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &constants,
                        // Every workgroup variable is written before it is read.
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                })
            })
            .clone()
    }

    /// Most rows one dispatch of `kernel` covers: limited by the storage binding (each side's
    /// logits, the outputs) and the 2-D dispatch size.
    ///
    /// # Errors
    /// [`Error::Shape`] when not even one row of a side fits a binding.
    fn rows_per_chunk_for(&self, kernel: Kernel, sides: &[(Dtype, u64)], vocab: u64) -> Result<u64> {
        let align = u64::from(self.device.limits().min_storage_buffer_offset_alignment);
        // Worst-case slack a window needs: offset rounded down to `align`, end rounded up to 4.
        let room = self.max_binding.saturating_sub(align + 4);
        let mut rows = (room / kernel.per_row_bytes())
            .min(u64::from(MAX_GROUPS_PER_DIM) * u64::from(MAX_GROUPS_PER_DIM))
            .min(u64::from(u32::MAX));
        for &(dtype, row_stride) in sides {
            let es = dtype.size() as u64;
            if vocab * es > room {
                return Err(Error::Shape(format!(
                    "a row of {vocab} {dtype} logits ({} bytes) exceeds this adapter's largest storage binding ({} bytes)",
                    vocab * es,
                    self.max_binding
                )));
            }
            rows = rows.min((room / es - vocab) / row_stride.max(1) + 1);
        }
        Ok(rows)
    }

    /// Records `job` into `encoder` in one compute pass: validates every region, cuts the rows into
    /// chunks, plans each and dispatches it (plus the `combine` pass for split rows).
    fn encode_job(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        job: &Job<'_>,
        plan_of: impl Fn(u64) -> Plan,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
    ) -> Result<()> {
        let vocab = u64::from(job.vocab);
        let row_bytes = job.kernel.row_bytes();
        let sides: Vec<Side<'_>> = job.sides.iter().flatten().copied().collect();
        if vocab == 0 {
            return Err(Error::Shape("vocab is 0".into()));
        }
        for s in &sides {
            if s.row_stride < vocab && job.rows > 1 {
                return Err(Error::Shape(format!("{} row_stride {} is less than vocab {vocab}", s.name, s.row_stride)));
            }
        }
        if job.rows == 0 {
            return Ok(());
        }
        for s in &sides {
            if !s.offset.is_multiple_of(s.dtype.size() as u64) {
                return Err(Error::Buffer(format!("{}_offset must be a multiple of the element size", s.name)));
            }
            if s.row_stride > u64::from(u32::MAX) {
                return Err(Error::Shape(format!("{} row_stride {} does not fit in u32", s.name, s.row_stride)));
            }
        }
        if !job.targets_offset.is_multiple_of(4) || !job.output_offset.is_multiple_of(row_bytes) {
            return Err(Error::Buffer(format!(
                "targets_offset must be a multiple of 4, output_offset of {row_bytes} (one result)"
            )));
        }
        let overflow = || Error::Buffer("a region's end overflows u64".into());
        for s in &sides {
            let end = (job.rows - 1)
                .checked_mul(s.row_stride)
                .and_then(|e| e.checked_add(vocab))
                .and_then(|e| e.checked_mul(s.dtype.size() as u64))
                .and_then(|e| e.checked_add(s.offset))
                .ok_or_else(overflow)?;
            // Logits are bound as whole 4-byte words.
            check_region(s.name, s.buffer, end.next_multiple_of(4))?;
        }
        check_region(
            "targets",
            job.targets,
            job.rows.checked_mul(4).and_then(|b| b.checked_add(job.targets_offset)).ok_or_else(overflow)?,
        )?;
        check_region(
            "output",
            job.output,
            job.rows.checked_mul(row_bytes).and_then(|b| b.checked_add(job.output_offset)).ok_or_else(overflow)?,
        )?;

        let layout: Vec<(Dtype, u64)> = sides.iter().map(|s| (s.dtype, s.row_stride)).collect();
        let chunk = self.rows_per_chunk_for(job.kernel, &layout, vocab)?;
        // Each chunk's parameters sit at an offset that is a multiple of the adapter's alignment.
        let uniform_stride = (std::mem::size_of::<Params>() as u64)
            .next_multiple_of(u64::from(self.device.limits().min_uniform_buffer_offset_alignment));
        let n_chunks = job.rows.div_ceil(chunk);

        // Plan every chunk first: its layout, windows and uniform slot.
        struct ChunkPlan {
            plan: Plan,
            sides: Vec<Window>,
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
            let plan = plan_of(rows);
            let split_len = job.vocab.div_ceil(plan.split).next_multiple_of(8);
            let split = job.vocab.div_ceil(split_len);
            let plan = Plan { split, ..plan };
            if split > 1 {
                partial_count = partial_count.max(rows * u64::from(split));
            }
            let windows: Vec<Window> = sides
                .iter()
                .map(|s| {
                    let es = s.dtype.size() as u64;
                    let start = s.offset + r0 * s.row_stride * es;
                    let end = start + ((rows - 1) * s.row_stride + vocab) * es;
                    self.window(s.buffer, start, end, es)
                })
                .collect();
            if windows.iter().any(|w| w.size < 16) {
                return Err(Error::Buffer("a logits buffer must hold at least 16 bytes from the window start".into()));
            }
            let targets =
                self.window(job.targets, job.targets_offset + r0 * 4, job.targets_offset + (r0 + rows) * 4, 4);
            let output = self.window(
                job.output,
                job.output_offset + r0 * row_bytes,
                job.output_offset + (r0 + rows) * row_bytes,
                row_bytes,
            );
            let groups = grid((rows * u64::from(split)).div_ceil(u64::from(plan.rows_per_workgroup)));
            let side = |k: usize| sides.get(k).map_or((0, 0), |s| (windows[k].first as u32, s.row_stride as u32));
            let params = Params {
                rows: rows as u32,
                vocab: job.vocab,
                targets_offset: targets.first as u32,
                out_offset: output.first as u32,
                ignore: job.ignore,
                groups_x: groups.0,
                split,
                split_len,
                a_offset: side(0).0,
                a_stride: side(0).1,
                b_offset: side(1).0,
                b_stride: side(1).1,
            };
            let slot = (c * uniform_stride) as usize;
            uniform_bytes[slot..slot + std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(&params));
            chunks.push(ChunkPlan {
                plan,
                sides: windows,
                targets,
                output,
                groups,
                combine_groups: grid(rows.div_ceil(64)),
            });
        }
        let name = job.kernel.name();
        let uniforms = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(&format!("xent {name} params")),
            contents: &uniform_bytes,
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let partials = (partial_count > 0).then(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(&format!("xent {name} split-row partials")),
                size: partial_count * job.kernel.partial_bytes(),
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        });

        let layout = &self.modules(job.kernel).layout;
        let dtypes = [sides[0].dtype, sides.get(1).map_or(sides[0].dtype, |s| s.dtype)];
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(&format!("xent {name}")),
            timestamp_writes: timestamps,
        });
        for (c, ch) in chunks.iter().enumerate() {
            let partials_buf = match (&partials, ch.plan.split > 1) {
                (Some(p), true) => p,
                _ => &self.no_partials,
            };
            let mut entries = vec![
                buffer_entry(0, &uniforms, c as u64 * uniform_stride, std::mem::size_of::<Params>() as u64),
                buffer_entry(2, job.targets, ch.targets.offset, ch.targets.size),
                buffer_entry(3, job.output, ch.output.offset, ch.output.size),
                buffer_entry(5, partials_buf, 0, partials_buf.size()),
            ];
            for (k, (s, w)) in sides.iter().zip(&ch.sides).enumerate() {
                // The vec4 view covers whole 16-byte words only; the scalar view the whole window.
                let vec_size = (w.size / 16 * 16).max(16);
                let (vec_binding, word_binding) = if k == 0 { (1, 4) } else { (6, 7) };
                entries.push(buffer_entry(vec_binding, s.buffer, w.offset, vec_size));
                entries.push(buffer_entry(word_binding, s.buffer, w.offset, w.size));
            }
            let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(&format!("xent {name} bind group")),
                layout,
                entries: &entries,
            });
            let key = PipelineKey {
                kernel: job.kernel,
                dtypes,
                workgroup_size: self.workgroup_size,
                rows_per_workgroup: ch.plan.rows_per_workgroup,
                reduction: ch.plan.reduction,
                entry: Entry::Main,
                features: 0,
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
