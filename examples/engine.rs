//! An inference engine that already holds logits in a `wgpu::Buffer` gets per-row losses
//! through `encode`: its own device, its own encoder, no copy of the logits, and only the
//! 16-byte-per-row results read back.
//!
//! Run: `cargo run --release --example engine`

use anyhow::{Context, Result};
use wgpu::util::DeviceExt;
use xent::{Dtype, EncodeJob, GpuContext, RowLoss, ROW_LOSS_BYTES};

fn main() -> Result<()> {
    pollster::block_on(run())
}

async fn run() -> Result<()> {
    // The engine's device (any device will do; here the default adapter).
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let adapter = instance
        .request_adapter(&wgpu::RequestAdapterOptions::default())
        .await
        .context("no GPU adapter (install a Vulkan driver or mesa-vulkan-drivers)")?;
    let (device, queue) =
        adapter.request_device(&wgpu::DeviceDescriptor { label: Some("engine"), ..Default::default() }).await?;

    // The engine's logits: 4 rows of a padded vocabulary (stride 1024 >= vocab 1000), f32,
    // produced by its last layer and living in a STORAGE buffer.
    let (rows, vocab, stride) = (4usize, 1000usize, 1024usize);
    let mut host = vec![0f32; rows * stride];
    for r in 0..rows {
        for j in 0..vocab {
            host[r * stride + j] = ((j * (r + 3)) % 17) as f32 * 0.25;
        }
    }
    let logits = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("engine logits"),
        contents: bytemuck::cast_slice(&host),
        usage: wgpu::BufferUsages::STORAGE,
    });
    let targets: Vec<u32> = vec![16, 5, u32::MAX, 999]; // u32::MAX: padding, ignored below
    let targets = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
        label: Some("engine targets"),
        contents: bytemuck::cast_slice(&targets),
        usage: wgpu::BufferUsages::STORAGE,
    });
    let out_size = rows as u64 * ROW_LOSS_BYTES;
    let losses = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("engine losses"),
        size: out_size,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("engine readback"),
        size: out_size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });

    // xent borrows the engine's device; the engine keeps its clone.
    let xent = GpuContext::from_device(device.clone(), queue.clone());
    let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("engine step") });
    xent.encode(
        &mut encoder,
        &EncodeJob {
            logits: &logits,
            logits_offset: 0,
            dtype: Dtype::F32,
            row_stride: stride as u64,
            rows: rows as u64,
            vocab: vocab as u32,
            targets: &targets,
            targets_offset: 0,
            ignore: Some(u32::MAX),
            output: &losses,
            output_offset: 0,
        },
    )?;
    encoder.copy_buffer_to_buffer(&losses, 0, &readback, 0, out_size);
    queue.submit([encoder.finish()]);

    let mut out = vec![RowLoss { nll: 0.0, lse: 0.0, argmax: 0, flags: 0 }; rows];
    xent::read_buffer(&device, &readback, out_size, bytemuck::cast_slice_mut(&mut out))?;
    for (r, loss) in out.iter().enumerate() {
        println!(
            "row {r}: nll {:.5} nats, lse {:.5}, argmax {:>4}, {}",
            loss.nll,
            loss.lse,
            loss.argmax,
            if loss.ignored() {
                "ignored"
            } else if loss.correct() {
                "correct"
            } else {
                "wrong"
            }
        );
    }
    Ok(())
}
