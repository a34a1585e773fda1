//! The fused loss-and-gradient GPU kernel against the f64 reference (`xent::train::reference`):
//! shapes from 1 to 256000 logits, every dtype, reduction and option alone and together,
//! all-ignored batches, ±inf / NaN logits, every kernel layout, chunking by small bindings, and
//! `encode_loss_and_grad` over caller buffers with guard regions around the rows (in place and
//! into a separate buffer, which give the same bits).

mod common;

use common::{close, gpu, new_gpu, planned_gpus, random_case, small_bindings, to_bytes};
use proptest::prelude::*;
use wgpu::util::DeviceExt;
use xent::train::reference::{cross_entropy, RefOutput};
use xent::train::{prepare, LossOptions, LossReduction, TrainRow, Upstream};
use xent::{ClassWeights, Dtype, GpuContext, GradOutput, Logits, Targets, TrainEncodeJob, TRAIN_ROW_BYTES};

/// Relative tolerance of a gradient element: one unit in the last place of the output dtype (the
/// kernel computes in f32 and rounds once), or f32's error.
fn grad_rtol(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::F32 => 2e-5,
        Dtype::F16 => 2f64.powi(-10),
        Dtype::BF16 => 2f64.powi(-7),
    }
}

/// Checks per-row results and the gradient (bytes of `dtype`) against the reference. Gradient
/// elements of row r may be off by `3e-6 · |scale_r| · (largest gradient factor)` absolutely —
/// f32's rounding of p_j·coef and of the one-hot and smoothing terms — plus `grad_rtol`
/// relatively. Returns the worst gradient error as a fraction of its tolerance.
#[allow(clippy::too_many_arguments)]
fn check(
    rows: &[TrainRow],
    loss: f64,
    grad: Option<&[u8]>,
    want: &RefOutput,
    dtype: Dtype,
    vocab: usize,
    opts: &LossOptions<'_>,
    scale: &[f32],
) -> Result<f64, String> {
    if rows.len() != want.row_loss.len() {
        return Err(format!("{} rows, want {}", rows.len(), want.row_loss.len()));
    }
    // The reference's values as f32 would hold them (beyond f32's range: infinite).
    let f = |v: f64| f64::from(v as f32);
    for (r, got) in rows.iter().enumerate() {
        if !close(f64::from(got.loss), f(want.row_loss[r]), 2e-5, 2e-5) {
            return Err(format!("row {r}: loss {} want {}", got.loss, want.row_loss[r]));
        }
        if !close(f64::from(got.lse), f(want.lse[r]), 1e-5, 1e-6) {
            return Err(format!("row {r}: lse {} want {}", got.lse, want.lse[r]));
        }
    }
    if !close(f(loss), f(want.loss), 1e-5, 1e-5) {
        return Err(format!("reduced loss {loss} want {}", want.loss));
    }
    let Some(grad) = grad else { return Ok(0.0) };
    let g = Logits::from_bytes(grad, dtype, rows.len(), vocab).map_err(|e| e.to_string())?;
    let wmax = opts.weight.map_or(1.0, |w| w.iter().fold(0f64, |a, &v| a.max(f64::from(v).abs())));
    let mut worst = 0f64;
    for (r, &row_scale) in scale.iter().enumerate().take(rows.len()) {
        let zl = if opts.z_loss > 0.0 { 2.0 * f64::from(opts.z_loss) * want.lse[r].abs() } else { 0.0 };
        let factor = wmax * (1.0 + f64::from(opts.label_smoothing)) + if zl.is_finite() { zl } else { 0.0 };
        let atol = 3e-6 * f64::from(row_scale).abs() * factor + if dtype == Dtype::F16 { 6e-8 } else { 0.0 };
        for j in 0..vocab {
            let (a, b) = (f64::from(g.get(r, j)), want.grad[r * vocab + j]);
            if !close(a, f(b), atol, grad_rtol(dtype)) {
                return Err(format!("row {r} element {j}: gradient {a:e} want {b:e} (atol {atol:e})"));
            }
            if a.is_finite() && b.is_finite() {
                worst = worst.max((a - b).abs() / (atol + grad_rtol(dtype) * b.abs()));
            }
        }
    }
    Ok(worst)
}

/// Runs the host entry points on one case — gradient into a separate slice, in place, and none —
/// and checks them against the reference; in place and separate must give the same bits.
fn host_case(
    ctx: &GpuContext,
    x: &[f32],
    dtype: Dtype,
    vocab: usize,
    t: &[i64],
    opts: &LossOptions<'_>,
    up: Upstream<'_>,
) -> f64 {
    let bytes = to_bytes(x, dtype);
    let rows = t.len();
    let what = format!("{rows} x {vocab} {dtype} {opts:?} {up:?}");
    let logits = Logits::from_bytes(&bytes, dtype, rows, vocab).unwrap();
    let want = cross_entropy(logits, Targets::I64(t), opts, up).unwrap();
    let scale = prepare(logits, Targets::I64(t), opts, up).unwrap().scale;
    let mut grad = vec![0x5au8; bytes.len()];
    let got = ctx.loss_and_grad(logits, Targets::I64(t), opts, up, Some(&mut grad)).unwrap();
    let worst = check(&got.rows, got.loss, Some(&grad), &want, dtype, vocab, opts, &scale)
        .unwrap_or_else(|m| panic!("{what} ({}): {m}", ctx.plan_train(rows as u64, vocab as u32)));
    let mut in_place = bytes.clone();
    let again = ctx.loss_and_grad_in_place(&mut in_place, dtype, vocab, Targets::I64(t), opts, up).unwrap();
    assert!(in_place == grad, "{what}: in place and separate gradients differ");
    assert_eq!(bits(&again.rows), bits(&got.rows), "{what}: in place changed the rows");
    let alone = ctx.loss_and_grad(logits, Targets::I64(t), opts, up, None).unwrap();
    assert_eq!(bits(&alone.rows), bits(&got.rows), "{what}: the loss alone differs");
    assert_eq!(got.weight_sum, want.weight_sum);
    worst
}

fn bits(rows: &[TrainRow]) -> Vec<(u32, u32)> {
    rows.iter().map(|r| (r.loss.to_bits(), r.lse.to_bits())).collect()
}

fn weights(vocab: usize, seed: u64) -> Vec<f32> {
    let mut rng = xent::synth::Rng::new(seed);
    (0..vocab).map(|_| 0.25 + 1.5 * rng.below(1000) as f32 / 1000.0).collect()
}

/// Every option at once.
fn all_options<'a>(w: &'a [f32], reduction: LossReduction) -> LossOptions<'a> {
    LossOptions {
        ignore_index: -100,
        reduction,
        weight: Some(w),
        label_smoothing: 0.1,
        z_loss: 1e-4,
        softcap: Some(15.0),
    }
}

#[test]
fn shapes_dtypes_and_reductions() {
    let Some(ctx) = gpu() else { return };
    let mut worst = 0f64;
    for (rows, vocab) in [(5usize, 1usize), (4, 2), (7, 3), (9, 17), (6, 1000), (3, 32_000), (2, 32_001)] {
        let (x, mut t) = random_case(rows, vocab, (rows * vocab) as u64, 3.0);
        if rows > 3 {
            t[2] = -100;
        }
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            for reduction in [LossReduction::Mean, LossReduction::Sum, LossReduction::None] {
                let opts = LossOptions { reduction, ..Default::default() };
                worst = worst.max(host_case(ctx, &x, dtype, vocab, &t, &opts, Upstream::Scalar(1.0)));
            }
            let up: Vec<f32> = (0..rows).map(|r| 0.5 - r as f32 * 0.25).collect();
            let opts = LossOptions { reduction: LossReduction::None, ..Default::default() };
            worst = worst.max(host_case(ctx, &x, dtype, vocab, &t, &opts, Upstream::PerRow(&up)));
            let opts = LossOptions { reduction: LossReduction::Mean, ..Default::default() };
            worst = worst.max(host_case(ctx, &x, dtype, vocab, &t, &opts, Upstream::Scalar(-2.5)));
        }
    }
    eprintln!("worst gradient error: {worst:.3} of the tolerance");
}

/// Long rows: 128256 (few rows, split over workgroups where the planner splits) and one row of
/// 256000; odd lengths for the 16-bit types, so rows share words.
#[test]
fn long_rows() {
    let Some(ctx) = gpu() else { return };
    let w = weights(256_000, 3);
    for (rows, vocab, dtype) in [
        (3usize, 128_256usize, Dtype::F32),
        (3, 128_257, Dtype::BF16),
        (1, 256_000, Dtype::F32),
        (1, 255_999, Dtype::F16),
    ] {
        let (x, mut t) = random_case(rows, vocab, vocab as u64, 2.0);
        t[0] = (vocab - 1) as i64;
        host_case(ctx, &x, dtype, vocab, &t, &LossOptions::default(), Upstream::Scalar(1.0));
        let opts = all_options(&w[..vocab], LossReduction::Mean);
        host_case(ctx, &x, dtype, vocab, &t, &opts, Upstream::Scalar(1.0));
    }
}

#[test]
fn every_option_alone_and_together() {
    let Some(ctx) = gpu() else { return };
    let mut worst = 0f64;
    for (rows, vocab) in [(6usize, 17usize), (5, 1001)] {
        let (x, mut t) = random_case(rows, vocab, vocab as u64 + 7, 4.0);
        t[1] = 3; // the custom ignore index below
        t[3] = -100;
        // The same rows for ignore index 3, where -100 is no valid target.
        let t3: Vec<i64> = t.iter().map(|&v| if v == -100 { 3 } else { v }).collect();
        let targets_for = |opts: &LossOptions<'_>| if opts.ignore_index == 3 { t3.clone() } else { t.clone() };
        let w = weights(vocab, 11);
        let up: Vec<f32> = (0..rows).map(|r| 1.0 + r as f32).collect();
        let base = LossOptions::default();
        let alone = [
            LossOptions { ignore_index: 3, ..base },
            LossOptions { weight: Some(&w), ..base },
            LossOptions { label_smoothing: 0.2, ..base },
            LossOptions { label_smoothing: 1.0, ..base },
            LossOptions { z_loss: 1e-3, ..base },
            LossOptions { softcap: Some(2.5), ..base },
            LossOptions { weight: Some(&w), label_smoothing: 0.3, ..base },
        ];
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            for opts in &alone {
                worst = worst.max(host_case(ctx, &x, dtype, vocab, &targets_for(opts), opts, Upstream::Scalar(1.0)));
            }
            for reduction in [LossReduction::Mean, LossReduction::Sum] {
                let opts = LossOptions { ignore_index: 3, ..all_options(&w, reduction) };
                worst = worst.max(host_case(ctx, &x, dtype, vocab, &t3, &opts, Upstream::Scalar(0.75)));
            }
            let opts = all_options(&w, LossReduction::None);
            worst = worst.max(host_case(ctx, &x, dtype, vocab, &t, &opts, Upstream::PerRow(&up)));
        }
    }
    eprintln!("worst gradient error: {worst:.3} of the tolerance");
}

#[test]
fn all_ignored_batches() {
    let Some(ctx) = gpu() else { return };
    let (rows, vocab) = (5usize, 333usize);
    let (mut x, _) = random_case(rows, vocab, 5, 2.0);
    x[7] = f32::NAN; // an ignored row holding NaN still gets a zero gradient
    let t = vec![-100i64; rows];
    let w = weights(vocab, 5);
    for dtype in [Dtype::F32, Dtype::BF16] {
        for opts in [LossOptions::default(), all_options(&w, LossReduction::Mean), all_options(&w, LossReduction::Sum)]
        {
            host_case(ctx, &x, dtype, vocab, &t, &opts, Upstream::Scalar(1.0));
            let bytes = to_bytes(&x, dtype);
            let mut grad = vec![0xffu8; bytes.len()];
            let logits = Logits::from_bytes(&bytes, dtype, rows, vocab).unwrap();
            let out =
                ctx.loss_and_grad(logits, Targets::I64(&t), &opts, Upstream::Scalar(1.0), Some(&mut grad)).unwrap();
            assert!(grad.iter().all(|&b| b == 0), "every gradient is +0");
            assert_eq!(out.weight_sum, 0.0);
            match opts.reduction {
                LossReduction::Mean => assert!(out.loss.is_nan(), "mean over no rows is NaN"),
                _ => assert_eq!(out.loss, 0.0),
            }
        }
    }
}

/// ±inf and NaN logits (the reference's results, which are torch's), under each option that
/// changes how they act: a soft-cap maps ±inf to ±cap, smoothing makes a -inf logit's loss
/// infinite, a zero weight on it with smoothing makes it NaN.
#[test]
fn infinities_and_nans() {
    let Some(ctx) = gpu() else { return };
    let (inf, nan) = (f32::INFINITY, f32::NAN);
    #[rustfmt::skip]
    let cases: Vec<([f32; 5], i64)> = vec![
        ([3e38, 0.0, -3e38, 1.0, 2.0], 1),
        ([3e38, 0.0, 1.0, 1.0, 2.0], 0),
        ([-inf, 0.0, 1.0, -inf, 2.0], 2),
        ([-inf, 0.0, 1.0, -inf, 2.0], 0),   // the target's logit is -inf: infinite loss
        ([1.0, nan, 1.0, 1.0, 1.0], 0),     // NaN row
        ([inf, 0.0, 1.0, 1.0, 1.0], 1),     // +inf row: NaN, as torch
        ([-inf, -inf, -inf, -inf, -inf], 0),// all -inf: NaN
        ([1e4, 1e4, 1e4, 1e4, 1e4], 4),
        ([nan, inf, 0.0, 0.0, 0.0], -100),  // ignored: loss 0, gradient 0
        ([-3.4028235e38, -inf, -inf, -inf, -inf], 0),
    ];
    let x: Vec<f32> = cases.iter().flat_map(|c| c.0).collect();
    let t: Vec<i64> = cases.iter().map(|c| c.1).collect();
    let mut w = vec![1.0f32, 0.5, 2.0, 1.0, 1.5];
    let base = LossOptions { reduction: LossReduction::Sum, ..Default::default() };
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let x: Vec<f32> = match dtype {
            // 3e38 is not an f16: clamp magnitudes to what the type holds.
            Dtype::F16 => x.iter().map(|v| if v.is_finite() { v.clamp(-6e4, 6e4) } else { *v }).collect(),
            _ => x.clone(),
        };
        for opts in [base, LossOptions { softcap: Some(30.0), ..base }, LossOptions { z_loss: 1e-4, ..base }] {
            host_case(ctx, &x, dtype, 5, &t, &opts, Upstream::Scalar(1.0));
        }
        // Smoothing sums z_j - m over the row: logits of ±3e38 overflow that sum in f32 (as they
        // overflow torch's f32 log-softmax) where the f64 reference does not; ±1e37 do not.
        let x: Vec<f32> = x.iter().map(|&v| if v.is_finite() { v.clamp(-1e37, 1e37) } else { v }).collect();
        host_case(ctx, &x, dtype, 5, &t, &LossOptions { label_smoothing: 0.1, ..base }, Upstream::Scalar(1.0));
        w[0] = 0.0; // zero weight on the -inf class, with smoothing: 0·inf, NaN in the reference too
        host_case(
            ctx,
            &x,
            dtype,
            5,
            &t,
            &LossOptions { weight: Some(&w), label_smoothing: 0.1, ..base },
            Upstream::Scalar(1.0),
        );
        w[0] = 1.0;
    }
    // Spot checks of what the cases mean, in f32.
    let bytes = to_bytes(&x, Dtype::F32);
    let logits = Logits::from_bytes(&bytes, Dtype::F32, t.len(), 5).unwrap();
    let mut grad = vec![0u8; bytes.len()];
    let out = ctx.loss_and_grad(logits, Targets::I64(&t), &base, Upstream::Scalar(1.0), Some(&mut grad)).unwrap();
    let g: &[f32] = bytemuck::cast_slice(&grad);
    assert_eq!(out.rows[3].loss, f32::INFINITY);
    assert!((g[15] + 1.0).abs() < 1e-6, "the -inf target's gradient is p - 1 = -1");
    assert!(out.rows[4].loss.is_nan() && out.rows[5].loss.is_nan() && out.rows[6].loss.is_nan());
    assert!(g[20..35].iter().all(|v| v.is_nan()), "broken rows have NaN gradients");
    assert_eq!(out.rows[8].loss, 0.0);
    assert!(out.rows[8].lse.is_nan());
    assert!(g[40..45].iter().all(|&v| v == 0.0), "an ignored row's gradient is 0, NaN or not");
    assert!(out.loss.is_nan(), "a sum over NaN rows is NaN");
}

/// Every kernel layout (each reduction, several rows per workgroup, rows split over workgroups),
/// with 16-bit rows sharing words inside a workgroup, across workgroups and across split parts.
#[test]
fn every_plan() {
    if gpu().is_none() {
        return;
    }
    let w = weights(4099, 2);
    for (_, ctx) in planned_gpus() {
        for (rows, vocab) in [(9usize, 33usize), (5, 4099)] {
            let (x, mut t) = random_case(rows, vocab, vocab as u64, 3.0);
            t[rows - 1] = -100;
            for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
                host_case(ctx, &x, dtype, vocab, &t, &LossOptions::default(), Upstream::Scalar(1.0));
            }
            host_case(
                ctx,
                &x,
                Dtype::BF16,
                vocab,
                &t,
                &all_options(&w[..vocab], LossReduction::Mean),
                Upstream::Scalar(1.0),
            );
        }
    }
}

/// Tiny bindings force many chunks: rows that straddle alignment boundaries, 16-bit words shared
/// by the last row of one chunk and the first of the next, windows starting mid-row-pair.
#[test]
fn chunked_by_small_bindings() {
    for plan in [None, Some(xent::Plan { reduction: xent::Reduction::Workgroup, rows_per_workgroup: 1, split: 3 })] {
        let Some(mut ctx) = new_gpu() else { return };
        small_bindings(&mut ctx);
        ctx.force_plan(plan);
        let w = weights(1000, 4);
        for (rows, vocab) in [(41usize, 301usize), (17, 1000), (900, 7)] {
            let (x, mut t) = random_case(rows, vocab, rows as u64, 2.0);
            t[rows / 2] = -100;
            for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
                let chunk = ctx.rows_per_chunk_train(dtype, vocab as u64).unwrap();
                assert!((rows as u64) > 2 * chunk, "{rows} x {vocab} {dtype}: chunks of {chunk} rows");
                host_case(&ctx, &x, dtype, vocab, &t, &LossOptions::default(), Upstream::Scalar(1.0));
                host_case(
                    &ctx,
                    &x,
                    dtype,
                    vocab,
                    &t,
                    &all_options(&w[..vocab], LossReduction::Sum),
                    Upstream::Scalar(1.0),
                );
            }
        }
        // A row larger than a binding is an error, not a wrong answer.
        let x = vec![0f32; 2000];
        let e = ctx
            .loss_and_grad(
                Logits::f32(&x, 2000).unwrap(),
                Targets::I64(&[0]),
                &LossOptions::default(),
                Upstream::Scalar(1.0),
                None,
            )
            .unwrap_err();
        assert!(matches!(e, xent::Error::Shape(_)), "{e}");
    }
}

// ---- encode over caller buffers ----

/// Bytes outside every row of a layout, which no run may change.
const GUARD: u8 = 0xa5;

/// Builds a buffer of `dtype` elements: `lead` guard elements, then `rows` rows of `vocab` from
/// `x` every `stride` elements (guards between), then `trail` guard elements.
fn laid_out(x: &[f32], dtype: Dtype, rows: usize, vocab: usize, lead: usize, stride: usize, trail: usize) -> Vec<u8> {
    let es = dtype.size();
    let len = (lead + (rows - 1) * stride + vocab + trail) * es;
    let mut bytes = vec![GUARD; len.next_multiple_of(4)];
    for r in 0..rows {
        let row = to_bytes(&x[r * vocab..(r + 1) * vocab], dtype);
        let at = (lead + r * stride) * es;
        bytes[at..at + row.len()].copy_from_slice(&row);
    }
    bytes
}

/// Splits a laid-out buffer into its dense rows and everything else.
fn rows_and_guards(
    bytes: &[u8],
    dtype: Dtype,
    rows: usize,
    vocab: usize,
    lead: usize,
    stride: usize,
) -> (Vec<u8>, Vec<u8>) {
    let es = dtype.size();
    let (mut dense, mut rest) = (Vec::new(), Vec::new());
    let mut at = 0;
    for r in 0..rows {
        let start = (lead + r * stride) * es;
        rest.extend_from_slice(&bytes[at..start]);
        dense.extend_from_slice(&bytes[start..start + vocab * es]);
        at = start + vocab * es;
    }
    rest.extend_from_slice(&bytes[at..]);
    (dense, rest)
}

struct Layout {
    lead: usize,
    stride_pad: usize,
    trail: usize,
}

/// Where an encode case writes the gradient.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Dest {
    /// Over the logits.
    InPlace,
    /// Into a buffer of its own.
    Separate,
    /// Into the logits' buffer, in a region after theirs.
    SharedAfter,
    /// Into the logits' buffer, in a region before theirs.
    SharedBefore,
}

/// One encode job over caller buffers with guard regions everywhere: logits (lead, padded or
/// dense stride, trail), targets, scales, weights and results at offsets, and — in place, into a
/// separate buffer of another stride, or into such a region of the logits' own buffer — the
/// gradient. Checks the guards and the reference, and returns the gradient's dense bytes and the
/// rows, or the error `encode_loss_and_grad` refused the job with.
#[allow(clippy::too_many_arguments)]
fn encode_case(
    ctx: &GpuContext,
    x: &[f32],
    dtype: Dtype,
    vocab: usize,
    t: &[i64],
    opts: &LossOptions<'_>,
    layout: &Layout,
    dest: Dest,
) -> Result<(Vec<u8>, Vec<TrainRow>), xent::Error> {
    let rows = t.len();
    let device = ctx.device();
    let what = format!("{rows} x {vocab} {dtype} lead {} pad {} {dest:?}", layout.lead, layout.stride_pad);
    let stride = vocab + layout.stride_pad;
    let x_bytes = laid_out(x, dtype, rows, vocab, layout.lead, stride, layout.trail);
    let dense = to_bytes(x, dtype);
    let logits = Logits::from_bytes(&dense, dtype, rows, vocab).unwrap();
    let p = prepare(logits, Targets::I64(t), opts, Upstream::Scalar(1.0)).unwrap();
    let want = cross_entropy(logits, Targets::I64(t), opts, Upstream::Scalar(1.0)).unwrap();
    use wgpu::BufferUsages as U;
    let make = |label: &str, bytes: &[u8]| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytes,
            usage: U::STORAGE | U::COPY_SRC,
        })
    };
    let read = |buf: &wgpu::Buffer| {
        let size = buf.size();
        let staging = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("test read"),
            size,
            usage: U::MAP_READ | U::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buf, 0, &staging, 0, size);
        ctx.queue().submit([encoder.finish()]);
        let mut out = vec![0u8; size as usize];
        xent::read_buffer(device, &staging, size, &mut out).unwrap();
        out
    };
    // A gradient of its own: its own lead (same element parity), dense rows when the logits' are
    // (16-bit rows then share words, as engines lay gradients out), else a stride 2 longer; in
    // the logits' buffer, that layout after or before theirs.
    let g_lead = layout.lead + 6;
    let g_stride = if layout.stride_pad == 0 { stride } else { stride + 2 };
    let g_bytes = laid_out(&vec![0.0; rows * vocab], dtype, rows, vocab, g_lead, g_stride, 3);
    let (x_at, g_at) = match dest {
        Dest::SharedAfter => (0, x_bytes.len()),
        Dest::SharedBefore => (g_bytes.len(), 0),
        Dest::InPlace | Dest::Separate => (0, 0),
    };
    let shared = matches!(dest, Dest::SharedAfter | Dest::SharedBefore);
    let logits_buf = match dest {
        Dest::SharedAfter => make("test logits and gradient", &[x_bytes.clone(), g_bytes.clone()].concat()),
        Dest::SharedBefore => make("test gradient and logits", &[g_bytes.clone(), x_bytes.clone()].concat()),
        Dest::InPlace | Dest::Separate => make("test logits", &x_bytes),
    };
    // Per-row inputs and results after three guard records.
    let pad = |bytes: &[u8], unit: usize| [vec![GUARD; 3 * unit], bytes.to_vec(), vec![GUARD; 2 * unit]].concat();
    let targets_buf = make("test targets", &pad(bytemuck::cast_slice(&p.targets), 4));
    let scale_buf = make("test scale", &pad(bytemuck::cast_slice(&p.scale), 4));
    let weight_buf = opts.weight.map(|w| make("test weights", &pad(bytemuck::cast_slice(w), 4)));
    let out_buf = make("test output", &vec![GUARD; (rows + 5) * 8]);
    let grad_buf = if shared { None } else { Some(make("test gradient", &g_bytes)) };
    let grad_guard_before = rows_and_guards(&g_bytes, dtype, rows, vocab, g_lead, g_stride).1;
    let es = dtype.size() as u64;
    let job = TrainEncodeJob {
        logits: &logits_buf,
        logits_offset: (x_at + layout.lead * dtype.size()) as u64,
        dtype,
        row_stride: stride as u64,
        rows: rows as u64,
        vocab: vocab as u32,
        targets: &targets_buf,
        targets_offset: 12,
        ignore: None,
        scale: &scale_buf,
        scale_offset: 12,
        weight: weight_buf.as_ref().map(|buffer| ClassWeights { buffer, offset: 12 }),
        label_smoothing: opts.label_smoothing,
        z_loss: opts.z_loss,
        softcap: opts.softcap,
        output: &out_buf,
        output_offset: 3 * TRAIN_ROW_BYTES,
        grad: match &grad_buf {
            _ if dest == Dest::InPlace => GradOutput::InPlace,
            Some(buffer) => GradOutput::Buffer { buffer, offset: g_lead as u64 * es, row_stride: g_stride as u64 },
            None => GradOutput::Buffer {
                buffer: &logits_buf,
                offset: (g_at + g_lead * dtype.size()) as u64,
                row_stride: g_stride as u64,
            },
        },
    };
    let mut encoder = device.create_command_encoder(&Default::default());
    ctx.encode_loss_and_grad(&mut encoder, &job)?;
    ctx.queue().submit([encoder.finish()]);
    let out = read(&out_buf);
    assert!(
        out[..24].iter().chain(&out[24 + rows * 8..]).all(|&b| b == GUARD),
        "{what}: results written outside the rows"
    );
    let got: Vec<TrainRow> = bytemuck::pod_collect_to_vec(&out[24..24 + rows * 8]);
    let logits_after = read(&logits_buf);
    let x_after = &logits_after[x_at..x_at + x_bytes.len()];
    let (x_after_dense, x_after_guards) = rows_and_guards(x_after, dtype, rows, vocab, layout.lead, stride);
    let x_guards = rows_and_guards(&x_bytes, dtype, rows, vocab, layout.lead, stride).1;
    assert!(x_after_guards == x_guards, "{what}: bytes outside the logits rows changed");
    let grad = if dest == Dest::InPlace {
        x_after_dense
    } else {
        assert!(x_after_dense == dense, "{what}: the logits changed");
        let g_after = match &grad_buf {
            Some(buffer) => read(buffer),
            None => logits_after[g_at..g_at + g_bytes.len()].to_vec(),
        };
        let (g, guards) = rows_and_guards(&g_after, dtype, rows, vocab, g_lead, g_stride);
        assert!(guards == grad_guard_before, "{what}: bytes outside the gradient rows changed");
        g
    };
    let loss = xent::train::reduce(&got, opts.reduction, p.weight_sum);
    check(&got, loss, Some(&grad), &want, dtype, vocab, opts, &p.scale).unwrap_or_else(|m| panic!("{what}: {m}"));
    ctx.check_device_errors().unwrap();
    Ok((grad, got))
}

/// Every layout and destination of [`encode_case`]; returns how many shared-buffer cases ran.
/// With `small` bindings, a shared case may be refused for not fitting one binding.
fn encode_layouts(ctx: &GpuContext, small: bool) -> usize {
    let w = weights(301, 9);
    let mut shared_ran = 0;
    for (rows, vocab) in [(6usize, 301usize), (5, 64), (40, 20), (60, 21)] {
        let (x, mut t) = random_case(rows, vocab, 13, 3.0);
        t[2] = -100;
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            for layout in [
                Layout { lead: 0, stride_pad: 0, trail: 0 },
                Layout { lead: 3, stride_pad: 0, trail: 1 },
                Layout { lead: 1, stride_pad: 3, trail: 2 },
            ] {
                for opts in [LossOptions::default(), all_options(&w[..vocab], LossReduction::Sum)] {
                    let what = format!("{rows} x {vocab} {dtype} lead {}", layout.lead);
                    let a = encode_case(ctx, &x, dtype, vocab, &t, &opts, &layout, Dest::InPlace)
                        .unwrap_or_else(|e| panic!("{what} in place: {e}"));
                    for dest in [Dest::Separate, Dest::SharedAfter, Dest::SharedBefore] {
                        let b = match encode_case(ctx, &x, dtype, vocab, &t, &opts, &layout, dest) {
                            Ok(b) => b,
                            Err(xent::Error::Buffer(m))
                                if small && dest != Dest::Separate && m.contains("largest storage binding") =>
                            {
                                continue
                            }
                            Err(e) => panic!("{what} {dest:?}: {e}"),
                        };
                        shared_ran += usize::from(dest != Dest::Separate);
                        assert!(a.0 == b.0, "{what} {dest:?}: the gradient differs from in place");
                        assert_eq!(bits(&a.1), bits(&b.1));
                    }
                }
            }
        }
    }
    shared_ran
}

/// `encode_loss_and_grad` over caller buffers: offsets, padded and dense strides, odd element
/// offsets for 16-bit types, under every kernel layout and with many chunks; nothing outside the
/// rows changes — in place, into a separate buffer, or into a region of the logits' own buffer
/// after or before theirs — and every destination gives the same bits.
#[test]
fn encode_with_guard_regions() {
    if gpu().is_none() {
        return;
    }
    for (_, ctx) in planned_gpus().iter().step_by(2) {
        encode_layouts(ctx, false);
    }
    let mut small = new_gpu().unwrap();
    small_bindings(&mut small);
    // 40 x 20 (f32) and 60 x 21 (16-bit, odd: chunks end inside a word) in one buffer with their
    // gradient are more than one small binding: shared chunks.
    assert!(encode_layouts(&small, true) > 0, "no shared-buffer case fitted the small bindings");
}

#[test]
fn encode_rejects_bad_jobs() {
    let Some(ctx) = gpu() else { return };
    let device = ctx.device();
    let make = |size, usage| {
        device.create_buffer(&wgpu::BufferDescriptor { label: None, size, usage, mapped_at_creation: false })
    };
    let storage = wgpu::BufferUsages::STORAGE;
    let logits = make(400, storage);
    let targets = make(16, storage);
    let scale = make(16, storage);
    let out = make(32, storage);
    let grad = make(400, storage);
    let not_storage = make(16, wgpu::BufferUsages::COPY_DST);
    let job = TrainEncodeJob {
        logits: &logits,
        logits_offset: 0,
        dtype: Dtype::F32,
        row_stride: 25,
        rows: 4,
        vocab: 25,
        targets: &targets,
        targets_offset: 0,
        ignore: None,
        scale: &scale,
        scale_offset: 0,
        weight: None,
        label_smoothing: 0.0,
        z_loss: 0.0,
        softcap: None,
        output: &out,
        output_offset: 0,
        grad: GradOutput::InPlace,
    };
    let mut encoder = device.create_command_encoder(&Default::default());
    ctx.encode_loss_and_grad(&mut encoder, &job).unwrap();
    let separate = GradOutput::Buffer { buffer: &grad, offset: 0, row_stride: 25 };
    ctx.encode_loss_and_grad(&mut encoder, &TrainEncodeJob { grad: separate, ..job }).unwrap();
    ctx.encode_loss_and_grad(&mut encoder, &TrainEncodeJob { grad: GradOutput::None, ..job }).unwrap();
    use xent::Error as E;
    let f16 = TrainEncodeJob { dtype: Dtype::F16, row_stride: 49, vocab: 49, ..job };
    type IsExpected = fn(&E) -> bool;
    let cases: Vec<(TrainEncodeJob<'_>, IsExpected)> = vec![
        (TrainEncodeJob { rows: 5, ..job }, |e| matches!(e, E::Buffer(_))),
        (TrainEncodeJob { row_stride: 26, ..job }, |e| matches!(e, E::Buffer(_))),
        (TrainEncodeJob { row_stride: 20, ..job }, |e| matches!(e, E::Shape(_))),
        (TrainEncodeJob { vocab: 0, ..job }, |e| matches!(e, E::Shape(_))),
        (TrainEncodeJob { output_offset: 4, ..job }, |e| matches!(e, E::Buffer(_))),
        (TrainEncodeJob { targets_offset: 2, ..job }, |e| matches!(e, E::Buffer(_))),
        (TrainEncodeJob { logits_offset: 2, rows: 3, ..job }, |e| matches!(e, E::Buffer(_))),
        (TrainEncodeJob { label_smoothing: 1.5, ..job }, |e| matches!(e, E::Argument(_))),
        (TrainEncodeJob { z_loss: -1.0, ..job }, |e| matches!(e, E::Argument(_))),
        (TrainEncodeJob { softcap: Some(0.0), ..job }, |e| matches!(e, E::Argument(_))),
        (TrainEncodeJob { output: &logits, ..job }, |e| matches!(e, E::Buffer(_))),
        (TrainEncodeJob { targets: &logits, ..job }, |e| matches!(e, E::Buffer(_))),
        (TrainEncodeJob { grad: GradOutput::Buffer { buffer: &logits, offset: 0, row_stride: 25 }, ..job }, |e| {
            matches!(e, E::Buffer(_))
        }),
        (TrainEncodeJob { grad: GradOutput::Buffer { buffer: &out, offset: 0, row_stride: 25 }, ..job }, |e| {
            matches!(e, E::Buffer(_))
        }),
        (TrainEncodeJob { grad: GradOutput::Buffer { buffer: &grad, offset: 0, row_stride: 30 }, ..job }, |e| {
            matches!(e, E::Buffer(_))
        }),
        // 16-bit gradients with another element parity than the logits.
        (TrainEncodeJob { grad: GradOutput::Buffer { buffer: &grad, offset: 2, row_stride: 49 }, ..f16 }, |e| {
            matches!(e, E::Buffer(_))
        }),
        (TrainEncodeJob { grad: GradOutput::Buffer { buffer: &grad, offset: 0, row_stride: 50 }, ..f16 }, |e| {
            matches!(e, E::Buffer(_))
        }),
        (TrainEncodeJob { rows: u64::MAX / 2, row_stride: u64::from(u32::MAX), ..job }, |e| matches!(e, E::Buffer(_))),
        (TrainEncodeJob { scale: &not_storage, ..job }, |e| matches!(e, E::Buffer(_))),
    ];
    for (i, (bad, is)) in cases.iter().enumerate() {
        match ctx.encode_loss_and_grad(&mut encoder, bad) {
            Err(e) => assert!(is(&e), "case {i}: unexpected error {e}"),
            Ok(()) => panic!("case {i} was accepted"),
        }
    }
    // A gradient in the logits' own buffer: accepted in a region apart from theirs (after or
    // before), refused when the regions share a word or do not fit one binding together.
    let both = make(1200, storage);
    let in_both = |offset| GradOutput::Buffer { buffer: &both, offset, row_stride: 25 };
    let after = TrainEncodeJob { logits: &both, grad: in_both(400), ..job };
    ctx.encode_loss_and_grad(&mut encoder, &after).unwrap();
    ctx.encode_loss_and_grad(&mut encoder, &TrainEncodeJob { logits_offset: 400, grad: in_both(0), ..after }).unwrap();
    // One f16 row of 48 from element 1: its last element ends at byte 98, inside word 96..100.
    let f16_row = |offset| TrainEncodeJob {
        dtype: Dtype::F16,
        logits_offset: 2,
        rows: 1,
        vocab: 48,
        row_stride: 48,
        grad: GradOutput::Buffer { buffer: &both, offset, row_stride: 48 },
        ..after
    };
    ctx.encode_loss_and_grad(&mut encoder, &f16_row(102)).unwrap();
    // One row needs no stride (0 is allowed), apart or not.
    let one_row = TrainEncodeJob { rows: 1, row_stride: 0, ..after };
    let apart = GradOutput::Buffer { buffer: &both, offset: 400, row_stride: 0 };
    ctx.encode_loss_and_grad(&mut encoder, &TrainEncodeJob { grad: apart, ..one_row }).unwrap();
    for bad in
        [TrainEncodeJob { grad: in_both(8), ..after }, TrainEncodeJob { grad: in_both(396), ..after }, f16_row(98)]
    {
        let e = ctx.encode_loss_and_grad(&mut encoder, &bad);
        assert!(matches!(&e, Err(E::Buffer(m)) if m.contains("overlaps")), "{e:?}");
    }
    let mut small = new_gpu().unwrap();
    small_bindings(&mut small);
    let make_small = |size| {
        small.device().create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size,
            usage: storage,
            mapped_at_creation: false,
        })
    };
    let (far, s_targets, s_scale, s_out) = (make_small(20_000), make_small(16), make_small(16), make_small(32));
    let far_job = TrainEncodeJob {
        logits: &far,
        targets: &s_targets,
        scale: &s_scale,
        output: &s_out,
        grad: GradOutput::Buffer { buffer: &far, offset: 16_000, row_stride: 25 },
        ..job
    };
    let mut small_encoder = small.device().create_command_encoder(&Default::default());
    let e = small.encode_loss_and_grad(&mut small_encoder, &far_job);
    assert!(matches!(&e, Err(E::Buffer(m)) if m.contains("largest storage binding")), "{e:?}");
    let near = GradOutput::Buffer { buffer: &far, offset: 400, row_stride: 25 };
    small.encode_loss_and_grad(&mut small_encoder, &TrainEncodeJob { grad: near, ..far_job }).unwrap();

    let weight = make(112, storage);
    let w = ClassWeights { buffer: &weight, offset: 0 };
    ctx.encode_loss_and_grad(&mut encoder, &TrainEncodeJob { weight: Some(w), ..job }).unwrap();
    assert!(ctx
        .encode_loss_and_grad(&mut encoder, &TrainEncodeJob { weight: Some(ClassWeights { offset: 16, ..w }), ..job })
        .is_err());
    let e = ctx.encode_loss_and_grad(
        &mut encoder,
        &TrainEncodeJob { weight: Some(ClassWeights { buffer: &logits, offset: 0 }), ..job },
    );
    assert!(matches!(e, Err(E::Buffer(_))));
    // The host entry points check the gradient's length and the options.
    let x = vec![0f32; 20];
    let l = Logits::f32(&x, 10).unwrap();
    let mut short = vec![0u8; 79];
    let e =
        ctx.loss_and_grad(l, Targets::I64(&[0, 1]), &LossOptions::default(), Upstream::Scalar(1.0), Some(&mut short));
    assert!(matches!(e, Err(E::Shape(_))));
    let e = ctx.loss_and_grad(l, Targets::I64(&[0, 10]), &LossOptions::default(), Upstream::Scalar(1.0), None);
    assert!(matches!(e, Err(E::TargetOutOfRange { row: 1, .. })));
    let mut odd = vec![0u8; 78];
    let e = ctx.loss_and_grad_in_place(
        &mut odd,
        Dtype::F32,
        10,
        Targets::I64(&[0]),
        &LossOptions::default(),
        Upstream::Scalar(1.0),
    );
    assert!(matches!(e, Err(E::Shape(_))));
}

/// The benchmark helpers measure what they claim: the resident fused kernel (in place and
/// separate) and the unfused baseline agree with the reference.
#[test]
fn bench_paths_agree_with_reference() {
    let Some(ctx) = gpu() else { return };
    let (rows, vocab) = (9usize, 5003usize);
    let (x, t) = random_case(rows, vocab, 31, 3.0);
    let logits = Logits::f32(&x, vocab).unwrap();
    let opts = LossOptions { reduction: LossReduction::Sum, ..Default::default() };
    let want = cross_entropy(logits, Targets::I64(&t), &opts, Upstream::Scalar(1.0)).unwrap();
    let p = prepare(logits, Targets::I64(&t), &opts, Upstream::Scalar(1.0)).unwrap();
    for in_place in [true, false] {
        let resident = xent::bench::TrainResident::rotating(ctx, logits, &p.targets, &p.scale, in_place, 0).unwrap();
        assert!(resident.run().unwrap().wall > 0.0);
        let rows_out = resident.results().unwrap();
        let loss = xent::train::reduce(&rows_out, opts.reduction, p.weight_sum);
        check(&rows_out, loss, Some(&resident.gradient().unwrap()), &want, Dtype::F32, vocab, &opts, &p.scale).unwrap();
    }
    let unfused = xent::bench::TrainUnfused::new(ctx, logits, &p.targets, &p.scale).unwrap();
    unfused.run().unwrap();
    let (loss, grad) = unfused.results().unwrap();
    for r in 0..rows {
        assert!(close(f64::from(loss[r]), want.row_loss[r], 1e-5, 1e-5), "row {r}");
        for j in 0..vocab {
            let (a, b) = (f64::from(grad[r * vocab + j]), want.grad[r * vocab + j]);
            assert!(close(a, b, 1e-6, 1e-4), "row {r} element {j}: {a} vs {b}");
        }
    }
}

/// Every layout gives the same bits when run again.
#[test]
fn repeated_runs_are_bit_identical() {
    if gpu().is_none() {
        return;
    }
    let (x, t) = random_case(3, 50_257, 8, 4.0);
    let w = weights(50_257, 8);
    let opts = all_options(&w, LossReduction::Mean);
    let logits = Logits::f32(&x, 50_257).unwrap();
    for (plan, ctx) in planned_gpus().iter().step_by(3) {
        let run = || {
            let mut g = vec![0u8; x.len() * 4];
            let out = ctx.loss_and_grad(logits, Targets::I64(&t), &opts, Upstream::Scalar(1.0), Some(&mut g)).unwrap();
            (bits(&out.rows), g)
        };
        let a = run();
        assert!(a == run(), "{plan:?}: two runs differ");
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_0012),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Random shapes, dtypes, options and layouts.
    #[test]
    fn matches_reference(vocab in prop_oneof![1usize..40, 40usize..3000, Just(4099), Just(32_003)],
                         rows in 1usize..12, seed in any::<u64>(),
                         dtype in prop_oneof![Just(Dtype::F32), Just(Dtype::F16), Just(Dtype::BF16)],
                         plan in 0usize..9, options in 0u32..32,
                         reduction in prop_oneof![Just(LossReduction::Mean), Just(LossReduction::Sum),
                                                  Just(LossReduction::None)]) {
        if gpu().is_none() { return Ok(()); }
        let (x, mut t) = random_case(rows, vocab, seed, 4.0);
        if rows > 2 { t[seed as usize % rows] = -100; }
        let w = weights(vocab, seed);
        let opts = LossOptions {
            ignore_index: -100,
            reduction,
            weight: (options & 1 != 0).then_some(&w[..]),
            label_smoothing: if options & 2 != 0 { 0.15 } else { 0.0 },
            z_loss: if options & 4 != 0 { 2e-4 } else { 0.0 },
            softcap: (options & 8 != 0).then_some(7.5),
        };
        let up = if options & 16 != 0 { -0.5 } else { 1.0 };
        let (_, ctx) = &planned_gpus()[plan % planned_gpus().len()];
        host_case(ctx, &x, dtype, vocab, &t, &opts, Upstream::Scalar(up));
    }
}

/// `xent bench --train --device gpu` gives the GPU rows (fused in place and separate, the unfused
/// baseline, end to end), each against the GPU copy ceiling.
#[test]
fn cli_bench_train_gpu_rows() {
    if gpu().is_none() {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_xent"))
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .args(["bench", "--train", "--device", "gpu", "--rows", "3", "--vocab", "1001", "--dtype", "f32,bf16"])
        .args(["--iters", "1", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["results"].as_array().unwrap();
    let paths: Vec<(&str, &str)> =
        rows.iter().map(|r| (r["path"].as_str().unwrap(), r["dtype"].as_str().unwrap())).collect();
    for path in ["gpu loss+grad in place", "gpu loss+grad separate", "gpu loss+grad end-to-end"] {
        for dtype in ["f32", "bf16"] {
            assert!(paths.contains(&(path, dtype)), "{path} {dtype} missing from {paths:?}");
        }
    }
    assert!(paths.contains(&("gpu loss+grad unfused", "f32")), "{paths:?}");
    assert!(rows.iter().all(|r| r["ceiling"] == "gpu copy" && r["ms"].as_f64().unwrap() > 0.0), "{rows:?}");
}

/// An infinite upstream gradient: logits far below the row's max get an exact 0, as on the CPU
/// (`train_cpu.rs`), every other element is infinite or NaN.
#[test]
fn infinite_upstream_keeps_flushed_terms_zero() {
    let Some(ctx) = gpu() else { return };
    let (rows, vocab) = (8, 70);
    let x: Vec<f32> = (0..rows * vocab).map(|i| if i % 7 == 3 { -200.0 } else { (i % 5) as f32 }).collect();
    let t: Vec<i64> = (0..rows as i64).map(|r| r * 3 % vocab as i64).collect();
    let opts = LossOptions { reduction: LossReduction::Sum, ..LossOptions::default() };
    for up in [f32::INFINITY, f32::NEG_INFINITY] {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let mut g = to_bytes(&x, dtype);
            ctx.loss_and_grad_in_place(&mut g, dtype, vocab, Targets::I64(&t), &opts, Upstream::Scalar(up)).unwrap();
            let grad = Logits::from_bytes(&g, dtype, rows, vocab).unwrap();
            for i in 0..rows * vocab {
                let v = grad.get(i / vocab, i % vocab);
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
