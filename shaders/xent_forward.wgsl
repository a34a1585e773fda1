// Fused cross-entropy forward: one workgroup per row.
//
// In one pass over the row each invocation keeps an online (max, sum of exp(x - max)),
// the first index of the largest logit, and a flag for NaN / +inf. The workgroup then
// combines those partial states in workgroup memory, and invocation 0 gathers the
// target's logit and writes the row's result:
//
//     nll = (max - x[target]) + log(sum)      (not lse - x[target]: rows of large, nearly
//     lse = max + log(sum)                     equal logits keep f32 precision this way)
//
// The logits binding is a window of the caller's buffer read as u32 words, so one shader
// serves f32, f16 (two per word, `unpack2x16float`, core WGSL: no SHADER_F16 needed) and
// bf16 (two per word, the high 16 bits of an f32). Arithmetic is f32 in every case.

// 0 = f32, 1 = f16, 2 = bf16.
override DTYPE: u32 = 0u;
// Invocations per workgroup. 256 fills a row's stream of loads on every adapter we know of
// while staying within the WebGPU minimum limit (256) and keeping the workgroup-memory
// reduction at 8 steps; the host lowers it when an adapter's limits are smaller.
override WG_SIZE: u32 = 256u;

const MAX_WG: u32 = 256u;
const FLAG_IGNORED: u32 = 1u;
const FLAG_CORRECT: u32 = 2u;
const FLAG_BAD_TARGET: u32 = 4u;
const NO_INDEX: u32 = 0xffffffffu;

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
    // Workgroups along x in this dispatch (rows beyond 65535 use y).
    groups_x: u32,
}

struct RowLoss {
    nll: f32,
    lse: f32,
    argmax: u32,
    flags: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<u32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<RowLoss>;

var<workgroup> wg_max: array<f32, MAX_WG>;
var<workgroup> wg_sum: array<f32, MAX_WG>;
var<workgroup> wg_best: array<f32, MAX_WG>;
var<workgroup> wg_idx: array<u32, MAX_WG>;
var<workgroup> wg_bad: array<u32, MAX_WG>;

fn neg_inf() -> f32 { return bitcast<f32>(0xff800000u); }
fn nan() -> f32 { return bitcast<f32>(0x7fc00000u); }

// NaN or +inf: torch gives NaN for the whole row (x - max is NaN at the +inf entry).
// Tested on the bits so that no compiler's finite-math assumption can remove it.
fn is_bad(x: f32) -> bool {
    let b = bitcast<u32>(x);
    return (b & 0x7fffffffu) > 0x7f800000u || b == 0x7f800000u;
}

// Logit number `i` (an element index into the binding).
fn load(i: u32) -> f32 {
    if DTYPE == 0u {
        return bitcast<f32>(logits[i]);
    }
    let word = logits[i >> 1u];
    let hi = (i & 1u) == 1u;
    if DTYPE == 1u {
        let pair = unpack2x16float(word);
        return select(pair.x, pair.y, hi);
    }
    return bitcast<f32>(select(word << 16u, word & 0xffff0000u, hi));
}

struct State {
    m: f32,
    s: f32,
    best: f32,
    idx: u32,
    bad: u32,
}

// Starting max: the lowest finite f32, so that exp(x - m) is never exp(-inf - -inf) = NaN;
// a -inf logit then adds exp(-inf) = 0, and a row of only -inf ends with s == 0.
const LOWEST: f32 = -3.40282347e38;

fn push(st: ptr<function, State>, x: f32, j: u32) {
    if x > (*st).m {
        (*st).s = (*st).s * exp((*st).m - x) + 1.0;
        (*st).m = x;
    } else {
        (*st).s += exp(x - (*st).m);
    }
    // Indices arrive in increasing order per invocation: strict > keeps the first.
    if x > (*st).best {
        (*st).best = x;
        (*st).idx = j;
    }
    (*st).bad |= u32(is_bad(x));
}

@compute @workgroup_size(WG_SIZE)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // Every invocation of a workgroup takes the same branch: `row` is uniform.
    let row = wid.x + wid.y * params.groups_x;
    if row >= params.rows {
        return;
    }
    let base = params.logits_offset + row * params.row_stride;

    var st = State(LOWEST, 0.0, neg_inf(), NO_INDEX, 0u);
    for (var j = lid; j < params.vocab; j += WG_SIZE) {
        push(&st, load(base + j), j);
    }
    wg_max[lid] = st.m;
    wg_sum[lid] = st.s;
    wg_best[lid] = st.best;
    wg_idx[lid] = st.idx;
    wg_bad[lid] = st.bad;
    workgroupBarrier();

    // Tree reduction; WG_SIZE need not be a power of two.
    var width = WG_SIZE;
    while width > 1u {
        let half = (width + 1u) / 2u;
        if lid < width - half {
            let o = lid + half;
            let m1 = wg_max[lid];
            let m2 = wg_max[o];
            let m = max(m1, m2);
            wg_sum[lid] = wg_sum[lid] * exp(m1 - m) + wg_sum[o] * exp(m2 - m);
            wg_max[lid] = m;
            let b1 = wg_best[lid];
            let b2 = wg_best[o];
            if b2 > b1 || (b2 == b1 && wg_idx[o] < wg_idx[lid]) {
                wg_best[lid] = b2;
                wg_idx[lid] = wg_idx[o];
            }
            wg_bad[lid] |= wg_bad[o];
        }
        workgroupBarrier();
        width = half;
    }

    if lid == 0u {
        let m = wg_max[0];
        let s = wg_sum[0];
        let t = targets[params.targets_offset + row];
        var r: RowLoss;
        r.argmax = wg_idx[0];
        // A NaN or +inf anywhere, or a row of only -inf (s == 0): NaN, as torch.
        let broken = wg_bad[0] != 0u || s == 0.0;
        let log_s = log(s);
        r.lse = select(m + log_s, nan(), broken);
        if t == params.ignore {
            r.nll = 0.0;
            r.flags = FLAG_IGNORED;
        } else if t >= params.vocab {
            // Only reachable through `encode` on unvalidated targets: the host API rejects these.
            r.nll = nan();
            r.flags = FLAG_BAD_TARGET;
        } else {
            r.nll = select((m - load(base + t)) + log_s, nan(), broken);
            r.flags = select(0u, FLAG_CORRECT, !broken && r.argmax == t);
        }
        out[params.out_offset + row] = r;
    }
}
