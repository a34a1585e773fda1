//! The f64 reference for KL divergence: plain, single-threaded, obviously correct. The oracle for
//! every KLD test.
//!
//! Each side's log-probabilities are computed in f64 (`log p_i = a_i − lse_a`), then
//! `kld = Σ_i p_i (log p_i − log q_i)` is summed in f64 over the entries with `p_i > 0`.

use crate::error::{Error, Result};
use crate::problem::{validate_targets, Logits, Options, Targets, IGNORED_TARGET};

/// One row's reference result, in f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefKldRow {
    /// `Σ p (log p − log q)`, nats (0 when ignored; NaN for a broken row).
    pub kld: f64,
    /// `−log p_t` (0 without a target).
    pub nll_base: f64,
    /// `−log q_t` (0 without a target).
    pub nll_test: f64,
    /// `q_t − p_t` (0 without a target).
    pub dp: f64,
    /// First index of the base's largest logit (`None` for a broken row).
    pub argmax_base: Option<usize>,
    /// First index of the test's largest logit (`None` for a broken row).
    pub argmax_test: Option<usize>,
    /// Both argmaxes exist and agree.
    pub same_top: bool,
    /// The row's target was the ignore index.
    pub ignored: bool,
    /// The row had a target.
    pub has_target: bool,
}

/// Log-probabilities of one row in f64 and its first argmax; `None` for a broken row (a NaN or
/// `+inf` in it, or only `−inf`).
pub fn log_softmax(x: &[f32]) -> Option<(Vec<f64>, usize)> {
    if x.iter().any(|v| v.is_nan() || *v == f32::INFINITY) {
        return None;
    }
    let mut argmax = None;
    let mut best = f32::NEG_INFINITY;
    for (j, &v) in x.iter().enumerate() {
        if v > best {
            best = v;
            argmax = Some(j);
        }
    }
    let argmax = argmax?;
    let m = f64::from(best);
    let lse = m + x.iter().map(|&v| (f64::from(v) - m).exp()).sum::<f64>().ln();
    Some((x.iter().map(|&v| f64::from(v) - lse).collect(), argmax))
}

/// Compares one row pair; `target`: `None` without a target, `Some(None)` ignored, `Some(Some(t))`.
pub fn row(a: &[f32], b: &[f32], target: Option<Option<usize>>) -> RefKldRow {
    let ignored = matches!(target, Some(None));
    let t = target.flatten();
    if ignored {
        let zero = RefKldRow {
            kld: 0.0,
            nll_base: 0.0,
            nll_test: 0.0,
            dp: 0.0,
            argmax_base: None,
            argmax_test: None,
            same_top: false,
            ignored: true,
            has_target: false,
        };
        return zero;
    }
    let (pa, pb) = (log_softmax(a), log_softmax(b));
    // A broken row (either side) has no argmax on either side.
    let both = pa.is_some() && pb.is_some();
    let (argmax_base, argmax_test) =
        (pa.as_ref().filter(|_| both).map(|p| p.1), pb.as_ref().filter(|_| both).map(|p| p.1));
    let (kld, nll_base, nll_test) = match (&pa, &pb) {
        (Some((la, _)), Some((lb, _))) => {
            let kld = la
                .iter()
                .zip(lb)
                .filter(|(&lp, _)| lp > f64::NEG_INFINITY)
                .map(|(&lp, &lq)| lp.exp() * (lp - lq))
                .sum::<f64>();
            let (nb, nt) = t.map_or((0.0, 0.0), |t| (-la[t], -lb[t]));
            (kld, nb, nt)
        }
        _ => (f64::NAN, if t.is_some() { f64::NAN } else { 0.0 }, if t.is_some() { f64::NAN } else { 0.0 }),
    };
    let dp = if t.is_some() { (-nll_test).exp() - (-nll_base).exp() } else { 0.0 };
    RefKldRow {
        kld,
        nll_base,
        nll_test,
        dp,
        argmax_base,
        argmax_test,
        same_top: argmax_base.is_some() && argmax_base == argmax_test && !kld.is_nan(),
        ignored: false,
        has_target: t.is_some(),
    }
}

/// Checks that base and test logits can be compared, and turns `targets` into the kernels' `u32`
/// form: `validate_targets`, or every row [`super::NO_TARGET`] without targets.
///
/// # Errors
/// [`Error::Shape`] when the two sides differ in rows or vocab; as [`validate_targets`].
pub fn kernel_targets(
    base: Logits<'_>,
    test: Logits<'_>,
    targets: Option<Targets<'_>>,
    opts: &Options,
) -> Result<Vec<u32>> {
    if base.rows() != test.rows() || base.vocab() != test.vocab() {
        return Err(Error::Shape(format!(
            "base logits are {} x {} but test logits are {} x {}: both models must score the same tokens over the same vocabulary",
            base.rows(),
            base.vocab(),
            test.rows(),
            test.vocab()
        )));
    }
    match targets {
        Some(t) => validate_targets(t, base.rows(), base.vocab(), opts),
        None => Ok(vec![super::NO_TARGET; base.rows()]),
    }
}

/// Compares every row.
///
/// # Errors
/// As [`kernel_targets`].
pub fn kld(base: Logits<'_>, test: Logits<'_>, targets: Option<Targets<'_>>, opts: &Options) -> Result<Vec<RefKldRow>> {
    let t = kernel_targets(base, test, targets, opts)?;
    let vocab = base.vocab();
    let (mut a, mut b) = (vec![0f32; vocab], vec![0f32; vocab]);
    Ok((0..base.rows())
        .map(|r| {
            for j in 0..vocab {
                a[j] = base.get(r, j);
                b[j] = test.get(r, j);
            }
            let target = match t[r] {
                super::NO_TARGET => None,
                IGNORED_TARGET => Some(None),
                t => Some(Some(t as usize)),
            };
            row(&a, &b, target)
        })
        .collect())
}
