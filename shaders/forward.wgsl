// Fused cross-entropy forward: the kernel's own part. Preceded by online_softmax.wgsl and followed
// by one reduction (reduce_workgroup.wgsl, or forward_subgroup.wgsl + reduce_subgroup.wgsl when
// the device has Features::SUBGROUP).
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
// head and tail as single words, so one shader serves f32, f16 and bf16. Arithmetic is f32
// throughout.

// 0 = f32, 1 = f16, 2 = bf16 (DT_* in online_softmax.wgsl).
override DTYPE: u32 = 0u;
// Invocations per workgroup. 256 keeps enough 16-byte loads in flight per row on every adapter
// we know while staying within WebGPU's minimum limit (256); the host lowers it when an
// adapter's limits are smaller.
override WG_SIZE: u32 = 256u;
// Rows per workgroup (a power of two dividing WG_SIZE): more than one when rows are short, so
// that lanes are not left idle.
override ROWS_PER_WG: u32 = 1u;

const FLAG_IGNORED: u32 = 1u;
const FLAG_CORRECT: u32 = 2u;
const FLAG_BAD_TARGET: u32 = 4u;

// `Params`, the uniform every kernel of the family reads, is in online_softmax.wgsl; this kernel
// has one input, side a.

struct RowLoss {
    nll: f32,
    lse: f32,
    argmax: u32,
    flags: u32,
}

struct State {
    ms: MaxSum,
    top: Top,
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

fn empty_state() -> State { return State(max_sum_empty(), top_empty(), 0u); }

// Logit number `i` (an element index into the binding).
fn load(i: u32) -> f32 {
    if DTYPE == DT_F32 {
        return bitcast<f32>(logits1[i]);
    }
    return unpack_half(logits1[i >> 1u], (i & 1u) == 1u, DTYPE);
}

// One logit `x` at row index `j`.
fn push(st: ptr<function, State>, x: f32, j: u32) {
    (*st).ms = max_sum_push((*st).ms, x);
    (*st).top = top_push((*st).top, x, j);
    (*st).bad |= u32(is_bad(x));
}

// Four consecutive logits starting at row index `j`.
fn push4(st: ptr<function, State>, v: vec4<f32>, j: u32) {
    (*st).ms = max_sum_push4((*st).ms, v);
    (*st).top = top_push4((*st).top, v, j);
    (*st).bad |= u32(any_bad4(v));
}

fn push_words(st: ptr<function, State>, w: vec4<u32>, j: u32) {
    if DTYPE == DT_F32 {
        push4(st, bitcast<vec4<f32>>(w), j);
    } else {
        let v = unpack8(w, DTYPE);
        push4(st, v[0], j);
        push4(st, v[1], j + 4u);
    }
}

// Scans row indices [lo, hi) of the row starting at element `base`, as lane `lane` of `lanes`.
// Head (before the first 16-byte boundary), body (whole vec4s) and tail come in increasing
// index order for each lane, which the first-index argmax relies on.
fn scan(st: ptr<function, State>, base: u32, lo: u32, hi: u32, lane: u32, lanes: u32) {
    let n = per_vec(DTYPE);
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
    return State(max_sum_merge(a.ms, b.ms), top_merge(a.top, b.top), a.bad | b.bad);
}

fn row_base(row: u32) -> u32 {
    return params.a_offset + row * params.a_stride;
}

// Writes row `row`'s result from its complete state.
fn finish(row: u32, st: State) {
    let t = targets[params.targets_offset + row];
    var r: RowLoss;
    // A NaN or +inf anywhere, or a row of only -inf (s == 0): NaN, as torch; no argmax.
    let broken = st.bad != 0u || st.ms.s == 0.0;
    r.argmax = select(st.top.idx, NO_INDEX, broken);
    let log_s = log(st.ms.s);
    r.lse = select(st.ms.m + log_s, nan(), broken);
    if t == params.ignore {
        r.nll = 0.0;
        r.flags = FLAG_IGNORED;
    } else if t >= params.vocab {
        // Only reachable through `encode` on unvalidated targets: the host API rejects these.
        r.nll = nan();
        r.flags = FLAG_BAD_TARGET;
    } else {
        r.nll = select((st.ms.m - load(row_base(row) + t)) + log_s, nan(), broken);
        r.flags = select(0u, FLAG_CORRECT, !broken && r.argmax == t);
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
        scan(&st, row_base(row), lo, hi, lane, lanes);
    }
    return st;
}

// `emit` and the `combine` entry point follow in split_rows.wgsl.

// Nothing more to do once a unit's result is emitted (the hook of split_rows.wgsl).
fn after_unit(g: u32, slot: u32, lane: u32, lanes: u32) {}
