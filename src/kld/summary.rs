//! The mergeable KLD summary and llama.cpp's statistics, exactly.
//!
//! [`KldSummary`] keeps, over the rows it was given, every sum that `llama-perplexity
//! --kl-divergence` keeps (`kl_divergence_result` in llama.cpp's `tools/perplexity/perplexity.cpp`)
//! as exact fixed-point integers, so that merging summaries of any split of the rows gives the
//! same summary as one pass; and the per-token KLD and Δp values for the percentiles: exactly
//! (every value, sorted, as llama.cpp does) while their number is within a budget, and always in a
//! mergeable [`QuantileSketch`] (relative accuracy [`RELATIVE_ACCURACY`]).
//!
//! [`KldSummary::stats`] applies llama.cpp's formulas ([`KldStats`]), [`KldSummary::human`] prints
//! its blocks line for line, [`KldSummary::to_json`] writes the CLI contract's object, which also
//! carries the sums and sketches, so that [`KldSummary::from_json`] reads it back for merging.
//!
//! Rows: an ignored row is counted in `ignored` and nothing else. Every other row counts in
//! `tokens` and gives a KLD and a same-top flag; a row with a target also gives `nll_base`,
//! `nll_test` and Δp, whose statistics are over the rows with a target (llama.cpp always has one).
//! NaN values (broken rows) make the sums they enter NaN, as in a plain sum, and are left out of
//! the percentiles, maxima and minima.

use serde_json::Value;

use crate::kld::sketch::QuantileSketch;
pub use crate::kld::sketch::RELATIVE_ACCURACY;
use crate::kld::KldRow;
use crate::{Error, Result};

/// Fixed-point scale of the exact sums: values are stored as integers in units of 2^-64.
const SCALE: f64 = 18_446_744_073_709_551_616.0; // 2^64

/// Default number of tokens whose KLD and Δp values are kept for exact percentiles (2^24: 128 MiB).
pub const DEFAULT_BUDGET: u64 = 1 << 24;

/// The `"kind"` of a KLD summary's JSON object.
pub const KIND: &str = "kld";

/// A sum of `f64` values kept exactly: the finite values as a fixed-point integer (each rounded once
/// to a multiple of 2^-64, toward zero, then added as an integer, so any grouping gives the same
/// sum), the non-finite ones counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExactSum {
    /// Sum of the finite values, in units of 2^-64 (saturating at the `i128` range, 2^63).
    pub fixed: i128,
    /// NaN values added.
    pub nan: u64,
    /// `+inf` values added.
    pub pos_inf: u64,
    /// `−inf` values added.
    pub neg_inf: u64,
}

impl ExactSum {
    /// Adds one value.
    pub fn add(&mut self, v: f64) {
        if v.is_nan() {
            self.nan += 1;
        } else if v == f64::INFINITY {
            self.pos_inf += 1;
        } else if v == f64::NEG_INFINITY {
            self.neg_inf += 1;
        } else {
            // Exact scaling by a power of two, then one deterministic rounding (toward zero).
            self.fixed = self.fixed.saturating_add((v * SCALE) as i128);
        }
    }

    /// Adds another sum, exactly.
    pub fn merge(&mut self, o: &ExactSum) {
        self.fixed = self.fixed.saturating_add(o.fixed);
        self.nan += o.nan;
        self.pos_inf += o.pos_inf;
        self.neg_inf += o.neg_inf;
    }

    /// The sum as a float: NaN if a NaN (or both infinities) went in, ±inf if an infinity did.
    pub fn value(&self) -> f64 {
        if self.nan > 0 || (self.pos_inf > 0 && self.neg_inf > 0) {
            f64::NAN
        } else if self.pos_inf > 0 {
            f64::INFINITY
        } else if self.neg_inf > 0 {
            f64::NEG_INFINITY
        } else {
            self.fixed as f64 / SCALE
        }
    }

    fn to_json(self) -> Value {
        Value::Array(vec![
            Value::from(self.fixed.to_string()),
            Value::from(self.nan),
            Value::from(self.pos_inf),
            Value::from(self.neg_inf),
        ])
    }

    fn from_json(v: Option<&Value>, name: &str) -> std::result::Result<ExactSum, String> {
        let bad = || format!("exact sum '{name}' missing or not [\"fixed\", nan, +inf, -inf]");
        let a = v.and_then(Value::as_array).filter(|a| a.len() == 4).ok_or_else(bad)?;
        let fixed = a[0].as_str().and_then(|s| s.parse::<i128>().ok()).ok_or_else(bad)?;
        let c = |i: usize| a[i].as_u64().ok_or_else(bad);
        Ok(ExactSum { fixed, nan: c(1)?, pos_inf: c(2)?, neg_inf: c(3)? })
    }
}

/// llama.cpp's `percentile` lambda on sorted values: `fraction ≤ 0` → first, `≥ 1` → last,
/// otherwise, in `f32` as llama.cpp computes it, `p = fraction·(N − 1)`, `i = ⌊p⌋`, `p −= i`,
/// `(1 − p)·v[i] + p·v[min(i + 1, N − 1)]`. NaN for an empty slice.
pub fn llama_percentile(sorted: &[f32], fraction: f32) -> f32 {
    if sorted.is_empty() {
        return f32::NAN;
    }
    llama_interpolate(sorted.len() as u64, fraction, |i| sorted[i as usize])
}

/// llama.cpp's median of sorted values: the middle value for odd `N`, `0.5·(v[N/2] + v[N/2 − 1])`
/// in `f32` for even `N`. NaN for an empty slice.
pub fn llama_median(sorted: &[f32]) -> f32 {
    if sorted.is_empty() {
        return f32::NAN;
    }
    llama_median_by(sorted.len() as u64, |i| sorted[i as usize])
}

/// [`llama_percentile`] over `n > 0` values given by rank.
pub(crate) fn llama_interpolate(n: u64, fraction: f32, at: impl Fn(u64) -> f32) -> f32 {
    if fraction <= 0.0 {
        return at(0);
    }
    if fraction >= 1.0 {
        return at(n - 1);
    }
    // `float p = fraction*(values.size() - 1); size_t ip = size_t(p); p -= ip;`
    let mut p = fraction * (n - 1) as f32;
    let ip = p as u64;
    p -= ip as f32;
    let ip = ip.min(n - 1);
    (1.0 - p) * at(ip) + p * at((ip + 1).min(n - 1))
}

/// [`llama_median`] over `n > 0` values given by rank.
pub(crate) fn llama_median_by(n: u64, at: impl Fn(u64) -> f32) -> f32 {
    if n.is_multiple_of(2) {
        0.5 * (at(n / 2) + at(n / 2 - 1))
    } else {
        at(n / 2)
    }
}

/// llama.cpp's `mean_and_uncertainty`: `f = Σx/N`, `df = Σx²/N − f²`, uncertainty
/// `√(df/(N − 1))` when `df > 0` and `N > 10`, else 0. (llama.cpp returns `(0, 0)` for `N = 0`; we
/// return NaNs: there is no mean of nothing.)
fn mean_and_uncertainty(sum: f64, sum2: f64, n: u64) -> (f64, f64) {
    if n < 1 {
        return (f64::NAN, f64::NAN);
    }
    let count = n as f64;
    let f = sum / count;
    let df = sum2 / count - f * f;
    let df = if df > 0.0 && n > 10 { (df / (count - 1.0)).sqrt() } else { 0.0 };
    (f, df)
}

/// llama.cpp's `covariance` of two means: `(Σab/N − (Σa/N)(Σb/N))/(N − 1)`, 0 when `N < 10`.
fn covariance(suma: f64, sumb: f64, sumab: f64, n: u64) -> f64 {
    if n < 10 {
        return 0.0;
    }
    let count = n as f64;
    (sumab / count - (suma / count) * (sumb / count)) / (count - 1.0)
}

/// The per-token values kept for exact percentiles.
#[derive(Debug, Clone, Default)]
struct ExactValues {
    /// KLD of every non-ignored row (NaN left out).
    kld: Vec<f32>,
    /// Δp of every row with a target (NaN left out).
    dp: Vec<f32>,
}

impl PartialEq for ExactValues {
    /// Equal as multisets: merging shards in another order keeps the same values.
    fn eq(&self, other: &Self) -> bool {
        let sorted = |v: &[f32]| {
            let mut v: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
            v.sort_unstable();
            v
        };
        self.kld.len() == other.kld.len()
            && self.dp.len() == other.dp.len()
            && sorted(&self.kld) == sorted(&other.kld)
            && sorted(&self.dp) == sorted(&other.dp)
    }
}

/// Pushes, growing the capacity geometrically but never past `budget` values (so the exact store
/// stays within 4 bytes per value of the budget).
fn push_capped(v: &mut Vec<f32>, x: f32, budget: u64) {
    if v.len() == v.capacity() {
        let cap = usize::try_from(budget).unwrap_or(usize::MAX);
        let extra = v.len().max(1024).min(cap.saturating_sub(v.len())).max(1);
        v.reserve_exact(extra);
    }
    v.push(x);
}

/// Where the percentiles come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PercentileKind {
    /// Every value sorted, as llama.cpp does.
    Exact,
    /// The quantile sketch (within [`RELATIVE_ACCURACY`] of the exact values at the same ranks).
    Sketch,
}

impl PercentileKind {
    /// `"exact"` or `"sketch"`, as in the JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            PercentileKind::Exact => "exact",
            PercentileKind::Sketch => "sketch",
        }
    }
}

/// Mergeable summary of KLD rows. Merging two summaries gives exactly the summary of both inputs
/// (sums, counts and sketches; exact percentile values while both are exact and within the budget).
#[derive(Debug, Clone, PartialEq)]
pub struct KldSummary {
    tokens: u64,
    ignored: u64,
    same_top: u64,
    with_target: u64,
    kld: ExactSum,
    kld2: ExactSum,
    nll_base: ExactSum,
    nll_base2: ExactSum,
    nll_test: ExactSum,
    nll_test2: ExactSum,
    nll_test_base: ExactSum,
    dp: ExactSum,
    dp2: ExactSum,
    dp4: ExactSum,
    kld_sketch: QuantileSketch,
    dp_sketch: QuantileSketch,
    /// `None` once the budget was exceeded, or for a summary read from JSON.
    exact: Option<ExactValues>,
    budget: u64,
}

impl Default for KldSummary {
    fn default() -> Self {
        Self::with_budget(DEFAULT_BUDGET)
    }
}

/// Statistics of the Δp = `q_t − p_t` values (fractions, not %), llama.cpp's "Token probability
/// statistics" block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DpStats {
    /// Mean Δp.
    pub mean: f64,
    /// Its uncertainty (`mean_and_uncertainty`).
    pub stderr: f64,
    /// RMS Δp: `√(mean Δp²)`.
    pub rms: f64,
    /// Its uncertainty: `0.5/rms · unc(mean Δp²)` with `unc` from `mean_and_uncertainty(ΣΔp², ΣΔp⁴)`.
    pub rms_stderr: f64,
    /// Largest Δp (exact).
    pub max: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 75th percentile.
    pub p75: f64,
    /// Median (llama.cpp's rule).
    pub median: f64,
    /// 25th percentile.
    pub p25: f64,
    /// 10th percentile.
    pub p10: f64,
    /// 5th percentile.
    pub p5: f64,
    /// 1st percentile.
    pub p1: f64,
    /// 0.1th percentile.
    pub p0_1: f64,
    /// Smallest Δp (exact).
    pub min: f64,
}

/// llama.cpp's "Perplexity statistics" block (rows with a target).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PplStats {
    /// `PPL(Q) = exp(mean nll_test)`.
    pub ppl_test: f64,
    /// `PPL(Q) · unc(mean nll_test)`.
    pub ppl_test_stderr: f64,
    /// `PPL(base) = exp(mean nll_base)`.
    pub ppl_base: f64,
    /// `PPL(base) · unc(mean nll_base)`.
    pub ppl_base_stderr: f64,
    /// `Cor(ln PPL(Q), ln PPL(base)) = cov / (unc_Q · unc_base)`, a fraction (NaN when `N ≤ 10`,
    /// where llama.cpp's uncertainties are 0).
    pub cor: f64,
    /// `ln(PPL(Q)/PPL(base))`: mean nll_test − mean nll_base.
    pub ln_ratio: f64,
    /// `√(unc_Q² + unc_base² − 2·cov)`.
    pub ln_ratio_stderr: f64,
    /// `PPL(Q)/PPL(base) = exp(ln_ratio)`.
    pub ratio: f64,
    /// `ratio · ln_ratio_stderr`.
    pub ratio_stderr: f64,
    /// `PPL(Q) − PPL(base)`.
    pub diff: f64,
    /// `√(σ_Q² + σ_base² − 2·PPL(Q)·PPL(base)·cov)` with the two PPL uncertainties σ.
    pub diff_stderr: f64,
}

/// Every number llama.cpp's `--kl-divergence` prints at the end, by its formulas: means with
/// `mean_and_uncertainty` (`√(var/(N − 1))`, 0 when `N ≤ 10`), covariances 0 when `N < 10`,
/// percentiles by its interpolation at `f·(N − 1)` and its median rule. Non-finite values are
/// possible (NaN rows, infinite KLDs, no rows at all).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KldStats {
    /// Rows scored (not ignored).
    pub tokens: u64,
    /// Rows whose target was the ignore index.
    pub ignored: u64,
    /// Scored rows that had a target (the `N` of the perplexity and Δp statistics).
    pub with_target: u64,
    /// Where the percentiles come from.
    pub percentiles: PercentileKind,
    /// Mean KLD, nats.
    pub kld_mean: f64,
    /// Its uncertainty.
    pub kld_stderr: f64,
    /// Largest KLD (exact).
    pub kld_max: f64,
    /// 99.9th percentile of KLD.
    pub kld_p99_9: f64,
    /// 99th percentile.
    pub kld_p99: f64,
    /// 95th percentile.
    pub kld_p95: f64,
    /// 90th percentile.
    pub kld_p90: f64,
    /// Median (llama.cpp's rule).
    pub kld_median: f64,
    /// 10th percentile.
    pub kld_p10: f64,
    /// 5th percentile.
    pub kld_p5: f64,
    /// 1st percentile.
    pub kld_p1: f64,
    /// 0.1th percentile.
    pub kld_p0_1: f64,
    /// Smallest KLD (exact).
    pub kld_min: f64,
    /// Fraction of rows whose two argmaxes agree.
    pub same_top: f64,
    /// `√(p(1 − p)/(N − 1))` (no `N > 10` rule there in llama.cpp).
    pub same_top_stderr: f64,
    /// Perplexity statistics (`None` without any target).
    pub ppl: Option<PplStats>,
    /// Δp statistics (`None` without any target).
    pub dp: Option<DpStats>,
}

/// The percentile fractions llama.cpp prints for KLD (above and below the median), as `f32`.
const KLD_HIGH: [f32; 4] = [0.999, 0.990, 0.950, 0.900];
const KLD_LOW: [f32; 4] = [0.100, 0.050, 0.010, 0.001];
/// …and for Δp.
const DP_HIGH: [f32; 5] = [0.999, 0.990, 0.950, 0.900, 0.750];
const DP_LOW: [f32; 5] = [0.250, 0.100, 0.050, 0.010, 0.001];

/// Max, percentiles (descending), median, percentiles, min of one set of values.
struct Quantiles<const H: usize> {
    max: f64,
    high: [f64; H],
    median: f64,
    low: [f64; H],
    min: f64,
}

fn quantiles<const H: usize>(
    exact: Option<&[f32]>,
    sketch: &QuantileSketch,
    high: &[f32; H],
    low: &[f32; H],
) -> Quantiles<H> {
    match exact {
        Some(values) => {
            let mut v = values.to_vec();
            v.sort_unstable_by(f32::total_cmp);
            let at = |f: f32| f64::from(llama_percentile(&v, f));
            Quantiles {
                max: v.last().map_or(f64::NAN, |&x| x.into()),
                high: high.map(at),
                median: llama_median(&v).into(),
                low: low.map(at),
                min: v.first().map_or(f64::NAN, |&x| x.into()),
            }
        }
        None => {
            let n = sketch.count() > 0;
            Quantiles {
                max: if n { sketch.max().into() } else { f64::NAN },
                high: high.map(|f| sketch.percentile(f)),
                median: sketch.median(),
                low: low.map(|f| sketch.percentile(f)),
                min: if n { sketch.min().into() } else { f64::NAN },
            }
        }
    }
}

impl KldSummary {
    /// An empty summary keeping exact percentile values for up to `budget` tokens (8 bytes per
    /// token); beyond that the percentiles come from the sketch alone.
    pub fn with_budget(budget: u64) -> Self {
        KldSummary {
            tokens: 0,
            ignored: 0,
            same_top: 0,
            with_target: 0,
            kld: ExactSum::default(),
            kld2: ExactSum::default(),
            nll_base: ExactSum::default(),
            nll_base2: ExactSum::default(),
            nll_test: ExactSum::default(),
            nll_test2: ExactSum::default(),
            nll_test_base: ExactSum::default(),
            dp: ExactSum::default(),
            dp2: ExactSum::default(),
            dp4: ExactSum::default(),
            kld_sketch: QuantileSketch::new(),
            dp_sketch: QuantileSketch::new(),
            exact: Some(ExactValues::default()),
            budget,
        }
    }

    /// Adds one row's result. Ignored rows are only counted.
    pub fn push(&mut self, r: &KldRow) {
        if r.ignored() {
            self.ignored += 1;
            return;
        }
        self.tokens += 1;
        self.same_top += u64::from(r.same_top());
        let kld = r.kld + 0.0; // −0 → +0
        let k = f64::from(kld);
        self.kld.add(k);
        self.kld2.add(k * k);
        let kept = self.kld_sketch.add(kld);
        let dp = r.dp + 0.0;
        let mut dp_kept = false;
        if r.has_target() {
            self.with_target += 1;
            let (b, t, d) = (f64::from(r.nll_base), f64::from(r.nll_test), f64::from(dp));
            self.nll_base.add(b);
            self.nll_base2.add(b * b);
            self.nll_test.add(t);
            self.nll_test2.add(t * t);
            self.nll_test_base.add(t * b);
            self.dp.add(d);
            self.dp2.add(d * d);
            self.dp4.add((d * d) * (d * d));
            dp_kept = self.dp_sketch.add(dp);
        }
        if self.tokens > self.budget {
            self.exact = None;
        }
        if let Some(e) = &mut self.exact {
            if kept {
                push_capped(&mut e.kld, kld, self.budget);
            }
            if dp_kept {
                push_capped(&mut e.dp, dp, self.budget);
            }
        }
    }

    /// The summary of a slice of rows (default budget).
    pub fn of(rows: &[KldRow]) -> Self {
        let mut s = KldSummary::default();
        rows.iter().for_each(|r| s.push(r));
        s
    }

    /// Adds another summary: counts, sums and sketches exactly; the exact values are kept while both
    /// sides have theirs and the total stays within this summary's budget.
    pub fn merge(&mut self, o: &KldSummary) {
        self.tokens += o.tokens;
        self.ignored += o.ignored;
        self.same_top += o.same_top;
        self.with_target += o.with_target;
        for (a, b) in self.sums_mut().into_iter().zip(o.sums()) {
            a.merge(&b);
        }
        self.kld_sketch.merge(&o.kld_sketch);
        self.dp_sketch.merge(&o.dp_sketch);
        match (&mut self.exact, &o.exact) {
            (Some(a), Some(b)) if self.tokens <= self.budget => {
                a.kld.extend_from_slice(&b.kld);
                a.dp.extend_from_slice(&b.dp);
            }
            _ => self.exact = None,
        }
    }

    fn sums(&self) -> [ExactSum; 10] {
        [
            self.kld,
            self.kld2,
            self.nll_base,
            self.nll_base2,
            self.nll_test,
            self.nll_test2,
            self.nll_test_base,
            self.dp,
            self.dp2,
            self.dp4,
        ]
    }

    fn sums_mut(&mut self) -> [&mut ExactSum; 10] {
        [
            &mut self.kld,
            &mut self.kld2,
            &mut self.nll_base,
            &mut self.nll_base2,
            &mut self.nll_test,
            &mut self.nll_test2,
            &mut self.nll_test_base,
            &mut self.dp,
            &mut self.dp2,
            &mut self.dp4,
        ]
    }

    /// Names of the sums in the JSON, in the order of `sums()`.
    const SUM_NAMES: [&'static str; 10] =
        ["kld", "kld2", "nll_base", "nll_base2", "nll_test", "nll_test2", "nll_test_nll_base", "dp", "dp2", "dp4"];

    /// The per-token values kept for exact percentiles — `(kld, dp)`, in no particular order —
    /// while the summary is within its budget; `None` once it relies on the sketches alone. The
    /// JSON form leaves them out (it would grow with the tokens); a lossless copy (Python's
    /// pickle) carries them beside it and restores them with [`KldSummary::with_exact_values`].
    pub fn exact_values(&self) -> Option<(&[f32], &[f32])> {
        self.exact.as_ref().map(|e| (&e.kld[..], &e.dp[..]))
    }

    /// This summary with its exact per-token values restored (see [`KldSummary::exact_values`]).
    ///
    /// # Errors
    /// [`Error::Summary`] when the values are more than the budget or do not match the summary's
    /// own counts (one KLD per non-NaN token, one Δp per non-NaN row with a target).
    pub fn with_exact_values(mut self, kld: Vec<f32>, dp: Vec<f32>) -> Result<KldSummary> {
        if kld.len() as u64 != self.kld_sketch.count() || dp.len() as u64 != self.dp_sketch.count() {
            return Err(Error::Summary(format!(
                "{} exact KLD and {} exact Δp values for a summary of {} and {} values",
                kld.len(),
                dp.len(),
                self.kld_sketch.count(),
                self.dp_sketch.count()
            )));
        }
        if self.tokens > self.budget {
            return Err(Error::Summary(format!(
                "exact values for {} tokens, over the budget {}",
                self.tokens, self.budget
            )));
        }
        self.exact = Some(ExactValues { kld, dp });
        Ok(self)
    }

    /// Rows scored (not ignored).
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Rows whose target was the ignore index.
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    /// Scored rows with a target.
    pub fn with_target(&self) -> u64 {
        self.with_target
    }

    /// Scored rows whose two argmaxes agree.
    pub fn same_top_count(&self) -> u64 {
        self.same_top
    }

    /// Scored rows whose KLD was NaN (broken rows).
    pub fn kld_nan(&self) -> u64 {
        self.kld.nan
    }

    /// The exact-percentile budget, in tokens.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// `Exact` while every value is kept (within the budget), else `Sketch`.
    pub fn percentiles_kind(&self) -> PercentileKind {
        if self.exact.is_some() {
            PercentileKind::Exact
        } else {
            PercentileKind::Sketch
        }
    }

    /// The KLD values' sketch.
    pub fn kld_sketch(&self) -> &QuantileSketch {
        &self.kld_sketch
    }

    /// The Δp values' sketch.
    pub fn dp_sketch(&self) -> &QuantileSketch {
        &self.dp_sketch
    }

    /// llama.cpp's statistics of everything pushed or merged (see [`KldStats`]). With exact
    /// percentiles this sorts a copy of the kept values (O(N log N), N ≤ the budget: about a second
    /// at 2^24), so compute it once where several outputs are wanted.
    pub fn stats(&self) -> KldStats {
        let n = self.tokens;
        let (kld_mean, kld_stderr) = mean_and_uncertainty(self.kld.value(), self.kld2.value(), n);
        let k = quantiles(self.exact.as_ref().map(|e| e.kld.as_slice()), &self.kld_sketch, &KLD_HIGH, &KLD_LOW);
        let same_top = self.same_top as f64 / n as f64;
        let same_top_stderr = (same_top * (1.0 - same_top) / (n as f64 - 1.0)).sqrt();
        let (ppl, dp) = if self.with_target > 0 {
            let nt = self.with_target;
            let log_ppl = mean_and_uncertainty(self.nll_test.value(), self.nll_test2.value(), nt);
            let ppl_test = log_ppl.0.exp();
            let ppl_test_stderr = ppl_test * log_ppl.1;
            let log_base = mean_and_uncertainty(self.nll_base.value(), self.nll_base2.value(), nt);
            let ppl_base = log_base.0.exp();
            let ppl_base_stderr = ppl_base * log_base.1;
            let cov = covariance(self.nll_test.value(), self.nll_base.value(), self.nll_test_base.value(), nt);
            let ln_ratio = log_ppl.0 - log_base.0;
            let ln_ratio_stderr = (log_ppl.1 * log_ppl.1 + log_base.1 * log_base.1 - 2.0 * cov).sqrt();
            let ratio = ln_ratio.exp();
            let ppl_cov = ppl_test * ppl_base * cov;
            let ppl = PplStats {
                ppl_test,
                ppl_test_stderr,
                ppl_base,
                ppl_base_stderr,
                cor: cov / (log_ppl.1 * log_base.1),
                ln_ratio,
                ln_ratio_stderr,
                ratio,
                ratio_stderr: ratio * ln_ratio_stderr,
                diff: ppl_test - ppl_base,
                diff_stderr: (ppl_test_stderr * ppl_test_stderr + ppl_base_stderr * ppl_base_stderr - 2.0 * ppl_cov)
                    .sqrt(),
            };
            let (mean, stderr) = mean_and_uncertainty(self.dp.value(), self.dp2.value(), nt);
            let mse = mean_and_uncertainty(self.dp2.value(), self.dp4.value(), nt);
            let rms = mse.0.sqrt();
            let q = quantiles(self.exact.as_ref().map(|e| e.dp.as_slice()), &self.dp_sketch, &DP_HIGH, &DP_LOW);
            let dp = DpStats {
                mean,
                stderr,
                rms,
                rms_stderr: 0.5 / rms * mse.1,
                max: q.max,
                p99_9: q.high[0],
                p99: q.high[1],
                p95: q.high[2],
                p90: q.high[3],
                p75: q.high[4],
                median: q.median,
                p25: q.low[0],
                p10: q.low[1],
                p5: q.low[2],
                p1: q.low[3],
                p0_1: q.low[4],
                min: q.min,
            };
            (Some(ppl), Some(dp))
        } else {
            (None, None)
        };
        KldStats {
            tokens: n,
            ignored: self.ignored,
            with_target: self.with_target,
            percentiles: self.percentiles_kind(),
            kld_mean,
            kld_stderr,
            kld_max: k.max,
            kld_p99_9: k.high[0],
            kld_p99: k.high[1],
            kld_p95: k.high[2],
            kld_p90: k.high[3],
            kld_median: k.median,
            kld_p10: k.low[0],
            kld_p5: k.low[1],
            kld_p1: k.low[2],
            kld_p0_1: k.low[3],
            kld_min: k.min,
            same_top,
            same_top_stderr,
            ppl,
            dp,
        }
    }

    /// llama.cpp's final blocks, line for line with its formats: "Perplexity statistics" (with
    /// targets), "KL divergence statistics", "Token probability statistics" (the Δp lines with
    /// targets; "Same top p" always). Δp and same top in %.
    pub fn human(&self) -> String {
        self.human_with(&self.stats())
    }

    /// [`KldSummary::human`] from statistics already computed (`stats()` sorts the exact values:
    /// compute it once when several outputs are wanted).
    pub fn human_with(&self, s: &KldStats) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        // `write!` to a String cannot fail.
        if let Some(p) = &s.ppl {
            o.push_str("====== Perplexity statistics ======\n");
            let _ = writeln!(
                o,
                "Mean PPL(Q)                   : {} ± {}",
                c(p.ppl_test, 10, 6),
                c(p.ppl_test_stderr, 10, 6)
            );
            let _ = writeln!(
                o,
                "Mean PPL(base)                : {} ± {}",
                c(p.ppl_base, 10, 6),
                c(p.ppl_base_stderr, 10, 6)
            );
            let _ = writeln!(o, "Cor(ln(PPL(Q)), ln(PPL(base))): {}%", c(100.0 * p.cor, 6, 2));
            let _ = writeln!(
                o,
                "Mean ln(PPL(Q)/PPL(base))     : {} ± {}",
                c(p.ln_ratio, 10, 6),
                c(p.ln_ratio_stderr, 10, 6)
            );
            let _ = writeln!(o, "Mean PPL(Q)/PPL(base)         : {} ± {}", c(p.ratio, 10, 6), c(p.ratio_stderr, 10, 6));
            let _ = writeln!(o, "Mean PPL(Q)-PPL(base)         : {} ± {}", c(p.diff, 10, 6), c(p.diff_stderr, 10, 6));
            o.push('\n');
        }
        o.push_str("====== KL divergence statistics ======\n");
        let _ = writeln!(o, "Mean    KLD: {} ± {}", c(s.kld_mean, 10, 6), c(s.kld_stderr, 10, 6));
        let kld_lines = [
            ("Maximum", s.kld_max),
            ("99.9%  ", s.kld_p99_9),
            ("99.0%  ", s.kld_p99),
            ("95.0%  ", s.kld_p95),
            ("90.0%  ", s.kld_p90),
            ("Median ", s.kld_median),
            ("10.0%  ", s.kld_p10),
            (" 5.0%  ", s.kld_p5),
            (" 1.0%  ", s.kld_p1),
            (" 0.1%  ", s.kld_p0_1),
            ("Minimum", s.kld_min),
        ];
        for (label, v) in kld_lines {
            let _ = writeln!(o, "{label} KLD: {}", c(v, 10, 6));
        }
        o.push('\n');
        o.push_str("====== Token probability statistics ======\n");
        if let Some(d) = &s.dp {
            let _ = writeln!(o, "Mean    Δp: {} ± {} %", c(100.0 * d.mean, 6, 3), c(100.0 * d.stderr, 5, 3));
            let dp_lines = [
                ("Maximum", d.max),
                ("99.9%  ", d.p99_9),
                ("99.0%  ", d.p99),
                ("95.0%  ", d.p95),
                ("90.0%  ", d.p90),
                ("75.0%  ", d.p75),
                ("Median ", d.median),
                ("25.0%  ", d.p25),
                ("10.0%  ", d.p10),
                (" 5.0%  ", d.p5),
                (" 1.0%  ", d.p1),
                (" 0.1%  ", d.p0_1),
                ("Minimum", d.min),
            ];
            for (label, v) in dp_lines {
                let _ = writeln!(o, "{label} Δp: {}%", c(100.0 * v, 6, 3));
            }
            let _ = writeln!(o, "RMS Δp    : {} ± {} %", c(100.0 * d.rms, 6, 3), c(100.0 * d.rms_stderr, 5, 3));
        }
        let _ = writeln!(o, "Same top p: {} ± {} %", c(100.0 * s.same_top, 6, 3), c(100.0 * s.same_top_stderr, 5, 3));
        o
    }

    /// One JSON object: `"kind":"kld"`, the CLI contract's keys (target-dependent ones only with
    /// targets; Δp as a fraction; non-finite numbers as `null`), then what merging needs:
    /// `budget`, `with_target`, `same_top_count`, the exact sums (`sums`: name →
    /// `["fixed-point integer", nan, +inf, −inf]`) and the two sketches. This is also what
    /// `--summary-out` writes; [`KldSummary::from_json`] reads it back (without the exact values).
    pub fn to_json(&self, device: &str, seconds: f64) -> String {
        self.to_json_with(&self.stats(), device, seconds)
    }

    /// [`KldSummary::to_json`] from statistics already computed.
    pub fn to_json_with(&self, s: &KldStats, device: &str, seconds: f64) -> String {
        self.json(s, device, seconds, true)
    }

    /// The object `--json` prints: [`KldSummary::to_json`] without the two sketches (which run to
    /// hundreds of kilobytes on large sets and only matter to merging: `--summary-out` has them).
    pub fn report_json_with(&self, s: &KldStats, device: &str, seconds: f64) -> String {
        self.json(s, device, seconds, false)
    }

    fn json(&self, s: &KldStats, device: &str, seconds: f64, sketches: bool) -> String {
        let mut o = String::from("{\"kind\":\"kld\"");
        let mut put = |k: &str, v: String| {
            o.push_str(&format!(",\"{k}\":{v}"));
        };
        put("tokens", s.tokens.to_string());
        put("ignored", s.ignored.to_string());
        let kld = [
            ("kld_mean", s.kld_mean),
            ("kld_stderr", s.kld_stderr),
            ("kld_max", s.kld_max),
            ("kld_p99_9", s.kld_p99_9),
            ("kld_p99", s.kld_p99),
            ("kld_p95", s.kld_p95),
            ("kld_p90", s.kld_p90),
            ("kld_median", s.kld_median),
            ("kld_p10", s.kld_p10),
            ("kld_p5", s.kld_p5),
            ("kld_p1", s.kld_p1),
            ("kld_p0_1", s.kld_p0_1),
            ("kld_min", s.kld_min),
            ("same_top", s.same_top),
            ("same_top_stderr", s.same_top_stderr),
        ];
        for (k, v) in kld {
            put(k, num(v));
        }
        put("percentiles", format!("\"{}\"", s.percentiles.as_str()));
        put("device", Value::from(device).to_string());
        put("seconds", num(seconds));
        if let (Some(p), Some(d)) = (&s.ppl, &s.dp) {
            let t = [
                ("ppl_base", p.ppl_base),
                ("ppl_base_stderr", p.ppl_base_stderr),
                ("ppl_test", p.ppl_test),
                ("ppl_test_stderr", p.ppl_test_stderr),
                ("ppl_cor", p.cor),
                ("ln_ppl_ratio", p.ln_ratio),
                ("ln_ppl_ratio_stderr", p.ln_ratio_stderr),
                ("ppl_ratio", p.ratio),
                ("ppl_ratio_stderr", p.ratio_stderr),
                ("ppl_diff", p.diff),
                ("ppl_diff_stderr", p.diff_stderr),
                ("dp_mean", d.mean),
                ("dp_stderr", d.stderr),
                ("dp_rms", d.rms),
                ("dp_rms_stderr", d.rms_stderr),
                ("dp_max", d.max),
                ("dp_p99_9", d.p99_9),
                ("dp_p99", d.p99),
                ("dp_p95", d.p95),
                ("dp_p90", d.p90),
                ("dp_p75", d.p75),
                ("dp_median", d.median),
                ("dp_p25", d.p25),
                ("dp_p10", d.p10),
                ("dp_p5", d.p5),
                ("dp_p1", d.p1),
                ("dp_p0_1", d.p0_1),
                ("dp_min", d.min),
            ];
            for (k, v) in t {
                put(k, num(v));
            }
        }
        put("budget", self.budget.to_string());
        put("with_target", self.with_target.to_string());
        put("same_top_count", self.same_top.to_string());
        let sums: serde_json::Map<String, Value> =
            Self::SUM_NAMES.iter().zip(self.sums()).map(|(k, v)| (k.to_string(), v.to_json())).collect();
        put("sums", Value::Object(sums).to_string());
        if sketches {
            put("sketch_kld", self.kld_sketch.to_json().to_string());
            put("sketch_dp", self.dp_sketch.to_json().to_string());
        }
        o.push('}');
        o
    }

    /// Reads a summary written by [`KldSummary::to_json`] (counts, sums and sketches; the exact
    /// values are not carried, so its percentiles are the sketch's). The budget is the file's.
    ///
    /// # Errors
    /// [`Error::Summary`] when the text is not JSON, is a `score` summary or another kind of file,
    /// or misses or contradicts a field (a count, an exact sum, a sketch).
    pub fn from_json(text: &str) -> Result<KldSummary> {
        let err = |m: String| Error::Summary(m);
        let v: Value = serde_json::from_str(text).map_err(|e| err(format!("not JSON: {e}")))?;
        if !v.is_object() {
            return Err(err("not a JSON object".into()));
        }
        match v.get("kind").map(|k| (k, k.as_str())) {
            Some((_, Some(KIND))) => {}
            Some((_, Some("score"))) => {
                return Err(err("a score summary, not a kld summary (merge score and kld summaries apart)".into()))
            }
            None if v.get("sum_nll_fixed").is_some() => {
                return Err(err("a score summary, not a kld summary (merge score and kld summaries apart)".into()))
            }
            Some((k, _)) => return Err(err(format!("summary of kind {k}, not a kld summary"))),
            None => return Err(err("not an xent kld summary (no \"kind\")".into())),
        }
        let count = |k: &str| {
            v.get(k).and_then(Value::as_u64).ok_or_else(|| err(format!("kld summary without the count '{k}'")))
        };
        let mut s = KldSummary::with_budget(count("budget")?);
        s.exact = None;
        s.tokens = count("tokens")?;
        s.ignored = count("ignored")?;
        s.with_target = count("with_target")?;
        s.same_top = count("same_top_count")?;
        let sums = v.get("sums");
        for (slot, name) in s.sums_mut().into_iter().zip(Self::SUM_NAMES) {
            *slot = ExactSum::from_json(sums.and_then(|m| m.get(name)), name).map_err(err)?;
        }
        let sketch = |k: &str| {
            v.get(k)
                .ok_or_else(|| err(format!("kld summary without '{k}'")))
                .and_then(|x| QuantileSketch::from_json(x, k).map_err(err))
        };
        s.kld_sketch = sketch("sketch_kld")?;
        s.dp_sketch = sketch("sketch_dp")?;
        // Consistency: every count against the others.
        let bad = |what: &str| Err(err(format!("inconsistent kld summary: {what}")));
        if s.same_top > s.tokens || s.with_target > s.tokens {
            return bad("more same-top or target rows than tokens");
        }
        let total = |e: &ExactSum| e.nan + e.pos_inf + e.neg_inf;
        if s.kld_sketch.count() + s.kld.nan != s.tokens {
            return bad("the KLD sketch does not hold one value per token");
        }
        if s.dp_sketch.count() + s.dp.nan != s.with_target {
            return bad("the Δp sketch does not hold one value per row with a target");
        }
        if total(&s.kld) > s.tokens || s.sums()[2..].iter().any(|e| total(e) > s.with_target) {
            return bad("more non-finite values than rows");
        }
        Ok(s)
    }
}

/// JSON number, or `null` where JSON has none (NaN, ±inf).
fn num(x: f64) -> String {
    if x.is_finite() {
        Value::from(x).to_string()
    } else {
        "null".into()
    }
}

/// C's `%W.Pf`: right-aligned in `width`, `prec` decimals; `nan`, `inf`, `-inf` as glibc prints them.
fn c(x: f64, width: usize, prec: usize) -> String {
    if x.is_nan() {
        format!("{:>width$}", if x.is_sign_negative() { "-nan" } else { "nan" })
    } else if x.is_infinite() {
        format!("{:>width$}", if x < 0.0 { "-inf" } else { "inf" })
    } else {
        format!("{x:>width$.prec$}")
    }
}
