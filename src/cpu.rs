//! The fast CPU path: multi-threaded over rows (rayon), f32 arithmetic with max-subtraction,
//! the same outputs and semantics as the GPU kernel ([`RowLoss`]).
//!
//! Each row is read from memory once: a row of 128k f32 (512 KiB) stays in L2 between the
//! max pass and the sum-of-exp pass, which vectorise better than one online pass because the
//! second pass has no data-dependent rescaling.

use rayon::prelude::*;

use crate::error::Result;
use crate::problem::{validate_targets, Dtype, Logits, Options, RowLoss, Targets, IGNORED_TARGET};

/// Scores every row on the CPU.
///
/// # Errors
/// As [`validate_targets`]: a row-count mismatch or a target out of range.
pub fn score(logits: Logits<'_>, targets: Targets<'_>, opts: &Options) -> Result<Vec<RowLoss>> {
    let t = validate_targets(targets, logits.rows(), logits.vocab(), opts)?;
    Ok(score_validated(logits, &t))
}

/// Scores rows whose targets are already validated (`u32`, [`IGNORED_TARGET`] for ignored rows).
pub(crate) fn score_validated(logits: Logits<'_>, targets: &[u32]) -> Vec<RowLoss> {
    let vocab = logits.vocab();
    let rb = logits.row_bytes();
    let mut out = vec![RowLoss { nll: 0.0, lse: 0.0, argmax: 0, flags: 0 }; logits.rows()];
    out.par_iter_mut().zip(targets.par_iter()).enumerate().for_each_init(Vec::<f32>::new, |scratch, (r, (o, &t))| {
        let bytes = &logits.bytes()[r * rb..(r + 1) * rb];
        let x: &[f32] = match (logits.dtype(), bytemuck::try_cast_slice::<u8, f32>(bytes)) {
            (Dtype::F32, Ok(x)) => x,
            (dtype, _) => {
                scratch.clear();
                scratch.extend((0..vocab).map(|j| dtype.get(bytes, j)));
                scratch
            }
        };
        *o = row(x, t);
    });
    out
}

const LANES: usize = 16;

/// One row, f32, in the layout the GPU writes.
pub(crate) fn row(x: &[f32], t: u32) -> RowLoss {
    // Pass 1: max, argmax and the NaN/+inf check, over independent lanes so it vectorises.
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut bad = false;
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            m[k] = m[k].max(c[k]);
            bad |= c[k].is_nan() | (c[k] == f32::INFINITY);
        }
    }
    let mut mx = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &v in tail {
        mx = mx.max(v);
        bad |= v.is_nan() | (v == f32::INFINITY);
    }
    let argmax = if mx == f32::NEG_INFINITY || bad {
        x.iter().position(|&v| v > f32::NEG_INFINITY && v == mx).map_or(u32::MAX, |i| i as u32)
    } else {
        x.iter().position(|&v| v == mx).map_or(u32::MAX, |i| i as u32)
    };
    // Pass 2: sum of exp(x - max), from cache.
    // Terms are f32 (as on the GPU); lanes accumulate in f64 so long rows lose nothing to the sum.
    let mut s = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            s[k] += f64::from((c[k] - mx).exp());
        }
    }
    let mut sum: f64 = tail.iter().map(|&v| f64::from((v - mx).exp())).sum();
    sum += s.iter().sum::<f64>();
    let sum = sum as f32;
    let broken = bad || mx == f32::NEG_INFINITY;
    let log_s = sum.ln();
    let lse = if broken { f32::NAN } else { mx + log_s };
    if t == IGNORED_TARGET {
        return RowLoss { nll: 0.0, lse, argmax, flags: RowLoss::IGNORED };
    }
    let nll = if broken { f32::NAN } else { (mx - x[t as usize]) + log_s };
    let flags = if !broken && argmax == t { RowLoss::CORRECT } else { 0 };
    RowLoss { nll, lse, argmax, flags }
}
