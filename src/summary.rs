//! Mergeable summaries. Sums are kept exactly, as fixed-point integers, so that the order in
//! which rows are added — one run, or shards scored apart and merged — cannot change a digit.
//! (Per-row values themselves are bit-identical across runs on the same kind of machine: same
//! device, or same CPU instruction set and thread count.)

use crate::error::{Error, Result};
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

    /// The summary as the one JSON object `xent score --json` prints and `--summary-out` writes:
    /// the CLI contract's fields (`tokens`, `ignored`, `mean_nll`, `bits_per_token`, `perplexity`,
    /// `ppl_stderr`, `accuracy`, `device`, `seconds`), then the counts and exact sums (as decimal
    /// strings: JSON numbers cannot hold an i128) that make it mergeable. NaN and ±inf are `null`.
    pub fn to_json(&self, device: &str, seconds: f64) -> String {
        format!(
            "{{\"tokens\":{},\"ignored\":{},\"mean_nll\":{},\"bits_per_token\":{},\"perplexity\":{},\"ppl_stderr\":{},\"accuracy\":{},\"device\":{},\"seconds\":{},\"correct\":{},\"nan\":{},\"infinite\":{},\"sum_nll_fixed\":\"{}\",\"sum_nll_sq_fixed\":\"{}\"}}",
            self.tokens,
            self.ignored,
            num(self.mean_nll()),
            num(self.bits_per_token()),
            num(self.perplexity()),
            num(self.perplexity_stderr()),
            num(self.accuracy()),
            serde_json::Value::from(device),
            num(seconds),
            self.correct,
            self.nan,
            self.infinite,
            self.sum_nll_fixed,
            self.sum_nll_sq_fixed
        )
    }

    /// Reads back what [`Summary::to_json`] wrote (an `xent score --summary-out` file): the summary,
    /// and the `device` and `seconds` it names (`""` and 0 when absent).
    ///
    /// # Errors
    /// [`Error::Summary`] when the text is not JSON, is another kind of summary (a `kld` one), or
    /// lacks a count or an exact sum.
    pub fn from_json(text: &str) -> Result<(Summary, String, f64)> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Summary(format!("not JSON: {e}")))?;
        if !v.is_object() {
            return Err(Error::Summary("not a JSON object".into()));
        }
        if let Some(kind) = v.get("kind").filter(|k| k.as_str() != Some("score")) {
            return Err(Error::Summary(format!("not a score summary (kind {kind})")));
        }
        let count = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| Error::Summary(format!("no count '{k}' (write one with xent score --summary-out)")))
        };
        let exact = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_str)
                .and_then(|s| s.parse::<i128>().ok())
                .ok_or_else(|| Error::Summary(format!("no exact sum '{k}' (write one with xent score --summary-out)")))
        };
        let summary = Summary {
            tokens: count("tokens")?,
            ignored: count("ignored")?,
            correct: count("correct")?,
            nan: count("nan")?,
            infinite: count("infinite")?,
            sum_nll_fixed: exact("sum_nll_fixed")?,
            sum_nll_sq_fixed: exact("sum_nll_sq_fixed")?,
        };
        if summary.correct > summary.tokens || summary.nan + summary.infinite > summary.tokens {
            return Err(Error::Summary("counts disagree (correct, nan or infinite above tokens)".into()));
        }
        let device = v.get("device").and_then(serde_json::Value::as_str).unwrap_or("").to_string();
        let seconds = v.get("seconds").and_then(serde_json::Value::as_f64).unwrap_or(0.0);
        Ok((summary, device, seconds))
    }

    /// The human text `xent score`, `xent merge` and `xent demo` print, ending in a newline.
    pub fn human(&self, device: &str, seconds: f64) -> String {
        format!(
            "xent: {} tokens scored, {} ignored, on the {device} in {seconds:.3} s\n  \
             mean nll      {:.6} nats ({:.6} bits/token)\n  \
             perplexity    {:.4} ± {:.4}\n  \
             accuracy      {:.4}\n",
            self.tokens,
            self.ignored,
            self.mean_nll(),
            self.bits_per_token(),
            self.perplexity(),
            self.perplexity_stderr(),
            self.accuracy()
        )
    }
}

/// A JSON number, or `null` where JSON has none (NaN, ±inf).
fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}
