//! `xent info`: the adapter, backend, features and the limits the kernels plan with, and every
//! adapter `XENT_ADAPTER` can pick.

use anyhow::Result;
use xent::{Dtype, GpuContext};

/// `xent info` takes no flags.
#[derive(clap::Args)]
pub struct InfoArgs {}

/// Runs `xent info`.
///
/// # Errors
/// No GPU adapter, or a device that cannot be created.
pub fn run(_: &InfoArgs) -> Result<()> {
    let all = xent::adapters();
    let ctx = GpuContext::new()?;
    let i = ctx.adapter_info();
    let l = ctx.device().limits();
    let f = ctx.device().features();
    println!("adapter        {}", i.name);
    println!("backend        {:?} ({:?})", i.backend, i.device_type);
    println!("driver         {} {}", i.driver, i.driver_info);
    println!("subgroup size  {}..{}", i.subgroup_min_size, i.subgroup_max_size);
    println!(
        "features       SUBGROUP {}, TIMESTAMP_QUERY {}, SHADER_F16 {} (f16/bf16 logits are unpacked in core WGSL, no feature needed)",
        f.contains(wgpu::Features::SUBGROUP),
        f.contains(wgpu::Features::TIMESTAMP_QUERY),
        f.contains(wgpu::Features::SHADER_F16),
    );
    println!("max storage binding          {} bytes", l.max_storage_buffer_binding_size);
    println!("max buffer                   {} bytes", l.max_buffer_size);
    println!("storage offset alignment     {} bytes", l.min_storage_buffer_offset_alignment);
    println!("workgroup storage            {} bytes", l.max_compute_workgroup_storage_size);
    println!("workgroups per dimension     {}", l.max_compute_workgroups_per_dimension);
    println!("kernel workgroup size        {}", ctx.workgroup_size());
    for (dtype, vocab) in [(Dtype::F32, 128_256), (Dtype::BF16, 128_256), (Dtype::F32, 1_000_000)] {
        println!(
            "rows per chunk {dtype:>4} x {vocab:<9} {}",
            ctx.rows_per_chunk(dtype, vocab, vocab).map_or_else(|e| e.to_string(), |n| n.to_string())
        );
    }
    println!("adapters (XENT_ADAPTER=N opens the N-th; unset, the best):");
    for (n, a) in all.iter().enumerate() {
        let bus = if a.device_pci_bus_id.is_empty() { String::new() } else { format!(", PCI {}", a.device_pci_bus_id) };
        println!("  {n}  {} ({:?}, {:?}{bus})", a.name, a.backend, a.device_type);
    }
    Ok(())
}
