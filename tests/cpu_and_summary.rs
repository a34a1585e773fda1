//! The fast CPU path against the reference, and the summary's arithmetic.

mod common;

use common::{check_rows, random_case, to_bytes, ATOL, RTOL};
use proptest::prelude::*;
use xent::{Dtype, Logits, Options, RowLoss, Summary, Targets};

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed_0002),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn cpu_fast_matches_reference(vocab in prop_oneof![Just(1usize), Just(15), Just(16), Just(17), Just(131_071), 1usize..5000],
                                  rows in 1usize..20, seed in any::<u64>(),
                                  dtype in prop_oneof![Just(Dtype::F32), Just(Dtype::F16), Just(Dtype::BF16)],
                                  scale in prop_oneof![Just(1.0f32), Just(30.0)]) {
        let rows = if vocab > 100_000 { rows.min(4) } else { rows };
        let (x, mut t) = random_case(rows, vocab, seed, scale);
        t[0] = -100;
        let bytes = to_bytes(&x, dtype);
        let logits = Logits::from_bytes(&bytes, dtype, rows, vocab).unwrap();
        let got = xent::cpu::score(logits, Targets::I64(&t), &Options::default()).unwrap();
        let want = xent::reference::score(logits, Targets::I64(&t), &Options::default()).unwrap();
        if let Err(m) = check_rows(&got, &want, ATOL, RTOL) {
            panic!("{rows} x {vocab} {dtype}: {m}");
        }
    }
}

#[test]
fn cpu_fast_pinned_edge_cases() {
    let inf = f32::INFINITY;
    #[rustfmt::skip]
    let cases: Vec<([f32; 5], i64)> = vec![
        ([3e38, 0.0, -3e38, 1.0, 2.0], 1),
        ([-inf, 0.0, 1.0, -inf, 2.0], 0),
        ([1.0, f32::NAN, 1.0, 1.0, 1.0], 0),
        ([inf, 0.0, 1.0, 1.0, 1.0], 1),
        ([-inf; 5], 0),
        ([2.0, 5.0, 5.0, 1.0, 5.0], 1),
        ([2.0, 5.0, 5.0, 1.0, 5.0], 4),
        ([1e4; 5], 4),
        ([0.0; 5], -100),
    ];
    let x: Vec<f32> = cases.iter().flat_map(|c| c.0).collect();
    let t: Vec<i64> = cases.iter().map(|c| c.1).collect();
    let logits = Logits::f32(&x, 5).unwrap();
    let got = xent::cpu::score(logits, Targets::I64(&t), &Options::default()).unwrap();
    let want = xent::reference::score(logits, Targets::I64(&t), &Options::default()).unwrap();
    check_rows(&got, &want, ATOL, RTOL).unwrap();
    assert_eq!(got[1].nll, f32::INFINITY);
}

#[test]
fn reference_follows_torch_semantics() {
    use xent::reference::row;
    let r = row(&[0.0, 0.0], Some(1));
    assert!((r.nll - 2f64.ln()).abs() < 1e-15);
    assert!(row(&[f32::NEG_INFINITY, 0.0], Some(0)).nll.is_infinite());
    assert!(row(&[f32::NAN, 0.0], Some(1)).nll.is_nan());
    assert!(row(&[f32::INFINITY, 0.0], Some(1)).nll.is_nan());
    assert!(row(&[f32::NEG_INFINITY; 3], Some(1)).nll.is_nan());
    let ignored = row(&[1.0, 2.0], None);
    assert!(ignored.ignored && ignored.nll == 0.0 && !ignored.correct);
    assert_eq!(row(&[1.0, 3.0, 3.0], Some(1)).argmax, Some(1));
    // nll = lse - x_t, by the definition.
    let x = [0.5f32, -1.25, 2.0, 0.0];
    let lse = x.iter().map(|&v| f64::from(v).exp()).sum::<f64>().ln();
    assert!((row(&x, Some(1)).nll - (lse + 1.25)).abs() < 1e-12);
}

fn rows_of(nll: &[f32]) -> Vec<RowLoss> {
    nll.iter().map(|&v| RowLoss { nll: v, lse: 0.0, argmax: 0, flags: 0 }).collect()
}

#[test]
fn summary_statistics() {
    let rows = rows_of(&[1.0, 2.0, 3.0, 4.0]);
    let s = Summary::of(&rows);
    assert_eq!(s.tokens, 4);
    assert!((s.mean_nll() - 2.5).abs() < 1e-12);
    assert!((s.perplexity() - 2.5f64.exp()).abs() < 1e-9);
    assert!((s.bits_per_token() - 2.5 / std::f64::consts::LN_2).abs() < 1e-12);
    // 2^(bits per token) is the same perplexity.
    assert!((2f64.powf(s.bits_per_token()) - s.perplexity()).abs() < 1e-9);
    // llama.cpp: ppl * sqrt(var / (N - 1)) with var = mean(x^2) - mean^2 = 1.25.
    let want = 2.5f64.exp() * (1.25f64 / 3.0).sqrt();
    assert!((s.perplexity_stderr() - want).abs() < 1e-9);
    assert_eq!(s.accuracy(), 0.0);
}

#[test]
fn summaries_merge_exactly() {
    let (x, t) = random_case(300, 97, 4, 2.0);
    let logits = Logits::f32(&x, 97).unwrap();
    let rows = xent::cpu::score(logits, Targets::I64(&t), &Options::default()).unwrap();
    let whole = Summary::of(&rows);
    let mut merged = Summary::of(&rows[..100]);
    merged.merge(&Summary::of(&rows[100..]));
    assert_eq!(whole, merged, "merging is exact, whatever the grouping");
    let mut reversed = Summary::default();
    rows.iter().rev().for_each(|r| reversed.push(r));
    assert_eq!(whole, reversed, "and whatever the order");
    let mut with_nan = rows.clone();
    with_nan[3].nll = f32::NAN;
    with_nan[4].nll = f32::INFINITY;
    let s = Summary::of(&with_nan);
    assert_eq!((s.nan, s.infinite), (1, 1));
    assert!(s.mean_nll().is_nan());
}
