// Fused cross-entropy forward: the part shared by both reductions.
//
// This file is followed, in one module, by either `reduce_workgroup.wgsl` (workgroup memory
// only) or `reduce_subgroup.wgsl` (subgroup operations, when the device has Features::SUBGROUP).
// The host concatenates real WGSL files; nothing is templated.
//
// Work unit: a (row, part) pair. A row is split into `params.split` parts of `params.split_len`
// logits when rows are too few to fill the GPU; each part is scanned by one group of lanes that
// keeps an online (max, sum of exp(x - max)), the first index of the largest logit and a flag
// for NaN / +inf. With one part per row the group writes the row's result; otherwise it writes a
// partial state and the `combine` entry point finishes the row.
//
//     nll = (max - x[target]) + log(sum)      (not lse - x[target]: rows of large, nearly
//     lse = max + log(sum)                     equal logits keep f32 precision this way)
//
// Logits are read as u32 words: the bulk of a row as vec4<u32> (16-byte loads), its unaligned
// head and tail as single words, so one shader serves f32, f16 (`unpack2x16float`, core WGSL:
// no SHADER_F16 needed) and bf16 (the high 16 bits of an f32). Arithmetic is f32 throughout.

// 0 = f32, 1 = f16, 2 = bf16.
override DTYPE: u32 = 0u;
// Invocations per workgroup. 256 keeps enough 16-byte loads in flight per row on every adapter
// we know while staying within WebGPU's minimum limit (256); the host lowers it when an
// adapter's limits are smaller.
override WG_SIZE: u32 = 256u;
// Rows per workgroup (a power of two dividing WG_SIZE): more than one when rows are short, so
// that lanes are not left idle.
override ROWS_PER_WG: u32 = 1u;

const MAX_WG: u32 = 256u;
const FLAG_IGNORED: u32 = 1u;
const FLAG_CORRECT: u32 = 2u;
const FLAG_BAD_TARGET: u32 = 4u;
const NO_INDEX: u32 = 0xffffffffu;
// Starting max: the lowest finite f32, so that exp(x - m) is never exp(-inf - -inf) = NaN;
// a -inf logit then adds exp(-inf) = 0, and a row of only -inf ends with s == 0.
const LOWEST: f32 = -3.40282347e38;

struct Params {
    // Rows in this dispatch.
    rows: u32,
    // Logits per row.
    vocab: u32,
    // Elements between the starts of consecutive rows.
    row_stride: u32,
    // Element index of row 0's first logit within the logits binding.
    logits_offset: u32,
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
    _pad0: u32,
    _pad1: u32,
}

struct RowLoss {
    nll: f32,
    lse: f32,
    argmax: u32,
    flags: u32,
}

struct State {
    m: f32,
    s: f32,
    best: f32,
    idx: u32,
    bad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits4: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<RowLoss>;
// The same window of logits as `logits4`, for the unaligned head and tail and the target.
@group(0) @binding(4) var<storage, read> logits1: array<u32>;
// Partial states of split rows, `split` per row.
@group(0) @binding(5) var<storage, read_write> partials: array<State>;

fn neg_inf() -> f32 { return bitcast<f32>(0xff800000u); }
fn nan() -> f32 { return bitcast<f32>(0x7fc00000u); }
fn empty_state() -> State { return State(LOWEST, 0.0, neg_inf(), NO_INDEX, 0u); }

// NaN or +inf: torch gives NaN for the whole row (x - max is NaN at the +inf entry).
// Tested on the bits so that no compiler's finite-math assumption can remove it.
fn is_bad(x: f32) -> bool {
    let b = bitcast<u32>(x);
    return (b & 0x7fffffffu) > 0x7f800000u || b == 0x7f800000u;
}

// Logits per vec4<u32>.
fn per_vec() -> u32 { return select(8u, 4u, DTYPE == 0u); }

// Logit number `i` (an element index into the binding).
fn load(i: u32) -> f32 {
    if DTYPE == 0u {
        return bitcast<f32>(logits1[i]);
    }
    let word = logits1[i >> 1u];
    let hi = (i & 1u) == 1u;
    if DTYPE == 1u {
        let pair = unpack2x16float(word);
        return select(pair.x, pair.y, hi);
    }
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, hi));
}

// Two 16-bit logits of one word, low half first (little-endian element order).
fn unpack2(w: u32) -> vec2<f32> {
    if DTYPE == 1u {
        return unpack2x16float(w);
    }
    return vec2<f32>(bitcast<f32>(w << 16u), bitcast<f32>(w & 0xffff0000u));
}

// One logit `x` at row index `j`. Indices arrive in increasing order per lane: strict > keeps
// the first index of the largest value.
fn push(st: ptr<function, State>, x: f32, j: u32) {
    if x > (*st).m {
        (*st).s = (*st).s * exp((*st).m - x) + 1.0;
        (*st).m = x;
    } else {
        (*st).s += exp(x - (*st).m);
    }
    if x > (*st).best {
        (*st).best = x;
        (*st).idx = j;
    }
    (*st).bad |= u32(is_bad(x));
}

// Four consecutive logits starting at row index `j`: one rescale at most, four exps.
fn push4(st: ptr<function, State>, v: vec4<f32>, j: u32) {
    let vm = max(max(v.x, v.y), max(v.z, v.w));
    if vm > (*st).m {
        (*st).s *= exp((*st).m - vm);
        (*st).m = vm;
    }
    let e = exp(v - vec4<f32>((*st).m));
    (*st).s += (e.x + e.y) + (e.z + e.w);
    if vm > (*st).best {
        (*st).best = vm;
        (*st).idx = j + select(select(select(3u, 2u, v.z == vm), 1u, v.y == vm), 0u, v.x == vm);
    }
    (*st).bad |= u32(is_bad(v.x) || is_bad(v.y) || is_bad(v.z) || is_bad(v.w));
}

fn push_words(st: ptr<function, State>, w: vec4<u32>, j: u32) {
    if DTYPE == 0u {
        push4(st, bitcast<vec4<f32>>(w), j);
    } else {
        let a = unpack2(w.x);
        let b = unpack2(w.y);
        let c = unpack2(w.z);
        let d = unpack2(w.w);
        push4(st, vec4<f32>(a, b), j);
        push4(st, vec4<f32>(c, d), j + 4u);
    }
}

// Scans row indices [lo, hi) of the row starting at element `base`, as lane `lane` of `lanes`.
// Head (before the first 16-byte boundary), body (whole vec4s) and tail come in increasing
// index order for each lane, which the first-index argmax relies on.
fn scan(st: ptr<function, State>, base: u32, lo: u32, hi: u32, lane: u32, lanes: u32) {
    let n = per_vec();
    let a0 = base + lo;
    let a1 = base + hi;
    let v0 = (a0 + n - 1u) / n;
    let v1 = a1 / n;
    if v0 >= v1 {
        for (var e = a0 + lane; e < a1; e += lanes) {
            push(st, load(e), e - base);
        }
        return;
    }
    for (var e = a0 + lane; e < v0 * n; e += lanes) {
        push(st, load(e), e - base);
    }
    for (var k = v0 + lane; k < v1; k += lanes) {
        push_words(st, logits4[k], k * n - base);
    }
    for (var e = v1 * n + lane; e < a1; e += lanes) {
        push(st, load(e), e - base);
    }
}

// Merges two partial states; ties in the argmax go to the smaller index.
fn merge(a: State, b: State) -> State {
    let m = max(a.m, b.m);
    var r: State;
    r.m = m;
    r.s = a.s * exp(a.m - m) + b.s * exp(b.m - m);
    r.best = a.best;
    r.idx = a.idx;
    if b.best > a.best || (b.best == a.best && b.idx < a.idx) {
        r.best = b.best;
        r.idx = b.idx;
    }
    r.bad = a.bad | b.bad;
    return r;
}

fn row_base(row: u32) -> u32 {
    return params.logits_offset + row * params.row_stride;
}

// Writes row `row`'s result from its complete state.
fn finish(row: u32, st: State) {
    let t = targets[params.targets_offset + row];
    var r: RowLoss;
    // A NaN or +inf anywhere, or a row of only -inf (s == 0): NaN, as torch; no argmax.
    let broken = st.bad != 0u || st.s == 0.0;
    r.argmax = select(st.idx, NO_INDEX, broken);
    let log_s = log(st.s);
    r.lse = select(st.m + log_s, nan(), broken);
    if t == params.ignore {
        r.nll = 0.0;
        r.flags = FLAG_IGNORED;
    } else if t >= params.vocab {
        // Only reachable through `encode` on unvalidated targets: the host API rejects these.
        r.nll = nan();
        r.flags = FLAG_BAD_TARGET;
    } else {
        r.nll = select((st.m - load(row_base(row) + t)) + log_s, nan(), broken);
        r.flags = select(0u, FLAG_CORRECT, !broken && r.argmax == t);
    }
    out[params.out_offset + row] = r;
}

// The work unit of workgroup `g`'s lane group `slot`, scanned; returns (row, part, state).
// Rows past the end give an empty state and row >= params.rows.
fn scan_unit(g: u32, slot: u32, lane: u32, lanes: u32) -> State {
    let unit = g * ROWS_PER_WG + slot;
    let row = unit / params.split;
    var st = empty_state();
    if row < params.rows {
        let part = unit % params.split;
        let lo = part * params.split_len;
        let hi = min(params.vocab, lo + params.split_len);
        scan(&st, row_base(row), lo, hi, lane, lanes);
    }
    return st;
}

// Stores a finished unit: the row's result, or a partial state for `combine`.
fn emit(g: u32, slot: u32, st: State) {
    let unit = g * ROWS_PER_WG + slot;
    let row = unit / params.split;
    if row >= params.rows {
        return;
    }
    if params.split == 1u {
        finish(row, st);
    } else {
        partials[unit] = st;
    }
}

// Second pass for split rows: one invocation per row merges its parts and writes the result.
@compute @workgroup_size(64)
fn combine(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) groups: vec3<u32>) {
    let row = gid.x + gid.y * groups.x * 64u;
    if row >= params.rows {
        return;
    }
    var st = partials[row * params.split];
    for (var p = 1u; p < params.split; p++) {
        st = merge(st, partials[row * params.split + p]);
    }
    finish(row, st);
}
