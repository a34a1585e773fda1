// Bindings of the training kernel whose gradient goes into a buffer of its own (or nowhere): the
// logits read-only, the gradient read-write. Part of the train module (see train.wgsl).

@group(0) @binding(1) var<storage, read> logits1: array<u32>;
// The gradient, laid out as the logits (Params side b), in their dtype.
@group(0) @binding(6) var<storage, read_write> grad1: array<u32>;

fn load_word(k: u32) -> u32 { return logits1[k]; }
fn load_grad_word(k: u32) -> u32 { return grad1[k]; }
fn store_grad_word(k: u32, w: u32) { grad1[k] = w; }
