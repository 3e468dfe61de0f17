//! understory: `Memory::create_buffer` (category instances, `MemoryLocation::CpuToGpu`, default
//! block sizes and size-class cache), `Context::retire` at the timeline value of the submission
//! that used the buffer, and `Context::begin_frame` (throttle to 2 frames in flight, collect,
//! budget refresh) every frame.
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
use understory::policy::category::{Category, PerCategory};

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
    let mut ctx = context(
        name,
        MemoryConfig {
            cap_bytes: PerCategory([u64::MAX; 4]),
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
    let mut ring = FrameRing::new(&ctx).map_err(|e| anyhow!("FrameRing: {e}"))?;
    let fif = u64::from(ctx.frames_in_flight());
    // Each buffer with the timeline value of the submission that used it.
    let mut live: VecDeque<(Buffer, u64)> = VecDeque::new();
    let mut timings = Timings::default();
    let mut peaks = Peaks::default();

    let run = (|| -> Result<()> {
        for f in 0..w.frames {
            let slot = f % FRAMES_IN_FLIGHT;
            let t0 = Instant::now();
            // The throttle begin_frame would do, outside the allocator timing.
            let last = ctx.timeline().last_submitted();
            let must_have = (last + 1).saturating_sub(fif);
            if must_have > 0 && !ctx.timeline().wait(must_have, Duration::from_secs(10))? {
                return Err(anyhow!("frame throttle: timeline wait timed out"));
            }
            let wait_t = t0.elapsed();
            let mut alloc_t = Duration::ZERO;
            let a = Instant::now();
            ctx.begin_frame()?;
            alloc_t += a.elapsed();
            let cmd = ring.begin(&ctx)?;
            let first_new = live.len();
            for (i, &size) in w.frame_sizes(f).iter().enumerate() {
                let a = Instant::now();
                let mut b = ctx.memory().create_buffer(&desc(size))?;
                alloc_t += a.elapsed();
                let mapped = b
                    .mapped_mut()
                    .ok_or_else(|| anyhow!("CpuToGpu buffer is not mapped"))?;
                mapped.copy_from_slice(&w.fill[..size as usize]);
                // SAFETY: cmd is recording; both buffers are live and from this device; b is
                // at least 256 bytes.
                unsafe { record_use(ctx.device(), cmd, b.raw(), sinks[slot].buffer, i) };
                live.push_back((b, 0));
            }
            let value = ring.submit(&ctx, cmd)?;
            for entry in live.iter_mut().skip(first_new) {
                entry.1 = value;
            }
            let a = Instant::now();
            for _ in 0..w.to_release(live.len()) {
                if let Some((b, used)) = live.pop_front() {
                    ctx.retire(b, used)?;
                }
            }
            alloc_t += a.elapsed();
            timings.push(w, f, t0.elapsed(), wait_t, alloc_t);
            peaks.sample(reserved(&ctx), base.delta());
        }
        Ok(())
    })();

    // Leak check (and the error path's cleanup): retire the rest, wait, collect.
    let last = ctx.timeline().last_submitted();
    let mut cleanup: Result<()> = Ok(());
    for (b, used) in live {
        // Buffers of a frame that failed before its submission carry 0: never used.
        if let Err(e) = ctx.retire(b, used.min(last)) {
            cleanup = Err(e.into());
        }
    }
    let idle = ctx
        .timeline()
        .wait(last, Duration::from_secs(30))
        .map_err(anyhow::Error::from)
        // SAFETY: waiting for our own device (nothing else submits to it here).
        .and_then(|_| unsafe { ctx.device().device_wait_idle() }.context("vkDeviceWaitIdle"));
    ctx.collect()?;
    let reserved_after_release = reserved(&ctx);
    let driver_delta_after_release = base.delta();
    ctx.memory().flush_cache();
    ctx.memory().release_empty_blocks()?;
    let reserved_after_trim = reserved(&ctx);
    let memory = memory_type(&ctx);
    if idle.is_ok() {
        ring.destroy(&ctx)?;
        for s in sinks {
            // SAFETY: the device is idle.
            unsafe { s.destroy(ctx.device()) };
        }
    }
    let report = ctx.shutdown();
    drop(ctx);
    run?;
    idle?;
    cleanup?;
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
            "frees: Context::retire at the submission's timeline value; begin_frame collects"
                .into(),
            "reserved after release includes the size-class cache (16 MiB for instances by default) and the block gpu-allocator keeps; 'after trim' is after flush_cache + release_empty_blocks".into(),
        ],
        ..Default::default()
    })
}

pub fn budget(name: &str, w: &Workload, probe: Option<&Probe>) -> Result<BudgetResult> {
    let base = Baseline::new(probe);
    let mut memory = MemoryConfig {
        cap_bytes: PerCategory([u64::MAX; 4]),
        ..Default::default()
    };
    memory.cap_bytes[Category::Instances] = w.budget;
    let mut ctx = context(name, memory)?;
    let mut held = Vec::new();
    let mut allocated = 0;
    let mut failure = None;
    while allocated < w.hard_stop() {
        match ctx.memory().create_buffer(&desc(w.budget_step)) {
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
    for b in held {
        // Nothing was submitted: value 0 is complete.
        ctx.retire(b, 0)?;
    }
    ctx.collect()?;
    let report = ctx.shutdown();
    drop(ctx);
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
        // The cap counts live bytes; what is reserved past it is the unused rest of the last
        // block (host-visible blocks grow 8 → 16 → 32 MiB by default).
        variant: "MemoryConfig::cap_bytes[Instances] = B (counts live bytes)".into(),
        outcome,
        error,
        allocated,
        reserved: Some(reserved),
        driver_delta,
    })
}
