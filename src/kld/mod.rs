//! KL divergence between two models' logits over the same tokens: a base model `a` (distribution
//! P) and a test model `b` (distribution Q), one fused pass over both rows.
//!
//! ## The maths (nats)
//! - `kld = Σ_i p_i (log p_i − log q_i)`; `same_top = argmax(a) == argmax(b)` (first index on ties);
//! - with a target `t`: `nll_base = −log p_t`, `nll_test = −log q_t`, `dp = q_t − p_t` (llama.cpp's Δp).
//!
//! ## Numerics: the centred form
//! With `d_i = a_i − b_i`, `lse_b − lse_a = log E_p[exp(−d)]`, so `kld = E_p[d] + log E_p[exp(−d)]`.
//! For two close models both terms are large and nearly cancel (`T/S_a − lse_a + lse_b` loses most of
//! f32's digits at KLDs of 1e-4 … 1e-2). Instead, with a centre `c` (the `d` of the base's largest
//! logit, which carries the most weight) and `e_i = d_i − c`:
//!
//! ```text
//! g(e)  = e − 1 + exp(−e) = e + expm1(−e)  ≥ 0      (a Taylor series where |e| < 1/2)
//! G     = E_p[g(e)],   Y = E_p[expm1(−e)] = G − E_p[e]
//! kld   = G − h(Y),    h(Y) = Y − log1p(Y)  ≥ 0     (an atanh series where |Y| ≤ 1/2)
//! ```
//!
//! Every quantity is small when the models are close, and no large numbers are subtracted. The
//! sums `S = Σ exp(a_i − m_a)`, `G·S` and `Y·S` are kept online like the softmax sum (rescaled when
//! the max moves; re-centred exactly when the centre moves: see [`math`]). The test side keeps its
//! own online `(m_b, S_b)` for `nll_test` and as a cross-check of `Y`.
//!
//! Module map: [`math`] (the per-element state, shared by the CPU path and mirrored by the WGSL
//! kernel), [`mod@reference`] (the f64 oracle), [`cpu`] (the fast path), [`summary`] (llama.cpp's
//! statistics, mergeable), [`eval`] (files and llama.cpp base files).

pub mod cpu;
pub mod eval;
pub mod math;
pub mod reference;
pub mod sketch;
pub mod summary;

/// Target value in the kernels' `u32` form meaning "no target given for this row": only the
/// distribution statistics (KLD, same top) are computed. (Ignored rows are
/// [`crate::IGNORED_TARGET`].)
pub const NO_TARGET: u32 = u32::MAX - 1;

/// One row's result, in the exact layout the GPU kernel writes (32 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub struct KldRow {
    /// `Σ p (log p − log q)` in nats; 0 for ignored rows; NaN for broken rows (a NaN or +inf
    /// logit on either side, or a side of only −inf); +inf where `q_i = 0 < p_i`.
    pub kld: f32,
    /// `−log p_t` (0 without a target).
    pub nll_base: f32,
    /// `−log q_t` (0 without a target).
    pub nll_test: f32,
    /// `q_t − p_t` (0 without a target).
    pub dp: f32,
    /// First index of the base's largest logit (`u32::MAX` for a broken row).
    pub argmax_base: u32,
    /// First index of the test's largest logit (`u32::MAX` for a broken row).
    pub argmax_test: u32,
    /// Bit set of [`KldRow::IGNORED`], [`KldRow::SAME_TOP`], [`KldRow::BAD_TARGET`], [`KldRow::HAS_TARGET`].
    pub flags: u32,
    /// Always 0 (keeps the record 16-byte aligned).
    pub pad: u32,
}

impl KldRow {
    /// The row's target was the ignore index: left out of every statistic.
    pub const IGNORED: u32 = 1;
    /// `argmax_base == argmax_test` (and the row is not broken).
    pub const SAME_TOP: u32 = 2;
    /// The target was out of range (only through `encode`, which does not validate).
    pub const BAD_TARGET: u32 = 4;
    /// The row had a target: `nll_base`, `nll_test` and `dp` are meaningful.
    pub const HAS_TARGET: u32 = 8;
    /// Every flag a kernel writes; a result with other bits set was never written (poison).
    pub const ALL_FLAGS: u32 = Self::IGNORED | Self::SAME_TOP | Self::BAD_TARGET | Self::HAS_TARGET;

    /// Whether this result was written by a kernel (not left as poison).
    pub fn is_written(&self) -> bool {
        self.flags & !Self::ALL_FLAGS == 0
    }
    /// Whether the row was ignored.
    pub fn ignored(&self) -> bool {
        self.flags & Self::IGNORED != 0
    }
    /// Whether both models' argmax agree.
    pub fn same_top(&self) -> bool {
        self.flags & Self::SAME_TOP != 0
    }
    /// Whether the row had a target.
    pub fn has_target(&self) -> bool {
        self.flags & Self::HAS_TARGET != 0
    }
}
