// The unfused baseline, for benchmarks only: cross-entropy composed as most frameworks do it
// (candle, burn): log-softmax written out to a [rows, vocab] buffer, then a gather of the
// target's column. f32 logits, one workgroup per row; the row is read three times (max, sum,
// write) and the log-probabilities are written once, then read once by the gather.

struct Params {
    rows: u32,
    vocab: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read_write> logprobs: array<f32>;
@group(0) @binding(3) var<storage, read> targets: array<u32>;
@group(0) @binding(4) var<storage, read_write> nll: array<f32>;

// 256 invocations: WebGPU's guaranteed minimum, and the fused kernel's default.
const WG: u32 = 256u;
var<workgroup> scratch: array<f32, WG>;

fn reduce_max(lid: u32, v: f32) -> f32 {
    scratch[lid] = v;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w /= 2u) {
        if lid < w {
            scratch[lid] = max(scratch[lid], scratch[lid + w]);
        }
        workgroupBarrier();
    }
    let r = scratch[0];
    workgroupBarrier();
    return r;
}

fn reduce_sum(lid: u32, v: f32) -> f32 {
    scratch[lid] = v;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w /= 2u) {
        if lid < w {
            scratch[lid] += scratch[lid + w];
        }
        workgroupBarrier();
    }
    let r = scratch[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WG)
fn log_softmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * n.x;
    if row >= params.rows {
        return;
    }
    let base = row * params.vocab;
    var m = -3.40282347e38;
    for (var j = lid; j < params.vocab; j += WG) {
        m = max(m, logits[base + j]);
    }
    m = reduce_max(lid, m);
    var s = 0.0;
    for (var j = lid; j < params.vocab; j += WG) {
        s += exp(logits[base + j] - m);
    }
    let lse = m + log(reduce_sum(lid, s));
    for (var j = lid; j < params.vocab; j += WG) {
        logprobs[base + j] = logits[base + j] - lse;
    }
}

@compute @workgroup_size(64)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>) {
    let row = gid.x;
    if row >= params.rows {
        return;
    }
    nll[row] = -logprobs[row * params.vocab + targets[row]];
}
