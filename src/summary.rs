//! Mergeable summaries. Sums are kept exactly, as fixed-point integers, so that the order in
//! which rows are added — one run, or shards scored apart and merged — cannot change a digit.
//! (Per-row values themselves are bit-identical across runs on the same kind of machine: same
//! device, or same CPU instruction set and thread count.)

use crate::problem::RowLoss;

/// Fixed-point scale of the exact sums: values are stored as integers in units of 2^-64.
const SCALE: f64 = 18_446_744_073_709_551_616.0; // 2^64

/// Running sums over scored rows. Merging two summaries gives exactly the summary of both inputs.
///
/// Each nll (an f32, so its square is exact in f64) is rounded once to a multiple of 2^-64 and
/// added as an integer: integer addition is associative, so any grouping of rows gives the same
/// sums to the last bit. NaN and infinite nlls are counted apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Rows scored (not ignored), NaN and infinite ones included.
    pub tokens: u64,
    /// Rows whose target was the ignore index.
    pub ignored: u64,
    /// Scored rows whose argmax equals the target.
    pub correct: u64,
    /// Scored rows whose nll was NaN.
    pub nan: u64,
    /// Scored rows whose nll was +inf (the target's logit was -inf).
    pub infinite: u64,
    /// Sum of the finite nlls, in units of 2^-64 nats.
    pub sum_nll_fixed: i128,
    /// Sum of the finite nlls squared, in units of 2^-64.
    pub sum_nll_sq_fixed: i128,
}

fn fixed(v: f64) -> i128 {
    // Exact scaling by a power of two, then one deterministic rounding (toward zero).
    (v * SCALE) as i128
}

impl Summary {
    /// Adds one row's result.
    pub fn push(&mut self, r: &RowLoss) {
        self.add(f64::from(r.nll), r.ignored(), r.correct());
    }

    /// Adds one row given by its parts (for results that are not [`RowLoss`], such as the reference's).
    pub fn add(&mut self, nll: f64, ignored: bool, correct: bool) {
        if ignored {
            self.ignored += 1;
            return;
        }
        self.tokens += 1;
        self.correct += u64::from(correct);
        if nll.is_nan() {
            self.nan += 1;
        } else if nll.is_infinite() {
            self.infinite += 1;
        } else {
            // Saturating: only absurd nlls (beyond 2^62 nats) could reach the i128 range.
            self.sum_nll_fixed = self.sum_nll_fixed.saturating_add(fixed(nll));
            self.sum_nll_sq_fixed = self.sum_nll_sq_fixed.saturating_add(fixed(nll * nll));
        }
    }

    /// The summary of a slice of rows.
    pub fn of(rows: &[RowLoss]) -> Self {
        let mut s = Summary::default();
        rows.iter().for_each(|r| s.push(r));
        s
    }

    /// Combines two summaries, exactly.
    pub fn merge(&mut self, other: &Summary) {
        self.tokens += other.tokens;
        self.ignored += other.ignored;
        self.correct += other.correct;
        self.nan += other.nan;
        self.infinite += other.infinite;
        self.sum_nll_fixed = self.sum_nll_fixed.saturating_add(other.sum_nll_fixed);
        self.sum_nll_sq_fixed = self.sum_nll_sq_fixed.saturating_add(other.sum_nll_sq_fixed);
    }

    /// Sum of nll over scored rows, nats (NaN if any row was NaN, +inf if any was infinite).
    pub fn sum_nll(&self) -> f64 {
        if self.nan > 0 {
            f64::NAN
        } else if self.infinite > 0 {
            f64::INFINITY
        } else {
            self.sum_nll_fixed as f64 / SCALE
        }
    }

    /// Mean nll in nats (NaN when nothing was scored).
    pub fn mean_nll(&self) -> f64 {
        self.sum_nll() / self.tokens as f64
    }

    /// Perplexity: `exp(mean nll in nats)`, equal to `2^(bits per token)`.
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }

    /// Bits per token: `mean nll / ln 2`.
    pub fn bits_per_token(&self) -> f64 {
        self.mean_nll() / std::f64::consts::LN_2
    }

    /// Standard error of the perplexity, as llama.cpp reports it:
    /// `ppl * sqrt(var(nll) / (N - 1))` with `var = mean(nll²) - mean(nll)²`. NaN when `N < 2`.
    pub fn perplexity_stderr(&self) -> f64 {
        if self.tokens < 2 {
            return f64::NAN;
        }
        let n = self.tokens as f64;
        let mean = self.mean_nll();
        let var = (self.sum_nll_sq_fixed as f64 / SCALE / n - mean * mean).max(0.0);
        self.perplexity() * (var / (n - 1.0)).sqrt()
    }

    /// Fraction of scored rows whose argmax equals the target.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.tokens as f64
    }
}
