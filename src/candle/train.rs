//! Training on candle's CPU tensors: the cross-entropy loss with every option of
//! [`LossOptions`] as a **differentiable** candle op, whose backward is xent's fast CPU gradient
//! ([`crate::train::cpu`]).
//!
//! [`cross_entropy`] puts one [`CustomOp2`] in candle's graph. Its forward reads the logits in
//! place (the rows' statistics only: one read, no `[rows, vocab]` temporary); its backward — what
//! `loss.backward()` runs — reads them again and writes `∂loss/∂logits`, scaled by the upstream
//! gradient, straight into the new gradient tensor's vector in the logits' dtype: two reads and
//! one write of the logits in all, where candle's composed loss (`max`, `exp`, `sum`, `log`,
//! `gather` and their backwards) makes several passes and temporaries each way.
//!
//! The gradient is a new tensor, as candle's autograd requires (the logits may be used
//! elsewhere in the graph); in place over the logits is for callers that own their buffer
//! ([`crate::train::cpu::loss_and_grad_in_place`]).
//!
//! What is accepted is [`super::score`]'s: contiguous f32/f16/bf16 logits `[..., V]` on the CPU,
//! u32/i32/i64 targets of the logits' shape without `V` (strided targets are fine). The result
//! is a rank-0 f32 tensor for `mean` and `sum` (as candle-nn's losses), or an f32 tensor of the
//! targets' shape for `none` (then the upstream gradient is one value per row).
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use xent::train::LossOptions;
//!
//! let logits = Var::new(&[[1f32, 2., 3.], [0., 0., 0.]], &Device::Cpu)?;
//! let targets = Tensor::new(&[2i64, 0], &Device::Cpu)?;
//! let opts = LossOptions { label_smoothing: 0.1, ..LossOptions::default() };
//! let loss = xent::candle::train::cross_entropy(logits.as_tensor(), &targets, &opts)?;
//! let grads = loss.backward()?;
//! let g = grads.get(logits.as_tensor()).expect("a gradient").to_vec2::<f32>()?;
//! // Each row of ∂mean/∂logits sums to 0 (softmax minus the smoothed one-hot, over 2 rows).
//! assert!(g.iter().all(|row| row.iter().sum::<f32>().abs() < 1e-6));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};

use super::{cpu_storage, logits_view, on_cpu, with_targets};
use crate::error::{Error, Result};
use crate::train::{LossOptions, LossOutput, LossReduction, Upstream};

/// Cross-entropy of `targets` under `logits` with every option of [`LossOptions`], as a node of
/// candle's graph: when `logits` tracks gradients (a `Var`, or computed from one),
/// `loss.backward()` gives `∂loss/∂logits` from xent's fast CPU path. See the module docs for
/// shapes and what each pass reads.
///
/// # Errors
/// [`Error::Engine`] for tensors not on the CPU or non-contiguous logits; [`Error::Dtype`] for
/// logits not f32/f16/bf16 or targets not u32/i32/i64; [`Error::Shape`] for mismatched shapes or
/// weights not of length `V`; [`Error::TargetOutOfRange`] for the first target neither in
/// `0..V` nor the ignore index; [`Error::Argument`] for an option out of its range — all
/// checked before candle records anything.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, opts: &LossOptions<'_>) -> Result<Tensor> {
    on_cpu(logits, "logits")?;
    on_cpu(targets, "targets")?;
    // Everything the op's passes would refuse, refused here with xent's own error (inside the
    // op, an error can only travel as candle's text).
    {
        let (x, xl) = logits.storage_and_layout();
        let (t, tl) = targets.storage_and_layout();
        let view = logits_view(cpu_storage(&x, "logits")?, xl)?;
        with_targets(cpu_storage(&t, "targets")?, tl, xl, |targets| {
            crate::train::prepare(view, targets, opts, Upstream::Scalar(1.0)).map(drop)
        })?;
    }
    logits.apply_op2(targets, TrainOp::new(opts)).map_err(super::engine)
}

/// The op candle records: [`LossOptions`] owned (candle keeps ops for the graph's lifetime).
#[derive(Debug, Clone)]
struct TrainOp {
    ignore_index: i64,
    reduction: LossReduction,
    weight: Option<Arc<[f32]>>,
    label_smoothing: f32,
    z_loss: f32,
    softcap: Option<f32>,
}

impl TrainOp {
    fn new(o: &LossOptions<'_>) -> Self {
        TrainOp {
            ignore_index: o.ignore_index,
            reduction: o.reduction,
            weight: o.weight.map(Arc::from),
            label_smoothing: o.label_smoothing,
            z_loss: o.z_loss,
            softcap: o.softcap,
        }
    }

    fn options(&self) -> LossOptions<'_> {
        LossOptions {
            ignore_index: self.ignore_index,
            reduction: self.reduction,
            weight: self.weight.as_deref(),
            label_smoothing: self.label_smoothing,
            z_loss: self.z_loss,
            softcap: self.softcap,
        }
    }

    /// The fast path over the two storages: the loss, and the gradient into `grad` when given.
    fn run(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        t: &CpuStorage,
        tl: &Layout,
        upstream: Upstream<'_>,
        grad: Option<&mut [u8]>,
    ) -> Result<LossOutput> {
        let logits = logits_view(x, xl)?;
        let opts = self.options();
        with_targets(t, tl, xl, |targets| crate::train::cpu::loss_and_grad(logits, targets, &opts, upstream, grad))
    }
}

impl CustomOp2 for TrainOp {
    fn name(&self) -> &'static str {
        "xent-train-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        logits: &CpuStorage,
        logits_layout: &Layout,
        targets: &CpuStorage,
        targets_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self
            .run(logits, logits_layout, targets, targets_layout, Upstream::Scalar(1.0), None)
            .map_err(candle_core::Error::wrap)?;
        Ok(match self.reduction {
            LossReduction::None => {
                (CpuStorage::F32(out.rows.iter().map(|r| r.loss).collect()), targets_layout.shape().clone())
            }
            LossReduction::Sum | LossReduction::Mean => (CpuStorage::F32(vec![out.loss as f32]), Shape::from(())),
        })
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        grad_loss: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let up = grad_loss.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let upstream = match (self.reduction, up.as_slice()) {
            (LossReduction::None, up) => Upstream::PerRow(up),
            (_, &[g]) => Upstream::Scalar(g),
            (_, up) => {
                return Err(candle_core::Error::wrap(Error::Shape(format!(
                    "the upstream gradient of a reduced loss has {} values, not 1",
                    up.len()
                ))))
            }
        };
        let (x, xl) = logits.storage_and_layout();
        let (t, tl) = targets.storage_and_layout();
        let xs = cpu_storage(&x, "logits").map_err(candle_core::Error::wrap)?;
        let ts = cpu_storage(&t, "targets").map_err(candle_core::Error::wrap)?;
        let n = xl.shape().elem_count();
        // The gradient is written straight into the vector the new tensor takes over.
        let run = |bytes: &mut [u8]| self.run(xs, xl, ts, tl, upstream, Some(bytes)).map_err(candle_core::Error::wrap);
        let grad = match xs {
            CpuStorage::F32(_) => {
                let mut g = vec![0f32; n];
                run(bytemuck::cast_slice_mut(&mut g))?;
                Tensor::from_vec(g, xl.shape(), &Device::Cpu)?
            }
            CpuStorage::F16(_) => {
                let mut g = vec![half::f16::ZERO; n];
                run(bytemuck::cast_slice_mut(&mut g))?;
                Tensor::from_vec(g, xl.shape(), &Device::Cpu)?
            }
            CpuStorage::BF16(_) => {
                let mut g = vec![half::bf16::ZERO; n];
                run(bytemuck::cast_slice_mut(&mut g))?;
                Tensor::from_vec(g, xl.shape(), &Device::Cpu)?
            }
            other => {
                return Err(candle_core::Error::wrap(Error::Dtype {
                    dtype: other.dtype().as_str().to_string(),
                    expected: "candle logits must be f32, f16 or bf16".into(),
                }))
            }
        };
        Ok((Some(grad), None))
    }
}
