//! The fused KLD pass's state, written once in scalar Rust: how partial results of a row (parts
//! scanned apart) merge and how a row is finished. The CPU fast path uses it directly (sums and
//! merges in f64). The WGSL kernel (`shaders/kld.wgsl`) keeps the same state in f32 and needs
//! three refinements that f64 does not: re-centring by `|δ| ≥ 1/2` through `t = Σ w·e` (products
//! only, no `G − Y` cancellation), the masked test mass added as a term rather than through
//! `log1p`, and `lse_b − lse_a` as `((m_a − m_b) − c) + (log S_a − log S_b)` for huge logits; it
//! also picks between the two forms by the consistency check alone (1e-3). Both are held to the
//! same tolerance against [`super::reference`] by the tests.
//!
//! Notation (see the [module docs](super)): `w_i = exp(a_i − m_a)`, `d_i = a_i − b_i`,
//! `e_i = d_i − c` for the state's centre `c`, `g(e) = e + expm1(−e)`.
//! A state keeps `S_a = Σ w`, `G = Σ w·g(e)` and `Y = Σ w·expm1(−e)`, plus the test side's own
//! `(m_b, S_b)`, both first argmaxes and a flag for NaN / `+inf`.

use super::{KldRow, NO_TARGET};
use crate::problem::IGNORED_TARGET;

/// The Taylor coefficients of `g(e) / e²`: `(−1)^n / (n + 2)!`, `n = 0..8`.
pub(crate) const G_COEFFICIENTS: [f32; 8] =
    [1.0 / 2.0, -1.0 / 6.0, 1.0 / 24.0, -1.0 / 120.0, 1.0 / 720.0, -1.0 / 5040.0, 1.0 / 40320.0, -1.0 / 362_880.0];

/// `g(e) = e − 1 + exp(−e)` by its Taylor series, for `|e| < 1/2` (relative error below 3e-9
/// there; the next term is `e¹⁰/10!`).
#[inline(always)]
pub fn g_series(e: f32) -> f32 {
    const C: [f32; 8] = G_COEFFICIENTS;
    let mut p = C[7];
    for &k in C[..7].iter().rev() {
        p = p * e + k;
    }
    e * e * p
}

/// `g(x) = x + expm1(−x)` in f64, any `x` (series near 0, where the direct form cancels).
pub fn g64(x: f64) -> f64 {
    if x.abs() < 0.5 {
        // The series to e^14/14!: relative error below 1e-14 for |x| < 1/2.
        let mut p = 1.0 / 87_178_291_200.0;
        for n in (2..14).rev() {
            p = p * x + if n % 2 == 0 { 1.0 } else { -1.0 } / factorial(n);
        }
        x * x * p
    } else {
        x + (-x).exp_m1()
    }
}

fn factorial(n: u32) -> f64 {
    (1..=n).map(f64::from).product()
}

/// `h(y) = y − log1p(y)` (≥ 0), through `log1p(y) = 2·atanh(y / (2 + y))` near 0, where the direct
/// form cancels.
pub fn h64(y: f64) -> f64 {
    if y.abs() <= 0.5 {
        let s = y / (2.0 + y);
        let s2 = s * s;
        let mut p = 1.0 / 19.0;
        for k in [1.0 / 17.0, 1.0 / 15.0, 1.0 / 13.0, 1.0 / 11.0, 1.0 / 9.0, 1.0 / 7.0, 1.0 / 5.0, 1.0 / 3.0] {
            p = p * s2 + k;
        }
        y * y / (2.0 + y) - 2.0 * s * s2 * p
    } else {
        y - y.ln_1p()
    }
}

/// The state of a scanned run of a row pair (sums in f64: the CPU accumulates lanes in f32 within
/// blocks and blocks in f64).
#[derive(Debug, Clone, Copy)]
pub struct Partial {
    /// Max of the base logits (−inf when the run holds none above −inf).
    pub ma: f32,
    /// `Σ exp(a − ma)`.
    pub sa: f64,
    /// Max of the test logits.
    pub mb: f32,
    /// `Σ exp(b − mb)`.
    pub sb: f64,
    /// The centre `c`: `a − b` at the base's first argmax (0 when none is finite).
    pub c: f32,
    /// `Σ w·g(e)`.
    pub g: f64,
    /// `Σ w·expm1(−e)`.
    pub y: f64,
    /// `Σ w·e`: for the textbook form, the fallback where `Y` over- or underflows.
    pub mm: f64,
    /// `Σ exp(b − mb)` over the entries where the base is −inf (`p = 0`): the test mass `Y` cannot
    /// see, which moves `lse_b` by `log(1 − zb/S_b)`.
    pub zb: f64,
    /// First index of `ma` in the row.
    pub idx_a: Option<usize>,
    /// First index of `mb` in the row.
    pub idx_b: Option<usize>,
    /// A NaN or `+inf` on either side.
    pub bad: bool,
}

impl Partial {
    /// The state of a run whose sums are all zero (nothing above −inf yet).
    pub fn empty() -> Partial {
        Partial {
            ma: f32::NEG_INFINITY,
            sa: 0.0,
            mb: f32::NEG_INFINITY,
            sb: 0.0,
            c: 0.0,
            g: 0.0,
            y: 0.0,
            mm: 0.0,
            zb: 0.0,
            idx_a: None,
            idx_b: None,
            bad: false,
        }
    }

    /// Moves the centre to `c` exactly: with `δ = c − c_old`, `E = expm1(δ)`, `D = g(−δ) = E − δ`:
    /// `G' = G + S_a·D + E·Y` and `Y' = E·S_a + (1 + E)·Y`.
    pub fn recentre(&mut self, c: f32) {
        if !c.is_finite() {
            return;
        }
        if self.sa != 0.0 {
            let delta = f64::from(c) - f64::from(self.c);
            let d = g64(-delta);
            let e = d + delta;
            self.g += self.sa * d + e * self.y;
            self.y = e * self.sa + (1.0 + e) * self.y;
            self.mm -= delta * self.sa;
        }
        self.c = c;
    }

    /// Merges two runs, `self` before `other` in the row (ties keep the earlier index). The
    /// centre of the run with the larger base max is kept (the earlier one on ties).
    pub fn merge(self, other: &Partial) -> Partial {
        let (mut p, mut q) = (self, *other);
        if p.sa == 0.0 && p.idx_a.is_none() {
            p.c = q.c;
        }
        let c = if q.ma > p.ma && q.idx_a.is_some() { q.c } else { p.c };
        p.recentre(c);
        q.recentre(c);
        let ma = p.ma.max(q.ma);
        let mb = p.mb.max(q.mb);
        let scale = |s: f64, m: f32, top: f32| if s == 0.0 { 0.0 } else { f64::from(m - top).exp() };
        let (fp, fq) = (scale(p.sa, p.ma, ma), scale(q.sa, q.ma, ma));
        let idx = |pi: Option<usize>, pm: f32, qi: Option<usize>, qm: f32| {
            if qm > pm || pi.is_none() {
                qi.or(pi)
            } else {
                pi
            }
        };
        Partial {
            ma,
            sa: p.sa * fp + q.sa * fq,
            mb,
            sb: p.sb * scale(p.sb, p.mb, mb) + q.sb * scale(q.sb, q.mb, mb),
            zb: p.zb * scale(p.sb, p.mb, mb) + q.zb * scale(q.sb, q.mb, mb),
            c,
            g: p.g * fp + q.g * fq,
            y: p.y * fp + q.y * fq,
            mm: p.mm * fp + q.mm * fq,
            idx_a: idx(p.idx_a, p.ma, q.idx_a, q.ma),
            idx_b: idx(p.idx_b, p.mb, q.idx_b, q.mb),
            bad: p.bad || q.bad,
        }
    }

    /// The row's result from its complete state; `t` is the kernels' target (a class index,
    /// [`IGNORED_TARGET`] or [`NO_TARGET`]) and `a_t`, `b_t` the two logits at `t` (any value when
    /// there is none).
    pub fn finish(&self, t: u32, a_t: f32, b_t: f32) -> KldRow {
        if t == IGNORED_TARGET {
            return KldRow { flags: KldRow::IGNORED, ..KldRow::default() };
        }
        let has_target = t != NO_TARGET;
        let broken = self.bad || self.sa == 0.0 || self.sb == 0.0 || self.idx_a.is_none() || self.idx_b.is_none();
        let mut flags = if has_target { KldRow::HAS_TARGET } else { 0 };
        if broken {
            let v = if has_target { f32::NAN } else { 0.0 };
            return KldRow {
                kld: f32::NAN,
                nll_base: v,
                nll_test: v,
                dp: v,
                argmax_base: u32::MAX,
                argmax_test: u32::MAX,
                flags,
                pad: 0,
            };
        }
        let (la, lb) = (self.sa.ln(), self.sb.ln());
        let (lse_a, lse_b) = (f64::from(self.ma) + la, f64::from(self.mb) + lb);
        let (g, y) = (self.g / self.sa, self.y / self.sa);
        let hy = h64(y);
        // `Y` sees the test mass where `p > 0` only: the rest, `q_masked`, adds `−log(1 − q_masked)`.
        let masked = (-self.zb / self.sb).ln_1p();
        let k1 = g - hy - masked;
        let lse_b_via_y = lse_a - f64::from(self.c) + (y - hy) - masked;
        let k2 = f64::from(self.c) + self.mm / self.sa - lse_a + lse_b;
        // Each form's rounding error is about eps times the magnitude of what it subtracts: take the
        // centred form unless it subtracts more (far-apart models) or its `Y` has gone wrong.
        let consistent = (lse_b_via_y - lse_b).abs() <= 1e-4 * lse_b.abs().max(1.0);
        let cost1 = g.abs() + hy.abs();
        let cost2 = f64::from(self.c).abs() + (self.mm / self.sa).abs() + lse_a.abs() + lse_b.abs();
        let kld = if consistent && cost1 <= cost2 { k1 } else { k2 };
        let (ia, ib) = (self.idx_a.unwrap_or(usize::MAX) as u32, self.idx_b.unwrap_or(usize::MAX) as u32);
        if ia == ib {
            flags |= KldRow::SAME_TOP;
        }
        let (mut nll_base, mut nll_test, mut dp) = (0.0, 0.0, 0.0);
        if has_target {
            nll_base = f64::from(self.ma - a_t) + la;
            nll_test = f64::from(self.mb - b_t) + lb;
            dp = (-nll_test).exp() - (-nll_base).exp();
        }
        KldRow {
            // Rounding can leave a tiny negative; NaN stays NaN.
            kld: if kld < 0.0 { 0.0 } else { kld as f32 },
            nll_base: nll_base as f32,
            nll_test: nll_test as f32,
            dp: dp as f32,
            argmax_base: ia,
            argmax_test: ib,
            flags,
            pad: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_agree_with_direct_forms_where_both_are_accurate() {
        for &x in &[0.3f64, -0.3, 0.49, -0.49, 0.01, -0.01] {
            let direct = x + (-x).exp_m1();
            assert!((g64(x) - direct).abs() <= 1e-12 * direct, "g64({x}) = {} vs {direct}", g64(x));
            let gs = f64::from(g_series(x as f32));
            assert!((gs - direct).abs() <= 1e-6 * direct, "g_series({x}) = {gs} vs {direct}");
        }
        for &y in &[0.4f64, -0.4, 0.5, -0.5, 1e-3, -1e-3] {
            let direct = y - y.ln_1p();
            assert!((h64(y) - direct).abs() <= 1e-9 * direct.abs().max(1e-300) + 1e-18, "h64({y})");
        }
        assert_eq!(h64(0.0), 0.0);
        assert_eq!(g64(0.0), 0.0);
    }
}
