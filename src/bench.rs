//! Measuring the kernel on data already resident on the device, the way an engine calls it.

use crate::error::{Error, Result};
use crate::gpu::{read_buffer, EncodeJob, GpuContext, ROW_LOSS_BYTES};
use crate::problem::{Logits, RowLoss, IGNORED_TARGET};

/// Logits, targets and outputs uploaded once, ready to be scored again and again.
#[derive(Debug)]
pub struct Resident<'c> {
    ctx: &'c GpuContext,
    logits: wgpu::Buffer,
    targets: wgpu::Buffer,
    output: wgpu::Buffer,
    readback: wgpu::Buffer,
    rows: u64,
    vocab: u32,
    dtype: crate::Dtype,
    timer: Option<Timer>,
}

#[derive(Debug)]
struct Timer {
    queries: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    read: wgpu::Buffer,
}

/// One timed run.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Seconds from submit to the device being idle again, measured on the host.
    pub wall: f64,
    /// Seconds between the compute pass's start and end timestamps, when the device has them.
    pub kernel: Option<f64>,
}

impl<'c> Resident<'c> {
    /// Uploads `logits` and validated `targets` (see [`crate::validate_targets`]) to the device.
    ///
    /// # Errors
    /// [`Error::Shape`] when the logits exceed the device's largest buffer; [`Error::Gpu`] on a device error.
    pub fn new(ctx: &'c GpuContext, logits: Logits<'_>, targets: &[u32]) -> Result<Self> {
        let device = ctx.device();
        let bytes = logits.bytes();
        let size = (bytes.len() as u64).next_multiple_of(4).max(4);
        if size > device.limits().max_buffer_size {
            return Err(Error::Shape(format!(
                "{size} bytes of logits exceed this device's largest buffer ({} bytes)",
                device.limits().max_buffer_size
            )));
        }
        let make = |label, size: u64, usage| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: size.max(16),
                usage,
                mapped_at_creation: false,
            })
        };
        use wgpu::BufferUsages as U;
        let rows = logits.rows() as u64;
        let buf = make("xent resident logits", size, U::STORAGE | U::COPY_DST);
        // Upload in pieces so the staging memory stays bounded.
        const PIECE: usize = 64 << 20;
        for (i, piece) in bytes.chunks(PIECE).enumerate() {
            let mut padded;
            let data = if piece.len() % 4 == 0 {
                piece
            } else {
                padded = piece.to_vec();
                padded.resize(piece.len().next_multiple_of(4), 0);
                &padded[..]
            };
            ctx.queue().write_buffer(&buf, (i * PIECE) as u64, data);
            ctx.queue().submit([]);
        }
        let targets_buf = make("xent resident targets", rows * 4, U::STORAGE | U::COPY_DST);
        ctx.queue().write_buffer(&targets_buf, 0, bytemuck::cast_slice(targets));
        let output = make("xent resident output", rows * ROW_LOSS_BYTES, U::STORAGE | U::COPY_SRC);
        let readback = make("xent resident readback", rows * ROW_LOSS_BYTES, U::MAP_READ | U::COPY_DST);
        let timer = device.features().contains(wgpu::Features::TIMESTAMP_QUERY).then(|| Timer {
            queries: device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("xent timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            }),
            resolve: make("xent timestamp resolve", 16, U::QUERY_RESOLVE | U::COPY_SRC),
            read: make("xent timestamp read", 16, U::MAP_READ | U::COPY_DST),
        });
        Ok(Resident {
            ctx,
            logits: buf,
            targets: targets_buf,
            output,
            readback,
            rows,
            vocab: logits.vocab() as u32,
            dtype: logits.dtype(),
            timer,
        })
    }

    /// Bytes of logits one run reads.
    pub fn logits_bytes(&self) -> u64 {
        self.rows * u64::from(self.vocab) * self.dtype.size() as u64
    }

    fn job(&self) -> EncodeJob<'_> {
        EncodeJob {
            logits: &self.logits,
            logits_offset: 0,
            dtype: self.dtype,
            row_stride: u64::from(self.vocab),
            rows: self.rows,
            vocab: self.vocab,
            targets: &self.targets,
            targets_offset: 0,
            ignore: Some(IGNORED_TARGET),
            output: &self.output,
            output_offset: 0,
        }
    }

    /// Runs the kernel once and waits for it.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn run(&self) -> Result<Timing> {
        let device = self.ctx.device();
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("xent bench") });
        let writes = self.timer.as_ref().map(|t| wgpu::ComputePassTimestampWrites {
            query_set: &t.queries,
            beginning_of_pass_write_index: Some(0),
            end_of_pass_write_index: Some(1),
        });
        self.ctx.encode_timed(&mut encoder, &self.job(), writes)?;
        if let Some(t) = &self.timer {
            encoder.resolve_query_set(&t.queries, 0..2, &t.resolve, 0);
            encoder.copy_buffer_to_buffer(&t.resolve, 0, &t.read, 0, 16);
        }
        let start = std::time::Instant::now();
        self.ctx.queue().submit([encoder.finish()]);
        device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Gpu(e.to_string()))?;
        let wall = start.elapsed().as_secs_f64();
        let kernel = match &self.timer {
            Some(t) => {
                let mut ticks = [0u64; 2];
                read_buffer(device, &t.read, 16, bytemuck::cast_slice_mut(&mut ticks))?;
                let period = f64::from(self.ctx.queue().get_timestamp_period());
                Some(ticks[1].saturating_sub(ticks[0]) as f64 * period * 1e-9)
            }
            None => None,
        };
        Ok(Timing { wall, kernel })
    }

    /// Reads back the results of the last run.
    ///
    /// # Errors
    /// [`Error::Gpu`] on a device error.
    pub fn results(&self) -> Result<Vec<RowLoss>> {
        if self.rows == 0 {
            return Ok(Vec::new());
        }
        let mut encoder = self.ctx.device().create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(&self.output, 0, &self.readback, 0, self.rows * ROW_LOSS_BYTES);
        self.ctx.queue().submit([encoder.finish()]);
        let mut out = vec![RowLoss { nll: 0.0, lse: 0.0, argmax: 0, flags: 0 }; self.rows as usize];
        read_buffer(self.ctx.device(), &self.readback, self.rows * ROW_LOSS_BYTES, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }
}

/// Median of a non-empty list of seconds (NaN when empty).
pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}
