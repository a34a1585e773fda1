//! Where work runs: the `--device auto|gpu|cpu` choice every front end (CLI, Python) shares.

use crate::error::{Error, Result};
use crate::gpu::GpuContext;

/// Where to run, as `--device` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceChoice {
    /// The GPU when a hardware adapter exists, else the CPU ([`auto`]).
    #[default]
    Auto,
    /// The GPU, whatever adapter it is (a software one included); an error when there is none.
    Gpu,
    /// The fast CPU path.
    Cpu,
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "gpu" => Ok(DeviceChoice::Gpu),
            "cpu" => Ok(DeviceChoice::Cpu),
            _ => Err(Error::Argument(format!("unknown device '{s}': expected auto, gpu or cpu"))),
        }
    }
}

/// The GPU context, or `None` for the CPU, as `choice` asks (`Auto` as [`auto`] decides).
///
/// # Errors
/// [`DeviceChoice::Gpu`] with no adapter, or a device that cannot be created.
pub fn pick(choice: DeviceChoice) -> Result<Option<GpuContext>> {
    match choice {
        DeviceChoice::Cpu => Ok(None),
        DeviceChoice::Gpu => GpuContext::new().map(Some),
        DeviceChoice::Auto => Ok(auto()),
    }
}

/// What `--device auto` runs on, said on stderr with the reason: the GPU when a hardware adapter
/// exists, else the CPU. A software adapter (lavapipe, llvmpipe, SwiftShader: `DeviceType::Cpu`)
/// is passed over, because it runs the kernels on the same cores far slower than the CPU path
/// (2048 x 128256 f32: 1.13 s on lavapipe, 0.09 s on the CPU path); `--device gpu` still uses it.
/// Every front end decides through this one function.
pub fn auto() -> Option<GpuContext> {
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
