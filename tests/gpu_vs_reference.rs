//! The fused GPU kernel against the f64 reference, over shapes, dtypes, every kernel layout
//! (workgroup and subgroup reductions, several rows per workgroup, split rows) and edge cases.

mod common;

use common::{check_rows, gpu, new_gpu, planned_gpus, random_case, to_bytes, ATOL, RTOL};
use proptest::prelude::*;
use xent::{Dtype, EncodeJob, GpuContext, Logits, Options, RowLoss, Targets};

type Scored = (Vec<RowLoss>, Vec<xent::reference::RefRow>);

fn score_with(
    ctx: &GpuContext,
    x: &[u8],
    dtype: Dtype,
    rows: usize,
    vocab: usize,
    t: &[i64],
    opts: &Options,
) -> Scored {
    let logits = Logits::from_bytes(x, dtype, rows, vocab).unwrap();
    let got = ctx.score(logits, Targets::I64(t), opts).unwrap();
    let want = xent::reference::score(logits, Targets::I64(t), opts).unwrap();
    (got, want)
}

fn score_both(x: &[u8], dtype: Dtype, rows: usize, vocab: usize, t: &[i64], opts: &Options) -> Scored {
    score_with(gpu().expect("GPU"), x, dtype, rows, vocab, t, opts)
}

/// Checks one case under the planner's choice, returning the worst nll error.
fn assert_case(x: &[f32], dtype: Dtype, vocab: usize, t: &[i64]) -> f64 {
    assert_case_with(gpu().expect("GPU"), x, dtype, vocab, t)
}

fn assert_case_with(ctx: &GpuContext, x: &[f32], dtype: Dtype, vocab: usize, t: &[i64]) -> f64 {
    let rows = t.len();
    let bytes = to_bytes(x, dtype);
    let (got, want) = score_with(ctx, &bytes, dtype, rows, vocab, t, &Options::default());
    let plan = ctx.plan(rows as u64, vocab as u32);
    match check_rows(&got, &want, ATOL, RTOL) {
        Ok(worst) => worst,
        Err(msg) => panic!("{rows} x {vocab} {dtype} ({plan}): {msg}"),
    }
}

fn vocab_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(1usize),
        Just(2),
        Just(3),
        Just(7),
        Just(255),
        Just(256),
        Just(257),
        Just(1021),
        Just(4099),
        Just(32_003),
        Just(128_257),
        Just(200_000),
        1usize..5000,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 96,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_0001),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn gpu_matches_reference(vocab in vocab_strategy(), rows in 1usize..24, seed in any::<u64>(),
                             dtype in prop_oneof![Just(Dtype::F32), Just(Dtype::F16), Just(Dtype::BF16)],
                             scale in prop_oneof![Just(1.0f32), Just(4.0), Just(30.0)],
                             plan in 0usize..9) {
        if gpu().is_none() { return Ok(()); }
        let rows = if vocab > 100_000 { rows.min(6) } else { rows };
        let (x, mut t) = random_case(rows, vocab, seed, scale);
        if rows > 2 { t[1] = -100; }
        let (_, ctx) = &planned_gpus()[plan % planned_gpus().len()];
        assert_case_with(ctx, &x, dtype, vocab, &t);
    }
}

#[test]
fn worst_error_on_a_realistic_set_is_reported() {
    if gpu().is_none() {
        return;
    }
    let (x, t) = xent::synth::eval_set(64, 50_257, 3, -100);
    let worst = assert_case(&x, Dtype::F32, 50_257, &t);
    eprintln!("worst |gpu - reference| nll at 64 x 50257 f32: {worst:e}");
}

#[test]
fn large_equal_logits_give_ln_vocab() {
    if gpu().is_none() {
        return;
    }
    for (value, vocab) in [(1e4f32, 128_256usize), (-1e4, 32_000), (1e4, 1), (3e38, 7)] {
        let x = vec![value; vocab * 2];
        let t = vec![0i64, (vocab - 1) as i64];
        let (got, _) = score_both(bytemuck::cast_slice(&x), Dtype::F32, 2, vocab, &t, &Options::default());
        for r in &got {
            let want = (vocab as f64).ln();
            assert!(common::close(f64::from(r.nll), want, ATOL, RTOL), "{value} x {vocab}: nll {} want {want}", r.nll);
        }
    }
}

#[test]
fn pinned_edge_cases() {
    if gpu().is_none() {
        return;
    }
    let inf = f32::INFINITY;
    let nan = f32::NAN;
    let vocab = 5;
    #[rustfmt::skip]
    let cases: Vec<([f32; 5], i64)> = vec![
        ([3e38, 0.0, -3e38, 1.0, 2.0], 1),        // a 3e38 logit
        ([3e38, 0.0, 1.0, 1.0, 2.0], 0),          // target is the 3e38 logit
        ([-inf, 0.0, 1.0, -inf, 2.0], 2),         // -inf entries
        ([-inf, 0.0, 1.0, -inf, 2.0], 0),         // target's logit is -inf: nll = +inf
        ([1.0, nan, 1.0, 1.0, 1.0], 0),           // NaN row
        ([inf, 0.0, 1.0, 1.0, 1.0], 1),           // +inf row: NaN, as torch
        ([-inf, -inf, -inf, -inf, -inf], 0),      // all -inf: NaN
        ([2.0, 5.0, 5.0, 1.0, 5.0], 1),           // ties: first index wins, correct
        ([2.0, 5.0, 5.0, 1.0, 5.0], 2),           // ties: not the first, incorrect
        ([1e4, 1e4, 1e4, 1e4, 1e4], 4),           // all equal, large
        ([-3.4028235e38, -inf, -inf, -inf, -inf], 0), // lowest finite and -inf
        ([0.0, 0.0, 0.0, 0.0, 0.0], -100),        // ignored
    ];
    let x: Vec<f32> = cases.iter().flat_map(|c| c.0).collect();
    let t: Vec<i64> = cases.iter().map(|c| c.1).collect();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let x: Vec<f32> = match dtype {
            Dtype::F32 => x.clone(),
            // 3e38 is not representable in f16: clamp the magnitudes to what each type holds.
            Dtype::F16 => x.iter().map(|v| if v.is_finite() { v.clamp(-6e4, 6e4) } else { *v }).collect(),
            Dtype::BF16 => x.clone(),
        };
        let bytes = to_bytes(&x, dtype);
        for (plan, ctx) in planned_gpus() {
            let (got, want) = score_with(ctx, &bytes, dtype, t.len(), vocab, &t, &Options::default());
            check_rows(&got, &want, ATOL, RTOL).unwrap_or_else(|m| panic!("{dtype} {plan:?}: {m}"));
            if dtype == Dtype::F32 {
                assert_eq!(got[3].nll, f32::INFINITY);
                assert!(got[4].nll.is_nan() && got[5].nll.is_nan() && got[6].nll.is_nan());
                assert!(got[7].correct() && !got[8].correct());
                assert_eq!(got[7].argmax, 1);
                assert!(got[11].ignored() && got[11].nll == 0.0);
            }
        }
    }
}

/// The same edge cases inside long rows, at positions in the unaligned head, the vec4 body, the
/// tail and on both sides of split boundaries, under every kernel layout.
#[test]
fn pinned_edge_cases_in_long_rows() {
    if gpu().is_none() {
        return;
    }
    let vocab = 4099;
    let inf = f32::INFINITY;
    let (base, _) = random_case(1, vocab, 99, 1.0);
    let mut x = Vec::new();
    let mut t = Vec::new();
    let mut row = |edits: &[(usize, f32)], target: i64| {
        let mut r = base.clone();
        for &(j, v) in edits {
            r[j] = v;
        }
        x.extend(r);
        t.push(target);
    };
    for p in [0usize, 1, 3, 5, 1365, 2049, 4096, 4098] {
        row(&[(p, f32::NAN)], 7);
        row(&[(p, inf)], 7);
        row(&[(p, -inf)], p as i64);
        row(&[(p, 3e38)], ((p + 1) % vocab) as i64);
        row(&[(p, 3e38)], p as i64);
        // Ties across positions: the first index wins.
        let q = (p + 2048) % vocab;
        let (a, b) = (p.min(q), p.max(q));
        row(&[(a, 50.0), (b, 50.0)], a as i64);
        row(&[(a, 50.0), (b, 50.0)], b as i64);
    }
    row(&(0..vocab).map(|j| (j, -inf)).collect::<Vec<_>>(), 3);
    for dtype in [Dtype::F32, Dtype::BF16] {
        let bytes = to_bytes(&x, dtype);
        for (plan, ctx) in planned_gpus() {
            let (got, want) = score_with(ctx, &bytes, dtype, t.len(), vocab, &t, &Options::default());
            check_rows(&got, &want, ATOL, RTOL).unwrap_or_else(|m| panic!("{dtype} {plan:?}: {m}"));
        }
    }
}

#[test]
fn every_row_ignored() {
    if gpu().is_none() {
        return;
    }
    let (x, _) = random_case(9, 100, 1, 1.0);
    let t = vec![-7i64; 9];
    let opts = Options { ignore_index: -7 };
    let (got, want) = score_both(bytemuck::cast_slice(&x), Dtype::F32, 9, 100, &t, &opts);
    check_rows(&got, &want, ATOL, RTOL).unwrap();
    let s = xent::Summary::of(&got);
    assert_eq!((s.tokens, s.ignored), (0, 9));
    assert!(s.mean_nll().is_nan());
}

#[test]
fn targets_of_every_integer_type_agree() {
    let Some(ctx) = gpu() else { return };
    let (x, t) = random_case(17, 333, 9, 3.0);
    let logits = Logits::f32(&x, 333).unwrap();
    let t32: Vec<i32> = t.iter().map(|&v| v as i32).collect();
    let tu: Vec<u32> = t.iter().map(|&v| v as u32).collect();
    let a = ctx.score(logits, Targets::I64(&t), &Options::default()).unwrap();
    let b = ctx.score(logits, Targets::I32(&t32), &Options::default()).unwrap();
    let c = ctx.score(logits, Targets::U32(&tu), &Options::default()).unwrap();
    assert_eq!(a, b);
    assert_eq!(a, c);
}

#[test]
fn bad_targets_are_errors_naming_the_row() {
    let Some(ctx) = gpu() else { return };
    let x = vec![0f32; 4 * 10];
    let logits = Logits::f32(&x, 10).unwrap();
    let e = ctx.score(logits, Targets::I64(&[0, 1, 10, 2]), &Options::default()).unwrap_err();
    assert!(matches!(e, xent::Error::TargetOutOfRange { row: 2, target: 10, vocab: 10 }), "{e}");
    let e = ctx.score(logits, Targets::I64(&[0, -5, 1, 2]), &Options::default()).unwrap_err();
    assert!(matches!(e, xent::Error::TargetOutOfRange { row: 1, target: -5, .. }), "{e}");
    let e = ctx.score(logits, Targets::I64(&[0, 1]), &Options::default()).unwrap_err();
    assert!(matches!(e, xent::Error::RowMismatch { logits_rows: 4, targets_rows: 2 }), "{e}");
}

/// Forces tiny bindings so that one job is split into many chunks, including rows that straddle
/// alignment boundaries, for every dtype.
#[test]
fn chunked_path_matches_reference() {
    for plan in common::all_plans() {
        chunked_path_with(plan);
    }
}

fn chunked_path_with(plan: Option<xent::Plan>) {
    let Some(mut ctx) = new_gpu() else { return };
    common::small_bindings(&mut ctx);
    ctx.force_plan(plan);
    for (rows, vocab) in [(97usize, 301usize), (40, 1000), (300, 7), (5, 977)] {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            let chunk = ctx.rows_per_chunk(dtype, vocab as u64, vocab as u64).unwrap();
            assert!((rows as u64) > chunk, "{rows} x {vocab} {dtype} must need several chunks (chunk {chunk})");
            let (x, mut t) = random_case(rows, vocab, rows as u64, 2.0);
            t[rows / 2] = -100;
            let bytes = to_bytes(&x, dtype);
            let logits = Logits::from_bytes(&bytes, dtype, rows, vocab).unwrap();
            let got = ctx.score(logits, Targets::I64(&t), &Options::default()).unwrap();
            let want = xent::reference::score(logits, Targets::I64(&t), &Options::default()).unwrap();
            check_rows(&got, &want, ATOL, RTOL).unwrap_or_else(|m| panic!("{rows} x {vocab} {dtype} {plan:?}: {m}"));
        }
    }
    // A row larger than a binding is an error, not a wrong answer.
    let x = vec![0f32; 2000];
    let e = ctx.score(Logits::f32(&x, 2000).unwrap(), Targets::I64(&[0]), &Options::default()).unwrap_err();
    assert!(matches!(e, xent::Error::Shape(_)), "{e}");
}

/// More rows than one dispatch dimension holds (65,535): the kernel's 2-D grid.
#[test]
fn more_rows_than_one_dispatch_dimension() {
    if gpu().is_none() {
        return;
    }
    let rows = 70_001;
    let vocab = 3;
    let (x, t) = random_case(rows, vocab, 5, 2.0);
    // One row per workgroup, so the grid needs a second dimension.
    for (plan, ctx) in &planned_gpus()[1..3] {
        assert_eq!(ctx.plan(rows as u64, vocab as u32).rows_per_workgroup, 1, "{plan:?}");
        assert_case_with(ctx, &x, Dtype::F32, vocab, &t);
    }
    assert_case(&x, Dtype::F32, vocab, &t);
}

#[test]
fn planner_choices() {
    let Some(ctx) = gpu() else { return };
    let one = ctx.plan(1, 256_000);
    assert!(one.split > 1, "one long row is split: {one}");
    let big = ctx.plan(8192, 128_256);
    assert_eq!((big.split, big.rows_per_workgroup), (1, 1), "{big}");
    let short = ctx.plan(10_000, 100);
    assert!(short.rows_per_workgroup > 1, "short rows share a workgroup: {short}");
    if ctx.has_subgroups() {
        assert_eq!(big.reduction, xent::Reduction::Subgroup);
    } else {
        eprintln!("!!!!! this adapter has no subgroups: only the workgroup reduction is tested here !!!!!");
    }
}

/// `encode` over a caller's buffers with offsets, a padded row stride, and a poisoned output:
/// rows not written stay poisoned, rows outside the job are untouched.
#[test]
fn encode_over_caller_buffers_with_offsets_and_stride() {
    if gpu().is_none() {
        return;
    }
    for (_, ctx) in planned_gpus() {
        encode_with_offsets(ctx);
    }
    // One encode split into many chunks (each with its own parameters at an aligned offset).
    let mut small = new_gpu().unwrap();
    common::small_bindings(&mut small);
    encode_with_offsets(&small);
}

fn encode_with_offsets(ctx: &GpuContext) {
    let device = ctx.device();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let (rows, vocab, stride, lead) = (13usize, 1001usize, 1037usize, 3usize);
        let (x, t) = random_case(rows, vocab, 77, 3.0);
        // Lay rows out with a stride and `lead` elements before row 0; padding is NaN, so any
        // read outside a row poisons that row's result.
        let mut padded = vec![f32::NAN; lead + rows * stride];
        for r in 0..rows {
            padded[lead + r * stride..lead + r * stride + vocab].copy_from_slice(&x[r * vocab..(r + 1) * vocab]);
        }
        let mut bytes = to_bytes(&padded, dtype);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        use wgpu::util::DeviceExt;
        use wgpu::BufferUsages as U;
        let logits_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("test logits"),
            contents: &bytes,
            usage: U::STORAGE,
        });
        let mut tv: Vec<u32> = vec![u32::MAX; 2];
        tv.extend(t.iter().map(|&v| v as u32));
        let targets_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("test targets"),
            contents: bytemuck::cast_slice(&tv),
            usage: U::STORAGE,
        });
        let out_rows = rows + 4;
        let poison = vec![0xA5u8; out_rows * 16];
        let out_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("test out"),
            contents: &poison,
            usage: U::STORAGE | U::COPY_SRC,
        });
        let read = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("test read"),
            size: (out_rows * 16) as u64,
            usage: U::MAP_READ | U::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = device.create_command_encoder(&Default::default());
        ctx.encode(
            &mut encoder,
            &EncodeJob {
                logits: &logits_buf,
                logits_offset: (lead * dtype.size()) as u64,
                dtype,
                row_stride: stride as u64,
                rows: rows as u64,
                vocab: vocab as u32,
                targets: &targets_buf,
                targets_offset: 8,
                ignore: None,
                output: &out_buf,
                output_offset: 32,
            },
        )
        .unwrap();
        encoder.copy_buffer_to_buffer(&out_buf, 0, &read, 0, (out_rows * 16) as u64);
        ctx.queue().submit([encoder.finish()]);
        let mut out = vec![RowLoss { nll: 0.0, lse: 0.0, argmax: 0, flags: 0 }; out_rows];
        xent::read_buffer(device, &read, (out_rows * 16) as u64, bytemuck::cast_slice_mut(&mut out)).unwrap();
        let untouched: RowLoss = bytemuck::cast([0xA5A5_A5A5u32; 4]);
        assert_eq!(out[0].flags, untouched.flags, "{dtype}: row before the job was written");
        assert_eq!(out[1].flags, untouched.flags);
        assert_eq!(out[2 + rows].flags, untouched.flags, "{dtype}: row after the job was written");
        let dense = to_bytes(&x, dtype);
        let want = xent::reference::score(
            Logits::from_bytes(&dense, dtype, rows, vocab).unwrap(),
            Targets::I64(&t),
            &Options::default(),
        )
        .unwrap();
        check_rows(&out[2..2 + rows], &want, ATOL, RTOL).unwrap_or_else(|m| panic!("{dtype}: {m}"));
    }
}

#[test]
fn encode_rejects_bad_regions() {
    let Some(ctx) = gpu() else { return };
    let device = ctx.device();
    let make = |size, usage| {
        device.create_buffer(&wgpu::BufferDescriptor { label: None, size, usage, mapped_at_creation: false })
    };
    let storage = wgpu::BufferUsages::STORAGE;
    let logits = make(400, storage);
    let targets = make(16, storage);
    let out = make(64, storage);
    let job = EncodeJob {
        logits: &logits,
        logits_offset: 0,
        dtype: Dtype::F32,
        row_stride: 25,
        rows: 4,
        vocab: 25,
        targets: &targets,
        targets_offset: 0,
        ignore: None,
        output: &out,
        output_offset: 0,
    };
    let mut encoder = device.create_command_encoder(&Default::default());
    assert!(ctx.encode(&mut encoder, &job).is_ok());
    for bad in [
        EncodeJob { rows: 5, ..job },
        EncodeJob { row_stride: 26, ..job },
        EncodeJob { output_offset: 8, ..job },
        EncodeJob { vocab: 0, ..job },
        EncodeJob { row_stride: 20, ..job },
    ] {
        assert!(ctx.encode(&mut encoder, &bad).is_err());
    }
    // f16 logits in a buffer whose size is not a whole number of 4-byte words: refused, not a panic.
    let odd = make(10, storage);
    let f16_job = EncodeJob { logits: &odd, dtype: Dtype::F16, row_stride: 5, rows: 1, vocab: 5, ..job };
    assert!(matches!(ctx.encode(&mut encoder, &f16_job), Err(xent::Error::Buffer(_))));
    // Sizes that overflow u64 are refused too.
    assert!(ctx.encode(&mut encoder, &EncodeJob { rows: u64::MAX / 2, row_stride: u32::MAX as u64, ..job }).is_err());
    let not_storage = make(400, wgpu::BufferUsages::COPY_DST);
    assert!(matches!(
        ctx.encode(&mut encoder, &EncodeJob { logits: &not_storage, ..job }),
        Err(xent::Error::Buffer(_))
    ));
}

/// A stream with many more chunks than its ring holds, fed in pieces of uneven sizes that do not
/// line up with chunks, for every dtype: results come back complete and in order.
#[test]
fn stream_with_more_chunks_than_the_ring() {
    let Some(ctx) = gpu() else { return };
    let (rows, vocab) = (203usize, 1000usize);
    let (x, mut t) = random_case(rows, vocab, 21, 3.0);
    t[100] = -100;
    let opts = Options::default();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let bytes = to_bytes(&x, dtype);
        let logits = Logits::from_bytes(&bytes, dtype, rows, vocab).unwrap();
        let targets = xent::validate_targets(Targets::I64(&t), rows, vocab, &opts).unwrap();
        // About 3 rows per chunk: ~70 chunks through a ring of 3.
        let mut stream = xent::Stream::new(ctx, dtype, vocab as u32, (3 * vocab * dtype.size()) as u64).unwrap();
        assert!(rows as u64 / stream.chunk_rows() > 10 * xent::RING as u64);
        let mut got = Vec::new();
        let mut r0 = 0;
        let mut piece = 1;
        while r0 < rows {
            let r1 = (r0 + piece).min(rows);
            got.extend(stream.push(logits.slice_rows(r0, r1), &targets[r0..r1]).unwrap());
            r0 = r1;
            piece = piece % 17 + 4;
        }
        got.extend(stream.finish().unwrap());
        let want = xent::reference::score(logits, Targets::I64(&t), &opts).unwrap();
        check_rows(&got, &want, ATOL, RTOL).unwrap_or_else(|m| panic!("{dtype}: {m}"));
    }
    // Pieces of another layout are refused.
    let mut stream = xent::Stream::new(ctx, Dtype::F32, 10, 1 << 20).unwrap();
    let other = vec![0f32; 22];
    assert!(stream.push(Logits::f32(&other, 11).unwrap(), &[0, 0]).is_err());
    assert!(stream.push(Logits::f32(&other[..20], 10).unwrap(), &[0]).is_err());
}

/// The benchmark helpers measure what they claim: the resident kernel and the unfused baseline
/// both agree with the reference, so speed ratios compare equal work.
#[test]
fn bench_paths_agree_with_reference() {
    let Some(ctx) = gpu() else { return };
    let (rows, vocab) = (33usize, 5003usize);
    let (x, t) = random_case(rows, vocab, 31, 3.0);
    let logits = Logits::f32(&x, vocab).unwrap();
    let opts = Options::default();
    let targets = xent::validate_targets(Targets::I64(&t), rows, vocab, &opts).unwrap();
    let want = xent::reference::score(logits, Targets::I64(&t), &opts).unwrap();
    let resident = xent::bench::Resident::rotating(ctx, logits, &targets, 3 * x.len() as u64 * 4).unwrap();
    assert_eq!(resident.copies(), 3);
    for _ in 0..4 {
        let timing = resident.run().unwrap();
        assert!(timing.wall > 0.0);
        check_rows(&resident.results().unwrap(), &want, ATOL, RTOL).unwrap();
    }
    let unfused = xent::bench::Unfused::new(ctx, logits, &targets).unwrap();
    unfused.run().unwrap();
    for (i, (g, w)) in unfused.results().unwrap().iter().zip(&want).enumerate() {
        // The baseline computes lse - x_t directly: a little less precise than the fused kernel.
        assert!(common::close(f64::from(*g), w.nll, 1e-5, 1e-5), "row {i}: {g} vs {}", w.nll);
    }
    assert!(xent::bench::copy_ceiling(ctx, 1 << 20, 2).unwrap() > 0.0);
    assert!(xent::bench::empty_round_trip(ctx, 2).unwrap() > 0.0);
    assert!(xent::bench::upload_alone(ctx, logits, 4096).unwrap() > 0.0);
}

/// Every layout gives bit-identical results when run again: the subgroup reduction merges its
/// partial states in a fixed order, never in the order subgroups happen to finish.
#[test]
fn repeated_runs_are_bit_identical() {
    if gpu().is_none() {
        return;
    }
    let (x, t) = random_case(7, 50_257, 8, 4.0);
    let logits = Logits::f32(&x, 50_257).unwrap();
    for (plan, ctx) in planned_gpus() {
        let a = ctx.score(logits, Targets::I64(&t), &Options::default()).unwrap();
        for _ in 0..3 {
            let b = ctx.score(logits, Targets::I64(&t), &Options::default()).unwrap();
            let same =
                a.iter().zip(&b).all(|(a, b)| a.nll.to_bits() == b.nll.to_bits() && a.lse.to_bits() == b.lse.to_bits());
            assert!(same, "{plan:?}: two runs differ");
        }
    }
}

/// On a device xent made, a device error outside any error scope is kept for the caller
/// (wgpu's default would panic), so `xent bench` reports it as an error.
#[test]
fn uncaptured_device_errors_are_returned_not_panics() {
    let Some(ctx) = new_gpu() else { return };
    assert!(ctx.check_device_errors().is_ok());
    let make = |usage| {
        ctx.device().create_buffer(&wgpu::BufferDescriptor { label: None, size: 16, usage, mapped_at_creation: false })
    };
    let a = make(wgpu::BufferUsages::COPY_SRC);
    let b = make(wgpu::BufferUsages::COPY_DST);
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(&a, 0, &b, 0, 3); // not a multiple of 4: a validation error
    ctx.queue().submit([encoder.finish()]);
    let _ = ctx.device().poll(wgpu::PollType::wait_indefinitely());
    assert!(matches!(ctx.check_device_errors(), Err(xent::Error::Gpu(_))));
    assert!(ctx.check_device_errors().is_ok(), "reported once");
}

/// Caller buffers whose sizes are not multiples of 4 (allowed by wgpu) still bind: a binding's
/// size is rounded down to whole words, which still covers the job.
#[test]
fn encode_accepts_buffers_of_odd_sizes() {
    let Some(ctx) = new_gpu() else { return };
    let device = ctx.device();
    use wgpu::BufferUsages as U;
    let make = |size, usage| {
        device.create_buffer(&wgpu::BufferDescriptor { label: None, size, usage, mapped_at_creation: false })
    };
    let x = [0.5f32, -1.0, 2.0, 0.25, 1.5];
    let logits = make(22, U::STORAGE | U::COPY_DST);
    ctx.queue().write_buffer(&logits, 0, bytemuck::cast_slice(&x));
    let targets = make(6, U::STORAGE | U::COPY_DST);
    ctx.queue().write_buffer(&targets, 0, bytemuck::bytes_of(&3u32));
    let output = make(18, U::STORAGE | U::COPY_SRC);
    let read = make(16, U::MAP_READ | U::COPY_DST);
    let mut encoder = device.create_command_encoder(&Default::default());
    let job = EncodeJob {
        logits: &logits,
        logits_offset: 0,
        dtype: Dtype::F32,
        row_stride: 5,
        rows: 1,
        vocab: 5,
        targets: &targets,
        targets_offset: 0,
        ignore: None,
        output: &output,
        output_offset: 0,
    };
    ctx.encode(&mut encoder, &job).unwrap();
    encoder.copy_buffer_to_buffer(&output, 0, &read, 0, 16);
    ctx.queue().submit([encoder.finish()]);
    let mut out = [RowLoss { nll: 0.0, lse: 0.0, argmax: 0, flags: 0 }];
    xent::read_buffer(device, &read, 16, bytemuck::cast_slice_mut(&mut out)).unwrap();
    ctx.check_device_errors().unwrap();
    let want = xent::reference::score(Logits::f32(&x, 5).unwrap(), Targets::U32(&[3]), &Options::default()).unwrap();
    check_rows(&out, &want, ATOL, RTOL).unwrap();
}
