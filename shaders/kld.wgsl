// Fused KL divergence between two models' logits over the same tokens, both rows read once:
// base `a` (distribution P, dtype DTYPE_A) and test `b` (Q, dtype DTYPE_B). Preceded by
// online_softmax.wgsl and followed by one reduction (reduce_workgroup.wgsl, or kld_subgroup.wgsl +
// reduce_subgroup.wgsl when the device has Features::SUBGROUP).
//
// The per-element maths, the state, its merge and the finish follow the crate's `kld::math`
// (the CPU path) line for line, in f32. With w = exp(a - ma), e = (a - b) - c for the centre c
// (a - b at the element that last raised ma), g(e) = e + expm1(-e):
//     sa = Σ w,   g = Σ w·g(e),   y = Σ w·expm1(-e),   G = g/sa,   Y = y/sa
//     kld = G - h(Y),  h(Y) = Y - log1p(Y)
// Every quantity is small when the models are close: no large numbers are subtracted. The test
// side keeps its own online (mb, sb) for nll_test and as a cross-check of Y.
//
// Additions to kld::math for f32, which change no value in exact arithmetic:
// - t = Σ w·e (= g - y) is kept too. A run whose centre lies far above the final one holds g
//   and y inflated by up to exp(|delta|), where g - y cancels away every digit of f32; with t,
//   a re-centre by |delta| >= 1/2 is products only, done in one step with the rescale to a new
//   max (`moved`), and the finish takes G - Y as T (k2, and k1 = T + log1p(Y) where |Y| > 1/2).
// - zb = Σ exp(b - mb) over the entries where a = -inf (q > 0 = p), beside sb: the test mass that
//   y leaves out. The finish adds Z = zb·exp(mb - ma + c)/sa to G and Y, which makes G - h(Y)
//   the exact KLD there too (without it, k1 is off by -log(1 - q_masked) whenever that is under
//   the 1e-3 cross-check).
// - lse_a - c - lse_b is evaluated as ((ma - mb) - c) + (la - lb): exact for huge, nearly equal
//   logits.
//
// Work units, splitting, rows per workgroup and the reductions are those of forward.wgsl. The
// two sides are read in groups of `group_len()` logits (4 when both are f32, else 8) that start
// where the side with more logits per vec4<u32> is 16-byte aligned; the other side is read as
// vec4s too when its row happens to be aligned the same way (always for dense rows, which both
// start at element row·vocab), else as single words.

// 0 = f32, 1 = f16, 2 = bf16 (DT_* in online_softmax.wgsl), for each side independently.
override DTYPE_A: u32 = 0u;
override DTYPE_B: u32 = 0u;
// Invocations per workgroup (see forward.wgsl); the host lowers it for small adapters.
override WG_SIZE: u32 = 256u;
// Rows per workgroup (a power of two dividing WG_SIZE), for short rows.
override ROWS_PER_WG: u32 = 1u;

const FLAG_IGNORED: u32 = 1u;
const FLAG_SAME_TOP: u32 = 2u;
const FLAG_BAD_TARGET: u32 = 4u;
const FLAG_HAS_TARGET: u32 = 8u;
// The target value meaning "no target given for this row" (the host's kld::NO_TARGET).
const NO_TARGET: u32 = 0xfffffffeu;

// `Params`, the uniform every kernel of the family reads, is in online_softmax.wgsl.

// The host's `kld::KldRow` (32 bytes).
struct KldRow {
    kld: f32,
    nll_base: f32,
    nll_test: f32,
    dp: f32,
    argmax_base: u32,
    argmax_test: u32,
    flags: u32,
    pad: u32,
}

// The state of a scanned run (56 bytes: `partials` and workgroup memory hold it as is).
struct State {
    // Online max of a and Σ exp(a - ma).
    ma: f32,
    sa: f32,
    // The centre, and Σ w·g(e), Σ w·expm1(-e), Σ w·e around it.
    c: f32,
    g: f32,
    y: f32,
    t: f32,
    // The test side's own online (max, sum), and the part of the sum where a = -inf.
    b: MaxSum,
    zb: f32,
    top_a: Top,
    top_b: Top,
    // A NaN or +inf on either side.
    bad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> base4: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<KldRow>;
// The same window of base logits as `base4`, as single words.
@group(0) @binding(4) var<storage, read> base1: array<u32>;
// Partial states of split rows, `split` per row.
@group(0) @binding(5) var<storage, read_write> partials: array<State>;
@group(0) @binding(6) var<storage, read> test4: array<vec4<u32>>;
@group(0) @binding(7) var<storage, read> test1: array<u32>;

fn empty_state() -> State {
    return State(LOWEST, 0.0, 0.0, 0.0, 0.0, 0.0, max_sum_empty(), 0.0, top_empty(), top_empty(), 0u);
}

// ---- the maths of kld::math ----

// g(e) = e - 1 + exp(-e) by its Taylor series, for |e| < 1/2.
fn g_series(e: f32) -> f32 {
    var p = -1.0 / 362880.0;
    p = p * e + 1.0 / 40320.0;
    p = p * e - 1.0 / 5040.0;
    p = p * e + 1.0 / 720.0;
    p = p * e - 1.0 / 120.0;
    p = p * e + 1.0 / 24.0;
    p = p * e - 1.0 / 6.0;
    p = p * e + 0.5;
    return e * e * p;
}

fn g_series4(e: vec4<f32>) -> vec4<f32> {
    var p = vec4<f32>(-1.0 / 362880.0);
    p = p * e + 1.0 / 40320.0;
    p = p * e - 1.0 / 5040.0;
    p = p * e + 1.0 / 720.0;
    p = p * e - 1.0 / 120.0;
    p = p * e + 1.0 / 24.0;
    p = p * e - 1.0 / 6.0;
    p = p * e + 0.5;
    return e * e * p;
}

// g(x) = x + expm1(-x), any x.
fn gfun(x: f32) -> f32 {
    if abs(x) < 0.5 {
        return g_series(x);
    }
    return x - 1.0 + exp(-x);
}

// h(y) = y - log1p(y) (>= 0), through log1p(y) = 2 atanh(y / (2 + y)) where |y| <= 1/2.
fn hfun(y: f32) -> f32 {
    if abs(y) <= 0.5 {
        let s = y / (2.0 + y);
        let s2 = s * s;
        let p = 1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0
            + s2 * (1.0 / 13.0 + s2 / 15.0)))));
        return y * y / (2.0 + y) - 2.0 * s * s2 * p;
    }
    return y - log(1.0 + y);
}

// Moves the centre to `c` (when finite; else keeps it) and the base max to `m` (>= st.ma) in
// one step, exactly: with f = exp(ma - m) and delta = c - c_old,
//   |delta| < 1/2: D = g(-delta), E = D + delta = expm1(delta) (kld::math's re-centre), then
//       sa' = f·sa,  g' = f·(g + sa·D + E·y),  y' = f·(E·sa + (1 + E)·y),  t' = f·(t - delta·sa)
//   otherwise products only, with the two exponents in one exp (their sum is a difference of
//   two test logits: in range even where delta and ma - m are not):
//       sa' = f·sa,  t' = f·t - delta·sa',  y' = exp(delta + ma - m)·(y + sa) - sa',  g' = t' + y'
// so that neither inflated sums (a centre far above the new one) nor inf·0 (a run far below the
// new max, re-centred far up) can spoil them. A state with sa == 0 just takes `c` and `m`.
fn moved(st: State, c: f32, m: f32) -> State {
    var r = st;
    r.ma = m;
    if st.sa == 0.0 {
        r.c = select(st.c, c, is_finite(c));
        return r;
    }
    let f = exp(st.ma - m);
    r.sa = f * st.sa;
    if !is_finite(c) {
        r.g = f * st.g;
        r.y = f * st.y;
        r.t = f * st.t;
        return r;
    }
    let delta = c - st.c;
    if abs(delta) < 0.5 {
        let d = g_series(-delta);
        let e = d + delta;
        r.g = f * (st.g + st.sa * d + e * st.y);
        r.y = f * (e * st.sa + (1.0 + e) * st.y);
        r.t = f * (st.t - delta * st.sa);
    } else {
        r.t = f * st.t - delta * r.sa;
        r.y = exp(delta + (st.ma - m)) * (st.y + st.sa) - r.sa;
        r.g = r.t + r.y;
    }
    r.c = c;
    return r;
}

// Four base logits `va` and test logits `vb` at row indices j..j+3. When the group raises the
// base max: one rescale, and one re-centre to the element holding the new max (the first of
// equal ones); then every element's terms.
fn push4(st: ptr<function, State>, va: vec4<f32>, vb: vec4<f32>, j: u32) {
    let vm = max4(va);
    if vm > (*st).ma {
        let k = first_of4(va, vm);
        let bk = select(select(select(vb.w, vb.z, k == 2u), vb.y, k == 1u), vb.x, k == 0u);
        *st = moved(*st, vm - bk, vm);
    }
    let am = va - vec4<f32>((*st).ma);
    let w = exp(am);
    let e = (va - vb) - vec4<f32>((*st).c);
    let small = abs(e) < vec4<f32>(0.5);
    let q = g_series4(e);
    // exp(b - ma + c) = w·exp(-e): 0 where b is -inf.
    let v = exp(am - e);
    // |e| < 1/2: the series; else the terms directly (never e + exp(-e) - 1 with a large exp).
    var dg = select(w * (e - 1.0) + v, w * q, small);
    let dy = select(v - w, w * (q - e), small);
    var dt = w * e;
    // b = -inf where a is finite: q_i = 0 < p_i, KLD = +inf (even where w underflows to 0).
    let q0 = e == vec4<f32>(pos_inf());
    dg = select(dg, vec4<f32>(pos_inf()), q0);
    dt = select(dt, vec4<f32>(pos_inf()), q0);
    // a = -inf contributes nothing here (its e may be NaN); its test mass goes to zb below.
    let masked = va == vec4<f32>(neg_inf());
    let live = !masked;
    let zero = vec4<f32>(0.0);
    let ws = select(zero, w, live);
    let gs = select(zero, dg, live);
    let ys = select(zero, dy, live);
    let ts = select(zero, dt, live);
    (*st).sa += (ws.x + ws.y) + (ws.z + ws.w);
    (*st).g += (gs.x + gs.y) + (gs.z + gs.w);
    (*st).y += (ys.x + ys.y) + (ys.z + ys.w);
    (*st).t += (ts.x + ts.y) + (ts.z + ts.w);
    let old_b = (*st).b;
    (*st).b = max_sum_push4(old_b, vb);
    if (*st).b.m > old_b.m {
        (*st).zb *= exp(old_b.m - (*st).b.m);
    }
    if any(masked) {
        let zs = select(zero, exp(vb - vec4<f32>((*st).b.m)), masked);
        (*st).zb += (zs.x + zs.y) + (zs.z + zs.w);
    }
    (*st).top_a = top_push4((*st).top_a, va, j);
    (*st).top_b = top_push4((*st).top_b, vb, j);
    (*st).bad |= u32(any_bad4(va) || any_bad4(vb));
}

// One logit pair at row index `j`: a group padded with -inf on both sides, which adds nothing.
fn push1(st: ptr<function, State>, a: f32, b: f32, j: u32) {
    let pad = neg_inf();
    push4(st, vec4<f32>(a, pad, pad, pad), vec4<f32>(b, pad, pad, pad), j);
}

// Merges two partial states, `p` before `q` in the row. The centre of the state with the larger
// base max is kept (p's on ties); a state with sa == 0 contributes nothing and imposes no centre.
fn merge(p: State, q: State) -> State {
    var c = p.c;
    if p.sa == 0.0 || (q.sa != 0.0 && q.ma > p.ma) {
        c = q.c;
    }
    let m = max(p.ma, q.ma);
    let pc = moved(p, c, m);
    let qc = moved(q, c, m);
    var r: State;
    r.ma = m;
    r.c = c;
    r.sa = pc.sa + qc.sa;
    r.g = pc.g + qc.g;
    r.y = pc.y + qc.y;
    r.t = pc.t + qc.t;
    r.b = max_sum_merge(p.b, q.b);
    r.zb = p.zb * exp(p.b.m - r.b.m) + q.zb * exp(q.b.m - r.b.m);
    r.top_a = top_merge(p.top_a, q.top_a);
    r.top_b = top_merge(p.top_b, q.top_b);
    r.bad = p.bad | q.bad;
    return r;
}

// ---- reading both rows ----

// Logits per group: one vec4<u32> of the side with more logits per word.
fn group_len() -> u32 { return max(per_vec(DTYPE_A), per_vec(DTYPE_B)); }

fn load_a(i: u32) -> f32 {
    if DTYPE_A == DT_F32 {
        return bitcast<f32>(base1[i]);
    }
    return unpack_half(base1[i >> 1u], (i & 1u) == 1u, DTYPE_A);
}

fn load_b(i: u32) -> f32 {
    if DTYPE_B == DT_F32 {
        return bitcast<f32>(test1[i]);
    }
    return unpack_half(test1[i >> 1u], (i & 1u) == 1u, DTYPE_B);
}

// The word of 16-bit elements starting at the high half of `w0` (`odd`), or `w0` itself.
fn shift_pair(w0: u32, w1: u32, odd: bool) -> u32 {
    return select(w0, (w0 >> 16u) | (w1 << 16u), odd);
}

// The group of logits of side a starting at element `i` of its binding (elements 4-7 only when
// group_len() is 8); `aligned`: `i` is a multiple of per_vec(DTYPE_A), so whole vec4s are read.
fn group_a(i: u32, aligned: bool) -> array<vec4<f32>, 2> {
    var g = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
    if DTYPE_A == DT_F32 {
        if aligned {
            g[0] = bitcast<vec4<f32>>(base4[i >> 2u]);
            if group_len() == 8u {
                g[1] = bitcast<vec4<f32>>(base4[(i >> 2u) + 1u]);
            }
        } else {
            g[0] = bitcast<vec4<f32>>(vec4<u32>(base1[i], base1[i + 1u], base1[i + 2u], base1[i + 3u]));
            if group_len() == 8u {
                g[1] = bitcast<vec4<f32>>(vec4<u32>(base1[i + 4u], base1[i + 5u], base1[i + 6u], base1[i + 7u]));
            }
        }
        return g;
    }
    if aligned {
        return unpack8(base4[i >> 3u], DTYPE_A);
    }
    // Eight 16-bit logits from an even element: four words; from an odd one: five, shifted.
    let k = i >> 1u;
    let odd = (i & 1u) == 1u;
    let w0 = base1[k];
    let w1 = base1[k + 1u];
    let w2 = base1[k + 2u];
    let w3 = base1[k + 3u];
    let w4 = base1[select(k, k + 4u, odd)];
    let w = vec4<u32>(shift_pair(w0, w1, odd), shift_pair(w1, w2, odd), shift_pair(w2, w3, odd), shift_pair(w3, w4, odd));
    return unpack8(w, DTYPE_A);
}

// As `group_a`, for side b.
fn group_b(i: u32, aligned: bool) -> array<vec4<f32>, 2> {
    var g = array<vec4<f32>, 2>(vec4<f32>(0.0), vec4<f32>(0.0));
    if DTYPE_B == DT_F32 {
        if aligned {
            g[0] = bitcast<vec4<f32>>(test4[i >> 2u]);
            if group_len() == 8u {
                g[1] = bitcast<vec4<f32>>(test4[(i >> 2u) + 1u]);
            }
        } else {
            g[0] = bitcast<vec4<f32>>(vec4<u32>(test1[i], test1[i + 1u], test1[i + 2u], test1[i + 3u]));
            if group_len() == 8u {
                g[1] = bitcast<vec4<f32>>(vec4<u32>(test1[i + 4u], test1[i + 5u], test1[i + 6u], test1[i + 7u]));
            }
        }
        return g;
    }
    if aligned {
        return unpack8(test4[i >> 3u], DTYPE_B);
    }
    let k = i >> 1u;
    let odd = (i & 1u) == 1u;
    let w0 = test1[k];
    let w1 = test1[k + 1u];
    let w2 = test1[k + 2u];
    let w3 = test1[k + 3u];
    let w4 = test1[select(k, k + 4u, odd)];
    let w = vec4<u32>(shift_pair(w0, w1, odd), shift_pair(w1, w2, odd), shift_pair(w2, w3, odd), shift_pair(w3, w4, odd));
    return unpack8(w, DTYPE_B);
}

fn row_base_a(row: u32) -> u32 { return params.a_offset + row * params.a_stride; }
fn row_base_b(row: u32) -> u32 { return params.b_offset + row * params.b_stride; }

// Scans row indices [lo, hi) of row `row`, as lane `lane` of `lanes`. Head (before the first
// group boundary), whole groups and tail come in increasing index order for each lane, which the
// first-index argmaxes rely on.
fn scan(st: ptr<function, State>, row: u32, lo: u32, hi: u32, lane: u32, lanes: u32) {
    let ba = row_base_a(row);
    let bb = row_base_b(row);
    let n = group_len();
    // Groups start where the side with more logits per vec4 (a on ties) is aligned.
    let lead = select(ba, bb, per_vec(DTYPE_B) > per_vec(DTYPE_A));
    let v0 = (lead + lo + n - 1u) / n * n - lead;
    if v0 + n > hi {
        for (var e = lo + lane; e < hi; e += lanes) {
            push1(st, load_a(ba + e), load_b(bb + e), e);
        }
        return;
    }
    let groups = (hi - v0) / n;
    let v1 = v0 + groups * n;
    let a_aligned = (ba + v0) % per_vec(DTYPE_A) == 0u;
    let b_aligned = (bb + v0) % per_vec(DTYPE_B) == 0u;
    for (var e = lo + lane; e < v0; e += lanes) {
        push1(st, load_a(ba + e), load_b(bb + e), e);
    }
    for (var k = lane; k < groups; k += lanes) {
        let e = v0 + k * n;
        let ga = group_a(ba + e, a_aligned);
        let gb = group_b(bb + e, b_aligned);
        push4(st, ga[0], gb[0], e);
        if n == 8u {
            push4(st, ga[1], gb[1], e + 4u);
        }
    }
    for (var e = v1 + lane; e < hi; e += lanes) {
        push1(st, load_a(ba + e), load_b(bb + e), e);
    }
}

// ---- results ----

// Writes row `row`'s result from its complete state.
fn finish(row: u32, st: State) {
    let t = targets[params.targets_offset + row];
    var r = KldRow(0.0, 0.0, 0.0, 0.0, 0u, 0u, 0u, 0u);
    if t == params.ignore {
        r.flags = FLAG_IGNORED;
        out[params.out_offset + row] = r;
        return;
    }
    let has_target = t != NO_TARGET;
    // A target >= vocab is only reachable through `encode_kld` on unvalidated targets.
    let target_ok = has_target && t < params.vocab;
    if has_target {
        r.flags = select(FLAG_BAD_TARGET, FLAG_HAS_TARGET, target_ok);
    }
    // A NaN or +inf on either side, or a side of only -inf: NaN, no argmaxes.
    if st.bad != 0u || st.sa == 0.0 || st.b.s == 0.0 {
        r.kld = nan();
        r.argmax_base = NO_INDEX;
        r.argmax_test = NO_INDEX;
        let v = select(0.0, nan(), has_target);
        r.nll_base = v;
        r.nll_test = v;
        r.dp = v;
        out[params.out_offset + row] = r;
        return;
    }
    let la = log(st.sa);
    let lb = log(st.b.s);
    let lse_b = st.b.m + lb;
    // The test mass under masked base entries, in the frame of y (0 when there is none).
    let zz = select(0.0, st.zb / st.sa * exp((st.b.m - st.ma) + st.c), st.zb > 0.0);
    let gg = st.g / st.sa + zz;
    let yy = st.y / st.sa + zz;
    let tt = st.t / st.sa;
    // log1p(Y) = Y - h(Y); k1 = G - h(Y), which is T + log1p(Y): taken so where |Y| > 1/2, where
    // G and Y may be large and nearly equal.
    let small_y = abs(yy) <= 0.5;
    let log1p_y = select(log(1.0 + yy), yy - hfun(yy), small_y);
    let k1 = select(tt + log1p_y, gg - hfun(yy), small_y);
    // gap = lse_a - c - lse_b, as differences of like terms (exact for huge, nearly equal
    // logits): lse_b_via_y - lse_b = gap + log1p(Y), and the textbook form
    // k2 = c + (G - Y) - lse_a + lse_b = T - gap, taken where log1p(Y) does not reproduce lse_b
    // (Y rounded to -1 or below, a test logit of -inf under a finite base one...).
    let gap = ((st.ma - st.b.m) - st.c) + (la - lb);
    let k2 = tt - gap;
    let use_k1 = !is_nan(k1) && abs(gap + log1p_y) <= 1e-3 * max(1.0, abs(lse_b));
    let kld = select(k2, k1, use_k1);
    r.kld = select(kld, 0.0, kld < 0.0);
    r.argmax_base = st.top_a.idx;
    r.argmax_test = st.top_b.idx;
    if r.argmax_base == r.argmax_test {
        r.flags |= FLAG_SAME_TOP;
    }
    if target_ok {
        r.nll_base = (st.ma - load_a(row_base_a(row) + t)) + la;
        r.nll_test = (st.b.m - load_b(row_base_b(row) + t)) + lb;
        r.dp = exp(-r.nll_test) - exp(-r.nll_base);
    } else if has_target {
        r.nll_base = nan();
        r.nll_test = nan();
        r.dp = nan();
    }
    out[params.out_offset + row] = r;
}

// The work unit of workgroup `g`'s lane group `slot`, scanned. Rows past the end give an empty
// state (and `emit` drops them).
fn scan_unit(g: u32, slot: u32, lane: u32, lanes: u32) -> State {
    let unit = g * ROWS_PER_WG + slot;
    let row = unit / params.split;
    var st = empty_state();
    if row < params.rows {
        let part = unit % params.split;
        let lo = part * params.split_len;
        let hi = min(params.vocab, lo + params.split_len);
        scan(&st, row, lo, hi, lane, lanes);
    }
    return st;
}

// `emit` and the `combine` entry point follow in split_rows.wgsl.

// Nothing more to do once a unit's result is emitted (the hook of split_rows.wgsl).
fn after_unit(g: u32, slot: u32, lane: u32, lanes: u32) {}
