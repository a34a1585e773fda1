//! Mergeable summaries: sums in f64, so shards can be scored anywhere and combined exactly.

use crate::problem::RowLoss;

/// Running sums over scored rows. Merging two summaries gives the summary of both inputs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    /// Rows scored (not ignored).
    pub tokens: u64,
    /// Rows whose target was the ignore index.
    pub ignored: u64,
    /// Sum of nll over scored rows, nats.
    pub sum_nll: f64,
    /// Sum of nll squared over scored rows.
    pub sum_nll_sq: f64,
    /// Scored rows whose argmax equals the target.
    pub correct: u64,
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
        self.sum_nll += nll;
        self.sum_nll_sq += nll * nll;
        self.correct += u64::from(correct);
    }

    /// The summary of a slice of rows.
    pub fn of(rows: &[RowLoss]) -> Self {
        let mut s = Summary::default();
        rows.iter().for_each(|r| s.push(r));
        s
    }

    /// Combines two summaries.
    pub fn merge(&mut self, other: &Summary) {
        self.tokens += other.tokens;
        self.ignored += other.ignored;
        self.sum_nll += other.sum_nll;
        self.sum_nll_sq += other.sum_nll_sq;
        self.correct += other.correct;
    }

    /// Mean nll in nats (NaN when nothing was scored).
    pub fn mean_nll(&self) -> f64 {
        self.sum_nll / self.tokens as f64
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
        let n = self.tokens as f64;
        if self.tokens < 2 {
            return f64::NAN;
        }
        let mean = self.mean_nll();
        let var = (self.sum_nll_sq / n - mean * mean).max(0.0);
        self.perplexity() * (var / (n - 1.0)).sqrt()
    }

    /// Fraction of scored rows whose argmax equals the target.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.tokens as f64
    }
}
