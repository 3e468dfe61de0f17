//! understory: `Context::create_buffer` (category instances, `MemoryLocation::CpuToGpu`,
//! default block sizes and size-class cache), marked used by the frame that reads it and
//! dropped (retired at that frame), and `Context::begin_frame` (throttle to 2 frames in flight,
//! collect, budget refresh) every frame.
//!
//! Budget: the instances category is capped at B (`MemoryConfig::cap_bytes`); past it
//! `create_buffer` returns `Error::OverBudget` and allocates nothing.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow};
use understory::Error;
use understory::gpu::adapter::DeviceSelector;
use understory::gpu::context::{Context, ContextOptions};
use understory::gpu::frame::FrameRing;
use understory::gpu::instance::{InstanceOptions, Validation};
use understory::gpu::memory::{Buffer, BufferDesc, MemoryConfig, MemoryLocation};
use understory::policy::category::{CATEGORIES, Category, PerCategory};

use crate::common::{
    Baseline, BudgetResult, ChurnResult, FRAMES_IN_FLIGHT, Peaks, Probe, Timings, Workload,
    describe_type,
};
use crate::raw::{INSTANCE_USAGE, Sink, record_use, upload_type_for};

pub const NAME: &str = "understory";
pub const VERSION: &str = "(this checkout)";

fn context(name: &str, memory: MemoryConfig) -> Result<Context> {
    Context::new(&ContextOptions {
        instance: InstanceOptions {
            validation: Validation::Off,
            ..Default::default()
        },
        device: Some(DeviceSelector::Name(name.to_lowercase())),
        memory,
        frames_in_flight: FRAMES_IN_FLIGHT as u32,
        ..Default::default()
    })
    .map_err(|e| anyhow!("understory Context::new: {e}"))
}

fn desc(size: u64) -> BufferDesc<'static> {
    BufferDesc {
        name: "instances",
        size,
        usage: INSTANCE_USAGE,
        location: MemoryLocation::CpuToGpu,
        category: Category::Instances,
    }
}

/// Bytes understory holds in `VkDeviceMemory`, every category.
fn reserved(ctx: &Context) -> u64 {
    ctx.memory()
        .stats()
        .categories
        .iter()
        .map(|(_, c)| c.reserved_bytes)
        .sum()
}

fn memory_type(ctx: &Context) -> String {
    // SAFETY: the physical device belongs to the context's instance, which is alive.
    let props = unsafe {
        ctx.instance()
            .get_physical_device_memory_properties(ctx.adapter().handle)
    };
    match upload_type_for(ctx.device(), &props) {
        Ok(t) => describe_type(&props, t),
        Err(e) => format!("unknown ({e})"),
    }
}

pub fn churn(name: &str, w: &Workload, probe: Option<&Probe>) -> Result<ChurnResult> {
    let base = Baseline::new(probe);
    let ctx = context(
        name,
        MemoryConfig {
            cap_bytes: PerCategory([u64::MAX; CATEGORIES]),
            ..Default::default()
        },
    )?;
    // SAFETY: the physical device belongs to the context's instance, which is alive.
    let props = unsafe {
        ctx.instance()
            .get_physical_device_memory_properties(ctx.adapter().handle)
    };
    let mut sinks = Vec::new();
    for _ in 0..FRAMES_IN_FLIGHT {
        sinks.push(Sink::new(ctx.device(), &props, w.sink_bytes())?);
    }
    let ring = FrameRing::new(&ctx).map_err(|e| anyhow!("FrameRing: {e}"))?;
    let fif = u64::from(ctx.frames_in_flight());
    // Each buffer remembers the frame that used it.
    let mut live: VecDeque<Buffer> = VecDeque::new();
    let mut timings = Timings::default();
    let mut peaks = Peaks::default();

    let run = (|| -> Result<()> {
        for f in 0..w.frames {
            let slot = f % FRAMES_IN_FLIGHT;
            let t0 = Instant::now();
            // The throttle begin_frame would do, outside the allocator timing.
            let next = ctx.last_submitted() + 1;
            let must_have = next.saturating_sub(fif);
            if must_have > 0 {
                ctx.wait(must_have, Duration::from_secs(10))?;
            }
            let wait_t = t0.elapsed();
            let mut alloc_t = Duration::ZERO;
            let a = Instant::now();
            let frame = ctx.begin_frame()?;
            alloc_t += a.elapsed();
            let cmd = ring.begin(&frame)?;
            for (i, &size) in w.frame_sizes(f).iter().enumerate() {
                let a = Instant::now();
                let mut b = ctx.create_buffer(&desc(size))?;
                alloc_t += a.elapsed();
                b.mapped_mut()?.copy_from_slice(&w.fill[..size as usize]);
                b.used_in(&frame)?;
                // SAFETY: cmd is recording for `frame`; both buffers are live and from this
                // device (b marked used by the frame, the sink waited before it is destroyed);
                // b is at least 256 bytes.
                unsafe { record_use(ctx.device(), cmd.raw(), b.raw(), sinks[slot].buffer, i) };
                live.push_back(b);
            }
            ring.submit(frame, cmd)?;
            let a = Instant::now();
            for _ in 0..w.to_release(live.len()) {
                // Dropped: retired at the frame that used it.
                drop(live.pop_front());
            }
            alloc_t += a.elapsed();
            timings.push(w, f, t0.elapsed(), wait_t, alloc_t);
            peaks.sample(reserved(&ctx), base.delta());
        }
        Ok(())
    })();

    // Leak check (and the error path's cleanup): drop the rest, wait, collect.
    drop(live);
    let idle = ctx
        .wait(ctx.last_submitted(), Duration::from_secs(30))
        .context("waiting for the last frame");
    ctx.collect()?;
    let reserved_after_release = reserved(&ctx);
    let driver_delta_after_release = base.delta();
    ctx.memory().flush_cache();
    ctx.memory().release_empty_blocks()?;
    let reserved_after_trim = reserved(&ctx);
    let memory = memory_type(&ctx);
    drop(ring);
    if idle.is_ok() {
        for s in sinks {
            // SAFETY: every frame that used the sinks completed (waited above).
            unsafe { s.destroy(ctx.device()) };
        }
    }
    let report = ctx.shutdown()?;
    run?;
    idle?;
    Ok(ChurnResult {
        samples: timings,
        peak_reserved: Some(peaks.reserved),
        peak_driver_delta: peaks.driver,
        reserved_after_release: Some(reserved_after_release),
        reserved_after_trim: Some(reserved_after_trim),
        driver_delta_after_release,
        driver_delta_after_teardown: base.delta(),
        leaked_objects: Some(report.leaks.len() as u64),
        memory,
        notes: vec![
            "frees: each buffer marked used by its frame and dropped; begin_frame collects".into(),
            "reserved after release includes the size-class cache (16 MiB for instances by default) and the block gpu-allocator keeps; 'after trim' is after flush_cache + release_empty_blocks".into(),
        ],
        ..Default::default()
    })
}

pub fn budget(name: &str, w: &Workload, probe: Option<&Probe>) -> Result<BudgetResult> {
    let base = Baseline::new(probe);
    let memory = MemoryConfig {
        cap_bytes: PerCategory([u64::MAX; CATEGORIES]),
        ..Default::default()
    };
    let ctx = context(name, memory)?;
    // The vegetation limit: reserved blocks of instances, atlas and outputs together (what
    // `Vegetation` sets to its budget every frame).
    ctx.memory().set_vegetation_limit(w.budget);
    let mut held = Vec::new();
    let mut allocated = 0;
    let mut failure = None;
    while allocated < w.hard_stop() {
        match ctx.create_buffer(&desc(w.budget_step)) {
            Ok(b) => {
                allocated += b.bytes();
                held.push(b);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let reserved = reserved(&ctx);
    let driver_delta = base.delta();
    // Never used by a frame: freed by the next collect.
    drop(held);
    ctx.collect()?;
    let report = ctx.shutdown()?;
    if !report.leaks.is_empty() {
        return Err(anyhow!("understory leaked {} objects", report.leaks.len()));
    }
    let (outcome, error) = match failure {
        None => ("goes over (hard stop at 2×B)".to_string(), None),
        Some(e @ Error::OverBudget { .. }) => {
            ("refuses (Error::OverBudget)".into(), Some(e.to_string()))
        }
        Some(e @ Error::OutOfDeviceMemory { .. }) => {
            ("fails: out of device memory".into(), Some(e.to_string()))
        }
        Some(e) => ("fails".into(), Some(e.to_string())),
    };
    Ok(BudgetResult {
        // The limit counts reserved blocks: near it, allocations get memory of their own, so
        // nothing is reserved past it.
        variant: "Memory::set_vegetation_limit(B) (counts reserved blocks)".into(),
        outcome,
        error,
        allocated,
        reserved: Some(reserved),
        driver_delta,
    })
}
