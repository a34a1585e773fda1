//! `xent.Summary` and `xent.KldSummary`: the library's mergeable summaries, with the device and
//! time of the run that made them, in the same JSON as the CLI's `--summary-out`.

use pyo3::exceptions::{PyAttributeError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString, PyTuple};

use crate::to_py_err;

/// The device name a merge of summaries carries, as `xent merge` writes it.
const MERGED: &str = "merged";

fn json_loads<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (text,))
}

fn text_of(text: &Bound<'_, PyAny>) -> PyResult<String> {
    if let Ok(b) = text.extract::<Vec<u8>>() {
        return String::from_utf8(b).map_err(|e| pyo3::exceptions::PyValueError::new_err(format!("not UTF-8: {e}")));
    }
    text.extract::<String>().map_err(|_| PyTypeError::new_err("from_json takes a str or bytes"))
}

/// Mergeable sums of a scoring run: tokens, ignored, correct, mean nll, perplexity ± standard
/// error, bits per token, accuracy — the object ``xent score --summary-out`` writes.
///
/// Sums are exact integers, so ``a + b``, ``sum([...])`` and ``xent.merge([...])`` give the
/// summary of one run over all rows to the last digit, whatever the grouping. ``==`` compares
/// the counts and sums (not the device or time). Picklable; ``to_json()`` / ``Summary.from_json()``
/// round-trip the CLI's JSON, so ``xent merge`` reads what Python writes and back.
#[pyclass(name = "Summary", module = "xent", frozen)]
#[derive(Clone)]
pub struct PySummary {
    pub inner: xent::Summary,
    pub device: String,
    pub seconds: f64,
}

#[pymethods]
impl PySummary {
    /// An empty summary (no tokens), a merge of nothing: the neutral element of ``+``.
    #[new]
    fn new() -> Self {
        PySummary { inner: xent::Summary::default(), device: MERGED.into(), seconds: 0.0 }
    }

    /// Rows scored (not ignored).
    #[getter]
    fn tokens(&self) -> u64 {
        self.inner.tokens
    }
    /// Rows whose target was the ignore index.
    #[getter]
    fn ignored(&self) -> u64 {
        self.inner.ignored
    }
    /// Scored rows whose argmax equals the target.
    #[getter]
    fn correct(&self) -> u64 {
        self.inner.correct
    }
    /// Scored rows whose nll was NaN.
    #[getter]
    fn nan(&self) -> u64 {
        self.inner.nan
    }
    /// Scored rows whose nll was +inf.
    #[getter]
    fn infinite(&self) -> u64 {
        self.inner.infinite
    }
    /// Mean nll in nats (NaN when nothing was scored).
    #[getter]
    fn mean_nll(&self) -> f64 {
        self.inner.mean_nll()
    }
    /// ``exp(mean_nll)``.
    #[getter]
    fn perplexity(&self) -> f64 {
        self.inner.perplexity()
    }
    /// Standard error of the perplexity, as llama.cpp reports it (NaN under two tokens).
    #[getter]
    fn ppl_stderr(&self) -> f64 {
        self.inner.perplexity_stderr()
    }
    /// ``mean_nll / ln 2``.
    #[getter]
    fn bits_per_token(&self) -> f64 {
        self.inner.bits_per_token()
    }
    /// Fraction of scored rows whose argmax is the target.
    #[getter]
    fn accuracy(&self) -> f64 {
        self.inner.accuracy()
    }
    /// ``"gpu"`` or ``"cpu"`` (one run), ``"merged"`` (a merge of several, or ``Summary()``).
    #[getter]
    fn device(&self) -> &str {
        &self.device
    }
    /// Seconds the run took (summed over merged runs).
    #[getter]
    fn seconds(&self) -> f64 {
        self.seconds
    }

    /// The JSON object ``xent score --summary-out`` writes (one line, no newline).
    fn to_json(&self) -> String {
        self.inner.to_json(&self.device, self.seconds)
    }

    /// ``json.loads(self.to_json())``: the exact sums are decimal strings.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_loads(py, &self.to_json())
    }

    /// Reads what ``to_json()`` or ``xent score --summary-out`` wrote; ``ValueError`` otherwise.
    #[staticmethod]
    fn from_json(text: &Bound<'_, PyAny>) -> PyResult<Self> {
        let (inner, device, seconds) = xent::Summary::from_json(&text_of(text)?).map_err(to_py_err)?;
        Ok(PySummary { inner, device, seconds })
    }

    fn __add__(&self, other: &Bound<'_, PyAny>) -> PyResult<Self> {
        let other = other.cast::<PySummary>().map_err(|_| {
            PyTypeError::new_err(format!(
                "cannot add {} to a Summary (score and kld summaries do not merge)",
                other.get_type().name().map(|n| n.to_string()).unwrap_or_default()
            ))
        })?;
        Ok(self.merged(other.get()))
    }

    /// ``0 + summary`` is the summary, so that ``sum(summaries)`` works.
    fn __radd__(&self, other: &Bound<'_, PyAny>) -> PyResult<Self> {
        if other.extract::<i64>().is_ok_and(|v| v == 0) {
            return Ok(self.clone());
        }
        self.__add__(other)
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other.cast::<PySummary>().is_ok_and(|o| o.get().inner == self.inner)
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (self.inner.tokens, self.inner.ignored, self.inner.correct, self.inner.sum_nll_fixed).hash(&mut h);
        h.finish()
    }

    /// Pickled as its JSON: the same exact sums, on any machine.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let ctor = py.get_type::<PySummary>().getattr("from_json")?;
        PyTuple::new(py, [ctor, PyTuple::new(py, [slf.get().to_json()])?.into_any()])
    }

    /// The text ``xent score`` and ``xent merge`` print.
    fn __str__(&self) -> String {
        let device = if self.device == MERGED { "merged summaries" } else { &self.device };
        self.inner.human(device, self.seconds)
    }

    fn __repr__(&self) -> String {
        format!(
            "Summary(tokens={}, ignored={}, mean_nll={:.6}, perplexity={:.4}, accuracy={:.4}, device='{}')",
            self.inner.tokens,
            self.inner.ignored,
            self.inner.mean_nll(),
            self.inner.perplexity(),
            self.inner.accuracy(),
            self.device
        )
    }
}

impl PySummary {
    fn merged(&self, other: &PySummary) -> PySummary {
        let mut inner = self.inner;
        inner.merge(&other.inner);
        PySummary { inner, device: MERGED.into(), seconds: self.seconds + other.seconds }
    }
}

/// llama.cpp's KL-divergence statistics (``llama-perplexity --kl-divergence``), mergeable: exact
/// sums and quantile sketches merge, so shards compared apart give the one-run result (means and
/// counts exactly; percentiles within the sketch's 6.1e-5 relative accuracy, exactly while every
/// shard's values fit the exact budget).
///
/// Every key of ``xent kld --json`` is an attribute: ``kld_mean``, ``kld_stderr``, ``kld_p99``,
/// ``same_top``, and with targets ``ppl_base``, ``ppl_ratio``, ``dp_rms`` and the rest. ``to_json()``
/// is what ``xent kld --summary-out`` writes (with the sketches), ``from_json()`` reads it back.
#[pyclass(name = "KldSummary", module = "xent", frozen)]
#[derive(Clone)]
pub struct PyKldSummary {
    pub inner: xent::kld::summary::KldSummary,
    pub device: String,
    pub seconds: f64,
}

#[pymethods]
impl PyKldSummary {
    /// Tokens compared (not ignored).
    #[getter]
    fn tokens(&self) -> u64 {
        self.inner.tokens()
    }
    /// Tokens whose target was the ignore index.
    #[getter]
    fn ignored(&self) -> u64 {
        self.inner.ignored()
    }
    /// ``"gpu"``, ``"cpu"`` or ``"merged"``.
    #[getter]
    fn device(&self) -> &str {
        &self.device
    }
    /// Seconds the run took (summed over merged runs).
    #[getter]
    fn seconds(&self) -> f64 {
        self.seconds
    }

    /// The statistics by name, as ``xent kld --json`` prints them (``None`` where JSON has null).
    fn __getattr__<'py>(slf: &Bound<'py, Self>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let report = Self::report(slf)?;
        let report = report.cast::<PyDict>()?;
        match report.get_item(name)? {
            Some(v) if !matches!(name, "device" | "seconds") => Ok(v),
            _ => Err(PyAttributeError::new_err(format!("'KldSummary' object has no attribute '{name}'"))),
        }
    }

    /// The statistics ``xent kld --json`` prints, as a dict.
    fn report<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        let s = slf.get();
        let stats = s.inner.stats();
        json_loads(slf.py(), &s.inner.report_json_with(&stats, &s.device, s.seconds))
    }

    /// The JSON object ``xent kld --summary-out`` writes (statistics, exact sums and sketches).
    fn to_json(&self) -> String {
        self.inner.to_json(&self.device, self.seconds)
    }

    /// ``json.loads(self.to_json())``.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_loads(py, &self.to_json())
    }

    /// Reads what ``to_json()`` or ``xent kld --summary-out`` wrote; ``ValueError`` otherwise.
    #[staticmethod]
    fn from_json(text: &Bound<'_, PyAny>) -> PyResult<Self> {
        Self::parse(&text_of(text)?)
    }

    fn __add__(&self, other: &Bound<'_, PyAny>) -> PyResult<Self> {
        let other = other.cast::<PyKldSummary>().map_err(|_| {
            PyTypeError::new_err("cannot add this to a KldSummary (score and kld summaries do not merge)")
        })?;
        let o = other.get();
        let mut inner = self.inner.clone();
        inner.merge(&o.inner);
        Ok(PyKldSummary { inner, device: MERGED.into(), seconds: self.seconds + o.seconds })
    }

    /// ``0 + summary`` is the summary, so that ``sum(summaries)`` works.
    fn __radd__(&self, other: &Bound<'_, PyAny>) -> PyResult<Self> {
        if other.extract::<i64>().is_ok_and(|v| v == 0) {
            return Ok(self.clone());
        }
        self.__add__(other)
    }

    /// Pickled losslessly: its JSON (sums and sketches) and, while within budget, the per-token
    /// values behind exact percentiles, so summaries shipped between processes (Ray) merge as
    /// they would in one.
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyTuple>> {
        let py = slf.py();
        let s = slf.get();
        let ctor = py.get_type::<PyKldSummary>().getattr("_from_state")?;
        let bytes = |v: &[f32]| PyBytes::new(py, &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>());
        let (kld, dp) = match s.inner.exact_values() {
            Some((k, d)) => (bytes(k).into_any(), bytes(d).into_any()),
            None => (py.None().into_bound(py), py.None().into_bound(py)),
        };
        let args = PyTuple::new(py, [PyString::new(py, &s.to_json()).into_any(), kld, dp])?;
        PyTuple::new(py, [ctor, args.into_any()])
    }

    /// Undoes ``__reduce__``.
    #[staticmethod]
    fn _from_state(text: &str, kld: Option<&[u8]>, dp: Option<&[u8]>) -> PyResult<Self> {
        let mut s = Self::parse(text)?;
        if let (Some(k), Some(d)) = (kld, dp) {
            let floats = |b: &[u8]| b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            s.inner = s.inner.with_exact_values(floats(k), floats(d)).map_err(to_py_err)?;
        }
        Ok(s)
    }

    /// The text ``xent kld`` prints (llama.cpp's layout).
    fn __str__(&self) -> String {
        self.inner.human()
    }

    fn __repr__(&self) -> String {
        let s = self.inner.stats();
        format!(
            "KldSummary(tokens={}, kld_mean={:.6}, kld_p99={:.6}, same_top={:.4}, device='{}')",
            s.tokens, s.kld_mean, s.kld_p99, s.same_top, self.device
        )
    }
}

impl PyKldSummary {
    fn parse(text: &str) -> PyResult<Self> {
        let inner = xent::kld::summary::KldSummary::from_json(text).map_err(to_py_err)?;
        let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
        let device = v.get("device").and_then(serde_json::Value::as_str).unwrap_or("").to_string();
        let seconds = v.get("seconds").and_then(serde_json::Value::as_f64).unwrap_or(0.0);
        Ok(PyKldSummary { inner, device, seconds })
    }
}
