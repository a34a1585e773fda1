//! What the `xent` commands share: device picking, input expansion, output kinds and staging,
//! the progress bar and the summary's human and JSON forms. One module per command beside it.

pub mod bench;
pub mod demo;
pub mod gen;
pub mod info;
pub mod kld;
pub mod kld_base;
pub mod merge;
pub mod score;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::ValueEnum;
use xent::{Dtype, GpuContext};

/// `--device` of the commands that score: where to run.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DeviceArg {
    Auto,
    Gpu,
    Cpu,
}

/// `--dtype` of the commands that generate logits.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DtypeArg> for Dtype {
    fn from(d: DtypeArg) -> Dtype {
        match d {
            DtypeArg::F32 => Dtype::F32,
            DtypeArg::F16 => Dtype::F16,
            DtypeArg::Bf16 => Dtype::BF16,
        }
    }
}

/// The GPU context, or `None` for the CPU, as `--device` asks ([`xent::device::pick`]).
///
/// # Errors
/// `--device gpu` with no adapter, or a device that cannot be created.
pub(crate) fn pick_device(device: DeviceArg) -> Result<Option<GpuContext>> {
    let choice = match device {
        DeviceArg::Auto => xent::device::DeviceChoice::Auto,
        DeviceArg::Gpu => xent::device::DeviceChoice::Gpu,
        DeviceArg::Cpu => xent::device::DeviceChoice::Cpu,
    };
    xent::device::pick(choice).context("--device gpu")
}

/// What `--device auto` runs on ([`xent::device::auto`]).
pub(crate) fn auto_device() -> Option<GpuContext> {
    xent::device::auto()
}

/// Fails unless the output `p` given to `flag` has one of the `allowed` formats: checked before any
/// work, so a typo costs nothing.
///
/// # Errors
/// An unknown extension, or one the flag does not write.
pub(crate) fn check_output(p: &Option<PathBuf>, flag: &str, allowed: &[Kind]) -> Result<()> {
    match p {
        Some(p) if !allowed.contains(&output_kind(p)?) => {
            bail!("{}: {flag} writes {}", p.display(), allowed.iter().map(|k| k.ext()).collect::<Vec<_>>().join(" or "))
        }
        _ => Ok(()),
    }
}

/// Output formats, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Npy,
    Safetensors,
    Jsonl,
    Json,
}

impl Kind {
    /// The extension, with its dot.
    pub(crate) fn ext(self) -> &'static str {
        match self {
            Kind::Npy => ".npy",
            Kind::Safetensors => ".safetensors",
            Kind::Jsonl => ".jsonl",
            Kind::Json => ".json",
        }
    }
}

/// The output format a path's extension names.
///
/// # Errors
/// An extension that is none of them.
pub(crate) fn output_kind(p: &Path) -> Result<Kind> {
    match p.extension().and_then(|e| e.to_str()) {
        Some("npy") => Ok(Kind::Npy),
        Some("safetensors") => Ok(Kind::Safetensors),
        Some("jsonl") => Ok(Kind::Jsonl),
        Some("json") => Ok(Kind::Json),
        _ => bail!("{}: unknown output extension (expected .npy, .safetensors, .jsonl or .json)", p.display()),
    }
}

/// Paths, globs and directories to a sorted, non-empty list of files ([`xent::io::expand`]).
///
/// # Errors
/// As [`xent::io::expand`].
pub(crate) fn expand(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    Ok(xent::io::expand(args)?)
}

/// A byte-counting progress bar on stderr, or a hidden one when not `visible`.
pub(crate) fn progress_bar(total: u64, visible: bool) -> indicatif::ProgressBar {
    if !visible {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg} ETA {eta}")
    {
        bar.set_style(style);
    }
    bar
}

/// Refuses two output flags naming one file (one would silently replace the other).
///
/// # Errors
/// Two flags naming the same file.
pub(crate) fn distinct_outputs(outputs: &[(&str, Option<&Path>)]) -> Result<()> {
    let given: Vec<(&str, PathBuf)> = outputs
        .iter()
        .filter_map(|(flag, p)| p.map(|p| (*flag, std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()))))
        .collect();
    for (i, (flag, p)) in given.iter().enumerate() {
        if let Some((other, _)) = given[..i].iter().find(|(_, q)| q == p) {
            bail!("{}: {other} and {flag} name the same file", p.display());
        }
    }
    Ok(())
}

/// Stages a `.safetensors` file of `(name, dtype, shape, bytes)` tensors, for [`xent::io::commit_all`].
///
/// # Errors
/// A tensor whose bytes do not match its shape, or a file that cannot be written.
pub(crate) fn stage_safetensors(
    path: &Path,
    tensors: &[(&str, safetensors::Dtype, Vec<usize>, &[u8])],
) -> Result<xent::io::AtomicWriter> {
    let views = tensors
        .iter()
        .map(|(name, d, shape, b)| Ok((name.to_string(), safetensors::tensor::TensorView::new(*d, shape.clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let bytes = safetensors::serialize(views, None).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    Ok(xent::io::stage(path, &bytes)?)
}

/// JSON number, or null where JSON has none (NaN, ±inf).
pub(crate) fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}
