//! The fast CPU path: SIMD, multi-threaded, one read of memory per row. Same outputs and
//! semantics as the GPU kernel ([`RowLoss`]).
//!
//! ## How it is fast
//! - **One read of memory.** Each row is read from DRAM once: a max pass, then a sum-of-exp pass
//!   over the same row while it is still in L2 (a 128k-vocab f32 row is 512 KiB). Measured on a
//!   2-core AMD EPYC (AVX-512) at 2048 x 128256 f32, two passes beat an online single pass
//!   because the second pass has no data-dependent rescaling and vectorises fully (see
//!   BENCHMARKS.md); rows that do not fit L2 are cut into parts that do (below).
//! - **A vectorised `exp`** for arguments <= 0 (after max-subtraction), within 2 ulp over [-87, 0]:
//!   on AVX-512 a 32-entry table of 2^(j/32) in two registers plus a minimax quadratic (six
//!   multiply-adds); elsewhere Cody–Waite range reduction and Cephes' degree-6 polynomial. Below
//!   -87 (e^-87 < 2e-38) the term is flushed to e^-87, which cannot change a sum that is at
//!   least 1; where pass 1 proves no value is that far below the max, the clamp is skipped.
//! - **16-bit logits on AVX-512 work on the raw patterns** where they can: pass 1 takes the max
//!   of 32 bf16 or f16 patterns per instruction as order-preserving integers, and for bf16 pass 2
//!   widens 32 logits to two f32 vectors with one instruction each (even and odd lanes). 16-bit
//!   logits are bound by `exp`, not by memory, so every instruction saved is speed.
//! - **Runtime CPU-feature dispatch**, no `-C target-cpu`: the same generic code is compiled three
//!   times — AVX-512, AVX2+FMA, and the portable baseline (SSE2 on x86-64, NEON on aarch64) — and
//!   chosen once per call with `is_x86_feature_detected!`. The code is written as loops over
//!   16-lane blocks that LLVM vectorises for whichever target it is compiled for; no crate was
//!   needed for that (a SIMD crate would add an abstraction but not speed here).
//! - **f16 / bf16 converted in registers**, 16 at a time, never into a temporary f32 copy.
//! - **rayon** across rows, and across parts of a row when rows are fewer than threads or longer
//!   than L2 (partial max / sum / argmax are merged exactly as the GPU merges them).
//! - Lanes accumulate in f32 within blocks of 1024 logits and blocks accumulate in f64, so long
//!   rows lose nothing to the sum.

use rayon::prelude::*;

use crate::error::Result;
use crate::problem::{validate_targets, Dtype, Logits, Options, RowLoss, Targets, IGNORED_TARGET};

/// Lanes per block: one AVX-512 register of f32.
pub(crate) const LANES: usize = 16;
/// Logits per part of a row when a row is cut: 64k f32 = 256 KiB, comfortably inside L2.
pub(crate) const PART: usize = 1 << 16;

/// Scores every row on the CPU.
///
/// # Errors
/// As [`validate_targets`]: a row-count mismatch or a target out of range.
pub fn score(logits: Logits<'_>, targets: Targets<'_>, opts: &Options) -> Result<Vec<RowLoss>> {
    let t = validate_targets(targets, logits.rows(), logits.vocab(), opts)?;
    Ok(score_validated(logits, &t))
}

/// The instruction set the fast path uses on this machine.
pub fn isa() -> &'static str {
    match Isa::detect() {
        Isa::Avx512 => "avx512",
        Isa::Avx2 => "avx2+fma",
        Isa::Portable => {
            if cfg!(target_arch = "aarch64") {
                "neon"
            } else {
                "portable"
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            // Every feature the chosen function enables must be checked here.
            let avx2 =
                is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c");
            if avx2
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
            {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }
}

/// Scores rows whose targets are already validated (`u32`, [`IGNORED_TARGET`] for ignored rows).
pub(crate) fn score_validated(logits: Logits<'_>, targets: &[u32]) -> Vec<RowLoss> {
    let threads = rayon::current_num_threads();
    // Parts per row: enough to keep every thread busy when rows are few, and small enough to
    // stay in L2 between the two passes.
    let parts = logits.vocab().div_ceil(PART).max(threads.div_ceil(logits.rows().max(1)));
    let plan = PartPlan::new(logits.vocab(), parts);
    let isa = Isa::detect();
    let states: Vec<Partial> =
        (0..logits.rows() * plan.parts).into_par_iter().map(|u| plan.scan(isa, logits, u)).collect();
    states
        .par_chunks(plan.parts)
        .zip(targets.par_iter())
        .enumerate()
        .map(|(r, (ps, &t))| finish_row(logits, r, ps, t))
        .collect()
}

/// Scores rows one after another on the calling thread, each cut into parts of at most 64k
/// logits (the split [`score_validated`] uses when rows are at least as many as threads, so both
/// give the same bits). For callers that parallelise over blocks of rows themselves.
pub(crate) fn score_sequential(logits: Logits<'_>, targets: &[u32]) -> Vec<RowLoss> {
    let plan = PartPlan::new(logits.vocab(), logits.vocab().div_ceil(PART));
    let isa = Isa::detect();
    let mut states = Vec::with_capacity(plan.parts);
    (0..logits.rows())
        .map(|r| {
            states.clear();
            states.extend((0..plan.parts).map(|p| plan.scan(isa, logits, r * plan.parts + p)));
            finish_row(logits, r, &states, targets[r])
        })
        .collect()
}

/// How rows are cut into parts: `parts` runs of `len` logits (a multiple of the lane count).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PartPlan {
    pub(crate) parts: usize,
    pub(crate) len: usize,
}

impl PartPlan {
    pub(crate) fn new(vocab: usize, parts: usize) -> PartPlan {
        let parts = parts.min(vocab.div_ceil(LANES * 64)).max(1);
        let len = vocab.div_ceil(parts).next_multiple_of(LANES);
        PartPlan { parts: vocab.div_ceil(len).max(1), len }
    }

    /// Scans unit `u` (row `u / parts`, part `u % parts`).
    fn scan(&self, isa: Isa, logits: Logits<'_>, u: usize) -> Partial {
        let (r, p) = (u / self.parts, u % self.parts);
        let vocab = logits.vocab();
        let es = logits.dtype().size();
        let rb = logits.row_bytes();
        let bytes = logits.bytes();
        let lo = p * self.len;
        let hi = (lo + self.len).min(vocab);
        // The bytes after this run (the next part or row), to be prefetched while this run's
        // second pass computes from cache.
        let at = r * rb + hi * es;
        let ahead = &bytes[at..(at + (hi - lo) * es).min(bytes.len())];
        let mut st = scan(isa, logits.dtype(), &bytes[r * rb + lo * es..r * rb + hi * es], ahead);
        st.idx = st.idx.map(|i| i + lo);
        st
    }
}

fn finish_row(logits: Logits<'_>, r: usize, parts: &[Partial], t: u32) -> RowLoss {
    let st = parts.iter().skip(1).fold(parts[0], |a, b| a.merge(b));
    let x_t = (t != IGNORED_TARGET).then(|| logits.get(r, t as usize));
    finish(st, t, x_t)
}

/// The state of a scanned run of logits: max, sum of exp(x - max), first argmax, NaN/+inf seen.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Partial {
    pub(crate) m: f32,
    pub(crate) s: f64,
    pub(crate) idx: Option<usize>,
    pub(crate) bad: bool,
}

impl Partial {
    /// Merges two runs, `self` before `other` in the row (ties keep the earlier index).
    pub(crate) fn merge(self, other: &Partial) -> Partial {
        let m = self.m.max(other.m);
        let scale = |p: &Partial| if p.s == 0.0 { 0.0 } else { p.s * f64::from(p.m - m).exp() };
        let idx = if other.m > self.m || self.idx.is_none() { other.idx.or(self.idx) } else { self.idx };
        Partial { m, s: scale(&self) + scale(other), idx, bad: self.bad || other.bad }
    }
}

fn finish(st: Partial, t: u32, x_t: Option<f32>) -> RowLoss {
    let broken = st.bad || st.s == 0.0 || st.m == f32::NEG_INFINITY;
    let log_s = st.s.ln() as f32;
    let lse = if broken { f32::NAN } else { st.m + log_s };
    let argmax = if broken { u32::MAX } else { st.idx.map_or(u32::MAX, |i| i as u32) };
    match x_t {
        None => RowLoss { nll: 0.0, lse, argmax, flags: RowLoss::IGNORED },
        Some(x) => {
            let nll = if broken { f32::NAN } else { (st.m - x) + log_s };
            let flags = if !broken && argmax == t { RowLoss::CORRECT } else { 0 };
            RowLoss { nll, lse, argmax, flags }
        }
    }
}

/// Scans a run of little-endian logits with the best instruction set available.
pub(crate) fn scan(isa: Isa, dtype: Dtype, bytes: &[u8], ahead: &[u8]) -> Partial {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` checked these features on this CPU.
        Isa::Avx512 => unsafe { scan_avx512(dtype, bytes, ahead) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { scan_avx2(dtype, bytes, ahead) },
        _ => scan_generic::<PORTABLE_FMA>(dtype, bytes, ahead),
    }
}

/// Whether the portable build may use fused multiply-add (always on aarch64, whose baseline has it).
pub(crate) const PORTABLE_FMA: bool = cfg!(target_arch = "aarch64");

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn scan_avx512(dtype: Dtype, bytes: &[u8], ahead: &[u8]) -> Partial {
    use x86::*;
    match dtype {
        // SAFETY (all closures): this function runs only where AVX-512F/BW and F16C exist, and
        // the block loaders are given 32-byte slices.
        Dtype::F32 => {
            two_passes::<true, 4>(bytes, ahead, get_f32, block_of::<4>(get_f32), |x| unsafe { exp16_avx512::<true>(x) })
        }
        Dtype::BF16 => scan_typed::<true, 2>(
            bytes,
            ahead,
            get_bf16,
            |b, n| unsafe { half_max_pass_avx512::<BF16_INF>(b, n, |p| f32::from_bits(u32::from(p) << 16)) },
            |b, a, n, mx, p1| unsafe { bf16_sum_pass_avx512(b, a, n, mx, p1) },
        ),
        // f16 needs a real conversion to f32, so pass 2 is the portable one; it still gains the
        // integer pass 1 and, where pass 1 proves it safe, the exp without its clamp.
        Dtype::F16 => {
            let load = |b: &[u8]| unsafe { f16x16_avx512(b) };
            scan_typed::<true, 2>(
                bytes,
                ahead,
                get_f16,
                |b, n| unsafe { half_max_pass_avx512::<F16_INF>(b, n, f16_to_f32) },
                |b, a, n, mx, p1| {
                    if p1.needs_clamp(mx) {
                        sum_pass::<2>(b, a, n, mx, p1.block, load, |x| unsafe { exp16_avx512::<true>(x) })
                    } else {
                        sum_pass::<2>(b, a, n, mx, p1.block, load, |x| unsafe { exp16_avx512::<false>(x) })
                    }
                },
            )
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scan_avx2(dtype: Dtype, bytes: &[u8], ahead: &[u8]) -> Partial {
    use x86::*;
    match dtype {
        Dtype::F32 => two_passes::<true, 4>(bytes, ahead, get_f32, block_of::<4>(get_f32), exp16::<true>),
        // SAFETY: this function runs only where AVX2 and F16C exist; slices are 32 bytes.
        Dtype::BF16 => two_passes::<true, 2>(bytes, ahead, get_bf16, |b| unsafe { bf16x16_avx2(b) }, exp16::<true>),
        Dtype::F16 => two_passes::<true, 2>(bytes, ahead, get_f16, |b| unsafe { f16x16_avx2(b) }, exp16::<true>),
    }
}

/// Block loaders for x86: 16 half-precision logits widened to f32 in registers.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{Pass1, BLOCK, LANES};

    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn bf16x16_avx512(b: &[u8]) -> [f32; 16] {
        debug_assert!(b.len() >= 32);
        // SAFETY: the caller passes at least 32 bytes; unaligned loads are allowed.
        let v = unsafe { _mm256_loadu_si256(b.as_ptr().cast()) };
        std::mem::transmute(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    }

    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn f16x16_avx512(b: &[u8]) -> [f32; 16] {
        debug_assert!(b.len() >= 32);
        // SAFETY: as above.
        let v = unsafe { _mm256_loadu_si256(b.as_ptr().cast()) };
        std::mem::transmute(_mm512_cvtph_ps(v))
    }

    /// The bits of 2^(j/32), j = 0..32 (correctly rounded): the table of [`exp_avx512`].
    const EXP2_THIRTYSECONDS: [u32; 32] = [
        0x3f80_0000,
        0x3f82_cd87,
        0x3f85_aac3,
        0x3f88_980f,
        0x3f8b_95c2,
        0x3f8e_a43a,
        0x3f91_c3d3,
        0x3f94_f4f0,
        0x3f98_37f0,
        0x3f9b_8d3a,
        0x3f9e_f532,
        0x3fa2_7043,
        0x3fa5_fed7,
        0x3fa9_a15b,
        0x3fad_583f,
        0x3fb1_23f6,
        0x3fb5_04f3,
        0x3fb8_fbaf,
        0x3fbd_08a4,
        0x3fc1_2c4d,
        0x3fc5_672a,
        0x3fc9_b9be,
        0x3fce_248c,
        0x3fd2_a81e,
        0x3fd7_44fd,
        0x3fdb_fbb8,
        0x3fe0_ccdf,
        0x3fe5_b907,
        0x3fea_c0c7,
        0x3fef_e4ba,
        0x3ff5_257d,
        0x3ffa_83b3,
    ];

    /// [`EXP2_THIRTYSECONDS`] less `j << 18` for entry `j`, in two registers' worth: adding `t`'s
    /// bits shifted left 18 then puts `n` in the exponent and cancels the `j` that the shift also
    /// brings (see [`exp_avx512`]).
    const EXP2_ADJUSTED: [[i32; 16]; 2] = {
        let mut t = [[0i32; 16]; 2];
        let mut j = 0;
        while j < 32 {
            t[j / 16][j % 16] = EXP2_THIRTYSECONDS[j] as i32 - ((j as i32) << 18);
            j += 1;
        }
        t
    };

    /// [`exp_avx512`] on an array.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn exp16_avx512<const CLAMP: bool>(x: [f32; 16]) -> [f32; 16] {
        std::mem::transmute(exp_avx512::<CLAMP>(std::mem::transmute::<[f32; 16], __m512>(x)))
    }

    /// e^x for x <= 0 on 16 lanes, within 2 ulp over [-87, 0] (worst seen 1.65e-7 relative, 1.7
    /// ulp, at x near -2.7; the tests hold it under 3e-7). With `CLAMP`, arguments below -87
    /// give e^-87 (and -inf gives that, not NaN); without, the caller guarantees x >= -87.
    ///
    /// x = (32n + j)·ln2/32 + r with |r| <= ln2/64: e^x = 2^n · 2^(j/32) · e^r, the middle factor
    /// from a 32-entry table held in two registers (`vpermt2d`), e^r from 1 + c1·r + c2·r², a
    /// minimax quadratic (relative error 5.4e-8 on |r| <= ln2/64). Six multiply-adds in all:
    /// the multiply-add ports are what bounds this loop on a double-pumped AVX-512 core.
    ///
    /// `t = SHIFTER + 32 x/ln2` rounds `k = 32n + j` into the low bits of `t`, whose bits are
    /// SHIFTER's plus `k`. Shifted left 18 they are `(n << 23) + (j << 18)` (SHIFTER's own bits
    /// leave the register): added to the adjusted table entry, that is 2^(j/32) with `n` added
    /// to its exponent, in one shift and one add.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn exp_avx512<const CLAMP: bool>(x: __m512) -> __m512 {
        const SHIFTER: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
                                           // ln2/32 split so that k * HI is exact for every |k| < 2^12.
        const LN2_32_HI: f32 = 0.021_659_851;
        const LN2_32_LO: f32 = 9.983_182e-7;
        const C1: f32 = 1.000_014_7;
        const C2: f32 = 0.500_004_9;
        let x = if CLAMP { _mm512_max_ps(x, _mm512_set1_ps(-87.0)) } else { x };
        let t = _mm512_fmadd_ps(x, _mm512_set1_ps(32.0 * std::f32::consts::LOG2_E), _mm512_set1_ps(SHIFTER));
        let k = _mm512_sub_ps(t, _mm512_set1_ps(SHIFTER));
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_32_HI), x);
        let r = _mm512_fnmadd_ps(k, _mm512_set1_ps(LN2_32_LO), r);
        let q = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_set1_ps(C2), r, _mm512_set1_ps(C1)), r);
        let ti = _mm512_castps_si512(t);
        let [lo, hi]: [__m512i; 2] = std::mem::transmute(EXP2_ADJUSTED);
        let tab = _mm512_permutex2var_epi32(lo, ti, hi);
        let scaled = _mm512_castsi512_ps(_mm512_add_epi32(tab, _mm512_slli_epi32::<18>(ti)));
        _mm512_fmadd_ps(scaled, q, scaled)
    }

    /// +inf's bit pattern in bf16: the largest non-NaN magnitude.
    pub(crate) const BF16_INF: i16 = 0x7f80;
    /// +inf's bit pattern in IEEE half.
    pub(crate) const F16_INF: i16 = 0x7c00;

    /// Pass 1 for 16-bit floats (bf16 or IEEE half, `INF` being +inf's pattern) on AVX-512BW, on
    /// the raw patterns, 32 at a time: the same results as [`super::max_pass`] over the first
    /// `full` 16-lane vectors, at about half the work, with no conversion to f32.
    ///
    /// Both formats are sign and magnitude, so a pattern maps to an integer that orders like the
    /// value it encodes: its magnitude bits, negated when the sign bit is set (so -0 and +0 both
    /// map to 0, equal as floats are). In that order +inf is `INF` and positive NaNs lie above
    /// it; -inf is `-INF` and negative NaNs lie below it. So one integer max and one min give the
    /// max, the lowest value and the NaN/+inf check (the max is only used when there is no NaN).
    /// `decode` turns a pattern into f32.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    pub(crate) unsafe fn half_max_pass_avx512<const INF: i16>(
        bytes: &[u8],
        full: usize,
        decode: impl Fn(u16) -> f32,
    ) -> Pass1 {
        debug_assert!(bytes.len() >= full * LANES * 2);
        let ordered = |v: __m512i| {
            // sign = 0 or -1; (v & 0x7fff) ^ sign, minus sign: the magnitude, negated if sign.
            let sign = _mm512_srai_epi16::<15>(v);
            _mm512_sub_epi16(_mm512_ternarylogic_epi32::<0x6c>(v, sign, _mm512_set1_epi16(0x7fff)), sign)
        };
        let p = bytes.as_ptr();
        let mut hi = _mm512_set1_epi16(-INF);
        let mut lo = _mm512_set1_epi16(i16::MAX);
        let (mut best, mut best_block) = (-INF, 0);
        let pairs = full / 2;
        // BLOCK vectors of 16 are BLOCK / 2 of 32.
        for (blk, i0) in (0..pairs).step_by(BLOCK / 2).enumerate() {
            for i in i0..(i0 + BLOCK / 2).min(pairs) {
                // SAFETY: pair i covers bytes [64 i, 64 i + 64), inside the first `full` vectors.
                let v = ordered(unsafe { _mm512_loadu_si512(p.add(i * 64).cast()) });
                hi = _mm512_max_epi16(hi, v);
                lo = _mm512_min_epi16(lo, v);
            }
            let h = horizontal_max(hi);
            if h > best {
                (best, best_block) = (h, blk);
            }
        }
        if full % 2 == 1 {
            // The odd last vector: 16 patterns, the other lanes -inf (neutral for the max).
            // SAFETY: the vector lies inside the first `full` vectors.
            let v =
                unsafe { _mm512_mask_loadu_epi16(_mm512_set1_epi16(INF | i16::MIN), 0xffff, p.add(pairs * 64).cast()) };
            let v = ordered(v);
            hi = _mm512_max_epi16(hi, v);
            // For the min, the padding lanes read as +inf instead.
            lo = _mm512_min_epi16(lo, _mm512_mask_mov_epi16(_mm512_set1_epi16(INF), 0xffff, v));
            let h = horizontal_max(hi);
            if h > best {
                (best, best_block) = (h, (full - 1) / BLOCK);
            }
        }
        let lowest = lanes(lo).into_iter().min().unwrap_or(-INF);
        // Back from the order to the pattern, then to f32.
        let value = |o: i16| decode(if o < 0 { o.unsigned_abs() | 0x8000 } else { o as u16 });
        Pass1 { max: value(best), lowest: value(lowest), bad: best >= INF || lowest < -INF, block: best_block }
    }

    /// Pass 2 for bf16 on AVX-512: as [`super::sum_pass`], with two savings. One 64-byte load
    /// gives 32 logits as two f32 vectors, the even-indexed ones (shifted up 16) and the
    /// odd-indexed ones (masked), one instruction each; the sum does not care about order, and
    /// the argmax search maps lanes back to indices. And when pass 1 proved every value within
    /// 87 of the max, `exp` runs without its clamp.
    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    pub(super) unsafe fn bf16_sum_pass_avx512(
        bytes: &[u8],
        ahead: &[u8],
        full: usize,
        mx: f32,
        p1: &Pass1,
    ) -> (f64, Option<usize>) {
        debug_assert!(bytes.len() >= full * LANES * 2);
        if p1.needs_clamp(mx) {
            sum_pairs::<true>(bytes, ahead, full, mx, p1.block)
        } else {
            sum_pairs::<false>(bytes, ahead, full, mx, p1.block)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn sum_pairs<const CLAMP: bool>(
        bytes: &[u8],
        ahead: &[u8],
        full: usize,
        mx: f32,
        max_block: usize,
    ) -> (f64, Option<usize>) {
        let p = bytes.as_ptr();
        let m = _mm512_set1_ps(mx);
        let high_halves = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let mut idx = None;
        let mut total = 0f64;
        let pairs = full / 2;
        for (blk, i0) in (0..pairs).step_by(BLOCK / 2).enumerate() {
            let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
            let look = blk == max_block;
            for i in i0..(i0 + BLOCK / 2).min(pairs) {
                super::prefetch(ahead, i * 64);
                // SAFETY: pair i covers bytes [64 i, 64 i + 64), inside the first `full` vectors.
                let v = unsafe { _mm512_loadu_si512(p.add(i * 64).cast()) };
                let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
                let odd = _mm512_castsi512_ps(_mm512_and_si512(v, high_halves));
                if look && idx.is_none() {
                    let (me, mo) = (_mm512_cmpeq_ps_mask(even, m), _mm512_cmpeq_ps_mask(odd, m));
                    if me | mo != 0 {
                        // Lane k of `even` is logit 2k of the pair, of `odd` 2k + 1.
                        let first = (2 * me.trailing_zeros()).min(2 * mo.trailing_zeros() + 1);
                        idx = Some(i * 32 + first as usize);
                    }
                }
                s0 = _mm512_add_ps(s0, exp_avx512::<CLAMP>(_mm512_sub_ps(even, m)));
                s1 = _mm512_add_ps(s1, exp_avx512::<CLAMP>(_mm512_sub_ps(odd, m)));
            }
            let s: [f32; 16] = std::mem::transmute(_mm512_add_ps(s0, s1));
            total += s.iter().map(|&x| f64::from(x)).sum::<f64>();
        }
        if full % 2 == 1 {
            // The odd last vector, in natural order.
            let at = (full - 1) * 32;
            let v: __m512 = std::mem::transmute(bf16x16_avx512(&bytes[at..at + 32]));
            if idx.is_none() && (full - 1) / BLOCK == max_block {
                let me = _mm512_cmpeq_ps_mask(v, m);
                if me != 0 {
                    idx = Some((full - 1) * 16 + me.trailing_zeros() as usize);
                }
            }
            let s: [f32; 16] = std::mem::transmute(exp_avx512::<CLAMP>(_mm512_sub_ps(v, m)));
            total += s.iter().map(|&x| f64::from(x)).sum::<f64>();
        }
        (total, idx)
    }

    /// The 32 signed 16-bit lanes of `v`.
    #[inline(always)]
    fn lanes(v: __m512i) -> [i16; 32] {
        // SAFETY: both types are 64 bytes of plain integers.
        unsafe { std::mem::transmute(v) }
    }

    #[inline(always)]
    fn horizontal_max(v: __m512i) -> i16 {
        lanes(v).into_iter().max().unwrap_or(i16::MIN)
    }

    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn bf16x16_avx2(b: &[u8]) -> [f32; 16] {
        debug_assert!(b.len() >= 32);
        // SAFETY: as above.
        let (lo, hi) = unsafe { (_mm_loadu_si128(b.as_ptr().cast()), _mm_loadu_si128(b.as_ptr().add(16).cast())) };
        let widen = |h| _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
        std::mem::transmute([widen(lo), widen(hi)])
    }

    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    pub unsafe fn f16x16_avx2(b: &[u8]) -> [f32; 16] {
        debug_assert!(b.len() >= 32);
        // SAFETY: as above.
        let (lo, hi) = unsafe { (_mm_loadu_si128(b.as_ptr().cast()), _mm_loadu_si128(b.as_ptr().add(16).cast())) };
        std::mem::transmute([_mm256_cvtph_ps(lo), _mm256_cvtph_ps(hi)])
    }
}

pub(crate) fn get_f32(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn get_bf16(b: &[u8]) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
}

pub(crate) fn get_f16(b: &[u8]) -> f32 {
    f16_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// A block loader from an element decoder (left to the compiler to vectorise).
#[inline(always)]
pub(crate) fn block_of<const N: usize>(get: impl Fn(&[u8]) -> f32 + Copy) -> impl Fn(&[u8]) -> [f32; LANES] + Copy {
    move |b: &[u8]| std::array::from_fn(|k| get(&b[k * N..k * N + N]))
}

#[inline(always)]
fn scan_generic<const FMA: bool>(dtype: Dtype, bytes: &[u8], ahead: &[u8]) -> Partial {
    match dtype {
        Dtype::F32 => two_passes::<FMA, 4>(bytes, ahead, get_f32, block_of::<4>(get_f32), exp16::<FMA>),
        Dtype::BF16 => two_passes::<FMA, 2>(bytes, ahead, get_bf16, block_of::<2>(get_bf16), exp16::<FMA>),
        Dtype::F16 => two_passes::<FMA, 2>(bytes, ahead, get_f16, block_of::<2>(get_f16), exp16::<FMA>),
    }
}

/// IEEE half to single, branch-free so that it vectorises (subnormals, inf and NaN included).
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let h = u32::from(h);
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    // Shift exponent and mantissa into place and rebias by 2^112: exact for normals and subnormals.
    let finite = f32::from_bits(em << 13) * f32::from_bits(0x7780_0000);
    let special = f32::from_bits(0x7f80_0000 | ((em & 0x3ff) << 13));
    let v = if em >= 0x7c00 { special } else { finite };
    f32::from_bits(v.to_bits() | sign)
}

#[inline(always)]
pub(crate) fn fma<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// e^x for x <= 0 (about 1 ulp over [-87, 0]; arguments below -87 give e^-87).
#[inline(always)]
pub(crate) fn exp_neg<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest without `round()` (a libm call on baseline x86-64): 1.5 * 2^23 trick.
    const SHIFTER: f32 = 12_582_912.0;
    // A compare-and-select compiles to one `max` instruction; `f32::max` adds NaN fix-ups
    // (no NaN reaches here: rows with NaN are detected in the first pass).
    let x = if x > -87.0 { x } else { -87.0 };
    let t = fma::<FMA>(x, LOG2E, SHIFTER);
    let n = t - SHIFTER;
    let r = fma::<FMA>(n, -LN2_HI, x);
    let r = fma::<FMA>(n, -LN2_LO, r);
    let mut p = 1.987_569_1e-4;
    p = fma::<FMA>(p, r, 1.398_199_9e-3);
    p = fma::<FMA>(p, r, 8.333_452e-3);
    p = fma::<FMA>(p, r, 4.166_579_6e-2);
    p = fma::<FMA>(p, r, 1.666_666_5e-1);
    p = fma::<FMA>(p, r, 0.5);
    let p = fma::<FMA>(p, r * r, r) + 1.0;
    // 2^n from the bits of `t`, whose low mantissa bits hold n: integer ops only (a float-to-int
    // cast would saturate lane by lane and stop vectorisation).
    // (SHIFTER's own bits end up above bit 31 after the shift by 23: nothing to subtract.)
    let scale = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    p * scale
}

/// Hints that `bytes[at..]` will be read soon (a no-op off x86-64 or past the end).
#[inline(always)]
pub(crate) fn prefetch(bytes: &[u8], at: usize) {
    #[cfg(target_arch = "x86_64")]
    if at < bytes.len() {
        // SAFETY: `at` is in bounds; prefetching has no architectural effect (SSE is baseline on x86-64).
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(bytes.as_ptr().add(at).cast()) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, at);
}

/// [`exp_neg`] on 16 lanes, for the compiler to vectorise.
#[inline(always)]
pub(crate) fn exp16<const FMA: bool>(x: [f32; LANES]) -> [f32; LANES] {
    std::array::from_fn(|k| exp_neg::<FMA>(x[k]))
}

/// Vectors per block: pass 2 sums a block in f32 lanes, and pass 1 names the first block that
/// holds the max, so that pass 2 looks for the argmax in that block only.
const BLOCK: usize = 64;

/// What pass 1 learns of the first `full` vectors of a run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pass1 {
    /// The max, NaN skipped.
    pub(crate) max: f32,
    /// No value is below this (-inf where the pass does not track it).
    pub(crate) lowest: f32,
    /// Whether a NaN or +inf occurs.
    pub(crate) bad: bool,
    /// The first block of [`BLOCK`] vectors holding the max.
    block: usize,
}

impl Pass1 {
    /// Whether `exp(x - mx)` may see arguments below -87 (or -inf) and so needs its clamp;
    /// `false` only when [`Pass1::lowest`] proves every value close enough to `mx` (a NaN
    /// `lowest`, from a run with no whole vector, keeps the clamp).
    #[allow(clippy::neg_cmp_op_on_partial_ord)]
    fn needs_clamp(&self, mx: f32) -> bool {
        !(self.lowest - mx >= -87.0)
    }
}

/// Pass 1 over the first `full` vectors of `bytes` (decoded by `load`).
// `!(v < inf)` is meant: it is true for NaN as well as +inf.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
#[inline(always)]
fn max_pass<const N: usize>(bytes: &[u8], full: usize, load: impl Fn(&[u8]) -> [f32; LANES] + Copy) -> Pass1 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut bad = [false; LANES];
    let (mut best, mut best_block) = (f32::NEG_INFINITY, 0);
    for (blk, i0) in (0..full).step_by(BLOCK).enumerate() {
        for i in i0..(i0 + BLOCK).min(full) {
            let v = load(&bytes[i * LANES * N..(i + 1) * LANES * N]);
            for k in 0..LANES {
                // One max and one compare per vector: NaN is skipped by the max and caught by
                // `!(v < inf)`, which is true exactly for NaN and +inf.
                m[k] = if v[k] > m[k] { v[k] } else { m[k] };
                bad[k] |= !(v[k] < f32::INFINITY);
            }
        }
        // Once per block, so nearly free: where the running max last rose.
        let h = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if h > best {
            (best, best_block) = (h, blk);
        }
    }
    Pass1 { max: best, lowest: f32::NEG_INFINITY, bad: bad.iter().any(|&b| b), block: best_block }
}

/// Pass 2 over the first `full` vectors: the sum of exp(x - mx), f32 lanes within blocks of
/// [`BLOCK`] vectors and f64 across blocks, and the first index of `mx`, looked for on the way
/// in the one block pass 1 named (a separate search pass, or tracking indices in pass 1, each
/// cost 40% more time, measured).
#[inline(always)]
fn sum_pass<const N: usize>(
    bytes: &[u8],
    ahead: &[u8],
    full: usize,
    mx: f32,
    max_block: usize,
    load: impl Fn(&[u8]) -> [f32; LANES] + Copy,
    exp16: impl Fn([f32; LANES]) -> [f32; LANES] + Copy,
) -> (f64, Option<usize>) {
    let mut idx = None;
    let mut total = 0f64;
    for i in (0..full).step_by(BLOCK) {
        let mut s = [0f32; LANES];
        let look = i / BLOCK == max_block;
        for b in i..(i + BLOCK).min(full) {
            // One cache line of the next run per block: by the end of this pass it is all in
            // cache, so the next run's first pass does not stall on memory (measured: the two
            // passes otherwise serialise DRAM time and compute time).
            prefetch(ahead, b * LANES * N);
            let v = load(&bytes[b * LANES * N..(b + 1) * LANES * N]);
            if look && idx.is_none() && v.iter().fold(false, |a, &x| a | (x == mx)) {
                idx = v.iter().position(|&x| x == mx).map(|k| b * LANES + k);
            }
            let e = exp16(std::array::from_fn(|k| v[k] - mx));
            for k in 0..LANES {
                s[k] += e[k];
            }
        }
        total += s.iter().map(|&x| f64::from(x)).sum::<f64>();
    }
    (total, idx)
}

/// [`scan_typed`] with the portable passes, given a block loader and an `exp`.
#[inline(always)]
fn two_passes<const FMA: bool, const N: usize>(
    bytes: &[u8],
    ahead: &[u8],
    get: impl Fn(&[u8]) -> f32 + Copy,
    load: impl Fn(&[u8]) -> [f32; LANES] + Copy,
    exp16: impl Fn([f32; LANES]) -> [f32; LANES] + Copy,
) -> Partial {
    scan_typed::<FMA, N>(
        bytes,
        ahead,
        get,
        |b, full| max_pass::<N>(b, full, load),
        |b, a, full, mx, p1| sum_pass::<N>(b, a, full, mx, p1.block, load, exp16),
    )
}

/// The two passes over one run of logits of `N` bytes each: `pass1` and `pass2` over whole
/// vectors, the last `< LANES` logits (decoded by `get`) here.
#[inline(always)]
fn scan_typed<const FMA: bool, const N: usize>(
    bytes: &[u8],
    ahead: &[u8],
    get: impl Fn(&[u8]) -> f32 + Copy,
    pass1: impl Fn(&[u8], usize) -> Pass1,
    pass2: impl Fn(&[u8], &[u8], usize, f32, &Pass1) -> (f64, Option<usize>),
) -> Partial {
    let n = bytes.len() / N;
    let full = n / LANES;
    let tail: Vec<f32> = (full * LANES..n).map(|j| get(&bytes[j * N..j * N + N])).collect();

    let p1 = pass1(bytes, full);
    let (mut mx, mut any_bad) = (p1.max, p1.bad);
    for &v in &tail {
        mx = mx.max(v);
        any_bad |= v.is_nan() | (v == f32::INFINITY);
    }
    if any_bad || mx == f32::NEG_INFINITY {
        return Partial { m: mx, s: 0.0, idx: None, bad: any_bad };
    }
    let (mut total, idx) = pass2(bytes, ahead, full, mx, &p1);
    total += tail.iter().map(|&v| f64::from(exp_neg::<FMA>(v - mx))).sum::<f64>();
    let idx = idx.or_else(|| tail.iter().position(|&x| x == mx).map(|j| full * LANES + j));
    Partial { m: mx, s: total, idx, bad: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_range_that_matters() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            for got in [exp_neg::<true>(x), exp_neg::<false>(x)] {
                let want = f64::from(x).exp();
                worst = worst.max(((f64::from(got) - want) / want).abs());
            }
            x += 0.000_73;
        }
        // A few ulp of f32 (one ulp is 6e-8 to 1.2e-7 relative).
        assert!(worst < 3e-7, "worst relative error {worst:e}");
        assert_eq!(exp_neg::<true>(0.0), 1.0);
        assert!(exp_neg::<true>(f32::NEG_INFINITY) < 2e-38);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_exp_is_accurate() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 on this machine: exp16_avx512 not tested");
            return;
        }
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let xs: [f32; 16] = std::array::from_fn(|k| (x - k as f32 * 0.000_011).max(-87.0));
            // SAFETY: AVX-512F checked above.
            let got = unsafe { x86::exp16_avx512::<true>(xs) };
            for k in 0..16 {
                let want = f64::from(xs[k]).exp();
                worst = worst.max(((f64::from(got[k]) - want) / want).abs());
            }
            x += 0.000_73;
        }
        assert!(worst < 3e-7, "worst relative error {worst:e}");
    }

    /// The integer max pass of both 16-bit formats against the float one, on every pattern and
    /// on rows built to catch its corners: signed zeros in different blocks, NaNs of either
    /// sign, infinities, an odd number of vectors.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn integer_max_pass_matches_the_float_one() {
        if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw")) {
            eprintln!("no AVX-512BW on this machine: half_max_pass_avx512 not tested");
            return;
        }
        for dtype in [Dtype::BF16, Dtype::F16] {
            let get = if dtype == Dtype::BF16 { get_bf16 } else { get_f16 };
            let check = |pats: &[u16]| {
                let bytes: Vec<u8> = pats.iter().flat_map(|p| p.to_le_bytes()).collect();
                let full = pats.len() / LANES;
                let want = max_pass::<2>(&bytes, full, block_of::<2>(get));
                // SAFETY: AVX-512F/BW checked above.
                let got = unsafe {
                    match dtype {
                        Dtype::BF16 => x86::half_max_pass_avx512::<{ x86::BF16_INF }>(&bytes, full, |p| {
                            f32::from_bits(u32::from(p) << 16)
                        }),
                        _ => x86::half_max_pass_avx512::<{ x86::F16_INF }>(&bytes, full, f16_to_f32),
                    }
                };
                assert_eq!(got.bad, want.bad, "{dtype}: bad flag, {full} vectors");
                if !want.bad {
                    assert!(got.max == want.max, "{dtype}: max {} vs {}", got.max, want.max);
                    assert_eq!(got.block, want.block, "{dtype}: block of the max");
                    let lowest =
                        pats[..full * LANES].iter().map(|&p| get(&p.to_le_bytes())).fold(f32::INFINITY, f32::min);
                    assert!(got.lowest == lowest, "{dtype}: lowest {} vs {lowest}", got.lowest);
                }
            };
            let (neg_inf, pos_inf) = if dtype == Dtype::BF16 { (0xff80u16, 0x7f80u16) } else { (0xfc00, 0x7c00) };
            // Every pattern, in vectors of 16: each vector on its own, with -inf elsewhere.
            for p in (0..=u16::MAX).step_by(16) {
                let mut row = vec![neg_inf; 3 * 16];
                for k in 0..16 {
                    row[16 + k] = p + k as u16;
                }
                check(&row);
            }
            let len = 5 * BLOCK * LANES + 16; // an odd number of vectors over several blocks
            let values: Vec<f32> = (0..len).map(|i| -((i % 97) as f32) - 1.0).collect();
            let mut row: Vec<u16> = bytemuck::cast_slice::<u8, u16>(&dtype.encode(&values)).to_vec();
            check(&row);
            row[3] = 0x8000; // -0 early, +0 in a later block: equal, so the first block holds the max
            row[2 * BLOCK * LANES + 5] = 0x0000;
            check(&row);
            for (at, p) in
                [(7, pos_inf), (len - 20, neg_inf | 0x41), (len - 1, pos_inf | 0x40), (BLOCK * LANES, neg_inf)]
            {
                let mut r = row.clone();
                r[at] = p;
                check(&r);
            }
        }
    }

    #[test]
    fn f16_conversion_matches_half() {
        for bits in 0..=u16::MAX {
            let want = half::f16::from_bits(bits).to_f32();
            let got = f16_to_f32(bits);
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{bits:#x}: {got} vs {want}");
        }
    }

    /// Every instruction set (and, for bf16 on AVX-512, the paired even/odd pass with and without
    /// the clamp) against the portable code, over lengths that leave every kind of remainder.
    #[test]
    fn every_isa_this_machine_has_agrees() {
        let rows = |n: usize, spread: f32| -> Vec<Vec<f32>> {
            let base: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 * spread - spread / 2.0).collect();
            let mut tie = base.clone(); // the max twice, the later one in an odd lane
            let m = base.iter().copied().fold(f32::MIN, f32::max) + 1.0;
            tie[((n / 2) | 1) % n] = m;
            tie[n - 1] = m;
            let mut zeros = vec![-1.0f32; n]; // max 0, as -0 first, then +0
            zeros[n / 3] = -0.0;
            zeros[(n / 3 + 1) % n] = 0.0;
            let mut neg_inf = base.clone();
            neg_inf[n / 4] = f32::NEG_INFINITY;
            vec![base, tie, zeros, neg_inf]
        };
        for n in [1, 15, 16, 17, 31, 32, 33, 48, 1000, 1024, 1040, 2048 + 16, 5000, 70_001] {
            for spread in [20.0, 300.0] {
                for x in rows(n, spread) {
                    for dtype in [Dtype::F32, Dtype::BF16, Dtype::F16] {
                        let bytes = dtype.encode(&x);
                        let a = scan_generic::<false>(dtype, &bytes, &[]);
                        let avx2 = cfg!(target_arch = "x86_64") && Isa::detect() != Isa::Portable;
                        for isa in [Isa::detect(), Isa::Portable].into_iter().chain(avx2.then_some(Isa::Avx2)) {
                            let b = scan(isa, dtype, &bytes, &[]);
                            let what = format!("{isa:?} {dtype} n={n} spread={spread}");
                            assert_eq!(a.idx, b.idx, "{what}");
                            assert_eq!(a.m, b.m, "{what}");
                            assert!((a.s - b.s).abs() <= 1e-6 * a.s, "{what}: {} vs {}", a.s, b.s);
                        }
                    }
                }
            }
        }
    }
}
