//! The fused loss on [candle](https://docs.rs/candle-core)'s CPU tensors, read in place
//! (feature `candle`).
//!
//! A candle CPU tensor is a `Vec` of its elements behind a lock plus a [`Layout`] (shape, strides,
//! start offset). When the logits are contiguous, the rows xent needs are one slice of that `Vec`:
//! this module takes candle's read lock, slices the vector at the layout's contiguous offsets and
//! hands the slice to the fast CPU path ([`crate::cpu::score`]) as a [`Logits`] — no copy, no
//! conversion, f16 and bf16 widened in registers. The results are the per-row [`RowLoss`] of the
//! rest of the crate; the per-token nll comes back as a candle f32 tensor.
//!
//! - [`cross_entropy`] / [`cross_entropy_with`]: per-token nll as a candle tensor of the targets'
//!   shape (PyTorch's `F.cross_entropy(reduction='none')`; 0 where ignored).
//! - [`score`]: the per-row [`RowLoss`] (nll, lse, argmax, flags); [`crate::Summary::of`] turns
//!   them into mean nll, perplexity and accuracy.
//! - [`CrossEntropyOp`]: the same as a candle [`CustomOp2`], so the loss sits inside a candle
//!   graph (`logits.apply_op2_no_bwd(&targets, &op)`; forward only).
//! - [`with_logits`]: borrow a candle tensor as [`Logits`], for anything else in xent that reads
//!   host logits ([`crate::GpuContext::score`], [`crate::kld::cpu::kld`], ...).
//! - [`train::cross_entropy`]: for training, the loss with every option of
//!   [`crate::train::LossOptions`] as a differentiable candle op: `loss.backward()` runs xent's
//!   fast CPU gradient.
//!
//! ## What is accepted
//! - **Logits**: `[N, V]` or `[B, T, V]` (any rank ≥ 1; the last dimension is the vocabulary), f32,
//!   f16 or bf16, **contiguous** with any start offset (a `narrow` along the first dimension is
//!   fine). A non-contiguous tensor (a transpose, a `narrow` of the vocabulary) is an
//!   [`Error::Engine`] saying to call `.contiguous()` first: that is a copy, and xent does not make
//!   copies behind the caller's back.
//! - **Targets**: the logits' shape without the last dimension, u32, i32 or i64. Targets may be
//!   strided (for example `tokens.narrow(1, 1, t)`, the usual shift of a `[B, T + 1]` batch): they
//!   are read through their layout — one integer per row, nothing next to the logits.
//!   `u32` targets cannot hold the default ignore index (-100): pass
//!   `Options { ignore_index: u32::MAX as i64 }` (or any other value) to skip rows.
//! - **Devices**: CPU only. A CUDA or Metal tensor is an [`Error::Engine`] saying to move it with
//!   `.to_device(&Device::Cpu)` (a copy the caller makes and sees); xent's GPU path is wgpu and
//!   cannot read candle's CUDA or Metal buffers.
//!
//! ## Example
//! ```
//! use candle_core::{Device, Tensor};
//! use xent::{Options, Summary};
//!
//! let logits = Tensor::new(&[[1f32, 2., 3., 4.], [0., 0., 0., 0.]], &Device::Cpu)?;
//! let targets = Tensor::new(&[3i64, 1], &Device::Cpu)?;
//!
//! // Per-token nll, as a candle tensor of the targets' shape.
//! let nll = xent::candle::cross_entropy(&logits, &targets)?;
//! let nll = nll.to_vec1::<f32>()?;
//! assert!((nll[1] - 4f32.ln()).abs() < 1e-6);
//!
//! // Per-row results and a summary.
//! let rows = xent::candle::score(&logits, &targets, &Options::default())?;
//! println!("perplexity {:.3}", Summary::of(&rows).perplexity());
//!
//! // Inside a candle graph, as a custom op.
//! let op = xent::candle::CrossEntropyOp::default();
//! let in_graph = logits.apply_op2_no_bwd(&targets, &op)?;
//! assert_eq!(in_graph.to_vec1::<f32>()?, nll);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! ## The peer
//! candle-core has no `log_softmax` (it lives in candle-nn); the peer this module is measured
//! against (`benches/candle_peers.rs`, `examples/candle_lm.rs`) is candle-nn's own composition in
//! candle-core ops: `d = x - max_keepdim(x)`, `d - log(sum_keepdim(exp(d)))`, then `gather` at the
//! targets — four full passes and two `[rows, vocab]` temporaries where xent reads each row once.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Device, Layout, Shape, Storage, Tensor};

use crate::error::{Error, Result};
use crate::problem::{Logits, Options, RowLoss, Targets};

pub mod train;

/// Per-token negative log-likelihood of `targets` under `logits`, with the default [`Options`]
/// (ignore index -100).
///
/// `logits` is a contiguous `[N, V]` or `[B, T, V]` f32/f16/bf16 CPU tensor, read in place;
/// `targets` a u32/i32/i64 tensor of shape `[N]` or `[B, T]`. Returns an f32 CPU tensor of the
/// targets' shape: `-log softmax(logits)[target]` in nats, 0 where the target is the ignore index.
///
/// # Errors
/// As [`cross_entropy_with`].
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    cross_entropy_with(logits, targets, &Options::default())
}

/// [`cross_entropy`] with explicit [`Options`] (the ignore index).
///
/// # Errors
/// As [`score`]; and [`Error::Engine`] if candle fails to build the output tensor.
pub fn cross_entropy_with(logits: &Tensor, targets: &Tensor, opts: &Options) -> Result<Tensor> {
    let rows = score(logits, targets, opts)?;
    Tensor::from_vec(nll_of(&rows), targets.shape(), &Device::Cpu).map_err(engine)
}

/// Per-row results ([`RowLoss`]: nll, lse, argmax, flags) in row-major order of the targets;
/// [`crate::Summary::of`] gives mean nll, perplexity and accuracy.
///
/// # Errors
/// - [`Error::Engine`]: a tensor not on the CPU, or logits that are not contiguous;
/// - [`Error::Dtype`]: logits not f32/f16/bf16, targets not u32/i32/i64;
/// - [`Error::Shape`]: scalar logits, a vocabulary of 0, or targets whose shape is not the logits'
///   shape without its last dimension;
/// - [`Error::TargetOutOfRange`]: the first row whose target is neither in `0..V` nor the ignore index.
pub fn score(logits: &Tensor, targets: &Tensor, opts: &Options) -> Result<Vec<RowLoss>> {
    on_cpu(logits, "logits")?;
    on_cpu(targets, "targets")?;
    let (x, xl) = logits.storage_and_layout();
    let (t, tl) = targets.storage_and_layout();
    score_storages(cpu_storage(&x, "logits")?, xl, cpu_storage(&t, "targets")?, tl, opts)
}

/// Calls `f` with `logits` borrowed as xent [`Logits`] (`rows` = product of all dimensions but
/// the last, `vocab` = the last): the bytes `f` sees are candle's own storage, read under
/// candle's read lock, which is held until `f` returns (so `f` must not write to the same tensor,
/// e.g. through `Var::set`: that would wait for the lock forever).
///
/// For anything in xent that reads host logits: [`crate::GpuContext::score`],
/// [`crate::kld::cpu::kld`] over two candle tensors (nest two calls), [`crate::reference::score`].
///
/// # Errors
/// [`Error::Engine`] for a non-CPU or non-contiguous tensor; [`Error::Dtype`] unless f32, f16 or
/// bf16; [`Error::Shape`] for a scalar or a vocabulary of 0.
pub fn with_logits<R>(logits: &Tensor, f: impl FnOnce(Logits<'_>) -> R) -> Result<R> {
    on_cpu(logits, "logits")?;
    let (x, xl) = logits.storage_and_layout();
    let view = logits_view(cpu_storage(&x, "logits")?, xl)?;
    Ok(f(view))
}

/// xent's cross-entropy as a candle [`CustomOp2`] over `(logits, targets)`: the op's output is
/// the per-token nll, an f32 tensor of the targets' shape — [`cross_entropy_with`] inside a
/// candle graph. Forward only (use it through `apply_op2_no_bwd`); CPU only (candle's default
/// `cuda_fwd` / `metal_fwd` report that there is no implementation).
///
/// `cpu_fwd` reads both storages in place through their layouts, with the rules of [`score`];
/// its errors are xent's [`Error`] wrapped in a candle error, with the same message.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use xent::{candle::CrossEntropyOp, Options};
///
/// let logits = Tensor::new(&[[0f32, 1., 2.], [3., 2., 1.]], &Device::Cpu)?;
/// let targets = Tensor::new(&[2u32, u32::MAX], &Device::Cpu)?;
/// let op = CrossEntropyOp { options: Options { ignore_index: i64::from(u32::MAX) } };
/// let nll = logits.apply_op2_no_bwd(&targets, &op)?.to_vec1::<f32>()?;
/// assert_eq!(nll[1], 0.0); // ignored
/// assert!((nll[0] - 0.407_606).abs() < 1e-5);
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CrossEntropyOp {
    /// Scoring options (the ignore index).
    pub options: Options,
}

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "xent-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        targets: &CpuStorage,
        targets_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let rows = score_storages(logits, logits_layout, targets, targets_layout, &self.options)
            .map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(nll_of(&rows)), targets_layout.shape().clone()))
    }
}

/// The one place both entry points meet: validated views of the two storages, then the fast path.
fn score_storages(x: &CpuStorage, xl: &Layout, t: &CpuStorage, tl: &Layout, opts: &Options) -> Result<Vec<RowLoss>> {
    let logits = logits_view(x, xl)?;
    with_targets(t, tl, xl, |targets| crate::cpu::score(logits, targets, opts))
}

/// Calls `f` with the targets of logits laid out as `xl`: checked to have the logits' shape
/// without the last dimension, read through their layout (borrowed when contiguous).
fn with_targets<R>(t: &CpuStorage, tl: &Layout, xl: &Layout, f: impl FnOnce(Targets<'_>) -> Result<R>) -> Result<R> {
    let lead = &xl.dims()[..xl.dims().len().saturating_sub(1)];
    if tl.dims() != lead {
        return Err(Error::Shape(format!(
            "targets have shape {:?} but logits of shape {:?} need targets of shape {lead:?}",
            tl.dims(),
            xl.dims()
        )));
    }
    match t {
        CpuStorage::U32(v) => f(Targets::U32(&read_strided(v, tl)?)),
        CpuStorage::I32(v) => f(Targets::I32(&read_strided(v, tl)?)),
        CpuStorage::I64(v) => f(Targets::I64(&read_strided(v, tl)?)),
        other => Err(Error::Dtype {
            dtype: other.dtype().as_str().to_string(),
            expected: "candle targets must be u32, i32 or i64".into(),
        }),
    }
}

/// The logits as xent [`Logits`] over candle's own vector: the slice at the layout's contiguous
/// offsets, no copy.
fn logits_view<'a>(x: &'a CpuStorage, xl: &Layout) -> Result<Logits<'a>> {
    let Some(&vocab) = xl.dims().last() else {
        return Err(Error::Shape("candle logits are a scalar: need [..., vocab]".into()));
    };
    let (start, end) = xl.contiguous_offsets().ok_or_else(|| {
        Error::Engine(format!(
            "candle logits of shape {:?} (strides {:?}) are not contiguous: xent reads them in place, \
             row-major; call `.contiguous()` on them first (a copy)",
            xl.dims(),
            xl.stride()
        ))
    })?;
    match x {
        CpuStorage::F32(v) => Logits::f32(window(v, start, end)?, vocab),
        CpuStorage::F16(v) => Logits::f16(window(v, start, end)?, vocab),
        CpuStorage::BF16(v) => Logits::bf16(window(v, start, end)?, vocab),
        other => Err(Error::Dtype {
            dtype: other.dtype().as_str().to_string(),
            expected: "candle logits must be f32, f16 or bf16 (convert with `.to_dtype(DType::F32)`)".into(),
        }),
    }
}

/// `v[start..end]`, or an error (never a panic) if candle's layout points outside its storage.
fn window<T>(v: &[T], start: usize, end: usize) -> Result<&[T]> {
    v.get(start..end).ok_or_else(|| {
        Error::Engine(format!("candle layout points at elements {start}..{end} of a storage of {}", v.len()))
    })
}

/// The elements of a tensor in row-major order: borrowed when contiguous, gathered through the
/// strides otherwise (targets only: one integer per row).
fn read_strided<'a, T: Copy>(v: &'a [T], l: &Layout) -> Result<Cow<'a, [T]>> {
    if let Some((start, end)) = l.contiguous_offsets() {
        return window(v, start, end).map(Cow::Borrowed);
    }
    let (dims, stride) = (l.dims(), l.stride());
    let count: usize = dims.iter().product();
    let mut out = Vec::with_capacity(count);
    let mut index = vec![0usize; dims.len()];
    for _ in 0..count {
        let at = l.start_offset() + index.iter().zip(stride).map(|(i, s)| i * s).sum::<usize>();
        out.push(*v.get(at).ok_or_else(|| {
            Error::Engine(format!("candle layout points at element {at} of a storage of {}", v.len()))
        })?);
        // Odometer over the dimensions, last fastest.
        for d in (0..dims.len()).rev() {
            index[d] += 1;
            if index[d] < dims[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(Cow::Owned(out))
}

fn nll_of(rows: &[RowLoss]) -> Vec<f32> {
    rows.iter().map(|r| r.nll).collect()
}

fn on_cpu(t: &Tensor, what: &str) -> Result<()> {
    if t.device().is_cpu() {
        return Ok(());
    }
    Err(Error::Engine(format!(
        "candle {what} are on {:?}: xent::candle reads CPU tensors in place; move them with \
         `.to_device(&Device::Cpu)` first (a copy)",
        t.device().location()
    )))
}

fn cpu_storage<'a>(s: &'a Storage, what: &str) -> Result<&'a CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => Err(Error::Engine(format!("candle {what} are not in CPU storage"))),
    }
}

fn engine(e: candle_core::Error) -> Error {
    Error::Engine(format!("candle: {e}"))
}
