//! Compute pipelines over storage buffers, recorded into the caller's command buffers.

use std::ffi::CStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ash::vk;

use crate::error::{Error, Result, vk_err};
use crate::gpu::context::{Context, Frame, Shared};
use crate::gpu::memory::{Buffer, RawObject};

/// A compute pipeline whose set 0 holds `storage_buffers` storage buffers at bindings
/// `0..storage_buffers` (a fresh descriptor set per dispatch), with an optional push-constant
/// block. Dropping it retires its objects at the last frame that dispatched it.
pub struct ComputePipeline {
    shared: Arc<Shared>,
    name: String,
    set_layout: vk::DescriptorSetLayout,
    layout: vk::PipelineLayout,
    pipeline: vk::Pipeline,
    sets: Mutex<DescriptorArena>,
    storage_buffers: u32,
    push_constant_bytes: u32,
    last_use: AtomicU64,
}

/// Descriptor sets of one layout, handed out per frame from pools that are reset once every
/// frame that used them has completed. (Sets rather than push descriptors: GPU-assisted
/// validation in layer 1.3.239 does not track `vkCmdPushDescriptorSetKHR` and reads such
/// buffers as empty, KhronosGroup/Vulkan-ValidationLayers#5321, fixed in 1.3.249; and hosts
/// need not enable `VK_KHR_push_descriptor`.)
pub(crate) struct DescriptorArena {
    sizes: Vec<vk::DescriptorPoolSize>,
    sets_per_pool: u32,
    pools: Vec<ArenaPool>,
}

struct ArenaPool {
    pool: vk::DescriptorPool,
    /// The last frame that used a set of it.
    last_use: u64,
    /// Sets allocated since its last reset.
    used: u32,
}

impl DescriptorArena {
    /// An arena for sets holding `per_set` descriptors of each type, `sets_per_pool` to a pool.
    pub(crate) fn new(per_set: &[(vk::DescriptorType, u32)], sets_per_pool: u32) -> Self {
        Self {
            sizes: per_set
                .iter()
                .map(|(ty, n)| {
                    vk::DescriptorPoolSize::default()
                        .ty(*ty)
                        .descriptor_count(n * sets_per_pool)
                })
                .collect(),
            sets_per_pool,
            pools: Vec::new(),
        }
    }

    /// A set of `layout` for frame `value`: from a pool already serving that frame, else from
    /// one whose frames have all completed (reset first), else from a new pool.
    pub(crate) fn allocate(
        &mut self,
        shared: &Shared,
        value: u64,
        layout: vk::DescriptorSetLayout,
    ) -> Result<vk::DescriptorSet> {
        let d = &shared.device;
        let per_pool = self.sets_per_pool;
        let mut pick = self
            .pools
            .iter()
            .position(|p| p.last_use == value && p.used < per_pool);
        if pick.is_none() {
            let completed = shared.clock.completed()?;
            if let Some(i) = self.pools.iter().position(|p| p.last_use <= completed) {
                // SAFETY: every frame that used a set of this pool has completed (its last
                // use is at or below the completed value), so none is in use
                // (VUID-vkResetDescriptorPool-descriptorPool-00313); the arena's lock
                // synchronizes the pool.
                unsafe {
                    d.reset_descriptor_pool(
                        self.pools[i].pool,
                        vk::DescriptorPoolResetFlags::empty(),
                    )
                }
                .map_err(vk_err("vkResetDescriptorPool"))?;
                self.pools[i].used = 0;
                pick = Some(i);
            }
        }
        let i = match pick {
            Some(i) => i,
            None => {
                let info = vk::DescriptorPoolCreateInfo::default()
                    .max_sets(per_pool)
                    .pool_sizes(&self.sizes);
                // SAFETY: valid create info.
                let pool = unsafe { d.create_descriptor_pool(&info, None) }
                    .map_err(vk_err("vkCreateDescriptorPool"))?;
                self.pools.push(ArenaPool {
                    pool,
                    last_use: value,
                    used: 0,
                });
                self.pools.len() - 1
            }
        };
        let p = &mut self.pools[i];
        let layouts = [layout];
        let info = vk::DescriptorSetAllocateInfo::default()
            .descriptor_pool(p.pool)
            .set_layouts(&layouts);
        // SAFETY: the pool has room for one more set of this layout (sized per set, counted
        // in `used`); the layout is live.
        let set = unsafe { d.allocate_descriptor_sets(&info) }
            .map_err(vk_err("vkAllocateDescriptorSets"))?[0];
        p.used += 1;
        p.last_use = p.last_use.max(value);
        Ok(set)
    }

    /// Retires every pool at the last frame that used it.
    pub(crate) fn retire(&mut self, shared: &Shared) {
        for p in self.pools.drain(..) {
            shared.retire_object(RawObject::DescriptorPool(p.pool), p.last_use);
        }
    }
}

/// Writes whole-buffer descriptors `(binding, type, infos)` into `set`.
///
/// # Safety
/// `set` was just allocated (no command buffer uses it yet); the buffers are live buffers of
/// `device` matching the set layout's bindings.
pub(crate) unsafe fn write_set(
    device: &ash::Device,
    set: vk::DescriptorSet,
    bindings: &[(u32, vk::DescriptorType, &[vk::DescriptorBufferInfo])],
) {
    let writes: Vec<_> = bindings
        .iter()
        .map(|(b, ty, info)| write(*b, *ty, info).dst_set(set))
        .collect();
    // SAFETY: forwarded contract.
    unsafe { device.update_descriptor_sets(&writes, &[]) };
}

/// What a [`ComputePipeline`] is made of.
#[derive(Clone, Copy, Debug)]
pub struct ComputePipelineDesc<'a> {
    /// Debug name.
    pub name: &'a str,
    /// SPIR-V bytes (from [`crate::gpu::shaders`]).
    pub spirv: &'a [u8],
    /// Entry point.
    pub entry: &'a CStr,
    /// Number of storage-buffer bindings in set 0.
    pub storage_buffers: u32,
    /// Size of the push-constant block (multiple of 4, ≤ 128).
    pub push_constant_bytes: u32,
}

/// Records one global memory barrier: everything `src` wrote becomes visible to `dst`.
///
/// # Safety
/// `cmd` must be a command buffer of `device` in the recording state, outside a render pass.
pub unsafe fn memory_barrier(
    device: &ash::Device,
    cmd: vk::CommandBuffer,
    src: (vk::PipelineStageFlags, vk::AccessFlags),
    dst: (vk::PipelineStageFlags, vk::AccessFlags),
) {
    let barrier = [vk::MemoryBarrier::default()
        .src_access_mask(src.1)
        .dst_access_mask(dst.1)];
    // SAFETY: cmd is recording outside a render pass (caller); a global memory barrier needs
    // nothing else.
    unsafe {
        device.cmd_pipeline_barrier(
            cmd,
            src.0,
            dst.0,
            vk::DependencyFlags::empty(),
            &barrier,
            &[],
            &[],
        )
    };
}

/// An image memory barrier over `range` from one (layout, access) to another, no queue
/// family transfer.
pub fn image_barrier<'a>(
    image: vk::Image,
    range: vk::ImageSubresourceRange,
    from: (vk::ImageLayout, vk::AccessFlags),
    to: (vk::ImageLayout, vk::AccessFlags),
) -> vk::ImageMemoryBarrier<'a> {
    vk::ImageMemoryBarrier::default()
        .image(image)
        .old_layout(from.0)
        .new_layout(to.0)
        .src_access_mask(from.1)
        .dst_access_mask(to.1)
        .src_queue_family_index(vk::QUEUE_FAMILY_IGNORED)
        .dst_queue_family_index(vk::QUEUE_FAMILY_IGNORED)
        .subresource_range(range)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Retires a pipeline, its layout and its set layout at frame `last_use`, and nulls the handles.
pub(crate) fn retire_pipeline_objects(
    shared: &Shared,
    last_use: u64,
    pipeline: &mut vk::Pipeline,
    layout: &mut vk::PipelineLayout,
    set_layout: &mut vk::DescriptorSetLayout,
) {
    shared.retire_object(RawObject::Pipeline(std::mem::take(pipeline)), last_use);
    shared.retire_object(RawObject::PipelineLayout(std::mem::take(layout)), last_use);
    shared.retire_object(
        RawObject::DescriptorSetLayout(std::mem::take(set_layout)),
        last_use,
    );
}

/// A descriptor of a buffer's requested size ([`Buffer::size`]), not `VK_WHOLE_SIZE`: the
/// buffer may be rounded up to a size class, and a whole-size range would then be the class
/// (past `maxStorageBufferRange` for a source whose own size fits it,
/// VUID-VkWriteDescriptorSet-descriptorType-00333, and counted by `arrayLength`).
pub(crate) fn whole(b: &Buffer) -> [vk::DescriptorBufferInfo; 1] {
    [vk::DescriptorBufferInfo::default()
        .buffer(b.raw())
        .range(b.size())]
}

/// One descriptor write of `info` at `binding`.
pub(crate) fn write<'a>(
    binding: u32,
    ty: vk::DescriptorType,
    info: &'a [vk::DescriptorBufferInfo],
) -> vk::WriteDescriptorSet<'a> {
    vk::WriteDescriptorSet::default()
        .dst_binding(binding)
        .descriptor_type(ty)
        .buffer_info(info)
}

/// A descriptor set layout for compute, binding `i` of type `types[i]`.
pub(crate) fn set_layout(
    device: &ash::Device,
    types: &[vk::DescriptorType],
) -> Result<vk::DescriptorSetLayout> {
    let counted: Vec<_> = types.iter().map(|t| (*t, 1)).collect();
    set_layout_with_counts(device, &counted)
}

/// Compute-stage bindings `0..`: binding `i` an array of `types[i].1` descriptors of type
/// `types[i].0`.
fn compute_bindings(
    types: &[(vk::DescriptorType, u32)],
) -> Vec<vk::DescriptorSetLayoutBinding<'static>> {
    types
        .iter()
        .enumerate()
        .map(|(b, (t, n))| {
            vk::DescriptorSetLayoutBinding::default()
                .binding(b as u32)
                .descriptor_type(*t)
                .descriptor_count(*n)
                .stage_flags(vk::ShaderStageFlags::COMPUTE)
        })
        .collect()
}

/// As [`set_layout`], binding `i` an array of `types[i].1` descriptors of type `types[i].0`.
pub(crate) fn set_layout_with_counts(
    device: &ash::Device,
    types: &[(vk::DescriptorType, u32)],
) -> Result<vk::DescriptorSetLayout> {
    let bindings = compute_bindings(types);
    let info = vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings);
    // SAFETY: valid info.
    unsafe { device.create_descriptor_set_layout(&info, None) }
        .map_err(vk_err("vkCreateDescriptorSetLayout"))
}

/// Whether the device can create a set layout of these bindings (as
/// [`set_layout_with_counts`] makes it): `vkGetDescriptorSetLayoutSupport`, needed for layouts
/// past `maxPerSetDescriptors` (Vulkan 1.1).
pub(crate) fn set_layout_supported(
    device: &ash::Device,
    types: &[(vk::DescriptorType, u32)],
) -> bool {
    let bindings = compute_bindings(types);
    let info = vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings);
    let mut support = vk::DescriptorSetLayoutSupport::default();
    // SAFETY: valid info; a core Vulkan 1.1 query (the context requires 1.2) that creates nothing.
    unsafe { device.get_descriptor_set_layout_support(&info, &mut support) };
    support.supported == vk::TRUE
}

/// A pipeline layout of one set plus a compute push-constant range of `push_bytes`.
pub(crate) fn pipeline_layout(
    device: &ash::Device,
    set: vk::DescriptorSetLayout,
    push_bytes: u32,
) -> Result<vk::PipelineLayout> {
    let ranges = [vk::PushConstantRange::default()
        .stage_flags(vk::ShaderStageFlags::COMPUTE)
        .size(push_bytes)];
    let sets = [set];
    let mut info = vk::PipelineLayoutCreateInfo::default().set_layouts(&sets);
    if push_bytes > 0 {
        info = info.push_constant_ranges(&ranges);
    }
    // SAFETY: valid info referencing a live set layout.
    unsafe { device.create_pipeline_layout(&info, None) }.map_err(vk_err("vkCreatePipelineLayout"))
}

/// A shader module from embedded SPIR-V ([`crate::gpu::shaders`]), or SPIR-V a caller of
/// [`ComputePipeline::new`] vouched for; the caller destroys it.
pub(crate) fn shader_module(device: &ash::Device, spirv: &[u8]) -> Result<vk::ShaderModule> {
    let code = ash::util::read_spv(&mut std::io::Cursor::new(spirv))
        .map_err(|e| Error::InvalidInput(format!("not SPIR-V: {e}")))?;
    let info = vk::ShaderModuleCreateInfo::default().code(&code);
    // SAFETY: code is SPIR-V validated by naga at build time (understory's own shaders) or
    // vouched for by the caller of the unsafe `ComputePipeline::new`
    // (VUID-VkShaderModuleCreateInfo-pCode-08737).
    unsafe { device.create_shader_module(&info, None) }.map_err(vk_err("vkCreateShaderModule"))
}

/// A compute pipeline from embedded SPIR-V (or SPIR-V vouched for, as [`shader_module`]), whose
/// entry point `entry` has an interface that `layout` matches.
pub(crate) fn compute_pipeline(
    device: &ash::Device,
    spirv: &[u8],
    entry: &CStr,
    layout: vk::PipelineLayout,
) -> Result<vk::Pipeline> {
    let module = shader_module(device, spirv)?;
    let stage = vk::PipelineShaderStageCreateInfo::default()
        .stage(vk::ShaderStageFlags::COMPUTE)
        .module(module)
        .name(entry);
    let info = [vk::ComputePipelineCreateInfo::default()
        .stage(stage)
        .layout(layout)];
    // SAFETY: valid info; module and layout are live.
    let pipelines =
        unsafe { device.create_compute_pipelines(vk::PipelineCache::null(), &info, None) };
    // SAFETY: the module is no longer needed once the pipeline exists (or failed).
    unsafe { device.destroy_shader_module(module, None) };
    Ok(pipelines.map_err(|(_, e)| Error::vk("vkCreateComputePipelines", e))?[0])
}

impl ComputePipeline {
    /// Builds the shader module, layouts and pipeline. Needs a compute queue.
    ///
    /// Checks what it can: the push-constant size, the number of bindings against the device,
    /// that `spirv` is a whole number of words with SPIR-V's magic number. The shader itself
    /// is the caller's to vouch for, so this is `unsafe`:
    ///
    /// ```compile_fail,E0133
    /// # fn f(ctx: &understory::gpu::context::Context, bytes: &[u8]) {
    /// use understory::gpu::compute::{ComputePipeline, ComputePipelineDesc};
    /// let desc = ComputePipelineDesc {
    ///     name: "mine", spirv: bytes, entry: c"main", storage_buffers: 1, push_constant_bytes: 0,
    /// };
    /// let p = ComputePipeline::new(ctx, &desc); // call to unsafe function
    /// # }
    /// ```
    ///
    /// # Safety
    /// - `desc.spirv` is a valid SPIR-V module for Vulkan on this device: it passes
    ///   `spirv-val` for the device's Vulkan environment and uses only capabilities, extensions
    ///   and features the device has enabled (`VUID-VkShaderModuleCreateInfo-pCode-08737`,
    ///   `-08740`, `-08742`), within the device's compute limits (workgroup size and
    ///   invocations, shared memory: `VUID-RuntimeSpirv-x-06429` and its neighbours,
    ///   `VUID-RuntimeSpirv-Workgroup-06530`);
    /// - `desc.entry` names an `OpEntryPoint` of it with the `GLCompute` execution model
    ///   (`VUID-VkPipelineShaderStageCreateInfo-pName-00707`, `-stage-00706`);
    /// - its resource interface matches the layout built here
    ///   (`VUID-VkComputePipelineCreateInfo-layout-07987`, `-07988`, `-07990`, `-07991`): it
    ///   uses only descriptor set 0, whose bindings `0..storage_buffers` it may declare as
    ///   storage buffers (no other binding, set or descriptor type), and a push-constant block
    ///   of at most `push_constant_bytes` bytes (none if 0);
    /// - every dispatch of it reads and writes only within the buffers bound to it (as
    ///   [`ComputePipeline::record_dispatch`] requires again per dispatch).
    ///
    /// understory's own shaders ([`crate::gpu::shaders`]) are validated by naga at build time;
    /// their bindings are what their users ([`crate::gpu::scan::BlockScan`], the cull pass)
    /// pass here.
    pub unsafe fn new(ctx: &Context, desc: &ComputePipelineDesc<'_>) -> Result<Self> {
        let shared = ctx.shared();
        shared.require(
            desc.name,
            &crate::gpu::adapter::DeviceFeatures::default(),
            vk::QueueFlags::COMPUTE,
        )?;
        if !desc.push_constant_bytes.is_multiple_of(4) || desc.push_constant_bytes > 128 {
            return Err(Error::InvalidInput(format!(
                "{}: push constants of {} bytes (must be a multiple of 4, at most 128)",
                desc.name, desc.push_constant_bytes
            )));
        }
        let limits = ctx.adapter().limits;
        if desc.storage_buffers == 0 || desc.storage_buffers > limits.max_per_stage_storage_buffers
        {
            return Err(Error::InvalidInput(format!(
                "{}: {} storage buffers (1..={} on this device: maxPerStageDescriptorStorageBuffers)",
                desc.name, desc.storage_buffers, limits.max_per_stage_storage_buffers
            )));
        }
        let device = ctx.device();
        let mut this = Self {
            shared: shared.clone(),
            name: desc.name.to_owned(),
            set_layout: vk::DescriptorSetLayout::null(),
            layout: vk::PipelineLayout::null(),
            pipeline: vk::Pipeline::null(),
            sets: Mutex::new(DescriptorArena::new(
                &[(vk::DescriptorType::STORAGE_BUFFER, desc.storage_buffers)],
                16,
            )),
            storage_buffers: desc.storage_buffers,
            push_constant_bytes: desc.push_constant_bytes,
            last_use: AtomicU64::new(0),
        };
        // Build step by step; on error, Drop retires what exists (null handles are ignored).
        let types = vec![vk::DescriptorType::STORAGE_BUFFER; desc.storage_buffers as usize];
        this.set_layout = set_layout(device, &types)?;
        this.layout = pipeline_layout(device, this.set_layout, desc.push_constant_bytes)?;
        // The caller vouches for the module, its entry point and its interface (the contract).
        this.pipeline = compute_pipeline(device, desc.spirv, desc.entry, this.layout)?;
        Ok(this)
    }

    /// Records: bind, push `buffers` (binding `i` is `buffers[i]`, its `size()` bytes), push
    /// constants, dispatch. Marks the buffers and the pipeline used by `frame`.
    ///
    /// [`Error::InvalidInput`] for a buffer without `STORAGE_BUFFER` usage or larger than
    /// `maxStorageBufferRange`, a wrong number of buffers or push-constant bytes, or a dispatch
    /// beyond `maxComputeWorkGroupCount`; [`Error::Lifecycle`] for a buffer with a live
    /// [`Mapped`](crate::gpu::memory::Mapped) view. Nothing is recorded on error.
    ///
    /// # Safety
    /// `cmd` must be a command buffer of this context's device in the recording state, outside
    /// a render pass, recorded for `frame` (submitted as its submission or before it on the
    /// same queue). The caller records the barriers around the dispatch. The shader, given
    /// these buffers, push constants and group counts, reads and writes only within the bound
    /// buffers.
    pub unsafe fn record_dispatch(
        &self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        buffers: &[&Buffer],
        push_constants: &[u8],
        groups: [u32; 3],
    ) -> Result<()> {
        frame.check(&self.shared, &self.name)?;
        if buffers.len() != self.storage_buffers as usize {
            return Err(Error::InvalidInput(format!(
                "{}: {} buffers for {} bindings",
                self.name,
                buffers.len(),
                self.storage_buffers
            )));
        }
        if let Some(b) = buffers.iter().find(|b| !b.belongs_to(&self.shared)) {
            return Err(Error::Lifecycle(format!(
                "{}: buffer {:?} is of another context",
                self.name,
                b.name()
            )));
        }
        // VUID-VkWriteDescriptorSet-descriptorType-00331: a storage descriptor needs a
        // STORAGE_BUFFER buffer.
        if let Some(b) = buffers
            .iter()
            .find(|b| !b.usage().contains(vk::BufferUsageFlags::STORAGE_BUFFER))
        {
            return Err(Error::InvalidInput(format!(
                "{}: buffer {:?} (usage {:?}) is bound as a storage buffer but lacks STORAGE_BUFFER usage",
                self.name,
                b.name(),
                b.usage()
            )));
        }
        // VUID-VkWriteDescriptorSet-descriptorType-00333: the range fits maxStorageBufferRange.
        let max_range = u64::from(self.shared.adapter.limits.max_storage_buffer_range);
        if let Some(b) = buffers.iter().find(|b| b.size() > max_range) {
            return Err(Error::InvalidInput(format!(
                "{}: buffer {:?} of {} bytes is over maxStorageBufferRange ({max_range})",
                self.name,
                b.name(),
                b.size()
            )));
        }
        if push_constants.len() != self.push_constant_bytes as usize {
            return Err(Error::InvalidInput(format!(
                "{}: {} push-constant bytes, pipeline takes {}",
                self.name,
                push_constants.len(),
                self.push_constant_bytes
            )));
        }
        let limits = self.shared.adapter.limits.max_compute_work_group_count;
        if groups.iter().zip(limits).any(|(g, l)| *g > l) {
            return Err(Error::InvalidInput(format!(
                "{}: dispatch {groups:?} exceeds maxComputeWorkGroupCount {limits:?}",
                self.name
            )));
        }
        let set = lock(&self.sets).allocate(&self.shared, frame.value(), self.set_layout)?;
        // The requested size, not WHOLE_SIZE: the buffer may be a larger size class.
        let infos: Vec<_> = buffers.iter().map(|b| whole(b)).collect();
        let bindings: Vec<_> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| (i as u32, vk::DescriptorType::STORAGE_BUFFER, &info[..]))
            .collect();
        // Marked before anything is recorded: a buffer with a live `Mapped` view refuses
        // (those marked before it only wait for this frame).
        for b in buffers {
            b.mark_used(frame.value())?;
        }
        self.last_use.fetch_max(frame.value(), Ordering::AcqRel);
        let d = &self.shared.device;
        // SAFETY: the caller guarantees cmd is recording outside a render pass; pipeline,
        // layout and set are live (retired only when self drops, at its last frame); the fresh
        // set gets every binding written with a live STORAGE_BUFFER buffer of this device
        // (VUID-VkWriteDescriptorSet-descriptorType-00331), its range within
        // maxStorageBufferRange (-00333) and its size, each marked used by `frame`
        // (VUID-vkCmdDispatch-None-02697); the push range matches the layout's.
        unsafe {
            write_set(d, set, &bindings);
            d.cmd_bind_pipeline(cmd, vk::PipelineBindPoint::COMPUTE, self.pipeline);
            d.cmd_bind_descriptor_sets(
                cmd,
                vk::PipelineBindPoint::COMPUTE,
                self.layout,
                0,
                &[set],
                &[],
            );
            if !push_constants.is_empty() {
                d.cmd_push_constants(
                    cmd,
                    self.layout,
                    vk::ShaderStageFlags::COMPUTE,
                    0,
                    push_constants,
                );
            }
            d.cmd_dispatch(cmd, groups[0], groups[1], groups[2]);
        }
        Ok(())
    }
}

impl std::fmt::Debug for ComputePipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputePipeline")
            .field("name", &self.name)
            .field("storage_buffers", &self.storage_buffers)
            .field("last_use", &self.last_use.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drop for ComputePipeline {
    fn drop(&mut self) {
        lock(&self.sets).retire(&self.shared);
        retire_pipeline_objects(
            &self.shared,
            *self.last_use.get_mut(),
            &mut self.pipeline,
            &mut self.layout,
            &mut self.set_layout,
        );
    }
}
