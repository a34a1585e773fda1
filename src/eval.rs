//! Scoring evaluation sets at scale: shards of logits read in fixed-size chunks by a reader thread
//! (so reading overlaps with compute and memory stays bounded), scored on the GPU through a
//! [`Stream`] or on the CPU, and folded into a [`Summary`], per-token and per-sequence results.
//!
//! Chunks restart at the first row of every shard, so a row is scored in exactly the same chunk
//! position whether its shard is scored alone or with others: on one machine (same device, same
//! CPU instruction set and thread count) per-row results, and therefore merged summaries, are
//! identical to the bit. Across machines they agree to the tolerance of the tests, not the bit.

use std::sync::mpsc;

use crate::error::{Error, Result};
use crate::gpu::GpuContext;
use crate::io::Tensor;
use crate::problem::{validate_targets, Dtype, Logits, Options, RowLoss, IGNORED_TARGET};
use crate::stream::Stream;
use crate::summary::Summary;

/// A logits tensor and its targets.
#[derive(Debug)]
pub struct Shard {
    /// Logits, rank 2 `[N, V]` or rank 3 `[B, T, V]`.
    pub logits: Tensor,
    /// Targets (labels with `shift`), rank 1 `[N]` or rank 2 `[B, T]`.
    pub targets: Tensor,
}

/// Where the work runs.
#[derive(Debug, Clone, Copy)]
pub enum Engine<'a> {
    /// The GPU, streamed.
    Gpu(&'a GpuContext),
    /// The fast CPU path.
    Cpu,
}

/// What to compute beyond the summary.
#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    /// Ignore index and friends.
    pub options: Options,
    /// Causal-LM convention: position t is scored against label t+1 of the same sequence and
    /// the last position of each sequence is dropped.
    pub shift: bool,
    /// Sequence boundaries over all shards' rows, `[0, ..., N]` (default: the rows of rank-3
    /// logits; with rank-2 logits each shard is one sequence).
    pub offsets: Option<Vec<u64>>,
    /// Keep per-token nll.
    pub per_token: bool,
    /// Keep per-token lse and correctness too.
    pub per_token_extra: bool,
    /// Keep per-sequence results.
    pub per_sequence: bool,
    /// Bytes of logits per chunk (0: 64 MiB).
    pub chunk_bytes: u64,
}

/// Per-token results of the rows scored (dropped rows of `shift` are absent; ignored rows are 0).
#[derive(Debug, Clone, Default)]
pub struct PerToken {
    /// nll in nats, 0 where ignored.
    pub nll: Vec<f32>,
    /// Log-sum-exp of each row (when asked for).
    pub lse: Vec<f32>,
    /// 1 where the argmax is the target (when asked for).
    pub correct: Vec<u8>,
}

/// One sequence's result, as lm-evaluation-harness's `loglikelihood` wants it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SequenceResult {
    /// Tokens scored (not ignored, not dropped).
    pub tokens: u64,
    /// Sum of the log-probabilities of the scored tokens (nats).
    pub sum_logprob: f64,
    /// Whether every scored token was the argmax.
    pub is_greedy: bool,
}

/// Everything [`evaluate`] returns.
#[derive(Debug, Clone, Default)]
pub struct EvalResult {
    /// Mergeable sums.
    pub summary: Summary,
    /// Per-token results, when asked for.
    pub per_token: Option<PerToken>,
    /// Per-sequence results, when asked for.
    pub per_sequence: Option<Vec<SequenceResult>>,
    /// Bytes of logits read.
    pub bytes: u64,
}

/// The layout all shards share, checked up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Element type of every shard's logits.
    pub dtype: Dtype,
    /// Vocabulary of every shard.
    pub vocab: usize,
    /// Total rows.
    pub rows: u64,
    /// Total bytes of logits.
    pub bytes: u64,
}

/// Checks that the shards agree with each other and each with its targets.
///
/// # Errors
/// [`Error::File`] naming the shard: an empty list, a different vocab or dtype from the first
/// shard, logits and targets of different row counts or shapes.
pub fn check_shards(shards: &[Shard]) -> Result<Layout> {
    let first =
        shards.first().ok_or_else(|| Error::File { path: "(none)".into(), reason: "no shards to score".into() })?;
    let l0 = first.logits.logits()?;
    let mut rows = 0u64;
    let mut bytes = 0u64;
    for s in shards {
        let l = s.logits.logits()?;
        let t = s.targets.targets()?;
        if l.vocab() != l0.vocab() || l.dtype() != l0.dtype() {
            return Err(Error::File {
                path: s.logits.name.clone(),
                reason: format!(
                    "vocab {} {} disagrees with the first shard {} (vocab {} {})",
                    l.vocab(),
                    l.dtype(),
                    first.logits.name,
                    l0.vocab(),
                    l0.dtype()
                ),
            });
        }
        let (ls, ts) = (&s.logits.shape, &s.targets.shape);
        if l.rows() != t.len() || (ls.len() == 3 && ts.len() == 2 && ls[..2] != ts[..]) {
            return Err(Error::File {
                path: s.targets.name.clone(),
                reason: format!(
                    "shape {ts:?} ({} targets) does not match {} of shape {ls:?} ({} rows)",
                    t.len(),
                    s.logits.name,
                    l.rows()
                ),
            });
        }
        rows += l.rows() as u64;
        bytes += s.logits.data_len() as u64;
    }
    Ok(Layout { dtype: l0.dtype(), vocab: l0.vocab(), rows, bytes })
}

/// Per shard: its first global row, kernel targets, and which rows are dropped or start sequences.
struct Prepared {
    first_row: u64,
    targets: Vec<u32>,
    /// Rows dropped by `shift` (the last of each sequence).
    dropped: Vec<bool>,
    /// Sequence index of each row (global numbering), when sequences are wanted.
    sequence: Vec<u32>,
}

/// Scores every shard; `progress(rows, bytes)` is called after each chunk;
/// an error it returns (such as [`Error::Interrupted`]) stops the work and is returned.
///
/// # Errors
/// As [`check_shards`]; a target out of range (naming the targets file and row); bad offsets;
/// a file that changes or is truncated while being read; a device error.
pub fn evaluate(
    engine: Engine<'_>,
    shards: &[Shard],
    opts: &EvalOptions,
    progress: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<EvalResult> {
    let layout = check_shards(shards)?;
    let chunk_bytes = if opts.chunk_bytes == 0 { 64 << 20 } else { opts.chunk_bytes };
    // Device errors (out of memory for the ring, a lost device) come back as errors, not panics.
    match engine {
        Engine::Gpu(ctx) => {
            ctx.in_error_scopes(|| evaluate_in_scope(engine, shards, opts, progress, layout, chunk_bytes))
        }
        Engine::Cpu => evaluate_in_scope(engine, shards, opts, progress, layout, chunk_bytes),
    }
}

fn evaluate_in_scope(
    engine: Engine<'_>,
    shards: &[Shard],
    opts: &EvalOptions,
    progress: &mut dyn FnMut(u64, u64) -> Result<()>,
    layout: Layout,
    chunk_bytes: u64,
) -> Result<EvalResult> {
    let (prepared, n_sequences) = prepare(shards, &layout, opts)?;
    let row_bytes = layout.vocab * layout.dtype.size();
    let mut stream = match engine {
        Engine::Gpu(ctx) => Some(Stream::new(ctx, layout.dtype, layout.vocab as u32, chunk_bytes)?),
        Engine::Cpu => None,
    };
    let chunk_rows = match &stream {
        Some(s) => s.chunk_rows() as usize,
        None => (chunk_bytes as usize / row_bytes).max(1),
    };

    let mut out = EvalResult {
        per_token: opts.per_token.then(PerToken::default),
        per_sequence: opts
            .per_sequence
            .then(|| vec![SequenceResult { tokens: 0, sum_logprob: 0.0, is_greedy: true }; n_sequences]),
        ..Default::default()
    };
    let mut next_row = 0u64; // global index of the next result to fold in
    let mut fold = |out: &mut EvalResult, rows: &[RowLoss]| -> Result<()> {
        for r in rows {
            if !r.is_written() {
                return Err(Error::Gpu(format!("row {next_row} was never written by the kernel")));
            }
            let (p, local) = locate(&prepared, next_row);
            next_row += 1;
            if p.dropped[local] {
                continue;
            }
            out.summary.push(r);
            if let Some(pt) = &mut out.per_token {
                pt.nll.push(r.nll);
                if opts.per_token_extra {
                    pt.lse.push(r.lse);
                    pt.correct.push(u8::from(r.correct()));
                }
            }
            if let Some(seqs) = &mut out.per_sequence {
                if !r.ignored() {
                    let s = &mut seqs[p.sequence[local] as usize];
                    s.tokens += 1;
                    s.sum_logprob -= f64::from(r.nll);
                    s.is_greedy &= r.correct();
                }
            }
        }
        Ok(())
    };

    match &mut stream {
        // GPU: a reader thread fills a pool of three buffers while the stream uploads and scores.
        Some(stream) => std::thread::scope(|scope| -> Result<()> {
            let (full_tx, full_rx) = mpsc::sync_channel::<Result<(usize, usize, usize, Vec<u8>)>>(2);
            let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
            for _ in 0..3 {
                let _ = empty_tx.send(Vec::new());
            }
            scope.spawn(move || {
                for (si, s) in shards.iter().enumerate() {
                    let rows = s.logits.data_len() / row_bytes;
                    for r0 in (0..rows).step_by(chunk_rows) {
                        let n = chunk_rows.min(rows - r0);
                        let Ok(mut buf) = empty_rx.recv() else { return };
                        buf.resize(n * row_bytes, 0);
                        let read = read_parallel(&s.logits, r0 * row_bytes, &mut buf).map(|()| (si, r0, n, buf));
                        let failed = read.is_err();
                        if full_tx.send(read).is_err() || failed {
                            return;
                        }
                    }
                    // A file rewritten after its last chunk was read is caught here.
                    if let Err(e) = s.logits.check_unchanged() {
                        let _ = full_tx.send(Err(e));
                        return;
                    }
                }
            });
            for msg in full_rx {
                let (si, r0, n, buf) = msg?;
                let logits = Logits::from_bytes(&buf, layout.dtype, n, layout.vocab)?;
                let done = stream.push(logits, &prepared[si].targets[r0..r0 + n])?;
                let _ = empty_tx.send(buf);
                fold(&mut out, &done)?;
                out.bytes += (n * row_bytes) as u64;
                progress(n as u64, (n * row_bytes) as u64)?;
            }
            Ok(())
        })?,
        // CPU: the scoring threads read their own blocks of rows, so the copy out of the page
        // cache runs on every core and lands in the cache the scan reads next.
        None => {
            for (si, s) in shards.iter().enumerate() {
                let rows = s.logits.data_len() / row_bytes;
                for r0 in (0..rows).step_by(chunk_rows) {
                    let n = chunk_rows.min(rows - r0);
                    let done = score_chunk_cpu(&s.logits, &layout, r0, n, &prepared[si].targets[r0..r0 + n])?;
                    fold(&mut out, &done)?;
                    out.bytes += (n * row_bytes) as u64;
                    progress(n as u64, (n * row_bytes) as u64)?;
                }
                s.logits.check_unchanged()?;
            }
        }
    }
    if let Some(stream) = stream {
        let rest = stream.finish()?;
        fold(&mut out, &rest)?;
    }
    if next_row != layout.rows {
        return Err(Error::Gpu(format!("scored {next_row} rows of {}", layout.rows)));
    }
    Ok(out)
}

/// Reads `buf.len()` bytes of data from `offset`, in 8 MiB pieces on every core.
fn read_parallel(t: &Tensor, offset: usize, buf: &mut [u8]) -> Result<()> {
    use rayon::prelude::*;
    const PIECE: usize = 8 << 20;
    buf.par_chunks_mut(PIECE).enumerate().try_for_each(|(i, piece)| t.read_data(offset + i * PIECE, piece))
}

/// Scores rows `r0..r0 + n` of a shard on the CPU. With enough blocks of ~4 MiB to occupy every
/// thread, each thread reads and scores its own blocks; otherwise (few, long rows) the chunk is
/// read whole and each row is split across threads. The choice depends only on `n` and the
/// thread count, so a chunk gives the same bits whenever it is scored on the same machine.
///
/// Blocks span several rows because the scan prefetches the next run of logits while it sums the
/// current one, within a block only: with one-row blocks (256 KiB, the first design) every row's
/// first pass waited on DRAM. Measured on dev, 10 GB of shards from the page cache, repeated
/// runs: f32 0.48–0.72 s with 256 KiB blocks, 0.44–0.51 s with 4 MiB; bf16 0.73–0.79 s, 0.60–0.68 s.
fn score_chunk_cpu(t: &Tensor, layout: &Layout, r0: usize, n: usize, targets: &[u32]) -> Result<Vec<RowLoss>> {
    use rayon::prelude::*;
    let rb = layout.vocab * layout.dtype.size();
    let block = ((4 << 20) / rb).max(1);
    let blocks = n.div_ceil(block);
    if blocks >= rayon::current_num_threads() {
        // Zero-copy from the page cache where the system allows it (populated per block, then
        // released per chunk so memory stays bounded); positioned reads otherwise.
        if t.mapped(r0 * rb, rb.min(n * rb))?.is_some() {
            let parts = (0..blocks)
                .into_par_iter()
                .map(|b| {
                    let a = b * block;
                    let m = block.min(n - a);
                    let bytes = t.mapped((r0 + a) * rb, m * rb)?.ok_or_else(|| Error::File {
                        path: t.name.clone(),
                        reason: "memory map became unavailable".into(),
                    })?;
                    let logits = Logits::from_bytes(bytes, layout.dtype, m, layout.vocab)?;
                    Ok(crate::cpu::score_sequential(logits, &targets[a..a + m]))
                })
                .collect::<Result<Vec<Vec<RowLoss>>>>();
            t.release(r0 * rb, n * rb);
            return Ok(parts?.concat());
        }
        let parts = (0..blocks)
            .into_par_iter()
            .map_init(Vec::new, |buf: &mut Vec<u8>, b| {
                let a = b * block;
                let m = block.min(n - a);
                buf.resize(m * rb, 0);
                t.read_data((r0 + a) * rb, buf)?;
                let logits = Logits::from_bytes(buf, layout.dtype, m, layout.vocab)?;
                Ok(crate::cpu::score_sequential(logits, &targets[a..a + m]))
            })
            .collect::<Result<Vec<Vec<RowLoss>>>>()?;
        Ok(parts.concat())
    } else {
        let mut buf = vec![0u8; n * rb];
        read_parallel(t, r0 * rb, &mut buf)?;
        Ok(crate::cpu::score_validated(Logits::from_bytes(&buf, layout.dtype, n, layout.vocab)?, targets))
    }
}

/// The shard holding global row `g`, and the row's index in it.
fn locate(prepared: &[Prepared], g: u64) -> (&Prepared, usize) {
    let i = prepared.partition_point(|p| p.first_row <= g) - 1;
    (&prepared[i], (g - prepared[i].first_row) as usize)
}

/// Validates targets, applies `shift`, and numbers sequences, shard by shard.
/// Also returns the number of sequences (empty ones included).
fn prepare(shards: &[Shard], layout: &Layout, opts: &EvalOptions) -> Result<(Vec<Prepared>, usize)> {
    if let Some(off) = &opts.offsets {
        if off.first() != Some(&0) || off.last() != Some(&layout.rows) || off.windows(2).any(|w| w[0] > w[1]) {
            return Err(Error::Shape(format!(
                "offsets must rise from 0 to the total number of rows ({}): got {} values from {:?} to {:?}",
                layout.rows,
                off.len(),
                off.first(),
                off.last()
            )));
        }
    }
    if let Some(off) = &opts.offsets {
        // Sequences may not span shards: every shard boundary must be an offset.
        let mut boundary = 0u64;
        for s in shards {
            boundary += s.logits.logits()?.rows() as u64;
            if off.binary_search(&boundary).is_err() {
                return Err(Error::Shape(format!(
                    "offsets: a sequence crosses the end of {} at row {boundary}; sequences may not span shards",
                    s.logits.name
                )));
            }
        }
    }
    let mut first_row = 0u64;
    let mut seq_base = 0u64;
    let mut out = Vec::with_capacity(shards.len());
    for s in shards {
        let logits = s.logits.logits()?;
        let rows = logits.rows();
        let labels = s.targets.targets()?;
        let kernel = validate_targets(labels, rows, layout.vocab, &opts.options)
            .map_err(|e| Error::File { path: s.targets.name.clone(), reason: e.to_string() })?;
        // The targets were read through the map: a file rewritten meanwhile is an error.
        s.targets.check_unchanged()?;
        // Sequence of each row: explicit offsets, else T of [B, T, V] logits or [B, T] targets,
        // else the whole shard.
        let seq_len = match (&s.logits.shape[..], &s.targets.shape[..]) {
            ([_, t, _], _) | (_, [_, t]) => *t,
            _ => rows,
        }
        .max(1);
        let sequence: Vec<u64> = match &opts.offsets {
            Some(off) => (0..rows as u64).map(|r| (off.partition_point(|&o| o <= first_row + r) - 1) as u64).collect(),
            None => (0..rows).map(|r| seq_base + (r / seq_len) as u64).collect(),
        };
        let (targets, dropped) =
            if opts.shift { shift_labels(&kernel, &sequence) } else { (kernel, vec![false; rows]) };
        if opts.offsets.is_none() {
            seq_base += rows.div_ceil(seq_len) as u64;
        }
        let sequence =
            sequence.iter().map(|&q| u32::try_from(q)).collect::<std::result::Result<Vec<u32>, _>>().map_err(|_| {
                Error::Shape("more than 2^32 sequences (rows of rank-3 logits or offsets spans)".into())
            })?;
        out.push(Prepared { first_row, targets, dropped, sequence });
        first_row += rows as u64;
    }
    let sequences = match &opts.offsets {
        Some(off) => off.len() - 1,
        None => seq_base as usize,
    };
    Ok((out, sequences))
}

/// The causal-LM shift over one shard: row `r` is scored against label `r + 1` of the same
/// sequence (`sequence[r]` numbers each row's sequence), and the last row of each sequence is
/// dropped (returned as ignored, with its `dropped` flag set).
pub(crate) fn shift_labels(labels: &[u32], sequence: &[u64]) -> (Vec<u32>, Vec<bool>) {
    let rows = labels.len();
    (0..rows)
        .map(|r| {
            if r + 1 == rows || sequence[r + 1] != sequence[r] {
                (IGNORED_TARGET, true)
            } else {
                (labels[r + 1], false)
            }
        })
        .unzip()
}
