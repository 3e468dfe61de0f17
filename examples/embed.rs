//! How a host engine embeds understory: the host owns the instance, device and queue; it hands
//! them to `Context::from_raw`, runs understory's work, drops the context, and destroys its own
//! objects. Run: `cargo run --example embed` (validation on when the layer is installed).
//!
//! The integration test `tests/embedding.rs` runs this same code with validation required.

use std::sync::Arc;

use ash::vk;
use understory::gpu::adapter::OptionalExtensions;
use understory::gpu::compute::memory_barrier;
use understory::gpu::context::{Context, ContextOptions, HostHandles};
use understory::gpu::debug::{Canary, messenger_create_info};
use understory::gpu::memory::{BufferDesc, MemoryLocation};
use understory::gpu::scan::{BlockScan, block_scan_cpu};
use understory::policy::category::Category;

/// What the host saw.
pub struct Outcome {
    /// Validation messages understory's canary counted while the context lived.
    pub understory_messages: u64,
    /// Validation messages the host's own messenger counted, over the whole run.
    pub host_messages: u64,
    /// Whether the GPU scan equalled the CPU reference.
    pub scan_matches: bool,
    /// Name of the device used.
    pub device_name: String,
}

/// Host objects, created the way an engine would.
struct Host {
    entry: ash::Entry,
    instance: ash::Instance,
    debug: Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
    physical_device: vk::PhysicalDevice,
    device: ash::Device,
    family: u32,
    queue: vk::Queue,
}

impl Host {
    fn new(validation: bool, canary: &Arc<Canary>) -> Result<Self, Box<dyn std::error::Error>> {
        // SAFETY: loading the system Vulkan loader.
        let entry = unsafe { ash::Entry::load()? };
        let layers = [c"VK_LAYER_KHRONOS_validation".as_ptr()];
        let exts = [ash::ext::debug_utils::NAME.as_ptr()];
        let app = vk::ApplicationInfo::default()
            .application_name(c"host engine")
            .api_version(vk::API_VERSION_1_2);
        let mut dbg = messenger_create_info(canary);
        let mut info = vk::InstanceCreateInfo::default().application_info(&app);
        if validation {
            info = info
                .enabled_layer_names(&layers)
                .enabled_extension_names(&exts)
                .push_next(&mut dbg);
        }
        // SAFETY: valid create info; the canary outlives the instance (held by the caller).
        let instance = unsafe { entry.create_instance(&info, None)? };
        let debug = if validation {
            let loader = ash::ext::debug_utils::Instance::new(&entry, &instance);
            // SAFETY: debug utils is enabled; destroyed before the instance.
            let m = unsafe {
                loader.create_debug_utils_messenger(&messenger_create_info(canary), None)?
            };
            Some((loader, m))
        } else {
            None
        };
        // The host's own device choice: the first device with a graphics+compute queue.
        // SAFETY: live instance.
        let pds = unsafe { instance.enumerate_physical_devices()? };
        let (physical_device, family) = pds
            .iter()
            .find_map(|&pd| {
                // SAFETY: pd belongs to instance.
                let fams = unsafe { instance.get_physical_device_queue_family_properties(pd) };
                fams.iter()
                    .position(|f| {
                        f.queue_flags
                            .contains(vk::QueueFlags::GRAPHICS | vk::QueueFlags::COMPUTE)
                    })
                    .map(|i| (pd, i as u32))
            })
            .ok_or("no device with a graphics+compute queue")?;
        // What understory's # Safety asks for: Vulkan 1.2 timelineSemaphore enabled.
        let mut v12 = vk::PhysicalDeviceVulkan12Features::default().timeline_semaphore(true);
        let prio = [1.0];
        let queues = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(family)
            .queue_priorities(&prio)];
        let info = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queues)
            .push_next(&mut v12);
        // SAFETY: valid create info; timeline semaphores are core in 1.2.
        let device = unsafe { instance.create_device(physical_device, &info, None)? };
        // SAFETY: family/index 0 was created above.
        let queue = unsafe { device.get_device_queue(family, 0) };
        Ok(Self {
            entry,
            instance,
            debug,
            physical_device,
            device,
            family,
            queue,
        })
    }

    fn destroy(self) {
        // SAFETY: understory's context is gone; the host's objects are idle and destroyed
        // children-first.
        unsafe {
            let _ = self.device.device_wait_idle();
            self.device.destroy_device(None);
            if let Some((loader, m)) = &self.debug {
                loader.destroy_debug_utils_messenger(*m, None);
            }
            self.instance.destroy_instance(None);
        }
    }
}

/// The whole flow: host set-up, understory work, understory teardown, host teardown.
pub fn run(validation: bool) -> Result<Outcome, Box<dyn std::error::Error>> {
    let host_canary = Canary::new();
    let host = Host::new(validation, &host_canary)?;
    // SAFETY: Host::new enabled what from_raw's # Safety lists (1.2 instance, timeline feature,
    // compute queue, debug utils iff validation), nobody else submits to the queue meanwhile,
    // and every handle outlives the context (destroyed after it below).
    let ctx = unsafe {
        Context::from_raw(
            HostHandles {
                entry: host.entry.clone(),
                instance: host.instance.clone(),
                instance_api_version: vk::API_VERSION_1_2,
                debug_utils_enabled: validation,
                physical_device: host.physical_device,
                device: host.device.clone(),
                queue_family_index: host.family,
                queue: host.queue,
                enabled_extensions: OptionalExtensions::default(),
            },
            &ContextOptions::default(),
        )?
    };
    let device_name = ctx.adapter().name.clone();
    let input: Vec<u32> = (0..10_000u32).map(|i| i % 17).collect();
    let n = input.len() as u64;
    let mem = ctx.memory();
    let desc = |name, size, location| BufferDesc {
        name,
        size,
        usage: vk::BufferUsageFlags::STORAGE_BUFFER,
        location,
        category: Category::Other,
    };
    let mut scan = BlockScan::new(&ctx, 1)?;
    let mut inp = mem.create_buffer(&desc("input", n * 4, MemoryLocation::CpuToGpu))?;
    let out = mem.create_buffer(&desc("output", n * 4, MemoryLocation::GpuToCpu))?;
    let sums = mem.create_buffer(&desc("sums", n.div_ceil(256) * 4, MemoryLocation::GpuToCpu))?;
    inp.mapped_mut()
        .ok_or("not mapped")?
        .copy_from_slice(bytemuck::cast_slice(&input));
    let set = scan.bind(&ctx, &inp, &out, &sums, n as u32)?;
    // The host records into its own command buffer; here understory's one-shot helper stands in.
    let value = ctx.submit_and_wait(|cmd| {
        // SAFETY: cmd is recording; buffers live until the wait returns.
        unsafe { scan.record(&ctx, cmd, set, n as u32) }?;
        // SAFETY: recording; makes the shader writes visible to the host read after the wait.
        unsafe {
            memory_barrier(
                &ctx,
                cmd,
                (
                    vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::AccessFlags::SHADER_WRITE,
                ),
                (vk::PipelineStageFlags::HOST, vk::AccessFlags::HOST_READ),
            )
        };
        Ok(())
    })?;
    let (cpu_out, cpu_sums) = block_scan_cpu(&input);
    let gpu_out: &[u32] = bytemuck::cast_slice(out.mapped().ok_or("not mapped")?);
    let gpu_sums: &[u32] = bytemuck::cast_slice(sums.mapped().ok_or("not mapped")?);
    let scan_matches = gpu_out == cpu_out.as_slice() && gpu_sums == cpu_sums.as_slice();
    for b in [inp, out, sums] {
        ctx.retire(b, value)?;
    }
    // SAFETY: the submission was waited for.
    unsafe { scan.destroy(&ctx) };
    let understory_canary = ctx.canary().clone();
    let mut ctx = ctx;
    let report = ctx.shutdown();
    if !report.leaks.is_empty() {
        return Err(format!("understory leaked {:?}", report.leaks).into());
    }
    drop(ctx);
    host.destroy();
    Ok(Outcome {
        understory_messages: understory_canary.total(),
        host_messages: host_canary.total(),
        scan_matches,
        device_name,
    })
}

#[allow(dead_code)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let validation = std::env::var("UNDERSTORY_VALIDATION").map_or(true, |v| v != "0");
    let o = run(validation)?;
    println!(
        "embedded understory on {}: scan {}, validation messages: understory {}, host {}",
        o.device_name,
        if o.scan_matches {
            "matches the CPU"
        } else {
            "MISMATCH"
        },
        o.understory_messages,
        o.host_messages
    );
    if !o.scan_matches || o.understory_messages + o.host_messages > 0 {
        std::process::exit(1);
    }
    Ok(())
}
