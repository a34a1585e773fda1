//! Reading the caller's arrays where they lie: numpy arrays (ml_dtypes' bfloat16 included), any
//! object exporting DLPack (torch and JAX CPU tensors, without importing either), and anything
//! else numpy can view without a copy (the buffer protocol).

use std::ffi::c_void;

use numpy::{PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyCapsuleMethods};

/// Element types the package reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elem {
    F32,
    F16,
    BF16,
    F64,
    /// Signed integers of this many bytes.
    Int(usize),
    /// Unsigned integers of this many bytes.
    UInt(usize),
    Bool,
}

impl Elem {
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F16 | Elem::BF16 => 2,
            Elem::F64 => 8,
            Elem::Int(n) | Elem::UInt(n) => n,
            Elem::Bool => 1,
        }
    }

    pub fn name(self) -> String {
        match self {
            Elem::F32 => "float32".into(),
            Elem::F16 => "float16".into(),
            Elem::BF16 => "bfloat16".into(),
            Elem::F64 => "float64".into(),
            Elem::Int(n) => format!("int{}", 8 * n),
            Elem::UInt(n) => format!("uint{}", 8 * n),
            Elem::Bool => "bool".into(),
        }
    }

    /// The logits dtype this is, or a `TypeError` naming what is accepted.
    pub fn logits_dtype(self, what: &str) -> PyResult<xent::Dtype> {
        match self {
            Elem::F32 => Ok(xent::Dtype::F32),
            Elem::F16 => Ok(xent::Dtype::F16),
            Elem::BF16 => Ok(xent::Dtype::BF16),
            other => Err(PyTypeError::new_err(format!(
                "{what}: dtype {} is not supported: logits must be float32, float16 or bfloat16 \
                 (convert with .astype(numpy.float32))",
                other.name()
            ))),
        }
    }
}

/// A C-contiguous array in host memory, borrowed from its Python owner (kept alive by `owner`).
pub struct View<'py> {
    ptr: *const u8,
    pub shape: Vec<usize>,
    pub elem: Elem,
    /// Whether the owner lets its memory be written (numpy's `writeable` flag; DLPack tensors
    /// are writable by the protocol's contract).
    pub writable: bool,
    owner: Bound<'py, PyAny>,
}

impl<'py> View<'py> {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The array's bytes. They stay valid while the view lives (it holds the owner); the caller
    /// must not let Python code resize the owner meanwhile, which nothing in this package does.
    pub fn bytes(&self) -> &[u8] {
        let n = self.len() * self.elem.size();
        if n == 0 {
            return &[];
        }
        // SAFETY: `ptr` points at `len * size` readable bytes of a live, C-contiguous array:
        // checked when the view was made, and `owner` keeps the memory alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, n) }
    }

    /// The owner: the numpy array (or DLPack capsule) the view borrows.
    pub fn owner(&self) -> &Bound<'py, PyAny> {
        &self.owner
    }

    /// The array's bytes, to be overwritten (the gradient written in place).
    ///
    /// # Errors
    /// `ValueError` when the owner is read-only.
    #[allow(clippy::mut_from_ref)]
    pub fn bytes_mut(&self, what: &str) -> PyResult<&mut [u8]> {
        if !self.writable {
            return Err(PyValueError::new_err(format!(
                "{what}: the array is read-only: grad='inplace' writes the gradient over it; pass a writable \
                 array or grad='separate'"
            )));
        }
        let n = self.len() * self.elem.size();
        if n == 0 {
            return Ok(&mut []);
        }
        // SAFETY: as `bytes`, and the owner allows writes. The caller holds the only Rust
        // reference to these bytes while the returned slice lives (each call site takes it once).
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.cast_mut(), n) })
    }

    /// The elements as `T` (its size and alignment were checked against `elem` by the caller).
    pub fn typed<T: bytemuck::Pod>(&self, what: &str) -> PyResult<&[T]> {
        if self.len() == 0 {
            return Ok(&[]);
        }
        if std::mem::size_of::<T>() != self.elem.size() || !self.ptr.cast::<T>().is_aligned() {
            return Err(PyValueError::new_err(format!(
                "{what}: array of {} at address {:#x} is not aligned for its type: pass numpy.require({what}, requirements='CA') (a copy)",
                self.elem.name(),
                self.ptr as usize
            )));
        }
        // SAFETY: size and alignment checked just above; the bytes are valid for `len` elements
        // of a plain-old-data type, kept alive by `owner`.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.cast::<T>(), self.len()) })
    }
}

/// Views `obj` (named `what` in errors) without copying it.
///
/// # Errors
/// `TypeError` for an object that is no array, an unsupported dtype or memory that is not the
/// CPU's; `ValueError` for an array that is not C-contiguous.
pub fn view<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<View<'py>> {
    if let Ok(a) = obj.cast::<PyUntypedArray>() {
        return numpy_view(a, what);
    }
    if obj.hasattr("__dlpack__")? {
        return dlpack_view(obj, what);
    }
    // The buffer protocol (memoryview, array.array, bytes-like objects) through numpy, which
    // wraps such memory without copying it. Anything else numpy would have to convert.
    let np = obj.py().import("numpy")?;
    let supports_buffer = obj.py().import("builtins")?.getattr("memoryview")?.call1((obj,)).is_ok();
    if !supports_buffer {
        return Err(PyTypeError::new_err(format!(
            "{what}: expected a numpy array, a CPU tensor (DLPack) or a buffer, got {}",
            obj.get_type().name()?
        )));
    }
    let a = np.call_method1("asarray", (obj,))?;
    let a = a.cast::<PyUntypedArray>().map_err(|_| PyTypeError::new_err(format!("{what}: not an array")))?;
    numpy_view(a, what)
}

fn numpy_view<'py>(a: &Bound<'py, PyUntypedArray>, what: &str) -> PyResult<View<'py>> {
    let d = a.dtype();
    let (kind, size) = (d.kind(), d.itemsize());
    let elem = match (kind, size) {
        (b'f', 4) => Elem::F32,
        (b'f', 2) => Elem::F16,
        (b'f', 8) => Elem::F64,
        (b'i', n @ (1 | 2 | 4 | 8)) => Elem::Int(n),
        (b'u', n @ (1 | 2 | 4 | 8)) => Elem::UInt(n),
        (b'b', 1) => Elem::Bool,
        // ml_dtypes' bfloat16 (the dtype JAX hands out) is a numpy "void" type of two bytes.
        (b'V', 2) if d.typeobj().name()? == "bfloat16" => Elem::BF16,
        _ => {
            return Err(PyTypeError::new_err(format!(
                "{what}: dtype {} is not supported (logits: float32, float16, bfloat16; targets: integers)",
                d.str()?
            )))
        }
    };
    if d.is_native_byteorder() == Some(false) {
        return Err(PyTypeError::new_err(format!(
            "{what}: dtype {} is not in native byte order (convert with .astype({}))",
            d.str()?,
            elem.name()
        )));
    }
    if !a.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what}: array of shape {:?} is not C-contiguous (strides {:?}): xent reads arrays in place \
             and never copies them behind your back; pass numpy.ascontiguousarray({what}) (a copy)",
            a.shape(),
            a.strides()
        )));
    }
    // SAFETY: `as_array_ptr` is a live PyArrayObject (we hold a reference); `data` is its first element.
    let ptr = unsafe { (*a.as_array_ptr()).fields.data } as *const u8;
    let writable = a.getattr("flags")?.getattr("writeable")?.extract::<bool>()?;
    Ok(View { ptr, shape: a.shape().to_vec(), elem, writable, owner: a.clone().into_any() })
}

// DLPack's C structures (dlpack.h, v0.8 and later: the legacy, unversioned capsule "dltensor").
#[repr(C)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

const KDL_CPU: i32 = 1;
const KDL_CUDA_HOST: i32 = 3;

fn device_name(t: i32) -> &'static str {
    match t {
        2 => "CUDA",
        4 => "OpenCL",
        7 => "Vulkan",
        8 => "Metal",
        10 => "ROCm",
        13 => "CUDA managed",
        14 => "oneAPI",
        _ => "non-CPU",
    }
}

/// Views a DLPack exporter. The capsule is kept (not renamed "used_dltensor"), so the producer's
/// capsule destructor releases the tensor when the view is dropped, as the protocol allows.
fn dlpack_view<'py>(obj: &Bound<'py, PyAny>, what: &str) -> PyResult<View<'py>> {
    if obj.hasattr("__dlpack_device__")? {
        let (device_type, _): (i32, i32) = obj.call_method0("__dlpack_device__")?.extract()?;
        if device_type != KDL_CPU && device_type != KDL_CUDA_HOST {
            return Err(PyTypeError::new_err(format!(
                "{what}: the tensor is in {} memory (DLPack device {device_type}); xent reads CPU memory only: \
                 move it first (torch: .cpu(); JAX: jax.device_get)",
                device_name(device_type)
            )));
        }
    }
    let capsule = obj
        .call_method0("__dlpack__")
        .map_err(|e| PyTypeError::new_err(format!("{what}: cannot be read through DLPack: {e}")))?;
    let cap = capsule
        .cast::<PyCapsule>()
        .map_err(|_| PyTypeError::new_err(format!("{what}: __dlpack__ did not return a capsule")))?;
    let ptr = cap
        .pointer_checked(Some(c"dltensor"))
        .map_err(|_| PyTypeError::new_err(format!("{what}: __dlpack__ returned a used or unknown capsule")))?;
    // SAFETY: a valid "dltensor" capsule holds a DLManagedTensor that lives as long as the capsule,
    // which the returned view keeps alive.
    let t = unsafe { &ptr.cast::<DLManagedTensor>().as_ref().dl_tensor };
    if t.device.device_type != KDL_CPU && t.device.device_type != KDL_CUDA_HOST {
        return Err(PyTypeError::new_err(format!(
            "{what}: the tensor is in {} memory; xent reads CPU memory only: move it first (torch: .cpu())",
            device_name(t.device.device_type)
        )));
    }
    let ndim = usize::try_from(t.ndim).map_err(|_| PyValueError::new_err(format!("{what}: negative ndim")))?;
    // SAFETY: DLPack guarantees `shape` (and `strides` when not null) hold `ndim` values.
    let shape_i = if ndim == 0 { &[][..] } else { unsafe { std::slice::from_raw_parts(t.shape, ndim) } };
    let shape: Vec<usize> = shape_i
        .iter()
        .map(|&s| usize::try_from(s).map_err(|_| PyValueError::new_err(format!("{what}: negative dimension"))))
        .collect::<PyResult<_>>()?;
    let elem = match (t.dtype.code, t.dtype.bits, t.dtype.lanes) {
        (2, 32, 1) => Elem::F32,
        (2, 16, 1) => Elem::F16,
        (2, 64, 1) => Elem::F64,
        (4, 16, 1) => Elem::BF16,
        (0, b @ (8 | 16 | 32 | 64), 1) => Elem::Int(usize::from(b / 8)),
        (1, b @ (8 | 16 | 32 | 64), 1) => Elem::UInt(usize::from(b / 8)),
        (6, 8, 1) => Elem::Bool,
        (code, bits, lanes) => {
            return Err(PyTypeError::new_err(format!(
                "{what}: DLPack dtype (code {code}, {bits} bits, {lanes} lanes) is not supported"
            )))
        }
    };
    if !t.strides.is_null() {
        // SAFETY: as for `shape`.
        let strides = unsafe { std::slice::from_raw_parts(t.strides, ndim) };
        let mut expected = 1i64;
        for (d, (&n, &s)) in shape_i.iter().zip(strides).enumerate().rev() {
            if n > 1 && s != expected {
                return Err(PyValueError::new_err(format!(
                    "{what}: tensor of shape {shape:?} is not C-contiguous (stride {s} in dimension {d}): \
                     xent reads tensors in place; pass a contiguous one (torch: .contiguous())"
                )));
            }
            expected *= n.max(1);
        }
    }
    let data = (t.data as *const u8).wrapping_add(t.byte_offset as usize);
    Ok(View { ptr: data, shape, elem, writable: true, owner: capsule })
}
