//! llama.cpp's KL-divergence base files (`llama-perplexity --kl-divergence-base FILE`), read and
//! written exactly as `tools/perplexity/perplexity.cpp` does.
//!
//! ## The format (little-endian throughout)
//! ```text
//! "_logits_"                       8 bytes of magic
//! n_ctx, n_vocab, n_chunk          int32 each
//! tokens[n_chunk · n_ctx]          int32: the evaluated text, chunk after chunk
//! n_chunk × (n_ctx − 1 − n_ctx/2) records, each
//!     scale, min_log_prob          float32
//!     q[n_vocab]                   uint16, then one zero word if n_vocab is odd
//! ```
//! Record `j` of chunk `k` holds the base model's log-probabilities at position
//! `n_ctx/2 + j` of the chunk, which predict token `tokens[k·n_ctx + n_ctx/2 + 1 + j]`
//! ([`BaseFile::target`]): `log p_i = scale·q_i + min_log_prob` (in f32).
//!
//! ## Quantisation ([`quantise`], llama.cpp's writer `log_softmax`)
//! With `max`, `min` the row's largest and smallest logit (f32): `min = max(min, max − 16)`,
//! `lse = log(Σ expf(x_i − max))` summed in f64 and rounded to f32,
//! `min_log_prob = min − max − lse`, `scale = (max − min)/65535`, and
//! `q_i = round_half_even((x_i − min)/scale)` where `x_i > min`, else 0 (all zero when `scale` is 0).
//! So every log-probability below `max − lse − 16` sits at the floor `min_log_prob`, and the
//! dequantised row is not normalised (its probabilities sum to 0.9999–1.0005).
//!
//! ## Scoring against a base record ([`llama_row`], llama.cpp's reader `log_softmax`)
//! llama.cpp's own definitions, in f32 and f64 exactly where it uses them: the test side's
//! `nll = max + lse − x_t` (f32), the base side's `nll_base = −(scale·q_t + min_log_prob)`
//! read from the record, `kld = Σ p_i·(log p_i − log q_i)` over only the entries whose base
//! log-probability is above −16 (each term f32, summed in f64; it can be slightly negative),
//! `Δp = expf(−nll) − expf(−nll_base)`, and "same top" comparing the test's first largest logit
//! with the first largest dequantised base value. (Compilers that contract `a·b + c` into a fused
//! multiply-add may make llama.cpp's own values differ from these in the last bit.)
//!
//! Files are memory-mapped by [`BaseFile::open`], which checks the header against the file's
//! exact size before it touches anything else, and written by [`write_base_file`] /
//! [`BaseWriter`] atomically (nothing appears at the path unless complete), in bounded memory.

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::{AtomicWriter, ElemType, Tensor};
use crate::kld::{KldRow, NO_TARGET};

/// The 8 bytes every base file starts with.
pub const MAGIC: &[u8; 8] = b"_logits_";

/// Bytes before the token table: the magic and three int32.
pub const HEADER_BYTES: usize = 20;

/// Log-probabilities more than this far below the row's largest are stored at the floor; in
/// [`llama_row`], base entries at or below this log-probability are left out of the KLD sum.
pub const FLOOR: f32 = -16.0;

/// uint16 words per record: the two f32 and `n_vocab` rounded up to even.
fn record_words(n_vocab: usize) -> usize {
    2 * n_vocab.div_ceil(2) + 4
}

/// Records per chunk for a context of `n_ctx`: positions `n_ctx/2 .. n_ctx − 2`.
pub fn records_per_chunk(n_ctx: usize) -> usize {
    n_ctx.saturating_sub(1 + n_ctx / 2)
}

/// The exact size in bytes of a base file with this header (u128: no overflow for any header).
fn file_size(n_ctx: u128, n_vocab: u128, n_chunk: u128) -> u128 {
    let rpc = n_ctx - 1 - n_ctx / 2;
    HEADER_BYTES as u128 + 4 * n_ctx * n_chunk + n_chunk * rpc * 2 * (2 * n_vocab.div_ceil(2) + 4)
}

/// One record of a base file: the base model's quantised log-probabilities at one position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Record<'a> {
    /// Step between quantisation levels.
    pub scale: f32,
    /// Log-probability of level 0 (the floor).
    pub min_log_prob: f32,
    /// One level per vocabulary entry (`n_vocab` of them; the padding word is not included).
    pub q: &'a [u16],
}

impl Record<'_> {
    /// The dequantised log-probability of entry `i`, `scale·q_i + min_log_prob` in f32, as llama.cpp
    /// computes it.
    ///
    /// # Panics
    /// If `i >= q.len()`.
    #[inline]
    pub fn log_prob(&self, i: usize) -> f32 {
        self.scale * f32::from(self.q[i]) + self.min_log_prob
    }
}

/// Writes every dequantised log-probability of `rec` into `out` ([`Record::log_prob`]).
///
/// # Errors
/// [`Error::Shape`] if `out.len()` differs from the record's vocabulary.
pub fn dequantise(rec: &Record<'_>, out: &mut [f32]) -> Result<()> {
    if out.len() != rec.q.len() {
        return Err(Error::Shape(format!("record of {} entries dequantised into {} values", rec.q.len(), out.len())));
    }
    for (o, &q) in out.iter_mut().zip(rec.q) {
        *o = rec.scale * f32::from(q) + rec.min_log_prob;
    }
    Ok(())
}

/// What identifies a file's contents cheaply: its length and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl Stamp {
    fn of(file: &std::fs::File) -> std::io::Result<Stamp> {
        let m = file.metadata()?;
        Ok(Stamp { len: m.len(), modified: m.modified().ok() })
    }
}

/// A llama.cpp base file, memory-mapped and validated (see the [module docs](self) for the format).
///
/// # The file must not change while it is open
/// As for [`crate::io::open`]: records are slices of the memory map, so another process
/// rewriting the file changes them under the reader, and truncating it makes reads past the new
/// end raise SIGBUS. [`BaseFile::check_unchanged`] reports a change of length or modification time.
pub struct BaseFile {
    file: std::fs::File,
    stamp: Stamp,
    map: memmap2::Mmap,
    path: String,
    n_ctx: usize,
    n_vocab: usize,
    n_chunk: usize,
}

impl std::fmt::Debug for BaseFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseFile")
            .field("path", &self.path)
            .field("n_ctx", &self.n_ctx)
            .field("n_vocab", &self.n_vocab)
            .field("n_chunk", &self.n_chunk)
            .finish()
    }
}

/// Whether `bytes` start with a base file's magic (how `--base` tells such a file from logits).
pub fn has_magic(bytes: &[u8]) -> bool {
    bytes.starts_with(MAGIC)
}

/// Whether the file at `path` starts with a base file's magic. `false` if it cannot be read.
pub fn is_base_file(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 8];
    std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut head)).is_ok() && has_magic(&head)
}

impl BaseFile {
    /// Opens and validates a base file: the magic, the header numbers (`n_ctx >= 2`,
    /// `n_vocab >= 1`, `n_chunk >= 1`), the file's exact size against what the header implies
    /// (checked before anything the header describes is touched, so absurd numbers cost nothing),
    /// and every token against the vocabulary.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be opened or mapped; [`Error::File`] naming the file for
    /// anything wrong with it; [`Error::File`] on a big-endian host (unsupported).
    pub fn open(path: &Path) -> Result<BaseFile> {
        let display = path.display().to_string();
        let bad = |reason: String| Error::File { path: display.clone(), reason };
        let io = |error| Error::Io { path: display.clone(), error };
        if cfg!(target_endian = "big") {
            return Err(bad("llama.cpp base files are only read on little-endian hosts".into()));
        }
        let file = std::fs::File::open(path).map_err(io)?;
        if file.metadata().map_err(io)?.is_dir() {
            return Err(bad("is a directory, not a llama.cpp base file".into()));
        }
        let stamp = Stamp::of(&file).map_err(io)?;
        // SAFETY: the map is read-only; a file changed by another process while mapped is the
        // documented contract of this type (see "The file must not change").
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let len = map.len();
        if len < MAGIC.len() || &map[..MAGIC.len()] != MAGIC {
            return Err(bad("not a llama.cpp base file (no '_logits_' magic at the start)".into()));
        }
        if len < HEADER_BYTES {
            return Err(bad(format!("truncated header: {len} bytes, a header needs {HEADER_BYTES}")));
        }
        let int = |at: usize| i32::from_le_bytes([map[at], map[at + 1], map[at + 2], map[at + 3]]);
        let (n_ctx, n_vocab, n_chunk) = (int(8), int(12), int(16));
        let header = format!("header n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk}");
        if n_ctx < 2 || n_vocab < 1 || n_chunk < 1 {
            return Err(bad(format!("{header}: needs n_ctx >= 2, n_vocab >= 1 and n_chunk >= 1")));
        }
        // Positive i32 from here on.
        let (c, v, k) = (n_ctx as u128, n_vocab as u128, n_chunk as u128);
        let want = file_size(c, v, k);
        if want != len as u128 {
            let tokens_end = HEADER_BYTES as u128 + 4 * c * k;
            let what = if (len as u128) < tokens_end {
                format!("the token table ends at byte {tokens_end}: truncated tokens or absurd header numbers")
            } else if (len as u128) < want {
                let rec = 2 * (2 * v.div_ceil(2) + 4);
                let (whole, part) = ((len as u128 - tokens_end) / rec, (len as u128 - tokens_end) % rec);
                let all = k * (c - 1 - c / 2);
                format!("{whole} whole records of {all} and {part} bytes of the next: truncated")
            } else {
                format!("{} bytes past the last record", len as u128 - want)
            };
            return Err(bad(format!("file is {len} bytes, its {header} need exactly {want} ({what})")));
        }
        let out = BaseFile {
            file,
            stamp,
            map,
            path: display.clone(),
            n_ctx: n_ctx as usize,
            n_vocab: n_vocab as usize,
            n_chunk: n_chunk as usize,
        };
        if let Some((i, &t)) = out.tokens().iter().enumerate().find(|&(_, &t)| t < 0 || t >= n_vocab) {
            return Err(bad(format!(
                "token {i} (chunk {}, position {}) is {t}, outside the vocabulary of {n_vocab}",
                i / out.n_ctx,
                i % out.n_ctx
            )));
        }
        Ok(out)
    }

    /// The file's path, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Context length of each chunk.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Vocabulary size.
    pub fn n_vocab(&self) -> usize {
        self.n_vocab
    }

    /// Number of chunks.
    pub fn n_chunk(&self) -> usize {
        self.n_chunk
    }

    /// Records per chunk: `n_ctx − 1 − n_ctx/2`.
    pub fn records_per_chunk(&self) -> usize {
        records_per_chunk(self.n_ctx)
    }

    /// Number of records in the file: `n_chunk · records_per_chunk`.
    pub fn records(&self) -> usize {
        self.n_chunk * self.records_per_chunk()
    }

    /// The evaluated tokens, `n_chunk · n_ctx` of them (validated against the vocabulary).
    pub fn tokens(&self) -> &[i32] {
        let bytes = &self.map[HEADER_BYTES..HEADER_BYTES + 4 * self.n_ctx * self.n_chunk];
        // The map is page-aligned and HEADER_BYTES a multiple of 4, so this cannot fail.
        bytemuck::try_cast_slice(bytes).unwrap_or(&[])
    }

    /// The token record `i` predicts: record `j` of chunk `k` (`i = k·records_per_chunk + j`)
    /// predicts `tokens[k·n_ctx + n_ctx/2 + 1 + j]`, in `0..n_vocab`.
    ///
    /// # Panics
    /// If `i >= self.records()`.
    pub fn target(&self, i: usize) -> u32 {
        assert!(i < self.records(), "record {i} of {}", self.records());
        let rpc = self.records_per_chunk();
        let (k, j) = (i / rpc, i % rpc);
        self.tokens()[k * self.n_ctx + self.n_ctx / 2 + 1 + j] as u32
    }

    /// Record `i` (chunk-major), decoded from little-endian without copying the levels.
    ///
    /// # Panics
    /// If `i >= self.records()`.
    pub fn record(&self, i: usize) -> Record<'_> {
        assert!(i < self.records(), "record {i} of {}", self.records());
        let words = record_words(self.n_vocab);
        let at = HEADER_BYTES + 4 * self.n_ctx * self.n_chunk + i * 2 * words;
        let b = &self.map[at..at + 2 * words];
        let f = |o: usize| f32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        // Records start at multiples of 4 bytes of a page-aligned map: the cast cannot fail.
        let q = bytemuck::try_cast_slice(&b[8..8 + 2 * self.n_vocab]).unwrap_or(&[]);
        Record { scale: f(0), min_log_prob: f(4), q }
    }

    /// Fails if the file's length or modification time differ from when it was opened.
    ///
    /// # Errors
    /// [`Error::File`] naming the file; [`Error::Io`] if its metadata cannot be read.
    pub fn check_unchanged(&self) -> Result<()> {
        match Stamp::of(&self.file) {
            Ok(now) if now == self.stamp => Ok(()),
            Ok(_) => Err(Error::File {
                path: self.path.clone(),
                reason: "file changed while being read (length or modification time)".into(),
            }),
            Err(error) => Err(Error::Io { path: self.path.clone(), error }),
        }
    }
}

/// Scores one row of test logits against a base record exactly as llama.cpp's `--kl-divergence`
/// does (see the [module docs](self)): `kld`, and with a `target` (not [`NO_TARGET`]) also
/// `nll_test`, `nll_base` (from the record), `dp`; flags [`KldRow::HAS_TARGET`],
/// [`KldRow::SAME_TOP`]. A test row with a NaN or `+inf`, or only `−inf`, or a record whose
/// scale or floor is not finite, gives a NaN `kld`, argmaxes `u32::MAX` and no `SAME_TOP`.
///
/// # Errors
/// [`Error::Shape`] if `test.len()` differs from the record's vocabulary, the row is empty, or
/// the target is out of range.
pub fn llama_row(test: &[f32], rec: &Record<'_>, target: u32) -> Result<KldRow> {
    let n = rec.q.len();
    if test.len() != n || n == 0 {
        return Err(Error::Shape(format!("{} test logits against a base record of {n} entries", test.len())));
    }
    let has_target = target != NO_TARGET;
    if has_target && target as usize >= n {
        return Err(Error::Shape(format!("target {target} is outside the vocabulary of {n}")));
    }
    // Test side: first largest logit, Σ expf in f64, lse rounded to f32.
    let mut max_logit = test[0];
    let mut imax = 0usize;
    for (i, &x) in test.iter().enumerate().skip(1) {
        if x > max_logit {
            max_logit = x;
            imax = i;
        }
    }
    let mut sum_exp = 0f64;
    for &x in test {
        sum_exp += f64::from((x - max_logit).exp());
    }
    let log_sum_exp = sum_exp.ln() as f32;
    let (scale, min_log_prob) = (rec.scale, rec.min_log_prob);
    let broken = !(max_logit.is_finite() && sum_exp.is_finite() && scale.is_finite() && min_log_prob.is_finite());

    let mut row = KldRow::default();
    if has_target {
        let t = target as usize;
        let nll = max_logit + log_sum_exp - test[t];
        let nll_base = -(scale * f32::from(rec.q[t]) + min_log_prob);
        let p_base = (-nll_base).exp();
        let p = (-nll).exp();
        row.nll_test = nll;
        row.nll_base = nll_base;
        row.dp = p - p_base;
        row.flags |= KldRow::HAS_TARGET;
    }

    let lse_full = max_logit + log_sum_exp;
    let mut sum = 0f64;
    let mut imax_base = 0usize;
    let mut p_log_base_max = 0f32;
    for (i, (&q, &x)) in rec.q.iter().zip(test).enumerate() {
        let p_log_base = scale * f32::from(q) + min_log_prob;
        if i == 0 || p_log_base > p_log_base_max {
            p_log_base_max = p_log_base;
            imax_base = i;
        }
        if p_log_base > FLOOR {
            let p_base = p_log_base.exp();
            sum += f64::from(p_base * (p_log_base - x + lse_full));
        }
    }
    if broken {
        row.kld = f32::NAN;
        row.argmax_base = u32::MAX;
        row.argmax_test = u32::MAX;
    } else {
        row.kld = sum as f32;
        row.argmax_base = imax_base as u32;
        row.argmax_test = imax as u32;
        if imax == imax_base {
            row.flags |= KldRow::SAME_TOP;
        }
    }
    Ok(row)
}

/// llama.cpp's `nearest_int`: round half to even through the f32 addition of 1.5·2²³ (exact for
/// `|x| <= 2²²`), keeping its bit pattern arithmetic for values outside that range.
#[inline(always)]
fn nearest_int(x: f32) -> i32 {
    let val = x + 12_582_912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// Quantises one row of logits into `q` as llama.cpp's writer does (see the [module docs](self))
/// and returns `(scale, min_log_prob)`; `None` (and `q` untouched) for a row with a NaN or
/// `+inf`, or only `−inf`, which llama.cpp would store as garbage.
///
/// # Panics
/// If `q.len() != logits.len()` or the row is empty.
pub fn quantise(logits: &[f32], q: &mut [u16]) -> Option<(f32, f32)> {
    assert_eq!(q.len(), logits.len(), "one level per logit");
    // std::max(a, b) is `a < b ? b : a`, std::min(a, b) is `b < a ? b : a`.
    let mut max_logit = logits[0];
    let mut min_logit = logits[0];
    for &x in &logits[1..] {
        if max_logit < x {
            max_logit = x;
        }
        if x < min_logit {
            min_logit = x;
        }
    }
    let floor = max_logit - 16.0;
    if min_logit < floor {
        min_logit = floor;
    }
    let mut sum_exp = 0f64;
    for &x in logits {
        sum_exp += f64::from((x - max_logit).exp());
    }
    if !(max_logit.is_finite() && sum_exp.is_finite()) {
        return None;
    }
    let log_sum_exp = sum_exp.ln() as f32;
    let min_log_prob = min_logit - max_logit - log_sum_exp;
    let scale = (max_logit - min_logit) / 65535.0;
    if scale != 0.0 {
        let inv_scale = 1.0 / scale;
        for (o, &x) in q.iter_mut().zip(logits) {
            *o = if x > min_logit { nearest_int(inv_scale * (x - min_logit)) as u16 } else { 0 };
        }
    } else {
        q.fill(0);
    }
    Some((scale, min_log_prob))
}

/// Writes a base file record by record, in order, atomically: nothing appears at the path until
/// [`BaseWriter::finish`] succeeds after every record was pushed.
///
/// ```no_run
/// # fn main() -> xent::Result<()> {
/// use xent::llamacpp::BaseWriter;
/// let (n_ctx, n_vocab) = (4, 3);
/// let tokens = [0, 1, 2, 1, 2, 0, 1, 0]; // two chunks
/// let mut w = BaseWriter::create(std::path::Path::new("base.kld"), n_ctx, n_vocab, &tokens)?;
/// // One record per chunk (position n_ctx/2 = 2 predicts token 3 of the chunk).
/// w.push(&[0.5, 1.0, -2.0, 0.0, 0.0, 3.0])?;
/// w.finish()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct BaseWriter {
    out: AtomicWriter,
    path: String,
    n_ctx: usize,
    n_vocab: usize,
    records: usize,
    pushed: usize,
    buf: Vec<u8>,
}

impl BaseWriter {
    /// Starts a base file at `path` for chunks of `n_ctx` tokens over a vocabulary of `n_vocab`,
    /// writing the header and `tokens` (`n_chunk · n_ctx` of them, `n_chunk >= 1`).
    ///
    /// # Errors
    /// [`Error::Shape`] for `n_ctx < 2`, `n_vocab` 0, numbers beyond int32, a token count that is
    /// not a positive multiple of `n_ctx`, or a token outside `0..n_vocab`; [`Error::Io`] naming
    /// `path` if it cannot be written.
    pub fn create(path: &Path, n_ctx: usize, n_vocab: usize, tokens: &[i32]) -> Result<BaseWriter> {
        let max = i32::MAX as usize;
        if n_ctx < 2 || n_ctx > max || n_vocab == 0 || n_vocab > max {
            return Err(Error::Shape(format!(
                "a llama.cpp base file needs 2 <= n_ctx <= {max} and 1 <= n_vocab <= {max}, got n_ctx {n_ctx}, n_vocab {n_vocab}"
            )));
        }
        if tokens.is_empty() || !tokens.len().is_multiple_of(n_ctx) || tokens.len() / n_ctx > max {
            return Err(Error::Shape(format!(
                "{} tokens is not a whole number (1 to {max}) of chunks of n_ctx = {n_ctx}",
                tokens.len()
            )));
        }
        if let Some((i, &t)) = tokens.iter().enumerate().find(|&(_, &t)| t < 0 || t as usize >= n_vocab) {
            return Err(Error::Shape(format!(
                "token {i} (chunk {}, position {}) is {t}, outside the vocabulary of {n_vocab}",
                i / n_ctx,
                i % n_ctx
            )));
        }
        let n_chunk = tokens.len() / n_ctx;
        let mut out = AtomicWriter::create(path)?;
        let mut head = Vec::with_capacity(HEADER_BYTES + 4 * tokens.len());
        head.extend_from_slice(MAGIC);
        for v in [n_ctx, n_vocab, n_chunk] {
            head.extend_from_slice(&(v as i32).to_le_bytes());
        }
        for &t in tokens {
            head.extend_from_slice(&t.to_le_bytes());
        }
        out.write(&head)?;
        Ok(BaseWriter {
            out,
            path: path.display().to_string(),
            n_ctx,
            n_vocab,
            records: n_chunk * records_per_chunk(n_ctx),
            pushed: 0,
            buf: Vec::new(),
        })
    }

    /// Records written so far.
    pub fn pushed(&self) -> usize {
        self.pushed
    }

    /// Records still to push: `n_chunk · records_per_chunk − pushed`.
    pub fn remaining(&self) -> usize {
        self.records - self.pushed
    }

    /// Quantises and appends the next records from a whole number of rows of `n_vocab` logits,
    /// in file order: chunk after chunk, positions `n_ctx/2 ..= n_ctx − 2` of each. Rows are
    /// quantised in parallel.
    ///
    /// # Errors
    /// [`Error::Shape`] if `logits` is not a whole number of rows or holds more rows than
    /// [`BaseWriter::remaining`], or a row has a NaN or `+inf`, or only `−inf` (naming the
    /// record, its chunk and position; nothing of this call is written then); [`Error::Io`]
    /// naming the file on a write failure.
    pub fn push(&mut self, logits: &[f32]) -> Result<()> {
        let v = self.n_vocab;
        if !logits.len().is_multiple_of(v) || logits.len() / v > self.remaining() {
            return Err(Error::Shape(format!(
                "{} logits pushed to {}: not a whole number of rows of {v}, or more than the {} records left",
                logits.len(),
                self.path,
                self.remaining()
            )));
        }
        if let Err(r) = quantise_rows(logits, v, &mut self.buf) {
            let i = self.pushed + r;
            let rpc = records_per_chunk(self.n_ctx);
            return Err(Error::Shape(format!(
                "record {i} (chunk {}, position {}) for {}: logits hold a NaN or +inf, or only -inf",
                i / rpc,
                self.n_ctx / 2 + i % rpc,
                self.path
            )));
        }
        self.append(logits.len() / v)
    }

    /// Writes the `rows` records quantised into `buf`.
    fn append(&mut self, rows: usize) -> Result<()> {
        self.out.write(&self.buf)?;
        self.pushed += rows;
        Ok(())
    }

    /// Checks that every record was pushed, then syncs and renames the file into place.
    ///
    /// # Errors
    /// [`Error::Shape`] if records are missing (the partial file is removed); [`Error::Io`]
    /// naming the file.
    pub fn finish(self) -> Result<()> {
        if self.remaining() != 0 {
            return Err(Error::Shape(format!(
                "{}: only {} of {} records were pushed; nothing written",
                self.path, self.pushed, self.records
            )));
        }
        self.out.finish()
    }
}

/// Quantises `rows = logits.len() / v` rows into `buf` as consecutive records (bytes), in
/// parallel. `Err(r)`: row `r` (the first such) cannot be quantised.
fn quantise_rows(logits: &[f32], v: usize, buf: &mut Vec<u8>) -> std::result::Result<(), usize> {
    use rayon::prelude::*;
    let rec_bytes = 2 * record_words(v);
    let rows = logits.len() / v;
    buf.clear();
    buf.resize(rows * rec_bytes, 0);
    let failed = buf
        .par_chunks_mut(rec_bytes)
        .zip(logits.par_chunks(v))
        .enumerate()
        .map_init(
            || vec![0u16; v],
            |q, (r, (out, row))| {
                let Some((scale, min_log_prob)) = quantise(row, q) else { return Some(r) };
                out[..4].copy_from_slice(&scale.to_le_bytes());
                out[4..8].copy_from_slice(&min_log_prob.to_le_bytes());
                for (o, &w) in out[8..8 + 2 * v].chunks_exact_mut(2).zip(q.iter()) {
                    o.copy_from_slice(&w.to_le_bytes());
                }
                None
            },
        )
        .flatten()
        .min();
    failed.map_or(Ok(()), Err)
}

/// Rows read per block by [`write_base_file`]: bounded so memory stays small whatever the
/// shape (at least one row).
const BLOCK_BYTES: usize = 16 << 20;

/// Writes a llama.cpp base file from logits `[n_chunk, n_ctx, V]` (f32, f16 or bf16) and tokens
/// `[n_chunk, n_ctx]` (any integer type [`Tensor::targets`] reads): the header, the tokens, and
/// one record per position `n_ctx/2 ..= n_ctx − 2` of each chunk with llama.cpp's quantisation
/// (the other positions are not read). Streamed in blocks of a few MiB, so memory stays bounded
/// whatever the size; atomic (nothing at `out` unless complete).
///
/// # Errors
/// [`Error::File`] naming the input for a wrong rank, dtype or shape, a token outside
/// `0..V` or int32, `n_ctx < 2`, or a row that has a NaN or `+inf` or only `−inf` (naming the
/// chunk and position); [`Error::File`] / [`Error::Io`] for read errors; [`Error::Io`] naming
/// `out` for write errors.
pub fn write_base_file(logits: &Tensor, tokens: &Tensor, out: &Path) -> Result<()> {
    write_blocks(logits, tokens, out, BLOCK_BYTES)
}

/// [`write_base_file`], reading the logits in blocks of about `block_bytes` (at least one row).
fn write_blocks(logits: &Tensor, tokens: &Tensor, out: &Path, block_bytes: usize) -> Result<()> {
    let bad = |t: &Tensor, reason: String| Error::File { path: t.name.clone(), reason };
    if !matches!(logits.elem, ElemType::F32 | ElemType::F16 | ElemType::BF16) {
        return Err(bad(logits, format!("logits must be f32, f16 or bf16, found {}", logits.elem)));
    }
    let [n_chunk, n_ctx, v] = logits.shape[..] else {
        return Err(bad(logits, format!("logits must have shape [n_chunk, n_ctx, V], found {:?}", logits.shape)));
    };
    if tokens.shape[..] != [n_chunk, n_ctx] {
        return Err(bad(
            tokens,
            format!(
                "tokens must have shape [n_chunk, n_ctx] = [{n_chunk}, {n_ctx}] to match the logits {:?}, found {:?}",
                logits.shape, tokens.shape
            ),
        ));
    }
    let max = i32::MAX as usize;
    if n_ctx < 2 || n_chunk == 0 || v == 0 || n_ctx > max || n_chunk > max || v > max {
        return Err(bad(
            logits,
            format!("shape {:?}: a base file needs n_chunk >= 1, n_ctx >= 2, V >= 1, each within int32", logits.shape),
        ));
    }
    let targets = tokens.targets()?;
    let mut toks = Vec::with_capacity(targets.len());
    for i in 0..targets.len() {
        let t = targets.get(i);
        if t < 0 || t >= v as i64 {
            return Err(bad(
                tokens,
                format!(
                    "token {i} (chunk {}, position {}) is {t}, outside the vocabulary of {v}",
                    i / n_ctx,
                    i % n_ctx
                ),
            ));
        }
        toks.push(t as i32);
    }
    let mut w = BaseWriter::create(out, n_ctx, v, &toks)?;
    let elem = logits.elem.size();
    let row_bytes = v * elem;
    let rpc = records_per_chunk(n_ctx);
    let block = (block_bytes / row_bytes).clamp(1, rpc.max(1));
    let mut raw: Vec<u32> = Vec::new();
    let mut rows_f32: Vec<f32> = Vec::new();
    for c in 0..n_chunk {
        let mut j = 0;
        while j < rpc {
            let n = block.min(rpc - j);
            let first_row = c * n_ctx + n_ctx / 2 + j;
            raw.clear();
            raw.resize((n * row_bytes).div_ceil(4), 0);
            let bytes = &mut bytemuck::cast_slice_mut::<u32, u8>(&mut raw)[..n * row_bytes];
            logits.read_data(first_row * row_bytes, bytes)?;
            let bytes = &*bytes;
            let floats: &[f32] = match logits.elem {
                ElemType::F32 => bytemuck::cast_slice(bytes),
                _ => {
                    rows_f32.clear();
                    rows_f32.resize(n * v, 0.0);
                    let halves: &[u16] = bytemuck::cast_slice(bytes);
                    if logits.elem == ElemType::F16 {
                        for (o, &h) in rows_f32.iter_mut().zip(halves) {
                            *o = half::f16::from_bits(h).to_f32();
                        }
                    } else {
                        for (o, &h) in rows_f32.iter_mut().zip(halves) {
                            *o = half::bf16::from_bits(h).to_f32();
                        }
                    }
                    &rows_f32
                }
            };
            if let Err(r) = quantise_rows(floats, v, &mut w.buf) {
                return Err(bad(
                    logits,
                    format!(
                        "chunk {c}, position {}: the logits hold a NaN or +inf, or only -inf (nothing written)",
                        n_ctx / 2 + j + r
                    ),
                ));
            }
            w.append(n)?;
            j += n;
        }
    }
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reading one row per block writes the same file as reading whole chunks.
    #[test]
    fn blocks_do_not_change_the_file() {
        let d = std::env::temp_dir().join(format!("xent-llamacpp-unit-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let (n_chunk, n_ctx, v) = (2usize, 11usize, 5usize);
        let logits: Vec<f32> = (0..n_chunk * n_ctx * v).map(|i| ((i * 37) % 23) as f32 * 0.7 - 8.0).collect();
        let tokens: Vec<i64> = (0..n_chunk * n_ctx).map(|i| (i % v) as i64).collect();
        let (lp, tp) = (d.join("l.npy"), d.join("t.npy"));
        crate::io::write_npy(&lp, "<f4", &[n_chunk, n_ctx, v], bytemuck::cast_slice(&logits)).unwrap();
        crate::io::write_npy(&tp, "<i8", &[n_chunk, n_ctx], bytemuck::cast_slice(&tokens)).unwrap();
        let l = crate::io::open(&lp, None, &[]).unwrap();
        let t = crate::io::open(&tp, None, &[]).unwrap();
        let (whole, rows) = (d.join("whole.kld"), d.join("rows.kld"));
        write_base_file(&l, &t, &whole).unwrap();
        write_blocks(&l, &t, &rows, 1).unwrap();
        let (a, b) = (std::fs::read(&whole).unwrap(), std::fs::read(&rows).unwrap());
        assert_eq!(a.len(), HEADER_BYTES + 4 * n_chunk * n_ctx + n_chunk * 5 * (8 + 2 * 6));
        assert_eq!(a, b);
        let _ = std::fs::remove_dir_all(&d);
    }
}
