//! `xent::candle` against the f64 reference: shapes, dtypes, layouts, target types, the custom
//! op, and every error a user can hit.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::{check_rows, close, random_case, ATOL, RTOL};
use proptest::prelude::*;
use xent::candle::{cross_entropy, cross_entropy_with, score, with_logits, CrossEntropyOp};
use xent::{Dtype, Error, Logits, Options, Targets};

const CPU: Device = Device::Cpu;

/// A candle tensor of `dims` holding `x` as `dtype` (16-bit values rounded to nearest).
fn logits_tensor(x: &[f32], dims: &[usize], dtype: Dtype) -> Tensor {
    match dtype {
        Dtype::F32 => Tensor::from_vec(x.to_vec(), dims, &CPU),
        Dtype::F16 => Tensor::from_vec(x.iter().map(|&v| half::f16::from_f32(v)).collect::<Vec<_>>(), dims, &CPU),
        Dtype::BF16 => Tensor::from_vec(x.iter().map(|&v| half::bf16::from_f32(v)).collect::<Vec<_>>(), dims, &CPU),
    }
    .expect("tensor")
}

/// The reference over exactly the values `logits` holds (after rounding to its dtype).
fn reference(x: &[f32], vocab: usize, dtype: Dtype, t: &[i64], opts: &Options) -> Vec<xent::reference::RefRow> {
    let bytes = dtype.encode(x);
    let rows = x.len() / vocab;
    let l = Logits::from_bytes(&bytes, dtype, rows, vocab).expect("logits");
    xent::reference::score(l, Targets::I64(t), opts).expect("reference")
}

/// Scores through every entry point (`score`, `cross_entropy_with`, the custom op) and checks
/// each against the reference; the three must agree bit for bit.
fn check_all(logits: &Tensor, targets: &Tensor, want: &[xent::reference::RefRow], opts: &Options) {
    let rows = score(logits, targets, opts).expect("score");
    if let Err(m) = check_rows(&rows, want, ATOL, RTOL) {
        panic!("{:?} {:?}: {m}", logits.dims(), logits.dtype());
    }
    let nll = cross_entropy_with(logits, targets, opts).expect("cross_entropy");
    assert_eq!(nll.dims(), targets.dims());
    assert_eq!(nll.dtype(), DType::F32);
    let op = logits.apply_op2_no_bwd(targets, &CrossEntropyOp { options: *opts }).expect("custom op");
    assert_eq!(op.dims(), targets.dims());
    let nll = nll.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let op = op.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(nll[i].to_bits(), r.nll.to_bits(), "row {i}: cross_entropy differs from score");
        assert_eq!(op[i].to_bits(), r.nll.to_bits(), "row {i}: custom op differs from score");
    }
}

#[test]
fn many_shapes_and_dtypes_match_reference() {
    let opts = Options::default();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        for &vocab in &[1usize, 2, 7, 31, 257, 1000, 4099, 32_000] {
            for &rows in &[1usize, 3, 17] {
                let seed = (vocab * 31 + rows) as u64;
                let (x, t) = random_case(rows, vocab, seed, 3.0);
                let want = reference(&x, vocab, dtype, &t, &opts);
                let logits = logits_tensor(&x, &[rows, vocab], dtype);
                check_all(&logits, &Tensor::new(t.as_slice(), &CPU).unwrap(), &want, &opts);
            }
        }
    }
}

#[test]
fn three_dimensional_logits() {
    let opts = Options::default();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        for &(b, t_len, vocab) in &[(1usize, 1usize, 5usize), (2, 3, 257), (3, 17, 1000), (2, 8, 32_000)] {
            let (x, t) = random_case(b * t_len, vocab, (b + 7 * t_len + vocab) as u64, 2.0);
            let want = reference(&x, vocab, dtype, &t, &opts);
            let logits = logits_tensor(&x, &[b, t_len, vocab], dtype);
            let targets = Tensor::from_vec(t, (b, t_len), &CPU).unwrap();
            check_all(&logits, &targets, &want, &opts);
            assert_eq!(cross_entropy(&logits, &targets).unwrap().dims(), &[b, t_len]);
        }
    }
}

#[test]
fn start_offset_is_read_in_place() {
    // Rows 3..10 of a [12, V] tensor (and batches 1..3 of a [4, 5, V] one): contiguous, offset > 0.
    let opts = Options::default();
    let vocab = 4099;
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let (x, t) = random_case(12, vocab, 11, 4.0);
        let big = logits_tensor(&x, &[12, vocab], dtype);
        let logits = big.narrow(0, 3, 7).unwrap();
        assert!(logits.is_contiguous());
        assert_eq!(logits.layout().start_offset(), 3 * vocab);
        let targets = Tensor::new(t.as_slice(), &CPU).unwrap().narrow(0, 3, 7).unwrap();
        let want = reference(&x[3 * vocab..10 * vocab], vocab, dtype, &t[3..10], &opts);
        check_all(&logits, &targets, &want, &opts);

        let (x, t) = random_case(20, vocab, 12, 4.0);
        let big = logits_tensor(&x, &[4, 5, vocab], dtype);
        let logits = big.narrow(0, 1, 2).unwrap();
        let targets = Tensor::from_vec(t.clone(), (4, 5), &CPU).unwrap().narrow(0, 1, 2).unwrap();
        let want = reference(&x[5 * vocab..15 * vocab], vocab, dtype, &t[5..15], &opts);
        check_all(&logits, &targets, &want, &opts);
    }
}

#[test]
fn logits_are_borrowed_not_copied() {
    let vocab = 1000;
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let (x, _) = random_case(8, vocab, 3, 1.0);
        let big = logits_tensor(&x, &[8, vocab], dtype);
        let logits = big.narrow(0, 2, 5).unwrap();
        // Where candle keeps the tensor's first element: the storage's vector, plus the offset.
        let expected = {
            let (storage, layout) = logits.storage_and_layout();
            let candle_core::Storage::Cpu(cpu) = &*storage else { panic!("not a CPU tensor") };
            let base = match cpu {
                candle_core::CpuStorage::F32(v) => v.as_ptr() as usize,
                candle_core::CpuStorage::F16(v) => v.as_ptr() as usize,
                candle_core::CpuStorage::BF16(v) => v.as_ptr() as usize,
                _ => unreachable!(),
            };
            base + layout.start_offset() * dtype.size()
        };
        let (ptr, len, rows) =
            with_logits(&logits, |l| (l.bytes().as_ptr() as usize, l.bytes().len(), l.rows())).unwrap();
        assert_eq!(ptr, expected, "{dtype}: xent must read candle's own storage");
        assert_eq!(len, 5 * vocab * dtype.size());
        assert_eq!(rows, 5);
    }
}

#[test]
fn ignored_rows_and_target_types() {
    let vocab = 257;
    let (x, mut t) = random_case(10, vocab, 5, 3.0);
    for r in [0, 4, 9] {
        t[r] = -100;
    }
    let logits = logits_tensor(&x, &[10, vocab], Dtype::F32);
    let opts = Options::default();
    let want = reference(&x, vocab, Dtype::F32, &t, &opts);
    check_all(&logits, &Tensor::new(t.as_slice(), &CPU).unwrap(), &want, &opts);
    let t32: Vec<i32> = t.iter().map(|&v| v as i32).collect();
    check_all(&logits, &Tensor::new(t32.as_slice(), &CPU).unwrap(), &want, &opts);
    let nll = cross_entropy(&logits, &Tensor::new(t.as_slice(), &CPU).unwrap()).unwrap().to_vec1::<f32>().unwrap();
    assert_eq!([nll[0], nll[4], nll[9]], [0.0; 3]);

    // u32 cannot hold -100: a sentinel through Options.
    let sentinel = Options { ignore_index: i64::from(u32::MAX) };
    let tu: Vec<u32> = t.iter().map(|&v| if v < 0 { u32::MAX } else { v as u32 }).collect();
    let want_u: Vec<i64> = tu.iter().map(|&v| i64::from(v)).collect();
    let want = reference(&x, vocab, Dtype::F32, &want_u, &sentinel);
    check_all(&logits, &Tensor::new(tu.as_slice(), &CPU).unwrap(), &want, &sentinel);

    // A custom ignore index on i64 targets: rows whose target is 3 are skipped.
    let custom = Options { ignore_index: 3 };
    let mut t3 = t.clone();
    t3.iter_mut().filter(|v| **v < 0).for_each(|v| *v = 3);
    let want = reference(&x, vocab, Dtype::F32, &t3, &custom);
    assert_eq!(want.iter().filter(|r| r.ignored).count(), 3 + t.iter().filter(|&&v| v == 3).count());
    check_all(&logits, &Tensor::new(t3.as_slice(), &CPU).unwrap(), &want, &custom);
}

#[test]
fn strided_targets_are_read_through_their_layout() {
    // The usual shift of a [B, T + 1] token batch: targets = tokens[:, 1:], not contiguous.
    let (b, t_len, vocab) = (3usize, 16usize, 1000usize);
    let mut rng = xent::synth::Rng::new(9);
    let tokens: Vec<i64> = (0..b * (t_len + 1)).map(|_| rng.below(vocab) as i64).collect();
    let tokens = Tensor::from_vec(tokens, (b, t_len + 1), &CPU).unwrap();
    let targets = tokens.narrow(1, 1, t_len).unwrap();
    assert!(!targets.is_contiguous());
    let (x, _) = random_case(b * t_len, vocab, 10, 2.0);
    let logits = logits_tensor(&x, &[b, t_len, vocab], Dtype::F32);
    let flat: Vec<i64> = targets.contiguous().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let want = reference(&x, vocab, Dtype::F32, &flat, &Options::default());
    check_all(&logits, &targets, &want, &Options::default());
    // And a transposed target matrix.
    let tt = Tensor::from_vec(flat.clone(), (t_len, b), &CPU).unwrap().t().unwrap();
    let flat_t: Vec<i64> = tt.contiguous().unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let want = reference(&x, vocab, Dtype::F32, &flat_t, &Options::default());
    check_all(&logits, &tt, &want, &Options::default());
}

#[test]
fn extreme_and_broken_rows_follow_the_reference() {
    let vocab = 2;
    let x = [1234f32, 0., -1234., 0., f32::NAN, 1., f32::NEG_INFINITY, 0., 3., f32::INFINITY];
    let t = [1i64, 0, 0, 0, 1];
    let want = reference(&x, vocab, Dtype::F32, &t, &Options::default());
    let logits = logits_tensor(&x, &[5, vocab], Dtype::F32);
    check_all(&logits, &Tensor::new(&t, &CPU).unwrap(), &want, &Options::default());
    let nll = cross_entropy(&logits, &Tensor::new(&t, &CPU).unwrap()).unwrap().to_vec1::<f32>().unwrap();
    assert!(close(f64::from(nll[0]), 1234.0, 1e-6, 1e-6));
    assert!(nll[2].is_nan() && nll[3] == f32::INFINITY && nll[4].is_nan());
}

#[test]
fn empty_and_single_row_shapes() {
    let logits = Tensor::zeros((0, 7), DType::F32, &CPU).unwrap();
    let targets = Tensor::zeros(0, DType::I64, &CPU).unwrap();
    let nll = cross_entropy(&logits, &targets).unwrap();
    assert_eq!(nll.dims(), &[0]);
    // A single row as a rank-1 tensor: the target is a scalar, so is the result.
    let logits = Tensor::new(&[0f32, 0., 0., 0.], &CPU).unwrap();
    let targets = Tensor::new(2i64, &CPU).unwrap();
    let nll = cross_entropy(&logits, &targets).unwrap();
    assert_eq!(nll.dims(), &[] as &[usize]);
    assert!((nll.to_scalar::<f32>().unwrap() - 4f32.ln()).abs() < 1e-6);
}

#[test]
fn non_contiguous_logits_are_refused_with_advice() {
    let x = Tensor::arange(0f32, 60., &CPU).unwrap().reshape((6, 10)).unwrap();
    let t = Tensor::new(&[0u32, 1, 2, 3, 4, 0], &CPU).unwrap();
    for bad in [x.narrow(1, 2, 5).unwrap(), x.t().unwrap().contiguous().unwrap().t().unwrap()] {
        assert!(!bad.is_contiguous());
        let e = cross_entropy(&bad, &t).unwrap_err();
        assert!(matches!(e, Error::Engine(_)), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("not contiguous") && msg.contains(".contiguous()"), "{msg}");
        // The custom op says the same, through candle's error.
        let msg = bad.apply_op2_no_bwd(&t, &CrossEntropyOp::default()).unwrap_err().to_string();
        assert!(msg.contains(".contiguous()"), "{msg}");
        // And made contiguous, it works.
        assert!(cross_entropy(&bad.contiguous().unwrap(), &t).is_ok());
    }
    assert!(with_logits(&x.t().unwrap(), |_| ()).unwrap_err().to_string().contains(".contiguous()"));
}

#[test]
fn wrong_dtypes_are_refused() {
    let t = Tensor::new(&[0u32, 1], &CPU).unwrap();
    let x64 = Tensor::zeros((2, 3), DType::F64, &CPU).unwrap();
    match cross_entropy(&x64, &t).unwrap_err() {
        Error::Dtype { dtype, expected } => {
            assert_eq!(dtype, "f64");
            assert!(expected.contains("f32, f16 or bf16"), "{expected}");
        }
        e => panic!("wrong error {e:?}"),
    }
    let x = Tensor::zeros((2, 3), DType::F32, &CPU).unwrap();
    for bad_t in [Tensor::new(&[0u8, 1], &CPU).unwrap(), Tensor::new(&[0f32, 1.], &CPU).unwrap()] {
        let e = cross_entropy(&x, &bad_t).unwrap_err();
        assert!(matches!(e, Error::Dtype { .. }), "{e:?}");
        assert!(e.to_string().contains("u32, i32 or i64"), "{e}");
    }
    let msg = x64.apply_op2_no_bwd(&t, &CrossEntropyOp::default()).unwrap_err().to_string();
    assert!(msg.contains("unsupported dtype f64"), "{msg}");
}

#[test]
fn shape_mismatches_are_refused() {
    let x = Tensor::zeros((2, 3, 5), DType::F32, &CPU).unwrap();
    for (dims, name) in [(vec![6usize], "[6]"), (vec![2, 2], "[2, 2]"), (vec![2, 3, 1], "[2, 3, 1]")] {
        let t = Tensor::zeros(dims, DType::I64, &CPU).unwrap();
        let e = cross_entropy(&x, &t).unwrap_err();
        assert!(matches!(e, Error::Shape(_)), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains(&format!("targets have shape {name}")) && msg.contains("[2, 3]"), "{msg}");
    }
    let e = cross_entropy(&Tensor::new(1f32, &CPU).unwrap(), &Tensor::new(0i64, &CPU).unwrap()).unwrap_err();
    assert!(e.to_string().contains("scalar"), "{e}");
    let e = cross_entropy(&Tensor::zeros((2, 0), DType::F32, &CPU).unwrap(), &Tensor::new(&[0i64, 0], &CPU).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("vocab is 0"), "{e}");
}

#[test]
fn bad_targets_are_refused() {
    let x = Tensor::zeros((4, 10), DType::F32, &CPU).unwrap();
    for (t, row, target) in [(vec![0i64, 10, 0, 0], 1, 10), (vec![0, 1, 2, -1], 3, -1), (vec![0, 1, -100, 99], 3, 99)] {
        let e = cross_entropy(&x, &Tensor::new(t.as_slice(), &CPU).unwrap()).unwrap_err();
        match e {
            Error::TargetOutOfRange { row: r, target: tv, vocab } => assert_eq!((r, tv, vocab), (row, target, 10)),
            e => panic!("wrong error {e:?}"),
        }
    }
    let t = Tensor::new(&[0u32, 1, 2, u32::MAX], &CPU).unwrap();
    let e = cross_entropy(&x, &t).unwrap_err();
    assert_eq!(
        e.to_string(),
        "row 3: target 4294967295 is outside the vocabulary of 10 (valid: 0..10, or the ignore index)"
    );
    let msg = x.apply_op2_no_bwd(&t, &CrossEntropyOp::default()).unwrap_err().to_string();
    assert!(msg.contains("row 3: target 4294967295"), "{msg}");
    // With u32::MAX as the ignore index the same targets are fine.
    let ok = cross_entropy_with(&x, &t, &Options { ignore_index: i64::from(u32::MAX) }).unwrap();
    assert_eq!(ok.i(3).unwrap().to_scalar::<f32>().unwrap(), 0.0);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    /// Random shapes, dtypes, offsets, target types and ignored rows against the reference.
    #[test]
    fn random_cases_match_reference(rows in 1usize..24, vocab in 1usize..3000, skip in 0usize..4,
                                    dtype in prop_oneof![Just(Dtype::F32), Just(Dtype::F16), Just(Dtype::BF16)],
                                    kind in 0u8..3, seed in any::<u64>(), scale in 0.1f32..30.0) {
        let (x, mut t) = random_case(rows + skip, vocab, seed, scale);
        let mut rng = xent::synth::Rng::new(seed ^ 1);
        for v in t.iter_mut() {
            if rng.below(5) == 0 {
                *v = -100;
            }
        }
        let opts = Options { ignore_index: if kind == 0 { i64::from(u32::MAX) } else { -100 } };
        let t: Vec<i64> = t.iter().map(|&v| if v == -100 { opts.ignore_index } else { v }).collect();
        let big = logits_tensor(&x, &[rows + skip, vocab], dtype);
        let logits = big.narrow(0, skip, rows).unwrap();
        let tail = &t[skip..];
        let targets = match kind {
            0 => Tensor::new(tail.iter().map(|&v| v as u32).collect::<Vec<_>>().as_slice(), &CPU),
            1 => Tensor::new(tail.iter().map(|&v| v as i32).collect::<Vec<_>>().as_slice(), &CPU),
            _ => Tensor::new(tail, &CPU),
        }.unwrap();
        let want = reference(&x[skip * vocab..], vocab, dtype, tail, &opts);
        check_all(&logits, &targets, &want, &opts);
    }
}
