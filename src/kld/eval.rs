//! Comparing two models over evaluation sets at scale: shards of base and test logits read
//! together in fixed-size chunks (memory bounded whatever the input size), compared on the GPU
//! through a streaming ring or on the CPU, and folded into a [`KldSummary`] and per-token results.
//! A llama.cpp base file (`--kl-divergence-base`) can stand for the base side ([`evaluate_llama`]).
//!
//! As in [`crate::eval`], chunks restart at the first row of every shard, so a shard's rows are
//! computed identically whether it is compared alone or with others, and summaries merge exactly.

use crate::error::{Error, Result};
use crate::eval::{shift_labels, Engine};
use crate::io::Tensor;
use crate::kld::summary::KldSummary;
use crate::kld::{KldRow, NO_TARGET};
use crate::llamacpp::BaseFile;
use crate::problem::{validate_targets, Dtype, Logits, Options};

/// A base logits tensor, the test logits over the same tokens, and optionally their targets.
#[derive(Debug)]
pub struct KldShard {
    /// The base model's logits, `[N, V]` or `[B, T, V]`.
    pub base: Tensor,
    /// The test model's logits: the same shape (any float dtype).
    pub test: Tensor,
    /// Targets (labels with `shift`), `[N]` or `[B, T]`.
    pub targets: Option<Tensor>,
}

/// What to compute beyond the summary.
#[derive(Debug, Clone)]
pub struct KldEvalOptions {
    /// The ignore index of the targets.
    pub options: Options,
    /// Causal-LM convention: targets are the input ids; position t is scored against label t+1
    /// of its sequence and the last position of each sequence is dropped (needs targets).
    pub shift: bool,
    /// Keep per-token KLD (and same-top).
    pub per_token: bool,
    /// Keep per-token `nll_base`, `nll_test` and `dp` too.
    pub per_token_extra: bool,
    /// Bytes of logits (both sides) per chunk (0: 64 MiB).
    pub chunk_bytes: u64,
    /// Tokens whose values are kept for exact percentiles (beyond: the sketch).
    pub percentile_budget: u64,
}

impl Default for KldEvalOptions {
    fn default() -> Self {
        KldEvalOptions {
            options: Options::default(),
            shift: false,
            per_token: false,
            per_token_extra: false,
            chunk_bytes: 0,
            percentile_budget: crate::kld::summary::DEFAULT_BUDGET,
        }
    }
}

/// Per-token results of the rows compared (rows dropped by `shift` are absent; ignored rows are 0).
#[derive(Debug, Clone, Default)]
pub struct KldPerToken {
    /// KLD in nats.
    pub kld: Vec<f32>,
    /// 1 where both argmaxes agree.
    pub same_top: Vec<u8>,
    /// `−log p_t` (when asked for).
    pub nll_base: Vec<f32>,
    /// `−log q_t` (when asked for).
    pub nll_test: Vec<f32>,
    /// `q_t − p_t` (when asked for).
    pub dp: Vec<f32>,
}

/// Everything [`evaluate_kld`] returns.
#[derive(Debug, Clone)]
pub struct KldEvalResult {
    /// Mergeable sums, sketches and (within budget) exact values.
    pub summary: KldSummary,
    /// Per-token results, when asked for.
    pub per_token: Option<KldPerToken>,
    /// Bytes of logits read (both sides).
    pub bytes: u64,
}

/// The layout all shards share, checked up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KldLayout {
    /// Element type of the base logits.
    pub base_dtype: Dtype,
    /// Element type of the test logits.
    pub test_dtype: Dtype,
    /// Vocabulary.
    pub vocab: usize,
    /// Total rows.
    pub rows: u64,
    /// Total bytes of logits, both sides.
    pub bytes: u64,
    /// Whether targets were given.
    pub targets: bool,
}

/// Checks that the shards agree with each other, each test with its base, each with its targets.
///
/// # Errors
/// [`Error::File`] naming the file: no shards; a vocab or dtype different from the first shard's;
/// base and test of different shapes; targets of the wrong count or shape; targets on some
/// shards only.
pub fn check_kld_shards(shards: &[KldShard]) -> Result<KldLayout> {
    let first = shards.first().ok_or_else(|| Error::File { path: "(none)".into(), reason: "no shards".into() })?;
    let (a0, b0) = (first.base.logits()?, first.test.logits()?);
    let mut layout = KldLayout {
        base_dtype: a0.dtype(),
        test_dtype: b0.dtype(),
        vocab: a0.vocab(),
        rows: 0,
        bytes: 0,
        targets: first.targets.is_some(),
    };
    for s in shards {
        let (a, b) = (s.base.logits()?, s.test.logits()?);
        let file = |t: &Tensor, reason: String| Err(Error::File { path: t.name.clone(), reason });
        if a.vocab() != layout.vocab || a.dtype() != layout.base_dtype {
            return file(
                &s.base,
                format!(
                    "vocab {} {} disagrees with the first base shard (vocab {} {})",
                    a.vocab(),
                    a.dtype(),
                    layout.vocab,
                    layout.base_dtype
                ),
            );
        }
        if b.dtype() != layout.test_dtype {
            return file(
                &s.test,
                format!("dtype {} disagrees with the first test shard ({})", b.dtype(), layout.test_dtype),
            );
        }
        if b.vocab() != a.vocab()
            || b.rows() != a.rows()
            || (s.test.shape.len() == s.base.shape.len() && s.test.shape != s.base.shape)
        {
            return file(
                &s.test,
                format!("shape {:?} does not match the base {} of shape {:?}", s.test.shape, s.base.name, s.base.shape),
            );
        }
        match &s.targets {
            Some(t) => {
                let n = t.targets()?.len();
                let (ls, ts) = (&s.base.shape, &t.shape);
                if n != a.rows() || (ls.len() == 3 && ts.len() == 2 && ls[..2] != ts[..]) {
                    return file(
                        t,
                        format!(
                            "shape {ts:?} ({n} targets) does not match {} of shape {ls:?} ({} rows)",
                            s.base.name,
                            a.rows()
                        ),
                    );
                }
            }
            None if layout.targets => return file(&s.base, "has no targets file while the first shard has one".into()),
            None => {}
        }
        layout.rows += a.rows() as u64;
        layout.bytes += (s.base.data_len() + s.test.data_len()) as u64;
    }
    Ok(layout)
}

/// Kernel targets and dropped rows of one shard.
fn prepare(s: &KldShard, rows: usize, vocab: usize, opts: &KldEvalOptions) -> Result<(Vec<u32>, Vec<bool>)> {
    let Some(t) = &s.targets else {
        if opts.shift {
            return Err(Error::Shape("--shift needs targets (the labels to shift)".into()));
        }
        return Ok((vec![NO_TARGET; rows], vec![false; rows]));
    };
    let kernel = validate_targets(t.targets()?, rows, vocab, &opts.options)
        .map_err(|e| Error::File { path: t.name.clone(), reason: e.to_string() })?;
    t.check_unchanged()?;
    if !opts.shift {
        return Ok((kernel, vec![false; rows]));
    }
    let seq_len = match (&s.base.shape[..], &t.shape[..]) {
        ([_, t, _], _) | (_, [_, t]) => *t,
        _ => rows,
    }
    .max(1);
    let sequence: Vec<u64> = (0..rows).map(|r| (r / seq_len) as u64).collect();
    Ok(shift_labels(&kernel, &sequence))
}

/// Folds rows into the result, skipping dropped ones.
struct Folder<'o> {
    out: KldEvalResult,
    opts: &'o KldEvalOptions,
}

impl Folder<'_> {
    fn fold(&mut self, rows: &[KldRow], dropped: &[bool]) -> Result<()> {
        for (r, &drop) in rows.iter().zip(dropped) {
            if !r.is_written() {
                return Err(Error::Gpu("a row was never written by the kernel".into()));
            }
            if drop {
                continue;
            }
            self.out.summary.push(r);
            if let Some(pt) = &mut self.out.per_token {
                pt.kld.push(r.kld);
                pt.same_top.push(u8::from(r.same_top()));
                if self.opts.per_token_extra {
                    pt.nll_base.push(r.nll_base);
                    pt.nll_test.push(r.nll_test);
                    pt.dp.push(r.dp);
                }
            }
        }
        Ok(())
    }
}

/// Compares every shard; `progress(rows, bytes)` is called after each chunk;
/// an error it returns (such as [`Error::Interrupted`]) stops the work and is returned.
///
/// # Errors
/// As [`check_kld_shards`]; a target out of range (naming the targets file and row); a file that
/// changes or is truncated while being read; a device error.
pub fn evaluate_kld(
    engine: Engine<'_>,
    shards: &[KldShard],
    opts: &KldEvalOptions,
    progress: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<KldEvalResult> {
    let layout = check_kld_shards(shards)?;
    let chunk_bytes = if opts.chunk_bytes == 0 { 64 << 20 } else { opts.chunk_bytes } as usize;
    let (rba, rbb) = (layout.vocab * layout.base_dtype.size(), layout.vocab * layout.test_dtype.size());
    let mut folder = Folder {
        out: KldEvalResult {
            summary: KldSummary::with_budget(opts.percentile_budget),
            per_token: opts.per_token.then(KldPerToken::default),
            bytes: 0,
        },
        opts,
    };
    match engine {
        Engine::Gpu(ctx) => gpu::evaluate(ctx, shards, &layout, opts, chunk_bytes, &mut folder, progress)?,
        Engine::Cpu => {
            let chunk_rows = (chunk_bytes / (rba + rbb)).max(1);
            for s in shards {
                let rows = s.base.data_len() / rba;
                let (targets, dropped) = prepare(s, rows, layout.vocab, opts)?;
                for r0 in (0..rows).step_by(chunk_rows) {
                    let n = chunk_rows.min(rows - r0);
                    let done = compare_chunk_cpu(s, &layout, r0, n, &targets[r0..r0 + n])?;
                    folder.fold(&done, &dropped[r0..r0 + n])?;
                    let bytes = (n * (rba + rbb)) as u64;
                    folder.out.bytes += bytes;
                    progress(n as u64, bytes)?;
                }
                s.base.check_unchanged()?;
                s.test.check_unchanged()?;
            }
        }
    }
    Ok(folder.out)
}

/// Compares rows `r0..r0 + n` of a shard on the CPU: every thread reads and compares its own
/// blocks of ~4 MiB (both sides), zero-copy from the page cache where the system allows it.
fn compare_chunk_cpu(s: &KldShard, layout: &KldLayout, r0: usize, n: usize, targets: &[u32]) -> Result<Vec<KldRow>> {
    use rayon::prelude::*;
    let (rba, rbb) = (layout.vocab * layout.base_dtype.size(), layout.vocab * layout.test_dtype.size());
    let block = ((4 << 20) / (rba + rbb)).max(1);
    let blocks = n.div_ceil(block);
    let compare = |a: &[u8], b: &[u8], first: usize, m: usize| -> Result<Vec<KldRow>> {
        let base = Logits::from_bytes(a, layout.base_dtype, m, layout.vocab)?;
        let test = Logits::from_bytes(b, layout.test_dtype, m, layout.vocab)?;
        Ok(if blocks >= rayon::current_num_threads() {
            super::cpu::kld_sequential(base, test, &targets[first..first + m])
        } else {
            super::cpu::kld_validated(base, test, &targets[first..first + m])
        })
    };
    let zero_copy = s.base.mapped(r0 * rba, rba)?.is_some() && s.test.mapped(r0 * rbb, rbb)?.is_some();
    let parts = if zero_copy {
        let parts = (0..blocks)
            .into_par_iter()
            .map(|k| {
                let (a0, m) = (k * block, block.min(n - k * block));
                let unavailable =
                    |t: &Tensor| Error::File { path: t.name.clone(), reason: "memory map became unavailable".into() };
                let a = s.base.mapped((r0 + a0) * rba, m * rba)?.ok_or_else(|| unavailable(&s.base))?;
                let b = s.test.mapped((r0 + a0) * rbb, m * rbb)?.ok_or_else(|| unavailable(&s.test))?;
                compare(a, b, a0, m)
            })
            .collect::<Result<Vec<_>>>();
        s.base.release(r0 * rba, n * rba);
        s.test.release(r0 * rbb, n * rbb);
        parts?
    } else {
        (0..blocks)
            .into_par_iter()
            .map_init(
                || (Vec::new(), Vec::new()),
                |(a, b): &mut (Vec<u8>, Vec<u8>), k| {
                    let (a0, m) = (k * block, block.min(n - k * block));
                    a.resize(m * rba, 0);
                    b.resize(m * rbb, 0);
                    s.base.read_data((r0 + a0) * rba, a)?;
                    s.test.read_data((r0 + a0) * rbb, b)?;
                    compare(a, b, a0, m)
                },
            )
            .collect::<Result<Vec<_>>>()?
    };
    Ok(parts.concat())
}

/// The GPU path: a reader thread fills host buffers with both sides' chunks while the stream
/// uploads and compares (as [`crate::eval`]'s), inside error scopes so that device errors come
/// back as errors.
mod gpu {
    use std::sync::mpsc;

    use super::*;
    use crate::stream::Stream;

    pub(super) fn evaluate(
        ctx: &crate::GpuContext,
        shards: &[KldShard],
        layout: &KldLayout,
        opts: &KldEvalOptions,
        chunk_bytes: usize,
        folder: &mut Folder<'_>,
        progress: &mut dyn FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        ctx.in_error_scopes(|| run(ctx, shards, layout, opts, chunk_bytes, folder, progress))
    }

    /// One chunk read by the reader thread: shard, first row, rows, both sides' bytes.
    type Chunk = (usize, usize, usize, Vec<u8>, Vec<u8>);

    fn run(
        ctx: &crate::GpuContext,
        shards: &[KldShard],
        layout: &KldLayout,
        opts: &KldEvalOptions,
        chunk_bytes: usize,
        folder: &mut Folder<'_>,
        progress: &mut dyn FnMut(u64, u64) -> Result<()>,
    ) -> Result<()> {
        let (rba, rbb) = (layout.vocab * layout.base_dtype.size(), layout.vocab * layout.test_dtype.size());
        let mut stream =
            Stream::kld(ctx, layout.base_dtype, layout.test_dtype, layout.vocab as u32, chunk_bytes as u64)?;
        let chunk_rows = stream.chunk_rows() as usize;
        let prepared = shards
            .iter()
            .map(|s| prepare(s, s.base.data_len() / rba, layout.vocab, opts))
            .collect::<Result<Vec<_>>>()?;
        // Rows queued but not yet folded: their shard and first row, in order.
        let mut pending: std::collections::VecDeque<(usize, usize, usize)> = Default::default();
        let fold = |folder: &mut Folder<'_>,
                    done: Vec<KldRow>,
                    pending: &mut std::collections::VecDeque<(usize, usize, usize)>| {
            let mut rest = &done[..];
            while !rest.is_empty() {
                let Some((si, r0, n)) = pending.front_mut() else {
                    return Err(Error::Gpu("the stream returned more rows than were queued".into()));
                };
                let take = (*n).min(rest.len());
                folder.fold(&rest[..take], &prepared[*si].1[*r0..*r0 + take])?;
                rest = &rest[take..];
                *r0 += take;
                *n -= take;
                if *n == 0 {
                    pending.pop_front();
                }
            }
            Ok(())
        };
        std::thread::scope(|scope| -> Result<()> {
            let (full_tx, full_rx) = mpsc::sync_channel::<Result<Chunk>>(2);
            let (empty_tx, empty_rx) = mpsc::channel::<(Vec<u8>, Vec<u8>)>();
            for _ in 0..3 {
                let _ = empty_tx.send((Vec::new(), Vec::new()));
            }
            scope.spawn(move || {
                for (si, s) in shards.iter().enumerate() {
                    let rows = s.base.data_len() / rba;
                    for r0 in (0..rows).step_by(chunk_rows) {
                        let n = chunk_rows.min(rows - r0);
                        let Ok((mut a, mut b)) = empty_rx.recv() else { return };
                        a.resize(n * rba, 0);
                        b.resize(n * rbb, 0);
                        let read = s
                            .base
                            .read_data(r0 * rba, &mut a)
                            .and_then(|()| s.test.read_data(r0 * rbb, &mut b))
                            .map(|()| (si, r0, n, a, b));
                        let failed = read.is_err();
                        if full_tx.send(read).is_err() || failed {
                            return;
                        }
                    }
                    if let Err(e) = s.base.check_unchanged().and_then(|()| s.test.check_unchanged()) {
                        let _ = full_tx.send(Err(e));
                        return;
                    }
                }
            });
            for msg in full_rx {
                let (si, r0, n, a, b) = msg?;
                let base = Logits::from_bytes(&a, layout.base_dtype, n, layout.vocab)?;
                let test = Logits::from_bytes(&b, layout.test_dtype, n, layout.vocab)?;
                pending.push_back((si, r0, n));
                let done = stream.push(base, test, &prepared[si].0[r0..r0 + n])?;
                let _ = empty_tx.send((a, b));
                fold(folder, done, &mut pending)?;
                let bytes = (n * (rba + rbb)) as u64;
                folder.out.bytes += bytes;
                progress(n as u64, bytes)?;
            }
            Ok(())
        })?;
        let rest = stream.finish()?;
        fold(folder, rest, &mut pending)?;
        if !pending.is_empty() {
            return Err(Error::Gpu("the stream returned fewer rows than were queued".into()));
        }
        Ok(())
    }
}

/// Where the test side comes from when the base is a llama.cpp base file.
#[derive(Debug)]
pub enum LlamaTest {
    /// Another base file of the same shape (its dequantised log-probabilities are the test's).
    Base(BaseFile),
    /// Logits `[n_chunk, n_ctx, V]` (the recorded positions are taken) or one row per record.
    Logits(Tensor),
}

/// Compares test logits with a llama.cpp base file exactly as `llama-perplexity --kl-divergence`
/// does (targets from the file's tokens; see [`crate::llamacpp::llama_row`]), on the CPU.
///
/// # Errors
/// [`Error::File`] naming the file: a vocabulary different from the base's, or test logits that are
/// neither `[n_chunk, n_ctx, V]` nor one row per record; a file changing while being read.
pub fn evaluate_llama(
    base: &BaseFile,
    test: &LlamaTest,
    opts: &KldEvalOptions,
    progress: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<KldEvalResult> {
    use rayon::prelude::*;
    let (records, vocab, n_ctx) = (base.records(), base.n_vocab(), base.n_ctx());
    let rpc = base.records_per_chunk();
    let mismatch = |path: &str, reason: String| Error::File { path: path.to_string(), reason };
    // The test row of record i.
    let row_of: Box<dyn Fn(usize) -> usize + Sync> = match test {
        LlamaTest::Base(t) => {
            if t.tokens() != base.tokens() {
                return Err(mismatch(
                    t.path(),
                    format!("its tokens differ from those of the base {}: not the same text", base.path()),
                ));
            }
            if (t.n_ctx(), t.n_vocab(), t.n_chunk()) != (n_ctx, vocab, base.n_chunk()) {
                return Err(mismatch(
                    t.path(),
                    format!(
                        "n_ctx {} n_vocab {} n_chunk {} differ from the base {} ({n_ctx}, {vocab}, {})",
                        t.n_ctx(),
                        t.n_vocab(),
                        t.n_chunk(),
                        base.path(),
                        base.n_chunk()
                    ),
                ));
            }
            Box::new(|i| i)
        }
        LlamaTest::Logits(t) => {
            let l = t.logits()?;
            if l.vocab() != vocab {
                return Err(mismatch(
                    &t.name,
                    format!("vocab {} differs from the base file's n_vocab {vocab}", l.vocab()),
                ));
            }
            if l.rows() == records {
                Box::new(|i| i)
            } else if t.shape[..] == [base.n_chunk(), n_ctx, vocab] {
                Box::new(move |i| (i / rpc) * n_ctx + n_ctx / 2 + i % rpc)
            } else {
                return Err(mismatch(
                    &t.name,
                    format!(
                        "shape {:?} is neither [{}, {n_ctx}, {vocab}] (n_chunk, n_ctx, vocab of {}) nor one row per record ({records} rows)",
                        t.shape,
                        base.n_chunk(),
                        base.path()
                    ),
                ));
            }
        }
    };
    let mut folder = Folder {
        out: KldEvalResult {
            summary: KldSummary::with_budget(opts.percentile_budget),
            per_token: opts.per_token.then(KldPerToken::default),
            bytes: 0,
        },
        opts,
    };
    let test_dtype = match test {
        LlamaTest::Base(_) => None,
        LlamaTest::Logits(t) => Some(t.logits()?.dtype()),
    };
    // Bytes read per record: the base record and the test row.
    let row_bytes = 2 * vocab + 8 + vocab * test_dtype.map_or(2, Dtype::size);
    let chunk = (opts.chunk_bytes.max(1 << 20) as usize / row_bytes).max(1);
    for i0 in (0..records).step_by(chunk) {
        let n = chunk.min(records - i0);
        let rows = (i0..i0 + n)
            .into_par_iter()
            .map_init(
                || (vec![0f32; vocab], Vec::new()),
                |(x, bytes): &mut (Vec<f32>, Vec<u8>), i| {
                    match test {
                        LlamaTest::Base(t) => crate::llamacpp::dequantise(&t.record(i), x)?,
                        LlamaTest::Logits(t) => {
                            let dtype = test_dtype.unwrap_or(Dtype::F32);
                            bytes.resize(vocab * dtype.size(), 0);
                            t.read_data(row_of(i) * vocab * dtype.size(), bytes)?;
                            let l = Logits::from_bytes(bytes, dtype, 1, vocab)?;
                            for (j, v) in x.iter_mut().enumerate() {
                                *v = l.get(0, j);
                            }
                        }
                    }
                    crate::llamacpp::llama_row(x, &base.record(i), base.target(i))
                },
            )
            .collect::<Result<Vec<KldRow>>>()?;
        folder.fold(&rows, &vec![false; n])?;
        let bytes = (n * row_bytes) as u64;
        folder.out.bytes += bytes;
        progress(n as u64, bytes)?;
    }
    base.check_unchanged()?;
    match test {
        LlamaTest::Base(t) => t.check_unchanged()?,
        LlamaTest::Logits(t) => t.check_unchanged()?,
    }
    Ok(folder.out)
}
