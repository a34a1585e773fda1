//! Tensors from `.npy` and `.safetensors` files, memory-mapped and validated before use.
//!
//! Every check that depends on the file happens here, so that a bad file gives one clear error
//! naming the file, the tensor and what is wrong, and never a panic or an absurd allocation.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::problem::{Dtype, Logits, Targets};

/// Element type of a tensor in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 32-bit unsigned integer.
    U32,
}

impl std::fmt::Display for ElemType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ElemType::F32 => "f32",
            ElemType::F16 => "f16",
            ElemType::BF16 => "bf16",
            ElemType::I64 => "i64",
            ElemType::I32 => "i32",
            ElemType::U32 => "u32",
        })
    }
}

impl ElemType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            ElemType::F32 | ElemType::I32 | ElemType::U32 => 4,
            ElemType::F16 | ElemType::BF16 => 2,
            ElemType::I64 => 8,
        }
    }
}

/// A tensor in a file: where its data lies, its type and shape. Small tensors are read through a
/// memory map ([`Tensor::bytes`]); large ones in chunks with [`Tensor::read_data`], which keeps
/// memory bounded and turns a file truncated or rewritten while being read into an error instead
/// of a crash.
pub struct Tensor {
    file: std::fs::File,
    stamp: Stamp,
    map: memmap2::Mmap,
    start: usize,
    end: usize,
    /// Element type.
    pub elem: ElemType,
    /// Shape, outermost first (C order).
    pub shape: Vec<usize>,
    /// `path` or `path:tensor`, for messages.
    pub name: String,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("name", &self.name)
            .field("elem", &self.elem)
            .field("shape", &self.shape)
            .finish()
    }
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

impl Tensor {
    /// The tensor's raw little-endian bytes, through the memory map. For large tensors prefer
    /// [`Tensor::read_data`]: pages touched here stay resident.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }

    /// Bytes `[offset, offset + len)` of the tensor's data straight from the memory map, with
    /// their pages populated first (Linux's `MADV_POPULATE_READ`, which reports a file truncated
    /// under it as an error rather than raising SIGBUS). `None` where that is unavailable (other
    /// systems, kernels before 5.14): use [`Tensor::read_data`] then.
    ///
    /// Zero-copy, so faster than `read_data` when the file is in the page cache. A file truncated
    /// by another process in the microseconds between population and the reads of these bytes
    /// still raises SIGBUS; the `xent` binary turns that into a one-line error.
    ///
    /// # Errors
    /// As [`Tensor::read_data`].
    pub fn mapped(&self, offset: usize, len: usize) -> Result<Option<&[u8]>> {
        if offset.checked_add(len).is_none_or(|end| end > self.data_len()) {
            return Err(self.err(format!("read of {len} bytes at {offset} is past the data")));
        }
        self.check_unchanged()?;
        let at = self.start + offset;
        #[cfg(target_os = "linux")]
        {
            match self.map.advise_range(memmap2::Advice::PopulateRead, at, len) {
                Ok(()) => {
                    // Population fails past the end of a shortened file, but not within its last
                    // page (those bytes read as zeros): the stamp, checked again, catches that.
                    self.check_unchanged()?;
                    Ok(Some(&self.map[at..at + len]))
                }
                Err(e) if e.raw_os_error() == Some(libc_einval()) => Ok(None),
                Err(e) => Err(self.err(format!("file was truncated or unreadable while being read ({e})"))),
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = at;
            Ok(None)
        }
    }

    /// Drops the pages of `[offset, offset + len)` from this process's resident set (they stay in
    /// the page cache), so that scanning a huge file through [`Tensor::mapped`] keeps memory bounded.
    pub fn release(&self, offset: usize, len: usize) {
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            let start = (self.start + offset) / PAGE * PAGE;
            let end = (self.start + offset + len).min(self.map.len()) / PAGE * PAGE;
            if end > start {
                // SAFETY: MADV_DONTNEED on a read-only file mapping only drops page-table entries;
                // later reads fault the same file contents back in. No reference into these
                // pages is held across this call by xent.
                let _ =
                    unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
            }
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }

    /// Bytes of data.
    pub fn data_len(&self) -> usize {
        self.end - self.start
    }

    /// Reads bytes `[offset, offset + buf.len())` of the tensor's data into `buf` with positioned
    /// reads (no memory map), checking first that the file has not changed since it was opened.
    ///
    /// # Errors
    /// [`Error::File`] if the file changed (length or modification time) or was truncated;
    /// [`Error::Io`] on a read error.
    pub fn read_data(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        if offset.checked_add(buf.len()).is_none_or(|end| end > self.data_len()) {
            return Err(self.err(format!("read of {} bytes at {offset} is past the data", buf.len())));
        }
        self.check_unchanged()?;
        let at = (self.start + offset) as u64;
        read_exact_at(&self.file, buf, at).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.err("file was truncated while being read")
            } else {
                Error::Io { path: self.name.clone(), error: e }
            }
        })
    }

    /// Fails if the file's length or modification time differ from when it was opened.
    ///
    /// # Errors
    /// [`Error::File`] naming the file.
    pub fn check_unchanged(&self) -> Result<()> {
        match Stamp::of(&self.file) {
            Ok(now) if now == self.stamp => Ok(()),
            Ok(_) => Err(self.err("file changed while being read (length or modification time)")),
            Err(e) => Err(Error::Io { path: self.name.clone(), error: e }),
        }
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::File { path: self.name.clone(), reason: reason.into() }
    }

    /// Views the tensor as logits: rank 2 `[N, V]` or rank 3 `[B, T, V]`, a float dtype.
    ///
    /// # Errors
    /// [`Error::File`] naming the tensor for a wrong rank, vocab 0 or an integer dtype.
    pub fn logits(&self) -> Result<Logits<'_>> {
        let dtype = match self.elem {
            ElemType::F32 => Dtype::F32,
            ElemType::F16 => Dtype::F16,
            ElemType::BF16 => Dtype::BF16,
            other => return Err(self.err(format!("logits must be f32, f16 or bf16, found {other}"))),
        };
        let (rows, vocab) = match self.shape[..] {
            [n, v] => (n, v),
            [b, t, v] => (b.checked_mul(t).ok_or_else(|| self.err("shape overflows"))?, v),
            _ => {
                return Err(
                    self.err(format!("logits must have rank 2 [N, V] or 3 [B, T, V], found shape {:?}", self.shape))
                )
            }
        };
        if vocab == 0 {
            return Err(self.err(format!("logits have vocab 0 (shape {:?})", self.shape)));
        }
        Logits::from_bytes(self.bytes(), dtype, rows, vocab).map_err(|e| self.err(e.to_string()))
    }

    /// Views the tensor as targets: rank 1 `[N]` or rank 2 `[B, T]`, an integer dtype.
    ///
    /// # Errors
    /// [`Error::File`] naming the tensor for a wrong rank or a float dtype, or data that is not
    /// aligned for its type (`.npy` data always is; `.safetensors` data should be).
    pub fn targets(&self) -> Result<Targets<'_>> {
        if !(1..=2).contains(&self.shape.len()) {
            return Err(self.err(format!("targets must have rank 1 [N] or 2 [B, T], found shape {:?}", self.shape)));
        }
        let bytes = self.bytes();
        let misaligned = |_| self.err("target data is not aligned to its element size");
        Ok(match self.elem {
            ElemType::I64 => Targets::I64(bytemuck::try_cast_slice(bytes).map_err(misaligned)?),
            ElemType::I32 => Targets::I32(bytemuck::try_cast_slice(bytes).map_err(misaligned)?),
            ElemType::U32 => Targets::U32(bytemuck::try_cast_slice(bytes).map_err(misaligned)?),
            other => return Err(self.err(format!("targets must be i64, i32 or u32, found {other}"))),
        })
    }
}

/// Paths, globs and directories to a sorted, non-empty list of files, as every command that reads
/// shards takes them: a directory gives its `.npy` and `.safetensors` files sorted by name, a glob
/// (`shards/*.npy`) its matches sorted, a plain path itself.
///
/// # Errors
/// [`Error::Io`] for a directory that cannot be listed; [`Error::File`] for a directory holding no
/// input files, a bad glob or one matching nothing, or no paths at all.
pub fn expand(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for arg in args {
        let text = arg.to_string_lossy();
        let file_err = |reason: &str| Error::File { path: text.to_string(), reason: reason.into() };
        if arg.is_dir() {
            let entries = std::fs::read_dir(arg).map_err(|error| Error::Io { path: text.to_string(), error })?;
            let mut files: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "npy" || e == "safetensors"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(file_err("directory holds no .npy or .safetensors files"));
            }
            out.extend(files);
        } else if text.contains(['*', '?', '[']) {
            let matches = glob::glob(&text).map_err(|e| file_err(&format!("bad pattern: {e}")))?;
            let mut files: Vec<PathBuf> = matches.filter_map(|p| p.ok()).collect();
            files.sort();
            if files.is_empty() {
                return Err(file_err("pattern matches no files"));
            }
            out.extend(files);
        } else {
            out.push(arg.clone());
        }
    }
    if out.is_empty() {
        return Err(Error::File { path: "(none)".into(), reason: "no files given".into() });
    }
    Ok(out)
}

/// Reads sequence boundaries `[0, ..., N]` (rank-1 integers, `.npy` or `.safetensors`), as
/// `xent score --offsets` takes them.
///
/// # Errors
/// As [`open`]; [`Error::File`] for another rank, a float dtype or a negative offset.
pub fn read_offsets(path: &Path) -> Result<Vec<u64>> {
    let t = open(path, None, &["offsets"])?;
    let bad = |reason: String| Error::File { path: t.name.clone(), reason };
    if t.shape.len() != 1 {
        return Err(bad(format!("offsets must have rank 1 [S+1], found shape {:?}", t.shape)));
    }
    let v = t.targets().map_err(|_| bad("offsets must be i64, i32 or u32".into()))?;
    (0..v.len()).map(|i| u64::try_from(v.get(i)).map_err(|_| bad(format!("offset {i} is negative")))).collect()
}

/// Opens a tensor by extension: `.npy`, or `.safetensors` with an optional tensor name.
///
/// In a `.safetensors` file with several tensors and no `key`, the tensor is chosen by the first
/// of `default_keys` present (for example `logits`, or `targets`/`labels`).
///
/// # The file must not change while the tensor is in use
/// The file is memory-mapped, and [`Tensor::bytes`], [`Tensor::logits`] and [`Tensor::mapped`]
/// hand out slices of the mapping. Another process rewriting the file in place changes those
/// bytes under the reader (results are then meaningless; [`Tensor::read_data`] and
/// [`Tensor::mapped`] check the file's length and modification time and report a change they
/// see as an error), and truncating it makes reads past the new end raise SIGBUS, which
/// kills a process that does not handle it (the `xent` binary turns it into a one-line error).
/// Write evaluation files once and score them afterwards, as every tool that maps files expects.
///
/// # Errors
/// [`Error::Io`] if the file cannot be opened; [`Error::File`] for an unknown extension, a
/// malformed header, a truncated file or a missing tensor.
pub fn open(path: &Path, key: Option<&str>, default_keys: &[&str]) -> Result<Tensor> {
    let display = path.display().to_string();
    let io = |error| Error::Io { path: display.clone(), error };
    let file = std::fs::File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.is_dir() {
        return Err(Error::File { path: display, reason: "is a directory, not a tensor file".into() });
    }
    let stamp = Stamp::of(&file).map_err(io)?;
    // SAFETY: the map is read-only. Its contents can still change if another process writes the
    // file: that is the documented contract of this function (see "The file must not change"),
    // and the readers of large tensors (`read_data`, `mapped`) check the file's stamp around
    // each read so that a change they observe is an error rather than a silent mix.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    // Best effort: where the page cache holds the file in 2 MiB folios (as after reading it from
    // disk), this lets the kernel map each one with a single page-table entry instead of 512.
    // Measured on the dev VM (10 GB of shards, warm cache): mapping cost fell from ~0.1 s to
    // ~0.01 s per 2.5 GB; that time otherwise comes straight out of scoring on the CPU path.
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage);
    let parsed = match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => open_npy(&map, &display),
        Some("safetensors") => open_safetensors(&map, &display, key, default_keys),
        _ => Err(Error::File {
            path: display.clone(),
            reason: "unknown extension: expected .npy or .safetensors".into(),
        }),
    }?;
    Ok(Tensor {
        file,
        stamp,
        map,
        start: parsed.start,
        end: parsed.end,
        elem: parsed.elem,
        shape: parsed.shape,
        name: parsed.name,
    })
}

/// Where a tensor lies in its file, as a header says.
struct Parsed {
    start: usize,
    end: usize,
    elem: ElemType,
    shape: Vec<usize>,
    name: String,
}

/// EINVAL: what `madvise` returns for an advice the kernel does not know.
#[cfg(target_os = "linux")]
const fn libc_einval() -> i32 {
    22
}

#[cfg(unix)]
fn read_exact_at(file: &std::fs::File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, at)
}

#[cfg(windows)]
fn read_exact_at(file: &std::fs::File, mut buf: &mut [u8], mut at: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(file, buf, at)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                at += n as u64;
            }
        }
    }
    Ok(())
}

fn open_npy(map: &[u8], path: &str) -> Result<Parsed> {
    let bad = |reason: String| Error::File { path: path.to_string(), reason };
    if map.len() < 10 || &map[..6] != b"\x93NUMPY" {
        return Err(bad("not a .npy file (bad magic)".into()));
    }
    let (header_len, header_start) = match map[6] {
        1 => (usize::from(u16::from_le_bytes([map[8], map[9]])), 10),
        2 | 3 if map.len() >= 12 => (u32::from_le_bytes([map[8], map[9], map[10], map[11]]) as usize, 12),
        v => return Err(bad(format!("unsupported .npy version {v}"))),
    };
    let data_start = header_start + header_len;
    if data_start > map.len() {
        return Err(bad(format!("header of {header_len} bytes runs past the end of the {}-byte file", map.len())));
    }
    let header =
        std::str::from_utf8(&map[header_start..data_start]).map_err(|_| bad("header is not valid text".into()))?;
    let descr = dict_str(header, "descr").ok_or_else(|| bad("header has no 'descr'".into()))?;
    let elem = match descr {
        "<f4" => ElemType::F32,
        "<f2" => ElemType::F16,
        "<i8" => ElemType::I64,
        "<i4" => ElemType::I32,
        "<u4" => ElemType::U32,
        other => {
            return Err(bad(format!("dtype '{other}' is not supported (logits: <f4, <f2; targets: <i8, <i4, <u4)")))
        }
    };
    match dict_raw(header, "fortran_order") {
        Some(v) if v.starts_with("False") => {}
        Some(v) if v.starts_with("True") => return Err(bad("Fortran-order arrays are not supported".into())),
        _ => return Err(bad("header has no valid 'fortran_order'".into())),
    }
    let shape =
        dict_raw(header, "shape").and_then(parse_shape).ok_or_else(|| bad("header has no valid 'shape'".into()))?;
    let want = shape
        .iter()
        .try_fold(elem.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    let have = map.len() - data_start;
    if have != want {
        return Err(bad(format!(
            "shape {shape:?} of {descr} needs {want} data bytes, the file has {have}{}",
            if have < want { " (truncated?)" } else { "" }
        )));
    }
    Ok(Parsed { end: map.len(), start: data_start, elem, shape, name: path.to_string() })
}

/// The text after `'key':` in a Python dict literal, trimmed at the start.
fn dict_raw<'h>(header: &'h str, key: &str) -> Option<&'h str> {
    let pat = format!("'{key}':");
    let at = header.find(&pat)? + pat.len();
    Some(header[at..].trim_start())
}

/// A quoted string value in a Python dict literal.
fn dict_str<'h>(header: &'h str, key: &str) -> Option<&'h str> {
    let rest = dict_raw(header, key)?.strip_prefix('\'')?;
    Some(&rest[..rest.find('\'')?])
}

/// `(2, 3)`, `(5,)` or `()`.
fn parse_shape(raw: &str) -> Option<Vec<usize>> {
    let inner = raw.strip_prefix('(')?;
    let inner = &inner[..inner.find(')')?];
    inner.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse().ok()).collect()
}

fn open_safetensors(map: &[u8], path: &str, key: Option<&str>, default_keys: &[&str]) -> Result<Parsed> {
    let bad = |reason: String| Error::File { path: path.to_string(), reason };
    // read_metadata rejects headers over 100 MB and headers longer than the file before
    // reading them, so an absurd header length costs nothing.
    let (n, meta) = safetensors::SafeTensors::read_metadata(map).map_err(|e| bad(format!("bad .safetensors: {e}")))?;
    let names = meta.offset_keys();
    let name = match key {
        Some(k) => k.to_string(),
        None if names.len() == 1 => names[0].clone(),
        None => default_keys
            .iter()
            .find(|k| names.iter().any(|n| n == *k))
            .map(|k| k.to_string())
            .ok_or_else(|| bad(format!("holds tensors {names:?}: say which with a key (tried {default_keys:?})")))?,
    };
    let info = meta.info(&name).ok_or_else(|| bad(format!("no tensor '{name}' (it holds {names:?})")))?;
    use safetensors::Dtype as D;
    let elem = match info.dtype {
        D::F32 => ElemType::F32,
        D::F16 => ElemType::F16,
        D::BF16 => ElemType::BF16,
        D::I64 => ElemType::I64,
        D::I32 => ElemType::I32,
        D::U32 => ElemType::U32,
        other => {
            return Err(bad(format!(
                "tensor '{name}' has dtype {other:?}, not supported (logits: F32, F16, BF16; targets: I64, I32, U32)"
            )))
        }
    };
    let start = 8 + n + info.data_offsets.0;
    let end = 8 + n + info.data_offsets.1;
    Ok(Parsed { start, end, elem, shape: info.shape.clone(), name: format!("{path}: tensor '{name}'") })
}

/// Writes a little-endian `<f4` `.npy` file atomically.
///
/// # Errors
/// [`Error::Io`] on any write failure.
pub fn write_npy_f32(path: &Path, data: &[f32]) -> Result<()> {
    write_npy(path, "<f4", &[data.len()], bytemuck::cast_slice(data))
}

/// Writes a `.npy` file of dtype `descr` (such as `<f4`, `<i8`) and `shape` from raw
/// little-endian bytes, atomically (see [`write_atomic`]).
///
/// # Errors
/// [`Error::Io`] on any write failure.
pub fn write_npy(path: &Path, descr: &str, shape: &[usize], bytes: &[u8]) -> Result<()> {
    stage_npy(path, descr, shape, bytes)?.finish()
}

/// [`write_npy`] without the final rename: the file is written under its temporary name, and
/// appears at `path` when the returned writer is finished (see [`commit_all`]).
///
/// # Errors
/// [`Error::Io`] on any write failure.
pub fn stage_npy(path: &Path, descr: &str, shape: &[usize], bytes: &[u8]) -> Result<AtomicWriter> {
    let mut w = AtomicWriter::create(path)?;
    w.write(&npy_header(descr, shape))?;
    w.write(bytes)?;
    Ok(w)
}

/// The header of a version 1.0 `.npy` file, padded so the data starts on a 64-byte boundary.
pub fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let dims = if shape.len() == 1 { format!("{},", dims[0]) } else { dims.join(", ") };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    let total = (10 + header.len() + 1).next_multiple_of(64);
    header.push_str(&" ".repeat(total - 10 - header.len() - 1));
    header.push('\n');
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out
}

/// The header of a `.safetensors` file holding one tensor `name` of `dtype` (`F32`, `BF16`, …)
/// and `shape`; the data (`bytes` long) follows it directly.
pub fn safetensors_header(name: &str, dtype: &str, shape: &[usize], bytes: usize) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut json =
        format!("{{\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[0,{bytes}]}}}}", dims.join(","));
    // Pad with spaces so the data is 8-byte aligned, as the format recommends.
    while (8 + json.len()) % 8 != 0 {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out
}

/// A file that appears at its path only once complete: written under a temporary name beside
/// it, renamed by [`AtomicWriter::finish`], removed if dropped before that.
#[derive(Debug)]
pub struct AtomicWriter {
    path: std::path::PathBuf,
    tmp: std::path::PathBuf,
    file: Option<std::io::BufWriter<std::fs::File>>,
}

impl AtomicWriter {
    /// Starts writing `path`.
    ///
    /// # Errors
    /// [`Error::Io`] naming `path` if the temporary file cannot be created.
    pub fn create(path: &Path) -> Result<Self> {
        let io = |error| Error::Io { path: path.display().to_string(), error };
        let name = path.file_name().ok_or_else(|| io(std::io::Error::other("not a file name")))?;
        // Unique per process and per writer, and never an existing file: two writers aimed at
        // the same path cannot share (and truncate) one temporary file.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_file_name(format!(".{}.tmp{}-{n}", name.to_string_lossy(), std::process::id()));
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io)?;
        Ok(AtomicWriter { path: path.to_path_buf(), tmp, file: Some(std::io::BufWriter::with_capacity(1 << 20, file)) })
    }

    fn io(&self, error: std::io::Error) -> Error {
        Error::Io { path: self.path.display().to_string(), error }
    }

    /// Appends bytes.
    ///
    /// # Errors
    /// [`Error::Io`] naming the final path.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        match self.file.as_mut() {
            Some(f) => f.write_all(bytes).map_err(|e| self.io(e)),
            None => Err(self.io(std::io::Error::other("already finished"))),
        }
    }

    /// Flushes and syncs the temporary file, so that only the rename is left to do.
    ///
    /// # Errors
    /// [`Error::Io`] naming the final path.
    pub fn sync(&mut self) -> Result<()> {
        use std::io::Write;
        let done = match self.file.as_mut() {
            Some(f) => f.flush().and_then(|()| f.get_ref().sync_all()),
            None => Err(std::io::Error::other("already finished")),
        };
        done.map_err(|e| self.io(e))
    }

    /// Flushes, syncs and renames the file into place.
    ///
    /// # Errors
    /// [`Error::Io`] naming the final path; the temporary file is removed.
    pub fn finish(mut self) -> Result<()> {
        self.sync()?;
        self.file = None;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| {
            let _ = std::fs::remove_file(&self.tmp);
            self.io(e)
        })
    }
}

/// Finishes several files together: every one is synced before any is renamed, so a failure
/// (a full disk, say) leaves none of them at their paths rather than some.
///
/// # Errors
/// The first [`Error::Io`]; every temporary file not yet renamed is removed.
pub fn commit_all(mut writers: Vec<AtomicWriter>) -> Result<()> {
    for w in &mut writers {
        w.sync()?;
    }
    writers.into_iter().try_for_each(AtomicWriter::finish)
}

impl Drop for AtomicWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to a temporary file in the same directory, then renames it over `path`,
/// so that `path` only ever appears complete.
///
/// # Errors
/// [`Error::Io`] naming `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    stage(path, bytes)?.finish()
}

/// [`write_atomic`] without the final rename (see [`commit_all`]).
///
/// # Errors
/// [`Error::Io`] naming `path`.
pub fn stage(path: &Path, bytes: &[u8]) -> Result<AtomicWriter> {
    let mut w = AtomicWriter::create(path)?;
    w.write(bytes)?;
    Ok(w)
}
