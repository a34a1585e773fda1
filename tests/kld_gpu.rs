//! The fused GPU KL-divergence kernel against the f64 reference: the accuracy the issue requires
//! (per-token KLD within 1e-7 + 1e-4·kld for f32 pairs differing by noise of 1e-3, 1e-2 and 1,
//! vocabularies 2 to 256000), unrelated pairs, every dtype pair, every kernel layout (workgroup and
//! subgroup reductions, several rows per workgroup, split rows), many chunks, `encode_kld` at odd
//! offsets and strides, targets / no targets / ignored rows, masked and broken rows, the stream.

mod common;

use common::{check_kld, gpu, new_gpu, planned_gpus, ATOL, RTOL};
use xent::kld::{KldRow, NO_TARGET};
use xent::{Dtype, GpuContext, KldEncodeJob, Logits, Options, Targets};

/// The KLD tolerance (absolute, relative).
const KATOL: f64 = 1e-7;
const KRTOL: f64 = 1e-4;

const DTYPES: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::BF16];

/// One comparison: `a` and `b` (f32 values, encoded as `da` / `db`), GPU and reference.
#[allow(clippy::too_many_arguments)]
fn compare(
    ctx: &GpuContext,
    a: &[f32],
    da: Dtype,
    b: &[f32],
    db: Dtype,
    vocab: usize,
    targets: Option<&[i64]>,
) -> (Vec<KldRow>, Vec<xent::kld::reference::RefKldRow>) {
    let rows = a.len() / vocab;
    let (ab, bb) = (da.encode(a), db.encode(b));
    let base = Logits::from_bytes(&ab, da, rows, vocab).unwrap();
    let test = Logits::from_bytes(&bb, db, rows, vocab).unwrap();
    let t = targets.map(Targets::I64);
    let got = ctx.kld(base, test, t, &Options::default()).unwrap();
    let want = xent::kld::reference::kld(base, test, t, &Options::default()).unwrap();
    (got, want)
}

/// Compares and checks at the tolerance (16-bit inputs are exact in f32 and the reference
/// reads the same values, so it applies to every dtype pair); returns the worst KLD error as a
/// fraction of the tolerance.
#[allow(clippy::too_many_arguments)]
fn assert_pair(
    ctx: &GpuContext,
    what: &str,
    a: &[f32],
    da: Dtype,
    b: &[f32],
    db: Dtype,
    vocab: usize,
    targets: Option<&[i64]>,
) -> f64 {
    let (got, want) = compare(ctx, a, da, b, db, vocab, targets);
    let plan = ctx.plan_kld((a.len() / vocab) as u64, vocab as u32);
    check_kld(&got, &want, KATOL, KRTOL, ATOL, RTOL)
        .unwrap_or_else(|m| panic!("{what}: {} x {vocab} {da}/{db} ({plan}): {m}", a.len() / vocab))
}

/// Rows for a vocabulary: few for the big ones, so that lavapipe stays quick.
fn rows_for(vocab: usize) -> usize {
    (300_000 / vocab).clamp(2, 16)
}

#[test]
fn f32_pairs_meet_the_required_accuracy_at_every_noise_level_and_vocab() {
    let Some(ctx) = gpu() else { return };
    for &vocab in &[1usize, 2, 3, 7, 255, 256, 257, 4099, 32_003, 128_257, 256_000] {
        let rows = rows_for(vocab);
        for &noise in &[1e-3f32, 1e-2, 1.0] {
            let (a, b, t) = xent::synth::kld_pair(rows, vocab, 7 + vocab as u64, noise);
            let worst = assert_pair(ctx, "noise", &a, Dtype::F32, &b, Dtype::F32, vocab, Some(&t));
            eprintln!("vocab {vocab:>6} noise {noise:<6}: worst KLD error {worst:.3} of the tolerance");
        }
    }
}

/// Two unrelated models (independent rows), and the test model sharper or flatter than the base.
#[test]
fn unrelated_and_rescaled_pairs() {
    let Some(ctx) = gpu() else { return };
    for &vocab in &[2usize, 7, 257, 4099, 32_003, 128_257] {
        let rows = rows_for(vocab);
        let (a, _, t) = xent::synth::kld_pair(rows, vocab, 1, 0.0);
        let (b, _, _) = xent::synth::kld_pair(rows, vocab, 2, 0.0);
        let worst = assert_pair(ctx, "unrelated", &a, Dtype::F32, &b, Dtype::F32, vocab, Some(&t));
        eprintln!("vocab {vocab:>6} unrelated: worst KLD error {worst:.3} of the tolerance");
        for scale in [0.5f32, 2.0] {
            let b: Vec<f32> = a.iter().map(|x| x * scale + 1.0).collect();
            assert_pair(ctx, "rescaled", &a, Dtype::F32, &b, Dtype::F32, vocab, Some(&t));
        }
    }
}

#[test]
fn every_dtype_pair() {
    let Some(ctx) = gpu() else { return };
    for da in DTYPES {
        for db in DTYPES {
            for &vocab in &[7usize, 4099, 32_003] {
                let rows = rows_for(vocab).min(6);
                let (a, b, t) = xent::synth::kld_pair(rows, vocab, 3, 0.05);
                assert_pair(ctx, "dtypes", &a, da, &b, db, vocab, Some(&t));
                let (a, b, _) = xent::synth::kld_pair(rows, vocab, 4, 1.0);
                assert_pair(ctx, "dtypes, no targets", &a, da, &b, db, vocab, None);
            }
        }
    }
}

/// Every kernel layout: the planner's, workgroup and subgroup reductions, several rows per
/// workgroup, rows split over 3 to 256 workgroups; with vocabularies that are not multiples of
/// the vector width and long enough to split.
#[test]
fn every_plan() {
    if gpu().is_none() {
        return;
    }
    for (plan, ctx) in planned_gpus() {
        for &vocab in &[3usize, 257, 4099, 40_000] {
            let rows = rows_for(vocab).min(5);
            for (da, db) in [(Dtype::F32, Dtype::F32), (Dtype::BF16, Dtype::F16), (Dtype::F16, Dtype::F32)] {
                let (a, b, mut t) = xent::synth::kld_pair(rows, vocab, 5, 0.01);
                t[rows / 2] = -100;
                let what = format!("{plan:?}");
                assert_pair(ctx, &what, &a, da, &b, db, vocab, Some(&t));
                let (a, b, _) = xent::synth::kld_pair(rows, vocab, 6, 1.0);
                assert_pair(ctx, &what, &a, da, &b, db, vocab, None);
            }
        }
    }
}

#[test]
fn planner_choices() {
    let Some(ctx) = gpu() else { return };
    assert!(ctx.plan_kld(1, 256_000).split > 1);
    assert_eq!(ctx.plan_kld(8192, 128_256).split, 1);
    assert!(ctx.plan_kld(10_000, 100).rows_per_workgroup > 1);
    if ctx.has_subgroups() {
        assert_eq!(ctx.plan_kld(8192, 128_256).reduction, xent::Reduction::Subgroup);
    } else {
        eprintln!("!!!!! this adapter has no subgroups: only the workgroup reduction is tested here !!!!!");
    }
}

/// Tiny bindings, so that one job is many chunks (rows straddling alignment boundaries), under
/// every layout, with sides of different element sizes.
#[test]
fn chunked_path() {
    if gpu().is_none() {
        return;
    }
    for plan in common::all_plans() {
        let Some(mut ctx) = new_gpu() else { return };
        common::small_bindings(&mut ctx);
        ctx.force_plan(plan);
        for (rows, vocab) in [(97usize, 301usize), (40, 1000), (300, 7), (5, 977)] {
            for (da, db) in [(Dtype::F32, Dtype::BF16), (Dtype::F16, Dtype::F16), (Dtype::BF16, Dtype::F32)] {
                let chunk = ctx.rows_per_chunk_kld((da, vocab as u64), (db, vocab as u64), vocab as u64).unwrap();
                assert!((rows as u64) > chunk, "{rows} x {vocab} must need several chunks (chunk {chunk})");
                let (a, b, mut t) = xent::synth::kld_pair(rows, vocab, rows as u64, 0.1);
                t[rows / 3] = -100;
                assert_pair(&ctx, &format!("chunked {plan:?}"), &a, da, &b, db, vocab, Some(&t));
            }
        }
        // A row larger than a binding is an error, not a wrong answer.
        let x = vec![0f32; 2000];
        let l = Logits::f32(&x, 2000).unwrap();
        assert!(matches!(ctx.kld(l, l, None, &Options::default()), Err(xent::Error::Shape(_))));
    }
}

/// More rows than one dispatch dimension holds (65,535), one row per workgroup: the 2-D grid.
#[test]
fn more_rows_than_one_dispatch_dimension() {
    if gpu().is_none() {
        return;
    }
    let (rows, vocab) = (70_001usize, 3usize);
    let (a, b, t) = xent::synth::kld_pair(rows, vocab, 8, 0.3);
    for (plan, ctx) in &planned_gpus()[1..3] {
        assert_eq!(ctx.plan_kld(rows as u64, vocab as u32).rows_per_workgroup, 1, "{plan:?}");
        assert_pair(ctx, "2-D grid", &a, Dtype::F32, &b, Dtype::F32, vocab, Some(&t));
    }
}

/// Rows written with `f(row, j) -> (a, b)` for `rows` rows of `vocab`.
fn rows_of(rows: usize, vocab: usize, f: impl Fn(usize, usize) -> (f32, f32)) -> (Vec<f32>, Vec<f32>) {
    (0..rows * vocab).map(|i| f(i / vocab, i % vocab)).unzip()
}

/// -inf on both sides or one side, NaN and +inf, a side of only -inf, huge nearly equal logits,
/// ties: short rows, then the same edits inside long rows at positions in the unaligned head,
/// the vector body, the tail and on both sides of split boundaries.
#[test]
fn masked_infinite_and_broken_rows() {
    if gpu().is_none() {
        return;
    }
    let ninf = f32::NEG_INFINITY;
    for vocab in [40usize, 4099] {
        let (a0, b0, _) = xent::synth::kld_pair(1, vocab, 9, 0.2);
        let mut a = Vec::new();
        let mut b = Vec::new();
        let mut t = Vec::new();
        let mut row = |ea: &[(usize, f32)], eb: &[(usize, f32)], target: i64| {
            let (mut ra, mut rb) = (a0.clone(), b0.clone());
            for &(j, v) in ea {
                ra[j] = v;
            }
            for &(j, v) in eb {
                rb[j] = v;
            }
            a.extend(ra);
            b.extend(rb);
            t.push(target);
        };
        let positions: Vec<usize> = if vocab == 40 { vec![0, 3, 39] } else { vec![0, 1, 5, 1365, 2049, 4096, 4098] };
        for &p in &positions {
            let q = (p + vocab / 2) % vocab;
            row(&[(p, ninf), (q, ninf)], &[(p, ninf), (q, ninf)], ((p + 1) % vocab) as i64); // masked both
            row(&[(p, ninf)], &[], p as i64); // masked base only: p = 0 there, target's nll_base +inf
            row(&[], &[(p, ninf)], q as i64); // masked test only: q = 0 < p, kld +inf
            row(&[(p, f32::NAN)], &[], 0);
            row(&[], &[(p, f32::INFINITY)], 0);
            row(&[(p, 3e38)], &[(p, 3e38)], p as i64); // an extreme shared winner
            row(&[(p, 50.0), (q, 50.0)], &[(q, 50.0), (p, 50.0)], -100); // ties: first index; ignored
            row(&[(p, 50.0), (q, 50.0)], &[(p, 49.0)], q as i64);
        }
        row(&(0..vocab).map(|j| (j, ninf)).collect::<Vec<_>>(), &[], 0); // only -inf on the base
        row(&[], &(0..vocab).map(|j| (j, ninf)).collect::<Vec<_>>(), 0); // only -inf on the test
        let (big_a, big_b) = rows_of(1, vocab, |_, j| (1e4 + j as f32 * 1e-2, 1e4 + j as f32 * 1.1e-2));
        a.extend(big_a);
        b.extend(big_b);
        t.push(1);
        for (plan, ctx) in planned_gpus() {
            for (da, db) in [(Dtype::F32, Dtype::F32), (Dtype::BF16, Dtype::F32)] {
                let (got, want) = compare(ctx, &a, da, &b, db, vocab, Some(&t));
                check_kld(&got, &want, KATOL, KRTOL, 1e-5, 1e-5)
                    .unwrap_or_else(|m| panic!("{vocab} {da}/{db} {plan:?}: {m}"));
                if da == Dtype::F32 && vocab == 40 {
                    assert!(got[2].kld == f32::INFINITY, "test -inf under a finite base: {:?}", got[2]);
                    assert!(got[3].kld.is_nan() && got[3].argmax_base == u32::MAX && got[3].nll_base.is_nan());
                    assert!(got[4].kld.is_nan() && !got[4].same_top());
                    assert!(got[6].ignored() && got[6].kld == 0.0);
                }
            }
        }
    }
}

/// Without targets: distribution statistics only, `has_target` clear and the nlls 0; with
/// targets, ignored rows (the default and a custom ignore index) are all zeros.
#[test]
fn targets_no_targets_and_ignored_rows() {
    let Some(ctx) = gpu() else { return };
    let (rows, vocab) = (9usize, 1000usize);
    let (a, b, _) = xent::synth::kld_pair(rows, vocab, 12, 0.3);
    let (got, want) = compare(ctx, &a, Dtype::F32, &b, Dtype::F32, vocab, None);
    check_kld(&got, &want, KATOL, KRTOL, ATOL, RTOL).unwrap();
    assert!(got.iter().all(|r| !r.has_target() && !r.ignored() && r.nll_base == 0.0 && r.dp == 0.0 && r.kld > 0.0));
    let t: Vec<i64> = (0..rows as i64).map(|r| if r % 3 == 1 { -7 } else { r * 37 }).collect();
    let base = Logits::f32(&a, vocab).unwrap();
    let test = Logits::f32(&b, vocab).unwrap();
    let opts = Options { ignore_index: -7 };
    let got = ctx.kld(base, test, Some(Targets::I64(&t)), &opts).unwrap();
    let want = xent::kld::reference::kld(base, test, Some(Targets::I64(&t)), &opts).unwrap();
    check_kld(&got, &want, KATOL, KRTOL, ATOL, RTOL).unwrap();
    for (r, g) in got.iter().enumerate() {
        if r % 3 == 1 {
            assert_eq!(*g, KldRow { flags: KldRow::IGNORED, ..KldRow::default() }, "row {r}");
        } else {
            assert!(g.has_target() && g.nll_base > 0.0 && g.nll_test > 0.0, "row {r}: {g:?}");
        }
    }
    // Integer types of targets agree.
    let t32: Vec<i32> = t.iter().map(|&v| v as i32).collect();
    assert_eq!(got, ctx.kld(base, test, Some(Targets::I32(&t32)), &opts).unwrap());
}

#[test]
fn bad_inputs_are_errors() {
    let Some(ctx) = gpu() else { return };
    let (a, b, _) = xent::synth::kld_pair(4, 10, 1, 0.1);
    let base = Logits::f32(&a, 10).unwrap();
    let test = Logits::f32(&b, 10).unwrap();
    let short = Logits::f32(&b[..30], 10).unwrap();
    assert!(matches!(ctx.kld(base, short, None, &Options::default()), Err(xent::Error::Shape(_))));
    let other = Logits::f32(&b[..36], 9).unwrap();
    assert!(matches!(ctx.kld(base, other, None, &Options::default()), Err(xent::Error::Shape(_))));
    let e = ctx.kld(base, test, Some(Targets::I64(&[1, 2, 3, 10])), &Options::default()).unwrap_err();
    assert!(matches!(e, xent::Error::TargetOutOfRange { row: 3, target: 10, vocab: 10 }), "{e}");
    let e = ctx.kld(base, test, Some(Targets::I64(&[1, 2])), &Options::default()).unwrap_err();
    assert!(matches!(e, xent::Error::RowMismatch { logits_rows: 4, targets_rows: 2 }), "{e}");
    // No rows: no work.
    let empty = Logits::f32(&[], 10).unwrap();
    assert!(ctx.kld(empty, empty, None, &Options::default()).unwrap().is_empty());
}

fn storage_buffer(ctx: &GpuContext, label: &str, bytes: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
    use wgpu::util::DeviceExt;
    ctx.device().create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(label), contents: bytes, usage })
}

/// Lays `rows` rows of `x` out with `lead` elements before row 0 and `stride` between rows;
/// the padding is NaN, so any read outside a row poisons that row's result.
fn strided(x: &[f32], vocab: usize, lead: usize, stride: usize, dtype: Dtype) -> Vec<u8> {
    let rows = x.len() / vocab;
    let mut padded = vec![f32::NAN; lead + rows * stride];
    for r in 0..rows {
        padded[lead + r * stride..lead + r * stride + vocab].copy_from_slice(&x[r * vocab..(r + 1) * vocab]);
    }
    let mut bytes = dtype.encode(&padded);
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    bytes
}

/// `encode_kld` over a caller's buffers: each side at its own odd offset and odd stride (so the
/// sides' vector alignments differ row by row), a poisoned output with rows before and after the
/// job that must stay untouched, targets with an ignore value, an out-of-range target and
/// [`NO_TARGET`].
fn encode_with_offsets(ctx: &GpuContext) {
    use wgpu::BufferUsages as U;
    let (rows, vocab) = (13usize, 1001usize);
    for (da, db) in
        [(Dtype::F32, Dtype::F32), (Dtype::F32, Dtype::BF16), (Dtype::F16, Dtype::BF16), (Dtype::BF16, Dtype::F16)]
    {
        let (a, b, t) = xent::synth::kld_pair(rows, vocab, 77, 0.02);
        let (lead_a, stride_a, lead_b, stride_b) = (3usize, 1037usize, 6usize, 1003usize);
        let base = storage_buffer(ctx, "test base", &strided(&a, vocab, lead_a, stride_a, da), U::STORAGE);
        let test = storage_buffer(ctx, "test test", &strided(&b, vocab, lead_b, stride_b, db), U::STORAGE);
        let mut kt: Vec<u32> = vec![u32::MAX; 2];
        kt.extend(t.iter().map(|&v| if v < 0 { 4242 } else { v as u32 }));
        kt[2 + 5] = NO_TARGET;
        kt[2 + 6] = vocab as u32 + 3; // out of range: BAD_TARGET
        let targets = storage_buffer(ctx, "test targets", bytemuck::cast_slice(&kt), U::STORAGE);
        let out_rows = rows + 4;
        let out = storage_buffer(ctx, "test out", &vec![0xA5u8; out_rows * 32], U::STORAGE | U::COPY_SRC);
        let read = ctx.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("test read"),
            size: (out_rows * 32) as u64,
            usage: U::MAP_READ | U::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        ctx.encode_kld(
            &mut encoder,
            &KldEncodeJob {
                base: &base,
                base_offset: (lead_a * da.size()) as u64,
                base_dtype: da,
                base_row_stride: stride_a as u64,
                test: &test,
                test_offset: (lead_b * db.size()) as u64,
                test_dtype: db,
                test_row_stride: stride_b as u64,
                rows: rows as u64,
                vocab: vocab as u32,
                targets: &targets,
                targets_offset: 8,
                ignore: Some(4242),
                output: &out,
                output_offset: 64,
            },
        )
        .unwrap();
        encoder.copy_buffer_to_buffer(&out, 0, &read, 0, (out_rows * 32) as u64);
        ctx.queue().submit([encoder.finish()]);
        let mut got = vec![KldRow::default(); out_rows];
        xent::read_buffer(ctx.device(), &read, (out_rows * 32) as u64, bytemuck::cast_slice_mut(&mut got)).unwrap();
        let untouched: KldRow = bytemuck::cast([0xA5A5_A5A5u32; 8]);
        assert_eq!(got[0], untouched, "{da}/{db}: row before the job was written");
        assert_eq!(got[1], untouched);
        assert_eq!(got[2 + rows], untouched, "{da}/{db}: row after the job was written");
        let (ab, bb) = (da.encode(&a), db.encode(&b));
        let (la, lb) =
            (Logits::from_bytes(&ab, da, rows, vocab).unwrap(), Logits::from_bytes(&bb, db, rows, vocab).unwrap());
        let mut want = xent::kld::reference::kld(la, lb, Some(Targets::I64(&t)), &Options::default()).unwrap();
        let no_target = xent::kld::reference::kld(la, lb, None, &Options::default()).unwrap();
        want[5] = no_target[5];
        let mut got = got[2..2 + rows].to_vec();
        let bad = got.remove(6);
        assert_eq!(bad.flags & !KldRow::SAME_TOP, KldRow::BAD_TARGET, "{da}/{db}: {bad:?}");
        assert!(bad.nll_base.is_nan() && bad.nll_test.is_nan() && bad.dp.is_nan(), "{bad:?}");
        assert!(common::close(f64::from(bad.kld), no_target[6].kld, KATOL, KRTOL), "{bad:?} vs {:?}", no_target[6]);
        want.remove(6);
        check_kld(&got, &want, KATOL, KRTOL, ATOL, RTOL).unwrap_or_else(|m| panic!("{da}/{db}: {m}"));
    }
}

#[test]
fn encode_kld_over_caller_buffers_with_offsets_and_strides() {
    if gpu().is_none() {
        return;
    }
    for (_, ctx) in planned_gpus() {
        encode_with_offsets(ctx);
    }
    // One encode split into many chunks.
    let mut small = new_gpu().unwrap();
    common::small_bindings(&mut small);
    encode_with_offsets(&small);
}

#[test]
fn encode_kld_rejects_bad_regions() {
    let Some(ctx) = gpu() else { return };
    let make = |size, usage| {
        ctx.device().create_buffer(&wgpu::BufferDescriptor { label: None, size, usage, mapped_at_creation: false })
    };
    let storage = wgpu::BufferUsages::STORAGE;
    let (base, test, targets, out) = (make(400, storage), make(200, storage), make(16, storage), make(128, storage));
    let job = KldEncodeJob {
        base: &base,
        base_offset: 0,
        base_dtype: Dtype::F32,
        base_row_stride: 25,
        test: &test,
        test_offset: 0,
        test_dtype: Dtype::BF16,
        test_row_stride: 25,
        rows: 4,
        vocab: 25,
        targets: &targets,
        targets_offset: 0,
        ignore: None,
        output: &out,
        output_offset: 0,
    };
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    assert!(ctx.encode_kld(&mut encoder, &job).is_ok());
    for bad in [
        KldEncodeJob { rows: 5, ..job },
        KldEncodeJob { test_row_stride: 26, ..job },
        KldEncodeJob { base_row_stride: 24, ..job },
        KldEncodeJob { output_offset: 16, ..job },
        KldEncodeJob { test_offset: 1, ..job },
        KldEncodeJob { targets_offset: 2, ..job },
        KldEncodeJob { vocab: 0, ..job },
        KldEncodeJob { test: &make(200, wgpu::BufferUsages::COPY_DST), ..job },
        KldEncodeJob { rows: u64::MAX / 2, base_row_stride: u64::from(u32::MAX), ..job },
    ] {
        assert!(ctx.encode_kld(&mut encoder, &bad).is_err(), "{bad:?}");
    }
}

/// A KLD stream with many more chunks than its ring holds, fed in uneven pieces: results come
/// back complete and in order; pieces of another layout are refused.
#[test]
fn stream_with_more_chunks_than_the_ring() {
    let Some(ctx) = gpu() else { return };
    let (rows, vocab) = (203usize, 1000usize);
    let (a, b, mut t) = xent::synth::kld_pair(rows, vocab, 21, 0.05);
    t[100] = -100;
    let opts = Options::default();
    for (da, db) in [(Dtype::F32, Dtype::F32), (Dtype::BF16, Dtype::F16), (Dtype::F16, Dtype::F32)] {
        let (ab, bb) = (da.encode(&a), db.encode(&b));
        let base = Logits::from_bytes(&ab, da, rows, vocab).unwrap();
        let test = Logits::from_bytes(&bb, db, rows, vocab).unwrap();
        let targets = xent::kld::reference::kernel_targets(base, test, Some(Targets::I64(&t)), &opts).unwrap();
        // About 3 rows per chunk: ~70 chunks through a ring of 3.
        let chunk_bytes = (3 * vocab * (da.size() + db.size())) as u64;
        let mut stream = xent::Stream::kld(ctx, da, db, vocab as u32, chunk_bytes).unwrap();
        assert_eq!(stream.chunk_rows(), 3);
        let mut got = Vec::new();
        let (mut r0, mut piece) = (0, 1);
        while r0 < rows {
            let r1 = (r0 + piece).min(rows);
            got.extend(stream.push(base.slice_rows(r0, r1), test.slice_rows(r0, r1), &targets[r0..r1]).unwrap());
            r0 = r1;
            piece = piece % 17 + 4;
        }
        got.extend(stream.finish().unwrap());
        let want = xent::kld::reference::kld(base, test, Some(Targets::I64(&t)), &opts).unwrap();
        check_kld(&got, &want, KATOL, KRTOL, ATOL, RTOL).unwrap_or_else(|m| panic!("{da}/{db}: {m}"));
    }
    let mut stream: xent::KldStream<'_> = xent::Stream::kld(ctx, Dtype::F32, Dtype::BF16, 10, 1 << 20).unwrap();
    let x = vec![0f32; 20];
    let (l, wrong_vocab) = (Logits::f32(&x, 10).unwrap(), Logits::f32(&x, 5).unwrap());
    let y = Dtype::BF16.encode(&x);
    let ly = Logits::from_bytes(&y, Dtype::BF16, 2, 10).unwrap();
    assert!(stream.push(l, l, &[0, 0]).is_err(), "test dtype differs");
    assert!(stream.push(wrong_vocab, ly, &[0, 0]).is_err(), "vocab differs");
    assert!(stream.push(l, ly.slice_rows(0, 1), &[0, 0]).is_err(), "rows differ");
    assert!(stream.push(l, ly, &[0]).is_err(), "target count differs");
    assert_eq!(stream.push(l, ly, &[NO_TARGET, 3]).unwrap().len() + stream.finish().unwrap().len(), 2);
}

/// Every layout gives bit-identical results when run again.
#[test]
fn repeated_runs_are_bit_identical() {
    if gpu().is_none() {
        return;
    }
    let (a, b, t) = xent::synth::kld_pair(5, 50_257, 8, 0.1);
    let base = Logits::f32(&a, 50_257).unwrap();
    let test = Logits::f32(&b, 50_257).unwrap();
    for (plan, ctx) in planned_gpus() {
        let first = ctx.kld(base, test, Some(Targets::I64(&t)), &Options::default()).unwrap();
        for _ in 0..2 {
            let again = ctx.kld(base, test, Some(Targets::I64(&t)), &Options::default()).unwrap();
            let bits = |r: &[KldRow]| r.iter().map(|x| bytemuck::cast::<KldRow, [u32; 8]>(*x)).collect::<Vec<_>>();
            assert_eq!(bits(&first), bits(&again), "{plan:?}: two runs differ");
        }
    }
}

/// The KLD benchmark helpers measure what they claim: the resident fused kernel agrees with the
/// reference at the kernel's tolerance, the unfused baseline at its own (log-probabilities
/// subtracted in f32), so the speed ratio compares equal work.
#[test]
fn bench_paths_agree_with_reference() {
    let Some(ctx) = gpu() else { return };
    let (rows, vocab) = (33usize, 5003usize);
    let (a, b, t) = xent::synth::kld_pair(rows, vocab, 31, 0.5);
    let (base, test) = (Logits::f32(&a, vocab).unwrap(), Logits::f32(&b, vocab).unwrap());
    let opts = Options::default();
    let targets = xent::kld::reference::kernel_targets(base, test, Some(Targets::I64(&t)), &opts).unwrap();
    let want = xent::kld::reference::kld(base, test, Some(Targets::I64(&t)), &opts).unwrap();
    let resident =
        xent::bench::KldResident::rotating(ctx, base, test, &targets, 3 * (a.len() + b.len()) as u64 * 4).unwrap();
    assert_eq!(resident.copies(), 3);
    assert_eq!(resident.logits_bytes(), (2 * rows * vocab * 4) as u64);
    for _ in 0..4 {
        assert!(resident.run().unwrap().wall > 0.0);
        check_kld(&resident.results().unwrap(), &want, KATOL, KRTOL, ATOL, RTOL).unwrap();
    }
    let unfused = xent::bench::KldUnfused::new(ctx, base, test).unwrap();
    unfused.run().unwrap();
    for (i, (g, w)) in unfused.results().unwrap().iter().zip(&want).enumerate() {
        if !w.ignored {
            assert!(common::close(f64::from(*g), w.kld, 1e-5, 1e-4), "row {i}: {g} vs {}", w.kld);
        }
    }
    let bf16 = Dtype::BF16.encode(&a);
    let bf16 = Logits::from_bytes(&bf16, Dtype::BF16, rows, vocab).unwrap();
    assert!(matches!(xent::bench::KldUnfused::new(ctx, bf16, test), Err(xent::Error::Dtype { .. })));
}
