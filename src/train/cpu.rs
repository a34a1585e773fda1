//! The fast CPU path for the loss and its gradient ([`loss_and_grad`], [`loss_and_grad_in_place`]):
//! SIMD, multi-threaded, the gradient written over the logits or into a separate buffer, every
//! option of [`LossOptions`]. Same semantics as [`super::reference::cross_entropy`] (see
//! [`super`]); in place and separate give the same bits.
//!
//! ## How it is fast
//! - **One read of memory and one write per logit.** A row's statistics come first — the max,
//!   then `Σ exp(x − max)` from cache (for f32, the forward's two passes of [`crate::cpu`], per
//!   part of at most 64k logits, each part prefetching the next) — then the gradient pass runs
//!   over the same row while it is still in L2 (a 128256-logit f32 row is 512 KiB) and writes
//!   it. The "2 reads + 1 write" the figures count is the floor of a kernel that cannot hold a
//!   row; on a CPU the second read comes from L2, and in place the write lands on lines already
//!   in cache (no read for ownership).
//! - **The gradient pass prefetches the next row**, one cache line per vector, so that row's
//!   passes start on data already in L2 while this row computes (a few per cent, measured).
//! - **16-bit logits keep pass 2's terms.** bf16 and f16 are bound by computation, not memory:
//!   pass 2 stores each `e^(x_j − max)` (f32, 512 KiB for a 128k row, in L2 beside the row) and
//!   the gradient pass multiplies them by the row's factor, one `exp` per logit instead of two
//!   (10% faster). f32 rows are bound by memory and the stash made them slower, so f32 computes
//!   the `exp` again.
//! - **The gradient is one `exp` (or one load) and one multiply per logit.** `p_j · coef` with
//!   `p_j = e^(z_j − max) / Σ` folds into one per-row factor computed in f64; the target's
//!   element is recomputed in f64 afterwards, so the cancellation `p_t · coef − w_t` costs no
//!   precision. The argument of `exp` is `<= 0`, as [`crate::cpu`]'s vector `exp` wants; lanes
//!   below -87 are masked to an exact 0 (a `-inf` logit gets no gradient), which also lets the
//!   `exp` drop its clamp.
//! - **bf16 on AVX-512** reads 32 logits per 64-byte load as two f32 vectors (even and odd
//!   lanes, as the forward does), stashes them in that order, and writes the gradient back
//!   rounded to bf16 in integer lanes with one 16-bit blend: no widening or narrowing shuffles,
//!   which compete for the one shuffle port. The max pass is the forward's, on the raw 16-bit
//!   patterns as integers.
//! - **Runtime instruction-set dispatch**, as [`crate::cpu`]: every pass is generic code over
//!   16-lane arrays, compiled for AVX-512, AVX2+FMA and the portable baseline through
//!   `#[target_feature]` functions. The loaders, storers and `exp` are `#[inline(always)]`
//!   methods of zero-sized types: closures and `std::array::from_fn` there were measured not to
//!   be inlined (two to three times slower).
//! - **rayon** over blocks of consecutive rows (16 per thread, for balance; consecutive, so that
//!   each row can prefetch the next), and over parts of rows when rows are fewer than threads
//!   (statistics of every part at once, merged per row, then the gradient of every part at once).
//! - **The options take passes of their own**, still vectorised: the max of the raw logits (tanh
//!   is monotonic, so the soft-capped max is the cap of the max), then `Σ exp(z − m)` and, for
//!   smoothing, `Σ w_j (m − z_j)` (every term `>= 0`: no cancellation), then the gradient with
//!   `tanh` (Cephes' `tanhf` on the portable `exp`, so that one lane alone has the bits of the
//!   same lane in a vector: the target's `z` and the max agree with the passes). Class weights
//!   without smoothing and the z-loss only change per-row scalars: they take the fast path.
//! - Lanes accumulate in f32 within blocks of 1024 logits, blocks in f64; per-row scalars in f64.
//!
//! ## Limits
//! - The smoothing sum `Σ w_j (m − z_j)` is accumulated in f32 lanes: logits more than ~1e36
//!   apart overflow it (the f64 reference does not).
//! - A `mean` over rows whose target weights sum to 0 (not all ignored) divides by 0: the loss
//!   is ±inf or NaN as the reference's, the gradient infinite or NaN, not in the same pattern.
//!
//! ## Measured
//! A 2-core Intel Xeon VM (Sapphire Rapids, AVX-512, 2 MiB L2 per core), 2048 × 128256, nothing
//! else running: `xent bench --train --device cpu --rows 2048 --vocab 128256 --iters 7` and
//! `benches/peers/train_torch_cpu.py` (torch 2.15, 2 threads) one after the other in each of
//! three windows, medians (BENCHMARKS.md, "Training"):
//!
//! | dtype | in place | GB/s (2R + 1W) | % of copy | separate buffer | torch fwd + bwd | speed-up |
//! |-------|---------:|---------------:|----------:|----------------:|----------------:|---------:|
//! | f32   | 101.6 ms |           31.0 |       84% |        154.6 ms |          922 ms |  9.0–10× |
//! | bf16  |  58.3 ms |           27.1 |       71% |         77.4 ms |          598 ms | 9.7–10.3×|
//!
//! The copy — `memcpy` of a buffer of the logits' size, one piece per thread, timed in the same
//! run — moved 36–41 GB/s (read + written). A separate buffer costs a read for ownership of
//! every destination line (non-temporal stores could avoid it; not done).

use rayon::prelude::*;

use super::{prepare, reduce, LossOptions, LossOutput, LossReduction, Prepared, TrainRow, Upstream};
use crate::cpu::{exp16, get_bf16, get_f16, get_f32, scan, Isa, PartPlan, Partial, LANES, PART, PORTABLE_FMA};
use crate::error::{Error, Result};
use crate::problem::{Dtype, Logits, Targets, IGNORED_TARGET};

/// Vectors per block: lanes sum in f32 within a block, blocks in f64 (as [`crate::cpu`]).
const BLOCK: usize = 64;
/// Where `exp(z_j − max)` is below e^-87 (< 1.7e-38) the gradient's softmax term is written as an
/// exact 0: the vector `exp` clamps its argument there, and a logit of -inf must get no gradient.
const FLUSH: f32 = -87.0;

/// Loss and gradient; the gradient (same dtype and length as the logits, computed in f32) is
/// written into `grad` when given.
///
/// # Errors
/// As [`prepare`]; [`Error::Shape`] when `grad` is not exactly as long as the logits' bytes.
pub fn loss_and_grad(
    logits: Logits<'_>,
    targets: Targets<'_>,
    opts: &LossOptions<'_>,
    upstream: Upstream<'_>,
    grad: Option<&mut [u8]>,
) -> Result<LossOutput> {
    let p = prepare(logits, targets, opts, upstream)?;
    let job = Job::new(logits.dtype(), logits.rows(), logits.vocab(), opts, &p);
    let rows = match grad {
        None => job.run(ReadOnly(logits.bytes())),
        Some(g) => {
            if g.len() != logits.bytes().len() {
                return Err(Error::Shape(format!(
                    "the gradient buffer has {} bytes; {} x {} {} logits need {}",
                    g.len(),
                    logits.rows(),
                    logits.vocab(),
                    logits.dtype(),
                    logits.bytes().len()
                )));
            }
            job.run(Separate { src: logits.bytes(), dst: g })
        }
    };
    Ok(job.output(rows))
}

/// The same, the gradient written over the logits themselves (`logits`: row-major bytes of
/// `dtype`, `vocab` per row). Gives the same bits as [`loss_and_grad`] with a separate buffer.
///
/// # Errors
/// As [`prepare`]; [`Error::Shape`] when `vocab` is 0 or `logits` is not a whole number of rows.
pub fn loss_and_grad_in_place(
    logits: &mut [u8],
    dtype: Dtype,
    vocab: usize,
    targets: Targets<'_>,
    opts: &LossOptions<'_>,
    upstream: Upstream<'_>,
) -> Result<LossOutput> {
    let row_bytes = vocab
        .checked_mul(dtype.size())
        .ok_or_else(|| Error::Shape(format!("a row of {vocab} {dtype} logits overflows")))?;
    if row_bytes > 0 && !logits.len().is_multiple_of(row_bytes) {
        return Err(Error::Shape(format!(
            "{} bytes is not a whole number of rows of {vocab} {dtype} logits ({row_bytes} bytes each)",
            logits.len()
        )));
    }
    let rows = logits.len().checked_div(row_bytes).unwrap_or(0);
    let p = prepare(Logits::from_bytes(logits, dtype, rows, vocab)?, targets, opts, upstream)?;
    let job = Job::new(dtype, rows, vocab, opts, &p);
    let rows = job.run(InPlace(logits));
    Ok(job.output(rows))
}

// ---------------------------------------------------------------------------------------------
// Buffers: where a pass reads the logits and writes the gradient.
// ---------------------------------------------------------------------------------------------

/// The logits of some rows (or part of a row), and where their gradient goes.
trait RowBuf: Send + Sized {
    /// Whether there is a gradient to write.
    const WRITES: bool;
    /// The logits.
    fn src(&self) -> &[u8];
    /// The gradient, as long as [`RowBuf::src`] (empty when nothing is written).
    fn dst(&mut self) -> &mut [u8];
    /// Two buffers, the first `mid` bytes and the rest.
    fn split_at(self, mid: usize) -> (Self, Self);
}

/// No gradient: the loss only.
struct ReadOnly<'a>(&'a [u8]);
/// The gradient written over the logits.
struct InPlace<'a>(&'a mut [u8]);
/// The gradient written to a buffer of its own.
struct Separate<'a> {
    src: &'a [u8],
    dst: &'a mut [u8],
}

impl RowBuf for ReadOnly<'_> {
    const WRITES: bool = false;
    fn src(&self) -> &[u8] {
        self.0
    }
    fn dst(&mut self) -> &mut [u8] {
        &mut []
    }
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (a, b) = self.0.split_at(mid);
        (ReadOnly(a), ReadOnly(b))
    }
}

impl RowBuf for InPlace<'_> {
    const WRITES: bool = true;
    fn src(&self) -> &[u8] {
        self.0
    }
    fn dst(&mut self) -> &mut [u8] {
        self.0
    }
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (a, b) = self.0.split_at_mut(mid);
        (InPlace(a), InPlace(b))
    }
}

impl RowBuf for Separate<'_> {
    const WRITES: bool = true;
    fn src(&self) -> &[u8] {
        self.src
    }
    fn dst(&mut self) -> &mut [u8] {
        self.dst
    }
    fn split_at(self, mid: usize) -> (Self, Self) {
        let (a, b) = self.src.split_at(mid);
        let (c, d) = self.dst.split_at_mut(mid);
        (Separate { src: a, dst: c }, Separate { src: b, dst: d })
    }
}

/// `buf` cut into pieces of the given byte lengths (their sum is the buffer's length).
fn cut<B: RowBuf>(mut buf: B, lens: impl Iterator<Item = usize>) -> Vec<B> {
    let mut out = Vec::new();
    for len in lens {
        let (head, rest) = buf.split_at(len);
        out.push(head);
        buf = rest;
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The job: per-call constants, the row scalars, and the threading.
// ---------------------------------------------------------------------------------------------

/// Which passes a row takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// No soft-cap, no smoothing: the forward's statistics pass ([`crate::cpu`]) and a gradient
    /// pass of one `exp` and one multiply per logit. Class weights and the z-loss only change
    /// per-row scalars, so they take this path too.
    Fast,
    /// A soft-cap and/or label smoothing (with or without class weights in the smoothing sum).
    Options { cap: bool, smooth: bool, weighted: bool },
}

/// The soft-cap `cap` and `1 / cap`.
#[derive(Debug, Clone, Copy)]
struct Cap {
    cap: f32,
    inv: f32,
}

/// One row's statistics: max of the (soft-capped) logits, `Σ exp(z − m)`, and for smoothing
/// `Σ w_j (m − z_j)`; whether the row is broken (a NaN, or a `+inf` without a soft-cap).
#[derive(Debug, Clone, Copy)]
struct Stats {
    m: f32,
    s: f64,
    a: f64,
    bad: bool,
}

/// Pass 1 of the options path over a run: the max of the raw logits (NaN skipped), NaN and
/// `+inf` seen.
#[derive(Debug, Clone, Copy)]
struct Max {
    m: f32,
    nan: bool,
    pinf: bool,
}

impl Max {
    const EMPTY: Max = Max { m: f32::NEG_INFINITY, nan: false, pinf: false };
    fn merge(self, o: Max) -> Max {
        Max { m: if o.m > self.m { o.m } else { self.m }, nan: self.nan | o.nan, pinf: self.pinf | o.pinf }
    }
}

/// What the gradient pass writes for one row.
#[derive(Debug, Clone, Copy)]
enum RowGrad {
    /// An ignored row.
    Zero,
    /// A broken row (not ignored).
    Nan,
    /// `out_j = (e^(z_j − m) · sp − sw · w_j) · (1 − t_j²)`, the target's element then replaced by
    /// `at_target` (computed in f64 by [`Job::finish`]).
    Scaled(Coef),
}

#[derive(Debug, Clone, Copy)]
struct Coef {
    /// The row's max (of the soft-capped logits).
    m: f32,
    /// `g · coef / Σ exp(z − m)`: the softmax term's factor.
    sp: f32,
    /// `g · ε / V`: the smoothing term's factor.
    sw: f32,
    /// The target class, and its gradient.
    target: usize,
    at_target: f32,
}

/// Everything a call computes from, checked.
struct Job<'a> {
    isa: Isa,
    dtype: Dtype,
    rows: usize,
    vocab: usize,
    p: &'a Prepared,
    reduction: LossReduction,
    weight: Option<&'a [f32]>,
    eps: f64,
    z_loss: f64,
    cap: Option<Cap>,
    variant: Variant,
}

impl<'a> Job<'a> {
    fn new(dtype: Dtype, rows: usize, vocab: usize, opts: &LossOptions<'a>, p: &'a Prepared) -> Job<'a> {
        let eps = f64::from(opts.label_smoothing);
        let variant = if opts.softcap.is_none() && eps == 0.0 {
            Variant::Fast
        } else {
            Variant::Options { cap: opts.softcap.is_some(), smooth: eps > 0.0, weighted: opts.weight.is_some() }
        };
        Job {
            isa: Isa::detect(),
            dtype,
            rows,
            vocab,
            p,
            reduction: opts.reduction,
            weight: opts.weight,
            eps,
            z_loss: f64::from(opts.z_loss),
            cap: opts.softcap.map(|c| Cap { cap: c, inv: 1.0 / c }),
            variant,
        }
    }

    fn output(&self, rows: Vec<TrainRow>) -> LossOutput {
        LossOutput { loss: reduce(&rows, self.reduction, self.p.weight_sum), rows, weight_sum: self.p.weight_sum }
    }

    /// `x` soft-capped exactly as the vector passes do it (the same f32 operations on one lane),
    /// so that the max of the soft-capped row is the soft-capped max (tanh is monotonic) and the
    /// target's `z` is the one the passes saw.
    fn capped(&self, x: f32) -> f32 {
        match self.cap {
            Some(c) => softcap16([x; LANES], c).0[0],
            None => x,
        }
    }

    /// Statistics from pass 1 (merged over the row): the max of `z`, and whether the row is broken.
    fn pass1_stats(&self, mx: Max) -> (f32, bool) {
        // With a soft-cap, ±inf become ±cap; only NaN breaks a row.
        (self.capped(mx.m), mx.nan || (self.cap.is_none() && mx.pinf))
    }

    /// Row `r`'s loss, lse and gradient coefficients from its statistics and raw target logit.
    fn finish(&self, r: usize, st: Stats, x_t: Option<f32>) -> (TrainRow, RowGrad) {
        let broken = st.bad || st.s == 0.0 || st.m == f32::NEG_INFINITY || st.s.is_nan();
        let m = f64::from(st.m);
        let ls = st.s.ln();
        let lse = if broken { f64::NAN } else { m + ls };
        let Some(x_t) = x_t else {
            return (TrainRow { loss: 0.0, lse: lse as f32 }, RowGrad::Zero);
        };
        if broken {
            return (TrainRow { loss: f32::NAN, lse: f32::NAN }, RowGrad::Nan);
        }
        let t = self.p.targets[r] as usize;
        let x_t = f64::from(x_t);
        // The soft-capped target logit as the passes computed it; `1 − tanh²` in f64.
        let (z_t, dcap) = match self.cap {
            Some(c) => {
                let th = (x_t / f64::from(c.cap)).tanh();
                (f64::from(self.capped(x_t as f32)), (1.0 - th) * (1.0 + th))
            }
            None => (x_t, 1.0),
        };
        let (eps, c, v) = (self.eps, self.z_loss, self.vocab as f64);
        let w_t = self.weight.map_or(1.0, |w| f64::from(w[t]));
        let nll = (m - z_t) + ls;
        let smooth = if eps > 0.0 { self.p.weight_total * ls + st.a } else { 0.0 };
        let loss = (1.0 - eps) * w_t * nll + eps / v * smooth + c * lse * lse;
        let coef = (1.0 - eps) * w_t + eps / v * self.p.weight_total + 2.0 * c * lse;
        let g = f64::from(self.p.scale[r]);
        let p_t = (z_t - m).exp() / st.s;
        let at_target = g * ((p_t * coef - eps / v * w_t - (1.0 - eps) * w_t) * dcap);
        let coef = Coef {
            m: st.m,
            sp: (g * coef / st.s) as f32,
            sw: (g * eps / v) as f32,
            target: t,
            at_target: at_target as f32,
        };
        (TrainRow { loss: loss as f32, lse: lse as f32 }, RowGrad::Scaled(coef))
    }

    /// Row `r`'s raw target logit (`None` for an ignored row), from the bytes of that row.
    fn target_logit(&self, r: usize, row: &[u8]) -> Option<f32> {
        let t = self.p.targets[r];
        (t != IGNORED_TARGET).then(|| self.dtype.get(row, t as usize))
    }

    /// Every row, on every thread.
    fn run<B: RowBuf>(&self, buf: B) -> Vec<TrainRow> {
        let mut out = vec![TrainRow::default(); self.rows];
        if self.rows == 0 {
            return out;
        }
        let threads = rayon::current_num_threads();
        let rb = self.vocab * self.dtype.size();
        if self.rows >= threads {
            // Blocks of consecutive rows (so that each row's statistics pass can prefetch the
            // next row), several per thread for balance.
            let per = self.rows.div_ceil(threads * 16);
            let blocks = cut(buf, (0..self.rows).step_by(per).map(|r0| (self.rows - r0).min(per) * rb));
            blocks.into_par_iter().zip(out.par_chunks_mut(per)).enumerate().for_each(|(i, (b, o))| {
                dispatch(self.isa, self.dtype, RowsVisit { job: self, buf: b, first: i * per, out: o })
            });
        } else {
            self.run_parts(buf, &mut out, threads);
        }
        out
    }

    /// Rows fewer than threads: each row cut into parts, statistics over every part at once,
    /// merged per row, then the gradient of every part at once.
    fn run_parts<B: RowBuf>(&self, buf: B, out: &mut [TrainRow], threads: usize) {
        let (rows, vocab, es) = (self.rows, self.vocab, self.dtype.size());
        let plan = PartPlan::new(vocab, vocab.div_ceil(PART).max(threads.div_ceil(rows)));
        let (parts, len) = (plan.parts, plan.len);
        let range = |u: usize| {
            let (r, p) = (u / parts, u % parts);
            let lo = p * len;
            (r, lo, (lo + len).min(vocab))
        };
        let rb = vocab * es;
        let src = buf.src();
        let stats: Vec<Stats> = match self.variant {
            Variant::Fast => {
                let partials: Vec<Partial> = (0..rows * parts)
                    .into_par_iter()
                    .map(|u| {
                        let (r, lo, hi) = range(u);
                        let at = r * rb;
                        let ahead_at = at + hi * es;
                        let ahead = &src[ahead_at..(ahead_at + (hi - lo) * es).min(src.len())];
                        scan(self.isa, self.dtype, &src[at + lo * es..at + hi * es], ahead)
                    })
                    .collect();
                partials
                    .chunks(parts)
                    .map(|ps| {
                        let st = ps.iter().skip(1).fold(ps[0], |a, b| a.merge(b));
                        Stats { m: st.m, s: st.s, a: 0.0, bad: st.bad }
                    })
                    .collect()
            }
            Variant::Options { .. } => {
                let maxes: Vec<Max> = (0..rows * parts)
                    .into_par_iter()
                    .map(|u| {
                        let (r, lo, hi) = range(u);
                        dispatch(self.isa, self.dtype, MaxVisit { bytes: &src[r * rb + lo * es..r * rb + hi * es] })
                    })
                    .collect();
                let firsts: Vec<(f32, bool)> = maxes
                    .chunks(parts)
                    .map(|ms| self.pass1_stats(ms.iter().fold(Max::EMPTY, |a, &b| a.merge(b))))
                    .collect();
                let sums: Vec<(f64, f64)> = (0..rows * parts)
                    .into_par_iter()
                    .map(|u| {
                        let (r, lo, hi) = range(u);
                        let (m, bad) = firsts[r];
                        if bad {
                            return (0.0, 0.0);
                        }
                        let bytes = &src[r * rb + lo * es..r * rb + hi * es];
                        dispatch(self.isa, self.dtype, SumVisit { job: self, bytes, j0: lo, m })
                    })
                    .collect();
                sums.chunks(parts)
                    .zip(&firsts)
                    .map(|(ss, &(m, bad))| {
                        let (s, a) = ss.iter().fold((0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1));
                        Stats { m, s, a, bad }
                    })
                    .collect()
            }
        };
        let grads: Vec<RowGrad> = stats
            .iter()
            .enumerate()
            .zip(out.iter_mut())
            .map(|((r, &st), o)| {
                let (row, grad) = self.finish(r, st, self.target_logit(r, &src[r * rb..(r + 1) * rb]));
                *o = row;
                grad
            })
            .collect();
        if B::WRITES {
            let pieces = cut(buf, (0..rows * parts).map(|u| (range(u).2 - range(u).1) * es));
            pieces.into_par_iter().enumerate().for_each(|(u, piece)| {
                let (r, lo, hi) = range(u);
                dispatch(self.isa, self.dtype, GradVisit { job: self, buf: piece, j0: lo, n: hi - lo, grad: grads[r] })
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dispatch: the same generic passes compiled for each instruction set.
// ---------------------------------------------------------------------------------------------

/// A dtype's 16-lane loader and storer and an instruction set's `exp`, plus scalar ones for
/// tails. Implemented by zero-sized types, one per (instruction set, dtype), with
/// `#[inline(always)]` methods: inlined into the `#[target_feature]` function that [`dispatch`]
/// calls, the whole pass is compiled for that instruction set (closures were measured not to be
/// inlined, at half the speed).
trait Kern: Copy {
    /// Bytes per logit.
    const N: usize;
    fn load(b: &[u8]) -> [f32; LANES];
    fn store(b: &mut [u8], v: [f32; LANES]);
    /// `exp` for arguments <= 0 (-inf included).
    fn exp(x: [f32; LANES]) -> [f32; LANES];
    fn get(b: &[u8]) -> f32;
    fn put(b: &mut [u8], v: f32);
    /// `exp` where only lanes with `x > FLUSH` matter (the caller masks the others out).
    #[inline(always)]
    fn exp_masked(x: [f32; LANES]) -> [f32; LANES] {
        Self::exp(x)
    }
    /// `store` of values known not to be NaN.
    #[inline(always)]
    fn store_finite(b: &mut [u8], v: [f32; LANES]) {
        Self::store(b, v)
    }
    /// The fast variant's gradient `e^(x − m) · sp` (flushed below [`FLUSH`]) of the leading
    /// logits of the `n` at byte `at`, written finite, where the type has a faster way than
    /// [`grad_pass`]'s; returns how many it did (a multiple of [`LANES`]).
    #[inline(always)]
    fn grad_fast<B: RowBuf>(_buf: &mut B, _at: usize, _n: usize, _m: f32, _sp: f32, _ahead: Ahead) -> usize {
        0
    }
    /// Pass 1 of the stashed fast variant over the first `full` vectors, where the type has a
    /// faster way than [`max_pass`]: the max and whether a NaN or `+inf` occurs.
    #[inline(always)]
    fn max_fast(_bytes: &[u8], _full: usize) -> Option<(f32, bool)> {
        None
    }
    /// Pass 2 of the stashed fast variant over the leading logits, where the type has a faster
    /// way than [`sum_stash`]'s: `Σ e^(x − m)` (flushed below [`FLUSH`]), each term kept in
    /// `stash` in an order of its own that [`Kern::grad_stash_fast`] reads back; returns how many
    /// logits it did (a multiple of [`LANES`]) and their sum. Implement both or neither: the
    /// generic passes read the stash in natural order.
    #[inline(always)]
    fn sum_stash_fast(_bytes: &[u8], _m: f32, _stash: &mut [f32]) -> (usize, f64) {
        (0, 0.0)
    }
    /// Pass 3 of the stashed fast variant over the logits [`Kern::sum_stash_fast`] did:
    /// `stash · sp` written as the dtype (`finite`: no NaN among them).
    #[inline(always)]
    fn grad_stash_fast<B: RowBuf>(
        _buf: &mut B,
        _at: usize,
        _n: usize,
        _stash: &[f32],
        _sp: f32,
        _finite: bool,
        _ahead: Ahead,
    ) -> usize {
        0
    }
}

/// The next row, to prefetch while the gradient pass computes from cache (a raw address: in place,
/// the next row is part of the buffer being written; prefetching reads nothing architecturally).
#[derive(Clone, Copy)]
struct Ahead {
    ptr: *const u8,
    len: usize,
}

impl Ahead {
    const NONE: Ahead = Ahead { ptr: std::ptr::null(), len: 0 };

    /// `bytes[at..at + len]` of a buffer, clipped to it.
    fn of(bytes: &[u8], at: usize, len: usize) -> Ahead {
        let at = at.min(bytes.len());
        Ahead { ptr: bytes[at..].as_ptr(), len: len.min(bytes.len() - at) }
    }

    /// Hints that byte `at` will be read soon (nothing past the end).
    #[inline(always)]
    fn prefetch(&self, at: usize) {
        #[cfg(target_arch = "x86_64")]
        if at < self.len {
            // SAFETY: `at` is inside the slice `ptr` came from; a prefetch neither faults nor has
            // an architectural effect (SSE is baseline on x86-64).
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(self.ptr.add(at).cast()) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = at;
    }
}

/// Defines a [`Kern`] from a loader, a storer and an `exp` (expressions of `b`, `v`, `x`).
macro_rules! kern {
    ($(#[$doc:meta])* $name:ident, $n:expr, |$b:ident| $load:expr, |$sb:ident, $v:ident| $store:expr,
     |$x:ident| $exp:expr, $get:expr, $put:expr $(, $extra:item)*) => {
        $(#[$doc])*
        #[derive(Clone, Copy)]
        struct $name;
        impl Kern for $name {
            const N: usize = $n;
            #[inline(always)]
            fn load($b: &[u8]) -> [f32; LANES] {
                $load
            }
            #[inline(always)]
            fn store($sb: &mut [u8], $v: [f32; LANES]) {
                $store
            }
            #[inline(always)]
            fn exp($x: [f32; LANES]) -> [f32; LANES] {
                $exp
            }
            #[inline(always)]
            fn get(b: &[u8]) -> f32 {
                $get(b)
            }
            #[inline(always)]
            fn put(b: &mut [u8], v: f32) {
                $put(b, v)
            }
            $($extra)*
        }
    };
}

kern!(F32Portable, 4, |b| load_f32(b), |b, v| store_f32(b, v), |x| exp16::<PORTABLE_FMA>(x), get_f32, put_f32);
kern!(Bf16Portable, 2, |b| load_bf16(b), |b, v| store_bf16(b, v), |x| exp16::<PORTABLE_FMA>(x), get_bf16, put_bf16);
kern!(F16Portable, 2, |b| load_f16(b), |b, v| store_f16(b, v), |x| exp16::<PORTABLE_FMA>(x), get_f16, put_f16);

#[cfg(target_arch = "x86_64")]
mod x86_kern {
    use super::*;
    use crate::cpu::x86::*;

    // SAFETY (every `unsafe` below): these types are used only inside `visit_avx2` and
    // `visit_avx512`, which run only where `Isa::detect` found their features; loaders and
    // storers are given slices of 16 elements.
    kern!(F32Avx2, 4, |b| load_f32(b), |b, v| store_f32(b, v), |x| exp16::<true>(x), get_f32, put_f32);
    kern!(
        Bf16Avx2,
        2,
        |b| unsafe { bf16x16_avx2(b) },
        |b, v| store_bf16(b, v),
        |x| exp16::<true>(x),
        get_bf16,
        put_bf16
    );
    kern!(
        F16Avx2,
        2,
        |b| unsafe { f16x16_avx2(b) },
        |b, v| unsafe { super::x86_store::f16x16_avx2(b, v) },
        |x| exp16::<true>(x),
        get_f16,
        put_f16
    );
    kern!(
        F32Avx512,
        4,
        |b| load_f32(b),
        |b, v| store_f32(b, v),
        |x| unsafe { exp16_avx512::<true>(x) },
        get_f32,
        put_f32,
        // The caller masks lanes at or below FLUSH, so the clamp can go.
        #[inline(always)]
        fn exp_masked(x: [f32; LANES]) -> [f32; LANES] {
            unsafe { exp16_avx512::<false>(x) }
        }
    );
    kern!(
        Bf16Avx512,
        2,
        |b| unsafe { bf16x16_avx512(b) },
        |b, v| store_bf16(b, v),
        |x| unsafe { exp16_avx512::<true>(x) },
        get_bf16,
        put_bf16,
        #[inline(always)]
        fn exp_masked(x: [f32; LANES]) -> [f32; LANES] {
            unsafe { exp16_avx512::<false>(x) }
        },
        #[inline(always)]
        fn store_finite(b: &mut [u8], v: [f32; LANES]) {
            store_bf16_finite(b, v)
        },
        #[inline(always)]
        fn grad_fast<B: RowBuf>(buf: &mut B, at: usize, n: usize, m: f32, sp: f32, ahead: Ahead) -> usize {
            unsafe { bf16_grad_pairs_avx512(buf, at, n / 32, m, sp, ahead) };
            n / 32 * 32
        },
        #[inline(always)]
        fn max_fast(bytes: &[u8], full: usize) -> Option<(f32, bool)> {
            let p = unsafe { half_max_pass_avx512::<BF16_INF>(bytes, full, |p| f32::from_bits(u32::from(p) << 16)) };
            Some((p.max, p.bad))
        },
        #[inline(always)]
        fn sum_stash_fast(bytes: &[u8], m: f32, stash: &mut [f32]) -> (usize, f64) {
            let pairs = bytes.len() / 64;
            (pairs * 32, unsafe { bf16_sum_stash_pairs_avx512(bytes, pairs, m, stash) })
        },
        #[inline(always)]
        fn grad_stash_fast<B: RowBuf>(
            buf: &mut B,
            at: usize,
            n: usize,
            stash: &[f32],
            sp: f32,
            finite: bool,
            ahead: Ahead,
        ) -> usize {
            let pairs = n / 32;
            if finite {
                unsafe { bf16_grad_stash_pairs_avx512::<true, B>(buf, at, pairs, stash, sp, ahead) }
            } else {
                unsafe { bf16_grad_stash_pairs_avx512::<false, B>(buf, at, pairs, stash, sp, ahead) }
            }
            pairs * 32
        }
    );
    kern!(
        F16Avx512,
        2,
        |b| unsafe { f16x16_avx512(b) },
        |b, v| unsafe { super::x86_store::f16x16_avx512(b, v) },
        |x| unsafe { exp16_avx512::<true>(x) },
        get_f16,
        put_f16,
        #[inline(always)]
        fn exp_masked(x: [f32; LANES]) -> [f32; LANES] {
            unsafe { exp16_avx512::<false>(x) }
        },
        #[inline(always)]
        fn max_fast(bytes: &[u8], full: usize) -> Option<(f32, bool)> {
            let p = unsafe { half_max_pass_avx512::<F16_INF>(bytes, full, crate::cpu::f16_to_f32) };
            Some((p.max, p.bad))
        }
    );

    /// Pass 2 of the stashed fast variant for bf16 on AVX-512 over `pairs` × 32 logits: read as
    /// even and odd lanes (as [`bf16_grad_pairs_avx512`]), each pair's 32 terms stashed as the
    /// 16 even ones then the 16 odd ones; f32 lanes within blocks, f64 across.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn bf16_sum_stash_pairs_avx512(bytes: &[u8], pairs: usize, m: f32, stash: &mut [f32]) -> f64 {
        use std::arch::x86_64::*;
        let (mm, flush) = (_mm512_set1_ps(m), _mm512_set1_ps(FLUSH));
        let high_halves = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let term = |x: __m512| {
            let d = _mm512_sub_ps(x, mm);
            _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(d, flush), unsafe { exp_avx512::<false>(d) })
        };
        let mut total = 0f64;
        for i0 in (0..pairs).step_by(BLOCK / 2) {
            let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            for i in i0..(i0 + BLOCK / 2).min(pairs) {
                let v = _mm512_loadu_si512(bytes[i * 64..i * 64 + 64].as_ptr().cast());
                let even = term(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)));
                let odd = term(_mm512_castsi512_ps(_mm512_and_si512(v, high_halves)));
                s0 = _mm512_add_ps(s0, even);
                s1 = _mm512_add_ps(s1, odd);
                let out = &mut stash[i * 32..i * 32 + 32];
                _mm512_storeu_ps(out.as_mut_ptr(), even);
                _mm512_storeu_ps(out[16..].as_mut_ptr(), odd);
            }
            let s: [f32; 16] = std::mem::transmute(_mm512_add_ps(s0, s1));
            total += s.iter().map(|&x| f64::from(x)).sum::<f64>();
        }
        total
    }

    /// Pass 3 of the stashed fast variant for bf16 on AVX-512 over `pairs` × 32 logits: the
    /// stashed terms times `sp`, rounded to bf16 and blended back into place (as
    /// [`bf16_grad_pairs_avx512`]); NaN kept NaN unless `FINITE`.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn bf16_grad_stash_pairs_avx512<const FINITE: bool, B: RowBuf>(
        buf: &mut B,
        at: usize,
        pairs: usize,
        stash: &[f32],
        sp: f32,
        ahead: Ahead,
    ) {
        use std::arch::x86_64::*;
        let s = _mm512_set1_ps(sp);
        let (half, one, quiet) = (_mm512_set1_epi32(0x7fff), _mm512_set1_epi32(1), _mm512_set1_epi32(0x0040_0000));
        let round = |g: __m512| {
            let x = _mm512_castps_si512(g);
            let r = _mm512_add_epi32(_mm512_add_epi32(x, half), _mm512_and_si512(_mm512_srli_epi32::<16>(x), one));
            if FINITE {
                r
            } else {
                // NaN: its own high half, quietened (as `half::bf16::from_f32`).
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(g, g);
                _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(x, quiet))
            }
        };
        for i in 0..pairs {
            ahead.prefetch(i * 64);
            let e = &stash[i * 32..i * 32 + 32];
            // Not finite: flushed (zero) terms stay exactly 0, as in the generic code.
            let scaled = |t: __m512| {
                let g = _mm512_mul_ps(t, s);
                if FINITE {
                    g
                } else {
                    _mm512_maskz_mov_ps(_mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(t, _mm512_setzero_ps()), g)
                }
            };
            let even = scaled(_mm512_loadu_ps(e.as_ptr()));
            let odd = scaled(_mm512_loadu_ps(e[16..].as_ptr()));
            let out = _mm512_mask_blend_epi16(0xaaaa_aaaa, _mm512_srli_epi32::<16>(round(even)), round(odd));
            let lo = at + i * 64;
            _mm512_storeu_si512(buf.dst()[lo..lo + 64].as_mut_ptr().cast(), out);
        }
    }

    /// The fast variant's gradient of `pairs` × 32 bf16 logits at byte `at` on AVX-512: one
    /// 64-byte load gives 32 logits as two f32 vectors, the even-indexed ones (shifted up 16) and
    /// the odd-indexed ones (masked) — as the forward's sum pass reads them — and the two results,
    /// rounded to bf16 in integer lanes, go back in their places with one 16-bit blend: no
    /// widening or narrowing shuffles. Values are finite (no NaN check) and the exp's clamp is
    /// replaced by the mask of lanes above [`FLUSH`].
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn bf16_grad_pairs_avx512<B: RowBuf>(buf: &mut B, at: usize, pairs: usize, m: f32, sp: f32, ahead: Ahead) {
        use std::arch::x86_64::*;
        let (mm, s, flush) = (_mm512_set1_ps(m), _mm512_set1_ps(sp), _mm512_set1_ps(FLUSH));
        let high_halves = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let (half, one) = (_mm512_set1_epi32(0x7fff), _mm512_set1_epi32(1));
        // Round to nearest even, the result in the high half: x + 0x7fff + ((x >> 16) & 1).
        let round = |g: __m512| {
            let x = _mm512_castps_si512(g);
            _mm512_add_epi32(_mm512_add_epi32(x, half), _mm512_and_si512(_mm512_srli_epi32::<16>(x), one))
        };
        let grad = |x: __m512| {
            let d = _mm512_sub_ps(x, mm);
            let keep = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(d, flush);
            _mm512_maskz_mul_ps(keep, unsafe { exp_avx512::<false>(d) }, s)
        };
        for i in 0..pairs {
            let lo = at + i * 64;
            ahead.prefetch(i * 64);
            let v = _mm512_loadu_si512(buf.src()[lo..lo + 64].as_ptr().cast());
            let even = grad(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)));
            let odd = grad(_mm512_castsi512_ps(_mm512_and_si512(v, high_halves)));
            // Even logits in the low halves, odd ones in the high halves.
            let out = _mm512_mask_blend_epi16(0xaaaa_aaaa, _mm512_srli_epi32::<16>(round(even)), round(odd));
            _mm512_storeu_si512(buf.dst()[lo..lo + 64].as_mut_ptr().cast(), out);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(super) unsafe fn visit_avx512<V: Visit>(dtype: Dtype, v: V) -> V::Out {
        match dtype {
            Dtype::F32 => v.visit(F32Avx512),
            Dtype::BF16 => v.visit(Bf16Avx512),
            Dtype::F16 => v.visit(F16Avx512),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn visit_avx2<V: Visit>(dtype: Dtype, v: V) -> V::Out {
        match dtype {
            Dtype::F32 => v.visit(F32Avx2),
            Dtype::BF16 => v.visit(Bf16Avx2),
            Dtype::F16 => v.visit(F16Avx2),
        }
    }
}

/// A piece of work, run through [`dispatch`] so that its passes are compiled for each instruction
/// set (the `visit` bodies are `#[inline(always)]` into the `#[target_feature]` functions).
trait Visit {
    type Out;
    fn visit<K: Kern>(self, k: K) -> Self::Out;
}

fn dispatch<V: Visit>(isa: Isa, dtype: Dtype, v: V) -> V::Out {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` checked these features on this CPU.
        Isa::Avx512 => unsafe { x86_kern::visit_avx512(dtype, v) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86_kern::visit_avx2(dtype, v) },
        _ => match dtype {
            Dtype::F32 => v.visit(F32Portable),
            Dtype::BF16 => v.visit(Bf16Portable),
            Dtype::F16 => v.visit(F16Portable),
        },
    }
}

/// A block of whole rows: statistics, loss, then the gradient of each row while it is in cache.
struct RowsVisit<'j, 'a, B> {
    job: &'j Job<'a>,
    buf: B,
    first: usize,
    out: &'j mut [TrainRow],
}

thread_local! {
    /// Pass 2's terms of the row being worked on, for pass 3 (one per thread, kept between calls).
    static STASH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl<B: RowBuf> Visit for RowsVisit<'_, '_, B> {
    type Out = ();
    #[inline(always)]
    fn visit<K: Kern>(self, k: K) {
        // 16-bit logits are bound by computation: keeping pass 2's terms saves an `exp` per logit
        // (measured 10% faster at 2048 x 128256 bf16 and f16). f32 is bound by memory, and the stash,
        // as large as the row again, made it 15% slower there.
        if B::WRITES && self.job.variant == Variant::Fast && K::N == 2 {
            // Taken out of the thread-local and put back, rather than used inside `with`: code in
            // that closure is compiled outside this function's instruction set (measured 4x slower).
            let mut stash = STASH.with_borrow_mut(std::mem::take);
            self.stashed(&mut stash, k);
            STASH.with_borrow_mut(|s| *s = stash);
        } else {
            self.plain(k);
        }
    }
}

impl<B: RowBuf> RowsVisit<'_, '_, B> {
    /// The fast variant with a gradient: pass 1 (max), pass 2 (`Σ e^(x − m)`, each term kept in
    /// `stash`), pass 3 (the kept terms times the row's factor): one `exp` per logit, not two.
    #[inline(always)]
    fn stashed<K: Kern>(self, stash: &mut Vec<f32>, k: K) {
        let RowsVisit { job, mut buf, first, out } = self;
        let vocab = job.vocab;
        let rb = vocab * K::N;
        stash.resize(vocab.next_multiple_of(2 * LANES), 0.0);
        for (i, o) in out.iter_mut().enumerate() {
            let r = first + i;
            let at = i * rb;
            let row = &buf.src()[at..at + rb];
            let (m, bad) = fast_max(row, k);
            let s = if bad || m == f32::NEG_INFINITY { 0.0 } else { sum_stash(row, m, stash, k) };
            let (row_out, grad) = job.finish(r, Stats { m, s, a: 0.0, bad }, job.target_logit(r, row));
            *o = row_out;
            let ahead = Ahead::of(buf.src(), at + rb, rb);
            match grad {
                RowGrad::Scaled(c) => {
                    grad_stash(&mut buf, at, vocab, stash, c.sp, ahead, k);
                    let b = at + c.target * K::N;
                    K::put(&mut buf.dst()[b..b + K::N], c.at_target);
                }
                _ => write_grad(job, &mut buf, at, 0, vocab, grad, ahead, k),
            }
        }
    }

    /// Every other case: statistics, loss, then the gradient pass when there is one.
    #[inline(always)]
    fn plain<K: Kern>(self, k: K) {
        let RowsVisit { job, mut buf, first, out } = self;
        let (vocab, isa, dtype) = (job.vocab, job.isa, job.dtype);
        let rb = vocab * K::N;
        let plan = PartPlan::new(vocab, vocab.div_ceil(PART));
        for (i, o) in out.iter_mut().enumerate() {
            let r = first + i;
            let at = i * rb;
            let src = buf.src();
            let row = &src[at..at + rb];
            let st = match job.variant {
                Variant::Fast => {
                    // The forward's two passes per part of at most 64k logits, each part
                    // prefetching the next (the next row's first part after the last).
                    let mut acc: Option<Partial> = None;
                    for p in 0..plan.parts {
                        let (lo, hi) = (p * plan.len * K::N, ((p + 1) * plan.len).min(vocab) * K::N);
                        let ahead = &src[(at + hi).min(src.len())..(at + 2 * hi - lo).min(src.len())];
                        let st = scan(isa, dtype, &row[lo..hi], ahead);
                        acc = Some(acc.map_or(st, |a| a.merge(&st)));
                    }
                    let st = acc.unwrap_or(Partial { m: f32::NEG_INFINITY, s: 0.0, idx: None, bad: false });
                    Stats { m: st.m, s: st.s, a: 0.0, bad: st.bad }
                }
                Variant::Options { .. } => {
                    let (m, bad) = job.pass1_stats(max_pass(row, k));
                    let (s, a) = if bad { (0.0, 0.0) } else { sums(job, row, 0, m, k) };
                    Stats { m, s, a, bad }
                }
            };
            let (row_out, grad) = job.finish(r, st, job.target_logit(r, row));
            *o = row_out;
            if B::WRITES {
                let ahead = Ahead::of(buf.src(), at + rb, rb);
                write_grad(job, &mut buf, at, 0, vocab, grad, ahead, k);
            }
        }
    }
}

/// Pass 1 of the options path over a part.
struct MaxVisit<'a> {
    bytes: &'a [u8],
}

impl Visit for MaxVisit<'_> {
    type Out = Max;
    #[inline(always)]
    fn visit<K: Kern>(self, k: K) -> Max {
        max_pass(self.bytes, k)
    }
}

/// Pass 2 of the options path over a part starting at class `j0`, given the row's max.
struct SumVisit<'j, 'a> {
    job: &'j Job<'a>,
    bytes: &'j [u8],
    j0: usize,
    m: f32,
}

impl Visit for SumVisit<'_, '_> {
    type Out = (f64, f64);
    #[inline(always)]
    fn visit<K: Kern>(self, k: K) -> (f64, f64) {
        sums(self.job, self.bytes, self.j0, self.m, k)
    }
}

/// The gradient of `n` logits starting at class `j0` of a row (the whole of `buf`).
struct GradVisit<'j, 'a, B> {
    job: &'j Job<'a>,
    buf: B,
    j0: usize,
    n: usize,
    grad: RowGrad,
}

impl<B: RowBuf> Visit for GradVisit<'_, '_, B> {
    type Out = ();
    #[inline(always)]
    fn visit<K: Kern>(self, k: K) {
        let mut buf = self.buf;
        write_grad(self.job, &mut buf, 0, self.j0, self.n, self.grad, Ahead::NONE, k);
    }
}

// ---------------------------------------------------------------------------------------------
// The passes.
// ---------------------------------------------------------------------------------------------

/// Pass 1 of the stashed fast variant: the max, and whether a NaN or `+inf` occurs.
#[inline(always)]
fn fast_max<K: Kern>(bytes: &[u8], k: K) -> (f32, bool) {
    let n = bytes.len() / K::N;
    let full = n / LANES;
    let (mut m, mut bad) = match K::max_fast(bytes, full) {
        Some(r) => r,
        None => {
            let mx = max_pass(&bytes[..full * LANES * K::N], k);
            (mx.m, mx.nan | mx.pinf)
        }
    };
    for j in full * LANES..n {
        let v = K::get(&bytes[j * K::N..j * K::N + K::N]);
        m = if v > m { v } else { m };
        bad |= v.is_nan() | (v == f32::INFINITY);
    }
    (m, bad)
}

/// `e^(x − m)` on 16 lanes, 0 where `x − m <= FLUSH`.
#[inline(always)]
fn flushed_exp<K: Kern>(x: [f32; LANES], m: f32) -> [f32; LANES] {
    let d: [f32; LANES] = map16(|l| x[l] - m);
    let e = K::exp_masked(d);
    map16(|l| if d[l] > FLUSH { e[l] } else { 0.0 })
}

/// Pass 2 of the stashed fast variant: `Σ e^(x − m)` (flushed below [`FLUSH`]), each term kept
/// in `stash`; f32 lanes within blocks, f64 across.
#[inline(always)]
fn sum_stash<K: Kern>(bytes: &[u8], m: f32, stash: &mut [f32], _: K) -> f64 {
    let n = bytes.len() / K::N;
    let full = n / LANES;
    let (done, mut total) = K::sum_stash_fast(bytes, m, stash);
    let mut i0 = done / LANES;
    while i0 < full {
        let end = (i0 + BLOCK).min(full);
        let mut s = [0f32; LANES];
        for i in i0..end {
            let e = flushed_exp::<K>(K::load(&bytes[i * LANES * K::N..(i + 1) * LANES * K::N]), m);
            for l in 0..LANES {
                s[l] += e[l];
            }
            stash[i * LANES..(i + 1) * LANES].copy_from_slice(&e);
        }
        total += s.iter().map(|&v| f64::from(v)).sum::<f64>();
        i0 = end;
    }
    let rest = n - full * LANES;
    if rest > 0 {
        let x: [f32; LANES] = map16(|l| if l < rest { K::get(&bytes[(full * LANES + l) * K::N..]) } else { m });
        let e = flushed_exp::<K>(x, m);
        stash[full * LANES..n].copy_from_slice(&e[..rest]);
        total += e[..rest].iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    total
}

/// Pass 3 of the stashed fast variant: the kept terms times `sp`, written as the dtype at byte
/// `at` of `buf` (`n` logits), prefetching `ahead` meanwhile.
#[inline(always)]
fn grad_stash<K: Kern, B: RowBuf>(buf: &mut B, at: usize, n: usize, stash: &[f32], sp: f32, ahead: Ahead, _: K) {
    let v = LANES * K::N;
    let full = n / LANES;
    // Terms are at most 1: the products are finite when `sp` is. When it is not (an infinite
    // upstream, an overflowing factor), flushed terms still give an exact 0, as the plain path's
    // masked lanes do (0 · inf would be NaN).
    let finite = sp.abs() < 1e30;
    let term = |e: f32| if finite || e != 0.0 { e * sp } else { 0.0 };
    let done = K::grad_stash_fast(buf, at, n, stash, sp, finite, ahead) / LANES;
    for i in done..full {
        let lo = at + i * v;
        ahead.prefetch(i * v);
        let e = &stash[i * LANES..(i + 1) * LANES];
        let g: [f32; LANES] = map16(|l| term(e[l]));
        if finite {
            K::store_finite(&mut buf.dst()[lo..lo + v], g);
        } else {
            K::store(&mut buf.dst()[lo..lo + v], g);
        }
    }
    let dst = buf.dst();
    for j in full * LANES..n {
        K::put(&mut dst[at + j * K::N..at + (j + 1) * K::N], term(stash[j]));
    }
}

/// Pass 1 of the options path: the max of the raw logits, NaN and `+inf` seen.
#[inline(always)]
fn max_pass<K: Kern>(bytes: &[u8], _: K) -> Max {
    let n = bytes.len() / K::N;
    let full = n / LANES;
    let mut m = [f32::NEG_INFINITY; LANES];
    let (mut nan, mut pinf) = ([false; LANES], [false; LANES]);
    for i in 0..full {
        let v = K::load(&bytes[i * LANES * K::N..(i + 1) * LANES * K::N]);
        for l in 0..LANES {
            m[l] = if v[l] > m[l] { v[l] } else { m[l] };
            nan[l] |= v[l].is_nan();
            pinf[l] |= v[l] == f32::INFINITY;
        }
    }
    let mut out = Max {
        m: m.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        nan: nan.iter().any(|&b| b),
        pinf: pinf.iter().any(|&b| b),
    };
    for j in full * LANES..n {
        let v = K::get(&bytes[j * K::N..j * K::N + K::N]);
        out = out.merge(Max {
            m: if v.is_nan() { f32::NEG_INFINITY } else { v },
            nan: v.is_nan(),
            pinf: v == f32::INFINITY,
        });
    }
    out
}

/// Pass 2 of the options path, for whichever soft-cap / smoothing / weights the job has.
#[inline(always)]
fn sums<K: Kern>(job: &Job<'_>, bytes: &[u8], j0: usize, m: f32, k: K) -> (f64, f64) {
    let cap = job.cap.unwrap_or(Cap { cap: 1.0, inv: 1.0 });
    let w = job.weight.unwrap_or(&[]);
    match job.variant {
        Variant::Options { cap: true, smooth: false, .. } => sum_pass::<K, true, false, false>(bytes, j0, m, cap, w, k),
        Variant::Options { cap: false, smooth: true, weighted: false } => {
            sum_pass::<K, false, true, false>(bytes, j0, m, cap, w, k)
        }
        Variant::Options { cap: false, smooth: true, weighted: true } => {
            sum_pass::<K, false, true, true>(bytes, j0, m, cap, w, k)
        }
        Variant::Options { cap: true, smooth: true, weighted: false } => {
            sum_pass::<K, true, true, false>(bytes, j0, m, cap, w, k)
        }
        Variant::Options { cap: true, smooth: true, weighted: true } => {
            sum_pass::<K, true, true, true>(bytes, j0, m, cap, w, k)
        }
        // Not reached: the fast path takes the forward's statistics.
        Variant::Fast | Variant::Options { cap: false, smooth: false, .. } => {
            sum_pass::<K, false, false, false>(bytes, j0, m, cap, w, k)
        }
    }
}

/// Weights `j..j + 16` (`WEIGHTED`), else ones; past the end of `w`, zeros.
#[inline(always)]
fn weights16<const WEIGHTED: bool>(w: &[f32], j: usize) -> [f32; LANES] {
    if WEIGHTED {
        match w.get(j..j + LANES) {
            Some(s) => map16(|l| s[l]),
            None => map16(|l| w.get(j + l).copied().unwrap_or(0.0)),
        }
    } else {
        [1.0; LANES]
    }
}

/// `cap · tanh(x / cap)` and `1 − tanh²`, on 16 lanes.
#[inline(always)]
fn softcap16(x: [f32; LANES], c: Cap) -> ([f32; LANES], [f32; LANES]) {
    let t = tanh16(map16(|l| x[l] * c.inv));
    (map16(|l| c.cap * t[l]), map16(|l| (1.0 - t[l]) * (1.0 + t[l])))
}

/// tanh on 16 lanes, within a few ulp (Cephes' `tanhf`): an odd polynomial below 0.625, else
/// `(1 − e^(−2|y|)) / (1 + e^(−2|y|))` (the argument of `exp` is then <= 0). NaN stays NaN; ±inf
/// give ±1. The `exp` is the portable one with fused multiply-adds on every instruction set, so
/// that one lane computed alone ([`Job::capped`]) has the bits of the same lane in a vector.
#[inline(always)]
fn tanh16(y: [f32; LANES]) -> [f32; LANES] {
    let a: [f32; LANES] = map16(|l| y[l].abs());
    let e = exp16::<true>(map16(|l| -2.0 * a[l]));
    map16(|l| {
        let big = (1.0 - e[l]) / (1.0 + e[l]);
        let s = a[l] * a[l];
        let p = (((-5.704_988_7e-3 * s + 2.063_909e-2) * s - 5.373_971_6e-2) * s + 1.333_144_2e-1) * s - 3.333_328e-1;
        let small = p * s * a[l] + a[l];
        let r = if a[l] > 0.625 { big } else { small };
        r.copysign(y[l])
    })
}

/// One vector's terms of pass 2: `exp(z − m)` and, when smoothing, `w_j (m − z_j)`.
#[inline(always)]
fn sum_terms<K: Kern, const CAP: bool, const SMOOTH: bool, const WEIGHTED: bool>(
    x: [f32; LANES],
    j: usize,
    m: f32,
    cap: Cap,
    w: &[f32],
) -> ([f32; LANES], [f32; LANES]) {
    let z = if CAP { softcap16(x, cap).0 } else { x };
    let d: [f32; LANES] = map16(|l| z[l] - m);
    let e = K::exp(d);
    let a = if SMOOTH {
        let wj = weights16::<WEIGHTED>(w, j);
        map16(|l| wj[l] * -d[l])
    } else {
        [0.0; LANES]
    };
    (e, a)
}

/// Pass 2 of the options path over a run starting at class `j0`: `Σ exp(z − m)` and, when
/// smoothing, `Σ w_j (m − z_j)`; f32 lanes within blocks, f64 across.
#[inline(always)]
fn sum_pass<K: Kern, const CAP: bool, const SMOOTH: bool, const WEIGHTED: bool>(
    bytes: &[u8],
    j0: usize,
    m: f32,
    cap: Cap,
    w: &[f32],
    _: K,
) -> (f64, f64) {
    let n = bytes.len() / K::N;
    let full = n / LANES;
    let (mut s_total, mut a_total) = (0f64, 0f64);
    for i0 in (0..full).step_by(BLOCK) {
        let (mut s, mut a) = ([0f32; LANES], [0f32; LANES]);
        for i in i0..(i0 + BLOCK).min(full) {
            let x = K::load(&bytes[i * LANES * K::N..(i + 1) * LANES * K::N]);
            let (e, t) = sum_terms::<K, CAP, SMOOTH, WEIGHTED>(x, j0 + i * LANES, m, cap, w);
            for l in 0..LANES {
                s[l] += e[l];
                if SMOOTH {
                    a[l] += t[l];
                }
            }
        }
        s_total += s.iter().map(|&v| f64::from(v)).sum::<f64>();
        a_total += a.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
    let rest = n - full * LANES;
    if rest > 0 {
        let x: [f32; LANES] = map16(|l| if l < rest { K::get(&bytes[(full * LANES + l) * K::N..]) } else { m });
        let (e, t) = sum_terms::<K, CAP, SMOOTH, WEIGHTED>(x, j0 + full * LANES, m, cap, w);
        s_total += e[..rest].iter().map(|&v| f64::from(v)).sum::<f64>();
        if SMOOTH {
            a_total += t[..rest].iter().map(|&v| f64::from(v)).sum::<f64>();
        }
    }
    (s_total, a_total)
}

/// Writes the gradient of `n` logits (classes `j0..j0 + n`) at byte `at` of `buf`, prefetching
/// `ahead` meanwhile.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn write_grad<K: Kern, B: RowBuf>(
    job: &Job<'_>,
    buf: &mut B,
    at: usize,
    j0: usize,
    n: usize,
    grad: RowGrad,
    ahead: Ahead,
    k: K,
) {
    let dst = &mut buf.dst()[at..at + n * K::N];
    let c = match grad {
        RowGrad::Zero => return dst.fill(0),
        RowGrad::Nan => {
            for e in dst.chunks_exact_mut(K::N) {
                K::put(e, f32::NAN);
            }
            return;
        }
        RowGrad::Scaled(c) => c,
    };
    let cap = job.cap.unwrap_or(Cap { cap: 1.0, inv: 1.0 });
    let w = job.weight.unwrap_or(&[]);
    match job.variant {
        Variant::Fast | Variant::Options { cap: false, smooth: false, .. } => {
            grad_pass::<K, B, false, false, false>(buf, at, j0, n, &c, cap, w, ahead, k)
        }
        Variant::Options { cap: true, smooth: false, .. } => {
            grad_pass::<K, B, true, false, false>(buf, at, j0, n, &c, cap, w, ahead, k)
        }
        Variant::Options { cap: false, smooth: true, weighted: false } => {
            grad_pass::<K, B, false, true, false>(buf, at, j0, n, &c, cap, w, ahead, k)
        }
        Variant::Options { cap: false, smooth: true, weighted: true } => {
            grad_pass::<K, B, false, true, true>(buf, at, j0, n, &c, cap, w, ahead, k)
        }
        Variant::Options { cap: true, smooth: true, weighted: false } => {
            grad_pass::<K, B, true, true, false>(buf, at, j0, n, &c, cap, w, ahead, k)
        }
        Variant::Options { cap: true, smooth: true, weighted: true } => {
            grad_pass::<K, B, true, true, true>(buf, at, j0, n, &c, cap, w, ahead, k)
        }
    }
    if (j0..j0 + n).contains(&c.target) {
        let b = at + (c.target - j0) * K::N;
        K::put(&mut buf.dst()[b..b + K::N], c.at_target);
    }
}

/// One vector's gradient: `(e^(z − m) · sp − sw · w_j) · (1 − t²)`, the softmax term flushed to 0
/// below [`FLUSH`].
#[inline(always)]
fn grad16<K: Kern, const CAP: bool, const SMOOTH: bool, const WEIGHTED: bool>(
    x: [f32; LANES],
    j: usize,
    c: &Coef,
    cap: Cap,
    w: &[f32],
) -> [f32; LANES] {
    let (z, dcap) = if CAP { softcap16(x, cap) } else { (x, [1.0; LANES]) };
    let d: [f32; LANES] = map16(|l| z[l] - c.m);
    let e = K::exp_masked(d);
    let wj = weights16::<WEIGHTED>(w, j);
    map16(|l| {
        let p = if d[l] > FLUSH { e[l] * c.sp } else { 0.0 };
        let q = if SMOOTH { p - c.sw * wj[l] } else { p };
        if CAP {
            q * dcap[l]
        } else {
            q
        }
    })
}

/// The gradient pass (pass 3): reads each vector of logits, writes its gradient in the same place
/// of the destination (which, in place, is where it was read from).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn grad_pass<K: Kern, B: RowBuf, const CAP: bool, const SMOOTH: bool, const WEIGHTED: bool>(
    buf: &mut B,
    at: usize,
    j0: usize,
    n: usize,
    c: &Coef,
    cap: Cap,
    w: &[f32],
    ahead: Ahead,
    _: K,
) {
    let v = LANES * K::N;
    let full = n / LANES;
    // Without a soft-cap or smoothing, values are `e · sp` with `e <= 1`: finite when `sp` is.
    let finite = !CAP && !SMOOTH && c.sp.abs() < 1e30;
    let done = if finite { K::grad_fast(buf, at, n, c.m, c.sp, ahead) / LANES } else { 0 };
    for i in done..full {
        let lo = at + i * v;
        // The next row, one line per vector: in cache by the time its own passes start.
        ahead.prefetch(i * v);
        let x = K::load(&buf.src()[lo..lo + v]);
        let g = grad16::<K, CAP, SMOOTH, WEIGHTED>(x, j0 + i * LANES, c, cap, w);
        if finite {
            K::store_finite(&mut buf.dst()[lo..lo + v], g);
        } else {
            K::store(&mut buf.dst()[lo..lo + v], g);
        }
    }
    let rest = n - full * LANES;
    if rest > 0 {
        let lo = at + full * v;
        let src = buf.src();
        let x: [f32; LANES] = map16(|l| if l < rest { K::get(&src[lo + l * K::N..]) } else { c.m });
        let g = grad16::<K, CAP, SMOOTH, WEIGHTED>(x, j0 + full * LANES, c, cap, w);
        let dst = buf.dst();
        for (l, &v) in g.iter().enumerate().take(rest) {
            K::put(&mut dst[lo + l * K::N..lo + (l + 1) * K::N], v);
        }
    }
}

/// `[f(0), …, f(15)]`, always inlined (measured: `std::array::from_fn` with these closures is
/// not, and its call per vector halved the speed).
#[inline(always)]
fn map16<T: Copy + Default>(f: impl Fn(usize) -> T) -> [T; LANES] {
    let mut out = [T::default(); LANES];
    for (l, o) in out.iter_mut().enumerate() {
        *o = f(l);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Loading and storing 16 logits: f32 results stored as the logits' dtype (round to nearest even).
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn load_f32(b: &[u8]) -> [f32; LANES] {
    map16(|l| get_f32(&b[4 * l..4 * l + 4]))
}

#[inline(always)]
fn load_bf16(b: &[u8]) -> [f32; LANES] {
    map16(|l| get_bf16(&b[2 * l..2 * l + 2]))
}

#[inline(always)]
fn load_f16(b: &[u8]) -> [f32; LANES] {
    map16(|l| get_f16(&b[2 * l..2 * l + 2]))
}

#[inline(always)]
fn store_f32(b: &mut [u8], v: [f32; LANES]) {
    b[..4 * LANES].copy_from_slice(bytemuck::cast_slice(&v));
}

#[inline(always)]
fn store_bf16(b: &mut [u8], v: [f32; LANES]) {
    let h: [u16; LANES] = map16(|l| bf16_bits(v[l]));
    b[..2 * LANES].copy_from_slice(bytemuck::cast_slice(&h));
}

#[inline(always)]
fn store_f16(b: &mut [u8], v: [f32; LANES]) {
    let h: [u16; LANES] = map16(|l| f16_bits(v[l]));
    b[..2 * LANES].copy_from_slice(bytemuck::cast_slice(&h));
}

/// [`store_bf16`] of values known not to be NaN.
#[inline(always)]
fn store_bf16_finite(b: &mut [u8], v: [f32; LANES]) {
    let h: [u16; LANES] = map16(|l| {
        let x = v[l].to_bits();
        (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16
    });
    b[..2 * LANES].copy_from_slice(bytemuck::cast_slice(&h));
}

fn put_f32(b: &mut [u8], v: f32) {
    b[..4].copy_from_slice(&v.to_le_bytes());
}

fn put_bf16(b: &mut [u8], v: f32) {
    b[..2].copy_from_slice(&bf16_bits(v).to_le_bytes());
}

fn put_f16(b: &mut [u8], v: f32) {
    b[..2].copy_from_slice(&f16_bits(v).to_le_bytes());
}

/// f32 to bf16, rounding to nearest even; NaN stays NaN (quietened), as `half::bf16::from_f32`.
#[inline(always)]
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
    let nan = (x >> 16) | 0x40;
    (if x & 0x7fff_ffff > 0x7f80_0000 { nan } else { rounded }) as u16
}

/// f32 to IEEE half, rounding to nearest even, branch-free so that it vectorises (F. Giesen's
/// `float_to_half_fast3_rtne`): subnormal results through one float add that makes the FPU round,
/// normal ones by rebiasing the exponent and rounding at bit 13; NaN gives the quiet NaN `0x7e00`.
#[inline(always)]
pub(crate) fn f16_bits(v: f32) -> u16 {
    const HALF: u32 = 0x3f00_0000; // 0.5: its ulp is 2^-24, the smallest f16 subnormal
    let x = v.to_bits();
    let sign = (x >> 16) & 0x8000;
    let a = x & 0x7fff_ffff;
    let normal = a.wrapping_sub(112 << 23).wrapping_add(0xfff + ((a >> 13) & 1)) >> 13;
    let sub = (f32::from_bits(a) + 0.5).to_bits().wrapping_sub(HALF);
    let special = if a > 0x7f80_0000 { 0x7e00 } else { 0x7c00 };
    let h = if a >= 0x4780_0000 {
        special
    } else if a < (113 << 23) {
        sub
    } else {
        normal
    };
    (h | sign) as u16
}

#[cfg(target_arch = "x86_64")]
mod x86_store {
    use std::arch::x86_64::*;

    use crate::cpu::LANES;

    /// 16 f32 to IEEE half (round to nearest even) into the first 32 bytes of `b`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn f16x16_avx512(b: &mut [u8], v: [f32; LANES]) {
        let b = &mut b[..32];
        let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(std::mem::transmute::<
            [f32; LANES],
            __m512,
        >(v));
        // SAFETY: `b` is 32 bytes; unaligned stores are allowed.
        unsafe { _mm256_storeu_si256(b.as_mut_ptr().cast(), h) }
    }

    /// The same with AVX2 + F16C.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    pub unsafe fn f16x16_avx2(b: &mut [u8], v: [f32; LANES]) {
        let b = &mut b[..32];
        let [lo, hi]: [__m256; 2] = std::mem::transmute(v);
        let lo = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(lo);
        let hi = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(hi);
        // SAFETY: `b` is 32 bytes; unaligned stores are allowed.
        unsafe {
            _mm_storeu_si128(b.as_mut_ptr().cast(), lo);
            _mm_storeu_si128(b.as_mut_ptr().add(16).cast(), hi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::reference::cross_entropy;

    /// Every instruction set this machine has (and the portable code), every variant of the
    /// passes, every dtype, whole rows and rows cut into parts, against the reference. (The
    /// integration tests run only the instruction set the machine picks.)
    #[test]
    fn every_isa_this_machine_has_matches_the_reference() {
        let mut isas = vec![Isa::Portable];
        if cfg!(target_arch = "x86_64") && Isa::detect() != Isa::Portable {
            isas.push(Isa::Avx2);
        }
        if Isa::detect() == Isa::Avx512 {
            isas.push(Isa::Avx512);
        }
        let mut rng = crate::synth::Rng::new(5);
        for (rows, vocab) in [(5, 1000), (1, 3000), (2, 47)] {
            let x: Vec<f32> = (0..rows * vocab).map(|_| 3.0 * rng.normal() as f32).collect();
            let t: Vec<i64> = (0..rows).map(|r| if r == 3 { -100 } else { rng.below(vocab) as i64 }).collect();
            let w: Vec<f32> = (0..vocab).map(|_| 0.5 + rng.uniform() as f32).collect();
            for opts in [
                LossOptions::default(),
                LossOptions { softcap: Some(4.0), ..LossOptions::default() },
                LossOptions { label_smoothing: 0.1, weight: Some(&w), z_loss: 1e-3, ..LossOptions::default() },
                LossOptions { label_smoothing: 0.1, softcap: Some(4.0), ..LossOptions::default() },
            ] {
                for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
                    let bytes = dtype.encode(&x);
                    let logits = Logits::from_bytes(&bytes, dtype, rows, vocab).unwrap();
                    let up = Upstream::Scalar(1.0);
                    let want = cross_entropy(logits, Targets::I64(&t), &opts, up).unwrap();
                    let p = prepare(logits, Targets::I64(&t), &opts, up).unwrap();
                    for &isa in &isas {
                        let mut job = Job::new(dtype, rows, vocab, &opts, &p);
                        job.isa = isa;
                        let mut grad = vec![0xffu8; bytes.len()];
                        let out = job.run(Separate { src: &bytes, dst: &mut grad });
                        let what = format!("{isa:?} {dtype} {rows} x {vocab} {opts:?}");
                        for (r, row) in out.iter().enumerate() {
                            let d = (f64::from(row.loss) - want.row_loss[r]).abs();
                            assert!(d <= 1e-5 * (1.0 + want.row_loss[r].abs()), "{what}: row {r} loss {}", row.loss);
                        }
                        for (r, want_row) in want.grad.chunks(vocab).enumerate() {
                            let scale = want_row.iter().fold(0f64, |a, v| a.max(v.abs()));
                            for (j, &v) in want_row.iter().enumerate() {
                                let got = f64::from(dtype.get(&grad, r * vocab + j));
                                let ulp = if dtype == Dtype::F32 { 0.0 } else { v.abs() / 128.0 };
                                assert!(
                                    (got - v).abs() <= 1e-5 * scale + 1e-5 * v.abs() + ulp,
                                    "{what}: grad[{r}, {j}] {got} vs {v}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_rounding_matches_half() {
        let mut x = 0u32;
        loop {
            let v = f32::from_bits(x);
            let want = half::bf16::from_f32(v).to_bits();
            assert_eq!(bf16_bits(v), want, "{x:#x}");
            match x.checked_add(0x1_0001 + (x & 0xfff)) {
                Some(y) => x = y,
                None => break,
            }
        }
    }

    #[test]
    fn f16_rounding_matches_half() {
        // Every exponent, mantissas around every rounding boundary, both signs.
        let mut checked = 0;
        for hi in 0..=0x1ffu32 {
            for lo in (0..1u32 << 23).step_by(0x1fff) {
                for d in [0u32, 1, 0xfff, 0x1000, 0x1001, 0x1fff] {
                    let x = (hi << 23) | ((lo + d) & 0x7f_ffff);
                    let v = f32::from_bits(x);
                    let want = half::f16::from_f32(v);
                    let got = f16_bits(v);
                    if want.is_nan() {
                        assert!(half::f16::from_bits(got).is_nan(), "{x:#x}");
                    } else {
                        assert_eq!(got, want.to_bits(), "{x:#x} = {v:e}");
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 1_000_000);
    }

    #[test]
    fn tanh_is_accurate() {
        let mut worst = 0f64;
        let mut y = -12.0f32;
        while y <= 12.0 {
            let ys: [f32; LANES] = std::array::from_fn(|l| y + l as f32 * 1e-4);
            let t = tanh16(ys);
            {
                for l in 0..LANES {
                    let want = f64::from(ys[l]).tanh();
                    worst = worst.max((f64::from(t[l]) - want).abs() / want.abs().max(1e-30));
                }
            }
            y += 0.001_3;
        }
        assert!(worst < 4e-7, "worst relative error {worst:e}");
        let t = tanh16([
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::NAN,
            1e-30,
            100.0,
            -100.0,
            0.625,
            -0.625,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
            0.0,
        ]);
        assert_eq!(&t[..4], &[1.0, -1.0, 0.0, -0.0]);
        assert!(t[4].is_nan());
        assert_eq!(t[5], 1e-30);
        assert_eq!((t[6], t[7]), (1.0, -1.0));
    }
}
