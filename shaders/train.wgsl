// Fused cross-entropy loss and its gradient with respect to the logits: the kernel's own part.
// Preceded by online_softmax.wgsl and one bindings file (train_separate.wgsl: the gradient into a
// buffer of its own; train_in_place.wgsl: over the logits, through one read-write binding), and
// followed by split_rows.wgsl and one reduction (reduce_workgroup.wgsl, or train_subgroup.wgsl +
// reduce_subgroup.wgsl when the device has Features::SUBGROUP).
//
// The maths is the crate's `train` module's, in f32. Per row, with z = cap·tanh(x/cap) under a
// soft-cap (else z = x), class weights w (all 1 without), W = Σ w, smoothing ε, z-loss c:
//     lse  = m + log s                        (online max m and s = Σ exp(z - m))
//     loss = (1-ε)·w_t·((m - z_t) + log s) + (ε/V)·(S_w·log s - S_wz) + c·lse²
//            with S_w = Σ w_j and S_wz = Σ w_j·(z_j - m), kept relative to the running max so that
//            no large numbers are subtracted
//     grad = scale · (p_j·((1-ε)·w_t + (ε/V)·W + 2c·lse) - (ε/V)·w_j - (1-ε)·w_t·[j = t])
//            · (1 - (z_j/cap)²) under a soft-cap,   p_j = exp((z_j - m) - log s)
// where `scale` is the host's per-row factor (upstream gradient, 1/Σw_t for a mean, 0 ignored).
//
// Passes: pass 1 scans the row once for (m, s, S_w, S_wz, NaN/+inf flag) — the `main` of the
// reduction file, through `scan_unit`, `merge` and `emit`; `finish` writes the row's TrainRow and
// keeps its final state in `partials` (slot row·split). Unsplit rows then go straight on in the
// same workgroup (`after_unit`): every lane reads the row's state back and pass 2 re-reads each
// logit and writes its gradient with p_j = exp((z_j - m) - log s) — not exp(z_j - lse), whose f32
// rounding of lse costs 5e-4 relative at logits of 1e4. Split rows write partial states;
// `combine` finishes them and the `grad` entry point runs pass 2 over each part. Physical
// traffic: two reads and one write of the row, the floor for a fused loss and gradient.
//
// Memory: logits and gradient are read and written as u32 words (one f32, or two 16-bit values,
// low half first). Each lane takes words `lanes` apart, four at a time, so that every load and
// store of a group of lanes is contiguous. With 16-bit values a row may begin or end in the middle
// of a word: a word shared by two rows of the same dispatch is never written by either row's
// workgroup (it would be a race on the word) — the `edges` pass writes both halves afterwards,
// one invocation per shared word. A partial word not shared with a row of the dispatch (the row
// next to it is in another chunk, or the other half is padding or another tensor) is read,
// modified in its own half, and written back by the one lane that owns it: nothing outside the
// rows changes. Split rows are cut at word boundaries, so no word is shared by two parts.

// 0 = f32, 1 = f16, 2 = bf16 (DT_* in online_softmax.wgsl).
override DTYPE: u32 = 0u;
// Invocations per workgroup: 256, as forward.wgsl (enough memory operations in flight per row on
// every adapter we know, within WebGPU's minimum limit); the host lowers it for small adapters.
override WG_SIZE: u32 = 256u;
// Rows per workgroup (a power of two dividing WG_SIZE), for short rows.
override ROWS_PER_WG: u32 = 1u;
// Which options the job uses, fixed per pipeline: a test on a uniform inside the per-logit loops
// cost 3x on lavapipe (64 x 32000 f32: 41 ms against 14 ms), a pipeline constant costs nothing.
// Their values (ε, cap, c) stay in the uniform.
// Label smoothing (ε > 0).
override SMOOTHING: bool = false;
// A soft-cap.
override SOFTCAP: bool = false;
// Class weights are bound (else every w_j is 1).
override WEIGHTED: bool = false;

// `TrainParams.flags`.
// The gradient is written (else only the per-row loss and lse).
const WRITE_GRAD: u32 = 2u;
// W = Σ w_j is read from `weight_total[0]` (written by `sum_weights`), not `TrainParams`.
const WEIGHT_TOTAL_BUFFER: u32 = 4u;

// The shared `Params` (online_softmax.wgsl) and what this kernel adds, in one uniform: `params`
// and `train` are two views of the same bytes. Side b of `Params` is the gradient's layout
// (b_offset, b_stride), which has the logits' element parity (checked by the host).
struct TrainParams {
    base: Params,
    // ε of label smoothing (SMOOTHING).
    label_smoothing: f32,
    // z-loss coefficient c.
    z_loss: f32,
    // The soft-cap (SOFTCAP).
    softcap: f32,
    // W when WEIGHT_TOTAL_BUFFER is not set (the vocabulary size without weights).
    weight_total: f32,
    // Index of row 0's scale within `scale`, of class 0's weight within `weights`.
    scale_offset: u32,
    weight_offset: u32,
    flags: u32,
    pad: u32,
}

// The host's `train::TrainRow` (8 bytes).
struct TrainRow {
    loss: f32,
    lse: f32,
}

// A row's (or part's) pass-1 statistics.
struct State {
    ms: MaxSum,
    // Σ w_j and Σ w_j·(z_j - ms.m) over the logits seen (with label smoothing only; else 0).
    sw: f32,
    swz: f32,
    // NaN or +inf seen.
    bad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<TrainRow>;
// Per-row gradient factor (f32).
@group(0) @binding(4) var<storage, read> scale: array<f32>;
// Partial states of split rows, `split` per row; slot row·split then holds the row's final state
// (for every row, split or not: the host always binds `rows · split` of them).
@group(0) @binding(5) var<storage, read_write> partials: array<State>;
@group(0) @binding(7) var<uniform> train: TrainParams;
// Class weights (f32, `vocab` of them from `weight_offset`), when WEIGHTED.
@group(0) @binding(8) var<storage, read> weights: array<f32>;
// W, written by `sum_weights` (WEIGHT_TOTAL_BUFFER).
@group(0) @binding(9) var<storage, read_write> weight_total: array<f32>;
// Bindings 1 (logits) and 6 (a separate gradient) are declared by the bindings file, with
// `load_word`, `load_grad_word` and `store_grad_word`.

fn empty_state() -> State { return State(max_sum_empty(), 0.0, 0.0, 0u); }

fn class_weight(j: u32) -> f32 {
    if WEIGHTED {
        return weights[train.weight_offset + j];
    }
    return 1.0;
}

fn class_total() -> f32 {
    if (train.flags & WEIGHT_TOTAL_BUFFER) != 0u {
        return weight_total[0];
    }
    return train.weight_total;
}

// tanh to f32 precision on every driver: an odd series near 0 (where 1 - 2/(e^2u + 1) would
// cancel), the exponential form elsewhere; |u| >= 15 gives exactly ±1.
fn tanh_f32(u: f32) -> f32 {
    let a = abs(u);
    if a < 0.3 {
        let q = u * u;
        return u * (1.0 + q * (-0.33333334 + q * (0.13333334 + q * (-0.053968254 + q * (0.021869488 + q * -0.008863236)))));
    }
    let t = 1.0 - 2.0 / (exp(2.0 * min(a, 15.0)) + 1.0);
    return select(t, -t, u < 0.0);
}

// z = cap·tanh(x/cap) under a soft-cap; NaN stays NaN, ±inf become ±cap.
fn cap_logit(x: f32) -> f32 {
    if !SOFTCAP || is_nan(x) {
        return x;
    }
    let cap = train.softcap;
    return cap * tanh_f32(clamp(x / cap, -15.0, 15.0));
}

fn cap4(v: vec4<f32>) -> vec4<f32> {
    if !SOFTCAP {
        return v;
    }
    return vec4<f32>(cap_logit(v.x), cap_logit(v.y), cap_logit(v.z), cap_logit(v.w));
}

// sw·d, where an empty sum (sw = 0) or no move (d = 0) adds nothing even when d is infinite.
fn shift(sw: f32, d: f32) -> f32 {
    return select(sw * d, 0.0, sw == 0.0 || d == 0.0);
}

// One (capped) logit z at row index j.
fn push(st: ptr<function, State>, z: f32, j: u32) {
    let m0 = (*st).ms.m;
    (*st).ms = max_sum_push((*st).ms, z);
    (*st).bad |= u32(is_bad(z));
    if SMOOTHING {
        let w = class_weight(j);
        let m = (*st).ms.m;
        (*st).swz += shift((*st).sw, m0 - m) + w * (z - m);
        (*st).sw += w;
    }
}

// Four (capped) logits at row indices j.
fn push4(st: ptr<function, State>, z: vec4<f32>, j: vec4<u32>) {
    let m0 = (*st).ms.m;
    (*st).ms = max_sum_push4((*st).ms, z);
    (*st).bad |= u32(any_bad4(z));
    if SMOOTHING {
        let w = vec4<f32>(class_weight(j.x), class_weight(j.y), class_weight(j.z), class_weight(j.w));
        let m = (*st).ms.m;
        let d = w * (z - vec4<f32>(m));
        (*st).swz += shift((*st).sw, m0 - m) + ((d.x + d.y) + (d.z + d.w));
        (*st).sw += (w.x + w.y) + (w.z + w.w);
    }
}

fn merge(a: State, b: State) -> State {
    let m = max(a.ms.m, b.ms.m);
    let swz = (a.swz + shift(a.sw, a.ms.m - m)) + (b.swz + shift(b.sw, b.ms.m - m));
    return State(max_sum_merge(a.ms, b.ms), a.sw + b.sw, swz, a.bad | b.bad);
}

// Element `i` of the logits binding.
fn load_elem(i: u32) -> f32 {
    if DTYPE == DT_F32 {
        return bitcast<f32>(load_word(i));
    }
    return unpack_half(load_word(i >> 1u), (i & 1u) == 1u, DTYPE);
}

fn row_base(row: u32) -> u32 { return params.a_offset + row * params.a_stride; }
fn grad_base(row: u32) -> u32 { return params.b_offset + row * params.b_stride; }

// Row indices [lo, hi) of part `part` of a row starting at binding element `base`: parts of
// `split_len` logits, inner boundaries moved up to even elements for 16-bit types so that no
// word belongs to two parts.
fn part_range(base: u32, part: u32) -> vec2<u32> {
    var lo = part * params.split_len;
    var hi = min(params.vocab, lo + params.split_len);
    if DTYPE != DT_F32 {
        if part > 0u {
            lo += (base + lo) & 1u;
        }
        if hi < params.vocab {
            hi += (base + hi) & 1u;
        }
    }
    return vec2<u32>(min(lo, params.vocab), min(hi, params.vocab));
}

// Pass 1 over row indices [lo, hi) of the row starting at element `base`, as lane `lane` of `lanes`.
fn scan(st: ptr<function, State>, base: u32, lo: u32, hi: u32, lane: u32, lanes: u32) {
    let a0 = base + lo;
    let a1 = base + hi;
    if DTYPE == DT_F32 {
        var e = a0 + lane;
        for (; e + 3u * lanes < a1; e += 4u * lanes) {
            let x = vec4<u32>(load_word(e), load_word(e + lanes), load_word(e + 2u * lanes), load_word(e + 3u * lanes));
            let j = vec4<u32>(e - base) + vec4<u32>(0u, 1u, 2u, 3u) * lanes;
            push4(st, cap4(bitcast<vec4<f32>>(x)), j);
        }
        for (; e < a1; e += lanes) {
            push(st, cap_logit(bitcast<f32>(load_word(e))), e - base);
        }
        return;
    }
    // Whole words [w0, w1); a lone first (odd a0) or last (odd a1) element is read by one lane.
    let w0 = (a0 + 1u) / 2u;
    let w1 = a1 / 2u;
    var k = w0 + lane;
    for (; k + 3u * lanes < w1; k += 4u * lanes) {
        let p0 = unpack2(load_word(k), DTYPE);
        let p1 = unpack2(load_word(k + lanes), DTYPE);
        let p2 = unpack2(load_word(k + 2u * lanes), DTYPE);
        let p3 = unpack2(load_word(k + 3u * lanes), DTYPE);
        let j = vec4<u32>(2u * k - base) + vec4<u32>(0u, 1u, 0u, 1u) + vec4<u32>(0u, 0u, 2u, 2u) * lanes;
        push4(st, cap4(vec4<f32>(p0, p1)), j);
        push4(st, cap4(vec4<f32>(p2, p3)), j + vec4<u32>(4u * lanes));
    }
    for (; k < w1; k += lanes) {
        let p = unpack2(load_word(k), DTYPE);
        push(st, cap_logit(p.x), 2u * k - base);
        push(st, cap_logit(p.y), 2u * k + 1u - base);
    }
    if lane == 0u && a0 < a1 {
        if (a0 & 1u) == 1u {
            push(st, cap_logit(load_elem(a0)), lo);
        }
        if (a1 & 1u) == 1u {
            push(st, cap_logit(load_elem(a1 - 1u)), hi - 1u);
        }
    }
}

// The work unit of workgroup `g`'s lane group `slot`, scanned (pass 1). Rows past the end give
// an empty state (and `emit` drops them).
fn scan_unit(g: u32, slot: u32, lane: u32, lanes: u32) -> State {
    let unit = g * ROWS_PER_WG + slot;
    let row = unit / params.split;
    var st = empty_state();
    if row < params.rows {
        let base = row_base(row);
        let r = part_range(base, unit % params.split);
        scan(&st, base, r.x, r.y, lane, lanes);
    }
    return st;
}

// Writes row `row`'s TrainRow from its complete state, and keeps the state for pass 2 (in
// `combine`, over the row's first part, which this invocation has already read).
fn finish(row: u32, st: State) {
    partials[row * params.split] = st;
    let t = targets[params.targets_offset + row];
    // A NaN or +inf anywhere, or a row of only -inf (s == 0): NaN, as torch.
    let broken = st.bad != 0u || st.ms.s == 0.0;
    let log_s = log(st.ms.s);
    let lse = select(st.ms.m + log_s, nan(), broken);
    var loss = 0.0;
    if t == params.ignore {
        loss = 0.0;
    } else if t >= params.vocab {
        // Only reachable through `encode` on unvalidated targets: the host API rejects these.
        loss = nan();
    } else {
        let eps = train.label_smoothing;
        let zt = cap_logit(load_elem(row_base(row) + t));
        var l = (1.0 - eps) * class_weight(t) * ((st.ms.m - zt) + log_s);
        if SMOOTHING {
            l += eps / f32(params.vocab) * (st.sw * log_s - st.swz);
        }
        l += train.z_loss * lse * lse;
        loss = select(l, nan(), broken);
    }
    out[params.out_offset + row] = TrainRow(loss, lse);
}

// ---- pass 2: the gradient ----

const GRAD_VALUE: u32 = 0u;
const GRAD_ZERO: u32 = 1u;
const GRAD_NAN: u32 = 2u;

// What every element of a row's gradient needs, read back from the row's final state.
struct RowGrad {
    tgt: u32,
    // The row's max and log of its sum of exp(z - m).
    m: f32,
    log_s: f32,
    // p_j's factor: (1-ε)·w_t + (ε/V)·W + 2c·lse.
    coef: f32,
    // (1-ε)·w_t, subtracted at the target.
    at_target: f32,
    // The per-row scale.
    g: f32,
    // GRAD_*: ignored rows are 0, broken rows and bad targets NaN.
    mode: u32,
}

fn row_grad(row: u32) -> RowGrad {
    let t = targets[params.targets_offset + row];
    let st = partials[row * params.split];
    let log_s = log(st.ms.s);
    let lse = st.ms.m + log_s;
    var r = RowGrad(t, st.ms.m, log_s, 0.0, 0.0, scale[train.scale_offset + row], GRAD_VALUE);
    if t == params.ignore {
        r.mode = GRAD_ZERO;
    } else if t >= params.vocab || st.bad != 0u || st.ms.s == 0.0 {
        r.mode = GRAD_NAN;
    } else {
        let eps = train.label_smoothing;
        r.at_target = (1.0 - eps) * class_weight(t);
        r.coef = r.at_target + eps / f32(params.vocab) * class_total() + 2.0 * train.z_loss * lse;
    }
    return r;
}

// ∂L/∂x_j for logit x at row index j.
fn grad_of(x: f32, j: u32, r: RowGrad) -> f32 {
    let z = cap_logit(x);
    var d = exp((z - r.m) - r.log_s) * r.coef - select(0.0, r.at_target, j == r.tgt);
    if SMOOTHING {
        d -= train.label_smoothing / f32(params.vocab) * class_weight(j);
    }
    if SOFTCAP {
        let q = z / train.softcap;
        d *= 1.0 - q * q;
    }
    // A zero term stays an exact 0 under an infinite upstream gradient (not 0 · inf = NaN), as
    // on the CPU.
    return select(select(r.g * d, 0.0, r.mode == GRAD_ZERO || d == 0.0), nan(), r.mode == GRAD_NAN);
}

// f32 to f16 bits, rounding to nearest even (overflow to ±inf, NaN quiet), the same on every
// driver — unlike pack2x16float, which leaves out-of-range values undefined.
fn f16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if a > 0x7f800000u {
        return sign | 0x7e00u;
    }
    if a >= 0x477ff000u {
        // 65520 and above round to infinity.
        return sign | 0x7c00u;
    }
    if a >= 0x38800000u {
        // A normal f16: rebias the exponent (127 -> 15) and round 23 mantissa bits to 10.
        let r = a - 0x38000000u;
        return sign | ((r + 0xfffu + ((r >> 13u) & 1u)) >> 13u);
    }
    // Subnormal (or zero): units of 2^-24, rounded half to even by `round`.
    return sign | u32(round(bitcast<f32>(a) * 16777216.0));
}

// f32 to bf16 bits, rounding to nearest even; NaN stays a quiet NaN.
fn bf16_bits(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if is_nan(x) {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

fn half_bits(x: f32) -> u32 {
    if DTYPE == DT_F16 {
        return f16_bits(x);
    }
    return bf16_bits(x);
}

fn pack_grad(p: vec2<f32>) -> u32 {
    return half_bits(p.x) | (half_bits(p.y) << 16u);
}

// The gradient word of logits word `w`, whose low half is row index `j`.
fn grad_word(w: u32, j: u32, r: RowGrad) -> u32 {
    let p = unpack2(w, DTYPE);
    return pack_grad(vec2<f32>(grad_of(p.x, j, r), grad_of(p.y, j + 1u, r)));
}

// 16-bit only: the word holding row `row`'s last gradient also holds row `row + 1`'s first, and
// both rows are in this dispatch. Such words are left to the `edges` pass.
fn shares_with_next(row: u32) -> bool {
    return DTYPE != DT_F32 && row + 1u < params.rows && params.b_stride == params.vocab
        && ((grad_base(row) + params.vocab) & 1u) == 1u;
}

// Writes one half of gradient word `k`, keeping the other half as it is.
fn store_half(k: u32, hi: bool, x: f32) {
    let old = load_grad_word(k);
    let h = half_bits(x);
    store_grad_word(k, select((old & 0xffff0000u) | h, (old & 0xffffu) | (h << 16u), hi));
}

// Pass 2 over row indices [lo, hi) of row `row`, as lane `lane` of `lanes`: each logit re-read,
// its gradient written (over it, in place).
fn grad_part(row: u32, lo: u32, hi: u32, lane: u32, lanes: u32) {
    let r = row_grad(row);
    let xb = row_base(row);
    let gb = grad_base(row);
    let a0 = xb + lo;
    let a1 = xb + hi;
    if DTYPE == DT_F32 {
        // Gradient element = logits element + d (wrapping arithmetic).
        let d = gb - xb;
        var e = a0 + lane;
        for (; e + 3u * lanes < a1; e += 4u * lanes) {
            let e1 = e + lanes;
            let e2 = e1 + lanes;
            let e3 = e2 + lanes;
            let x = bitcast<vec4<f32>>(vec4<u32>(load_word(e), load_word(e1), load_word(e2), load_word(e3)));
            store_grad_word(e + d, bitcast<u32>(grad_of(x.x, e - xb, r)));
            store_grad_word(e1 + d, bitcast<u32>(grad_of(x.y, e1 - xb, r)));
            store_grad_word(e2 + d, bitcast<u32>(grad_of(x.z, e2 - xb, r)));
            store_grad_word(e3 + d, bitcast<u32>(grad_of(x.w, e3 - xb, r)));
        }
        for (; e < a1; e += lanes) {
            store_grad_word(e + d, bitcast<u32>(grad_of(bitcast<f32>(load_word(e)), e - xb, r)));
        }
        return;
    }
    // Gradient word = logits word + dw: both layouts have the same element parity.
    let dw = (gb >> 1u) - (xb >> 1u);
    let w0 = (a0 + 1u) / 2u;
    let w1 = a1 / 2u;
    var k = w0 + lane;
    for (; k + 3u * lanes < w1; k += 4u * lanes) {
        let k1 = k + lanes;
        let k2 = k1 + lanes;
        let k3 = k2 + lanes;
        let x = vec4<u32>(load_word(k), load_word(k1), load_word(k2), load_word(k3));
        store_grad_word(k + dw, grad_word(x.x, 2u * k - xb, r));
        store_grad_word(k1 + dw, grad_word(x.y, 2u * k1 - xb, r));
        store_grad_word(k2 + dw, grad_word(x.z, 2u * k2 - xb, r));
        store_grad_word(k3 + dw, grad_word(x.w, 2u * k3 - xb, r));
    }
    for (; k < w1; k += lanes) {
        store_grad_word(k + dw, grad_word(load_word(k), 2u * k - xb, r));
    }
    // A lone first or last element: its word's other half belongs to a neighbour (left to
    // `edges` when that neighbour is in this dispatch) or to no row (kept as it is).
    if lane == 0u && a0 < a1 {
        if (a0 & 1u) == 1u && !(lo == 0u && row > 0u && shares_with_next(row - 1u)) {
            store_half((a0 >> 1u) + dw, true, grad_of(load_elem(a0), lo, r));
        }
        if (a1 & 1u) == 1u && !(hi == params.vocab && shares_with_next(row)) {
            store_half((a1 >> 1u) + dw, false, grad_of(load_elem(a1 - 1u), hi - 1u, r));
        }
    }
}

// The hook of split_rows.wgsl, run by every invocation after `emit`: an unsplit row goes on to
// pass 2 in the same workgroup, once its state (kept by lane 0's `finish`) is visible to every lane.
fn after_unit(g: u32, slot: u32, lane: u32, lanes: u32) {
    if params.split != 1u || (train.flags & WRITE_GRAD) == 0u {
        return;
    }
    storageBarrier();
    let row = g * ROWS_PER_WG + slot;
    if row < params.rows {
        grad_part(row, 0u, params.vocab, lane, lanes);
    }
}

// Pass 2 of split rows, after `combine`: one part per workgroup (the same grid as `main`).
@compute @workgroup_size(WG_SIZE)
fn grad(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let unit = wid.x + wid.y * params.groups_x;
    let row = unit / params.split;
    if row >= params.rows {
        return;
    }
    let r = part_range(row_base(row), unit % params.split);
    grad_part(row, r.x, r.y, lid, WG_SIZE);
}

// The words two rows of the dispatch share (16-bit types), after pass 2: one invocation per
// boundary writes row `b`'s last gradient and row `b + 1`'s first. In place, the word still holds
// both logits: neither row's pass 2 wrote it.
@compute @workgroup_size(64)
fn edges(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let b = gid.x + gid.y * groups.x * 64u;
    if !shares_with_next(b) {
        return;
    }
    let last = params.vocab - 1u;
    let lo = grad_of(load_elem(row_base(b) + last), last, row_grad(b));
    let hi = grad_of(load_elem(row_base(b + 1u)), 0u, row_grad(b + 1u));
    store_grad_word((grad_base(b) + last) >> 1u, pack_grad(vec2<f32>(lo, hi)));
}

// W = Σ_j w_j, once per job, before the rows (with class weights and label smoothing).
var<workgroup> weight_sums: array<f32, MAX_WG>;

@compute @workgroup_size(WG_SIZE)
fn sum_weights(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var j = lid; j < params.vocab; j += WG_SIZE) {
        s += weights[train.weight_offset + j];
    }
    weight_sums[lid] = s;
    workgroupBarrier();
    var width = WG_SIZE;
    while width > 1u {
        let half = (width + 1u) / 2u;
        if lid < width - half {
            weight_sums[lid] += weight_sums[lid + half];
        }
        workgroupBarrier();
        width = half;
    }
    if lid == 0u {
        weight_total[0] = weight_sums[0];
    }
}
