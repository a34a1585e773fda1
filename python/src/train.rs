//! `xent.cross_entropy`: the training loss and its gradient with respect to the logits,
//! PyTorch's `F.cross_entropy` semantics plus z-loss and soft-cap, the gradient written over the
//! logits or into a new array.

use numpy::{IntoPyArray, PyArrayMethods, PyUntypedArray};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use xent::train::{LossOptions, LossOutput, LossReduction, Upstream};

use crate::arrays::{view, Elem, View};
use crate::{engine, logits_of, targets_of, to_py_err};

/// How the gradient is returned.
#[derive(Clone, Copy, PartialEq, Eq)]
enum GradMode {
    None,
    InPlace,
    Separate,
}

fn grad_mode(grad: Option<&str>) -> PyResult<GradMode> {
    match grad {
        None => Ok(GradMode::None),
        Some("inplace") => Ok(GradMode::InPlace),
        Some("separate") => Ok(GradMode::Separate),
        Some(other) => {
            Err(PyValueError::new_err(format!("grad '{other}': expected None (no gradient), 'inplace' or 'separate'")))
        }
    }
}

/// Class weights as a contiguous float32 array of `vocab` values (converted: they are small).
fn weights<'py>(w: &Bound<'py, PyAny>, vocab: usize) -> PyResult<Bound<'py, PyAny>> {
    let np = w.py().import("numpy")?;
    let a = np
        .call_method1("ascontiguousarray", (w, "float32"))
        .map_err(|e| PyTypeError::new_err(format!("weight: cannot be read as float32 values: {e}")))?;
    let shape: Vec<usize> = a.getattr("shape")?.extract()?;
    if shape != [vocab] {
        return Err(PyValueError::new_err(format!(
            "weight: shape {shape:?}, but the logits have {vocab} classes: weight must be [{vocab}]"
        )));
    }
    Ok(a)
}

/// A new array of the logits' shape and dtype, for the separate gradient.
fn empty_like<'py>(v: &View<'py>) -> PyResult<Bound<'py, PyAny>> {
    let py = v.owner().py();
    let np = py.import("numpy")?;
    if v.owner().cast::<PyUntypedArray>().is_ok() {
        return np.call_method1("empty_like", (v.owner(),));
    }
    let dtype: Bound<'py, PyAny> = match v.elem {
        Elem::F32 => np.getattr("float32")?,
        Elem::F16 => np.getattr("float16")?,
        Elem::BF16 => py
            .import("ml_dtypes")
            .map_err(|_| {
                PyTypeError::new_err(
                    "grad='separate' on a bfloat16 tensor returns a numpy array of ml_dtypes.bfloat16: \
                     install ml_dtypes, or use grad='inplace'",
                )
            })?
            .getattr("bfloat16")?,
        _ => return Err(PyTypeError::new_err("logits: not a float array")),
    };
    np.call_method1("empty", (v.shape.clone(), dtype))
}

/// The loss as Python returns it: a float for `mean`/`sum`, a float32 array shaped like the
/// targets for `none`.
fn loss_object(py: Python<'_>, out: &LossOutput, reduction: LossReduction, shape: &[usize]) -> PyResult<Py<PyAny>> {
    if reduction != LossReduction::None {
        return Ok(out.loss.into_pyobject(py)?.into_any().unbind());
    }
    let rows: Vec<f32> = out.rows.iter().map(|r| r.loss).collect();
    Ok(rows.into_pyarray(py).reshape(shape.to_vec())?.into_any().unbind())
}

/// Cross-entropy loss for training, and its gradient with respect to the logits.
///
/// Exactly PyTorch's ``F.cross_entropy(logits, targets, weight, ignore_index=, reduction=,
/// label_smoothing=)`` (for ``[N, V]``; ``[B, T, V]`` logits with ``[B, T]`` targets are taken as
/// ``N = B * T`` rows), plus ``z_loss`` (adds ``z_loss * lse**2`` per row, PaLM / Liger's
/// ``lse_square_scale``) and ``softcap`` (logits pass through ``softcap * tanh(x / softcap)``
/// first, Gemma 2). Computed in float32 whatever the logits' dtype (float32, float16, bfloat16).
///
/// ``grad``: ``None`` computes no gradient; ``"inplace"`` writes ``d loss / d logits`` over
/// ``logits`` (a writable C-contiguous array, in its dtype) and returns that array;
/// ``"separate"`` returns a new array of the logits' dtype. Rows whose target is
/// ``ignore_index`` contribute 0 loss and 0 gradient. Returns ``(loss, grad)``: ``loss`` is a
/// float for ``"mean"`` and ``"sum"``, a float32 array shaped like ``targets`` for ``"none"``
/// (whose gradient is that of the sum of the rows). The GIL is released while computing.
#[pyfunction]
#[pyo3(signature = (logits, targets, *, weight = None, ignore_index = -100, reduction = "mean",
    label_smoothing = 0.0, z_loss = 0.0, softcap = None, grad = None, device = "auto"),
    text_signature = "(logits, targets, *, weight=None, ignore_index=-100, reduction='mean', label_smoothing=0.0, \
    z_loss=0.0, softcap=None, grad=None, device='auto')")]
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    targets: &Bound<'_, PyAny>,
    weight: Option<&Bound<'_, PyAny>>,
    ignore_index: i64,
    reduction: &str,
    label_smoothing: f32,
    z_loss: f32,
    softcap: Option<f32>,
    grad: Option<&str>,
    device: &str,
) -> PyResult<(Py<PyAny>, Py<PyAny>)> {
    let mode = grad_mode(grad)?;
    let reduction: LossReduction = reduction.parse().map_err(|e: xent::Error| PyValueError::new_err(e.to_string()))?;
    let lv = view(logits, "logits")?;
    let (dtype, vocab) = {
        let x = logits_of(&lv, "logits")?;
        (x.dtype(), x.vocab())
    };
    let tv = view(targets, "targets")?;
    let t = targets_of(&tv, &lv.shape, "targets")?;
    let w = weight.map(|w| weights(w, vocab)).transpose()?;
    let wv = w.as_ref().map(|w| view(w, "weight")).transpose()?;
    let wf = wv.as_ref().map(|w| w.typed::<f32>("weight")).transpose()?;
    let opts = LossOptions { ignore_index, reduction, weight: wf, label_smoothing, z_loss, softcap };
    let ctx = engine(py, device)?;
    let up = Upstream::default();
    let (out, grad_obj) = match mode {
        GradMode::None | GradMode::Separate => {
            let sep = if mode == GradMode::Separate { Some(empty_like(&lv)?) } else { None };
            let sv = sep.as_ref().map(|s| view(s, "grad")).transpose()?;
            let gbytes = sv.as_ref().map(|s| s.bytes_mut("grad")).transpose()?;
            let x = logits_of(&lv, "logits")?;
            let out = py
                .detach(|| match &ctx {
                    Some(gpu) => gpu.loss_and_grad(x, t.get(), &opts, up, gbytes),
                    None => xent::train::cpu::loss_and_grad(x, t.get(), &opts, up, gbytes),
                })
                .map_err(to_py_err)?;
            (out, sep.map_or_else(|| py.None(), |s| s.unbind()))
        }
        GradMode::InPlace => {
            let bytes = lv.bytes_mut("logits")?;
            let out = py
                .detach(|| match &ctx {
                    Some(gpu) => gpu.loss_and_grad_in_place(bytes, dtype, vocab, t.get(), &opts, up),
                    None => xent::train::cpu::loss_and_grad_in_place(bytes, dtype, vocab, t.get(), &opts, up),
                })
                .map_err(to_py_err)?;
            (out, logits.clone().unbind())
        }
    };
    Ok((loss_object(py, &out, reduction, &tv.shape)?, grad_obj))
}

/// The f64 reference of :func:`cross_entropy` — plain, slow, the oracle of the tests — for
/// checks such as ``benches/peers/train_reference_check.py``. Returns ``(loss, grad)`` with
/// ``grad`` a float64 array ``[N, V]``.
#[pyfunction]
#[pyo3(signature = (logits, targets, *, weight = None, ignore_index = -100, reduction = "mean",
    label_smoothing = 0.0, z_loss = 0.0, softcap = None))]
#[allow(clippy::too_many_arguments)]
pub fn _reference_cross_entropy(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    targets: &Bound<'_, PyAny>,
    weight: Option<&Bound<'_, PyAny>>,
    ignore_index: i64,
    reduction: &str,
    label_smoothing: f32,
    z_loss: f32,
    softcap: Option<f32>,
) -> PyResult<(Py<PyAny>, Py<PyAny>)> {
    let reduction: LossReduction = reduction.parse().map_err(|e: xent::Error| PyValueError::new_err(e.to_string()))?;
    let lv = view(logits, "logits")?;
    let x = logits_of(&lv, "logits")?;
    let tv = view(targets, "targets")?;
    let t = targets_of(&tv, &lv.shape, "targets")?;
    let w = weight.map(|w| weights(w, x.vocab())).transpose()?;
    let wv = w.as_ref().map(|w| view(w, "weight")).transpose()?;
    let wf = wv.as_ref().map(|w| w.typed::<f32>("weight")).transpose()?;
    let opts = LossOptions { ignore_index, reduction, weight: wf, label_smoothing, z_loss, softcap };
    let r = py
        .detach(|| xent::train::reference::cross_entropy(x, t.get(), &opts, Upstream::default()))
        .map_err(to_py_err)?;
    let loss: Py<PyAny> = if reduction == LossReduction::None {
        r.row_loss.into_pyarray(py).into_any().unbind()
    } else {
        r.loss.into_pyobject(py)?.into_any().unbind()
    };
    let grad = r.grad.into_pyarray(py).reshape(vec![x.rows(), x.vocab()])?;
    Ok((loss, grad.into_any().unbind()))
}
