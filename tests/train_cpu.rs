//! The fast CPU loss and gradient (`xent::train::cpu`) against the f64 reference
//! (`xent::train::reference::cross_entropy`): shapes, dtypes, every reduction, every option alone
//! and combined, broken and ignored rows, in place against a separate buffer, rows cut into parts
//! when they are fewer than threads, and the errors.
//!
//! ## Tolerances, and why
//! The gradient is computed in f32 from f32 row statistics: a vector `exp` within 2 ulp, the
//! difference `z_j − max` rounded once (relative error `|z_j − max| · 2^-24` in `exp`, at most
//! 5e-6 where `exp` is not already negligible), the per-row factor rounded once, and for a
//! soft-cap an f32 `tanh` (a few ulp) whose `1 − tanh²` loses relative precision as `tanh` nears
//! ±1. So each element is checked against `ATOL · (largest |gradient| in its row) + RTOL · |ref|`:
//! the absolute part scales with the row (gradients are proportional to the upstream gradient
//! and the class weights, and the target's element `p_t − 1` cancels), the relative part covers
//! `exp` and the rounding of `z_j − max`. f16 / bf16 gradients are the f32 value rounded to
//! nearest even, so they may differ from the reference rounded to that dtype by one ulp: they get
//! one ulp of the dtype at `|ref|` on top. Losses and lse are finished in f64 from f32 sums:
//! `LOSS_TOL · (1 + |lse| + |loss|)` absolute.

use proptest::prelude::*;
use xent::train::reference::{cross_entropy, RefOutput};
use xent::train::{cpu, LossOptions, LossOutput, LossReduction, Upstream};
use xent::{Dtype, Error, Logits, Targets};

/// Absolute tolerance, relative to the largest |gradient| of the row.
const ATOL: f64 = 1e-6;
/// Relative tolerance of each gradient element.
const RTOL: f64 = 1e-5;
/// Loss and lse tolerance (see the module documentation).
const LOSS_TOL: f64 = 2e-6;

/// Random logits (normal, times `scale`) and targets in range.
fn random(rows: usize, vocab: usize, seed: u64, scale: f32) -> (Vec<f32>, Vec<i64>) {
    let mut rng = xent::synth::Rng::new(seed);
    let x = (0..rows * vocab).map(|_| rng.normal() as f32 * scale).collect();
    let t = (0..rows).map(|_| rng.below(vocab) as i64).collect();
    (x, t)
}

/// Positive class weights in [0.2, 2.2), and a zero here and there.
fn weights(vocab: usize, seed: u64) -> Vec<f32> {
    let mut rng = xent::synth::Rng::new(seed ^ 0x77);
    (0..vocab).map(|j| if j % 11 == 5 { 0.0 } else { 0.2 + 2.0 * rng.uniform() as f32 }).collect()
}

/// Element `i` of little-endian `bytes` of `dtype`, as f64.
fn get(dtype: Dtype, bytes: &[u8], i: usize) -> f64 {
    match dtype {
        Dtype::F32 => f64::from(f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap())),
        Dtype::F16 => half::f16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f64(),
        Dtype::BF16 => half::bf16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]).to_f64(),
    }
}

/// `v` rounded (through f32) to `dtype`, and one ulp of `dtype` at `|v|`.
fn round_and_ulp(dtype: Dtype, v: f64) -> (f64, f64) {
    let v32 = v as f32;
    let (rounded, mant, min_sub) = match dtype {
        Dtype::F32 => (f64::from(v32), 23, 2f64.powi(-149)),
        Dtype::F16 => (half::f16::from_f32(v32).to_f64(), 10, 2f64.powi(-24)),
        Dtype::BF16 => (half::bf16::from_f32(v32).to_f64(), 7, 2f64.powi(-133)),
    };
    let ulp = if v == 0.0 || !v.is_finite() {
        min_sub
    } else {
        (2f64.powi(v.abs().log2().floor() as i32 - mant)).max(min_sub)
    };
    (rounded, ulp)
}

/// Whether `got` is within `tol` of `want`; NaN matches NaN, infinities must be equal.
fn near(got: f64, want: f64, tol: f64) -> bool {
    if got.is_nan() || want.is_nan() {
        return got.is_nan() && want.is_nan();
    }
    if got.is_infinite() || want.is_infinite() {
        return got == want;
    }
    (got - want).abs() <= tol
}

/// The size of the terms row `r`'s gradient is made of: `|g| · ((1 − ε)|w_t| + ε/V · (|W| +
/// max |w_j|) + 2c|lse|)`, `g` the row's upstream gradient (over the weight sum for `mean`).
fn row_scale(r: usize, t: &[i64], vocab: usize, opts: &LossOptions<'_>, up: Upstream<'_>, want: &RefOutput) -> f64 {
    if t[r] == opts.ignore_index {
        return 0.0;
    }
    let g = f64::from(match up {
        Upstream::Scalar(g) => g,
        Upstream::PerRow(g) => g[r],
    });
    let g = if opts.reduction == LossReduction::Mean { g / want.weight_sum } else { g };
    let w = |j: usize| opts.weight.map_or(1.0, |w| f64::from(w[j]).abs());
    let big_w: f64 = opts.weight.map_or(vocab as f64, |w| w.iter().map(|&v| f64::from(v)).sum::<f64>().abs());
    let max_w = (0..vocab).map(w).fold(0.0, f64::max);
    let (eps, v) = (f64::from(opts.label_smoothing), vocab as f64);
    let lse = if want.lse[r].is_finite() { want.lse[r].abs() } else { 0.0 };
    g.abs() * ((1.0 - eps) * w(t[r] as usize) + eps / v * (big_w + max_w) + 2.0 * f64::from(opts.z_loss) * lse)
}

/// Checks the gradient bytes against the reference (see the module documentation).
fn check_grad(
    dtype: Dtype,
    vocab: usize,
    grad: &[u8],
    want: &RefOutput,
    scale: impl Fn(usize) -> f64,
) -> Result<(), String> {
    for (r, row) in want.grad.chunks(vocab.max(1)).enumerate() {
        let scale = scale(r);
        for (j, &w) in row.iter().enumerate() {
            let g = get(dtype, grad, r * vocab + j);
            let (rounded, ulp) = round_and_ulp(dtype, w);
            if g == rounded || (g.is_nan() && w.is_nan()) {
                continue;
            }
            let tol = ATOL * scale + RTOL * w.abs() + if dtype == Dtype::F32 { 0.0 } else { ulp };
            if !near(g, w, tol) {
                return Err(format!("grad[{r}, {j}]: got {g:e}, want {w:e} (tolerance {tol:e}, row scale {scale:e})"));
            }
        }
    }
    Ok(())
}

/// Checks per-row loss and lse and the reduced loss.
fn check_loss(got: &LossOutput, want: &RefOutput) -> Result<(), String> {
    for (r, row) in got.rows.iter().enumerate() {
        let (l, lse) = (f64::from(row.loss), f64::from(row.lse));
        let finite = |v: f64| if v.is_finite() { v.abs() } else { 0.0 };
        let tol = LOSS_TOL * (1.0 + finite(want.lse[r]) + finite(want.row_loss[r]));
        if !near(l, want.row_loss[r], tol) {
            return Err(format!("row {r}: loss got {l} want {}", want.row_loss[r]));
        }
        if !near(lse, want.lse[r], tol) {
            return Err(format!("row {r}: lse got {lse} want {}", want.lse[r]));
        }
    }
    let scale = want.row_loss.iter().chain(&want.lse).filter(|v| v.is_finite()).map(|v| v.abs()).sum::<f64>();
    let denom = if want.weight_sum != 0.0 { want.weight_sum.abs() } else { 1.0 };
    if !near(got.loss, want.loss, LOSS_TOL * (1.0 + scale / denom)) {
        return Err(format!("reduced loss got {} want {}", got.loss, want.loss));
    }
    if got.weight_sum != want.weight_sum {
        return Err(format!("weight_sum got {} want {}", got.weight_sum, want.weight_sum));
    }
    Ok(())
}

/// Runs one case every way (separate buffer poisoned with NaN, in place, no gradient) and checks
/// each against the reference, and in place against separate bit for bit.
fn check(
    x: &[f32],
    t: &[i64],
    vocab: usize,
    dtype: Dtype,
    opts: &LossOptions<'_>,
    up: Upstream<'_>,
) -> Result<(), String> {
    let bytes = dtype.encode(x);
    let rows = x.len() / vocab;
    let logits = Logits::from_bytes(&bytes, dtype, rows, vocab).unwrap();
    let targets = Targets::I64(t);
    let want = cross_entropy(logits, targets, opts, up).map_err(|e| format!("reference: {e}"))?;
    let ignored: Vec<bool> = t.iter().map(|&v| v == opts.ignore_index).collect();

    let mut grad = vec![0xffu8; bytes.len()]; // poison: NaN in every dtype
    let sep = cpu::loss_and_grad(logits, targets, opts, up, Some(&mut grad)).map_err(|e| e.to_string())?;
    check_loss(&sep, &want).map_err(|m| format!("separate: {m}"))?;
    // A mean over rows whose target weights sum to 0 (but not all ignored) divides by 0: the
    // loss is infinite or NaN (checked above), the gradient too, in a pattern of infinities and
    // NaNs not worth pinning down.
    let degenerate = opts.reduction == LossReduction::Mean && want.weight_sum == 0.0 && ignored.iter().any(|&i| !i);
    if !degenerate {
        check_grad(dtype, vocab, &grad, &want, |r| row_scale(r, t, vocab, opts, up, &want))?;
    }

    let mut inplace = bytes.clone();
    let inp = cpu::loss_and_grad_in_place(&mut inplace, dtype, vocab, targets, opts, up).map_err(|e| e.to_string())?;
    if inplace != grad {
        let i = inplace.iter().zip(&grad).position(|(a, b)| a != b).unwrap();
        return Err(format!("in place and separate differ first at byte {i}"));
    }
    let same_rows = inp
        .rows
        .iter()
        .zip(&sep.rows)
        .all(|(a, b)| a.loss.to_bits() == b.loss.to_bits() && a.lse.to_bits() == b.lse.to_bits());
    if !same_rows || inp.loss.to_bits() != sep.loss.to_bits() {
        return Err("in place and separate give different losses".into());
    }

    let none = cpu::loss_and_grad(logits, targets, opts, up, None).map_err(|e| e.to_string())?;
    check_loss(&none, &want).map_err(|m| format!("no gradient: {m}"))?;
    Ok(())
}

fn dtypes() -> [Dtype; 3] {
    [Dtype::F32, Dtype::BF16, Dtype::F16]
}

#[test]
fn shapes_and_dtypes_default_options() {
    let shapes: &[(usize, &[usize])] = &[
        (1, &[1, 2, 3, 17, 64, 300]),
        (2, &[1, 2, 5, 300]),
        (3, &[1, 4, 33]),
        (17, &[1, 3, 16, 31, 200]),
        (1000, &[1, 2, 7, 64, 300]),
        (32000, &[1, 3, 20]),
        (128_256, &[1, 3, 8]),
        (256_000, &[1]),
    ];
    for &(vocab, rows_list) in shapes {
        for &rows in rows_list {
            for dtype in dtypes() {
                let (x, mut t) = random(rows, vocab, (rows * 31 + vocab) as u64, 3.0);
                if rows > 2 {
                    t[1] = -100;
                }
                for reduction in [LossReduction::Mean, LossReduction::Sum, LossReduction::None] {
                    let opts = LossOptions { reduction, ..LossOptions::default() };
                    check(&x, &t, vocab, dtype, &opts, Upstream::Scalar(1.0))
                        .unwrap_or_else(|m| panic!("{rows} x {vocab} {dtype} {reduction:?}: {m}"));
                    if vocab > 30_000 {
                        break; // one reduction is enough for the big shapes
                    }
                }
            }
        }
    }
}

/// Every subset of {weight, label smoothing, z-loss, soft-cap}, with every reduction (and, for
/// `none`, a per-row upstream gradient), on every dtype, on whole rows and on rows cut into parts.
#[test]
fn every_option_alone_and_combined() {
    for (rows, vocab) in [(6, 1000), (1, 5000), (2, 33), (3, 1)] {
        let (x, mut t) = random(rows, vocab, 99 + vocab as u64, 4.0);
        if rows > 2 {
            t[2] = -100;
        }
        let w = weights(vocab, 5);
        let per_row: Vec<f32> = (0..rows).map(|r| 0.5 + r as f32 * 0.25 - if r == 1 { 2.0 } else { 0.0 }).collect();
        for mask in 0..16u32 {
            for (reduction, up) in [
                (LossReduction::Mean, Upstream::Scalar(1.0)),
                (LossReduction::Sum, Upstream::Scalar(0.5)),
                (LossReduction::None, Upstream::Scalar(2.0)),
                (LossReduction::None, Upstream::PerRow(&per_row)),
            ] {
                let opts = LossOptions {
                    reduction,
                    weight: (mask & 1 != 0).then_some(&w[..]),
                    label_smoothing: if mask & 2 != 0 { 0.1 } else { 0.0 },
                    z_loss: if mask & 4 != 0 { 1e-3 } else { 0.0 },
                    softcap: (mask & 8 != 0).then_some(5.0),
                    ..LossOptions::default()
                };
                for dtype in dtypes() {
                    check(&x, &t, vocab, dtype, &opts, up)
                        .unwrap_or_else(|m| panic!("{rows} x {vocab} {dtype} {opts:?} {up:?}: {m}"));
                }
            }
        }
    }
}

#[test]
fn smoothing_corners() {
    // ε = 1 (only the smoothing term), a large soft-cap, a custom ignore index.
    let (rows, vocab) = (5, 300);
    let (x, mut t) = random(rows, vocab, 3, 2.0);
    t[0] = 7_777;
    let w = weights(vocab, 1);
    for opts in [
        LossOptions { label_smoothing: 1.0, ignore_index: 7_777, ..LossOptions::default() },
        LossOptions { label_smoothing: 1.0, weight: Some(&w), ignore_index: 7_777, ..LossOptions::default() },
        LossOptions { label_smoothing: 0.3, softcap: Some(1000.0), ignore_index: 7_777, ..LossOptions::default() },
        LossOptions { softcap: Some(0.5), z_loss: 0.1, ignore_index: 7_777, ..LossOptions::default() },
    ] {
        for dtype in dtypes() {
            check(&x, &t, vocab, dtype, &opts, Upstream::Scalar(1.0))
                .unwrap_or_else(|m| panic!("{dtype} {opts:?}: {m}"));
        }
    }
}

/// Upstream gradients large enough that the gradient's writers take their NaN-preserving stores.
#[test]
fn huge_upstream_gradients() {
    let (rows, vocab) = (4, 200);
    let (x, t) = random(rows, vocab, 12, 2.0);
    for g in [1e31f32, -3e33] {
        for reduction in [LossReduction::Sum, LossReduction::None] {
            let opts = LossOptions { reduction, ..LossOptions::default() };
            for dtype in dtypes() {
                check(&x, &t, vocab, dtype, &opts, Upstream::Scalar(g))
                    .unwrap_or_else(|m| panic!("{g:e} {reduction:?} {dtype}: {m}"));
            }
        }
    }
}

/// An infinite upstream gradient (or a factor that overflows f32): logits far below the row's
/// max still get an exact 0 — on every dtype's path, 16-bit rows (which keep the sum pass's
/// terms) as f32 rows — and the other elements (the target's `−w_t · g` included) are infinite
/// or NaN, never finite.
#[test]
fn infinite_upstream_keeps_flushed_terms_zero() {
    let (rows, vocab) = (8, 70);
    let mut x = vec![0f32; rows * vocab];
    for (i, v) in x.iter_mut().enumerate() {
        // Small integers (exact in every dtype), and every seventh logit 200 below the rest.
        *v = if i % 7 == 3 { -200.0 } else { (i % 5) as f32 };
    }
    let t: Vec<i64> = (0..rows as i64).map(|r| r * 3 % vocab as i64).collect();
    let opts = LossOptions { reduction: LossReduction::Sum, ..LossOptions::default() };
    for up in [f32::INFINITY, f32::NEG_INFINITY] {
        for dtype in dtypes() {
            let mut g = dtype.encode(&x);
            cpu::loss_and_grad_in_place(&mut g, dtype, vocab, Targets::I64(&t), &opts, Upstream::Scalar(up)).unwrap();
            for i in 0..rows * vocab {
                let v = get(dtype, &g, i);
                let target = t[i / vocab] as usize == i % vocab;
                if i % 7 == 3 && !target {
                    assert!(v == 0.0, "{dtype} {up}: grad[{i}] = {v}, want 0 (flushed term)");
                } else {
                    assert!(!v.is_finite(), "{dtype} {up}: grad[{i}] = {v}, want ±inf or NaN");
                }
            }
        }
    }
}

#[test]
fn all_ignored_batches() {
    let (rows, vocab) = (4, 100);
    let (x, _) = random(rows, vocab, 1, 1.0);
    let t = vec![-100i64; rows];
    for reduction in [LossReduction::Mean, LossReduction::Sum, LossReduction::None] {
        for dtype in dtypes() {
            let opts = LossOptions { reduction, label_smoothing: 0.2, ..LossOptions::default() };
            check(&x, &t, vocab, dtype, &opts, Upstream::Scalar(1.0)).unwrap_or_else(|m| panic!("{reduction:?}: {m}"));
            let mut bytes = dtype.encode(&x);
            let out =
                cpu::loss_and_grad_in_place(&mut bytes, dtype, vocab, Targets::I64(&t), &opts, Upstream::Scalar(1.0))
                    .unwrap();
            assert!(bytes.iter().all(|&b| b == 0), "{reduction:?}: the gradient of ignored rows is 0");
            if reduction == LossReduction::Mean {
                assert!(out.loss.is_nan(), "mean over no rows is NaN");
            } else {
                assert_eq!(out.loss, 0.0);
            }
        }
    }
    // No rows at all.
    let out = cpu::loss_and_grad_in_place(
        &mut [],
        Dtype::F32,
        10,
        Targets::I64(&[]),
        &LossOptions::default(),
        Upstream::Scalar(1.0),
    )
    .unwrap();
    assert!(out.rows.is_empty() && out.loss.is_nan());
}

#[test]
fn infinities_and_nans() {
    let (inf, nan) = (f32::INFINITY, f32::NAN);
    let vocab = 37; // two vectors and a tail
    let mut x = Vec::new();
    let mut t = Vec::new();
    let base: Vec<f32> = (0..vocab).map(|j| ((j * 7) % 13) as f32 - 6.0).collect();
    let mut row = |f: &dyn Fn(&mut Vec<f32>), target: i64| {
        let mut r = base.clone();
        f(&mut r);
        x.extend(r);
        t.push(target);
    };
    row(&|_| {}, 3);
    row(&|r| r[5] = nan, 3); // NaN: loss, lse, gradient NaN
    row(&|r| r[36] = inf, 36); // +inf: NaN without a soft-cap, fine with one
    row(&|r| r[0] = -inf, 1); // -inf elsewhere: gradient 0 there
    row(&|r| r[2] = -inf, 2); // -inf at the target: loss +inf
    row(&|r| r.iter_mut().for_each(|v| *v = -inf), 0); // only -inf: NaN
    row(&|r| r[20] = nan, -100); // ignored NaN row: loss 0, gradient 0
    row(&|r| r[17] = inf, -100);
    row(&|r| r[1] = 1e30, 1); // huge logits
    row(
        &|r| {
            r[1] = 1234.0;
            r[2] = 0.0
        },
        2,
    );
    let rows = t.len();
    for softcap in [None, Some(4.0)] {
        for label_smoothing in [0.0, 0.1] {
            for reduction in [LossReduction::Sum, LossReduction::None, LossReduction::Mean] {
                let opts = LossOptions { softcap, label_smoothing, reduction, ..LossOptions::default() };
                for dtype in dtypes() {
                    // f16 cannot hold 3e38 (it becomes +inf, which the reference then sees too).
                    check(&x, &t, vocab, dtype, &opts, Upstream::Scalar(1.0))
                        .unwrap_or_else(|m| panic!("{dtype} {opts:?}: {m}"));
                }
            }
        }
    }
    // Spot checks of the semantics themselves (f32, sum, no options).
    let opts = LossOptions { reduction: LossReduction::Sum, ..LossOptions::default() };
    let mut g = vec![0u8; rows * vocab * 4];
    let out = cpu::loss_and_grad(
        Logits::f32(&x, vocab).unwrap(),
        Targets::I64(&t),
        &opts,
        Upstream::Scalar(1.0),
        Some(&mut g),
    )
    .unwrap();
    let g: Vec<f32> = bytemuck::cast_slice(&g).to_vec();
    let grow = |r: usize| &g[r * vocab..(r + 1) * vocab];
    assert!(out.rows[1].loss.is_nan() && out.rows[1].lse.is_nan() && grow(1).iter().all(|v| v.is_nan()));
    assert!(out.rows[2].loss.is_nan() && grow(2).iter().all(|v| v.is_nan()));
    assert_eq!(grow(3)[0], 0.0);
    assert_eq!(out.rows[4].loss, f32::INFINITY);
    assert!(out.rows[5].loss.is_nan());
    assert_eq!(out.rows[6].loss, 0.0);
    assert!(out.rows[6].lse.is_nan());
    assert!(grow(6).iter().chain(grow(7)).all(|&v| v == 0.0));
    assert!(out.loss.is_nan());
    // With a soft-cap, +inf is the cap: the row is fine and its gradient there is 0.
    let capped = LossOptions { softcap: Some(4.0), ..opts };
    let mut g = vec![0u8; rows * vocab * 4];
    let out = cpu::loss_and_grad(
        Logits::f32(&x, vocab).unwrap(),
        Targets::I64(&t),
        &capped,
        Upstream::Scalar(1.0),
        Some(&mut g),
    )
    .unwrap();
    let g: Vec<f32> = bytemuck::cast_slice(&g).to_vec();
    assert!(out.rows[2].loss.is_finite());
    assert_eq!(g[2 * vocab + 36], 0.0);
}

/// Rows fewer than threads are cut into parts (and rows at least as many are not): both ways
/// against the reference, on pools of several sizes.
#[test]
fn rows_fewer_than_threads() {
    let w = weights(70_001, 2);
    for threads in [1, 3, 8] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            for (rows, vocab) in [(1, 70_001), (2, 4096), (3, 20_000), (1, 17), (9, 1000)] {
                let (x, t) = random(rows, vocab, 40 + rows as u64, 3.0);
                let w = &w[..vocab];
                for opts in [
                    LossOptions::default(),
                    LossOptions {
                        weight: Some(w),
                        label_smoothing: 0.05,
                        softcap: Some(20.0),
                        z_loss: 1e-4,
                        ..LossOptions::default()
                    },
                    LossOptions { label_smoothing: 0.05, ..LossOptions::default() },
                ] {
                    for dtype in dtypes() {
                        check(&x, &t, vocab, dtype, &opts, Upstream::Scalar(1.0))
                            .unwrap_or_else(|m| panic!("{threads} threads, {rows} x {vocab} {dtype}: {m}"));
                    }
                }
            }
        });
    }
}

#[test]
fn errors() {
    let vocab = 10;
    let x = vec![0.5f32; 3 * vocab];
    let t = [1i64, 2, 3];
    let logits = Logits::f32(&x, vocab).unwrap();
    let d = LossOptions::default();
    let up = Upstream::Scalar(1.0);
    let run = |opts: &LossOptions<'_>, t: &[i64], up: Upstream<'_>| {
        let mut g = vec![0u8; x.len() * 4];
        cpu::loss_and_grad(logits, Targets::I64(t), opts, up, Some(&mut g))
    };
    // The gradient buffer's length.
    for len in [0, x.len() * 4 - 1, x.len() * 4 + 4, x.len() * 2] {
        let mut g = vec![0u8; len];
        let e = cpu::loss_and_grad(logits, Targets::I64(&t), &d, up, Some(&mut g)).unwrap_err();
        assert!(matches!(e, Error::Shape(_)), "{len}: {e}");
    }
    // In place: not whole rows, vocab 0, an overflowing row.
    let mut b = vec![0u8; 4 * vocab * 3 + 2];
    assert!(matches!(
        cpu::loss_and_grad_in_place(&mut b, Dtype::F32, vocab, Targets::I64(&t), &d, up),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        cpu::loss_and_grad_in_place(&mut b, Dtype::F32, 0, Targets::I64(&t), &d, up),
        Err(Error::Shape(_))
    ));
    assert!(matches!(
        cpu::loss_and_grad_in_place(&mut b, Dtype::F32, usize::MAX / 2, Targets::I64(&t), &d, up),
        Err(Error::Shape(_))
    ));
    // Targets.
    assert!(matches!(run(&d, &[1, 2], up), Err(Error::RowMismatch { .. })));
    assert!(matches!(run(&d, &[1, 10, 3], up), Err(Error::TargetOutOfRange { row: 1, .. })));
    assert!(matches!(run(&d, &[1, -1, 3], up), Err(Error::TargetOutOfRange { row: 1, .. })));
    // Options.
    let w_short = vec![1.0f32; vocab - 1];
    let mut w_nan = vec![1.0f32; vocab];
    w_nan[3] = f32::NAN;
    let bad: Vec<LossOptions<'_>> = vec![
        LossOptions { label_smoothing: 1.5, ..d },
        LossOptions { label_smoothing: -0.1, ..d },
        LossOptions { label_smoothing: f32::NAN, ..d },
        LossOptions { z_loss: -1.0, ..d },
        LossOptions { z_loss: f32::INFINITY, ..d },
        LossOptions { softcap: Some(0.0), ..d },
        LossOptions { softcap: Some(-3.0), ..d },
        LossOptions { softcap: Some(f32::NAN), ..d },
        LossOptions { weight: Some(&w_short), ..d },
        LossOptions { weight: Some(&w_nan), ..d },
    ];
    for o in &bad {
        let e = run(o, &t, up).unwrap_err();
        assert!(matches!(e, Error::Argument(_) | Error::Shape(_)), "{o:?}: {e}");
        // The check every path shares, on its own: the same words.
        assert_eq!(o.validate(vocab).unwrap_err().to_string(), e.to_string(), "{o:?}");
    }
    assert!(d.validate(vocab).is_ok());
    // Per-row upstream: only with `none`, one per row.
    let g3 = [1.0f32; 3];
    assert!(matches!(run(&d, &t, Upstream::PerRow(&g3)), Err(Error::Argument(_))));
    let none = LossOptions { reduction: LossReduction::None, ..d };
    assert!(matches!(run(&none, &t, Upstream::PerRow(&g3[..2])), Err(Error::Shape(_))));
    assert!(run(&none, &t, Upstream::PerRow(&g3)).is_ok());
    // A failed call writes nothing in place.
    let mut b = Dtype::F32.encode(&x);
    let before = b.clone();
    assert!(cpu::loss_and_grad_in_place(&mut b, Dtype::F32, vocab, Targets::I64(&[1, 99, 2]), &d, up).is_err());
    assert_eq!(b, before);
}

#[test]
fn every_target_type_gives_the_same_bits() {
    let (rows, vocab) = (7, 300);
    let (x, t) = random(rows, vocab, 8, 2.0);
    let t32: Vec<i32> = t.iter().map(|&v| v as i32).collect();
    let tu: Vec<u32> = t.iter().map(|&v| v as u32).collect();
    let opts = LossOptions { label_smoothing: 0.1, ..LossOptions::default() };
    let run = |targets: Targets<'_>| {
        let mut g = Dtype::BF16.encode(&x);
        let out =
            cpu::loss_and_grad_in_place(&mut g, Dtype::BF16, vocab, targets, &opts, Upstream::Scalar(1.0)).unwrap();
        (g, out.loss.to_bits())
    };
    let want = run(Targets::I64(&t));
    assert_eq!(run(Targets::I32(&t32)), want);
    assert_eq!(run(Targets::U32(&tu)), want);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 128,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_0012),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random shapes (including 1, primes and non-multiples of the vector width), dtypes, spreads
    /// and options; some rows ignored, some logits -inf.
    #[test]
    fn random_cases_match_reference(
        vocab in prop_oneof![Just(1usize), Just(15), Just(16), Just(17), Just(33), Just(1031), 1usize..3000],
        rows in 1usize..40,
        seed in any::<u64>(),
        dtype in prop_oneof![Just(Dtype::F32), Just(Dtype::F16), Just(Dtype::BF16)],
        scale in prop_oneof![Just(0.1f32), Just(1.0), Just(8.0)],
        options in 0u32..64,
        reduction in prop_oneof![Just(LossReduction::Mean), Just(LossReduction::Sum), Just(LossReduction::None)],
    ) {
        let (mut x, mut t) = random(rows, vocab, seed, scale);
        let mut rng = xent::synth::Rng::new(seed ^ 1);
        for v in t.iter_mut() {
            if rng.uniform() < 0.15 {
                *v = -100;
            }
        }
        if options & 32 != 0 && vocab > 1 {
            for _ in 0..rows {
                let i = rng.below(x.len());
                x[i] = f32::NEG_INFINITY;
            }
        }
        let w = weights(vocab, seed);
        let per_row: Vec<f32> = (0..rows).map(|_| rng.normal() as f32).collect();
        let opts = LossOptions {
            reduction,
            weight: (options & 1 != 0).then_some(&w[..]),
            label_smoothing: if options & 2 != 0 { 0.25 } else { 0.0 },
            z_loss: if options & 4 != 0 { 1e-2 } else { 0.0 },
            softcap: (options & 8 != 0).then_some(3.0 * scale),
            ..LossOptions::default()
        };
        let up = if reduction == LossReduction::None && options & 16 != 0 { Upstream::PerRow(&per_row) } else { Upstream::Scalar(1.5) };
        if let Err(m) = check(&x, &t, vocab, dtype, &opts, up) {
            panic!("{rows} x {vocab} {dtype} scale {scale} {opts:?} {up:?}: {m}");
        }
    }
}
