//! Training: the cross-entropy loss **and its gradient with respect to the logits**, with the
//! options real training uses — PyTorch's `F.cross_entropy(input, target, weight, ignore_index,
//! reduction, label_smoothing)` exactly, plus a z-loss (PaLM; Liger's `lse_square_scale`) and a
//! logit soft-cap (Gemma 2). The gradient can be written over the logits (in place: no second
//! `[rows, vocab]` buffer) or into a separate buffer, in the logits' dtype (computed in f32).
//!
//! ## The maths, per row
//! With logits `x` (length `V`), target `t`, class weights `w` (all 1 without `weight`),
//! `W = Σ_j w_j`, smoothing `ε`, z-loss coefficient `c`, soft-cap `cap`:
//!
//! - `z_j = cap · tanh(x_j / cap)` with a soft-cap, else `z_j = x_j`;
//! - `lse = log Σ_j exp(z_j)`, `p_j = exp(z_j − lse)`;
//! - `loss = (1 − ε) · w_t · (lse − z_t) + (ε / V) · Σ_j w_j · (lse − z_j) + c · lse²`;
//! - `∂loss/∂z_j = p_j · ((1 − ε) · w_t + (ε / V) · W + 2c · lse) − (1 − ε) · w_t · [j = t] − (ε / V) · w_j`;
//! - `∂loss/∂x_j = ∂loss/∂z_j · (1 − (z_j / cap)²)` with a soft-cap.
//!
//! Rows whose target is the ignore index have loss 0 and gradient 0. Reductions, as torch:
//! `none` keeps the per-row losses (the caller gives one upstream gradient per row); `sum` adds
//! them; `mean` divides their sum by the **sum of the target weights** of the rows not ignored
//! (their count without `weight`) — NaN when every row is ignored, whose gradient is then 0. The
//! gradient is the per-row gradient times the upstream gradient (times `1 / Σ w_t` for `mean`).
//! The z-loss term is not weighted by `w_t` (Liger's definition); under `mean` it is divided by the
//! same denominator as the rest.
//!
//! A NaN or `+inf` logit in a row makes its loss, lse and gradient NaN (as torch). The one
//! deliberate difference: torch's gradient of an *ignored* row holding NaN is NaN (`0 · NaN` in
//! its log-softmax backward); here it is 0, as ignoring promises.
//!
//! ## Where
//! - [`reference::cross_entropy`]: plain f64, the oracle.
//! - `cpu`: the fast path (threads, SIMD), in place or into a separate buffer.
//! - the GPU: a WGSL kernel through the same planning as the forward.

pub mod cpu;
pub mod reference;

use crate::error::{Error, Result};
use crate::problem::{validate_targets, Logits, Options, Targets};

/// How per-row losses are reduced (PyTorch's `reduction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LossReduction {
    /// Per-row losses; the upstream gradient is one value per row.
    None,
    /// The sum of the per-row losses.
    Sum,
    /// The sum divided by the sum of the target weights of the rows not ignored (their count
    /// without class weights).
    #[default]
    Mean,
}

impl std::str::FromStr for LossReduction {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(LossReduction::None),
            "sum" => Ok(LossReduction::Sum),
            "mean" => Ok(LossReduction::Mean),
            _ => Err(Error::Argument(format!("unknown reduction '{s}': expected none, sum or mean"))),
        }
    }
}

/// Every option of the loss, named as PyTorch and Liger name them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossOptions<'a> {
    /// Target value whose rows contribute neither loss nor gradient (default -100).
    pub ignore_index: i64,
    /// How per-row losses are reduced (default [`LossReduction::Mean`]).
    pub reduction: LossReduction,
    /// Per-class weights `[V]` (torch's `weight`), finite; `None`: all 1.
    pub weight: Option<&'a [f32]>,
    /// Label smoothing `ε` in `[0, 1]` (torch's formula).
    pub label_smoothing: f32,
    /// z-loss coefficient `c >= 0`: adds `c · lse²` per row.
    pub z_loss: f32,
    /// Soft-cap `cap > 0`: logits pass through `cap · tanh(x / cap)` first.
    pub softcap: Option<f32>,
}

impl LossOptions<'_> {
    /// Checks the options against a vocabulary of `vocab` classes: what [`prepare`] checks of
    /// them (every path runs this, so that each refuses the same options with the same words).
    ///
    /// # Errors
    /// [`Error::Argument`] for a smoothing outside `[0, 1]`, a negative or non-finite z-loss, a
    /// soft-cap that is not positive and finite, or non-finite weights; [`Error::Shape`] for
    /// weights not of length `vocab`.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        check_scalars(self.label_smoothing, self.z_loss, self.softcap)?;
        if let Some(w) = self.weight {
            if w.len() != vocab {
                return Err(Error::Shape(format!("weight has {} values for a vocabulary of {vocab}", w.len())));
            }
            if let Some(j) = w.iter().position(|v| !v.is_finite()) {
                return Err(Error::Argument(format!("weight[{j}] = {} is not finite", w[j])));
            }
        }
        Ok(())
    }
}

/// The scalar options' ranges (smoothing, z-loss, soft-cap), as [`LossOptions::validate`].
pub(crate) fn check_scalars(label_smoothing: f32, z_loss: f32, softcap: Option<f32>) -> Result<()> {
    if !(0.0..=1.0).contains(&label_smoothing) {
        return Err(Error::Argument(format!("label_smoothing {label_smoothing} is outside [0, 1]")));
    }
    if !(z_loss >= 0.0 && z_loss.is_finite()) {
        return Err(Error::Argument(format!("z_loss {z_loss} must be finite and >= 0")));
    }
    if let Some(cap) = softcap {
        if !(cap > 0.0 && cap.is_finite()) {
            return Err(Error::Argument(format!("softcap {cap} must be finite and > 0")));
        }
    }
    Ok(())
}

impl Default for LossOptions<'_> {
    fn default() -> Self {
        LossOptions {
            ignore_index: -100,
            reduction: LossReduction::Mean,
            weight: None,
            label_smoothing: 0.0,
            z_loss: 0.0,
            softcap: None,
        }
    }
}

/// The upstream gradient `∂L/∂loss` the logits' gradient is scaled by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Upstream<'a> {
    /// One value for the reduced loss (`mean`, `sum`); for `none`, the same value for every row.
    Scalar(f32),
    /// One value per row (`none` only, as torch's `grad_output` of shape `[N]`).
    PerRow(&'a [f32]),
}

impl Default for Upstream<'_> {
    fn default() -> Self {
        Upstream::Scalar(1.0)
    }
}

/// One row's forward result, 8 bytes (the layout the GPU kernel writes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct TrainRow {
    /// The row's loss, as [`LossReduction::None`] gives it (0 where ignored).
    pub loss: f32,
    /// Log-sum-exp of the (soft-capped) row.
    pub lse: f32,
}

/// What a loss-and-gradient call returns besides the gradient itself.
#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput {
    /// The reduced loss: the mean or the sum; with [`LossReduction::None`], the sum of the rows.
    pub loss: f64,
    /// Per-row loss and lse.
    pub rows: Vec<TrainRow>,
    /// The mean's denominator: the sum of the target weights of the rows not ignored.
    pub weight_sum: f64,
}

/// Options and targets checked once, in the form every path computes from.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Targets in kernel form (`u32`, [`crate::IGNORED_TARGET`] for ignored rows).
    pub targets: Vec<u32>,
    /// Per-row factor applied to the per-row gradient: the upstream gradient, divided by
    /// `weight_sum` for `mean`; 0 for ignored rows.
    pub scale: Vec<f32>,
    /// Sum of the target weights of the rows not ignored.
    pub weight_sum: f64,
    /// `Σ_j w_j` (`V` without weights).
    pub weight_total: f64,
}

/// Checks the options against the shape and computes the per-row gradient scales.
///
/// # Errors
/// As [`validate_targets`]; [`Error::Shape`] for weights not of length `vocab` or a per-row
/// upstream gradient not of length `rows`; [`Error::Argument`] for a smoothing outside `[0, 1]`,
/// a negative or non-finite z-loss, a soft-cap that is not positive and finite, non-finite
/// weights, or a per-row upstream gradient with a reduction other than `none`.
pub fn prepare(logits: Logits<'_>, targets: Targets<'_>, opts: &LossOptions<'_>, up: Upstream<'_>) -> Result<Prepared> {
    let (rows, vocab) = (logits.rows(), logits.vocab());
    let t = validate_targets(targets, rows, vocab, &Options { ignore_index: opts.ignore_index })?;
    opts.validate(vocab)?;
    let weight_of = |c: u32| opts.weight.map_or(1.0, |w| f64::from(w[c as usize]));
    let weight_sum: f64 = t.iter().filter(|&&c| c != crate::IGNORED_TARGET).map(|&c| weight_of(c)).sum();
    let weight_total = opts.weight.map_or(vocab as f64, |w| w.iter().map(|&v| f64::from(v)).sum());
    let per_row = |r: usize| -> f32 {
        match up {
            Upstream::Scalar(g) => g,
            Upstream::PerRow(g) => g[r],
        }
    };
    if let Upstream::PerRow(g) = up {
        if opts.reduction != LossReduction::None {
            return Err(Error::Argument("a per-row upstream gradient needs reduction 'none'".into()));
        }
        if g.len() != rows {
            return Err(Error::Shape(format!("{} upstream gradients for {rows} rows", g.len())));
        }
    }
    let scale = (0..rows)
        .map(|r| {
            if t[r] == crate::IGNORED_TARGET {
                0.0
            } else if opts.reduction == LossReduction::Mean {
                (f64::from(per_row(r)) / weight_sum) as f32
            } else {
                per_row(r)
            }
        })
        .collect();
    Ok(Prepared { targets: t, scale, weight_sum, weight_total })
}

/// Reduces per-row losses as `reduction` says (f64 sum of the rows).
pub fn reduce(rows: &[TrainRow], reduction: LossReduction, weight_sum: f64) -> f64 {
    let sum: f64 = rows.iter().map(|r| f64::from(r.loss)).sum();
    match reduction {
        LossReduction::Mean => sum / weight_sum,
        LossReduction::Sum | LossReduction::None => sum,
    }
}
