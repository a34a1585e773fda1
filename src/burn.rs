//! The fused loss on [burn](https://burn.dev)'s wgpu backend, on the buffers that hold burn's
//! tensors (feature `burn`).
//!
//! burn 0.22 runs on wgpu 30 through cubecl, the same `wgpu` types as ours, so xent's kernel can
//! be recorded on burn's own device, over the storage of burn's own tensors: no copy to the host,
//! no copy on the device. The loss burn composes (`log_softmax`, a gather, a mean) makes several
//! passes and a `[rows, vocab]` temporary; this is one pass.
//!
//! ```no_run
//! use ::burn::tensor::{Int, Tensor};
//!
//! # fn main() -> xent::Result<()> {
//! // A burn device whose wgpu device xent can reach (create it before its first tensor).
//! let device = xent::burn::device()?;
//! let logits = Tensor::<2>::random([8, 32000], ::burn::tensor::Distribution::Default, &device);
//! let targets = Tensor::<1, Int>::from_ints([1, 2, 3, 4, 5, 6, 7, -100], &device);
//! // Per-token nll as a burn tensor on the same device (0 where ignored), computed in place.
//! let nll: Tensor<1> = xent::burn::cross_entropy(&logits, &targets)?;
//! let mean = nll.sum().into_scalar::<f32>() / 7.0;
//! // Or the records and a summary (this reads 16 bytes per row back to the host).
//! let summary = xent::burn::summary(&logits, &targets, &xent::Options::default())?;
//! println!("mean {mean}, perplexity {}", summary.perplexity());
//! # Ok(()) }
//! ```
//!
//! ## The device
//! wgpu gives no way back from a buffer to its device, and burn does not hand its device out once
//! created, so xent must meet the device when it is set up: [`device`] (the default adapter),
//! [`init`] (a chosen `WgpuDevice` selector) or [`register`] (an engine's own `WgpuSetup`, or
//! xent's own device through [`setup_of`]) create the burn device and keep one [`GpuContext`] for
//! it, cached for the life of the process. A tensor on a wgpu device set up any other way gets
//! [`Error::Engine`] saying so; a tensor on another backend (CUDA, the CPU) gets it too.
//!
//! ## What happens in a call
//! 1. burn's pending (lazily queued, possibly fused) operations that produce the logits and
//!    targets run: the fusion stream is drained and cubecl's recorded work is submitted to the
//!    queue. Nothing waits for the device.
//! 2. xent records its kernel over the storage buffers of the logits and targets (their offsets,
//!    chunked when larger than one binding) into a new encoder on the same queue, then a copy of
//!    its 16-byte [`RowLoss`] records into a `[rows, 4]` f32 tensor that burn allocated, and
//!    submits. (The records go through a buffer of xent's own because burn sub-allocates tensors
//!    from shared buffers, and wgpu forbids binding one buffer both read-only and writable in a
//!    dispatch.) The queue orders this after burn's work and before anything burn records later.
//! 3. The nll column is returned as a burn tensor; nothing is read back.
//!
//! burn keeps one stream of work per thread; the flush above is the calling thread's. Tensors made
//! on another thread are resolved through burn (which runs their work), but call xent from the
//! thread that made them when you can: that is the path the tests check.
//!
//! Logits: `[N, V]` or `[B, T, V]` float tensors in f32, f16 or bf16, contiguous (a transposed
//! or sliced view gets an error asking for a contiguous tensor; burn copies one when an op
//! needs it). Targets: an `Int` tensor of shape `[N]` / `[B, T]` in any integer dtype (i32 and
//! u32 are read in place; other widths are cast to i32 on the device first, so an i64 target
//! beyond the i32 range wraps instead of being reported). Autodiff tensors
//! are refused (the loss here has no backward): pass `tensor.clone().inner()` to score them, or
//! train with [`train::cross_entropy`], the loss with every training option whose backward on
//! `device.autodiff()` tensors is xent's gradient kernel.
//!
//! burn 0.22 wraps its wgpu backend in its fusion layer by default (burn's `fusion` feature, which
//! this feature turns on): the tensors xent receives are fusion handles, resolved as above.

pub mod train;

use std::sync::{Arc, Mutex};

use ::burn::backend::wgpu::{
    graphics::AutoGraphicsApi, CubeBackend, CubeTensor, RuntimeOptions, WgpuDevice, WgpuResource, WgpuSetup,
};
use ::burn::backend::{DispatchDevice, Wgpu};
use ::burn::tensor::{DType, Device, Int, Tensor};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::CubeDevice;
use burn_fusion::FusionTensor;
use cubecl_runtime::storage::ManagedResource;
use cubecl_wgpu::{AutoCompiler, WgpuServer};

use crate::error::{Error, Result};
use crate::gpu::{EncodeJob, GpuContext};
use crate::problem::{Dtype, Options, RowLoss};
use crate::summary::Summary;

/// One context per burn device xent has met, for the life of the process.
static CONTEXTS: Mutex<Vec<(WgpuDevice, Arc<GpuContext>)>> = Mutex::new(Vec::new());

fn contexts() -> std::sync::MutexGuard<'static, Vec<(WgpuDevice, Arc<GpuContext>)>> {
    CONTEXTS.lock().unwrap_or_else(|p| p.into_inner())
}

fn keep(device: &WgpuDevice, setup: &WgpuSetup) {
    let ctx = Arc::new(GpuContext::from_device(setup.device.clone(), setup.queue.clone()));
    contexts().push((device.clone(), ctx));
}

/// A burn device on the default wgpu adapter, set up so that xent can run on it.
///
/// Same as [`init`] with `WgpuDevice::default()` (cubecl's `CUBECL_WGPU_DEFAULT_DEVICE` picks the
/// adapter when set). Calling it again returns the same device.
///
/// # Errors
/// [`Error::Engine`] when burn already set the default device up (a tensor was created on it
/// before this call) or no adapter can be opened.
pub fn device() -> Result<Device> {
    init(&WgpuDevice::default())
}

/// Sets up burn's wgpu device `selector` (an adapter choice such as
/// `WgpuDevice::DiscreteGpu(0)`) and returns it as a burn [`Device`] xent can run on. Call it
/// before the device's first tensor; calling it again for the same selector returns it again.
///
/// # Errors
/// [`Error::Engine`] when burn already set this device up without xent (then use [`register`]
/// with a setup you create), or the adapter cannot be opened.
pub fn init(selector: &WgpuDevice) -> Result<Device> {
    if contexts().iter().any(|(d, _)| d == selector) {
        return Ok(Device::new(DispatchDevice::Cube(CubeDevice::Wgpu(selector.clone()))));
    }
    let options = RuntimeOptions::try_default().map_err(|e| Error::Engine(e.to_string()))?;
    let setup = ::burn::backend::wgpu::try_init_setup::<AutoGraphicsApi>(selector, options).map_err(|e| {
        Error::Engine(format!(
            "cannot set up burn's wgpu device {selector:?} for xent ({e}); call xent::burn::init before the \
             device's first tensor, or create a wgpu setup yourself and pass it to xent::burn::register"
        ))
    })?;
    keep(selector, &setup);
    Ok(Device::new(DispatchDevice::Cube(CubeDevice::Wgpu(selector.clone()))))
}

/// Registers a wgpu setup with burn (burn's `init_device`) and with xent, returning the burn
/// [`Device`] on it: for an engine that made its own wgpu device, or that wants burn on xent's
/// (see [`setup_of`]). Register a setup once and clone the device it returns.
///
/// # Errors
/// [`Error::Engine`] when burn refuses the setup (a device without compute support, say).
pub fn register(setup: WgpuSetup) -> Result<Device> {
    let ctx = GpuContext::from_device(setup.device.clone(), setup.queue.clone());
    register_with(setup, ctx)
}

/// [`register`], keeping `ctx` (a [`GpuContext`] on the setup's own device, configured as you
/// like: forced plans, smaller bindings) as the context for the device.
///
/// # Errors
/// [`Error::Engine`] when `ctx` is on another device, or burn refuses the setup.
pub fn register_with(setup: WgpuSetup, ctx: GpuContext) -> Result<Device> {
    if *ctx.device() != setup.device {
        return Err(Error::Engine("the GpuContext is not on the setup's wgpu device".into()));
    }
    let options = RuntimeOptions::try_default().map_err(|e| Error::Engine(e.to_string()))?;
    let device = ::burn::backend::wgpu::try_init_device(setup, options)
        .map_err(|e| Error::Engine(format!("burn refused the wgpu setup: {e}")))?;
    contexts().push((device.clone(), Arc::new(ctx)));
    Ok(Device::new(DispatchDevice::Cube(CubeDevice::Wgpu(device))))
}

/// A fresh wgpu setup on the default adapter with every feature and limit it offers, the way
/// [`GpuContext::new`] opens one, ready for [`register`].
///
/// # Errors
/// [`Error::NoAdapter`] when no adapter exists or the device cannot be opened.
pub fn setup_of_default_adapter() -> Result<WgpuSetup> {
    pollster::block_on(async {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions {
                power_preference: wgpu::PowerPreference::HighPerformance,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::NoAdapter(e.to_string()))?;
        setup_of(instance, adapter).await
    })
}

/// A wgpu setup on `adapter` with every feature and limit it offers, ready for [`register`].
///
/// # Errors
/// [`Error::NoAdapter`] when the device cannot be opened.
pub async fn setup_of(instance: wgpu::Instance, adapter: wgpu::Adapter) -> Result<WgpuSetup> {
    let (device, queue) = adapter
        .request_device(&wgpu::DeviceDescriptor {
            label: Some("xent + burn"),
            required_features: adapter.features(),
            required_limits: adapter.limits(),
            ..Default::default()
        })
        .await
        .map_err(|e| Error::NoAdapter(format!("{}: {e}", adapter.get_info().name)))?;
    let backend = adapter.get_info().backend;
    Ok(WgpuSetup { instance, adapter, device, queue, backend })
}

/// The [`GpuContext`] xent keeps for a burn device (for [`GpuContext::encode`] on burn's buffers
/// yourself, or to read its limits).
///
/// # Errors
/// [`Error::Engine`] when `device` is not a wgpu device set up through this module.
pub fn context(device: &Device) -> Result<Arc<GpuContext>> {
    let wgpu_device = wgpu_device_of(device)?;
    contexts().iter().find(|(d, _)| *d == wgpu_device).map(|(_, c)| c.clone()).ok_or_else(|| {
        Error::Engine(format!(
            "burn device {wgpu_device:?} was not set up through xent, so xent cannot reach its wgpu device: \
             create it with xent::burn::device(), xent::burn::init(..) or xent::burn::register(..) before its \
             first tensor"
        ))
    })
}

fn wgpu_device_of(device: &Device) -> Result<WgpuDevice> {
    match device.as_dispatch() {
        DispatchDevice::Cube(CubeDevice::Wgpu(d)) => Ok(d.clone()),
        other => Err(Error::Engine(format!(
            "tensor is on {other:?}, not a wgpu device: xent::burn runs on burn's wgpu backend only"
        ))),
    }
}

/// Per-token negative log-likelihood of `targets` under `logits`, computed by xent's fused kernel
/// on burn's device over the tensors' own buffers; PyTorch's ignore index (-100).
///
/// `logits` is `[N, V]` (then `targets` is `[N]`) or `[B, T, V]` (`targets` `[B, T]`); the result
/// has the targets' shape, f32, on the same device: 0 where ignored, NaN where a target is out of
/// range (use [`score`] to get an error for those instead). See the module docs for what is
/// accepted and what happens.
///
/// # Errors
/// [`Error::Shape`] for mismatched shapes, [`Error::Dtype`] for logits that are not
/// f32/f16/bf16, [`Error::Engine`] for a device xent was not set up on, a non-contiguous or
/// autodiff tensor; [`Error::Gpu`] when the device rejects the work.
pub fn cross_entropy<const D: usize, const E: usize>(
    logits: &Tensor<D>,
    targets: &Tensor<E, Int>,
) -> Result<Tensor<E>> {
    cross_entropy_with(logits, targets, &Options::default())
}

/// [`cross_entropy`] with [`Options`] (the ignore index).
///
/// # Errors
/// As [`cross_entropy`].
pub fn cross_entropy_with<const D: usize, const E: usize>(
    logits: &Tensor<D>,
    targets: &Tensor<E, Int>,
    opts: &Options,
) -> Result<Tensor<E>> {
    let records = records(logits, targets, opts)?;
    let rows = records.dims()[0];
    let nll = records.narrow(1, 0, 1).reshape([rows]);
    let shape: [usize; E] = std::array::from_fn(|i| targets.dims()[i]);
    Ok(nll.reshape(shape))
}

/// One [`RowLoss`] per token (row-major over `[N]` or `[B, T]`), read back to the host (16 bytes
/// a row): nll, lse, argmax, flags.
///
/// # Errors
/// As [`cross_entropy`], and [`Error::TargetOutOfRange`] naming the first row whose target is
/// negative (and not the ignore index) or `>= vocab`.
pub fn score<const D: usize, const E: usize>(
    logits: &Tensor<D>,
    targets: &Tensor<E, Int>,
    opts: &Options,
) -> Result<Vec<RowLoss>> {
    let records = records(logits, targets, opts)?;
    let data = records.into_data();
    let words: &[f32] = data.as_slice().map_err(|e| Error::Engine(format!("reading the results back: {e:?}")))?;
    let rows: Vec<RowLoss> = bytemuck::cast_slice(words).to_vec();
    if let Some(row) = rows.iter().position(|r| r.flags & RowLoss::BAD_TARGET != 0) {
        let vocab = logits.dims()[D - 1];
        let flat = targets.clone().reshape([rows.len()]);
        let target = flat.narrow(0, row, 1).into_scalar::<i64>();
        return Err(Error::TargetOutOfRange { row, target, vocab });
    }
    Ok(rows)
}

/// The [`Summary`] (mean nll, perplexity, accuracy, ...) of [`score`]'s records.
///
/// # Errors
/// As [`score`].
pub fn summary<const D: usize, const E: usize>(
    logits: &Tensor<D>,
    targets: &Tensor<E, Int>,
    opts: &Options,
) -> Result<Summary> {
    Ok(Summary::of(&score(logits, targets, opts)?))
}

/// The kernel's `[rows, 4]` records (bit patterns of [`RowLoss`], as f32) in a burn tensor.
fn records<const D: usize, const E: usize>(
    logits: &Tensor<D>,
    targets: &Tensor<E, Int>,
    opts: &Options,
) -> Result<Tensor<2>> {
    let (rows, vocab) = check_shapes(logits, targets)?;
    let dtype = kernel_dtype(logits.dtype())?;
    let device = logits.device();
    if targets.device() != device {
        return Err(Error::Engine("logits and targets are on different devices".into()));
    }
    let ctx = context(&device)?;
    let options = ::burn::tensor::TensorCreationOptions::new(device).with_dtype(DType::F32);
    if rows == 0 {
        return Ok(Tensor::<2>::zeros([0, 4], options));
    }

    // Targets as 32-bit words: i32/u32 read as they are (the ignore index compared bit for bit),
    // anything else cast on the device first.
    let (targets, ignore) = match targets.dtype() {
        DType::I32 | DType::U32 => (targets.clone(), ignore_word(opts.ignore_index)),
        _ => (targets.clone().cast(DType::I32), ignore_word(opts.ignore_index)),
    };
    let output = Tensor::<2>::empty([rows, 4], options);

    // Step 1: resolve burn's lazy tensors (runs what produces them) down to their storage, and
    // send everything cubecl recorded so far to the queue before our work.
    let l = storage(logits)?;
    let t = int_storage(&targets)?;
    let o = storage(&output)?;

    // Step 2: our kernel over burn's buffers, on burn's queue. The records go to a buffer of our
    // own and are then copied into the burn tensor: burn sub-allocates tensors from shared
    // buffers, and wgpu forbids binding one buffer both read-only (the logits) and writable in
    // one dispatch.
    let record_bytes = rows as u64 * crate::gpu::ROW_LOSS_BYTES;
    ctx.in_error_scopes(|| {
        let scratch = ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("xent::burn records"),
            size: record_bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut encoder =
            ctx.device().create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("xent::burn") });
        ctx.encode(
            &mut encoder,
            &EncodeJob {
                logits: l.buffer(),
                logits_offset: l.offset(),
                dtype,
                row_stride: vocab as u64,
                rows: rows as u64,
                vocab: vocab as u32,
                targets: t.buffer(),
                targets_offset: t.offset(),
                ignore,
                output: &scratch,
                output_offset: 0,
            },
        )?;
        encoder.copy_buffer_to_buffer(&scratch, 0, o.buffer(), o.offset(), record_bytes);
        ctx.queue().submit([encoder.finish()]);
        Ok(())
    })?;
    Ok(output)
}

/// `(rows, vocab)` of logits `[N, V]` with targets `[N]`, or `[B, T, V]` with `[B, T]`.
fn check_shapes<const D: usize, const E: usize, K>(logits: &Tensor<D>, targets: &Tensor<E, K>) -> Result<(usize, usize)>
where
    K: ::burn::tensor::kind::Basic,
{
    let dims = logits.dims();
    if !(D == 2 || D == 3) || E + 1 != D {
        return Err(Error::Shape(format!(
            "xent::burn takes logits [N, V] with targets [N], or [B, T, V] with [B, T]; got logits of rank {D} \
             and targets of rank {E}"
        )));
    }
    if dims[..D - 1] != targets.dims()[..] {
        return Err(Error::Shape(format!("logits {dims:?} and targets {:?} disagree", targets.dims())));
    }
    let vocab = dims[D - 1];
    if vocab == 0 || vocab > u32::MAX as usize {
        return Err(Error::Shape(format!("vocab {vocab} is outside 1..=2^32-1")));
    }
    Ok((dims[..D - 1].iter().product(), vocab))
}

/// xent's name for a burn float dtype the kernels read.
fn kernel_dtype(dtype: DType) -> Result<Dtype> {
    match dtype {
        DType::F32 => Ok(Dtype::F32),
        DType::F16 => Ok(Dtype::F16),
        DType::BF16 => Ok(Dtype::BF16),
        other => {
            Err(Error::Dtype { dtype: format!("{other:?}"), expected: "burn logits must be f32, f16 or bf16".into() })
        }
    }
}

/// The 32-bit pattern an i32 target equal to `ignore_index` has (`None`: no i32 equals it).
fn ignore_word(ignore_index: i64) -> Option<u32> {
    i32::try_from(ignore_index).ok().map(|i| i as u32)
}

fn fusion_tensor<const D: usize, K>(tensor: Tensor<D, K>) -> Result<FusionTensor<FusionCubeRuntime>>
where
    K: ::burn::tensor::BackendPrimitive<Wgpu, Primitive = FusionTensor<FusionCubeRuntime>>
        + ::burn::tensor::kind::Basic,
{
    tensor.try_into_primitive::<Wgpu>().map_err(|e| {
        Error::Engine(format!(
            "not a tensor of burn's wgpu backend ({e:?}); autodiff tensors: pass tensor.clone().inner()"
        ))
    })
}

fn resolve_float<const D: usize>(tensor: Tensor<D>) -> Result<CubeTensor> {
    let fused = fusion_tensor(tensor)?;
    Ok(fused.client.clone().resolve_tensor_float::<CubeBackend>(fused))
}

fn resolve_int<const D: usize>(tensor: Tensor<D, Int>) -> Result<CubeTensor> {
    let fused = fusion_tensor(tensor)?;
    Ok(fused.client.clone().resolve_tensor_int::<CubeBackend>(fused))
}

type Resource = ManagedResource<WgpuResource>;

/// The storage of a burn tensor on a wgpu device: the buffer, the byte offset of its first
/// element and its size in bytes, pinned (cubecl neither frees nor moves it) while this value
/// lives. For [`GpuContext::encode`] over burn's buffers yourself.
pub struct Storage {
    resource: Resource,
    /// The tensor's element type.
    pub dtype: DType,
    /// The tensor's shape.
    pub shape: Vec<usize>,
}

impl Storage {
    /// The wgpu buffer holding the tensor.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.resource.resource().buffer
    }
    /// Byte offset of the tensor's first element in [`Storage::buffer`].
    pub fn offset(&self) -> u64 {
        self.resource.resource().offset
    }
    /// Bytes from [`Storage::offset`] that belong to the tensor.
    pub fn size(&self) -> u64 {
        self.resource.resource().size
    }
}

/// The storage of a float tensor, after running the work that produces it and submitting
/// everything burn has recorded so far to the queue (so that work you submit next sees it).
///
/// # Errors
/// [`Error::Engine`] for a tensor not on burn's wgpu backend, an autodiff tensor, or a
/// non-contiguous one.
pub fn storage<const D: usize>(tensor: &Tensor<D>) -> Result<Storage> {
    storage_of(resolve_float(tensor.clone())?, tensor.dtype(), tensor.dims().to_vec())
}

/// [`storage`] for an `Int` tensor.
///
/// # Errors
/// As [`storage`].
pub fn int_storage<const D: usize>(tensor: &Tensor<D, Int>) -> Result<Storage> {
    storage_of(resolve_int(tensor.clone())?, tensor.dtype(), tensor.dims().to_vec())
}

fn storage_of(cube: CubeTensor, dtype: DType, shape: Vec<usize>) -> Result<Storage> {
    if !cube.is_contiguous() {
        return Err(Error::Engine("tensor is not contiguous (a transposed or strided view)".into()));
    }
    let resource = resource(&cube)?;
    cube.client.flush().map_err(|e| Error::Engine(format!("burn's queued work failed: {e}")))?;
    Ok(Storage { resource, dtype, shape })
}

fn resource(tensor: &CubeTensor) -> Result<Resource> {
    tensor
        .client
        .get_resource::<WgpuServer<AutoCompiler>>(tensor.handle.clone())
        .map_err(|e| Error::Engine(format!("cannot reach the storage of a burn tensor: {e}")))
}
