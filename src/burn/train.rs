//! Training on burn: the cross-entropy loss with every option of [`LossOptions`], whose backward
//! on burn's autodiff backend is xent's gradient (feature `burn`).
//!
//! ```no_run
//! use ::burn::tensor::{Int, Tensor};
//! use xent::train::{LossOptions, LossReduction};
//!
//! # fn main() -> xent::Result<()> {
//! // xent must meet burn's wgpu device first; autodiff is a property of the device.
//! let device = xent::burn::device()?.autodiff();
//! let logits = Tensor::<2>::random([8, 32000], ::burn::tensor::Distribution::Default, &device).require_grad();
//! let targets = Tensor::<1, Int>::from_ints([1, 2, 3, 4, 5, 6, 7, -100], &device);
//! let opts = LossOptions { label_smoothing: 0.1, z_loss: 1e-4, ..LossOptions::default() };
//! let loss = xent::burn::train::cross_entropy(&logits, &targets, &opts)?; // [1], the mean
//! let grads = loss.backward(); // runs xent's backward
//! let dlogits: Tensor<2> = logits.grad(&grads).expect("a gradient");
//! # Ok(()) }
//! ```
//!
//! ## What it computes
//! Exactly [`crate::train`]'s loss (PyTorch's `F.cross_entropy` with `weight`, `ignore_index`,
//! `reduction`, `label_smoothing`, plus `z_loss` and `softcap`): the module docs there give the
//! formulas. [`cross_entropy`] returns the reduced loss as a `[1]` tensor for `mean` and `sum`, and
//! the `[N]` per-row losses for `none` (rows in row-major order over `[B, T]`), f32, on the
//! logits' device.
//!
//! ## How the backward is wired
//! burn 0.22's tensors carry no backend type: autodiff is a property of the device
//! (`device.autodiff()`). On such a tensor [`cross_entropy`] records one node in burn's autodiff
//! graph (burn's backend-extension pattern: a [`Backward`] step over the inner wgpu backend, its
//! parent the logits) whose state is what the backward needs: the logits themselves (burn keeps
//! them alive until the backward, as it does for its own loss), the targets in kernel form, the
//! class weights and each row's factor (`1 / Σ w_t` under `mean`, 0 for ignored rows). When
//! `loss.backward()` reaches the node, burn hands it the upstream gradient `∂L/∂loss` (a `[1]`
//! or `[N]` tensor on the device); the per-row scale `upstream × factor` is formed on the device
//! and xent's loss-and-gradient kernel writes `∂L/∂logits` — into the logits' own buffer when
//! burn says nothing else holds it (the caller dropped its logits before the backward: the
//! in-place, no-second-buffer path), otherwise into a new burn tensor of the logits' dtype.
//! Nothing is read back to the host in the forward or the backward. The forward reads the logits
//! once (the kernel without a gradient: per-row loss and lse), the backward twice and writes the
//! gradient once.
//!
//! The forward validates every option and shape up front, so the backward has nothing left to
//! reject; a GPU failure during the backward (the device lost, out of memory) panics there with
//! the error, since burn's backward cannot return one.
//!
//! A target outside `0..V` that is not the ignore index cannot be reported without reading the
//! targets back (torch raises an error): its row's loss and gradient are NaN, as
//! [`super::cross_entropy`]'s nll is — under `mean` the loss and the whole gradient, the mean's
//! denominator being NaN.
//!
//! In place needs the logits' buffer to be xent's alone when the backward runs: pass a temporary
//! (`cross_entropy(&model.forward(x), ..)`) or drop the logits before `loss.backward()`, and not
//! a view of a tensor still alive. [`backward_stats`] counts which way each backward went.
//!
//! Without autodiff (a plain wgpu device) [`cross_entropy`] computes the same loss and records
//! nothing.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ::burn::backend::autodiff::checkpoint::base::Checkpointer;
use ::burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use ::burn::backend::autodiff::grads::Gradients;
use ::burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use ::burn::backend::wgpu::{CubeBackend, CubeTensor};
use ::burn::backend::{Autodiff, DispatchKindConversion, DispatchTensor, Wgpu};
use ::burn::tensor::{DType, Device, GradientCheckpointingStrategy, Int, Tensor, TensorCreationOptions, TensorData};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_fusion::custom::{CustomOpIr, HandleContainer, Operation, OperationIr, StreamId, TensorId, TensorIr};
use burn_fusion::{ExecutionError, FusionRuntime, FusionTensor};
use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::gpu::{ClassWeights, GpuContext, GradOutput, TrainEncodeJob, TRAIN_ROW_BYTES};
use crate::problem::Dtype;
use crate::train::{LossOptions, LossReduction};

/// A tensor of burn's wgpu backend (a fusion handle).
type Primitive = FusionTensor<FusionCubeRuntime>;

/// Cross-entropy of `targets` under `logits` with every option of [`LossOptions`]; on an
/// autodiff device, `loss.backward()` runs xent's gradient kernel.
///
/// `logits` is `[N, V]` (then `targets` is `[N]`) or `[B, T, V]` (`targets` `[B, T]`), f32, f16
/// or bf16, contiguous, on a wgpu device set up through [`super::device`], [`super::init`] or
/// [`super::register`] (with `.autodiff()` for training). `targets` is an `Int` tensor of any
/// integer dtype on the same device (with or without autodiff). The result is `[1]` (the mean
/// or the sum) or `[N]` (`reduction: none`), f32; its gradient with respect to `logits` has
/// the logits' shape and dtype. See the module docs for what happens in the forward and the
/// backward.
///
/// # Errors
/// [`Error::Shape`] for mismatched shapes or a `weight` not of length `V`; [`Error::Dtype`] for
/// logits that are not f32/f16/bf16; [`Error::Argument`] for an option out of its range (as
/// [`crate::train::prepare`] reports them); [`Error::Engine`] for a device xent was not set up
/// on, tensors on different devices, or a non-contiguous tensor; [`Error::Gpu`] when the device
/// rejects the forward's work.
pub fn cross_entropy<const D: usize, const E: usize>(
    logits: &Tensor<D>,
    targets: &Tensor<E, Int>,
    opts: &LossOptions<'_>,
) -> Result<Tensor<1>> {
    let (rows, vocab) = super::check_shapes(logits, targets)?;
    let dtype = super::kernel_dtype(logits.dtype())?;
    opts.validate(vocab)?;
    let device = logits.device();
    if targets.device() != device {
        return Err(Error::Engine("logits and targets are on different devices".into()));
    }
    let plain = device.clone().inner();
    let ctx = super::context(&plain)?;
    let f32_options = TensorCreationOptions::new(plain.clone()).with_dtype(DType::F32);
    if rows == 0 {
        // torch: the mean of nothing is NaN, the sum 0; the gradient is empty. Composed of
        // burn's ops on the (empty) logits so that a backward through it works.
        let flat = logits.clone().reshape([0, vocab]);
        return Ok(match opts.reduction {
            LossReduction::None => flat.sum_dim(1).reshape([0]),
            LossReduction::Sum => flat.sum().mul_scalar(0.0),
            LossReduction::Mean => flat.sum().mul_scalar(0.0).add_scalar(f32::NAN),
        });
    }

    // Targets in kernel form, and each row's factor (on the device, nothing read back).
    let targets = kernel_targets(targets.clone().inner().reshape([rows]), opts.ignore_index, vocab);
    let ignored = targets.clone().equal_elem(-1);
    let bad = targets.clone().greater_equal_elem(vocab as i64);
    let safe = targets.clone().mask_fill(ignored.clone().bool_or(bad.clone()), 0);
    let w_t = match opts.weight {
        Some(w) => Tensor::<1>::from_data(TensorData::new(w.to_vec(), [vocab]), f32_options.clone()).gather(0, safe),
        None => Tensor::<1>::ones([rows], f32_options.clone()),
    };
    // A target out of range has no weight: NaN, as its loss.
    let w_t = w_t.mask_fill(bad, f32::NAN).mask_fill(ignored.clone(), 0.0);
    let weight_sum = w_t.sum();
    let ones = Tensor::<1>::ones([rows], f32_options);
    let factor = match opts.reduction {
        LossReduction::Mean => ones.div(weight_sum.clone()),
        LossReduction::Sum | LossReduction::None => ones,
    }
    .mask_fill(ignored, 0.0);

    let targets_buffer = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("xent::burn::train targets"),
        size: rows as u64 * 4,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let weight = opts.weight.map(|w| {
        ctx.device().create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("xent::burn::train class weights"),
            contents: bytemuck::cast_slice(w),
            usage: wgpu::BufferUsages::STORAGE,
        })
    });
    let mut state = State {
        ctx,
        device: plain,
        logits: None,
        factor: None,
        targets: targets_buffer,
        weight,
        rows,
        vocab,
        dtype,
        label_smoothing: opts.label_smoothing,
        z_loss: opts.z_loss,
        softcap: opts.softcap,
    };
    let flat = logits.clone().reshape([rows, vocab]);
    let reduce = |row_loss: Tensor<1>| match opts.reduction {
        LossReduction::None => row_loss,
        LossReduction::Sum => row_loss.sum(),
        LossReduction::Mean => row_loss.sum().div(weight_sum.clone()),
    };
    match flat.gradient_checkpointing_strategy() {
        None => {
            let x = prim_float(flat)?;
            Ok(reduce(state.forward(&x, &targets)?))
        }
        Some(strategy) => {
            state.factor = Some(prim_float(factor)?);
            match strategy {
                GradientCheckpointingStrategy::Balanced => {
                    tracked::<BalancedCheckpointing>(flat, &targets, state, reduce)
                }
                _ => tracked::<NoCheckpointing>(flat, &targets, state, reduce),
            }
        }
    }
}

/// Where the backward passes of this process wrote their gradients: see [`backward_stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BackwardStats {
    /// Over the logits' own buffer: nothing else held it when the backward ran.
    pub in_place: u64,
    /// Into a new burn tensor: the logits were still held (by the caller, or a view of them).
    /// Includes [`BackwardStats::shared`].
    pub separate: u64,
    /// Of [`BackwardStats::separate`]: burn placed the new tensor in the logits' own wgpu buffer
    /// (it sub-allocates tensors from shared pages), and the kernel wrote it there directly,
    /// binding both regions at once.
    pub shared: u64,
    /// Into a new burn tensor through a buffer of xent's, then copied: burn placed the new tensor
    /// where one dispatch cannot write it beside the logits — a 16-bit gradient whose element
    /// parity differs from theirs, or a region of their buffer too far from theirs for one binding.
    pub staged: u64,
}

static IN_PLACE: AtomicU64 = AtomicU64::new(0);
static SEPARATE: AtomicU64 = AtomicU64::new(0);
static SHARED: AtomicU64 = AtomicU64::new(0);
static STAGED: AtomicU64 = AtomicU64::new(0);

/// How many backward passes of [`cross_entropy`] in this process wrote their gradient in place,
/// and how many did not: to check that a training loop lets xent reuse the logits' buffer (drop
/// the logits, or pass a temporary, before `loss.backward()`).
pub fn backward_stats() -> BackwardStats {
    BackwardStats {
        in_place: IN_PLACE.load(Ordering::Relaxed),
        separate: SEPARATE.load(Ordering::Relaxed),
        shared: SHARED.load(Ordering::Relaxed),
        staged: STAGED.load(Ordering::Relaxed),
    }
}

/// The loss as a node of burn's autodiff graph under checkpointing strategy `C`.
fn tracked<C: CheckpointStrategy>(
    logits: Tensor<2>,
    targets: &Tensor<1, Int>,
    mut state: State,
    reduce: impl FnOnce(Tensor<1>) -> Tensor<1>,
) -> Result<Tensor<1>>
where
    DispatchTensor: DispatchKindConversion<Autodiff<Wgpu, C>>,
{
    let tensor = logits.try_into_primitive::<Autodiff<Wgpu, C>>().map_err(|e| {
        Error::Engine(format!("not an autodiff tensor of burn's wgpu backend ({e:?}): xent::burn runs on wgpu only"))
    })?;
    let (x, node) = tensor.into_parts();
    let loss = prim_float(reduce(state.forward(&x, targets)?))?;
    let out = match LossBackward.prepare::<C>([node]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            state.logits = Some(x);
            prep.finish(state, loss)
        }
        OpsKind::UnTracked(prep) => prep.finish(loss),
    };
    Ok(Tensor::from_primitive::<Autodiff<Wgpu, C>>(out))
}

/// The backward step: `∂L/∂logits = upstream × factor × xent's per-row gradient`.
#[derive(Debug)]
struct LossBackward;

impl Backward<Wgpu, 1> for LossBackward {
    type State = State;

    fn backward(self, ops: Ops<State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let upstream = grads.consume::<Wgpu>(&ops.node);
        let [parent] = ops.parents;
        let Some(parent) = parent else { return };
        let grad = ops
            .state
            .gradient(upstream)
            .unwrap_or_else(|e| panic!("xent::burn::train::cross_entropy: the backward failed: {e}"));
        grads.register::<Wgpu>(parent.id, grad);
    }
}

/// Everything the forward and the backward compute from, on the device.
#[derive(Clone)]
struct State {
    ctx: Arc<GpuContext>,
    /// The logits' device, without autodiff.
    device: Device,
    /// `[N, V]` logits, kept for the backward (`None` until the node is recorded).
    logits: Option<Primitive>,
    /// `[N]` f32: what the upstream gradient is multiplied by for each row (`1 / Σ w_t` under
    /// `mean`, 1 otherwise; 0 for ignored rows).
    factor: Option<Primitive>,
    /// `[N]` u32 targets in kernel form ([`crate::IGNORED_TARGET`] for ignored rows), xent's.
    targets: wgpu::Buffer,
    /// `[V]` f32 class weights, xent's.
    weight: Option<wgpu::Buffer>,
    rows: usize,
    vocab: usize,
    dtype: Dtype,
    label_smoothing: f32,
    z_loss: f32,
    softcap: Option<f32>,
}

impl fmt::Debug for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("xent::burn::train::State")
            .field("rows", &self.rows)
            .field("vocab", &self.vocab)
            .field("dtype", &self.dtype)
            .field("label_smoothing", &self.label_smoothing)
            .field("z_loss", &self.z_loss)
            .field("softcap", &self.softcap)
            .field("weighted", &self.weight.is_some())
            .finish_non_exhaustive()
    }
}

/// What the kernel writes besides the gradient.
enum Records<'a> {
    /// Into this burn tensor's storage, through a buffer of our own.
    Into(&'a super::Storage),
    /// Nowhere anyone reads.
    Discard,
}

impl State {
    /// Records work into one encoder, submits it, and reports the device's validation errors.
    fn in_scopes(&self, record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>) -> Result<()> {
        let ctx = &self.ctx;
        ctx.in_error_scopes(|| {
            let mut encoder = ctx
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("xent::burn::train") });
            record(&mut encoder)?;
            ctx.queue().submit([encoder.finish()]);
            Ok(())
        })
    }

    /// Records the kernel over `logits` (read-only, or written over with the gradient).
    fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        logits: (&wgpu::Buffer, u64),
        scale: &wgpu::Buffer,
        grad: GradOutput<'_>,
        records: Records<'_>,
    ) -> Result<()> {
        let bytes = self.rows as u64 * TRAIN_ROW_BYTES;
        let output = self.ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("xent::burn::train records"),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        self.ctx.encode_loss_and_grad(
            encoder,
            &TrainEncodeJob {
                logits: logits.0,
                logits_offset: logits.1,
                dtype: self.dtype,
                row_stride: self.vocab as u64,
                rows: self.rows as u64,
                vocab: self.vocab as u32,
                targets: &self.targets,
                targets_offset: 0,
                ignore: None,
                scale,
                scale_offset: 0,
                weight: self.weight.as_ref().map(|buffer| ClassWeights { buffer, offset: 0 }),
                label_smoothing: self.label_smoothing,
                z_loss: self.z_loss,
                softcap: self.softcap,
                output: &output,
                output_offset: 0,
                grad,
            },
        )?;
        if let Records::Into(o) = records {
            encoder.copy_buffer_to_buffer(&output, 0, o.buffer(), o.offset(), bytes);
        }
        Ok(())
    }

    /// The per-row losses `[N]` (0 for ignored rows, NaN for a target out of range): one read of
    /// the logits, no gradient. `targets` (kernel form) are first copied to the state's buffer,
    /// where the backward finds them: the kernel binds them beside logits it may write in place,
    /// and burn may hold both in one buffer.
    fn forward(&self, logits: &Primitive, targets: &Tensor<1, Int>) -> Result<Tensor<1>> {
        let options = TensorCreationOptions::new(self.device.clone()).with_dtype(DType::F32);
        let out = Tensor::<2>::empty([self.rows, 2], options);
        let t = super::int_storage(targets)?;
        let x = super::storage(&Tensor::<2>::from_primitive::<Wgpu>(logits.clone()))?;
        let o = super::storage(&out)?;
        self.in_scopes(|encoder| {
            encoder.copy_buffer_to_buffer(t.buffer(), t.offset(), &self.targets, 0, self.rows as u64 * 4);
            // The scales are not read without a gradient: any buffer of N words will do.
            self.encode(encoder, (x.buffer(), x.offset()), &self.targets, GradOutput::None, Records::Into(&o))
        })?;
        Ok(out.narrow(1, 0, 1).reshape([self.rows]))
    }

    /// `∂L/∂logits` for the upstream gradient `upstream` (`[1]` or `[N]`), in the logits' dtype:
    /// over the logits when nothing else holds their buffer, else into a new tensor.
    fn gradient(mut self, upstream: Primitive) -> Result<Primitive> {
        let missing = || Error::Engine("the loss node has no saved logits: burn ran its backward twice?".into());
        // Taken, not cloned: the state may hold the last reference to the logits.
        let logits = self.logits.take().ok_or_else(missing)?;
        let factor = self.factor.take().ok_or_else(missing)?;
        let upstream = Tensor::<1>::from_primitive::<Wgpu>(upstream);
        let upstream = if upstream.dtype() == DType::F32 { upstream } else { upstream.cast(DType::F32) };
        let factor = Tensor::<1>::from_primitive::<Wgpu>(factor);
        // Ignored rows get exactly 0, whatever the upstream gradient holds.
        let ignored = factor.clone().equal_elem(0.0);
        let scale = factor.mul(upstream).mask_fill(ignored, 0.0);
        let scale = super::storage(&scale)?;
        let (client, shape, dtype) = (logits.client.clone(), logits.shape.clone(), logits.dtype);
        let scale_buffer = self.ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("xent::burn::train scales"),
            size: self.rows as u64 * 4,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let copy_scale = |encoder: &mut wgpu::CommandEncoder| {
            encoder.copy_buffer_to_buffer(scale.buffer(), scale.offset(), &scale_buffer, 0, self.rows as u64 * 4);
        };

        // Resolving a tensor nothing else refers to hands its buffer over (burn's own rule for
        // in-place kernels); `can_mut` then says whether another tensor (a view, the caller's
        // un-flattened logits) still shares it.
        let cube = client.clone().resolve_tensor_float::<CubeBackend>(logits);
        if cube.can_mut() && cube.is_contiguous() {
            let x = super::resource(&cube)?;
            cube.client.flush().map_err(|e| Error::Engine(format!("burn's queued work failed: {e}")))?;
            let buffer = &x.resource().buffer;
            self.in_scopes(|encoder| {
                copy_scale(encoder);
                self.encode(
                    encoder,
                    (buffer, x.resource().offset),
                    &scale_buffer,
                    GradOutput::InPlace,
                    Records::Discard,
                )
            })?;
            drop(x);
            IN_PLACE.fetch_add(1, Ordering::Relaxed);
            return Ok(publish(&client, cube, shape, dtype));
        }

        let x = super::storage_of(cube, dtype, vec![self.rows, self.vocab])?;
        let options = TensorCreationOptions::new(self.device.clone()).with_dtype(dtype);
        let grad = Tensor::<2>::empty([self.rows, self.vocab], options);
        let g = super::storage(&grad)?;
        let es = self.dtype.size() as u64;
        let bytes = (self.rows * self.vocab) as u64 * es;
        // burn sub-allocates tensors from shared pages, so the gradient may land in the logits'
        // buffer: written there directly when both regions fit one binding (a page does), else —
        // or when a 16-bit gradient's word parity differs from theirs — through a buffer of ours.
        let shared = g.buffer() == x.buffer();
        // (The encoder's rule: a row of each, as far apart as the regions, within one binding.)
        let span = x.offset().abs_diff(g.offset()) + self.vocab as u64 * es;
        let align = u64::from(self.ctx.device().limits().min_storage_buffer_offset_alignment);
        let direct = (es == 4 || (g.offset() / 2) % 2 == (x.offset() / 2) % 2)
            && (!shared || span + align + 4 <= self.ctx.max_binding_bytes());
        if direct {
            self.in_scopes(|encoder| {
                copy_scale(encoder);
                let out = GradOutput::Buffer { buffer: g.buffer(), offset: g.offset(), row_stride: self.vocab as u64 };
                self.encode(encoder, (x.buffer(), x.offset()), &scale_buffer, out, Records::Discard)
            })?;
            SEPARATE.fetch_add(1, Ordering::Relaxed);
            if shared {
                SHARED.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            // Whole words: burn aligns each tensor's start far beyond 4 bytes, so the word that
            // ends an odd-length 16-bit tensor holds nothing else.
            let copy = bytes.next_multiple_of(4);
            if x.offset() % 4 != 0 || g.offset() % 4 != 0 || g.size().next_multiple_of(4) < copy {
                return Err(Error::Engine(format!(
                    "cannot place a gradient of {bytes} bytes at offset {} of a burn buffer ({} bytes held)",
                    g.offset(),
                    g.size()
                )));
            }
            let scratch = self.ctx.device().create_buffer(&wgpu::BufferDescriptor {
                label: Some("xent::burn::train gradient"),
                size: copy,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            self.in_scopes(|encoder| {
                copy_scale(encoder);
                let out = GradOutput::Buffer { buffer: &scratch, offset: 0, row_stride: self.vocab as u64 };
                self.encode(encoder, (x.buffer(), x.offset()), &scale_buffer, out, Records::Discard)?;
                encoder.copy_buffer_to_buffer(&scratch, 0, g.buffer(), g.offset(), copy);
                Ok(())
            })?;
            STAGED.fetch_add(1, Ordering::Relaxed);
        }
        drop((x, g));
        prim_float(grad)
    }
}
/// `tensor` (a buffer burn handed over, now holding the gradient) as a burn tensor again: a
/// fusion operation without inputs whose output is that buffer, run when burn next needs it.
fn publish(
    client: &burn_fusion::Client<FusionCubeRuntime>,
    tensor: CubeTensor,
    shape: ::burn::tensor::Shape,
    dtype: DType,
) -> Primitive {
    let id = client.create_empty_handle();
    let out = TensorIr::uninit(id, shape, dtype);
    let op = OperationIr::Custom(CustomOpIr::new("xent_gradient_in_place", &[], &[out]));
    let publish = Publish { id, tensor: Mutex::new(Some(tensor)) };
    let mut outputs = client.register(StreamId::current(), op, publish);
    outputs.pop().expect("the operation has one output")
}

/// The fusion operation of [`publish`].
struct Publish {
    id: TensorId,
    tensor: Mutex<Option<CubeTensor>>,
}

impl fmt::Debug for Publish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("xent::burn::train::Publish").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Operation<FusionCubeRuntime> for Publish {
    fn execute(
        &self,
        handles: &mut HandleContainer<<FusionCubeRuntime as FusionRuntime>::FusionHandle>,
    ) -> std::result::Result<(), ExecutionError> {
        let tensor = self.tensor.lock().unwrap_or_else(|p| p.into_inner()).take();
        let tensor = tensor.ok_or_else(|| ExecutionError::generic("xent's in-place gradient was published twice"))?;
        handles.register_float_tensor::<CubeBackend>(&self.id, tensor);
        Ok(())
    }
}

/// The targets as i32 in kernel form: the ignore index becomes -1 (`u32::MAX`, xent's
/// [`crate::IGNORED_TARGET`]); a negative target that is not the ignore index becomes `V`, out
/// of range as it was.
fn kernel_targets(targets: Tensor<1, Int>, ignore_index: i64, vocab: usize) -> Tensor<1, Int> {
    let t = if targets.dtype() == DType::I32 { targets } else { targets.cast(DType::I32) };
    // An ignore index beyond the i32 range matches no (i32) target.
    let ignored = i32::try_from(ignore_index).ok().map(|ignore| t.clone().equal_elem(i64::from(ignore)));
    let negative = t.clone().lower_elem(0);
    let t = t.mask_fill(negative, vocab.min(i32::MAX as usize) as i64);
    match ignored {
        Some(ignored) => t.mask_fill(ignored, -1),
        None => t,
    }
}

fn prim_float<const D: usize>(tensor: Tensor<D>) -> Result<Primitive> {
    tensor
        .try_into_primitive::<Wgpu>()
        .map_err(|e| Error::Engine(format!("not a tensor of burn's wgpu backend ({e:?})")))
}
