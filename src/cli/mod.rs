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
use xent::{Dtype, GpuContext, Summary};

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

/// The GPU context, or `None` for the CPU, as `--device` asks (`auto` as [`auto_device`] decides).
///
/// # Errors
/// `--device gpu` with no adapter, or a device that cannot be created.
pub(crate) fn pick_device(device: DeviceArg) -> Result<Option<GpuContext>> {
    match device {
        DeviceArg::Cpu => Ok(None),
        DeviceArg::Gpu => Ok(Some(GpuContext::new().context("--device gpu")?)),
        DeviceArg::Auto => Ok(auto_device()),
    }
}

/// What `--device auto` runs on, said on stderr with the reason: the GPU when a hardware adapter
/// exists, else the CPU. A software adapter (lavapipe, llvmpipe, SwiftShader: `DeviceType::Cpu`)
/// is passed over, because it runs the kernels on the same cores far slower than the CPU path
/// (2048 x 128256 f32: 1.13 s on lavapipe, 0.09 s on the CPU path); `--device gpu` still uses it.
/// Every command with `--device auto` decides through this one function.
pub(crate) fn auto_device() -> Option<GpuContext> {
    match GpuContext::new() {
        Ok(ctx) if ctx.adapter_info().device_type == wgpu::DeviceType::Cpu => {
            // The adapter is the high-performance pick, which ranks software renderers last: when
            // it is one, no hardware adapter exists (unless WGPU_ADAPTER_NAME chose it).
            let which = if std::env::var_os("WGPU_ADAPTER_NAME").is_some() { "named" } else { "only" };
            eprintln!(
                "xent: device auto: using the CPU (the {which} GPU adapter, {}, is a software renderer; \
                 --device gpu uses it anyway)",
                ctx.adapter_info().name
            );
            None
        }
        Ok(ctx) => {
            eprintln!("xent: device auto: using the GPU ({})", ctx.adapter_info().name);
            Some(ctx)
        }
        Err(e) => {
            eprintln!("xent: device auto: {e}; using the CPU");
            None
        }
    }
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

/// Paths, globs and directories to a sorted, non-empty list of files.
///
/// # Errors
/// A directory that cannot be listed or holds no input files, a bad or empty glob, or no files at all.
pub(crate) fn expand(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for arg in args {
        let text = arg.to_string_lossy();
        if arg.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(arg)
                .with_context(|| format!("{}: cannot list", arg.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "npy" || e == "safetensors"))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("{}: directory holds no .npy or .safetensors files", arg.display());
            }
            out.extend(files);
        } else if text.contains(['*', '?', '[']) {
            let mut files: Vec<PathBuf> =
                glob::glob(&text).with_context(|| format!("{text}: bad pattern"))?.filter_map(|p| p.ok()).collect();
            files.sort();
            if files.is_empty() {
                bail!("{text}: pattern matches no files");
            }
            out.extend(files);
        } else {
            out.push(arg.clone());
        }
    }
    if out.is_empty() {
        bail!("no files given");
    }
    Ok(out)
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

/// The summary as the human text `score`, `merge` and `demo` print.
pub(crate) fn human_summary(s: &Summary, device: &str, seconds: f64) -> String {
    format!(
        "xent: {} tokens scored, {} ignored, on the {device} in {seconds:.3} s\n  \
         mean nll      {:.6} nats ({:.6} bits/token)\n  \
         perplexity    {:.4} ± {:.4}\n  \
         accuracy      {:.4}\n",
        s.tokens,
        s.ignored,
        s.mean_nll(),
        s.bits_per_token(),
        s.perplexity(),
        s.perplexity_stderr(),
        s.accuracy()
    )
}

/// JSON number, or null where JSON has none (NaN, ±inf).
pub(crate) fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

/// The contract's fields, then the exact sums that make summaries mergeable.
pub(crate) fn json_summary(s: &Summary, device: &str, seconds: f64) -> String {
    format!(
        "{{\"tokens\":{},\"ignored\":{},\"mean_nll\":{},\"bits_per_token\":{},\"perplexity\":{},\"ppl_stderr\":{},\"accuracy\":{},\"device\":\"{device}\",\"seconds\":{},\"correct\":{},\"nan\":{},\"infinite\":{},\"sum_nll_fixed\":\"{}\",\"sum_nll_sq_fixed\":\"{}\"}}",
        s.tokens,
        s.ignored,
        num(s.mean_nll()),
        num(s.bits_per_token()),
        num(s.perplexity()),
        num(s.perplexity_stderr()),
        num(s.accuracy()),
        num(seconds),
        s.correct,
        s.nan,
        s.infinite,
        s.sum_nll_fixed,
        s.sum_nll_sq_fixed
    )
}
