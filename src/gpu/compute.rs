//! Compute pipelines over storage buffers, recorded into the caller's command buffers.

use std::ffi::CStr;

use ash::vk;

use crate::error::{Error, Result, vk_err};
use crate::gpu::context::Context;
use crate::gpu::memory::Buffer;

/// A compute pipeline whose set 0 holds `storage_buffers` storage buffers at bindings
/// `0..storage_buffers`, with an optional push-constant block.
pub struct ComputePipeline {
    name: String,
    set_layout: vk::DescriptorSetLayout,
    layout: vk::PipelineLayout,
    pipeline: vk::Pipeline,
    pool: vk::DescriptorPool,
    storage_buffers: u32,
    push_constant_bytes: u32,
    destroyed: bool,
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
    /// How many descriptor sets [`ComputePipeline::bind_set`] may hand out in total.
    pub max_sets: u32,
}

/// Records one global memory barrier: everything `src` wrote becomes visible to `dst`.
///
/// # Safety
/// `cmd` must be a command buffer of `ctx`'s device in the recording state, outside a render
/// pass.
pub unsafe fn memory_barrier(
    ctx: &Context,
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
        ctx.device().cmd_pipeline_barrier(
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

/// Destroys a pipeline, its layout and its set layout, and nulls the three handles.
///
/// # Safety
/// The GPU must have finished every submission that used them.
pub(crate) unsafe fn destroy_pipeline_objects(
    ctx: &Context,
    pipeline: &mut vk::Pipeline,
    layout: &mut vk::PipelineLayout,
    set_layout: &mut vk::DescriptorSetLayout,
) {
    let d = ctx.device();
    // SAFETY: idle (caller); null handles are ignored by vkDestroy*.
    unsafe {
        d.destroy_pipeline(std::mem::take(pipeline), None);
        d.destroy_pipeline_layout(std::mem::take(layout), None);
        d.destroy_descriptor_set_layout(std::mem::take(set_layout), None);
    }
}

/// Waits (up to 30 s) for the context's newest submission and returns its timeline value: what
/// a pass's `destroy` does before destroying objects the GPU may still use.
pub(crate) fn wait_last_submitted(ctx: &Context) -> Result<u64> {
    let last = ctx.timeline().last_submitted();
    ctx.timeline()
        .wait(last, std::time::Duration::from_secs(30))?;
    Ok(last)
}

/// Retires every buffer at `value`; a failure is logged with `owner` (the buffers are then
/// handed back to their own context, see [`Context::retire`]).
pub(crate) fn retire_all(
    ctx: &Context,
    buffers: impl IntoIterator<Item = Option<Buffer>>,
    value: u64,
    owner: &str,
) {
    for b in buffers.into_iter().flatten() {
        if let Err(e) = ctx.retire(b, value) {
            log::error!("{owner}: {e}");
        }
    }
}

/// A descriptor set layout for compute, binding `i` of type `types[i]`; with `push`, for
/// `vkCmdPushDescriptorSetKHR`.
pub(crate) fn set_layout(
    ctx: &Context,
    types: &[vk::DescriptorType],
    push: bool,
) -> Result<vk::DescriptorSetLayout> {
    let counted: Vec<_> = types.iter().map(|t| (*t, 1)).collect();
    set_layout_with_counts(ctx, &counted, push)
}

/// As [`set_layout`], binding `i` an array of `types[i].1` descriptors of type `types[i].0`.
pub(crate) fn set_layout_with_counts(
    ctx: &Context,
    types: &[(vk::DescriptorType, u32)],
    push: bool,
) -> Result<vk::DescriptorSetLayout> {
    let bindings: Vec<_> = types
        .iter()
        .enumerate()
        .map(|(b, (t, n))| {
            vk::DescriptorSetLayoutBinding::default()
                .binding(b as u32)
                .descriptor_type(*t)
                .descriptor_count(*n)
                .stage_flags(vk::ShaderStageFlags::COMPUTE)
        })
        .collect();
    let mut info = vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings);
    if push {
        info = info.flags(vk::DescriptorSetLayoutCreateFlags::PUSH_DESCRIPTOR_KHR);
    }
    // SAFETY: valid info (push only when the caller checked VK_KHR_push_descriptor is enabled).
    unsafe { ctx.device().create_descriptor_set_layout(&info, None) }
        .map_err(vk_err("vkCreateDescriptorSetLayout"))
}

/// A pipeline layout of one set plus a compute push-constant range of `push_bytes`.
pub(crate) fn pipeline_layout(
    ctx: &Context,
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
    unsafe { ctx.device().create_pipeline_layout(&info, None) }
        .map_err(vk_err("vkCreatePipelineLayout"))
}

/// A shader module from embedded SPIR-V ([`crate::gpu::shaders`]); the caller destroys it.
pub(crate) fn shader_module(ctx: &Context, spirv: &[u8]) -> Result<vk::ShaderModule> {
    let code = ash::util::read_spv(&mut std::io::Cursor::new(spirv))
        .map_err(|e| Error::InvalidInput(format!("not SPIR-V: {e}")))?;
    let info = vk::ShaderModuleCreateInfo::default().code(&code);
    // SAFETY: code is SPIR-V validated by naga at build time.
    unsafe { ctx.device().create_shader_module(&info, None) }
        .map_err(vk_err("vkCreateShaderModule"))
}

/// A compute pipeline from embedded SPIR-V.
pub(crate) fn compute_pipeline(
    ctx: &Context,
    spirv: &[u8],
    entry: &CStr,
    layout: vk::PipelineLayout,
) -> Result<vk::Pipeline> {
    let device = ctx.device();
    let module = shader_module(ctx, spirv)?;
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

/// A descriptor set of a [`ComputePipeline`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindingSet(vk::DescriptorSet);

impl ComputePipeline {
    /// Builds the shader module, layouts, pipeline and a descriptor pool.
    pub fn new(ctx: &Context, desc: &ComputePipelineDesc<'_>) -> Result<Self> {
        if !desc.push_constant_bytes.is_multiple_of(4) || desc.push_constant_bytes > 128 {
            return Err(Error::InvalidInput(format!(
                "{}: push constants of {} bytes (must be a multiple of 4, at most 128)",
                desc.name, desc.push_constant_bytes
            )));
        }
        if desc.max_sets == 0 || desc.storage_buffers == 0 {
            return Err(Error::InvalidInput(format!(
                "{}: needs at least one set and one binding",
                desc.name
            )));
        }
        let device = ctx.device();
        let mut this = Self {
            name: desc.name.to_owned(),
            set_layout: vk::DescriptorSetLayout::null(),
            layout: vk::PipelineLayout::null(),
            pipeline: vk::Pipeline::null(),
            pool: vk::DescriptorPool::null(),
            storage_buffers: desc.storage_buffers,
            push_constant_bytes: desc.push_constant_bytes,
            destroyed: false,
        };
        // Build step by step; on error, destroy what exists (null handles are ignored).
        let built = (|| {
            let types = vec![vk::DescriptorType::STORAGE_BUFFER; desc.storage_buffers as usize];
            this.set_layout = set_layout(ctx, &types, false)?;
            this.layout = pipeline_layout(ctx, this.set_layout, desc.push_constant_bytes)?;
            this.pipeline = compute_pipeline(ctx, desc.spirv, desc.entry, this.layout)?;
            let sizes = [vk::DescriptorPoolSize::default()
                .ty(vk::DescriptorType::STORAGE_BUFFER)
                .descriptor_count(desc.storage_buffers * desc.max_sets)];
            let info = vk::DescriptorPoolCreateInfo::default()
                .max_sets(desc.max_sets)
                .pool_sizes(&sizes);
            // SAFETY: valid info.
            this.pool = unsafe { device.create_descriptor_pool(&info, None) }
                .map_err(vk_err("vkCreateDescriptorPool"))?;
            Ok(())
        })();
        match built {
            Ok(()) => Ok(this),
            Err(e) => {
                // SAFETY: nothing was submitted; every non-null handle is ours.
                unsafe { this.destroy(ctx) };
                Err(e)
            }
        }
    }

    /// Allocates a descriptor set pointing binding `i` at `buffers[i]` (whole buffer).
    pub fn bind_set(&self, ctx: &Context, buffers: &[&Buffer]) -> Result<BindingSet> {
        if buffers.len() != self.storage_buffers as usize {
            return Err(Error::InvalidInput(format!(
                "{}: {} buffers for {} bindings",
                self.name,
                buffers.len(),
                self.storage_buffers
            )));
        }
        let layouts = [self.set_layout];
        let info = vk::DescriptorSetAllocateInfo::default()
            .descriptor_pool(self.pool)
            .set_layouts(&layouts);
        // SAFETY: pool and layout are live. Running out of sets is a caller error reported as
        // VK_ERROR_OUT_OF_POOL_MEMORY.
        let set = unsafe { ctx.device().allocate_descriptor_sets(&info) }
            .map_err(vk_err("vkAllocateDescriptorSets"))?[0];
        let infos: Vec<_> = buffers
            .iter()
            .map(|b| {
                [vk::DescriptorBufferInfo::default()
                    .buffer(b.raw())
                    .range(vk::WHOLE_SIZE)]
            })
            .collect();
        let writes: Vec<_> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                vk::WriteDescriptorSet::default()
                    .dst_set(set)
                    .dst_binding(i as u32)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(info)
            })
            .collect();
        // SAFETY: the set was just allocated and is not in use; the buffers are live.
        unsafe { ctx.device().update_descriptor_sets(&writes, &[]) };
        Ok(BindingSet(set))
    }

    /// Records bind + push constants + dispatch into `cmd`.
    ///
    /// # Safety
    /// `cmd` must be a command buffer of `ctx`'s device in the recording state, outside a render
    /// pass; the buffers of `set` must stay alive until the submission completes.
    pub unsafe fn record_dispatch(
        &self,
        ctx: &Context,
        cmd: vk::CommandBuffer,
        set: BindingSet,
        push_constants: &[u8],
        groups: [u32; 3],
    ) -> Result<()> {
        if push_constants.len() != self.push_constant_bytes as usize {
            return Err(Error::InvalidInput(format!(
                "{}: {} push-constant bytes, pipeline takes {}",
                self.name,
                push_constants.len(),
                self.push_constant_bytes
            )));
        }
        let limits = ctx.adapter().max_compute_work_group_count;
        if groups.iter().zip(limits).any(|(g, l)| *g > l) {
            return Err(Error::InvalidInput(format!(
                "{}: dispatch {groups:?} exceeds maxComputeWorkGroupCount {limits:?}",
                self.name
            )));
        }
        let d = ctx.device();
        // SAFETY: the caller guarantees cmd is recording; pipeline, layout and set are live and
        // compatible (same layout); push range matches the layout's.
        unsafe {
            d.cmd_bind_pipeline(cmd, vk::PipelineBindPoint::COMPUTE, self.pipeline);
            d.cmd_bind_descriptor_sets(
                cmd,
                vk::PipelineBindPoint::COMPUTE,
                self.layout,
                0,
                &[set.0],
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

    /// Destroys the pipeline, its layouts and its descriptor pool.
    ///
    /// # Safety
    /// The GPU must have finished every submission that used this pipeline.
    pub unsafe fn destroy(&mut self, ctx: &Context) {
        // SAFETY: idle (caller); null handles are ignored by vkDestroy*.
        unsafe {
            ctx.device()
                .destroy_descriptor_pool(std::mem::take(&mut self.pool), None);
            destroy_pipeline_objects(
                ctx,
                &mut self.pipeline,
                &mut self.layout,
                &mut self.set_layout,
            );
        }
        self.destroyed = true;
    }
}

impl Drop for ComputePipeline {
    fn drop(&mut self) {
        if !self.destroyed {
            log::error!(
                "leak: compute pipeline {:?} dropped without destroy()",
                self.name
            );
            if !std::thread::panicking() {
                debug_assert!(false, "compute pipeline {:?} leaked", self.name);
            }
        }
    }
}
