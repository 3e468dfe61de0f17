//! The device context: either created by understory, or wrapped around a host engine's own
//! instance, device and queue.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ash::vk;

use crate::error::{Error, Result, vk_err};
use crate::gpu::adapter::{self, Adapter, DeviceSelector, OptionalExtensions};
use crate::gpu::budget::{DriverBudget, HeapBudgets};
use crate::gpu::debug::Canary;
use crate::gpu::instance::{Instance, InstanceOptions};
use crate::gpu::memory::{HeapReport, Memory, MemoryConfig, Retirable, ShutdownReport};
use crate::gpu::timeline::Timeline;

/// Most frames the CPU may record ahead of the GPU.
pub const MAX_FRAMES_IN_FLIGHT: u32 = 4;

/// How to build a [`Context`].
#[derive(Clone, Debug)]
pub struct ContextOptions {
    /// Instance and validation settings (standalone only).
    pub instance: InstanceOptions,
    /// Which device; `None` picks the best (discrete > integrated > virtual > CPU).
    pub device: Option<DeviceSelector>,
    /// Memory caps, block sizes, priorities.
    pub memory: MemoryConfig,
    /// Frames the CPU may run ahead of the GPU, 1..=4 (default 2).
    pub frames_in_flight: u32,
}

impl Default for ContextOptions {
    fn default() -> Self {
        Self {
            instance: InstanceOptions::default(),
            device: None,
            memory: MemoryConfig::default(),
            frames_in_flight: 2,
        }
    }
}

/// What [`Context::begin_frame`] found.
#[derive(Clone, Debug)]
pub struct FrameStart {
    /// Timeline value the GPU has completed.
    pub completed: u64,
    /// Resources freed by the retire queue this frame.
    pub freed: usize,
    /// Every heap's budget, usage and our share.
    pub heaps: Vec<HeapReport>,
}

impl ContextOptions {
    /// Applies `UNDERSTORY_VALIDATION`, `UNDERSTORY_SYNC_VALIDATION` and `UNDERSTORY_DEVICE`.
    pub fn with_env(mut self) -> Result<Self> {
        self.instance = self.instance.with_env()?;
        if let Ok(v) = std::env::var("UNDERSTORY_DEVICE") {
            self.device = Some(DeviceSelector::parse(&v)?);
        }
        Ok(self)
    }
}

/// A host engine's Vulkan objects, handed to [`Context::from_raw`].
pub struct HostHandles {
    /// The loader the host uses.
    pub entry: ash::Entry,
    /// The host's instance.
    pub instance: ash::Instance,
    /// `VkApplicationInfo::apiVersion` the instance was created with (>= 1.2).
    pub instance_api_version: u32,
    /// Whether `VK_EXT_debug_utils` is enabled on the instance. If so, understory attaches its
    /// own messenger, and its canary counts validation messages.
    pub debug_utils_enabled: bool,
    /// The physical device the device was created from.
    pub physical_device: vk::PhysicalDevice,
    /// The host's device.
    pub device: ash::Device,
    /// Family of `queue`; must support compute.
    pub queue_family_index: u32,
    /// A queue understory submits its own work to (uploads, one-shot jobs).
    pub queue: vk::Queue,
    /// Which of understory's optional extensions the host enabled on the device.
    pub enabled_extensions: OptionalExtensions,
}

/// The device half of a context under construction.
struct DeviceParts {
    device: ash::Device,
    queue: vk::Queue,
    queue_family: u32,
    extensions: OptionalExtensions,
    owns_device: bool,
}

/// A Vulkan device ready for understory: instance, device, one queue, timeline, allocator.
pub struct Context {
    device: ash::Device,
    adapter: Adapter,
    queue: Mutex<vk::Queue>,
    queue_family: u32,
    extensions: OptionalExtensions,
    owns_device: bool,
    memory: Memory,
    timeline: Timeline,
    command_pool: Mutex<vk::CommandPool>,
    frames_in_flight: u32,
    shutdown_report: Option<ShutdownReport>,
    // Dropped last: destroys the messenger and (if ours) the instance after the device.
    instance: Instance,
}

impl Context {
    /// Creates an instance and device of understory's own.
    pub fn new(options: &ContextOptions) -> Result<Self> {
        let instance = Instance::new(&options.instance)?;
        let adapters = instance.adapters()?;
        let chosen = adapter::select(&adapters, options.device.as_ref())?;
        let adapter = adapters[chosen].clone();
        let family = adapter
            .queue_family
            .ok_or_else(|| Error::Unsupported("no compute queue".into()))?;

        let mut extensions = adapter.extensions;
        extensions.memory_priority &= adapter.memory_priority_feature;
        extensions.pageable_device_local_memory &=
            extensions.memory_priority && adapter.pageable_feature;
        // Core 1.3 functionality is usable only when the instance asked for 1.3 as well.
        extensions.dynamic_rendering &= instance.api_version() >= vk::API_VERSION_1_3;
        let ext_names: Vec<_> = extensions.names().iter().map(|n| n.as_ptr()).collect();

        let priorities = [1.0f32];
        let queue_info = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(family)
            .queue_priorities(&priorities)];
        let mut v12 = vk::PhysicalDeviceVulkan12Features::default().timeline_semaphore(true);
        let mut v13 = vk::PhysicalDeviceVulkan13Features::default().dynamic_rendering(true);
        let mut prio = vk::PhysicalDeviceMemoryPriorityFeaturesEXT::default().memory_priority(true);
        let mut page = vk::PhysicalDevicePageableDeviceLocalMemoryFeaturesEXT::default()
            .pageable_device_local_memory(true);
        let features = vk::PhysicalDeviceFeatures::default()
            .shader_storage_buffer_array_dynamic_indexing(
                extensions.storage_buffer_array_dynamic_indexing,
            );
        let mut info = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queue_info)
            .enabled_extension_names(&ext_names)
            .enabled_features(&features)
            .push_next(&mut v12);
        if extensions.memory_priority {
            info = info.push_next(&mut prio);
        }
        if extensions.pageable_device_local_memory {
            info = info.push_next(&mut page);
        }
        if extensions.dynamic_rendering {
            info = info.push_next(&mut v13);
        }
        // SAFETY: the adapter is suitable (1.2, timeline feature, compute family); every feature
        // chained is supported, every extension listed is supported; pointers live for the call.
        let device = unsafe { instance.raw.create_device(adapter.handle, &info, None) }
            .map_err(vk_err("vkCreateDevice"))?;
        // SAFETY: family/index 0 was requested above.
        let queue = unsafe { device.get_device_queue(family, 0) };
        log::info!(
            "device #{} {} ({:?}, Vulkan {}, {}); memory_budget={} memory_priority={} pageable={}",
            adapter.index,
            adapter.name,
            adapter.device_type,
            adapter::format_version(adapter.api_version),
            adapter.driver,
            extensions.memory_budget,
            extensions.memory_priority,
            extensions.pageable_device_local_memory
        );
        // SAFETY: device was just created with what finish() needs and is owned by us.
        unsafe {
            Self::finish(
                instance,
                adapter,
                DeviceParts {
                    device,
                    queue,
                    queue_family: family,
                    extensions,
                    owns_device: true,
                },
                options,
            )
        }
    }

    /// Shorthand: [`Context::new`] with default options and the environment applied.
    pub fn from_env() -> Result<Self> {
        Self::new(&ContextOptions::default().with_env()?)
    }

    /// Wraps a host engine's own Vulkan objects. understory never destroys what it did not
    /// create: dropping the context waits for the device to be idle, frees understory's memory,
    /// destroys its own semaphore, pool and messenger, and leaves the rest to the host.
    ///
    /// # Safety
    /// The caller must guarantee that:
    /// - `instance` was created from `entry` with `apiVersion >= 1.2`
    ///   (`instance_api_version` says which), and `VK_EXT_debug_utils` is enabled on it if
    ///   `debug_utils_enabled` is true;
    /// - `device` was created from `physical_device` of `instance` with the Vulkan 1.2 feature
    ///   `timelineSemaphore` enabled;
    /// - every extension in `enabled_extensions` was enabled on the device, and with
    ///   `memory_priority` also the `memoryPriority` feature (and `pageableDeviceLocalMemory` with
    ///   `pageable_device_local_memory`);
    /// - `queue` was obtained from `device` in family `queue_family_index`, which supports compute;
    /// - while the context is alive the host does not submit to `queue` at the same time as
    ///   understory does (take [`Context::queue`]'s lock around host submissions to the same queue);
    /// - all these objects outlive the context.
    pub unsafe fn from_raw(host: HostHandles, options: &ContextOptions) -> Result<Self> {
        if host.instance_api_version < vk::API_VERSION_1_2 {
            return Err(Error::Unsupported(format!(
                "host instance is Vulkan {}, understory needs 1.2",
                adapter::format_version(host.instance_api_version)
            )));
        }
        // SAFETY: the caller guarantees the instance and its debug-utils state.
        let instance = unsafe {
            Instance::from_raw(
                host.entry,
                host.instance,
                host.instance_api_version,
                host.debug_utils_enabled,
            )
        }?;
        let adapters = instance.adapters()?;
        let adapter = adapters
            .into_iter()
            .find(|a| a.handle == host.physical_device)
            .ok_or_else(|| {
                Error::InvalidInput("physical_device does not belong to the host instance".into())
            })?;
        if let Some(why) = adapter.unsuitable_because() {
            return Err(Error::Unsupported(format!(
                "host device {}: {why}",
                adapter.name
            )));
        }
        // SAFETY: as above.
        let families = unsafe {
            instance
                .raw
                .get_physical_device_queue_family_properties(adapter.handle)
        };
        let family_ok = families
            .get(host.queue_family_index as usize)
            .is_some_and(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE));
        if !family_ok {
            return Err(Error::InvalidInput(format!(
                "queue family {} does not exist or lacks compute",
                host.queue_family_index
            )));
        }
        let mut extensions = host.enabled_extensions;
        extensions.memory_budget &= adapter.extensions.memory_budget;
        // SAFETY: the caller guarantees the device contract above; we do not own the device.
        unsafe {
            Self::finish(
                instance,
                adapter,
                DeviceParts {
                    device: host.device,
                    queue: host.queue,
                    queue_family: host.queue_family_index,
                    extensions,
                    owns_device: false,
                },
                options,
            )
        }
    }

    /// # Safety
    /// `device` must satisfy [`Context::from_raw`]'s contract; if `owns_device`, it is destroyed
    /// by this context (also on the error path here).
    unsafe fn finish(
        instance: Instance,
        adapter: Adapter,
        parts: DeviceParts,
        options: &ContextOptions,
    ) -> Result<Self> {
        let DeviceParts {
            device,
            queue,
            queue_family,
            extensions,
            owns_device,
        } = parts;
        if !(1..=MAX_FRAMES_IN_FLIGHT).contains(&options.frames_in_flight) {
            if owns_device {
                // SAFETY: nothing was created from it yet.
                unsafe { device.destroy_device(None) };
            }
            return Err(Error::InvalidInput(format!(
                "frames_in_flight {} (1..={MAX_FRAMES_IN_FLIGHT})",
                options.frames_in_flight
            )));
        }
        let destroy_device = |device: &ash::Device| {
            if owns_device {
                // SAFETY: nothing else was created from it that is still alive.
                unsafe { device.destroy_device(None) };
            }
        };
        // SAFETY: device has timeline semaphores (contract).
        let mut timeline = match unsafe { Timeline::new(&device) } {
            Ok(t) => t,
            Err(e) => {
                destroy_device(&device);
                return Err(e);
            }
        };
        let pool_info = vk::CommandPoolCreateInfo::default()
            .queue_family_index(queue_family)
            .flags(vk::CommandPoolCreateFlags::TRANSIENT);
        // SAFETY: valid info for this device.
        let pool = match unsafe { device.create_command_pool(&pool_info, None) } {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: never used.
                unsafe { timeline.destroy() };
                destroy_device(&device);
                return Err(Error::vk("vkCreateCommandPool", e));
            }
        };
        // SAFETY: the physical device belongs to the instance, which outlives the source.
        let source = unsafe {
            DriverBudget::new(
                instance.raw.clone(),
                adapter.handle,
                extensions.memory_budget,
            )
        };
        // SAFETY: the handles are live and related; pageable is only set when enabled.
        let memory = match unsafe {
            Memory::new(
                &instance.raw,
                &device,
                adapter.handle,
                options.memory.clone(),
                HeapBudgets::new(Box::new(source)),
                extensions.pageable_device_local_memory,
            )
        } {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: never used.
                unsafe {
                    device.destroy_command_pool(pool, None);
                    timeline.destroy();
                }
                destroy_device(&device);
                return Err(e);
            }
        };
        Ok(Self {
            device,
            adapter,
            queue: Mutex::new(queue),
            queue_family,
            extensions,
            owns_device,
            memory,
            timeline,
            command_pool: Mutex::new(pool),
            frames_in_flight: options.frames_in_flight,
            shutdown_report: None,
            instance,
        })
    }

    /// The ash device.
    pub fn device(&self) -> &ash::Device {
        &self.device
    }

    /// The ash instance.
    pub fn instance(&self) -> &ash::Instance {
        self.instance.raw()
    }

    /// The physical device and what it offers.
    pub fn adapter(&self) -> &Adapter {
        &self.adapter
    }

    /// The optional extensions that are enabled on the device.
    pub fn extensions(&self) -> OptionalExtensions {
        self.extensions
    }

    /// Whether validation messages reach [`Context::canary`].
    pub fn validation_enabled(&self) -> bool {
        self.instance.validation_enabled()
    }

    /// Counts validation warnings and errors (empty when validation is off).
    pub fn canary(&self) -> &Arc<Canary> {
        self.instance.canary()
    }

    /// The queue, locked. Hold the guard while submitting to it from outside understory.
    pub fn queue(&self) -> MutexGuard<'_, vk::Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The queue family index.
    pub fn queue_family(&self) -> u32 {
        self.queue_family
    }

    /// The queue's timeline.
    pub fn timeline(&self) -> &Timeline {
        &self.timeline
    }

    /// The allocator.
    pub fn memory(&self) -> &Memory {
        &self.memory
    }

    /// A budget source reading this device's heaps.
    pub fn budget_source(&self) -> DriverBudget {
        // SAFETY: the physical device belongs to our instance, which outlives any use the caller
        // can make of the source while the context lives; memory_budget is only set when
        // supported.
        unsafe {
            DriverBudget::new(
                self.instance.raw.clone(),
                self.adapter.handle,
                self.extensions.memory_budget,
            )
        }
    }

    /// A refreshable per-heap budget for this device.
    pub fn heap_budgets(&self) -> HeapBudgets {
        HeapBudgets::new(Box::new(self.budget_source()))
    }

    /// Records with `record` into a fresh primary command buffer, submits it on the timeline and
    /// waits for it. For set-up and tests; the frame loop records into the host's buffers.
    pub fn submit_and_wait(
        &self,
        record: impl FnOnce(vk::CommandBuffer) -> Result<()>,
    ) -> Result<u64> {
        let pool = self.command_pool.lock().unwrap_or_else(|p| p.into_inner());
        let alloc = vk::CommandBufferAllocateInfo::default()
            .command_pool(*pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(1);
        // SAFETY: the pool is ours and locked.
        let cmd = unsafe { self.device.allocate_command_buffers(&alloc) }
            .map_err(vk_err("vkAllocateCommandBuffers"))?[0];
        let result = (|| {
            let begin = vk::CommandBufferBeginInfo::default()
                .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
            // SAFETY: a fresh command buffer in the initial state.
            unsafe { self.device.begin_command_buffer(cmd, &begin) }
                .map_err(vk_err("vkBeginCommandBuffer"))?;
            record(cmd)?;
            // SAFETY: recording.
            unsafe { self.device.end_command_buffer(cmd) }.map_err(vk_err("vkEndCommandBuffer"))?;
            let queue = self.queue();
            // SAFETY: queue locked; cmd executable; the closure's resources are the caller's to
            // keep alive, and we wait for completion before returning.
            let value = unsafe { self.timeline.submit(*queue, &[cmd]) }?;
            drop(queue);
            if !self.timeline.wait(value, Duration::from_secs(60))? {
                return Err(Error::Vulkan {
                    call: "vkWaitSemaphores (60 s)",
                    result: vk::Result::TIMEOUT,
                });
            }
            Ok(value)
        })();
        if result.is_ok() {
            // SAFETY: the submission completed; the pool is locked.
            unsafe { self.device.free_command_buffers(*pool, &[cmd]) };
        } else {
            // Not known to be idle: wait before freeing.
            // SAFETY: waiting on our own device.
            let _ = unsafe { self.device.device_wait_idle() };
            // SAFETY: idle now; the pool is locked.
            unsafe { self.device.free_command_buffers(*pool, &[cmd]) };
        }
        result
    }

    /// Frames the CPU may run ahead of the GPU.
    pub fn frames_in_flight(&self) -> u32 {
        self.frames_in_flight
    }

    /// Submits command buffers to the queue, signalling the next timeline value (returned).
    ///
    /// # Safety
    /// The command buffers must be executable, from this device, and everything they use must
    /// stay alive until the returned value completes (retire it with that value).
    pub unsafe fn submit(&self, command_buffers: &[vk::CommandBuffer]) -> Result<u64> {
        let queue = self.queue();
        // SAFETY: queue locked; the rest is the caller's contract.
        unsafe { self.timeline.submit(*queue, command_buffers) }
    }

    /// Queues a buffer or image to be freed once the GPU completes `last_used`.
    /// See [`Memory::retire`] for the errors.
    ///
    /// Retiring takes the resource by value, so retiring it twice does not compile:
    ///
    /// ```compile_fail,E0382
    /// # fn f(ctx: &understory::gpu::context::Context, b: understory::gpu::memory::Buffer) {
    /// ctx.retire(b, 1).unwrap();
    /// ctx.retire(b, 2).unwrap(); // use of moved value
    /// # }
    /// ```
    pub fn retire(&self, resource: impl Into<Retirable>, last_used: u64) -> Result<()> {
        self.memory
            .retire(resource, last_used, self.timeline.last_submitted())
    }

    /// Frees what the GPU has finished with. Never blocks. Returns how many were freed.
    pub fn collect(&self) -> Result<usize> {
        let completed = self.timeline.completed_value()?;
        Ok(self
            .memory
            .collect(completed, self.timeline.last_submitted()))
    }

    /// Start of a frame: waits only if the CPU is more than `frames_in_flight` submissions
    /// ahead, frees what the GPU has finished with, and reads the budget once.
    pub fn begin_frame(&self) -> Result<FrameStart> {
        let last = self.timeline.last_submitted();
        let must_have = (last + 1).saturating_sub(u64::from(self.frames_in_flight));
        if must_have > 0
            && self.timeline.completed_value()? < must_have
            && !self.timeline.wait(must_have, Duration::from_secs(10))?
        {
            return Err(Error::Vulkan {
                call: "begin_frame: frame throttle wait (10 s)",
                result: vk::Result::TIMEOUT,
            });
        }
        let completed = self.timeline.completed_value()?;
        let freed = self.memory.collect(completed, last);
        let heaps = self.memory.refresh_budget()?;
        Ok(FrameStart {
            completed,
            freed,
            heaps,
        })
    }

    /// Waits for the last submission, drains the retire queue, frees everything, and reports
    /// leaks (logged with name and category). Idempotent; also runs on drop.
    pub fn shutdown(&mut self) -> ShutdownReport {
        if let Some(r) = &self.shutdown_report {
            return r.clone();
        }
        let last = self.timeline.last_submitted();
        match self.timeline.wait(last, Duration::from_secs(30)) {
            Ok(true) => {}
            Ok(false) => log::error!("shutdown: timeline value {last} not reached in 30 s"),
            Err(e) => log::error!("shutdown: waiting for timeline value {last}: {e}"),
        }
        let _q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: waiting for our device; the queue lock keeps our own submissions out.
        if let Err(e) = unsafe { self.device.device_wait_idle() } {
            log::error!("vkDeviceWaitIdle at shutdown: {e}");
        }
        // SAFETY: the device is idle.
        let report = unsafe { self.memory.shutdown() };
        let mut pool = self.command_pool.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: idle; every command buffer from the pool is done.
        unsafe { self.device.destroy_command_pool(*pool, None) };
        *pool = vk::CommandPool::null();
        // SAFETY: idle.
        unsafe { self.timeline.destroy() };
        if report.leaks.is_empty() {
            log::debug!("shutdown: {} drained, no leaks", report.drained);
        } else {
            log::error!("shutdown: {} leaked allocation(s)", report.leaks.len());
        }
        self.shutdown_report = Some(report.clone());
        report
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        self.shutdown();
        // SAFETY: shutdown made the device idle and shut memory down.
        unsafe { self.memory.destroy_late_orphans() };
        if self.owns_device {
            // SAFETY: idle, and every child object understory created is destroyed.
            unsafe { self.device.destroy_device(None) };
        }
    }
}
