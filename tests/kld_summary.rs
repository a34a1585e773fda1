//! The mergeable KLD summary: exact merging, llama.cpp's percentile function and statistics, the
//! quantile sketch's accuracy, the budget switch, JSON round trips and errors, and llama.cpp's own
//! printed output on the fixture of `tests/fixtures/llamacpp`.

use std::path::PathBuf;

use xent::kld::sketch::{QuantileSketch, RELATIVE_ACCURACY};
use xent::kld::summary::{llama_median, llama_percentile, KldSummary, PercentileKind, DEFAULT_BUDGET};
use xent::kld::KldRow;

/// A small deterministic generator (SplitMix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn row(kld: f32, nll_base: f32, nll_test: f32, dp: f32, same_top: bool, target: bool) -> KldRow {
    let mut flags = 0;
    if same_top {
        flags |= KldRow::SAME_TOP;
    }
    if target {
        flags |= KldRow::HAS_TARGET;
    }
    let (b, t, d) = if target { (nll_base, nll_test, dp) } else { (0.0, 0.0, 0.0) };
    KldRow { kld, nll_base: b, nll_test: t, dp: d, argmax_base: 0, argmax_test: 0, flags, pad: 0 }
}

fn ignored() -> KldRow {
    KldRow { flags: KldRow::IGNORED, ..Default::default() }
}

/// Rows of every kind: with and without targets, ignored, zero KLD and Δp, negative Δp, a NaN row.
fn mixed_rows(n: usize, seed: u64) -> Vec<KldRow> {
    let mut r = Rng(seed);
    (0..n)
        .map(|i| {
            if i % 37 == 5 {
                return ignored();
            }
            let kld = if i % 23 == 0 { 0.0 } else { (10f64.powf(-8.0 + 9.0 * r.unit())) as f32 };
            let nb = (0.1 + 8.0 * r.unit()) as f32;
            let nt = (f64::from(nb) + 0.3 * (r.unit() - 0.5)) as f32;
            let dp = if i % 19 == 0 { 0.0 } else { ((-f64::from(nt)).exp() - (-f64::from(nb)).exp()) as f32 };
            let mut x = row(kld, nb, nt, dp, r.below(10) < 9, i % 11 != 3);
            if i == 777 {
                x.kld = f32::NAN;
            }
            x
        })
        .collect()
}

fn of(rows: &[KldRow], budget: u64) -> KldSummary {
    let mut s = KldSummary::with_budget(budget);
    rows.iter().for_each(|r| s.push(r));
    s
}

/// `|a − b| ≤ atol + rtol·|b|`, with the name and both values on failure.
fn close(name: &str, a: f64, b: f64, atol: f64, rtol: f64) {
    let ok = (a - b).abs() <= atol + rtol * b.abs() || (a.is_nan() && b.is_nan()) || a == b;
    assert!(ok, "{name}: got {a:e}, expected {b:e} (atol {atol:e}, rtol {rtol:e})");
}

#[test]
fn merging_any_split_equals_one_pass_exactly() {
    let rows = mixed_rows(3001, 7);
    let one = of(&rows, DEFAULT_BUDGET);
    assert_eq!(one.percentiles_kind(), PercentileKind::Exact);
    assert_eq!(one.kld_nan(), 1);
    let mut r = Rng(99);
    for trial in 0..12 {
        // Random cut points, then merged in order, in reverse order and pairwise as a tree.
        let mut cuts: Vec<usize> = (0..1 + r.below(7)).map(|_| r.below(rows.len() as u64 + 1) as usize).collect();
        cuts.extend([0, rows.len()]);
        cuts.sort_unstable();
        let parts: Vec<KldSummary> = cuts.windows(2).map(|w| of(&rows[w[0]..w[1]], DEFAULT_BUDGET)).collect();
        let mut fwd = KldSummary::default();
        parts.iter().for_each(|p| fwd.merge(p));
        assert_eq!(fwd, one, "trial {trial}: in-order merge of {} parts", parts.len());
        let mut rev = KldSummary::default();
        parts.iter().rev().for_each(|p| rev.merge(p));
        assert_eq!(rev, one, "trial {trial}: reversed merge");
        let mut level = parts.clone();
        while level.len() > 1 {
            level = level
                .chunks(2)
                .map(|c| {
                    let mut a = c[0].clone();
                    if let Some(b) = c.get(1) {
                        a.merge(b);
                    }
                    a
                })
                .collect();
        }
        assert_eq!(level[0], one, "trial {trial}: tree merge");
        assert_eq!(fwd.to_json("cpu", 1.0), one.to_json("cpu", 1.0), "trial {trial}: JSON of the merge");

        // Through JSON: every part written and read back, then merged.
        let whole = KldSummary::from_json(&one.to_json("cpu", 1.0)).expect("one-pass JSON reads back");
        assert_eq!(whole.percentiles_kind(), PercentileKind::Sketch);
        let mut via = KldSummary::from_json(&parts[0].to_json("cpu", 0.5)).expect("part reads back");
        for p in &parts[1..] {
            via.merge(&KldSummary::from_json(&p.to_json("gpu", 0.5)).expect("part reads back"));
        }
        assert_eq!(via, whole, "trial {trial}: merged JSON parts");
        assert_eq!(via.to_json("merged", 2.0), whole.to_json("merged", 2.0), "trial {trial}");
        // And a read-back summary writes the same object again.
        assert_eq!(KldSummary::from_json(&whole.to_json("x", 0.0)).expect("reads back"), whole);
    }
}

#[test]
fn llama_percentile_on_known_arrays() {
    // Values 1..=20: p = f·19, i = ⌊p⌋, v[i] + (p − i)·(v[i+1] − v[i]) = 1 + p.
    let v: Vec<f32> = (1..=20).map(|x| x as f32).collect();
    let expect = [
        (0.999, 19.981),
        (0.990, 19.81),
        (0.950, 19.05),
        (0.900, 18.1),
        (0.750, 15.25),
        (0.250, 5.75),
        (0.100, 2.9),
        (0.050, 1.95),
        (0.010, 1.19),
        (0.001, 1.019),
        (0.0, 1.0),
        (1.0, 20.0),
        (-0.5, 1.0),
        (1.5, 20.0),
    ];
    for (f, e) in expect {
        close(&format!("p{f} of 1..=20"), llama_percentile(&v, f).into(), e, 0.0, 2e-7);
    }
    // Median: even N averages the two middle values, odd N takes the middle one.
    assert_eq!(llama_median(&v), 10.5);
    assert_eq!(llama_median(&v[..19]), 10.0);
    assert_eq!(llama_median(&[3.0]), 3.0);
    assert_eq!(llama_median(&[1.0, 4.0]), 2.5);
    // Uneven gaps: [0, 1, 10, 100, 1000]: p50 → p = 2 → 10; p90 → p = 3.6 → 100 + 0.6·900 = 640.
    let g = [0.0f32, 1.0, 10.0, 100.0, 1000.0];
    close("p50 uneven", llama_percentile(&g, 0.5).into(), 10.0, 0.0, 0.0);
    close("p90 uneven", llama_percentile(&g, 0.9).into(), 640.0, 0.0, 1e-6);
    close("p10 uneven", llama_percentile(&g, 0.1).into(), 0.4, 0.0, 1e-6);
    // A single value is every percentile.
    assert_eq!(llama_percentile(&[2.5], 0.3), 2.5);
    assert!(llama_percentile(&[], 0.5).is_nan() && llama_median(&[]).is_nan());

    // The summary's exact percentiles are these, on the rows in any order (KLD i/100, Δp (i − 10.5)/100).
    let mut order: Vec<u32> = (1..=20).collect();
    let mut r = Rng(3);
    for i in (1..order.len()).rev() {
        order.swap(i, r.below(i as u64 + 1) as usize);
    }
    let rows: Vec<KldRow> =
        order.iter().map(|&i| row(i as f32 / 100.0, 1.0, 1.0, (i as f32 - 10.5) / 100.0, true, true)).collect();
    let s = KldSummary::of(&rows).stats();
    assert_eq!(s.percentiles, PercentileKind::Exact);
    let k = [
        (s.kld_max, 0.20),
        (s.kld_p99_9, 0.19981),
        (s.kld_p99, 0.1981),
        (s.kld_p95, 0.1905),
        (s.kld_p90, 0.181),
        (s.kld_median, 0.105),
        (s.kld_p10, 0.029),
        (s.kld_p5, 0.0195),
        (s.kld_p1, 0.0119),
        (s.kld_p0_1, 0.01019),
        (s.kld_min, 0.01),
    ];
    for (i, (got, e)) in k.into_iter().enumerate() {
        close(&format!("kld quantile {i}"), got, e, 0.0, 1e-6);
    }
    let d = s.dp.expect("targets give Δp");
    let dq = [
        (d.max, 0.095),
        (d.p99_9, 0.09481),
        (d.p75, 0.0475),
        (d.median, 0.0),
        (d.p25, -0.0475),
        (d.p0_1, -0.09481),
        (d.min, -0.095),
    ];
    for (i, (got, e)) in dq.into_iter().enumerate() {
        close(&format!("dp quantile {i}"), got, e, 1e-8, 1e-5);
    }
}

/// The sketch's value at every percentile llama.cpp prints, and at sampled ranks, is within its
/// stated relative accuracy of the exact one.
fn check_sketch(name: &str, values: &[f32]) -> f64 {
    let mut sketch = QuantileSketch::new();
    values.iter().for_each(|&v| {
        sketch.add(v);
    });
    let mut sorted = values.to_vec();
    sorted.sort_unstable_by(f32::total_cmp);
    let n = sorted.len();
    assert_eq!(sketch.count(), n as u64);
    assert_eq!(sketch.min(), sorted[0]);
    assert_eq!(sketch.max(), sorted[n - 1]);
    let mut worst = 0.0f64;
    let mut rel = |what: String, got: f64, exact: f64, scale: f64| {
        let err = (got - exact).abs();
        // f32 rounding of the interpolation adds up to a few ulps.
        assert!(
            err <= RELATIVE_ACCURACY * scale + 4.0 * f64::from(f32::EPSILON) * scale,
            "{name} {what}: sketch {got:e} vs exact {exact:e} (rel {:e})",
            err / scale
        );
        if scale > 0.0 {
            worst = worst.max(err / scale);
        }
    };
    for k in (0..n).step_by(997).chain([1, n / 2, n - 2]) {
        let e = f64::from(sorted[k]);
        rel(format!("rank {k}"), sketch.value_at_rank(k as u64), e, e.abs());
    }
    for f in [0.999f32, 0.99, 0.95, 0.9, 0.75, 0.5, 0.25, 0.1, 0.05, 0.01, 0.001] {
        let p = f * (n - 1) as f32;
        let i = p as usize;
        let scale = f64::from(sorted[i].abs().max(sorted[(i + 1).min(n - 1)].abs()));
        rel(format!("p{f}"), sketch.percentile(f), llama_percentile(&sorted, f).into(), scale);
    }
    let m = (n / 2).saturating_sub(1);
    let scale = f64::from(sorted[m].abs().max(sorted[n / 2].abs()));
    rel("median".into(), sketch.median(), llama_median(&sorted).into(), scale);
    println!(
        "{name}: worst relative error {worst:.3e} (stated {RELATIVE_ACCURACY:.3e}), {} heap bytes, {} JSON bytes",
        sketch.heap_bytes(),
        sketch.to_json().to_string().len()
    );
    worst
}

#[test]
fn sketch_within_stated_accuracy_on_a_million_values() {
    const { assert!(RELATIVE_ACCURACY <= 1e-4) };
    let mut r = Rng(11);
    // KLD-like: log-uniform over 1e-8 … 10, with some exact zeros.
    let kld: Vec<f32> =
        (0..1_000_000).map(|i| if i % 1000 == 0 { 0.0 } else { 10f64.powf(-8.0 + 9.0 * r.unit()) as f32 }).collect();
    let w = check_sketch("kld 1e-8..10", &kld);
    assert!(w > 0.0, "the sketch is not exact, so some error must show");
    // Δp-like: in [−1, 1], 10% exact zeros, magnitudes log-uniform 1e-6 … 1, both signs.
    let dp: Vec<f32> = (0..1_000_000)
        .map(|i| {
            if i % 10 == 0 {
                0.0
            } else {
                let m = 10f64.powf(-6.0 + 6.0 * r.unit()) as f32;
                if r.below(2) == 0 {
                    m
                } else {
                    -m
                }
            }
        })
        .collect();
    check_sketch("dp -1..1", &dp);
    // Mostly negative values, so the median is negative.
    let neg: Vec<f32> = (0..200_001).map(|_| (r.unit() * 1.2 - 1.0) as f32).collect();
    check_sketch("dp mostly negative", &neg);

    // Merging sketches of parts gives the sketch of the whole.
    let mut whole = QuantileSketch::new();
    let mut a = QuantileSketch::new();
    let mut b = QuantileSketch::new();
    for (i, &v) in dp.iter().enumerate().take(100_000) {
        whole.add(v);
        if i % 3 == 0 { &mut a } else { &mut b }.add(v);
    }
    b.merge(&a);
    assert_eq!(b, whole);
    let back = QuantileSketch::from_json(&whole.to_json(), "t").expect("sketch JSON reads back");
    assert_eq!(back, whole);
    assert_eq!(back.percentile(0.9), whole.percentile(0.9));
}

#[test]
fn sketch_edges() {
    let mut s = QuantileSketch::new();
    assert!(s.percentile(0.5).is_nan() && s.median().is_nan() && s.min().is_nan());
    assert!(!s.add(f32::NAN));
    assert_eq!(s.count(), 0);
    for v in [0.0f32, -0.0, 0.0] {
        s.add(v);
    }
    assert_eq!((s.percentile(0.5), s.min(), s.max()), (0.0, 0.0, 0.0));
    assert!(s.min().is_sign_positive());
    s.add(f32::INFINITY);
    s.add(-3.0);
    assert_eq!(s.max(), f32::INFINITY);
    assert_eq!(s.value_at_rank(4), f64::INFINITY);
    assert_eq!(s.value_at_rank(0), -3.0);
    assert_eq!(s.value_at_rank(2), 0.0);
    assert!(s.value_at_rank(5).is_nan());
    let back = QuantileSketch::from_json(&s.to_json(), "t").expect("reads back");
    assert_eq!(back, s);
    // Extreme magnitudes land in buckets too.
    let mut e = QuantileSketch::new();
    for v in [f32::MAX, f32::MIN_POSITIVE, -f32::MAX, 1e-45] {
        e.add(v);
    }
    assert_eq!((e.min(), e.max()), (-f32::MAX, f32::MAX));
    // Subnormals keep an absolute accuracy only (a bucket spans 1024 of their steps).
    close("rank 1", e.value_at_rank(1), 1e-45, 1.5e-42, 0.0);
    close("rank 2", e.value_at_rank(2), f32::MIN_POSITIVE.into(), 0.0, RELATIVE_ACCURACY);
}

#[test]
fn budget_switches_to_the_sketch() {
    assert_eq!(KldSummary::default().budget(), 1 << 24);
    let rows = mixed_rows(400, 5);
    let n_scored = rows.iter().filter(|r| !r.ignored()).count() as u64;
    let exact = of(&rows, n_scored);
    assert_eq!(exact.percentiles_kind(), PercentileKind::Exact);
    let over = of(&rows, n_scored - 1);
    assert_eq!(over.percentiles_kind(), PercentileKind::Sketch);
    assert_eq!(of(&rows, 0).percentiles_kind(), PercentileKind::Sketch);
    assert_eq!(KldSummary::with_budget(0).percentiles_kind(), PercentileKind::Exact, "empty is exact");

    // Same sums, so the same means; percentiles within the sketch's accuracy.
    let (e, s) = (exact.stats(), over.stats());
    assert_eq!(s.percentiles, PercentileKind::Sketch);
    assert_eq!((e.kld_mean, e.kld_stderr, e.same_top), (s.kld_mean, s.kld_stderr, s.same_top));
    assert_eq!((e.kld_max, e.kld_min), (s.kld_max, s.kld_min));
    let pairs =
        [(s.kld_p99_9, e.kld_p99_9), (s.kld_p90, e.kld_p90), (s.kld_median, e.kld_median), (s.kld_p1, e.kld_p1)];
    for (i, (a, b)) in pairs.into_iter().enumerate() {
        close(&format!("kld percentile {i}"), a, b, 0.0, 1.1 * RELATIVE_ACCURACY);
    }
    assert_eq!(e.ppl, s.ppl);

    // Merging: exact while the total fits the merged-into summary's budget.
    let (a, b) = rows.split_at(200);
    let (na, nb) = (of(a, n_scored).tokens(), of(b, n_scored).tokens());
    let mut m = of(a, na + nb);
    m.merge(&of(b, DEFAULT_BUDGET));
    assert_eq!(m.percentiles_kind(), PercentileKind::Exact);
    let mut m = of(a, na + nb - 1);
    m.merge(&of(b, DEFAULT_BUDGET));
    assert_eq!(m.percentiles_kind(), PercentileKind::Sketch);
    let mut m = of(a, DEFAULT_BUDGET);
    m.merge(&of(b, 1));
    assert_eq!(m.percentiles_kind(), PercentileKind::Sketch, "the other side had dropped its values");
    assert!(m.to_json("cpu", 0.0).contains("\"percentiles\":\"sketch\""));
}

/// llama.cpp's `mean_and_uncertainty`, written plainly.
fn mean_unc(x: &[f64]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| v * v).sum::<f64>() / n - mean * mean;
    (mean, if var > 0.0 && x.len() > 10 { (var / (n - 1.0)).sqrt() } else { 0.0 })
}

#[test]
fn statistics_follow_llama_cpp_formulas() {
    for n in [8usize, 10, 11, 57] {
        let mut r = Rng(n as u64);
        let rows: Vec<KldRow> = (0..n)
            .map(|_| {
                let nb = (0.5 + 5.0 * r.unit()) as f32;
                let nt = (f64::from(nb) * (0.9 + 0.3 * r.unit())) as f32;
                let dp = ((-f64::from(nt)).exp() - (-f64::from(nb)).exp()) as f32;
                row((0.05 * r.unit()) as f32, nb, nt, dp, r.below(4) != 0, true)
            })
            .chain([ignored(), ignored()])
            .collect();
        let s = KldSummary::of(&rows).stats();
        let scored: Vec<&KldRow> = rows.iter().filter(|x| !x.ignored()).collect();
        let col = |f: fn(&KldRow) -> f32| scored.iter().map(|x| f64::from(f(x))).collect::<Vec<f64>>();
        let (kld, nb, nt, dp) = (col(|x| x.kld), col(|x| x.nll_base), col(|x| x.nll_test), col(|x| x.dp));
        let nf = n as f64;
        assert_eq!((s.tokens, s.ignored, s.with_target), (n as u64, 2, n as u64));

        let (km, ku) = mean_unc(&kld);
        let (tm, tu) = mean_unc(&nt);
        let (bm, bu) = mean_unc(&nb);
        let cov = if n < 10 {
            0.0
        } else {
            (nt.iter().zip(&nb).map(|(a, b)| a * b).sum::<f64>() / nf - tm * bm) / (nf - 1.0)
        };
        let (ppl_q, ppl_b) = (tm.exp(), bm.exp());
        let (dm, du) = mean_unc(&dp);
        let dp2: Vec<f64> = dp.iter().map(|d| d * d).collect();
        let (msq, msq_u) = mean_unc(&dp2);
        let same = scored.iter().filter(|x| x.same_top()).count() as f64 / nf;
        let p = s.ppl.expect("targets");
        let d = s.dp.expect("targets");
        let want = [
            ("kld_mean", s.kld_mean, km),
            ("kld_stderr", s.kld_stderr, ku),
            ("ppl_test", p.ppl_test, ppl_q),
            ("ppl_test_stderr", p.ppl_test_stderr, ppl_q * tu),
            ("ppl_base", p.ppl_base, ppl_b),
            ("ppl_base_stderr", p.ppl_base_stderr, ppl_b * bu),
            ("ln_ratio", p.ln_ratio, tm - bm),
            ("ln_ratio_stderr", p.ln_ratio_stderr, (tu * tu + bu * bu - 2.0 * cov).sqrt()),
            ("ratio", p.ratio, (tm - bm).exp()),
            ("ratio_stderr", p.ratio_stderr, (tm - bm).exp() * (tu * tu + bu * bu - 2.0 * cov).sqrt()),
            ("diff", p.diff, ppl_q - ppl_b),
            (
                "diff_stderr",
                p.diff_stderr,
                ((ppl_q * tu).powi(2) + (ppl_b * bu).powi(2) - 2.0 * ppl_q * ppl_b * cov).sqrt(),
            ),
            ("dp_mean", d.mean, dm),
            ("dp_stderr", d.stderr, du),
            ("dp_rms", d.rms, msq.sqrt()),
            ("dp_rms_stderr", d.rms_stderr, 0.5 / msq.sqrt() * msq_u),
            ("same_top", s.same_top, same),
            ("same_top_stderr", s.same_top_stderr, (same * (1.0 - same) / (nf - 1.0)).sqrt()),
        ];
        for (name, got, e) in want {
            close(&format!("n={n} {name}"), got, e, 1e-15, 1e-9);
        }
        if n > 10 {
            close(&format!("n={n} cor"), p.cor, cov / (tu * bu), 0.0, 1e-9);
            assert!(s.kld_stderr > 0.0 && p.ln_ratio_stderr > 0.0 && d.rms_stderr > 0.0, "n={n}");
        } else {
            // N ≤ 10: llama.cpp's uncertainties are 0 (and so its correlation is not a number).
            assert_eq!((s.kld_stderr, p.ppl_test_stderr, d.stderr, d.rms_stderr), (0.0, 0.0, 0.0, 0.0), "n={n}");
            assert!(!p.cor.is_finite(), "n={n}: cor {}", p.cor);
        }
    }
}

#[test]
fn without_targets_only_distribution_statistics() {
    let rows: Vec<KldRow> = (0..30).map(|i| row(i as f32 * 1e-3, 0.0, 0.0, 0.0, i % 3 != 0, false)).collect();
    let s = KldSummary::of(&rows);
    let st = s.stats();
    assert!(st.ppl.is_none() && st.dp.is_none());
    let h = s.human();
    assert!(!h.contains("Perplexity") && !h.contains("Δp"), "{h}");
    assert!(h.contains("====== KL divergence statistics ======") && h.contains("Same top p: 66.667 ±"), "{h}");
    let j: serde_json::Value = serde_json::from_str(&s.to_json("cpu", 0.25)).expect("valid JSON");
    for k in ["ppl_base", "dp_mean", "dp_min"] {
        assert!(j.get(k).is_none(), "{k} without targets");
    }
    assert_eq!(j["kind"], "kld");
    assert_eq!(j["device"], "cpu");
    assert_eq!(j["tokens"], 30);
}

#[test]
fn json_has_the_contract_keys_and_nulls() {
    let mut rows = mixed_rows(500, 1);
    rows.push(row(f32::INFINITY, 1.0, f32::INFINITY, -0.5, false, true));
    let s = KldSummary::of(&rows);
    let j: serde_json::Value = serde_json::from_str(&s.to_json("gpu \"x\"", 1.5)).expect("valid JSON");
    let keys = "tokens ignored kld_mean kld_stderr kld_max kld_p99_9 kld_p99 kld_p95 kld_p90 kld_median kld_p10 \
                kld_p5 kld_p1 kld_p0_1 kld_min same_top same_top_stderr percentiles device seconds ppl_base \
                ppl_base_stderr ppl_test ppl_test_stderr ppl_cor ln_ppl_ratio ln_ppl_ratio_stderr ppl_ratio \
                ppl_ratio_stderr ppl_diff ppl_diff_stderr dp_mean dp_stderr dp_rms dp_rms_stderr dp_max dp_p99_9 \
                dp_p99 dp_p95 dp_p90 dp_p75 dp_median dp_p25 dp_p10 dp_p5 dp_p1 dp_p0_1 dp_min kind";
    for k in keys.split_whitespace() {
        assert!(j.get(k).is_some(), "missing key {k}");
    }
    assert_eq!(j["device"], "gpu \"x\"");
    assert_eq!(j["percentiles"], "exact");
    // A NaN row makes the KLD mean NaN, an infinite test nll makes PPL(Q) infinite: both null.
    assert!(j["kld_mean"].is_null() && j["ppl_test"].is_null());
    assert!(j["kld_max"].is_null(), "an infinite KLD is the maximum");
    assert_eq!(j["ppl_base"].as_f64().map(f64::is_finite), Some(true));
    let back = KldSummary::from_json(&s.to_json("gpu", 1.5)).expect("reads back");
    assert_eq!(back.tokens(), s.tokens());
    assert_eq!(back.stats().kld_max, f64::INFINITY);
}

#[test]
fn from_json_rejects_foreign_and_broken_files() {
    let score = r#"{"tokens":3,"ignored":0,"mean_nll":1.0,"bits_per_token":1.4,"perplexity":2.7,"ppl_stderr":0.1,
        "accuracy":0.5,"device":"cpu","seconds":0.1,"correct":1,"nan":0,"infinite":0,"sum_nll_fixed":"1",
        "sum_nll_sq_fixed":"1"}"#;
    let good = KldSummary::of(&mixed_rows(50, 2)).to_json("cpu", 0.0);
    let cases: Vec<(String, &str)> = vec![
        (score.into(), "score summary"),
        (score.replace("{\"tokens\"", "{\"kind\":\"score\",\"tokens\""), "score summary"),
        ("{\"kind\":\"other\"}".into(), "kind \"other\""),
        ("{}".into(), "no \"kind\""),
        ("[1,2]".into(), "not a JSON object"),
        ("not json".into(), "not JSON"),
        (good.replace("\"with_target\"", "\"wt\""), "with_target"),
        (good.replace("\"kld2\"", "\"k2\""), "kld2"),
        (good.replace("\"mantissa_bits\":13", "\"mantissa_bits\":7"), "mantissa bits"),
        (good.replace("\"same_top_count\":", "\"same_top_count\":9999"), "inconsistent"),
        (good.replace("\"sketch_dp\"", "\"sketch_x\""), "sketch_dp"),
        (good.replace("\"tokens\":", "\"tokens\":1"), "inconsistent"),
    ];
    for (text, want) in cases {
        let e = KldSummary::from_json(&text).expect_err(want).to_string();
        assert!(e.contains(want), "expected an error about '{want}', got '{e}'");
    }
    // The unchanged text reads.
    KldSummary::from_json(&good).expect("a kld summary reads");
}

// ---- llama.cpp's printed output on the shared fixture ----

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llamacpp")
}

/// A `<f4` C-order `.npy` file's data.
fn read_npy_f32(path: &std::path::Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&b[..6], b"\x93NUMPY");
    let (hlen, start) = if b[6] == 1 {
        (u16::from_le_bytes([b[8], b[9]]) as usize, 10)
    } else {
        (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
    };
    let header = std::str::from_utf8(&b[start..start + hlen]).expect("ascii header");
    assert!(header.contains("'<f4'") && header.contains("'fortran_order': False"), "{header}");
    b[start + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// llama.cpp's per-token KLD computation (`log_softmax` with a base record), in its precisions.
fn llama_rows(kld_file: &[u8], test_logits: &[f32]) -> Vec<KldRow> {
    let i32_at = |o: usize| i32::from_le_bytes([kld_file[o], kld_file[o + 1], kld_file[o + 2], kld_file[o + 3]]);
    assert_eq!(&kld_file[..8], b"_logits_");
    let (n_ctx, n_vocab, n_chunk) = (i32_at(8) as usize, i32_at(12) as usize, i32_at(16) as usize);
    let tokens: Vec<usize> = (0..n_ctx * n_chunk).map(|i| i32_at(20 + 4 * i) as usize).collect();
    let nv = 2 * n_vocab.div_ceil(2) + 4;
    let first = n_ctx / 2;
    let per_chunk = n_ctx - 1 - first;
    let mut off = 20 + 4 * tokens.len();
    let mut rows = Vec::new();
    for c in 0..n_chunk {
        for j in 0..per_chunk {
            let rec: Vec<u16> =
                (0..nv).map(|i| u16::from_le_bytes([kld_file[off + 2 * i], kld_file[off + 2 * i + 1]])).collect();
            off += 2 * nv;
            let f = |i: usize| f32::from_bits(u32::from(rec[i]) | (u32::from(rec[i + 1]) << 16));
            let (scale, min_log_prob) = (f(0), f(2));
            let base = &rec[4..4 + n_vocab];
            let r = rows.len();
            let logits = &test_logits[r * n_vocab..(r + 1) * n_vocab];
            let tok = tokens[c * n_ctx + first + j + 1];

            let (mut max_logit, mut imax) = (logits[0], 0);
            for (i, &l) in logits.iter().enumerate().skip(1) {
                if l > max_logit {
                    max_logit = l;
                    imax = i;
                }
            }
            let sum_exp: f64 = logits.iter().map(|&l| f64::from((l - max_logit).exp())).sum();
            let log_sum_exp = sum_exp.ln() as f32;
            let nll = max_logit + log_sum_exp - logits[tok];
            let nll_base = -(scale * f32::from(base[tok]) + min_log_prob);
            max_logit += log_sum_exp;
            let (mut sum, mut imax_base, mut p_log_base_max) = (0f64, 0usize, 0f32);
            for i in 0..n_vocab {
                let p_log_base = scale * f32::from(base[i]) + min_log_prob;
                if i == 0 || p_log_base > p_log_base_max {
                    p_log_base_max = p_log_base;
                    imax_base = i;
                }
                if p_log_base > -16.0 {
                    let p_base = p_log_base.exp();
                    sum += f64::from(p_base * (p_log_base - logits[i] + max_logit));
                }
            }
            let p_diff = (-nll).exp() - (-nll_base).exp();
            rows.push(row(sum as f32, nll_base, nll, p_diff, imax == imax_base, true));
        }
    }
    assert_eq!(off, kld_file.len(), "the whole base file was read");
    rows
}

#[test]
fn reproduces_llama_cpp_final_blocks_on_the_fixture() {
    let dir = fixture_dir();
    assert!(dir.is_dir(), "{}: the shared llama.cpp fixture is missing", dir.display());
    let kld_file = std::fs::read(dir.join("A.kld")).expect("A.kld");
    let logits = read_npy_f32(&dir.join("B_logits.npy"));
    let rows = llama_rows(&kld_file, &logits);
    assert_eq!(rows.len(), 124);
    let expected = std::fs::read_to_string(dir.join("kld_B_vs_A.txt")).expect("kld_B_vs_A.txt");
    let start = expected.find("====== Perplexity statistics ======").expect("the final blocks");
    let expected = expected[start..].trim_end();

    let one = KldSummary::of(&rows);
    let got = one.human();
    print!("{got}");
    {
        let what = "one pass";
        let (gl, el): (Vec<&str>, Vec<&str>) = (got.lines().collect(), expected.lines().collect());
        assert_eq!(gl.len(), el.len(), "{what}: line count\n{got}");
        for (i, (g, e)) in gl.iter().zip(&el).enumerate() {
            if g != e {
                // Our f64-derived logits differ from llama.cpp's f32 ones by < 1e-5: allow one unit
                // in the last printed digit, with the same layout.
                let nums = |s: &str| -> Vec<(f64, usize)> {
                    s.split(|ch: char| !(ch.is_ascii_digit() || ch == '.' || ch == '-'))
                        .filter(|t| t.contains('.') && t.len() > 1)
                        .map(|t| (t.parse().unwrap_or(f64::NAN), t.len() - t.find('.').unwrap_or(0) - 1))
                        .collect()
                };
                let (gn, en) = (nums(g), nums(e));
                let layout = |s: &str| s.replace(|ch: char| ch.is_ascii_digit() || ch == '-', "");
                assert!(
                    g.len() == e.len() && gn.len() == en.len() && layout(g) == layout(e),
                    "{what} line {i}:\n got {g}\nwant {e}"
                );
                // The PPL lines are differences of numbers of size PPL(Q) ≈ 173, exponentials of mean
                // nlls that move by up to 1e-5 with the logits: 1e-6·PPL(Q) more for them.
                let slack = if e.starts_with("Mean PPL") { 1e-6 * 172.76 } else { 0.0 };
                for ((a, _), (b, decimals)) in gn.iter().zip(&en) {
                    let unit = 10f64.powi(-(*decimals as i32));
                    assert!((a - b).abs() <= 1.01 * unit + slack, "{what} line {i}:\n got {g}\nwant {e}");
                }
                println!("{what} line {i} within one unit:\n got {g}\nwant {e}");
            }
        }
    }

    // Shards merged in memory keep the exact values: the same text. Shards merged through JSON use
    // the sketches: the same text except percentiles, which are within the sketch's accuracy.
    let mut exact = KldSummary::default();
    let mut via_json = KldSummary::default();
    for part in rows.chunks(50) {
        exact.merge(&KldSummary::of(part));
        via_json.merge(&KldSummary::from_json(&KldSummary::of(part).to_json("cpu", 0.0)).expect("reads back"));
    }
    assert_eq!(exact.human(), got);
    assert_eq!(via_json.percentiles_kind(), PercentileKind::Sketch);
    for (i, (g, e)) in via_json.human().lines().zip(got.lines()).enumerate() {
        let is_percentile = g.contains("%   ") || g.contains("Median");
        if g == e || !is_percentile {
            assert_eq!(g, e, "line {i}");
            continue;
        }
        let text = |s: &str| s.split(':').nth(1).map(|v| v.trim().trim_end_matches('%').to_string());
        let (tg, te) = (text(g).expect("a value"), text(e).expect("a value"));
        let (a, b): (f64, f64) = (tg.parse().expect("a number"), te.parse().expect("a number"));
        // Rounded to the printed digits: one unit in the last place more.
        let unit = 10f64.powi(-((te.len() - te.find('.').expect("decimals") - 1) as i32));
        assert!((a - b).abs() <= RELATIVE_ACCURACY * b.abs() + 1.01 * unit, "line {i}: sketch {g} vs exact {e}");
    }
}
