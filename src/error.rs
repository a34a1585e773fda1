//! The library's one error type.

/// Everything that can go wrong in `xent`, with the facts needed to say what and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A row's target is not a valid class index and not the ignore index.
    #[error(
        "row {row}: target {target} is outside the vocabulary of {vocab} (valid: 0..{vocab}, or the ignore index)"
    )]
    TargetOutOfRange {
        /// Row (flattened over batch and time) holding the bad target.
        row: usize,
        /// The target value as given.
        target: i64,
        /// Logits per row.
        vocab: usize,
    },
    /// Logits and targets disagree on the number of rows.
    #[error("logits have {logits_rows} rows but targets have {targets_rows}")]
    RowMismatch {
        /// Rows of logits (`N`, or `B * T`).
        logits_rows: usize,
        /// Number of targets.
        targets_rows: usize,
    },
    /// A shape that cannot be scored (vocab 0, a size that overflows, data of the wrong length).
    #[error("bad shape: {0}")]
    Shape(String),
    /// An element type that is not supported where it was found.
    #[error("unsupported dtype {dtype}: {expected}")]
    Dtype {
        /// The dtype found.
        dtype: String,
        /// What would have been accepted.
        expected: String,
    },
    /// A file that is not a valid `.npy` or `.safetensors`, or holds the wrong tensors.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An I/O error on a named file.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error (already in the message, so not chained a second time).
        error: std::io::Error,
    },
    /// No GPU adapter could be found or opened.
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),
    /// The device rejected or lost work (validation error, out of memory, device lost).
    #[error("GPU error: {0}")]
    Gpu(String),
    /// A caller's buffer does not satisfy what `encode` needs.
    #[error("bad buffer for encode: {0}")]
    Buffer(String),
    /// A summary file (JSON) that cannot be read back: not JSON, another kind, a missing or inconsistent field.
    #[error("not a valid summary: {0}")]
    Summary(String),
    /// An engine's tensor (`xent::burn`, `xent::candle`) that cannot be read as it is — on a device
    /// the integration does not read, or not contiguous — or a call into the engine that failed.
    /// The message names the tensor and says what to do.
    #[error("engine: {0}")]
    Engine(String),
    /// An argument with a value it cannot take (a device name that is none of auto, gpu, cpu).
    #[error("{0}")]
    Argument(String),
    /// The caller's progress callback asked to stop (Ctrl-C in the Python package).
    #[error("interrupted")]
    Interrupted,
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
