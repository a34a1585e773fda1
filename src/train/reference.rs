//! The training reference: plain, single-threaded, f64 throughout — the formulas of the module
//! documentation written out term by term. The oracle of every loss-and-gradient test (and
//! itself checked against PyTorch's autograd in float64 by `benches/peers/train_reference_check.py`).

use crate::error::Result;
use crate::problem::{Logits, Targets, IGNORED_TARGET};

use super::{prepare, LossOptions, LossReduction, Upstream};

/// The reference's result, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct RefOutput {
    /// The reduced loss (the sum of the rows for `none`).
    pub loss: f64,
    /// Per-row loss (0 where ignored).
    pub row_loss: Vec<f64>,
    /// Per-row log-sum-exp of the (soft-capped) logits.
    pub lse: Vec<f64>,
    /// `∂L/∂logits`, row-major `[rows, vocab]`, already scaled by the upstream gradient.
    pub grad: Vec<f64>,
    /// The mean's denominator.
    pub weight_sum: f64,
}

/// Loss and gradient of every row.
///
/// # Errors
/// As [`prepare`].
pub fn cross_entropy(
    logits: Logits<'_>,
    targets: Targets<'_>,
    opts: &LossOptions<'_>,
    upstream: Upstream<'_>,
) -> Result<RefOutput> {
    let p = prepare(logits, targets, opts, upstream)?;
    let (rows, v) = (logits.rows(), logits.vocab());
    let eps = f64::from(opts.label_smoothing);
    let c = f64::from(opts.z_loss);
    let w = |j: usize| opts.weight.map_or(1.0, |w| f64::from(w[j]));
    let mut out = RefOutput {
        loss: 0.0,
        row_loss: vec![0.0; rows],
        lse: vec![0.0; rows],
        grad: vec![0.0; rows * v],
        weight_sum: p.weight_sum,
    };
    let mut z = vec![0f64; v];
    for r in 0..rows {
        for (j, zj) in z.iter_mut().enumerate() {
            let x = f64::from(logits.get(r, j));
            *zj = match opts.softcap {
                Some(cap) => f64::from(cap) * (x / f64::from(cap)).tanh(),
                None => x,
            };
        }
        let broken = z.iter().any(|x| x.is_nan() || *x == f64::INFINITY);
        let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = if broken || m == f64::NEG_INFINITY {
            f64::NAN
        } else {
            m + z.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
        };
        out.lse[r] = lse;
        if p.targets[r] == IGNORED_TARGET {
            continue; // loss 0, gradient 0
        }
        let t = p.targets[r] as usize;
        let smooth: f64 = if eps > 0.0 { (0..v).map(|j| w(j) * (lse - z[j])).sum() } else { 0.0 };
        out.row_loss[r] = (1.0 - eps) * w(t) * (lse - z[t]) + eps / v as f64 * smooth + c * lse * lse;
        let go = f64::from(match upstream {
            Upstream::Scalar(g) => g,
            Upstream::PerRow(g) => g[r],
        });
        let g = if opts.reduction == LossReduction::Mean { go / p.weight_sum } else { go };
        let coef = (1.0 - eps) * w(t) + eps / v as f64 * p.weight_total + 2.0 * c * lse;
        for (j, &zj) in z.iter().enumerate() {
            let pj = (zj - lse).exp();
            let mut dz = pj * coef - eps / v as f64 * w(j);
            if j == t {
                dz -= (1.0 - eps) * w(t);
            }
            let dx = match opts.softcap {
                Some(cap) => dz * (1.0 - (zj / f64::from(cap)).powi(2)),
                None => dz,
            };
            out.grad[r * v + j] = g * dx;
        }
    }
    let sum: f64 = out.row_loss.iter().sum();
    out.loss = match opts.reduction {
        LossReduction::Mean => sum / p.weight_sum,
        LossReduction::Sum | LossReduction::None => sum,
    };
    Ok(out)
}
