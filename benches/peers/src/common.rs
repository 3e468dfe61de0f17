//! What every stack shares: the workload, the timing summaries, the results, and the driver
//! `heapUsage` probe.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use ash::vk;
use serde::Serialize;

pub const MIB: u64 = 1 << 20;
/// Bytes each new buffer contributes to the per-frame "use" copy (the minimum buffer size).
pub const USE_BYTES: u64 = 256;
/// Frames the CPU may record ahead of the GPU, for every stack.
pub const FRAMES_IN_FLIGHT: usize = 2;
/// Smallest and largest instance buffer.
pub const MIN_SIZE: u64 = 256;
pub const MAX_SIZE: u64 = MIB;

/// The identical workload every stack runs.
#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    /// Frames of churn.
    pub frames: usize,
    /// First frames left out of the timing statistics (they still count for peaks).
    pub warmup: usize,
    /// New buffers per frame.
    pub buffers: usize,
    /// Oldest buffers released per frame (never below `keep` live ones).
    pub release: usize,
    /// Live buffers kept across frames (the resident set).
    pub keep: usize,
    /// Injected budget for the budget workload, in bytes.
    pub budget: u64,
    /// Size of each buffer in the budget workload.
    pub budget_step: u64,
    /// Size of every buffer of every frame, `frames * buffers` of them, frame-major.
    #[serde(skip)]
    pub sizes: Vec<u64>,
    /// Bytes created per frame, on average.
    pub mean_bytes_per_frame: u64,
    /// The bytes written into every new buffer (its first `size` bytes).
    #[serde(skip)]
    pub fill: Vec<u8>,
}

impl Workload {
    pub fn new(
        frames: usize,
        warmup: usize,
        buffers: usize,
        release: usize,
        keep: usize,
        budget: u64,
        seed: u64,
    ) -> Self {
        let sizes = sizes(frames * buffers, MIN_SIZE, MAX_SIZE, seed);
        let total: u64 = sizes.iter().sum();
        let fill = (0..MAX_SIZE as usize)
            .map(|i| (i as u8).wrapping_mul(31) ^ 0x5A)
            .collect();
        Self {
            frames,
            warmup: warmup.min(frames.saturating_sub(1)),
            buffers,
            release,
            keep,
            budget,
            budget_step: MIB,
            mean_bytes_per_frame: total / frames.max(1) as u64,
            sizes,
            fill,
        }
    }

    /// The sizes of frame `f`'s new buffers.
    pub fn frame_sizes(&self, f: usize) -> &[u64] {
        &self.sizes[f * self.buffers..(f + 1) * self.buffers]
    }

    /// How many of `live` buffers to release this frame.
    pub fn to_release(&self, live: usize) -> usize {
        self.release.min(live.saturating_sub(self.keep))
    }

    /// Bytes of each per-frame "use" target (one 256-byte slot per new buffer).
    pub fn sink_bytes(&self) -> u64 {
        (self.buffers as u64 * USE_BYTES).max(USE_BYTES)
    }

    /// The budget workload's hard stop.
    pub fn hard_stop(&self) -> u64 {
        self.budget.saturating_mul(2)
    }
}

/// `n` sizes, log-uniform in `min..=max`, from a fixed xorshift64 seed (the generator of
/// `benches/memory.rs`), rounded up to a multiple of 4 (wgpu's copy alignment) for every stack.
pub fn sizes(n: usize, min: u64, max: u64, seed: u64) -> Vec<u64> {
    let mut state = seed.max(1);
    let ratio = (max as f64 / min as f64).ln();
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // 53 random bits -> [0, 1).
            let u = (state >> 11) as f64 / (1u64 << 53) as f64;
            let s = ((min as f64 * (u * ratio).exp()).round() as u64).clamp(min, max);
            s.next_multiple_of(4).min(max)
        })
        .collect()
}

/// Median, p99 and mean of a set of durations, in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Summary {
    pub median_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
    pub samples: usize,
}

impl Summary {
    pub fn of(samples: &[Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let pick = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
        Self {
            median_ms: pick(0.5),
            p99_ms: pick(0.99),
            mean_ms: ms.iter().sum::<f64>() / ms.len() as f64,
            samples: ms.len(),
        }
    }
}

/// Per-frame timings of the churn loop.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    /// Frame CPU time: the whole frame (frees, creates, fills, record, submit, releases) less
    /// the time blocked in the throttle wait.
    pub frame: Vec<Duration>,
    /// The whole frame, throttle wait included.
    pub wall: Vec<Duration>,
    /// Only the stack's allocation and release calls (create+bind+map, free/retire/drop, and
    /// the per-frame collect/poll that frees).
    pub alloc: Vec<Duration>,
    /// Time blocked in the frames-in-flight throttle.
    pub wait: Vec<Duration>,
}

impl Timings {
    pub fn push(
        &mut self,
        w: &Workload,
        f: usize,
        frame: Duration,
        wait: Duration,
        alloc: Duration,
    ) {
        if f >= w.warmup {
            self.frame.push(frame.saturating_sub(wait));
            self.wall.push(frame);
            self.alloc.push(alloc);
            self.wait.push(wait);
        }
    }
}

/// Peaks sampled once a frame, outside the timed region.
#[derive(Default)]
pub struct Peaks {
    pub reserved: u64,
    pub driver: Option<i64>,
}

impl Peaks {
    pub fn sample(&mut self, reserved: u64, driver: Option<i64>) {
        self.reserved = self.reserved.max(reserved);
        if let Some(d) = driver {
            self.driver = Some(self.driver.map_or(d, |p| p.max(d)));
        }
    }
}

/// What the churn and leak-check workloads measured for one stack.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ChurnResult {
    /// Rounds pooled into this result.
    pub rounds: usize,
    /// Frame CPU time, throttle wait excluded.
    pub frame: Summary,
    /// Frame wall time, throttle wait included.
    pub wall: Summary,
    /// Allocation and release calls alone.
    pub alloc: Summary,
    /// Blocked in the throttle wait.
    pub wait: Summary,
    /// Most bytes the stack's allocator held in `VkDeviceMemory` at any frame.
    pub peak_reserved: Option<u64>,
    /// Most the driver's `heapUsage` (all heaps) rose above its value before the stack started.
    pub peak_driver_delta: Option<i64>,
    /// Leak check: bytes the allocator still holds once every buffer was released and the
    /// device is idle (allocator alive).
    pub reserved_after_release: Option<u64>,
    /// understory only: the same after `flush_cache` + `release_empty_blocks`.
    pub reserved_after_trim: Option<u64>,
    /// `heapUsage` delta at the leak check, allocator alive.
    pub driver_delta_after_release: Option<i64>,
    /// `heapUsage` delta once the whole stack (allocator, device) is torn down.
    pub driver_delta_after_teardown: Option<i64>,
    /// Objects the stack itself reported as leaked at shutdown, where it reports them.
    pub leaked_objects: Option<u64>,
    /// Where the instance buffers lived.
    pub memory: String,
    pub notes: Vec<String>,
    /// The raw per-frame samples behind the summaries.
    #[serde(skip)]
    pub samples: Timings,
}

fn max_opt<T: Ord + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

impl ChurnResult {
    /// Pools the samples of several rounds of one stack; peaks and leak-check numbers are the
    /// worst round's.
    pub fn merge(rounds: Vec<ChurnResult>) -> Option<ChurnResult> {
        let mut it = rounds.into_iter();
        let mut acc = it.next()?;
        acc.rounds = 1;
        for r in it {
            acc.rounds += 1;
            acc.samples.frame.extend(r.samples.frame);
            acc.samples.wall.extend(r.samples.wall);
            acc.samples.alloc.extend(r.samples.alloc);
            acc.samples.wait.extend(r.samples.wait);
            acc.peak_reserved = max_opt(acc.peak_reserved, r.peak_reserved);
            acc.peak_driver_delta = max_opt(acc.peak_driver_delta, r.peak_driver_delta);
            acc.reserved_after_release =
                max_opt(acc.reserved_after_release, r.reserved_after_release);
            acc.reserved_after_trim = max_opt(acc.reserved_after_trim, r.reserved_after_trim);
            acc.driver_delta_after_release =
                max_opt(acc.driver_delta_after_release, r.driver_delta_after_release);
            acc.driver_delta_after_teardown = max_opt(
                acc.driver_delta_after_teardown,
                r.driver_delta_after_teardown,
            );
            acc.leaked_objects = max_opt(acc.leaked_objects, r.leaked_objects);
        }
        acc.frame = Summary::of(&acc.samples.frame);
        acc.wall = Summary::of(&acc.samples.wall);
        acc.alloc = Summary::of(&acc.samples.alloc);
        acc.wait = Summary::of(&acc.samples.wait);
        Some(acc)
    }
}

/// What one stack did when asked for more than the injected budget.
#[derive(Clone, Debug, Serialize)]
pub struct BudgetResult {
    pub variant: String,
    /// `refuses`, `fails (out of device memory)`, `goes over`, or an error.
    pub outcome: String,
    /// The error the stack returned, if it returned one.
    pub error: Option<String>,
    /// Bytes of buffers that were created successfully.
    pub allocated: u64,
    /// Bytes the allocator held in `VkDeviceMemory` at the stop.
    pub reserved: Option<u64>,
    /// `heapUsage` delta at the stop.
    pub driver_delta: Option<i64>,
}

impl BudgetResult {
    /// Bytes past the budget: the larger of allocated and reserved, minus the budget.
    pub fn past(&self, budget: u64) -> i64 {
        let held = self.reserved.unwrap_or(0).max(self.allocated);
        held as i64 - budget as i64
    }
}

/// One stack's whole record.
#[derive(Clone, Debug, Serialize)]
pub struct StackReport {
    pub stack: String,
    pub version: String,
    pub churn: Option<ChurnResult>,
    pub churn_error: Option<String>,
    pub budget: Vec<BudgetResult>,
    pub budget_error: Option<String>,
}

/// Reads the driver's `heapUsage` (`VK_EXT_memory_budget`) of one physical device through an
/// instance of its own, so that every stack is measured the same way.
pub struct Probe {
    instance: ash::Instance,
    physical_device: vk::PhysicalDevice,
    heaps: usize,
}

impl Probe {
    /// `None` where the device lacks `VK_EXT_memory_budget`.
    pub fn new(entry: &ash::Entry, device_name: &str) -> Result<Option<Self>> {
        let app = vk::ApplicationInfo::default().api_version(vk::API_VERSION_1_1);
        let info = vk::InstanceCreateInfo::default().application_info(&app);
        // SAFETY: valid create info with no layers or extensions; the entry is loaded.
        let instance = unsafe { entry.create_instance(&info, None) }
            .context("vkCreateInstance (heapUsage probe)")?;
        let found = (|| -> Result<Option<(vk::PhysicalDevice, usize)>> {
            let Some(pd) = find_physical_device(&instance, device_name)? else {
                bail!("probe: no physical device named {device_name:?}");
            };
            // SAFETY: pd belongs to this instance.
            let exts = unsafe { instance.enumerate_device_extension_properties(pd) }
                .context("vkEnumerateDeviceExtensionProperties")?;
            let has = exts
                .iter()
                .any(|e| e.extension_name_as_c_str() == Ok(ash::ext::memory_budget::NAME));
            if !has {
                return Ok(None);
            }
            // SAFETY: pd belongs to this instance.
            let props = unsafe { instance.get_physical_device_memory_properties(pd) };
            Ok(Some((pd, props.memory_heap_count as usize)))
        })();
        match found {
            Ok(Some((physical_device, heaps))) => Ok(Some(Self {
                instance,
                physical_device,
                heaps,
            })),
            other => {
                // SAFETY: nothing was created from the instance.
                unsafe { instance.destroy_instance(None) };
                other.map(|_| None)
            }
        }
    }

    /// The sum of every heap's `heapUsage`, bytes.
    pub fn usage(&self) -> u64 {
        let mut budget = vk::PhysicalDeviceMemoryBudgetPropertiesEXT::default();
        let mut props = vk::PhysicalDeviceMemoryProperties2::default().push_next(&mut budget);
        // SAFETY: the physical device belongs to this instance (API 1.1) and supports
        // VK_EXT_memory_budget, so the chained struct is valid to fill.
        unsafe {
            self.instance
                .get_physical_device_memory_properties2(self.physical_device, &mut props)
        };
        budget.heap_usage[..self.heaps].iter().sum()
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        // SAFETY: nothing else was created from this instance.
        unsafe { self.instance.destroy_instance(None) };
    }
}

/// A baseline taken before a stack starts; `delta()` is the change since.
pub struct Baseline<'a> {
    probe: Option<&'a Probe>,
    start: u64,
}

impl<'a> Baseline<'a> {
    pub fn new(probe: Option<&'a Probe>) -> Self {
        Self {
            probe,
            start: probe.map_or(0, Probe::usage),
        }
    }

    pub fn delta(&self) -> Option<i64> {
        self.probe.map(|p| p.usage() as i64 - self.start as i64)
    }
}

/// The physical device whose name equals `name` (case-insensitive).
pub fn find_physical_device(
    instance: &ash::Instance,
    name: &str,
) -> Result<Option<vk::PhysicalDevice>> {
    // SAFETY: the instance is alive.
    let devices =
        unsafe { instance.enumerate_physical_devices() }.context("vkEnumeratePhysicalDevices")?;
    for pd in devices {
        // SAFETY: pd belongs to the instance.
        let props = unsafe { instance.get_physical_device_properties(pd) };
        let n = props.device_name_as_c_str().map(|c| c.to_string_lossy());
        if n.is_ok_and(|n| n.eq_ignore_ascii_case(name)) {
            return Ok(Some(pd));
        }
    }
    Ok(None)
}

/// The memory type gpu-allocator picks for `MemoryLocation::CpuToGpu` (device-local +
/// host-visible + coherent preferred, else host-visible + coherent), used by every ash stack.
pub fn upload_type(props: &vk::PhysicalDeviceMemoryProperties, type_bits: u32) -> Option<u32> {
    use vk::MemoryPropertyFlags as F;
    let types = props.memory_types_as_slice();
    let find = |want: F| {
        (0..types.len() as u32)
            .find(|&i| type_bits & (1 << i) != 0 && types[i as usize].property_flags.contains(want))
    };
    find(F::DEVICE_LOCAL | F::HOST_VISIBLE | F::HOST_COHERENT)
        .or_else(|| find(F::HOST_VISIBLE | F::HOST_COHERENT))
}

/// `#3 DEVICE_LOCAL | HOST_VISIBLE … (heap 0)`.
pub fn describe_type(props: &vk::PhysicalDeviceMemoryProperties, index: u32) -> String {
    let t = props.memory_types_as_slice()[index as usize];
    format!(
        "type {index} {:?} (heap {})",
        t.property_flags, t.heap_index
    )
}
