//! wgpu 30 (what Bevy uses), Vulkan backend only, default `MemoryHints::Performance`
//! (gpu-allocator 0.28 inside, 128–256 MiB device blocks): `Device::create_buffer` (GPU-only,
//! wgpu picks the memory), `Queue::write_buffer` (wgpu's own staging buffer and copy), one
//! `copy_buffer_to_buffer` per new buffer, `Queue::submit`; old buffers are dropped and wgpu
//! destroys them once the GPU is done, inside `Device::poll`, which runs every frame (as a
//! `Wait` on the submission two frames back, then a non-blocking `Poll`).
//!
//! Budget: wgpu has no budget that can be injected (its `MemoryBudgetThresholds` are a share of
//! the driver's own `VK_EXT_memory_budget` budget, and off by default), so it goes over.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

use crate::common::{
    Baseline, BudgetResult, ChurnResult, FRAMES_IN_FLIGHT, Peaks, Probe, Timings, USE_BYTES,
    Workload,
};

pub const NAME: &str = "wgpu";
pub const VERSION: &str = "30 (Vulkan)";

const INSTANCE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::VERTEX
    .union(wgpu::BufferUsages::STORAGE)
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    errors: Arc<Mutex<Vec<String>>>,
    // Dropped last.
    _adapter: wgpu::Adapter,
    _instance: wgpu::Instance,
}

impl Gpu {
    fn open(name: &str) -> Result<Self> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
        desc.backends = wgpu::Backends::VULKAN;
        desc.flags = wgpu::InstanceFlags::empty();
        let instance = wgpu::Instance::new(desc);
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::VULKAN));
        let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
        let adapter = adapters
            .into_iter()
            .find(|a| a.get_info().name.eq_ignore_ascii_case(name))
            .ok_or_else(|| anyhow!("wgpu: no Vulkan adapter named {name:?} (found {names:?})"))?;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("understory-peers"),
            required_limits: adapter.limits(),
            memory_hints: wgpu::MemoryHints::Performance,
            ..Default::default()
        }))
        .map_err(|e| anyhow!("wgpu request_device: {e}"))?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let sink = errors.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            sink.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(e.to_string());
        }));
        Ok(Self {
            device,
            queue,
            errors,
            _adapter: adapter,
            _instance: instance,
        })
    }

    fn reserved(&self) -> Option<u64> {
        self.device
            .generate_allocator_report()
            .map(|r| r.total_reserved_bytes)
    }

    fn check_errors(&self) -> Result<()> {
        let errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        match errors.first() {
            Some(first) => Err(anyhow!(
                "wgpu reported {} error(s), first: {first}",
                errors.len()
            )),
            None => Ok(()),
        }
    }

    fn wait_idle(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| anyhow!("wgpu poll(wait): {e}"))
    }
}

pub fn churn(name: &str, w: &Workload, probe: Option<&Probe>) -> Result<ChurnResult> {
    let base = Baseline::new(probe);
    let gpu = Gpu::open(name)?;
    let (device, queue) = (&gpu.device, &gpu.queue);
    let sinks: Vec<wgpu::Buffer> = (0..FRAMES_IN_FLIGHT)
        .map(|_| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("sink"),
                size: w.sink_bytes(),
                usage: wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        })
        .collect();
    let mut live: VecDeque<wgpu::Buffer> = VecDeque::new();
    let mut submissions: VecDeque<wgpu::SubmissionIndex> = VecDeque::new();
    let mut timings = Timings::default();
    let mut peaks = Peaks::default();

    for f in 0..w.frames {
        let slot = f % FRAMES_IN_FLIGHT;
        let t0 = Instant::now();
        // Throttle to 2 frames in flight (a swapchain would do this); wgpu also frees here.
        if submissions.len() >= FRAMES_IN_FLIGHT
            && let Some(idx) = submissions.pop_front()
        {
            device
                .poll(wgpu::PollType::Wait {
                    submission_index: Some(idx),
                    timeout: Some(Duration::from_secs(10)),
                })
                .map_err(|e| anyhow!("wgpu poll(wait): {e}"))?;
        }
        let wait_t = t0.elapsed();
        let mut alloc_t = Duration::ZERO;
        let a = Instant::now();
        device
            .poll(wgpu::PollType::Poll)
            .map_err(|e| anyhow!("wgpu poll: {e}"))?;
        alloc_t += a.elapsed();
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("frame"),
        });
        for (i, &size) in w.frame_sizes(f).iter().enumerate() {
            let a = Instant::now();
            let b = device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("instances"),
                size,
                usage: INSTANCE_USAGE,
                mapped_at_creation: false,
            });
            alloc_t += a.elapsed();
            queue.write_buffer(&b, 0, &w.fill[..size as usize]);
            encoder.copy_buffer_to_buffer(&b, 0, &sinks[slot], i as u64 * USE_BYTES, USE_BYTES);
            live.push_back(b);
        }
        submissions.push_back(queue.submit([encoder.finish()]));
        let a = Instant::now();
        for _ in 0..w.to_release(live.len()) {
            drop(live.pop_front());
        }
        alloc_t += a.elapsed();
        timings.push(w, f, t0.elapsed(), wait_t, alloc_t);
        peaks.sample(gpu.reserved().unwrap_or(0), base.delta());
    }
    gpu.check_errors()?;

    // Leak check: drop everything, wait for the device, let wgpu free.
    drop(live);
    drop(sinks);
    gpu.wait_idle()?;
    gpu.wait_idle()?;
    let reserved_after_release = gpu.reserved();
    let driver_delta_after_release = base.delta();
    let has_report = reserved_after_release.is_some();
    drop(gpu);
    Ok(ChurnResult {
        samples: timings,
        peak_reserved: has_report.then_some(peaks.reserved),
        peak_driver_delta: peaks.driver,
        reserved_after_release,
        driver_delta_after_release,
        driver_delta_after_teardown: base.delta(),
        memory: "wgpu's choice: GPU-only buffers; write_buffer through wgpu's staging buffers"
            .into(),
        notes: vec![
            "frees: drop; wgpu destroys a buffer at once when no pending submission holds it, else in Device::poll (the throttling poll(Wait) counts as wait, not CPU time)".into(),
            "reserved includes wgpu's staging buffers and the two 16 KiB copy targets".into(),
        ],
        ..Default::default()
    })
}

pub fn budget(name: &str, w: &Workload, probe: Option<&Probe>) -> Result<BudgetResult> {
    let base = Baseline::new(probe);
    let gpu = Gpu::open(name)?;
    let mut held = Vec::new();
    let mut allocated = 0;
    let mut failure = None;
    while allocated < w.hard_stop() {
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let b = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("budget"),
            size: w.budget_step,
            usage: INSTANCE_USAGE,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            failure = Some(e.to_string());
            break;
        }
        allocated += w.budget_step;
        held.push(b);
    }
    let reserved = gpu.reserved();
    let driver_delta = base.delta();
    drop(held);
    gpu.wait_idle()?;
    gpu.check_errors()?;
    drop(gpu);
    let outcome = match &failure {
        None => "goes over (no budget; hard stop at 2×B)".to_string(),
        Some(_) => "fails: out of memory".to_string(),
    };
    Ok(BudgetResult {
        variant: "no injectable budget (MemoryBudgetThresholds off)".into(),
        outcome,
        error: failure,
        allocated,
        reserved,
        driver_delta,
    })
}
