//! The CPU reference: plain, single-threaded, f64 accumulation. The oracle for every test.
//!
//! Semantics follow PyTorch's `F.cross_entropy(reduction='none')`:
//! - a NaN or a `+inf` anywhere in a row makes the row's `lse` and `nll` NaN;
//! - `-inf` logits contribute nothing; a target whose logit is `-inf` has `nll = +inf`;
//! - a row of only `-inf` is NaN;
//! - ignored rows have `nll = 0` and are not counted as correct or incorrect;
//! - `argmax` is the first index of the largest logit (as `torch.argmax`); a NaN row is never correct.

use crate::error::Result;
use crate::problem::{validate_targets, Logits, Options, Targets};

/// One row's reference result, in f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefRow {
    /// Negative log-likelihood of the target, nats (0 when ignored).
    pub nll: f64,
    /// Log-sum-exp of the row.
    pub lse: f64,
    /// First index of the largest logit; `None` for a broken row (NaN or +inf in it, or only -inf).
    pub argmax: Option<usize>,
    /// Whether the row's target is the ignore index.
    pub ignored: bool,
    /// Whether `argmax == target` (false for ignored and NaN rows).
    pub correct: bool,
}

/// Scores one row of f32 values against `target` (`None`: ignored).
pub fn row(x: &[f32], target: Option<usize>) -> RefRow {
    let broken = x.iter().any(|v| v.is_nan() || *v == f32::INFINITY);
    let mut argmax = None;
    let mut best = f32::NEG_INFINITY;
    for (j, &v) in x.iter().enumerate() {
        if v > best {
            best = v;
            argmax = Some(j);
        }
    }
    let m = f64::from(best);
    let sum: f64 = x.iter().map(|&v| (f64::from(v) - m).exp()).sum();
    let (lse, log_s) = if broken || argmax.is_none() { (f64::NAN, f64::NAN) } else { (m + sum.ln(), sum.ln()) };
    // A broken row has no meaningful argmax.
    let argmax = if broken { None } else { argmax };
    match target {
        None => RefRow { nll: 0.0, lse, argmax, ignored: true, correct: false },
        Some(t) => {
            let nll = (m - f64::from(x[t])) + log_s;
            RefRow { nll, lse, argmax, ignored: false, correct: !nll.is_nan() && argmax == Some(t) }
        }
    }
}

/// Scores every row.
///
/// # Errors
/// As [`validate_targets`]: a row-count mismatch or a target out of range.
pub fn score(logits: Logits<'_>, targets: Targets<'_>, opts: &Options) -> Result<Vec<RefRow>> {
    let t = validate_targets(targets, logits.rows(), logits.vocab(), opts)?;
    let mut x = vec![0f32; logits.vocab()];
    Ok((0..logits.rows())
        .map(|r| {
            for (j, v) in x.iter_mut().enumerate() {
                *v = logits.get(r, j);
            }
            let target = (t[r] != crate::problem::IGNORED_TARGET).then_some(t[r] as usize);
            row(&x, target)
        })
        .collect())
}
