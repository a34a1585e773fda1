//! # xent — fused cross-entropy and KL divergence on the GPU
//!
//! Cross-entropy over huge `[rows, vocab]` logits in one fused pass per row, and the KL divergence
//! between two models' logits in one fused pass over both rows ([`kld`]), in WGSL compute shaders
//! through [`wgpu`] (Vulkan, Metal, DX12), checked against plain f64 CPU references.
//!
//! ## The maths
//! For each row `x` (length `vocab`) with target `t`:
//!
//! - `lse = log(sum_j exp(x_j))`, computed as `max + log(sum_j exp(x_j - max))`;
//! - `nll = (max - x_t) + log(sum_j exp(x_j - max))` — the same value as `lse - x_t`, but rows of
//!   large, nearly equal logits keep f32 precision;
//! - `correct = argmax_j(x_j) == t`, first index on ties (as `torch.argmax`).
//!
//! A NaN or `+inf` in a row makes it NaN; `-inf` logits contribute nothing; a target whose logit
//! is `-inf` has `nll = +inf`; rows whose target is the ignore index (default -100) have
//! `nll = 0` and are left out of the mean — PyTorch's `F.cross_entropy(reduction='none')`.
//! Perplexity is `exp(mean nll)` in nats; bits per token is `mean nll / ln 2`.
//!
//! ## Memory layout
//! Logits are row-major, little-endian f32, f16 or bf16; a row may be followed by padding
//! (`row_stride >= vocab`) in [`EncodeJob`]. Targets are one integer per row. Results are one
//! 16-byte [`RowLoss`] per row, the layout the kernel writes.
//!
//! ## Entry points
//! - [`GpuContext::score`]: host slices in, per-row results out (uploaded in chunks that fit the
//!   adapter's bindings).
//! - [`GpuContext::encode`]: records the kernel over buffers the caller already has, into the
//!   caller's encoder — no submit, no sync, no copy (for inference engines).
//! - [`Stream`]: inputs larger than device memory or arriving in pieces, through a ring of buffers so
//!   that upload, kernel and readback overlap.
//! - [`eval::evaluate`]: shards of `.npy` / `.safetensors` files read in bounded memory, with
//!   `shift`, per-token and per-sequence results.
//! - [`cpu::score`]: the fast multi-threaded CPU path; [`reference::score`]: the f64 oracle.
//! - Training ([`train`]): the loss **and its gradient** with PyTorch's options plus z-loss and
//!   soft-cap ([`train::LossOptions`]): [`train::cpu::loss_and_grad`] (and `_in_place`),
//!   [`GpuContext::loss_and_grad`], [`GpuContext::encode_loss_and_grad`] over the caller's
//!   buffers (in place, or into another region), [`train::reference::cross_entropy`] (f64).
//! - `burn::cross_entropy` / `burn::train::cross_entropy` (feature `burn`): the kernel on burn's
//!   own wgpu device and buffers; under burn's autodiff, `loss.backward()` runs xent's gradient.
//! - `candle::cross_entropy` / `candle::train::cross_entropy` (feature `candle`): the fast CPU
//!   path on candle's CPU tensors, read in place, as a candle op (the training one differentiable).
//! - [`adapters`]: the GPUs `XENT_ADAPTER=N` chooses among (one per process on multi-GPU nodes).
//! - [`Summary`]: exact, mergeable sums giving mean nll, perplexity ± standard error, bits per
//!   token, accuracy.
//! - KL divergence of a test model from a base ([`kld`]): [`GpuContext::kld`] (host slices),
//!   [`GpuContext::encode_kld`] (an engine's buffers), [`KldStream`], [`kld::cpu::kld`],
//!   [`kld::reference::kld`], files with [`kld::eval::evaluate_kld`], llama.cpp's statistics in a
//!   mergeable [`kld::summary::KldSummary`], and llama.cpp's base files ([`llamacpp`]).
//!
//! ## Example
//! ```
//! use xent::{GpuContext, Logits, Options, Summary, Targets};
//!
//! let vocab = 4;
//! let logits = [1.0f32, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0];
//! let targets = [3i64, 1];
//! let x = Logits::f32(&logits, vocab)?;
//!
//! // The CPU path always works; the GPU path needs an adapter (lavapipe counts).
//! let rows = xent::cpu::score(x, Targets::I64(&targets), &Options::default())?;
//! if let Ok(gpu) = GpuContext::new() {
//!     let on_gpu = gpu.score(x, Targets::I64(&targets), &Options::default())?;
//!     assert!((on_gpu[0].nll - rows[0].nll).abs() < 1e-5);
//! }
//! assert!((rows[1].nll - 4f32.ln()).abs() < 1e-6);
//! let summary = Summary::of(&rows);
//! println!("perplexity {:.3}, accuracy {:.2}", summary.perplexity(), summary.accuracy());
//! # Ok::<(), xent::Error>(())
//! ```
#![warn(missing_docs)]

pub mod bench;
#[cfg(feature = "burn")]
pub mod burn;
#[cfg(feature = "candle")]
pub mod candle;
pub mod cpu;
pub mod device;
mod error;
pub mod eval;
mod gpu;
pub mod io;
pub mod kld;
pub mod llamacpp;
mod problem;
pub mod reference;
mod stream;
mod summary;
pub mod synth;
pub mod train;

pub use error::{Error, Result};
pub use gpu::{
    adapters, read_buffer, ClassWeights, EncodeJob, GpuContext, GradOutput, KldEncodeJob, Plan, Reduction,
    TrainEncodeJob, KLD_ROW_BYTES, ROW_LOSS_BYTES, TRAIN_ROW_BYTES,
};
pub use problem::{validate_targets, Dtype, Logits, Options, RowLoss, Targets, IGNORED_TARGET};
pub use stream::{KldKernel, KldStream, ScoreKernel, Stream, StreamKernel, RING};
pub use summary::Summary;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
