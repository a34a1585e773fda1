//! The problem description: logits, targets and options, validated once, up front.

use crate::error::{Error, Result};

/// Element type of the logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16: the high 16 bits of a binary32.
    BF16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    /// Lower-case name, as the CLI spells it.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::BF16 => "bf16",
        }
    }

    /// Encodes f32 values as little-endian bytes of this type (rounding to nearest for 16-bit
    /// types): how generated or converted logits become a [`Logits`] of another dtype.
    pub fn encode(self, x: &[f32]) -> Vec<u8> {
        match self {
            Dtype::F32 => bytemuck::cast_slice(x).to_vec(),
            Dtype::F16 => x.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
            Dtype::BF16 => x.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        }
    }

    /// Decodes element `i` of little-endian `bytes` as f32. Used by the reference: plain, not fast.
    pub(crate) fn get(self, bytes: &[u8], i: usize) -> f32 {
        match self {
            Dtype::F32 => {
                let b = &bytes[4 * i..4 * i + 4];
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            }
            Dtype::F16 => half::f16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32(),
            Dtype::BF16 => half::bf16::from_bits(u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])).to_f32(),
        }
    }
}

impl std::str::FromStr for Dtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Dtype::F32),
            "f16" => Ok(Dtype::F16),
            "bf16" => Ok(Dtype::BF16),
            _ => Err(Error::Dtype { dtype: s.to_string(), expected: "logits must be f32, f16 or bf16".into() }),
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A row-major `[rows, vocab]` block of logits in host memory, as little-endian bytes.
///
/// Borrowed, never copied: memory-mapped files and caller slices are read in place.
#[derive(Debug, Clone, Copy)]
pub struct Logits<'a> {
    bytes: &'a [u8],
    dtype: Dtype,
    rows: usize,
    vocab: usize,
}

impl<'a> Logits<'a> {
    /// Wraps raw little-endian bytes.
    ///
    /// # Errors
    /// [`Error::Shape`] when `vocab` is 0, or `bytes` is not exactly `rows * vocab` elements.
    pub fn from_bytes(bytes: &'a [u8], dtype: Dtype, rows: usize, vocab: usize) -> Result<Self> {
        if vocab == 0 {
            return Err(Error::Shape("vocab is 0: each row needs at least one logit".into()));
        }
        if vocab >= u32::MAX as usize {
            return Err(Error::Shape(format!("vocab {vocab} does not fit in u32")));
        }
        let want = rows
            .checked_mul(vocab)
            .and_then(|n| n.checked_mul(dtype.size()))
            .ok_or_else(|| Error::Shape(format!("{rows} x {vocab} overflows")))?;
        if bytes.len() != want {
            return Err(Error::Shape(format!(
                "{rows} x {vocab} {dtype} logits need {want} bytes, got {}",
                bytes.len()
            )));
        }
        Ok(Logits { bytes, dtype, rows, vocab })
    }

    /// f32 logits.
    ///
    /// # Errors
    /// As [`Logits::from_bytes`].
    pub fn f32(data: &'a [f32], vocab: usize) -> Result<Self> {
        Self::from_bytes(bytemuck::cast_slice(data), Dtype::F32, rows_of(data.len(), vocab)?, vocab)
    }

    /// f16 logits.
    ///
    /// # Errors
    /// As [`Logits::from_bytes`].
    pub fn f16(data: &'a [half::f16], vocab: usize) -> Result<Self> {
        Self::from_bytes(bytemuck::cast_slice(data), Dtype::F16, rows_of(data.len(), vocab)?, vocab)
    }

    /// bf16 logits.
    ///
    /// # Errors
    /// As [`Logits::from_bytes`].
    pub fn bf16(data: &'a [half::bf16], vocab: usize) -> Result<Self> {
        Self::from_bytes(bytemuck::cast_slice(data), Dtype::BF16, rows_of(data.len(), vocab)?, vocab)
    }

    /// The raw bytes, row-major.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// Element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Logits per row.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.vocab * self.dtype.size()
    }

    /// Rows `start..end` as their own block.
    pub fn slice_rows(&self, start: usize, end: usize) -> Logits<'a> {
        let rb = self.row_bytes();
        Logits { bytes: &self.bytes[start * rb..end * rb], rows: end - start, ..*self }
    }

    /// Logit `j` of row `r` as f32.
    pub fn get(&self, r: usize, j: usize) -> f32 {
        self.dtype.get(self.bytes, r * self.vocab + j)
    }
}

fn rows_of(len: usize, vocab: usize) -> Result<usize> {
    if vocab == 0 {
        return Err(Error::Shape("vocab is 0: each row needs at least one logit".into()));
    }
    if !len.is_multiple_of(vocab) {
        return Err(Error::Shape(format!("{len} logits is not a whole number of rows of {vocab}")));
    }
    Ok(len / vocab)
}

/// Class indices, one per row, in any of the integer types datasets use.
#[derive(Debug, Clone, Copy)]
pub enum Targets<'a> {
    /// Unsigned 32-bit (no room for a negative ignore index: use `u32::MAX` style sentinels via [`Options`]).
    U32(&'a [u32]),
    /// Signed 32-bit.
    I32(&'a [i32]),
    /// Signed 64-bit, as PyTorch's `long`.
    I64(&'a [i64]),
}

impl Targets<'_> {
    /// Number of targets.
    pub fn len(&self) -> usize {
        match self {
            Targets::U32(t) => t.len(),
            Targets::I32(t) => t.len(),
            Targets::I64(t) => t.len(),
        }
    }
    /// Whether there are no targets.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Target `i` widened to i64.
    pub fn get(&self, i: usize) -> i64 {
        match self {
            Targets::U32(t) => i64::from(t[i]),
            Targets::I32(t) => i64::from(t[i]),
            Targets::I64(t) => t[i],
        }
    }
}

/// Scoring options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Target value whose rows are skipped: nll 0, left out of the mean (PyTorch's `ignore_index`).
    pub ignore_index: i64,
}

impl Default for Options {
    fn default() -> Self {
        Options { ignore_index: -100 }
    }
}

/// The target value the kernels read as "ignored".
pub const IGNORED_TARGET: u32 = u32::MAX;

/// Checks every target against `vocab` and converts them to the `u32` form the kernels read,
/// with ignored rows as [`IGNORED_TARGET`].
///
/// # Errors
/// [`Error::RowMismatch`] when the counts differ; [`Error::TargetOutOfRange`] naming the
/// first row whose target is negative (and not the ignore index) or `>= vocab`.
pub fn validate_targets(targets: Targets<'_>, rows: usize, vocab: usize, opts: &Options) -> Result<Vec<u32>> {
    if targets.len() != rows {
        return Err(Error::RowMismatch { logits_rows: rows, targets_rows: targets.len() });
    }
    (0..rows)
        .map(|row| {
            let t = targets.get(row);
            if t == opts.ignore_index {
                Ok(IGNORED_TARGET)
            } else if t < 0 || t >= vocab as i64 {
                Err(Error::TargetOutOfRange { row, target: t, vocab })
            } else {
                Ok(t as u32)
            }
        })
        .collect()
}

/// One row's result, in the exact layout the GPU kernel writes (16 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowLoss {
    /// `-log softmax(x)[target]` in nats; 0 for ignored rows; NaN for broken rows.
    pub nll: f32,
    /// `log(sum_j exp(x_j))`.
    pub lse: f32,
    /// First index of the largest logit; `u32::MAX` for a broken row (a NaN or +inf in it, or
    /// only -inf).
    pub argmax: u32,
    /// Bit set of [`RowLoss::IGNORED`], [`RowLoss::CORRECT`], [`RowLoss::BAD_TARGET`].
    pub flags: u32,
}

impl RowLoss {
    /// The row's target was the ignore index.
    pub const IGNORED: u32 = 1;
    /// `argmax == target` (and the row is not NaN).
    pub const CORRECT: u32 = 2;
    /// The target was out of range (only through [`crate::GpuContext::encode`], which does not validate).
    pub const BAD_TARGET: u32 = 4;
    /// Every flag the kernels write; a result with other bits set was never written (streams
    /// poison their output buffers with all bits set).
    pub const ALL_FLAGS: u32 = Self::IGNORED | Self::CORRECT | Self::BAD_TARGET;

    /// Whether this result was written by a kernel (not left as poison).
    pub fn is_written(&self) -> bool {
        self.flags & !Self::ALL_FLAGS == 0
    }

    /// Whether the row was ignored.
    pub fn ignored(&self) -> bool {
        self.flags & Self::IGNORED != 0
    }
    /// Whether the prediction (argmax) equals the target.
    pub fn correct(&self) -> bool {
        self.flags & Self::CORRECT != 0
    }
}
