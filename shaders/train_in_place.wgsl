// Bindings of the training kernel that writes the gradient over the logits: one read-write
// binding serves both (wgpu forbids binding a buffer read-only and read-write in one dispatch,
// and two writable views of one buffer may not alias). Part of the train module (see train.wgsl).

@group(0) @binding(1) var<storage, read_write> logits1: array<u32>;

fn load_word(k: u32) -> u32 { return logits1[k]; }
fn load_grad_word(k: u32) -> u32 { return logits1[k]; }
fn store_grad_word(k: u32, w: u32) { logits1[k] = w; }
