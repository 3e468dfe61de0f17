//! An engine that owns everything and links understory: its own instance, device, queue,
//! command buffers, fences, semaphores and render targets (with its own `vkAllocateMemory`).
//! It asks understory what to enable before creating the device, hands the objects over with
//! `Context::from_raw`, and every frame records understory's vegetation uploads, GPU cull and
//! indirect draws into its own command buffer, inside its own `vkCmdBeginRendering`, then
//! submits with its own synchronization and tells understory which signal marks the frame done.
//! After understory is gone, the engine's objects still work.
//!
//! Run: `cargo run --example host_engine -- [frames] [timeline|host-timeline|fence]`
//! (validation on when the layer is installed). `tests/host_engine.rs` runs this code as a test.

#![allow(clippy::too_many_lines)]

use std::sync::Arc;
use std::time::Duration;

use ash::vk;
use glam::{Mat4, Vec2, Vec3};
use understory::gpu::context::{Context, ContextOptions, HostHandles};
use understory::gpu::cull::{Compaction, CullPass, CullView};
use understory::gpu::debug::{Canary, messenger_create_info};
use understory::gpu::draw::{DrawFrame, DrawPass, tree_billboard};
use understory::gpu::requirements::{Capabilities, DeviceRequirements};
use understory::gpu::timeline::FrameSignal;
use understory::vegetation::{
    PatchDesc, PatchId, SpeciesDesc, Vegetation, VegetationConfig, Viewer,
};
use understory::world::instance::Instance;

type BoxError = Box<dyn std::error::Error>;

/// How the engine tells understory that a frame is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sync {
    /// The engine's submission also signals understory's timeline semaphore.
    Timeline,
    /// The engine signals its own timeline semaphore; understory reads it.
    HostTimeline,
    /// The engine waits on its own fences and reports completion.
    Fence,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Frames to render.
    pub frames: u32,
    /// The synchronization the engine uses.
    pub sync: Sync,
    /// Whether to run under the Khronos validation layer (with synchronization validation).
    pub validation: bool,
    /// Also enable GPU-assisted validation.
    pub gpu_assisted: bool,
    /// Trees in the world.
    pub trees: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            frames: 240,
            sync: Sync::Fence,
            validation: true,
            gpu_assisted: false,
            trees: 20_000,
        }
    }
}

/// What the engine saw.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Device name.
    pub device: String,
    /// Frames rendered.
    pub frames: u32,
    /// Validation messages counted by the engine's own messenger, teardown included.
    pub host_messages: u64,
    /// Validation messages understory's canary counted while the context lived.
    pub understory_messages: u64,
    /// Allocations understory still held at shutdown.
    pub leaks: usize,
    /// Patches despawned and spawned again during the run.
    pub churned: u64,
    /// Lowest vegetation budget during the squeeze, and the held bytes then.
    pub squeezed_budget: u64,
    /// Frames after the squeeze settled whose held bytes passed the budget.
    pub over_budget_frames: u32,
    /// Deferred frees understory completed.
    pub deferred_frees: u64,
    /// Pixels of the last frame that are not sky (trees and ground).
    pub drawn_pixels: u64,
    /// Whether the engine could still use its device, queue and images after understory.
    pub host_usable_after: bool,
}

const COLOR: vk::Format = vk::Format::R8G8B8A8_UNORM;
const DEPTH: vk::Format = vk::Format::D32_SFLOAT;
const EXTENT: vk::Extent2D = vk::Extent2D {
    width: 320,
    height: 180,
};
const IN_FLIGHT: usize = 2;

/// An image with memory of the engine's own allocation.
struct HostImage {
    image: vk::Image,
    memory: vk::DeviceMemory,
    view: vk::ImageView,
}

/// The engine's Vulkan objects.
struct Engine {
    _entry: ash::Entry,
    instance: ash::Instance,
    debug: Option<(ash::ext::debug_utils::Instance, vk::DebugUtilsMessengerEXT)>,
    api_version: u32,
    physical_device: vk::PhysicalDevice,
    device: ash::Device,
    family: u32,
    queue: vk::Queue,
    enabled: understory::gpu::adapter::DeviceFeatures,
    pool: vk::CommandPool,
    cmds: Vec<vk::CommandBuffer>,
    fences: Vec<vk::Fence>,
    timeline: vk::Semaphore,
    color: HostImage,
    depth: HostImage,
    readback: (vk::Buffer, vk::DeviceMemory),
}

fn find_memory(
    instance: &ash::Instance,
    pd: vk::PhysicalDevice,
    bits: u32,
    want: vk::MemoryPropertyFlags,
) -> Option<u32> {
    // SAFETY: pd belongs to instance.
    let props = unsafe { instance.get_physical_device_memory_properties(pd) };
    props
        .memory_types_as_slice()
        .iter()
        .enumerate()
        .find(|(i, t)| bits & (1 << i) != 0 && t.property_flags.contains(want))
        .map(|(i, _)| i as u32)
}

impl Engine {
    fn new(options: &Options, canary: &Arc<Canary>) -> Result<Self, BoxError> {
        // SAFETY: loading the system Vulkan loader.
        let entry = unsafe { ash::Entry::load()? };
        // SAFETY: a global query.
        let loader =
            unsafe { entry.try_enumerate_instance_version()? }.unwrap_or(vk::API_VERSION_1_0);
        let api_version = loader.min(vk::API_VERSION_1_3);
        let layers = [c"VK_LAYER_KHRONOS_validation".as_ptr()];
        let exts = [
            ash::ext::debug_utils::NAME.as_ptr(),
            ash::ext::validation_features::NAME.as_ptr(),
        ];
        let app = vk::ApplicationInfo::default()
            .application_name(c"host engine")
            .api_version(api_version);
        let mut dbg = messenger_create_info(canary);
        let mut enables = vec![vk::ValidationFeatureEnableEXT::SYNCHRONIZATION_VALIDATION];
        if options.gpu_assisted {
            enables.push(vk::ValidationFeatureEnableEXT::GPU_ASSISTED);
        }
        let mut features =
            vk::ValidationFeaturesEXT::default().enabled_validation_features(&enables);
        let mut info = vk::InstanceCreateInfo::default().application_info(&app);
        if options.validation {
            info = info
                .enabled_layer_names(&layers)
                .enabled_extension_names(&exts)
                .push_next(&mut dbg)
                .push_next(&mut features);
        }
        // SAFETY: valid create info; the canary outlives the instance (the caller holds it).
        let instance = unsafe { entry.create_instance(&info, None)? };
        let debug = if options.validation {
            let loader = ash::ext::debug_utils::Instance::new(&entry, &instance);
            // SAFETY: debug utils is enabled; destroyed before the instance.
            let m = unsafe {
                loader.create_debug_utils_messenger(&messenger_create_info(canary), None)?
            };
            Some((loader, m))
        } else {
            None
        };

        // What understory needs, asked before the device exists.
        let req = DeviceRequirements::for_capabilities(Capabilities::ALL);
        // SAFETY: live instance.
        let pds = unsafe { instance.enumerate_physical_devices()? };
        let mut chosen = None;
        for pd in pds {
            // SAFETY: pd comes from instance, which is >= 1.1.
            let missing = unsafe { req.unsupported_by(&instance, pd)? };
            // SAFETY: as above.
            let families = unsafe { instance.get_physical_device_queue_family_properties(pd) };
            let family = families
                .iter()
                .position(|f| f.queue_flags.contains(req.queue_flags));
            match (missing.is_empty(), family) {
                (true, Some(f)) => {
                    chosen = Some((pd, f as u32));
                    break;
                }
                _ => eprintln!("host: skipping a device, missing {missing:?}"),
            }
        }
        let (physical_device, family) = chosen.ok_or("no device has what understory needs")?;
        // What to enable on this device: understory's required extensions and features, and
        // the optional ones it supports (the real memory budget, faster culling).
        // SAFETY: physical_device comes from instance.
        let adapter =
            unsafe { understory::gpu::adapter::Adapter::query(&instance, 0, physical_device)? };
        let plan = req.plan(&adapter);
        let names: Vec<*const std::ffi::c_char> =
            plan.extensions.iter().map(|n| n.as_ptr()).collect();
        // The engine's own features, then understory's on top.
        let mut core = vk::PhysicalDeviceFeatures::default();
        let mut v12 = vk::PhysicalDeviceVulkan12Features::default();
        let mut v13 = vk::PhysicalDeviceVulkan13Features::default().synchronization2(false);
        plan.features.enable(&mut core, &mut v12, &mut v13);
        let priorities = [1.0f32];
        let queues = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(family)
            .queue_priorities(&priorities)];
        let info = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queues)
            .enabled_extension_names(&names)
            .enabled_features(&core)
            .push_next(&mut v12)
            .push_next(&mut v13);
        // SAFETY: every extension and feature requested is supported (checked above).
        let device = unsafe { instance.create_device(physical_device, &info, None)? };
        // SAFETY: family/index 0 was requested.
        let queue = unsafe { device.get_device_queue(family, 0) };
        let enabled = plan.enabled;

        let pool_info = vk::CommandPoolCreateInfo::default()
            .queue_family_index(family)
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
        // SAFETY: valid info.
        let pool = unsafe { device.create_command_pool(&pool_info, None)? };
        let alloc = vk::CommandBufferAllocateInfo::default()
            .command_pool(pool)
            .level(vk::CommandBufferLevel::PRIMARY)
            .command_buffer_count(IN_FLIGHT as u32);
        // SAFETY: the pool is ours.
        let cmds = unsafe { device.allocate_command_buffers(&alloc)? };
        let fences = (0..IN_FLIGHT)
            .map(|_| {
                // SAFETY: valid info; signalled so the first wait returns.
                unsafe {
                    device.create_fence(
                        &vk::FenceCreateInfo::default().flags(vk::FenceCreateFlags::SIGNALED),
                        None,
                    )
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut ty = vk::SemaphoreTypeCreateInfo::default()
            .semaphore_type(vk::SemaphoreType::TIMELINE)
            .initial_value(0);
        // SAFETY: timeline semaphores are enabled (understory's requirement).
        let timeline = unsafe {
            device.create_semaphore(&vk::SemaphoreCreateInfo::default().push_next(&mut ty), None)?
        };
        let image = |format, usage, aspect| -> Result<HostImage, BoxError> {
            let info = vk::ImageCreateInfo::default()
                .image_type(vk::ImageType::TYPE_2D)
                .format(format)
                .extent(vk::Extent3D {
                    width: EXTENT.width,
                    height: EXTENT.height,
                    depth: 1,
                })
                .mip_levels(1)
                .array_layers(1)
                .samples(vk::SampleCountFlags::TYPE_1)
                .tiling(vk::ImageTiling::OPTIMAL)
                .usage(usage);
            // SAFETY: valid info.
            let image = unsafe { device.create_image(&info, None)? };
            // SAFETY: a live image.
            let req = unsafe { device.get_image_memory_requirements(image) };
            let ty = find_memory(
                &instance,
                physical_device,
                req.memory_type_bits,
                vk::MemoryPropertyFlags::DEVICE_LOCAL,
            )
            .ok_or("no device-local memory")?;
            // SAFETY: valid allocation info: the engine's own vkAllocateMemory.
            let memory = unsafe {
                device.allocate_memory(
                    &vk::MemoryAllocateInfo::default()
                        .allocation_size(req.size)
                        .memory_type_index(ty),
                    None,
                )?
            };
            // SAFETY: unbound image, fitting memory.
            unsafe { device.bind_image_memory(image, memory, 0)? };
            let view_info = vk::ImageViewCreateInfo::default()
                .image(image)
                .view_type(vk::ImageViewType::TYPE_2D)
                .format(format)
                .subresource_range(range(aspect));
            // SAFETY: a bound image.
            let view = unsafe { device.create_image_view(&view_info, None)? };
            Ok(HostImage {
                image,
                memory,
                view,
            })
        };
        let color = image(
            COLOR,
            vk::ImageUsageFlags::COLOR_ATTACHMENT
                | vk::ImageUsageFlags::TRANSFER_SRC
                | vk::ImageUsageFlags::TRANSFER_DST,
            vk::ImageAspectFlags::COLOR,
        )?;
        let depth = image(
            DEPTH,
            vk::ImageUsageFlags::DEPTH_STENCIL_ATTACHMENT,
            vk::ImageAspectFlags::DEPTH,
        )?;
        let size = u64::from(EXTENT.width * EXTENT.height * 4);
        // SAFETY: valid info.
        let buffer = unsafe {
            device.create_buffer(
                &vk::BufferCreateInfo::default()
                    .size(size)
                    .usage(vk::BufferUsageFlags::TRANSFER_DST),
                None,
            )?
        };
        // SAFETY: a live buffer.
        let breq = unsafe { device.get_buffer_memory_requirements(buffer) };
        let ty = find_memory(
            &instance,
            physical_device,
            breq.memory_type_bits,
            vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT,
        )
        .ok_or("no host-visible memory")?;
        // SAFETY: valid allocation info.
        let memory = unsafe {
            device.allocate_memory(
                &vk::MemoryAllocateInfo::default()
                    .allocation_size(breq.size)
                    .memory_type_index(ty),
                None,
            )?
        };
        // SAFETY: unbound buffer, fitting memory.
        unsafe { device.bind_buffer_memory(buffer, memory, 0)? };
        Ok(Self {
            _entry: entry,
            instance,
            debug,
            api_version,
            physical_device,
            device,
            family,
            queue,
            enabled,
            pool,
            cmds,
            fences,
            timeline,
            color,
            depth,
            readback: (buffer, memory),
        })
    }

    /// The handles understory gets.
    fn handles(&self) -> HostHandles {
        HostHandles {
            entry: self._entry.clone(),
            instance: self.instance.clone(),
            instance_api_version: self.api_version,
            debug_utils_enabled: self.debug.is_some(),
            physical_device: self.physical_device,
            device: self.device.clone(),
            queue_family_index: self.family,
            queue: self.queue,
            enabled: self.enabled,
            capabilities: Capabilities::ALL,
        }
    }

    /// Clears the colour image and reads it back, on the engine's own queue with its own
    /// fence: proof the device, queue and images still work.
    fn clear_and_read(&self) -> Result<[u8; 4], BoxError> {
        let d = &self.device;
        let cmd = self.cmds[0];
        let fence = self.fences[0];
        // SAFETY: the fence guards the last use of cmd 0; everything below is the engine's own.
        unsafe {
            d.wait_for_fences(&[fence], true, u64::MAX)?;
            d.reset_fences(&[fence])?;
            d.reset_command_buffer(cmd, vk::CommandBufferResetFlags::empty())?;
            d.begin_command_buffer(cmd, &vk::CommandBufferBeginInfo::default())?;
            let to_dst = barrier(
                self.color.image,
                vk::ImageAspectFlags::COLOR,
                (vk::ImageLayout::UNDEFINED, vk::AccessFlags::empty()),
                (
                    vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                    vk::AccessFlags::TRANSFER_WRITE,
                ),
            );
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::TOP_OF_PIPE,
                vk::PipelineStageFlags::TRANSFER,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &[to_dst],
            );
            d.cmd_clear_color_image(
                cmd,
                self.color.image,
                vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                &vk::ClearColorValue {
                    float32: [1.0, 0.0, 1.0, 1.0],
                },
                &[range(vk::ImageAspectFlags::COLOR)],
            );
            let to_src = barrier(
                self.color.image,
                vk::ImageAspectFlags::COLOR,
                (
                    vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                    vk::AccessFlags::TRANSFER_WRITE,
                ),
                (
                    vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                    vk::AccessFlags::TRANSFER_READ,
                ),
            );
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::TRANSFER,
                vk::PipelineStageFlags::TRANSFER,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &[to_src],
            );
            copy_to_readback(d, cmd, self.color.image, self.readback.0);
            d.end_command_buffer(cmd)?;
            let cmds = [cmd];
            let submit = vk::SubmitInfo::default().command_buffers(&cmds);
            d.queue_submit(self.queue, &[submit], fence)?;
            d.wait_for_fences(&[fence], true, 10_000_000_000)?;
        }
        let px = self.read_pixels()?;
        Ok([px[0], px[1], px[2], px[3]])
    }

    fn read_pixels(&self) -> Result<Vec<u8>, BoxError> {
        let size = (EXTENT.width * EXTENT.height * 4) as usize;
        // SAFETY: host-visible coherent memory; the copy that wrote it completed (fence).
        let bytes = unsafe {
            let p = self.device.map_memory(
                self.readback.1,
                0,
                size as u64,
                vk::MemoryMapFlags::empty(),
            )?;
            let v = std::slice::from_raw_parts(p as *const u8, size).to_vec();
            self.device.unmap_memory(self.readback.1);
            v
        };
        Ok(bytes)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let d = &self.device;
        // SAFETY: the engine's own objects; it waits for its own fences first (its device, its
        // right), then destroys everything in reverse order of creation.
        unsafe {
            let _ = d.wait_for_fences(&self.fences, true, 10_000_000_000);
            d.destroy_buffer(self.readback.0, None);
            d.free_memory(self.readback.1, None);
            for img in [&self.color, &self.depth] {
                d.destroy_image_view(img.view, None);
                d.destroy_image(img.image, None);
                d.free_memory(img.memory, None);
            }
            d.destroy_semaphore(self.timeline, None);
            for f in &self.fences {
                d.destroy_fence(*f, None);
            }
            d.destroy_command_pool(self.pool, None);
            d.destroy_device(None);
            if let Some((loader, m)) = self.debug.take() {
                loader.destroy_debug_utils_messenger(m, None);
            }
            self.instance.destroy_instance(None);
        }
    }
}

fn range(aspect: vk::ImageAspectFlags) -> vk::ImageSubresourceRange {
    vk::ImageSubresourceRange {
        aspect_mask: aspect,
        base_mip_level: 0,
        level_count: 1,
        base_array_layer: 0,
        layer_count: 1,
    }
}

fn barrier<'a>(
    image: vk::Image,
    aspect: vk::ImageAspectFlags,
    from: (vk::ImageLayout, vk::AccessFlags),
    to: (vk::ImageLayout, vk::AccessFlags),
) -> vk::ImageMemoryBarrier<'a> {
    understory::gpu::compute::image_barrier(image, range(aspect), from, to)
}

/// # Safety
/// `cmd` is recording; the image is in TRANSFER_SRC_OPTIMAL; the buffer holds the image.
unsafe fn copy_to_readback(
    d: &ash::Device,
    cmd: vk::CommandBuffer,
    image: vk::Image,
    buffer: vk::Buffer,
) {
    // SAFETY: as the caller vouched.
    unsafe {
        d.cmd_copy_image_to_buffer(
            cmd,
            image,
            vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
            buffer,
            &[vk::BufferImageCopy {
                buffer_offset: 0,
                buffer_row_length: 0,
                buffer_image_height: 0,
                image_subresource: vk::ImageSubresourceLayers {
                    aspect_mask: vk::ImageAspectFlags::COLOR,
                    mip_level: 0,
                    base_array_layer: 0,
                    layer_count: 1,
                },
                image_offset: vk::Offset3D::default(),
                image_extent: vk::Extent3D {
                    width: EXTENT.width,
                    height: EXTENT.height,
                    depth: 1,
                },
            }],
        );
        let b = [vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::TRANSFER_WRITE)
            .dst_access_mask(vk::AccessFlags::HOST_READ)];
        d.cmd_pipeline_barrier(
            cmd,
            vk::PipelineStageFlags::TRANSFER,
            vk::PipelineStageFlags::HOST,
            vk::DependencyFlags::empty(),
            &b,
            &[],
            &[],
        );
    }
}

/// A patch of `n` trees in the leaf tile at `tile` of a 512 m world.
fn patch(tile: (u32, u32), n: usize, seed: u32) -> Vec<Instance> {
    let leaf = 32.0;
    let min = Vec2::new(-256.0, -256.0) + Vec2::new(tile.0 as f32, tile.1 as f32) * leaf;
    let mut s = seed.wrapping_mul(2_654_435_761) | 1;
    let mut r = || {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        (s >> 8) as f32 / (1u32 << 24) as f32
    };
    (0..n)
        .map(|_| {
            let p = min + Vec2::new(0.001 + r() * 0.998, 0.001 + r() * 0.998) * leaf;
            Instance {
                scale: 4.0 + 6.0 * r(),
                yaw: r() * std::f32::consts::TAU,
                tint: 0xff30_8040,
                ..Instance::at(Vec3::new(p.x, 0.0, p.y))
            }
        })
        .collect()
}

/// The engine runs `options.frames` frames with understory, then shows its objects still work.
pub fn run(options: &Options) -> Result<Outcome, BoxError> {
    let host_canary = Canary::new();
    let engine = Engine::new(options, &host_canary)?;
    let mut outcome = Outcome::default();
    {
        // SAFETY: the handles are the engine's live objects, created as `handles()` says (the
        // features and extensions understory asked for are enabled); the engine submits to the
        // shared queue only while holding `ctx.queue()`; everything understory makes is dropped
        // at the end of this block, before the engine destroys its objects.
        let ctx = unsafe { Context::from_raw(engine.handles(), &ContextOptions::default())? };
        outcome.device = ctx.adapter().name.clone();
        frames(&engine, &ctx, options, &mut outcome)?;
        let canary = ctx.canary().clone();
        let report = ctx.shutdown()?;
        outcome.leaks = report.leaks.len();
        outcome.understory_messages = canary.total();
    }
    // understory is gone: the engine's device, queue and images still work.
    let px = engine.clear_and_read()?;
    outcome.host_usable_after = px == [255, 0, 255, 255];
    drop(engine);
    outcome.host_messages = host_canary.total();
    for m in host_canary.drain() {
        eprintln!("host messenger: {m}");
    }
    Ok(outcome)
}

/// The frame loop.
fn frames(
    engine: &Engine,
    ctx: &Context,
    options: &Options,
    outcome: &mut Outcome,
) -> Result<(), BoxError> {
    let d = &engine.device;
    let mut config = VegetationConfig {
        world_origin: Vec2::splat(-256.0),
        world_size_m: 512.0,
        atlas_page_px: 256,
        ..Default::default()
    };
    config.controller.cap_bytes = 64 << 20;
    let mut veg = Vegetation::new(ctx, config)?;
    let species = veg.register_species(&SpeciesDesc {
        name: "spruce",
        width: 32,
        height: 64,
        rgba8: &tree_billboard(32, 64, 1),
    })?;
    let tiles = 16u32;
    let per = (options.trees / (tiles * tiles) as usize).max(1);
    let mut live: Vec<(PatchId, (u32, u32))> = Vec::new();
    for ty in 0..tiles {
        for tx in 0..tiles {
            let id = veg.spawn(&PatchDesc {
                species,
                instances: &patch((tx, ty), per, tx * 31 + ty),
            })?;
            live.push((id, (tx, ty)));
        }
    }
    let page = veg.atlas_page(0).ok_or("no atlas page")?;
    let draw = DrawPass::new(ctx, COLOR, DEPTH, page, 0)?;
    let compaction = if ctx.adapter().subgroup_ballot_arithmetic_in_compute {
        Compaction::Subgroup
    } else {
        Compaction::Atomic
    };
    let mut cull = CullPass::with_records(ctx, compaction, 65_536, draw.lod_meshes())?;
    let mut slot_frames = [0u64; IN_FLIGHT];
    let (squeeze_from, squeeze_to) = (options.frames / 3, 2 * options.frames / 3);
    let settle = 8;
    let mut reported = 0u64;
    for f in 0..options.frames {
        let slot = f as usize % IN_FLIGHT;
        let (cmd, fence) = (engine.cmds[slot], engine.fences[slot]);
        // The engine's own throttle: its fence for this slot.
        // SAFETY: the engine's fence.
        unsafe { d.wait_for_fences(&[fence], true, 10_000_000_000)? };
        if options.sync == Sync::Fence && slot_frames[slot] > reported {
            // SAFETY: the fence of the submission that carried that frame has signalled.
            unsafe { ctx.frames_completed(slot_frames[slot])? };
            reported = slot_frames[slot];
        }
        // Churn: four patches leave and come back elsewhere in their tile's row.
        for k in 0..4usize {
            let i = (f as usize * 7 + k * 13) % live.len();
            let (id, (tx, ty)) = live[i];
            veg.despawn(id)?;
            let tile = ((tx + 1 + f) % tiles, ty);
            let nid = veg.spawn(&PatchDesc {
                species,
                instances: &patch(tile, per, f * 4 + k as u32),
            })?;
            live[i] = (nid, tile);
            outcome.churned += 1;
        }
        if f == squeeze_from {
            veg.set_budget_cap(2 << 20)?;
        }
        if f == squeeze_to {
            veg.set_budget_cap(64 << 20)?;
        }
        let frame = ctx.begin_frame()?;
        let t = f as f32 / options.frames as f32 * std::f32::consts::TAU;
        let eye = Vec3::new(120.0 * t.cos(), 25.0, 120.0 * t.sin());
        let look = Vec3::new(0.0, 5.0, 0.0);
        let update = veg.update(&frame, Viewer::looking(eye, look - eye))?;
        let q = update.decision.quality;
        if f > squeeze_from + settle && f < squeeze_to {
            let held = veg.stats().held;
            outcome.squeezed_budget = update.decision.budget;
            if held > update.decision.budget {
                outcome.over_budget_frames += 1;
            }
        }
        let mut proj =
            Mat4::perspective_rh(1.0, EXTENT.width as f32 / EXTENT.height as f32, 0.5, 800.0);
        proj.y_axis.y = -proj.y_axis.y;
        let view_proj = proj * Mat4::look_at_rh(eye, look, Vec3::Y);
        let view = CullView::new(view_proj, eye, draw.radius(), &veg.config().lod, q)?;
        let constants = DrawFrame::new(view_proj, eye, 700.0, [-256.0, -256.0, 512.0], false);
        let species_regions = veg.species_regions();
        let last = f + 1 == options.frames;
        // SAFETY (the recording): cmd is the engine's, not pending (its fence waited), reset and
        // begun here, recorded for `frame` and submitted below as its submission; understory's
        // recording functions mark what they use; the engine's images are its own and outlive
        // the run.
        unsafe {
            d.reset_command_buffer(cmd, vk::CommandBufferResetFlags::empty())?;
            d.begin_command_buffer(
                cmd,
                &vk::CommandBufferBeginInfo::default()
                    .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
            )?;
            veg.record(&frame, cmd)?;
            let sources: Vec<_> = veg.cull_sources().into_iter().map(|(s, _)| s).collect();
            cull.record(&frame, cmd, &sources, &view)?;
            draw.prepare(&frame, cmd, &cull, &constants, &species_regions)?;
            let to_attachments = [
                barrier(
                    engine.color.image,
                    vk::ImageAspectFlags::COLOR,
                    (vk::ImageLayout::UNDEFINED, vk::AccessFlags::empty()),
                    (
                        vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL,
                        vk::AccessFlags::COLOR_ATTACHMENT_WRITE,
                    ),
                ),
                barrier(
                    engine.depth.image,
                    vk::ImageAspectFlags::DEPTH,
                    (
                        vk::ImageLayout::UNDEFINED,
                        vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_WRITE,
                    ),
                    (
                        vk::ImageLayout::DEPTH_ATTACHMENT_OPTIMAL,
                        vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_READ
                            | vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_WRITE,
                    ),
                ),
            ];
            let tests = vk::PipelineStageFlags::EARLY_FRAGMENT_TESTS
                | vk::PipelineStageFlags::LATE_FRAGMENT_TESTS;
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT
                    | vk::PipelineStageFlags::TRANSFER
                    | tests,
                vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT | tests,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &to_attachments,
            );
            let color_att = [vk::RenderingAttachmentInfo::default()
                .image_view(engine.color.view)
                .image_layout(vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL)
                .load_op(vk::AttachmentLoadOp::CLEAR)
                .store_op(vk::AttachmentStoreOp::STORE)
                .clear_value(vk::ClearValue {
                    color: vk::ClearColorValue {
                        float32: constants.sky(),
                    },
                })];
            let depth_att = vk::RenderingAttachmentInfo::default()
                .image_view(engine.depth.view)
                .image_layout(vk::ImageLayout::DEPTH_ATTACHMENT_OPTIMAL)
                .load_op(vk::AttachmentLoadOp::CLEAR)
                .store_op(vk::AttachmentStoreOp::DONT_CARE)
                .clear_value(vk::ClearValue {
                    depth_stencil: vk::ClearDepthStencilValue {
                        depth: 1.0,
                        stencil: 0,
                    },
                });
            let rendering = vk::RenderingInfo::default()
                .render_area(vk::Rect2D {
                    offset: vk::Offset2D::default(),
                    extent: EXTENT,
                })
                .layer_count(1)
                .color_attachments(&color_att)
                .depth_attachment(&depth_att);
            // The engine's rendering scope; understory draws inside it.
            d.cmd_begin_rendering(cmd, &rendering);
            let page = veg.atlas_page(0).ok_or("no atlas page")?;
            let drawn = draw.record(&frame, cmd, &cull, page, EXTENT);
            d.cmd_end_rendering(cmd);
            drawn?;
            if last {
                let to_src = barrier(
                    engine.color.image,
                    vk::ImageAspectFlags::COLOR,
                    (
                        vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL,
                        vk::AccessFlags::COLOR_ATTACHMENT_WRITE,
                    ),
                    (
                        vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                        vk::AccessFlags::TRANSFER_READ,
                    ),
                );
                d.cmd_pipeline_barrier(
                    cmd,
                    vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT,
                    vk::PipelineStageFlags::TRANSFER,
                    vk::DependencyFlags::empty(),
                    &[],
                    &[],
                    &[to_src],
                );
                copy_to_readback(d, cmd, engine.color.image, engine.readback.0);
            }
            d.end_command_buffer(cmd)?;
            d.reset_fences(&[fence])?;
        }
        // The engine's own submission, on the queue it shares with understory (so under its
        // lock), with the signal its synchronization choice needs.
        let value = frame.value();
        let host_value = u64::from(f) + 1;
        let (semaphores, values, signal) = match options.sync {
            Sync::Timeline => (
                vec![ctx.timeline_semaphore()],
                vec![value],
                FrameSignal::Timeline,
            ),
            Sync::HostTimeline => (
                vec![engine.timeline],
                vec![host_value],
                FrameSignal::HostTimeline {
                    semaphore: engine.timeline,
                    value: host_value,
                },
            ),
            Sync::Fence => (vec![], vec![], FrameSignal::HostReported),
        };
        let mut tl = vk::TimelineSemaphoreSubmitInfo::default().signal_semaphore_values(&values);
        let cmds = [cmd];
        let submit = vk::SubmitInfo::default()
            .command_buffers(&cmds)
            .signal_semaphores(&semaphores)
            .push_next(&mut tl);
        {
            let queue = ctx.queue();
            // SAFETY: the engine's queue, externally synchronized by understory's lock; the
            // command buffer is executable; the signal values increase.
            unsafe { d.queue_submit(*queue, &[submit], fence)? };
        }
        // SAFETY: every command recorded for `frame` is in that submission, whose signal (or
        // fence, reported above once waited) marks it done; the engine's semaphore lives until
        // after shutdown.
        let done = unsafe { ctx.frame_submitted(frame, signal)? };
        slot_frames[slot] = done.value();
        outcome.frames += 1;
    }
    // The engine waits for its own work, tells understory, and reads the last image.
    // SAFETY: the engine's fences.
    unsafe { d.wait_for_fences(&engine.fences, true, 10_000_000_000)? };
    if options.sync == Sync::Fence {
        // SAFETY: every submission's fence has signalled.
        unsafe { ctx.frames_completed(ctx.last_submitted())? };
    }
    ctx.wait(ctx.last_submitted(), Duration::from_secs(10))?;
    let pixels = engine.read_pixels()?;
    let sky = DrawFrame::new(Mat4::IDENTITY, Vec3::ZERO, 1.0, [0.0; 3], false).sky();
    let sky: Vec<u8> = sky.iter().map(|c| (c * 255.0).round() as u8).collect();
    outcome.drawn_pixels = pixels
        .chunks(4)
        .filter(|p| {
            p[..3]
                .iter()
                .zip(&sky[..3])
                .any(|(a, b)| a.abs_diff(*b) > 8)
        })
        .count() as u64;
    outcome.deferred_frees = veg.stats().memory.frees_completed;
    drop((veg, cull, draw));
    Ok(())
}

#[allow(dead_code)]
fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let mut options = Options::default();
    if let Some(n) = args.next() {
        options.frames = n.parse()?;
    }
    if let Some(s) = args.next() {
        options.sync = match s.as_str() {
            "timeline" => Sync::Timeline,
            "host-timeline" => Sync::HostTimeline,
            "fence" => Sync::Fence,
            other => return Err(format!("sync {other:?}: timeline, host-timeline or fence").into()),
        };
    }
    options.validation = std::env::var("UNDERSTORY_VALIDATION").map_or(true, |v| v != "0");
    options.gpu_assisted =
        std::env::var("UNDERSTORY_VALIDATION").is_ok_and(|v| v == "gpu-assisted");
    let o = run(&options)?;
    println!("{o:#?}");
    if o.leaks > 0 || o.host_messages > 0 || o.understory_messages > 0 || !o.host_usable_after {
        return Err("the run was not clean".into());
    }
    Ok(())
}
