// The online-softmax pieces every kernel of the family shares: NaN / +inf detection, 16-bit
// unpacking, the online (max, sum of exp(x - max)) and the first-index argmax. Pure functions of
// values — no bindings, no override constants (a kernel passes its dtype in) — and the one
// uniform layout, so that one file serves a kernel with one input (forward.wgsl) and a kernel
// with two inputs of different types (kld.wgsl).
//
// A kernel module is this file, then the kernel's own file, then split_rows.wgsl, then one
// reduction: reduce_workgroup.wgsl, or the kernel's `*_subgroup.wgsl` followed by reduce_subgroup.wgsl.
// The host concatenates real WGSL files; nothing is templated.

// The uniform every kernel of the family reads (the host's `gpu::Params`), one layout for all:
// a kernel with one input uses side a only.
struct Params {
    // Rows in this dispatch.
    rows: u32,
    // Logits per row.
    vocab: u32,
    // Index of row 0's target within the targets binding.
    targets_offset: u32,
    // Index of row 0's result within the output binding.
    out_offset: u32,
    // Target value meaning "ignore this row" (0xffffffff when none).
    ignore: u32,
    // Workgroups along x in this dispatch (more than 65535 use y).
    groups_x: u32,
    // Parts per row (1: no split).
    split: u32,
    // Logits per part (a multiple of 8).
    split_len: u32,
    // Element index of row 0's first logit of side a (the base) within its binding, and the
    // elements between the starts of consecutive rows.
    a_offset: u32,
    a_stride: u32,
    // The same for side b (the test model's logits).
    b_offset: u32,
    b_stride: u32,
}

// Element types, as the host passes them in a kernel's dtype override constants.
const DT_F32: u32 = 0u;
const DT_F16: u32 = 1u;
const DT_BF16: u32 = 2u;

// Largest workgroup of any kernel: the length of workgroup arrays (WebGPU's guaranteed minimum
// of invocations per workgroup).
const MAX_WG: u32 = 256u;
const NO_INDEX: u32 = 0xffffffffu;
// Starting max: the lowest finite f32, so that exp(x - m) is never exp(-inf - -inf) = NaN;
// a -inf logit then adds exp(-inf) = 0, and a row of only -inf ends with a sum of 0.
const LOWEST: f32 = -3.40282347e38;

fn neg_inf() -> f32 { return bitcast<f32>(0xff800000u); }
fn pos_inf() -> f32 { return bitcast<f32>(0x7f800000u); }
fn nan() -> f32 { return bitcast<f32>(0x7fc00000u); }

// Tests on the bits, so that no compiler's finite-math assumption can remove them.
fn is_nan(x: f32) -> bool { return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u; }
fn is_finite(x: f32) -> bool { return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u; }

// NaN or +inf: the row's result is NaN (as torch: x - max is NaN at a +inf entry).
fn is_bad(x: f32) -> bool {
    let b = bitcast<u32>(x);
    return (b & 0x7fffffffu) > 0x7f800000u || b == 0x7f800000u;
}

fn any_bad4(v: vec4<f32>) -> bool {
    return is_bad(v.x) || is_bad(v.y) || is_bad(v.z) || is_bad(v.w);
}

// Logits per vec4<u32> of a binding of `dtype`.
fn per_vec(dtype: u32) -> u32 { return select(8u, 4u, dtype == DT_F32); }

// The two 16-bit logits of one word, low half first (little-endian element order): f16 through
// `unpack2x16float` (core WGSL: no SHADER_F16 needed), bf16 as the high half of an f32.
fn unpack2(w: u32, dtype: u32) -> vec2<f32> {
    if dtype == DT_F16 {
        return unpack2x16float(w);
    }
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

// The low (`hi` false) or high 16-bit logit of a word.
fn unpack_half(w: u32, hi: bool, dtype: u32) -> f32 {
    if dtype == DT_F16 {
        let pair = unpack2x16float(w);
        return select(pair.x, pair.y, hi);
    }
    return bitcast<f32>(select(w << 16u, w & 0xffff0000u, hi));
}

// The eight 16-bit logits of a vec4<u32>, as two vec4<f32> (elements 0-3, 4-7).
fn unpack8(w: vec4<u32>, dtype: u32) -> array<vec4<f32>, 2> {
    return array<vec4<f32>, 2>(
        vec4<f32>(unpack2(w.x, dtype), unpack2(w.y, dtype)),
        vec4<f32>(unpack2(w.z, dtype), unpack2(w.w, dtype)),
    );
}

fn max4(v: vec4<f32>) -> f32 { return max(max(v.x, v.y), max(v.z, v.w)); }

// The first component of `v` equal to `vm` (its max).
fn first_of4(v: vec4<f32>, vm: f32) -> u32 {
    return select(select(select(3u, 2u, v.z == vm), 1u, v.y == vm), 0u, v.x == vm);
}

// ---- online (max, sum of exp(x - max)) ----

struct MaxSum {
    m: f32,
    s: f32,
}

fn max_sum_empty() -> MaxSum { return MaxSum(LOWEST, 0.0); }

fn max_sum_push(a: MaxSum, x: f32) -> MaxSum {
    if x > a.m {
        return MaxSum(x, a.s * exp(a.m - x) + 1.0);
    }
    return MaxSum(a.m, a.s + exp(x - a.m));
}

// Four logits: one rescale at most, four exps.
fn max_sum_push4(a: MaxSum, v: vec4<f32>) -> MaxSum {
    let vm = max4(v);
    var r = a;
    if vm > r.m {
        r.s *= exp(r.m - vm);
        r.m = vm;
    }
    let e = exp(v - vec4<f32>(r.m));
    r.s += (e.x + e.y) + (e.z + e.w);
    return r;
}

fn max_sum_merge(a: MaxSum, b: MaxSum) -> MaxSum {
    let m = max(a.m, b.m);
    return MaxSum(m, a.s * exp(a.m - m) + b.s * exp(b.m - m));
}

// ---- first-index argmax ----
// Indices arrive in increasing order per lane, so strict > keeps the first index of the largest
// value; merges break ties towards the smaller index.

struct Top {
    best: f32,
    idx: u32,
}

fn top_empty() -> Top { return Top(neg_inf(), NO_INDEX); }

fn top_push(t: Top, x: f32, j: u32) -> Top {
    if x > t.best {
        return Top(x, j);
    }
    return t;
}

// Four consecutive logits starting at row index `j`.
fn top_push4(t: Top, v: vec4<f32>, j: u32) -> Top {
    let vm = max4(v);
    if vm > t.best {
        return Top(vm, j + first_of4(v, vm));
    }
    return t;
}

fn top_merge(a: Top, b: Top) -> Top {
    if b.best > a.best || (b.best == a.best && b.idx < a.idx) {
        return b;
    }
    return a;
}
