// The unfused training baseline, for benchmarks only: loss and gradient composed as eager
// frameworks run them. unfused.wgsl's `log_softmax` writes the log-probabilities out to a
// [rows, vocab] buffer (reading the logits three times); then this pass reads them back and writes
// the gradient — exp, subtract the one-hot, scale — and the row's loss: three [rows, vocab]
// buffers of traffic against the fused kernel's two reads and one write of the logits. f32, no
// options (no ignored rows, weights, smoothing, z-loss or soft-cap), one workgroup per row.

struct Params {
    rows: u32,
    vocab: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logprobs: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read> scale: array<f32>;
@group(0) @binding(4) var<storage, read_write> grad: array<f32>;
@group(0) @binding(5) var<storage, read_write> loss: array<f32>;

// 256 invocations: WebGPU's guaranteed minimum, and the fused kernels' default.
const WG: u32 = 256u;

@compute @workgroup_size(WG)
fn grad_from_logprobs(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) n: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * n.x;
    if row >= params.rows {
        return;
    }
    let base = row * params.vocab;
    let t = targets[row];
    let g = scale[row];
    for (var j = lid; j < params.vocab; j += WG) {
        grad[base + j] = g * (exp(logprobs[base + j]) - select(0.0, 1.0, j == t));
    }
    if lid == 0u {
        loss[row] = -logprobs[base + t];
    }
}
