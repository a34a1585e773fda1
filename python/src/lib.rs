//! `xent._xent`: the native module of the Python package `xent`, over the same library as the
//! CLI — no second implementation. Arrays are read in place (numpy, DLPack, the buffer protocol);
//! the GIL is released while computing; every error is a Python exception carrying the one-line
//! message the CLI prints.

mod arrays;
mod summaries;
mod train;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use numpy::{IntoPyArray, PyArray1};
use pyo3::exceptions::{
    PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyPermissionError, PyRuntimeError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use xent::device::DeviceChoice;
use xent::eval::{Engine, EvalOptions, Shard};
use xent::kld::eval::{KldEvalOptions, KldShard, LlamaTest};
use xent::kld::summary::KldSummary;
use xent::{GpuContext, Logits, Options, Targets};

use arrays::{view, Elem, View};
use summaries::{PyKldSummary, PySummary};

/// The Python exception for a library error: `TypeError` for a dtype, `OSError` (and its
/// subclasses) for a file that cannot be opened, `RuntimeError` for the device, `KeyboardInterrupt`
/// for an interruption, `ValueError` for everything about shapes, targets, file contents and summaries.
pub(crate) fn to_py_err(e: xent::Error) -> PyErr {
    use xent::Error as E;
    let msg = e.to_string();
    match &e {
        E::Dtype { .. } => PyTypeError::new_err(msg),
        E::Io { error, .. } => match error.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            _ => PyOSError::new_err(msg),
        },
        E::NoAdapter(_) | E::Gpu(_) => PyRuntimeError::new_err(msg),
        E::Interrupted => PyKeyboardInterrupt::new_err(msg),
        _ => PyValueError::new_err(msg),
    }
}

/// The GPU context for `device`, or `None` for the CPU. Contexts are made once per process
/// (creating a device costs tens of milliseconds to seconds) and shared by every call.
fn engine(py: Python<'_>, device: &str) -> PyResult<Option<Arc<GpuContext>>> {
    static GPU: Mutex<Option<Arc<GpuContext>>> = Mutex::new(None);
    static AUTO: Mutex<Option<Option<Arc<GpuContext>>>> = Mutex::new(None);
    let choice: DeviceChoice = device.parse().map_err(|e: xent::Error| PyValueError::new_err(e.to_string()))?;
    py.detach(|| {
        fn lock_err<T>(_: T) -> PyErr {
            PyRuntimeError::new_err("xent: the device cache was poisoned by an earlier panic")
        }
        match choice {
            DeviceChoice::Cpu => Ok(None),
            DeviceChoice::Gpu => {
                let mut gpu = GPU.lock().map_err(lock_err)?;
                if gpu.is_none() {
                    *gpu = Some(Arc::new(GpuContext::new().map_err(to_py_err)?));
                }
                Ok(gpu.clone())
            }
            DeviceChoice::Auto => {
                let mut auto = AUTO.lock().map_err(lock_err)?;
                Ok(auto.get_or_insert_with(|| xent::device::auto().map(Arc::new)).clone())
            }
        }
    })
}

fn engine_of(ctx: &Option<Arc<GpuContext>>) -> Engine<'_> {
    match ctx {
        Some(ctx) => Engine::Gpu(ctx),
        None => Engine::Cpu,
    }
}

fn device_name(ctx: &Option<Arc<GpuContext>>) -> &'static str {
    if ctx.is_some() {
        "gpu"
    } else {
        "cpu"
    }
}

/// Logits `[N, V]` or `[B, T, V]` as the library's [`Logits`], borrowed from the view.
fn logits_of<'a>(v: &'a View<'_>, what: &str) -> PyResult<Logits<'a>> {
    let dtype = v.elem.logits_dtype(what)?;
    if !matches!(v.shape.len(), 2 | 3) {
        return Err(PyValueError::new_err(format!(
            "{what}: shape {:?} has rank {}: logits must be [N, V] or [B, T, V]",
            v.shape,
            v.shape.len()
        )));
    }
    let vocab = v.shape[v.shape.len() - 1];
    let rows = v.shape[..v.shape.len() - 1].iter().product();
    Logits::from_bytes(v.bytes(), dtype, rows, vocab).map_err(|e| PyValueError::new_err(format!("{what}: {e}")))
}

/// Targets in a form the library reads: borrowed when they are i64, i32 or u32, else widened.
enum TargetsOf<'a> {
    I64(&'a [i64]),
    I32(&'a [i32]),
    U32(&'a [u32]),
    Owned(Vec<i64>),
}

impl TargetsOf<'_> {
    fn get(&self) -> Targets<'_> {
        match self {
            TargetsOf::I64(t) => Targets::I64(t),
            TargetsOf::I32(t) => Targets::I32(t),
            TargetsOf::U32(t) => Targets::U32(t),
            TargetsOf::Owned(t) => Targets::I64(t),
        }
    }
}

/// Targets `[N]`, or `[B, T]` matching logits `[B, T, V]`.
fn targets_of<'a>(t: &'a View<'_>, logits_shape: &[usize], what: &str) -> PyResult<TargetsOf<'a>> {
    let lead = &logits_shape[..logits_shape.len() - 1];
    let ok = t.shape.len() == 1 || (t.shape.len() == 2 && lead.len() == 2 && t.shape[..] == *lead);
    if !ok {
        return Err(PyValueError::new_err(format!(
            "{what}: shape {:?} does not fit logits of shape {logits_shape:?}: targets must be [N] or [B, T]",
            t.shape
        )));
    }
    Ok(match t.elem {
        Elem::Int(8) => TargetsOf::I64(t.typed::<i64>(what)?),
        Elem::Int(4) => TargetsOf::I32(t.typed::<i32>(what)?),
        Elem::UInt(4) => TargetsOf::U32(t.typed::<u32>(what)?),
        Elem::Int(2) => TargetsOf::Owned(t.typed::<i16>(what)?.iter().map(|&x| i64::from(x)).collect()),
        Elem::UInt(2) => TargetsOf::Owned(t.typed::<u16>(what)?.iter().map(|&x| i64::from(x)).collect()),
        Elem::Int(1) => TargetsOf::Owned(t.typed::<i8>(what)?.iter().map(|&x| i64::from(x)).collect()),
        Elem::UInt(1) => TargetsOf::Owned(t.typed::<u8>(what)?.iter().map(|&x| i64::from(x)).collect()),
        Elem::UInt(8) => TargetsOf::Owned(
            t.typed::<u64>(what)?
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    i64::try_from(x)
                        .map_err(|_| PyValueError::new_err(format!("{what}: target {x} at row {i} is too large")))
                })
                .collect::<PyResult<_>>()?,
        ),
        other => {
            return Err(PyTypeError::new_err(format!(
                "{what}: dtype {} is not supported: targets must be integers (int64, int32, uint32, ...)",
                other.name()
            )))
        }
    })
}

/// Per-row results of :func:`score`, flat over rows (``N = B * T`` for ``[B, T, V]`` logits):
/// ``nll`` (float32, nats, 0 where ignored), ``lse`` (float32, log-sum-exp of the row),
/// ``correct`` (bool: argmax == target), ``argmax`` (int64: first index of the largest logit, -1 for
/// a row holding NaN or +inf), ``summary`` and ``device``.
#[pyclass(module = "xent", frozen)]
struct ScoreResult {
    #[pyo3(get)]
    nll: Py<PyArray1<f32>>,
    #[pyo3(get)]
    lse: Py<PyArray1<f32>>,
    #[pyo3(get)]
    correct: Py<PyArray1<bool>>,
    #[pyo3(get)]
    argmax: Py<PyArray1<i64>>,
    #[pyo3(get)]
    summary: Py<PySummary>,
    #[pyo3(get)]
    device: &'static str,
}

#[pymethods]
impl ScoreResult {
    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("ScoreResult(rows={}, summary={})", self.nll.bind(py).len()?, self.summary.bind(py).repr()?))
    }
}

/// Cross-entropy of each row of ``logits`` against its target, read in place.
///
/// ``logits``: a C-contiguous array ``[N, V]`` or ``[B, T, V]`` of float32, float16 or bfloat16
/// (``ml_dtypes.bfloat16``): a numpy array, or any CPU tensor exporting DLPack (torch, JAX) or
/// the buffer protocol. It is read where it lies, never copied; a non-contiguous array is a
/// ``ValueError`` (pass ``numpy.ascontiguousarray(x)``), a GPU tensor a ``TypeError``.
/// ``targets``: integers ``[N]`` or ``[B, T]``; rows whose target is ``ignore_index`` get nll 0
/// and are left out of the summary (PyTorch's ``F.cross_entropy(reduction='none')``).
/// ``device``: ``"gpu"``, ``"cpu"``, or ``"auto"`` (the GPU when a hardware adapter exists,
/// said once on stderr). The GIL is released while computing.
///
/// Returns a ``ScoreResult`` with ``nll``, ``lse``, ``correct``, ``argmax`` (flat ``[N]``),
/// ``summary`` (an ``xent.Summary``) and ``device``.
#[pyfunction]
#[pyo3(signature = (logits, targets, *, device = "auto", ignore_index = -100),
    text_signature = "(logits, targets, *, device='auto', ignore_index=-100)")]
fn score(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    targets: &Bound<'_, PyAny>,
    device: &str,
    ignore_index: i64,
) -> PyResult<ScoreResult> {
    let lv = view(logits, "logits")?;
    let x = logits_of(&lv, "logits")?;
    let tv = view(targets, "targets")?;
    let t = targets_of(&tv, &lv.shape, "targets")?;
    let ctx = engine(py, device)?;
    let opts = Options { ignore_index };
    let start = Instant::now();
    let rows = py
        .detach(|| match &ctx {
            Some(gpu) => gpu.score(x, t.get(), &opts),
            None => xent::cpu::score(x, t.get(), &opts),
        })
        .map_err(to_py_err)?;
    let seconds = start.elapsed().as_secs_f64();
    let summary = xent::Summary::of(&rows);
    let nll: Vec<f32> = rows.iter().map(|r| r.nll).collect();
    let lse: Vec<f32> = rows.iter().map(|r| r.lse).collect();
    let correct: Vec<bool> = rows.iter().map(|r| r.correct()).collect();
    // -1 for a row with no argmax (a NaN or +inf in it), as the kernel's u32::MAX means.
    let argmax: Vec<i64> = rows.iter().map(|r| if r.argmax == u32::MAX { -1 } else { i64::from(r.argmax) }).collect();
    let device = device_name(&ctx);
    Ok(ScoreResult {
        nll: nll.into_pyarray(py).unbind(),
        lse: lse.into_pyarray(py).unbind(),
        correct: correct.into_pyarray(py).unbind(),
        argmax: argmax.into_pyarray(py).unbind(),
        summary: Py::new(py, PySummary { inner: summary, device: device.into(), seconds })?,
        device,
    })
}

/// Paths, globs, directories, or a list of them, expanded as the CLI does.
fn paths_of(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<PathBuf>> {
    let given: Vec<PathBuf> = match obj.extract::<PathBuf>() {
        Ok(p) => vec![p],
        Err(_) => obj.extract::<Vec<PathBuf>>().map_err(|_| {
            PyTypeError::new_err(format!("{what}: expected a path, a glob, a directory or a list of them"))
        })?,
    };
    xent::io::expand(&given).map_err(to_py_err)
}

/// A progress callback for the library: a bar on stderr when asked, and a check for Ctrl-C after
/// every chunk (the GIL is taken for that moment only). An interruption is kept in `interrupt`
/// and stops the work with [`xent::Error::Interrupted`].
fn progress_fn<'a>(
    bar: &'a indicatif::ProgressBar,
    interrupt: &'a mut Option<PyErr>,
) -> impl FnMut(u64, u64) -> xent::Result<()> + 'a {
    let mut rows_done = 0u64;
    move |rows, bytes| {
        rows_done += rows;
        bar.inc(bytes);
        bar.set_message(format!("{:.0} tokens/s", rows_done as f64 / bar.elapsed().as_secs_f64().max(1e-9)));
        if let Err(e) = Python::attach(|py| py.check_signals()) {
            *interrupt = Some(e);
            return Err(xent::Error::Interrupted);
        }
        Ok(())
    }
}

fn progress_bar(total: u64, visible: bool) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg} ETA {eta}")
    {
        bar.set_style(style);
    }
    bar
}

/// The error of an evaluation: the stored Python exception when it was interrupted.
fn eval_err(e: xent::Error, interrupt: Option<PyErr>) -> PyErr {
    match (e, interrupt) {
        (xent::Error::Interrupted, Some(py_err)) => py_err,
        (e, _) => to_py_err(e),
    }
}

/// Per-token and per-sequence results of :func:`score_files` (when asked for), with the summary.
/// ``nll``/``lse``/``correct``: one value per scored row (rows dropped by ``shift`` are absent,
/// ignored ones are 0); ``seq_tokens``, ``seq_sum_logprob``, ``seq_is_greedy``: one per sequence,
/// as lm-evaluation-harness's ``loglikelihood`` wants them.
#[pyclass(module = "xent", frozen)]
struct FilesResult {
    #[pyo3(get)]
    summary: Py<PySummary>,
    #[pyo3(get)]
    nll: Option<Py<PyArray1<f32>>>,
    #[pyo3(get)]
    lse: Option<Py<PyArray1<f32>>>,
    #[pyo3(get)]
    correct: Option<Py<PyArray1<bool>>>,
    #[pyo3(get)]
    seq_tokens: Option<Py<PyArray1<i64>>>,
    #[pyo3(get)]
    seq_sum_logprob: Option<Py<PyArray1<f64>>>,
    #[pyo3(get)]
    seq_is_greedy: Option<Py<PyArray1<bool>>>,
}

/// Scores logits files against targets files, as ``xent score`` does, in bounded memory.
///
/// ``logits`` / ``targets``: a path, a glob (``"shards/*.npy"``), a directory (its .npy and
/// .safetensors files, sorted by name) or a list of them, one targets file per logits file in the
/// same order. Logits .npy (<f4, <f2) or .safetensors (F32, F16, BF16), ``[N, V]`` or
/// ``[B, T, V]``; targets .npy (<i8, <i4, <u4) or .safetensors (I64, I32, U32). ``shift``: the
/// causal-LM convention (position t is scored against label t+1 of its sequence; the last
/// position of each sequence is dropped). ``offsets``: sequence boundaries ``[0, ..., N]`` (a file
/// or an integer array); by default the rows of ``[B, T, V]`` logits are the sequences.
/// ``progress``: a progress bar on stderr. Ctrl-C stops the work between chunks
/// (``KeyboardInterrupt``). The GIL is released while reading and computing.
///
/// Returns an ``xent.Summary``, or a ``FilesResult`` when ``per_token`` or ``per_sequence`` asks
/// for more.
#[pyfunction]
#[pyo3(signature = (logits, targets, *, device = "auto", ignore_index = -100, shift = false, offsets = None,
    per_token = false, per_sequence = false, progress = false, chunk_mib = 64, logits_key = None, targets_key = None),
    text_signature = "(logits, targets, *, device='auto', ignore_index=-100, shift=False, offsets=None, \
    per_token=False, per_sequence=False, progress=False, chunk_mib=64, logits_key=None, targets_key=None)")]
#[allow(clippy::too_many_arguments)]
fn score_files(
    py: Python<'_>,
    logits: &Bound<'_, PyAny>,
    targets: &Bound<'_, PyAny>,
    device: &str,
    ignore_index: i64,
    shift: bool,
    offsets: Option<&Bound<'_, PyAny>>,
    per_token: bool,
    per_sequence: bool,
    progress: bool,
    chunk_mib: u64,
    logits_key: Option<&str>,
    targets_key: Option<&str>,
) -> PyResult<Py<PyAny>> {
    let logits_paths = paths_of(logits, "logits")?;
    let targets_paths = paths_of(targets, "targets")?;
    if logits_paths.len() != targets_paths.len() {
        let s = |n: usize| if n == 1 { "" } else { "s" };
        return Err(PyValueError::new_err(format!(
            "{} logits file{} but {} targets file{}: give one targets file per logits file, in the same order",
            logits_paths.len(),
            s(logits_paths.len()),
            targets_paths.len(),
            s(targets_paths.len())
        )));
    }
    let offsets = match offsets {
        None => None,
        Some(o) => Some(match o.extract::<PathBuf>() {
            Ok(path) => xent::io::read_offsets(&path).map_err(to_py_err)?,
            Err(_) => offsets_of(o)?,
        }),
    };
    let ctx = engine(py, device)?;
    let start = Instant::now();
    let shards = logits_paths
        .iter()
        .zip(&targets_paths)
        .map(|(l, t)| {
            Ok(Shard {
                logits: xent::io::open(l, logits_key, &["logits"])?,
                targets: xent::io::open(t, targets_key, &["targets", "labels"])?,
            })
        })
        .collect::<xent::Result<Vec<_>>>()
        .map_err(to_py_err)?;
    let layout = xent::eval::check_shards(&shards).map_err(to_py_err)?;
    if per_sequence && offsets.is_none() && shards.iter().any(|s| s.logits.shape.len() != 3) {
        return Err(PyValueError::new_err(
            "per_sequence needs [B, T, V] logits (one sequence per row of B) or offsets",
        ));
    }
    let opts = EvalOptions {
        options: Options { ignore_index },
        shift,
        offsets,
        per_token,
        per_token_extra: per_token,
        per_sequence,
        chunk_bytes: chunk_mib.max(1) << 20,
    };
    let bar = progress_bar(layout.bytes, progress);
    let mut interrupt = None;
    let result = py.detach(|| {
        let mut report = progress_fn(&bar, &mut interrupt);
        let r = xent::eval::evaluate(engine_of(&ctx), &shards, &opts, &mut report);
        bar.finish_and_clear();
        r
    });
    let result = result.map_err(|e| eval_err(e, interrupt))?;
    let summary =
        PySummary { inner: result.summary, device: device_name(&ctx).into(), seconds: start.elapsed().as_secs_f64() };
    if !per_token && !per_sequence {
        return Ok(Py::new(py, summary)?.into_any());
    }
    let pt = result.per_token.map(|p| (p.nll, p.lse, p.correct));
    let (nll, lse, correct) = match pt {
        Some((nll, lse, correct)) => (
            Some(nll.into_pyarray(py).unbind()),
            Some(lse.into_pyarray(py).unbind()),
            Some(correct.into_iter().map(|c| c != 0).collect::<Vec<bool>>().into_pyarray(py).unbind()),
        ),
        None => (None, None, None),
    };
    let seqs = result.per_sequence.unwrap_or_default();
    let (seq_tokens, seq_sum, seq_greedy) = if per_sequence {
        (
            Some(seqs.iter().map(|s| s.tokens as i64).collect::<Vec<_>>().into_pyarray(py).unbind()),
            Some(seqs.iter().map(|s| s.sum_logprob).collect::<Vec<_>>().into_pyarray(py).unbind()),
            Some(seqs.iter().map(|s| s.is_greedy).collect::<Vec<_>>().into_pyarray(py).unbind()),
        )
    } else {
        (None, None, None)
    };
    let out = FilesResult {
        summary: Py::new(py, summary)?,
        nll,
        lse,
        correct,
        seq_tokens,
        seq_sum_logprob: seq_sum,
        seq_is_greedy: seq_greedy,
    };
    Ok(Py::new(py, out)?.into_any())
}

/// Sequence boundaries from an integer array.
fn offsets_of(o: &Bound<'_, PyAny>) -> PyResult<Vec<u64>> {
    if let Ok(list) = o.extract::<Vec<i64>>() {
        return list
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                u64::try_from(x).map_err(|_| PyValueError::new_err(format!("offsets: offset {i} is negative")))
            })
            .collect();
    }
    let v = view(o, "offsets")?;
    if v.shape.len() != 1 {
        return Err(PyValueError::new_err(format!("offsets: shape {:?}: offsets must have rank 1 [S+1]", v.shape)));
    }
    let t = targets_of(&v, &[v.len(), 1], "offsets")?;
    let t = t.get();
    (0..t.len())
        .map(|i| u64::try_from(t.get(i)).map_err(|_| PyValueError::new_err(format!("offsets: offset {i} is negative"))))
        .collect()
}

/// Per-row results of :func:`kld`: ``kld`` (float32, nats, 0 where ignored), ``same_top`` (bool:
/// both models' argmax agree), and with targets ``nll_base``, ``nll_test``, ``dp`` (float32; else
/// ``None``), ``summary`` (an ``xent.KldSummary``) and ``device``.
#[pyclass(module = "xent", frozen)]
struct KldResult {
    #[pyo3(get)]
    kld: Py<PyArray1<f32>>,
    #[pyo3(get)]
    same_top: Py<PyArray1<bool>>,
    #[pyo3(get)]
    nll_base: Option<Py<PyArray1<f32>>>,
    #[pyo3(get)]
    nll_test: Option<Py<PyArray1<f32>>>,
    #[pyo3(get)]
    dp: Option<Py<PyArray1<f32>>>,
    #[pyo3(get)]
    summary: Py<PyKldSummary>,
    #[pyo3(get)]
    device: &'static str,
}

/// KL divergence ``KL(base || test)`` of each row, with llama.cpp's statistics in ``.summary``.
///
/// ``base`` and ``test``: logits of the same shape, ``[N, V]`` or ``[B, T, V]``, each float32,
/// float16 or bfloat16 (they may differ), read in place as in :func:`score`. With ``targets``
/// (integers ``[N]`` or ``[B, T]``) also both models' nll and ``dp = p_test(t) - p_base(t)``, and
/// rows whose target is ``ignore_index`` are left out. Returns a ``KldResult``.
#[pyfunction]
#[pyo3(signature = (base, test, targets = None, *, device = "auto", ignore_index = -100),
    text_signature = "(base, test, targets=None, *, device='auto', ignore_index=-100)")]
fn kld(
    py: Python<'_>,
    base: &Bound<'_, PyAny>,
    test: &Bound<'_, PyAny>,
    targets: Option<&Bound<'_, PyAny>>,
    device: &str,
    ignore_index: i64,
) -> PyResult<KldResult> {
    let bv = view(base, "base")?;
    let b = logits_of(&bv, "base")?;
    let tv = view(test, "test")?;
    let t = logits_of(&tv, "test")?;
    if bv.shape != tv.shape {
        return Err(PyValueError::new_err(format!(
            "test: shape {:?} differs from base's {:?}: both models' logits must cover the same tokens",
            tv.shape, bv.shape
        )));
    }
    let yv = targets.map(|y| view(y, "targets")).transpose()?;
    let y = yv.as_ref().map(|y| targets_of(y, &bv.shape, "targets")).transpose()?;
    let ctx = engine(py, device)?;
    let opts = Options { ignore_index };
    let start = Instant::now();
    let rows = py
        .detach(|| {
            let y = y.as_ref().map(TargetsOf::get);
            match &ctx {
                Some(gpu) => gpu.kld(b, t, y, &opts),
                None => xent::kld::cpu::kld(b, t, y, &opts),
            }
        })
        .map_err(to_py_err)?;
    let seconds = start.elapsed().as_secs_f64();
    let summary = KldSummary::of(&rows);
    let with_targets = targets.is_some();
    let column = |f: fn(&xent::kld::KldRow) -> f32| rows.iter().map(f).collect::<Vec<f32>>();
    let device = device_name(&ctx);
    let optional = |v: Vec<f32>| with_targets.then(|| v.into_pyarray(py).unbind());
    Ok(KldResult {
        kld: column(|r| r.kld).into_pyarray(py).unbind(),
        same_top: rows.iter().map(|r| r.same_top()).collect::<Vec<_>>().into_pyarray(py).unbind(),
        nll_base: optional(column(|r| r.nll_base)),
        nll_test: optional(column(|r| r.nll_test)),
        dp: optional(column(|r| r.dp)),
        summary: Py::new(py, PyKldSummary { inner: summary, device: device.into(), seconds })?,
        device,
    })
}

/// ``xent kld`` over files: the KL divergence of a test model's logits from a base model's, over
/// the same tokens, in bounded memory, with llama.cpp's statistics. ``base``, ``test``,
/// ``targets``: paths, globs, directories or lists (one test and one targets file per base file).
/// ``base`` may be one llama.cpp ``--kl-divergence-base`` file (its tokens are the targets; then
/// ``test`` is another such file or logits, and it is compared on the CPU as llama.cpp does).
/// Returns an ``xent.KldSummary``.
#[pyfunction]
#[pyo3(signature = (base, test, targets = None, *, device = "auto", ignore_index = -100, shift = false,
    progress = false, chunk_mib = 64),
    text_signature = "(base, test, targets=None, *, device='auto', ignore_index=-100, shift=False, progress=False, \
    chunk_mib=64)")]
#[allow(clippy::too_many_arguments)]
fn kld_files(
    py: Python<'_>,
    base: &Bound<'_, PyAny>,
    test: &Bound<'_, PyAny>,
    targets: Option<&Bound<'_, PyAny>>,
    device: &str,
    ignore_index: i64,
    shift: bool,
    progress: bool,
    chunk_mib: u64,
) -> PyResult<PyKldSummary> {
    let base_paths = paths_of(base, "base")?;
    let test_paths = paths_of(test, "test")?;
    let target_paths = targets.map(|t| paths_of(t, "targets")).transpose()?.unwrap_or_default();
    let s = |n: usize| if n == 1 { "" } else { "s" };
    if test_paths.len() != base_paths.len() {
        return Err(PyValueError::new_err(format!(
            "{} base file{} but {} test logits file{}: give one test file per base file, in the same order",
            base_paths.len(),
            s(base_paths.len()),
            test_paths.len(),
            s(test_paths.len())
        )));
    }
    let llama = base_paths.iter().any(|p| xent::llamacpp::is_base_file(p));
    if llama && (base_paths.len() != 1 || !target_paths.is_empty() || shift) {
        return Err(PyValueError::new_err(
            "a llama.cpp base file is compared alone, without targets (its tokens are the targets) and without shift",
        ));
    }
    if !llama && !target_paths.is_empty() && target_paths.len() != base_paths.len() {
        return Err(PyValueError::new_err(format!(
            "{} base file{} but {} targets file{}: give one targets file per base file",
            base_paths.len(),
            s(base_paths.len()),
            target_paths.len(),
            s(target_paths.len())
        )));
    }
    let opts = KldEvalOptions {
        options: Options { ignore_index },
        shift,
        chunk_bytes: chunk_mib.max(1) << 20,
        ..KldEvalOptions::default()
    };
    let ctx = if llama { None } else { engine(py, device)? };
    let start = Instant::now();
    let mut interrupt = None;
    let result = if llama {
        let b = xent::llamacpp::BaseFile::open(&base_paths[0]).map_err(to_py_err)?;
        let t = if xent::llamacpp::is_base_file(&test_paths[0]) {
            LlamaTest::Base(xent::llamacpp::BaseFile::open(&test_paths[0]).map_err(to_py_err)?)
        } else {
            LlamaTest::Logits(xent::io::open(&test_paths[0], None, &["logits"]).map_err(to_py_err)?)
        };
        let bar = progress_bar((b.records() * b.n_vocab() * 6) as u64, progress);
        py.detach(|| {
            let mut report = progress_fn(&bar, &mut interrupt);
            let r = xent::kld::eval::evaluate_llama(&b, &t, &opts, &mut report);
            bar.finish_and_clear();
            r
        })
    } else {
        let shards = base_paths
            .iter()
            .enumerate()
            .map(|(i, b)| {
                Ok(KldShard {
                    base: xent::io::open(b, None, &["logits"])?,
                    test: xent::io::open(&test_paths[i], None, &["logits"])?,
                    targets: target_paths
                        .get(i)
                        .map(|t| xent::io::open(t, None, &["targets", "labels"]))
                        .transpose()?,
                })
            })
            .collect::<xent::Result<Vec<_>>>()
            .map_err(to_py_err)?;
        let layout = xent::kld::eval::check_kld_shards(&shards).map_err(to_py_err)?;
        let bar = progress_bar(layout.bytes, progress);
        py.detach(|| {
            let mut report = progress_fn(&bar, &mut interrupt);
            let r = xent::kld::eval::evaluate_kld(engine_of(&ctx), &shards, &opts, &mut report);
            bar.finish_and_clear();
            r
        })
    };
    let result = result.map_err(|e| eval_err(e, interrupt))?;
    Ok(PyKldSummary { inner: result.summary, device: device_name(&ctx).into(), seconds: start.elapsed().as_secs_f64() })
}

/// The native module `xent._xent`.
#[pymodule]
fn _xent(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<PySummary>()?;
    m.add_class::<PyKldSummary>()?;
    m.add_class::<ScoreResult>()?;
    m.add_class::<KldResult>()?;
    m.add_class::<FilesResult>()?;
    m.add_function(wrap_pyfunction!(score, m)?)?;
    m.add_function(wrap_pyfunction!(score_files, m)?)?;
    m.add_function(wrap_pyfunction!(kld, m)?)?;
    m.add_function(wrap_pyfunction!(kld_files, m)?)?;
    m.add_function(wrap_pyfunction!(train::cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(train::_reference_cross_entropy, m)?)?;
    Ok(())
}
