// The unfused KLD baseline, for benchmarks only: KL divergence composed as frameworks do it
// (`F.kl_div(F.log_softmax(b), F.log_softmax(a), log_target=True).sum(-1)`): unfused.wgsl's
// `log_softmax` writes both sides' log-probabilities out to [rows, vocab] buffers, then this
// per-row sum of p·(log p - log q) reads both back. f32, one workgroup per row.

struct Params {
    rows: u32,
    vocab: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logp: array<f32>;
@group(0) @binding(2) var<storage, read> logq: array<f32>;
@group(0) @binding(3) var<storage, read_write> kld: array<f32>;

// 256 invocations: WebGPU's guaranteed minimum, and the fused kernels' default.
const WG: u32 = 256u;
var<workgroup> scratch: array<f32, WG>;

@compute @workgroup_size(WG)
fn kld_sum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * n.x;
    if row >= params.rows {
        return;
    }
    let base = row * params.vocab;
    var s = 0.0;
    for (var j = lid; j < params.vocab; j += WG) {
        let lp = logp[base + j];
        // p = 0 contributes nothing (0 · -inf would be NaN).
        s += select(0.0, exp(lp) * (lp - logq[base + j]), lp > -3.40282347e38);
    }
    scratch[lid] = s;
    workgroupBarrier();
    for (var w = WG / 2u; w > 0u; w /= 2u) {
        if lid < w {
            scratch[lid] += scratch[lid + w];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        kld[row] = scratch[0];
    }
}
