//! The plain-ash side: a device of its own for each ash-based stack, the per-frame fence ring
//! with hand-rolled free lists, and the churn and budget loops that vk-mem and raw gpu-allocator
//! share (only their allocate and free calls differ).

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use ash::vk;

use crate::common::{
    Baseline, ChurnResult, FRAMES_IN_FLIGHT, Peaks, Timings, USE_BYTES, Workload,
    find_physical_device, upload_type,
};

/// Usage of every instance buffer: read as vertex (instance) data, copied from for the "use".
pub const INSTANCE_USAGE: vk::BufferUsageFlags = vk::BufferUsageFlags::from_raw(
    vk::BufferUsageFlags::VERTEX_BUFFER.as_raw()
        | vk::BufferUsageFlags::STORAGE_BUFFER.as_raw()
        | vk::BufferUsageFlags::TRANSFER_SRC.as_raw(),
);

/// An instance, device and queue of the named physical device, nothing else enabled but
/// `VK_EXT_memory_budget` where supported.
pub struct RawDevice {
    pub instance: ash::Instance,
    pub physical_device: vk::PhysicalDevice,
    pub device: ash::Device,
    pub queue: vk::Queue,
    pub family: u32,
    pub props: vk::PhysicalDeviceMemoryProperties,
    pub memory_budget: bool,
}

impl RawDevice {
    pub fn new(entry: &ash::Entry, name: &str) -> Result<Self> {
        let app = vk::ApplicationInfo::default()
            .application_name(c"understory-peers")
            .api_version(vk::API_VERSION_1_2);
        let info = vk::InstanceCreateInfo::default().application_info(&app);
        // SAFETY: valid create info, no layers or extensions; the entry is loaded.
        let instance = unsafe { entry.create_instance(&info, None) }.context("vkCreateInstance")?;
        match Self::with_instance(&instance, name) {
            Ok((physical_device, device, queue, family, props, memory_budget)) => Ok(Self {
                instance,
                physical_device,
                device,
                queue,
                family,
                props,
                memory_budget,
            }),
            Err(e) => {
                // SAFETY: no device survived with_instance's error path.
                unsafe { instance.destroy_instance(None) };
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn with_instance(
        instance: &ash::Instance,
        name: &str,
    ) -> Result<(
        vk::PhysicalDevice,
        ash::Device,
        vk::Queue,
        u32,
        vk::PhysicalDeviceMemoryProperties,
        bool,
    )> {
        let pd = find_physical_device(instance, name)?
            .ok_or_else(|| anyhow!("no physical device named {name:?}"))?;
        // SAFETY: pd belongs to the instance.
        let families = unsafe { instance.get_physical_device_queue_family_properties(pd) };
        let family = families
            .iter()
            .position(|f| {
                f.queue_flags
                    .intersects(vk::QueueFlags::GRAPHICS | vk::QueueFlags::COMPUTE)
            })
            .ok_or_else(|| anyhow!("{name}: no graphics or compute queue"))?
            as u32;
        // SAFETY: pd belongs to the instance.
        let exts = unsafe { instance.enumerate_device_extension_properties(pd) }
            .context("vkEnumerateDeviceExtensionProperties")?;
        let memory_budget = exts
            .iter()
            .any(|e| e.extension_name_as_c_str() == Ok(ash::ext::memory_budget::NAME));
        let ext_names = if memory_budget {
            vec![ash::ext::memory_budget::NAME.as_ptr()]
        } else {
            Vec::new()
        };
        let priorities = [1.0f32];
        let queues = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(family)
            .queue_priorities(&priorities)];
        let info = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queues)
            .enabled_extension_names(&ext_names);
        // SAFETY: the family exists, the extension (if any) is supported; pointers outlive the
        // call.
        let device =
            unsafe { instance.create_device(pd, &info, None) }.context("vkCreateDevice")?;
        // SAFETY: queue 0 of `family` was requested.
        let queue = unsafe { device.get_device_queue(family, 0) };
        // SAFETY: pd belongs to the instance.
        let props = unsafe { instance.get_physical_device_memory_properties(pd) };
        Ok((pd, device, queue, family, props, memory_budget))
    }
}

impl Drop for RawDevice {
    fn drop(&mut self) {
        // SAFETY: the stacks destroy everything they created from the device (allocators
        // included) before dropping it; waiting first makes the teardown safe even after an
        // error path left a submission in flight.
        unsafe {
            let _ = self.device.device_wait_idle();
            self.device.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}

/// The memory type gpu-allocator's `CpuToGpu` takes for an instance buffer on this device.
pub fn upload_type_for(
    device: &ash::Device,
    props: &vk::PhysicalDeviceMemoryProperties,
) -> Result<u32> {
    let info = vk::BufferCreateInfo::default()
        .size(256)
        .usage(INSTANCE_USAGE)
        .sharing_mode(vk::SharingMode::EXCLUSIVE);
    // SAFETY: valid create info; the device is alive.
    let b = unsafe { device.create_buffer(&info, None) }.context("vkCreateBuffer")?;
    // SAFETY: just created from this device.
    let req = unsafe { device.get_buffer_memory_requirements(b) };
    // SAFETY: never bound or used.
    unsafe { device.destroy_buffer(b, None) };
    upload_type(props, req.memory_type_bits)
        .ok_or_else(|| anyhow!("no host-visible coherent memory type for instance buffers"))
}

/// A device-local buffer with memory of its own (outside the allocator under test): the target
/// of the per-frame "use" copies.
pub struct Sink {
    pub buffer: vk::Buffer,
    memory: vk::DeviceMemory,
}

impl Sink {
    pub fn new(
        device: &ash::Device,
        props: &vk::PhysicalDeviceMemoryProperties,
        size: u64,
    ) -> Result<Self> {
        let info = vk::BufferCreateInfo::default()
            .size(size)
            .usage(vk::BufferUsageFlags::TRANSFER_DST)
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        // SAFETY: valid create info; the device is alive.
        let buffer = unsafe { device.create_buffer(&info, None) }.context("vkCreateBuffer")?;
        // SAFETY: buffer was just created from this device.
        let req = unsafe { device.get_buffer_memory_requirements(buffer) };
        let types = props.memory_types_as_slice();
        let allowed = |i: u32| req.memory_type_bits & (1 << i) != 0;
        let ty = (0..types.len() as u32)
            .find(|&i| {
                allowed(i)
                    && types[i as usize]
                        .property_flags
                        .contains(vk::MemoryPropertyFlags::DEVICE_LOCAL)
            })
            .or_else(|| (0..types.len() as u32).find(|&i| allowed(i)));
        let Some(ty) = ty else {
            // SAFETY: never bound or used.
            unsafe { device.destroy_buffer(buffer, None) };
            bail!("no memory type for the sink buffer");
        };
        let alloc = vk::MemoryAllocateInfo::default()
            .allocation_size(req.size)
            .memory_type_index(ty);
        // SAFETY: an allowed type of this device and the buffer's required size.
        let memory = match unsafe { device.allocate_memory(&alloc, None) } {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: never bound or used.
                unsafe { device.destroy_buffer(buffer, None) };
                return Err(anyhow!("vkAllocateMemory (sink): {e}"));
            }
        };
        // SAFETY: fresh memory of an allowed type and the required size; offset 0 is aligned;
        // the buffer was never bound.
        if let Err(e) = unsafe { device.bind_buffer_memory(buffer, memory, 0) } {
            // SAFETY: never used.
            unsafe {
                device.destroy_buffer(buffer, None);
                device.free_memory(memory, None);
            }
            return Err(anyhow!("vkBindBufferMemory (sink): {e}"));
        }
        Ok(Self { buffer, memory })
    }

    /// # Safety
    /// The GPU must be done with the buffer.
    pub unsafe fn destroy(self, device: &ash::Device) {
        // SAFETY: the caller guarantees the GPU is done; buffer first, then its memory.
        unsafe {
            device.destroy_buffer(self.buffer, None);
            device.free_memory(self.memory, None);
        }
    }
}

/// Records the "use" of a new buffer: its first 256 bytes copied into slot `index` of `sink`.
///
/// # Safety
/// `cmd` is recording, and both buffers are live and from `device`, `src` at least 256 bytes.
pub unsafe fn record_use(
    device: &ash::Device,
    cmd: vk::CommandBuffer,
    src: vk::Buffer,
    sink: vk::Buffer,
    index: usize,
) {
    let region = vk::BufferCopy {
        src_offset: 0,
        dst_offset: index as u64 * USE_BYTES,
        size: USE_BYTES,
    };
    // SAFETY: the caller's contract; each index writes its own disjoint 256-byte slot.
    unsafe { device.cmd_copy_buffer(cmd, src, sink, &[region]) };
}

/// One command buffer and one fence per frame in flight.
pub struct FenceRing {
    pool: vk::CommandPool,
    cmds: Vec<vk::CommandBuffer>,
    fences: Vec<vk::Fence>,
    pending: Vec<bool>,
}

impl FenceRing {
    pub fn new(device: &ash::Device, family: u32) -> Result<Self> {
        let info = vk::CommandPoolCreateInfo::default()
            .queue_family_index(family)
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
        // SAFETY: valid create info for this device.
        let pool =
            unsafe { device.create_command_pool(&info, None) }.context("vkCreateCommandPool")?;
        let mut ring = Self {
            pool,
            cmds: Vec::new(),
            fences: Vec::new(),
            pending: vec![false; FRAMES_IN_FLIGHT],
        };
        let alloc = vk::CommandBufferAllocateInfo::default()
            .command_pool(pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(FRAMES_IN_FLIGHT as u32);
        // SAFETY: the pool is ours.
        match unsafe { device.allocate_command_buffers(&alloc) } {
            Ok(c) => ring.cmds = c,
            Err(e) => {
                // SAFETY: nothing submitted.
                unsafe { ring.destroy(device) };
                bail!("vkAllocateCommandBuffers: {e}");
            }
        }
        for _ in 0..FRAMES_IN_FLIGHT {
            // SAFETY: valid create info.
            match unsafe { device.create_fence(&vk::FenceCreateInfo::default(), None) } {
                Ok(f) => ring.fences.push(f),
                Err(e) => {
                    // SAFETY: nothing submitted.
                    unsafe { ring.destroy(device) };
                    bail!("vkCreateFence: {e}");
                }
            }
        }
        Ok(ring)
    }

    /// Waits for the submission that last used `slot` (if any).
    pub fn wait(&mut self, device: &ash::Device, slot: usize) -> Result<()> {
        if self.pending[slot] {
            // SAFETY: the fence is ours and was submitted.
            unsafe { device.wait_for_fences(&[self.fences[slot]], true, 10_000_000_000) }
                .context("vkWaitForFences (10 s)")?;
            // SAFETY: signalled, so no longer in use by a pending submission.
            unsafe { device.reset_fences(&[self.fences[slot]]) }.context("vkResetFences")?;
            self.pending[slot] = false;
        }
        Ok(())
    }

    /// Resets and begins `slot`'s command buffer; call after [`FenceRing::wait`].
    pub fn begin(&mut self, device: &ash::Device, slot: usize) -> Result<vk::CommandBuffer> {
        let cmd = self.cmds[slot];
        // SAFETY: wait() made sure its last submission completed.
        unsafe { device.reset_command_buffer(cmd, vk::CommandBufferResetFlags::empty()) }
            .context("vkResetCommandBuffer")?;
        let begin = vk::CommandBufferBeginInfo::default()
            .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
        // SAFETY: reset above, so in the initial state.
        unsafe { device.begin_command_buffer(cmd, &begin) }.context("vkBeginCommandBuffer")?;
        Ok(cmd)
    }

    /// Ends and submits `slot`'s command buffer, signalling its fence.
    pub fn submit(&mut self, device: &ash::Device, queue: vk::Queue, slot: usize) -> Result<()> {
        let cmd = self.cmds[slot];
        // SAFETY: recording since begin().
        unsafe { device.end_command_buffer(cmd) }.context("vkEndCommandBuffer")?;
        let cmds = [cmd];
        let submit = vk::SubmitInfo::default().command_buffers(&cmds);
        // SAFETY: executable command buffer; the fence is unsignalled and not pending; the
        // queue is used from this thread only; what cmd uses stays alive until the fence.
        unsafe { device.queue_submit(queue, &[submit], self.fences[slot]) }
            .context("vkQueueSubmit")?;
        self.pending[slot] = true;
        Ok(())
    }

    /// Waits for every slot.
    pub fn wait_all(&mut self, device: &ash::Device) -> Result<()> {
        for slot in 0..FRAMES_IN_FLIGHT {
            self.wait(device, slot)?;
        }
        Ok(())
    }

    /// # Safety
    /// No submission of the ring may be pending.
    pub unsafe fn destroy(self, device: &ash::Device) {
        // SAFETY: nothing pending (caller); the pool frees its command buffers.
        unsafe {
            for f in &self.fences {
                device.destroy_fence(*f, None);
            }
            device.destroy_command_pool(self.pool, None);
        }
    }
}

/// A buffer from an ash-based allocator, persistently mapped.
pub struct RawBuffer<A> {
    pub buffer: vk::Buffer,
    pub alloc: A,
    pub ptr: NonNull<u8>,
    pub size: u64,
}

/// Why an allocation failed.
#[derive(Debug)]
pub struct AllocFail {
    /// The allocator said out of (device) memory.
    pub out_of_memory: bool,
    pub message: String,
}

/// The two calls that differ between vk-mem and raw gpu-allocator.
pub trait RawAllocator {
    type Alloc;
    /// Creates a buffer of `size` bytes (at least), bound and mapped.
    fn create(&mut self, size: u64) -> std::result::Result<RawBuffer<Self::Alloc>, AllocFail>;
    /// Destroys the buffer and frees its memory. The GPU must be done with it.
    fn destroy(&mut self, buffer: RawBuffer<Self::Alloc>) -> Result<()>;
    /// Bytes held in `VkDeviceMemory` blocks now.
    fn reserved(&self) -> u64;
}

/// Writes the workload's fill bytes into a mapped buffer.
fn fill<A>(w: &Workload, b: &RawBuffer<A>, size: u64) {
    // SAFETY: `ptr` maps at least `size` bytes of host-visible, coherent memory that only this
    // buffer uses, and nothing on the GPU reads it yet (it was created this frame); `fill` is
    // MAX_SIZE >= size bytes long and does not overlap mapped memory.
    unsafe { std::ptr::copy_nonoverlapping(w.fill.as_ptr(), b.ptr.as_ptr(), size as usize) };
}

/// The churn workload with per-frame fences and hand-rolled free lists; then the leak check.
pub fn churn<R: RawAllocator>(
    dev: &RawDevice,
    alloc: &mut R,
    w: &Workload,
    base: &Baseline<'_>,
) -> Result<ChurnResult> {
    let device = &dev.device;
    let mut sinks = Vec::new();
    for _ in 0..FRAMES_IN_FLIGHT {
        sinks.push(Sink::new(device, &dev.props, w.sink_bytes())?);
    }
    let mut ring = FenceRing::new(device, dev.family)?;
    let mut live: VecDeque<RawBuffer<R::Alloc>> = VecDeque::new();
    let mut free_lists: Vec<Vec<RawBuffer<R::Alloc>>> =
        (0..FRAMES_IN_FLIGHT).map(|_| Vec::new()).collect();
    let mut timings = Timings::default();
    let mut peaks = Peaks::default();

    let run = (|| -> Result<()> {
        for f in 0..w.frames {
            let slot = f % FRAMES_IN_FLIGHT;
            let t0 = Instant::now();
            ring.wait(device, slot)?;
            let wait_t = t0.elapsed();
            let mut alloc_t = Duration::ZERO;
            let a = Instant::now();
            for b in free_lists[slot].drain(..) {
                alloc.destroy(b)?;
            }
            alloc_t += a.elapsed();
            let cmd = ring.begin(device, slot)?;
            for (i, &size) in w.frame_sizes(f).iter().enumerate() {
                let a = Instant::now();
                let b = alloc
                    .create(size)
                    .map_err(|e| anyhow!("allocation failed: {}", e.message))?;
                alloc_t += a.elapsed();
                fill(w, &b, size);
                // SAFETY: cmd is recording; both buffers are live and from this device; b is
                // at least 256 bytes.
                unsafe { record_use(device, cmd, b.buffer, sinks[slot].buffer, i) };
                live.push_back(b);
            }
            ring.submit(device, dev.queue, slot)?;
            let a = Instant::now();
            // Freed once this slot's fence (this submission, after every older one) signals.
            for _ in 0..w.to_release(live.len()) {
                if let Some(b) = live.pop_front() {
                    free_lists[slot].push(b);
                }
            }
            alloc_t += a.elapsed();
            timings.push(w, f, t0.elapsed(), wait_t, alloc_t);
            peaks.sample(alloc.reserved(), base.delta());
        }
        Ok(())
    })();

    // Leak check (also the error path's cleanup): release everything once the GPU is idle.
    let idle = ring.wait_all(device);
    // SAFETY: waiting for our own device.
    let idle = idle.and_then(|()| unsafe { device.device_wait_idle() }.context("vkDeviceWaitIdle"));
    if let Err(e) = idle {
        // Not known to be idle: leak rather than free memory the GPU may still read.
        std::mem::forget(live);
        std::mem::forget(free_lists);
        return Err(e.context("waiting for the GPU before the leak check"));
    }
    let mut freed = Ok(());
    for b in free_lists.into_iter().flatten().chain(live) {
        if let Err(e) = alloc.destroy(b) {
            freed = Err(e);
        }
    }
    let reserved_after_release = alloc.reserved();
    let driver_delta_after_release = base.delta();
    // SAFETY: the device is idle.
    unsafe {
        ring.destroy(device);
        for s in sinks {
            s.destroy(device);
        }
    }
    run?;
    freed?;
    Ok(ChurnResult {
        samples: timings,
        peak_reserved: Some(peaks.reserved),
        peak_driver_delta: peaks.driver,
        reserved_after_release: Some(reserved_after_release),
        driver_delta_after_release,
        ..Default::default()
    })
}

/// The budget workload: `budget_step`-byte buffers until the allocator fails or the hard stop.
/// Returns (allocated bytes, reserved bytes at the stop, driver delta at the stop, the failure).
pub fn fill_to_budget<R: RawAllocator>(
    alloc: &mut R,
    w: &Workload,
    base: &Baseline<'_>,
) -> Result<(u64, u64, Option<i64>, Option<AllocFail>)> {
    let mut held = Vec::new();
    let mut allocated = 0;
    let mut failure = None;
    while allocated < w.hard_stop() {
        match alloc.create(w.budget_step) {
            Ok(b) => {
                allocated += b.size;
                held.push(b);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let reserved = alloc.reserved();
    let delta = base.delta();
    for b in held {
        // Never used by the GPU.
        alloc.destroy(b)?;
    }
    Ok((allocated, reserved, delta, failure))
}
