//! The fast CPU path for KL divergence: SIMD, multi-threaded, each row pair read from memory once.
//! Same outputs and semantics as the GPU kernel ([`KldRow`]); merges and finishing are
//! [`super::math`]'s.
//!
//! A run of a row pair (at most `PART` = 32k logits of each side, so that both stay in L2) is scanned
//! twice: pass 1 finds both maxima, their first indices and any NaN / `+inf`; pass 2, from cache,
//! sums `exp(a − m_a)`, `exp(b − m_b)`, `w·g(e)` and `w·expm1(−e)` with the centre `c` fixed to
//! `a − b` at the base's argmax — so no rescaling or re-centring happens inside a run, and the loop
//! vectorises fully: two `exp`s and a degree-9 polynomial per logit pair. The `exp(−e)` the terms
//! need where `|e| ≥ 1/2` is `exp(b − b_c)·…`, obtained as `exp(b − m_b)·exp(m_b − b_c)` (one
//! multiply) whenever `m_b − b_c ≤ 20`, which holds for any pair of related models; otherwise a
//! direct `exp` is taken per logit (correct, slower). Runtime dispatch (AVX-512, AVX2+FMA,
//! portable) as in [`crate::cpu`], whose loaders and vector `exp` it shares.

use rayon::prelude::*;

use super::math::Partial;
use super::reference::kernel_targets;
use super::KldRow;
use crate::cpu::{block_of, exp16, fma, get_bf16, get_f16, get_f32, prefetch, Isa, LANES, PORTABLE_FMA};
use crate::error::Result;
use crate::problem::{Dtype, Logits, Options, Targets};

/// Logits per run of a row: 32k f32 per side = 256 KiB for the pair, comfortably inside L2.
const PART: usize = 1 << 15;
/// Vectors per block: lanes sum in f32 within a block, blocks in f64.
const BLOCK: usize = 64;

/// Compares every row pair on the CPU.
///
/// # Errors
/// As [`kernel_targets`]: different shapes, a row-count mismatch, a target out of range.
pub fn kld(base: Logits<'_>, test: Logits<'_>, targets: Option<Targets<'_>>, opts: &Options) -> Result<Vec<KldRow>> {
    let t = kernel_targets(base, test, targets, opts)?;
    Ok(kld_validated(base, test, &t))
}

/// Compares rows whose shapes and targets are already checked, on every thread: across rows, and
/// across runs of a row when rows are fewer than threads or longer than [`PART`].
pub(crate) fn kld_validated(base: Logits<'_>, test: Logits<'_>, targets: &[u32]) -> Vec<KldRow> {
    let threads = rayon::current_num_threads();
    let parts = base.vocab().div_ceil(PART).max(threads.div_ceil(base.rows().max(1)));
    let plan = Plan::new(base.vocab(), parts);
    let isa = Isa::detect();
    let states: Vec<Partial> =
        (0..base.rows() * plan.parts).into_par_iter().map(|u| plan.scan(isa, base, test, u)).collect();
    states
        .par_chunks(plan.parts)
        .zip(targets.par_iter())
        .enumerate()
        .map(|(r, (ps, &t))| finish_row(base, test, r, ps, t))
        .collect()
}

/// Compares rows one after another on the calling thread (runs of at most [`PART`], the same cut
/// [`kld_validated`] makes when rows are at least as many as threads, so both give the same bits).
pub(crate) fn kld_sequential(base: Logits<'_>, test: Logits<'_>, targets: &[u32]) -> Vec<KldRow> {
    let plan = Plan::new(base.vocab(), base.vocab().div_ceil(PART));
    let isa = Isa::detect();
    let mut states = Vec::with_capacity(plan.parts);
    (0..base.rows())
        .map(|r| {
            states.clear();
            states.extend((0..plan.parts).map(|p| plan.scan(isa, base, test, r * plan.parts + p)));
            finish_row(base, test, r, &states, targets[r])
        })
        .collect()
}

fn finish_row(base: Logits<'_>, test: Logits<'_>, r: usize, parts: &[Partial], t: u32) -> KldRow {
    let st = parts.iter().skip(1).fold(parts[0], |a, b| a.merge(b));
    let (a_t, b_t) =
        if t < base.vocab() as u32 { (base.get(r, t as usize), test.get(r, t as usize)) } else { (0.0, 0.0) };
    st.finish(t, a_t, b_t)
}

/// How rows are cut: `parts` runs of `len` logits (a multiple of the lane count).
#[derive(Debug, Clone, Copy)]
struct Plan {
    parts: usize,
    len: usize,
}

impl Plan {
    fn new(vocab: usize, parts: usize) -> Plan {
        let parts = parts.min(vocab.div_ceil(LANES * 64)).max(1);
        let len = vocab.div_ceil(parts).next_multiple_of(LANES);
        Plan { parts: vocab.div_ceil(len).max(1), len }
    }

    /// Scans unit `u` (row `u / parts`, run `u % parts`).
    fn scan(&self, isa: Isa, base: Logits<'_>, test: Logits<'_>, u: usize) -> Partial {
        let (r, p) = (u / self.parts, u % self.parts);
        let lo = p * self.len;
        let hi = (lo + self.len).min(base.vocab());
        let (a, a_next) = run(base, r, lo, hi);
        let (b, b_next) = run(test, r, lo, hi);
        let mut st = scan(isa, base.dtype(), test.dtype(), [a, b], [a_next, b_next]);
        st.idx_a = st.idx_a.map(|i| i + lo);
        st.idx_b = st.idx_b.map(|i| i + lo);
        st
    }
}

/// Logits `lo..hi` of row `r`, and as many bytes after them (the next run, to prefetch).
fn run<'a>(x: Logits<'a>, r: usize, lo: usize, hi: usize) -> (&'a [u8], &'a [u8]) {
    let (es, rb, bytes) = (x.dtype().size(), x.row_bytes(), x.bytes());
    let at = r * rb + hi * es;
    (&bytes[r * rb + lo * es..at], &bytes[at..(at + (hi - lo) * es).min(bytes.len())])
}

/// Both sides' runs (`[base, test]`) and the bytes that follow them (prefetched during pass 2).
type Runs<'a> = [&'a [u8]; 2];

/// Calls `$go!(NA, load_a, NB, load_b)` with the element sizes and block loaders of both dtypes.
macro_rules! for_dtypes {
    ($da:expr, $db:expr, $f32:expr, $bf16:expr, $f16:expr, $go:ident) => {
        match ($da, $db) {
            (Dtype::F32, Dtype::F32) => $go!(4, $f32, 4, $f32),
            (Dtype::F32, Dtype::BF16) => $go!(4, $f32, 2, $bf16),
            (Dtype::F32, Dtype::F16) => $go!(4, $f32, 2, $f16),
            (Dtype::BF16, Dtype::F32) => $go!(2, $bf16, 4, $f32),
            (Dtype::BF16, Dtype::BF16) => $go!(2, $bf16, 2, $bf16),
            (Dtype::BF16, Dtype::F16) => $go!(2, $bf16, 2, $f16),
            (Dtype::F16, Dtype::F32) => $go!(2, $f16, 4, $f32),
            (Dtype::F16, Dtype::BF16) => $go!(2, $f16, 2, $bf16),
            (Dtype::F16, Dtype::F16) => $go!(2, $f16, 2, $f16),
        }
    };
}

/// Scans a run pair with the best instruction set available.
fn scan(isa: Isa, da: Dtype, db: Dtype, runs: Runs<'_>, ahead: Runs<'_>) -> Partial {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` checked these features on this CPU.
        Isa::Avx512 => unsafe { scan_avx512(da, db, runs, ahead) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { scan_avx2(da, db, runs, ahead) },
        _ => scan_portable(da, db, runs, ahead),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn scan_avx512(da: Dtype, db: Dtype, runs: Runs<'_>, ahead: Runs<'_>) -> Partial {
    use crate::cpu::x86::*;
    // SAFETY (all closures): this function runs only where AVX-512F/BW and F16C exist, and the
    // block loaders are given whole 16-element slices.
    let exp = |x| unsafe { exp16_avx512::<true>(x) };
    let f32s = block_of::<4>(get_f32);
    let bf16s = |b: &[u8]| unsafe { bf16x16_avx512(b) };
    let f16s = |b: &[u8]| unsafe { f16x16_avx512(b) };
    macro_rules! go {
        ($na:literal, $la:expr, $nb:literal, $lb:expr) => {
            pair_scan::<true, $na, $nb>(runs, ahead, $la, $lb, exp)
        };
    }
    for_dtypes!(da, db, f32s, bf16s, f16s, go)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scan_avx2(da: Dtype, db: Dtype, runs: Runs<'_>, ahead: Runs<'_>) -> Partial {
    use crate::cpu::x86::*;
    let f32s = block_of::<4>(get_f32);
    // SAFETY: this function runs only where AVX2 and F16C exist; slices are 32 bytes.
    let bf16s = |b: &[u8]| unsafe { bf16x16_avx2(b) };
    let f16s = |b: &[u8]| unsafe { f16x16_avx2(b) };
    macro_rules! go {
        ($na:literal, $la:expr, $nb:literal, $lb:expr) => {
            pair_scan::<true, $na, $nb>(runs, ahead, $la, $lb, exp16::<true>)
        };
    }
    for_dtypes!(da, db, f32s, bf16s, f16s, go)
}

fn scan_portable(da: Dtype, db: Dtype, runs: Runs<'_>, ahead: Runs<'_>) -> Partial {
    let f32s = block_of::<4>(get_f32);
    let bf16s = block_of::<2>(get_bf16);
    let f16s = block_of::<2>(get_f16);
    macro_rules! go {
        ($na:literal, $la:expr, $nb:literal, $lb:expr) => {
            pair_scan::<PORTABLE_FMA, $na, $nb>(runs, ahead, $la, $lb, exp16::<PORTABLE_FMA>)
        };
    }
    for_dtypes!(da, db, f32s, bf16s, f16s, go)
}

/// Pass 1 of one side: the max (NaN skipped), the lowest value, whether a NaN or `+inf` occurs,
/// and the first index of the max (looked for in the one block of [`BLOCK`] vectors that first
/// holds it). `tail` holds the values after the last whole vector.
// `!(v < inf)` is meant: it is true for NaN as well as +inf.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
#[inline(always)]
fn max_pass<const N: usize>(
    bytes: &[u8],
    full: usize,
    tail: &[f32],
    load: impl Fn(&[u8]) -> [f32; LANES] + Copy,
) -> Pass1 {
    let mut m = [f32::NEG_INFINITY; LANES];
    let mut lo = [f32::INFINITY; LANES];
    let mut bad = [false; LANES];
    let (mut best, mut best_block) = (f32::NEG_INFINITY, 0);
    for (blk, i0) in (0..full).step_by(BLOCK).enumerate() {
        for i in i0..(i0 + BLOCK).min(full) {
            max_vec(&mut m, &mut lo, &mut bad, load(&bytes[i * LANES * N..(i + 1) * LANES * N]));
        }
        let h = m.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if h > best {
            (best, best_block) = (h, blk);
        }
    }
    let mut lowest = lo.iter().copied().fold(f32::INFINITY, f32::min);
    let mut any_bad = bad.iter().any(|&b| b);
    let mut tail_best = None;
    for (k, &v) in tail.iter().enumerate() {
        any_bad |= !(v < f32::INFINITY);
        lowest = lowest.min(v);
        if v > best {
            best = v;
            tail_best = Some(full * LANES + k);
        }
    }
    let idx = match tail_best {
        Some(i) => Some(i),
        None if best > f32::NEG_INFINITY => {
            let lo = best_block * BLOCK;
            (lo..(lo + BLOCK).min(full))
                .find_map(|i| {
                    let v = load(&bytes[i * LANES * N..(i + 1) * LANES * N]);
                    v.iter().position(|&x| x == best).map(|k| i * LANES + k)
                })
                .or_else(|| tail.iter().position(|&x| x == best).map(|k| full * LANES + k))
        }
        None => None,
    };
    Pass1 { max: best, lowest, bad: any_bad, idx }
}

/// What pass 1 learns of one side of a run.
struct Pass1 {
    max: f32,
    lowest: f32,
    bad: bool,
    idx: Option<usize>,
}

/// One vector of pass 1. (Hot code is in functions, never closures: a closure defined outside the
/// `#[target_feature]` function would be compiled for the baseline instruction set.)
// `!(v < inf)` is meant: it is true for NaN as well as +inf.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
#[inline(always)]
fn max_vec(m: &mut [f32; LANES], lo: &mut [f32; LANES], bad: &mut [bool; LANES], v: [f32; LANES]) {
    for k in 0..LANES {
        m[k] = if v[k] > m[k] { v[k] } else { m[k] };
        lo[k] = if v[k] < lo[k] { v[k] } else { lo[k] };
        bad[k] |= !(v[k] < f32::INFINITY);
    }
}

#[allow(clippy::neg_cmp_op_on_partial_ord)]
/// The two passes over one run pair of `N*`-byte logits; the last `< LANES` logits of each side
/// are padded with −inf, which contributes nothing.
#[inline(always)]
fn pair_scan<const FMA: bool, const NA: usize, const NB: usize>(
    runs: Runs<'_>,
    ahead: Runs<'_>,
    la: impl Fn(&[u8]) -> [f32; LANES] + Copy,
    lb: impl Fn(&[u8]) -> [f32; LANES] + Copy,
    exp16: impl Fn([f32; LANES]) -> [f32; LANES] + Copy,
) -> Partial {
    let [a, b] = runs;
    let n = a.len() / NA;
    let full = n / LANES;
    // The tails through the same loaders (on a padded copy), so both sides decode identically.
    let pad = |bytes: &[u8], size: usize, load: &dyn Fn(&[u8]) -> [f32; LANES]| -> [f32; LANES] {
        let mut buf = [0u8; LANES * 4];
        let rest = &bytes[full * LANES * size..];
        buf[..rest.len()].copy_from_slice(rest);
        let v = load(&buf[..LANES * size]);
        std::array::from_fn(|k| if k < rest.len() / size { v[k] } else { f32::NEG_INFINITY })
    };
    let (ta, tb) = (pad(a, NA, &la), pad(b, NB, &lb));
    let tail_len = n - full * LANES;
    let pa = max_pass::<NA>(a, full, &ta[..tail_len], la);
    let pb = max_pass::<NB>(b, full, &tb[..tail_len], lb);
    let (ma, mb) = (pa.max, pb.max);
    let mut st = Partial { ma, mb, idx_a: pa.idx, idx_b: pb.idx, bad: pa.bad || pb.bad, ..Partial::empty() };
    // A run where one side is all −inf still holds the other side's mass: only a run empty on
    // both sides (or a broken one) has nothing to sum.
    if st.bad || (pa.idx.is_none() && pb.idx.is_none()) {
        return st;
    }
    // Base logits more than 87 below the max (−inf included) count as p = 0: their weight is below
    // e^-87 relative (nothing to the sums), but the clamped exp would give them e^-87 times a huge
    // e. Their test mass goes to `zb`, exactly. Without them, and without −inf on the test side,
    // pass 2 needs no masking.
    let masked = !(pa.lowest - ma >= -87.0) || pb.lowest == f32::NEG_INFINITY;
    let at = |bytes: &[u8], size: usize, load: &dyn Fn(&[u8]) -> [f32; LANES], t: &[f32; LANES], i: usize| {
        if i < full * LANES {
            load(&bytes[i / LANES * LANES * size..(i / LANES + 1) * LANES * size])[i % LANES]
        } else {
            t[i - full * LANES]
        }
    };
    // No base max in this run (all −inf): no centre, and every term is masked.
    let b_c = pa.idx.map_or(f32::NAN, |ia| at(b, NB, &lb, &tb, ia));
    let c = ma - b_c;
    st.c = if c.is_finite() { c } else { 0.0 };
    let spread = mb - b_c;
    let p = Consts { ma, mb, c: st.c, b_c, k: spread.exp() };
    let sums = match (spread <= 20.0, masked) {
        (true, false) => sum_pass::<FMA, NA, NB, false, false>(runs, ahead, full, [ta, tb], &p, la, lb, exp16),
        (true, true) => sum_pass::<FMA, NA, NB, false, true>(runs, ahead, full, [ta, tb], &p, la, lb, exp16),
        (false, _) => sum_pass::<FMA, NA, NB, true, true>(runs, ahead, full, [ta, tb], &p, la, lb, exp16),
    };
    [st.sa, st.sb, st.g, st.y, st.mm, st.zb] = sums;
    st
}

/// What pass 2 holds fixed over a run.
struct Consts {
    ma: f32,
    mb: f32,
    c: f32,
    b_c: f32,
    k: f32,
}

/// Adds one vector pair's terms to the lane sums `t`: `exp(a − ma)`, `exp(b − mb)`, `w·g(e)`,
/// `w·expm1(−e)`, `w·e`, and `exp(b − mb)` where the base is −inf (−inf logits contribute
/// nothing). (Returning the terms for the caller to add, or iterating with `chunks_exact`, made
/// the f32 loop 2× slower on the dev machine: measured.)
#[inline(always)]
fn add_pair<const FMA: bool, const DIRECT: bool, const MASKED: bool>(
    t: &mut [[f32; LANES]; 6],
    xa: [f32; LANES],
    xb: [f32; LANES],
    p: &Consts,
    exp16: impl Fn([f32; LANES]) -> [f32; LANES],
) {
    let w = exp16(std::array::from_fn(|j| xa[j] - p.ma));
    let u = exp16(std::array::from_fn(|j| xb[j] - p.mb));
    let v: [f32; LANES] =
        if DIRECT { std::array::from_fn(|j| (xb[j] - p.b_c).exp()) } else { std::array::from_fn(|j| u[j] * p.k) };
    for j in 0..LANES {
        // Without −inf anywhere (`!MASKED`) every logit is in, and the selects compile away.
        let (a_in, b_in) = if MASKED { (xa[j] - p.ma > -87.0, xb[j] > f32::NEG_INFINITY) } else { (true, true) };
        let w = if a_in { w[j] } else { 0.0 };
        let u = if b_in { u[j] } else { 0.0 };
        let v = if b_in { v[j] } else { 0.0 };
        let e = (xa[j] - xb[j]) - p.c;
        let q = g_poly::<FMA>(e);
        let small = e.abs() < 0.5;
        let tg = if small { w * q } else { fma::<FMA>(w, e - 1.0, v) };
        let ty = if small { w * (q - e) } else { v - w };
        t[0][j] += w;
        t[1][j] += u;
        t[2][j] += if a_in { tg } else { 0.0 };
        t[3][j] += if a_in { ty } else { 0.0 };
        t[4][j] += if a_in { w * e } else { 0.0 };
        if MASKED {
            t[5][j] += if a_in { 0.0 } else { u };
        }
    }
}

/// [`super::math::g_series`] (the same coefficients, so the same values to rounding) with fused multiply-adds
/// where the instruction set has them.
#[inline(always)]
fn g_poly<const FMA: bool>(e: f32) -> f32 {
    const C: [f32; 8] = super::math::G_COEFFICIENTS;
    let mut p = C[7];
    for &k in C[..7].iter().rev() {
        p = fma::<FMA>(p, e, k);
    }
    e * e * p
}

/// Lane sums of pass 2: f32 within a block of [`BLOCK`] vectors, then flushed to f64.
#[derive(Default)]
struct Acc {
    s: [[f32; LANES]; 6],
}

impl Acc {
    #[inline(always)]
    fn flush(&mut self, total: &mut [f64; 6]) {
        for (t, l) in total.iter_mut().zip(self.s.iter_mut()) {
            *t += l.iter().map(|&x| f64::from(x)).sum::<f64>();
            *l = [0.0; LANES];
        }
    }
}

/// Pass 2: `[Σ exp(a − ma), Σ exp(b − mb), Σ w·g(e), Σ w·expm1(−e), Σ w·e, Σ_{a = −inf} exp(b − mb)]`. `exp(−e)·w = exp(b − b_c)`
/// is `exp(b − mb)·k` (`k = exp(mb − b_c)`), or with `DIRECT` a separate `exp`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn sum_pass<const FMA: bool, const NA: usize, const NB: usize, const DIRECT: bool, const MASKED: bool>(
    runs: Runs<'_>,
    ahead: Runs<'_>,
    full: usize,
    tails: [[f32; LANES]; 2],
    consts: &Consts,
    la: impl Fn(&[u8]) -> [f32; LANES] + Copy,
    lb: impl Fn(&[u8]) -> [f32; LANES] + Copy,
    exp16: impl Fn([f32; LANES]) -> [f32; LANES] + Copy,
) -> [f64; 6] {
    let [a, b] = runs;
    let mut total = [0f64; 6];
    let mut acc = Acc::default();
    for i0 in (0..full).step_by(BLOCK) {
        for i in i0..(i0 + BLOCK).min(full) {
            prefetch(ahead[0], i * LANES * NA);
            prefetch(ahead[1], i * LANES * NB);
            let xa = la(&a[i * LANES * NA..(i + 1) * LANES * NA]);
            let xb = lb(&b[i * LANES * NB..(i + 1) * LANES * NB]);
            add_pair::<FMA, DIRECT, MASKED>(&mut acc.s, xa, xb, consts, exp16);
        }
        acc.flush(&mut total);
    }
    // The tails are padded with −inf: always masked.
    add_pair::<FMA, DIRECT, true>(&mut acc.s, tails[0], tails[1], consts, exp16);
    acc.flush(&mut total);
    total
}
