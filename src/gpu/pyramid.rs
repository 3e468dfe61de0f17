//! The depth pyramid (Hi-Z) of two-phase occlusion culling, built from the host's depth buffer
//! into the caller's command buffer. [`pyramid_cpu`] is the CPU reference of the same rule.
//!
//! Depth is Vulkan's (0 near, 1 far, test LESS). Each pyramid texel holds the *largest* (farthest)
//! depth of the texels it covers, so an object whose nearest depth is greater than the pyramid's
//! value over its screen rectangle is certainly hidden.
//!
//! Layout, for a `W`×`H` depth image: level 0 is `ceil(W/2)`×`ceil(H/2)`, level `k+1` is
//! `ceil(size_k/2)` per axis, and the last level is 1×1. Texel `(x, y)` of level 0 is the max of
//! depth texels `2x..=2x+1` × `2y..=2y+1`, each coordinate clamped to the image
//! (`min(2x+1, W-1)`); level `k+1` reduces level `k` the same way. Hence texel `x` of level `L`
//! covers depth pixels `[x·2^(L+1), (x+1)·2^(L+1)) ∩ image`.
//!
//! Vulkan's mip chain halves with `floor`, this one with `ceil`, so the levels live in an image
//! whose base is level 0's size rounded up to a power of two per axis: level `L` is mip `L`, its
//! texels at the top left ([`DepthPyramid::level_extents`]). The rest of each mip is written with
//! 1.0 (far), which hides nothing: a reader that strays past a level's size stays conservative,
//! but `textureDimensions` gives the mip's size, not the level's.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use ash::vk;

use crate::error::{Error, Result, vk_err};
use crate::gpu::adapter::DeviceFeatures;
use crate::gpu::compute::{
    DescriptorArena, compute_pipeline, image_barrier, lock, memory_barrier, pipeline_layout,
    retire_pipeline_objects, set_layout,
};
use crate::gpu::context::{Context, Frame, Shared};
use crate::gpu::memory::{Image, ImageDesc, RawObject};
use crate::gpu::shaders;
use crate::policy::category::Category;

/// The pyramid's texel format: depth as read, compared exactly.
pub const PYRAMID_FORMAT: vk::Format = vk::Format::R32_SFLOAT;

/// The layout the whole pyramid is in after [`DepthPyramid::record`] (storage writes need it).
pub const PYRAMID_LAYOUT: vk::ImageLayout = vk::ImageLayout::GENERAL;

/// Layouts [`DepthPyramid::record`] can read the depth image in (those a sampled depth view
/// may be in; `DEPTH_READ_ONLY_OPTIMAL` needs `separateDepthStencilLayouts`, as putting the
/// image in it did).
pub const DEPTH_LAYOUTS: [vk::ImageLayout; 4] = [
    vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL,
    vk::ImageLayout::DEPTH_READ_ONLY_OPTIMAL,
    vk::ImageLayout::SHADER_READ_ONLY_OPTIMAL,
    vk::ImageLayout::GENERAL,
];

/// Threads per workgroup along each axis (`@workgroup_size(8, 8)` in `shaders/depth_reduce.wgsl`).
const GROUP: u32 = 8;

/// Sets a pool of the arena holds: one per level, and a 16,384-pixel-wide image has 14 levels.
const SETS_PER_POOL: u32 = 32;

/// `PyramidPush` in `shaders/depth_reduce.wgsl`: the source's size, then the level's.
type Push = [u32; 4];

/// Each level's size for a `width`×`height` depth image: halved (rounding up) until 1×1.
fn level_sizes(width: u32, height: u32) -> Vec<(u32, u32)> {
    let (mut w, mut h) = (width, height);
    let mut sizes = Vec::new();
    loop {
        (w, h) = (w.div_ceil(2), h.div_ceil(2));
        sizes.push((w, h));
        if w <= 1 && h <= 1 {
            return sizes;
        }
    }
}

/// The CPU reference: each level as (width, height, texels row-major), level 0 first, by the
/// rule of the module docs. `max` picks one of its inputs, so the GPU's levels equal these bit
/// for bit. Empty for a zero size or when `depth` does not hold `width × height` texels.
pub fn pyramid_cpu(depth: &[f32], width: u32, height: u32) -> Vec<(u32, u32, Vec<f32>)> {
    if width == 0 || height == 0 || depth.len() as u64 != u64::from(width) * u64::from(height) {
        return Vec::new();
    }
    let mut levels: Vec<(u32, u32, Vec<f32>)> = Vec::new();
    for (w, h) in level_sizes(width, height) {
        let (sw, sh, src) = levels
            .last()
            .map_or((width, height, depth), |(w, h, t)| (*w, *h, t));
        let at = |x: u32, y: u32| src[(y.min(sh - 1) * sw + x.min(sw - 1)) as usize];
        let texels = (0..h)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .map(|(x, y)| {
                let (x, y) = (2 * x, 2 * y);
                at(x, y)
                    .max(at(x + 1, y))
                    .max(at(x, y + 1).max(at(x + 1, y + 1)))
            })
            .collect();
        levels.push((w, h, texels));
    }
    levels
}

/// The pyramid image, its views and the reduction pipelines. Dropping it retires everything at
/// the last frame that recorded it (the image at its own last use).
pub struct DepthPyramid {
    shared: Arc<Shared>,
    last_use: AtomicU64,
    depth_extent: vk::Extent2D,
    /// Each level's size (its texels are at the top left of its mip).
    levels: Vec<vk::Extent2D>,
    image: Image,
    /// All levels, what a compute shader samples with `textureLoad(t, coords, level)`.
    view: vk::ImageView,
    /// One view per level: written as a storage image, then read by the next level's dispatch.
    level_views: Vec<vk::ImageView>,
    set_layout: vk::DescriptorSetLayout,
    layout: vk::PipelineLayout,
    from_depth: vk::Pipeline,
    from_level: vk::Pipeline,
    sets: Mutex<DescriptorArena>,
}

impl DepthPyramid {
    /// A pyramid for a depth image of `depth_extent`: the image (in [`Category::Outputs`], so
    /// within the vegetation budget), its views and pipelines. Needs a compute queue.
    ///
    /// [`Error::InvalidInput`] for a zero width or height (or one beyond what the device allows
    /// for the pyramid's image); [`Error::Unsupported`] when [`PYRAMID_FORMAT`] lacks the
    /// storage-image or sampled-image format feature with optimal tiling (or without a compute
    /// queue, or when a level-0 dispatch would exceed `maxComputeWorkGroupCount`); the budget's errors
    /// ([`Error::OverBudget`], ...) as [`Context::create_image`] returns them.
    pub fn new(ctx: &Context, depth_extent: vk::Extent2D) -> Result<Self> {
        let vk::Extent2D { width, height } = depth_extent;
        if width == 0 || height == 0 {
            return Err(Error::InvalidInput(format!(
                "depth pyramid for a {width}x{height} depth image"
            )));
        }
        let shared = ctx.shared();
        shared.require(
            "the depth pyramid",
            &DeviceFeatures::default(),
            vk::QueueFlags::COMPUTE,
        )?;
        // SAFETY: the adapter's physical device belongs to the context's live instance
        // (VUID-vkGetPhysicalDeviceFormatProperties-physicalDevice-parameter); the format is a
        // valid core enum (-format-parameter).
        let props = unsafe {
            ctx.instance()
                .get_physical_device_format_properties(ctx.adapter().handle, PYRAMID_FORMAT)
        };
        let needed = vk::FormatFeatureFlags::STORAGE_IMAGE | vk::FormatFeatureFlags::SAMPLED_IMAGE;
        if !props.optimal_tiling_features.contains(needed) {
            return Err(Error::Unsupported(format!(
                "the depth pyramid needs {PYRAMID_FORMAT:?} with {needed:?} (optimal tiling has {:?})",
                props.optimal_tiling_features
            )));
        }
        let levels: Vec<vk::Extent2D> = level_sizes(width, height)
            .into_iter()
            .map(|(width, height)| vk::Extent2D { width, height })
            .collect();
        // Mip L of a power-of-two base is at least level L's size along each axis, and the
        // chain has exactly as many mips as the pyramid has levels.
        let base = vk::Extent2D {
            width: levels[0].width.next_power_of_two(),
            height: levels[0].height.next_power_of_two(),
        };
        // One dispatch covers a whole mip (VUID-vkCmdDispatch-groupCountX-00386, -00387).
        let groups = ctx.adapter().limits.max_compute_work_group_count;
        if base.width.div_ceil(GROUP) > groups[0] || base.height.div_ceil(GROUP) > groups[1] {
            return Err(Error::Unsupported(format!(
                "a depth pyramid of {}x{} needs more workgroups than {groups:?}",
                base.width, base.height
            )));
        }
        let image = ctx.create_image(&ImageDesc {
            name: "depth pyramid",
            extent: base,
            format: PYRAMID_FORMAT,
            mip_levels: levels.len() as u32,
            usage: vk::ImageUsageFlags::STORAGE
                | vk::ImageUsageFlags::SAMPLED
                | vk::ImageUsageFlags::TRANSFER_SRC,
            category: Category::Outputs,
        })?;
        let mut this = Self {
            shared: shared.clone(),
            last_use: AtomicU64::new(0),
            depth_extent,
            levels,
            image,
            view: vk::ImageView::null(),
            level_views: Vec::new(),
            set_layout: vk::DescriptorSetLayout::null(),
            layout: vk::PipelineLayout::null(),
            from_depth: vk::Pipeline::null(),
            from_level: vk::Pipeline::null(),
            sets: Mutex::new(DescriptorArena::new(
                &[
                    (vk::DescriptorType::SAMPLED_IMAGE, 1),
                    (vk::DescriptorType::STORAGE_IMAGE, 1),
                ],
                SETS_PER_POOL,
            )),
        };
        // On error, Drop retires whatever was built (nothing was recorded with it).
        this.build()?;
        Ok(this)
    }

    fn build(&mut self) -> Result<()> {
        let d = &self.shared.device;
        self.view = self.create_view(0, self.levels())?;
        for level in 0..self.levels() {
            let view = self.create_view(level, 1)?;
            self.level_views.push(view);
        }
        self.set_layout = set_layout(
            d,
            &[
                vk::DescriptorType::SAMPLED_IMAGE,
                vk::DescriptorType::STORAGE_IMAGE,
            ],
        )?;
        self.layout = pipeline_layout(d, self.set_layout, size_of::<Push>() as u32)?;
        // Both entry points read binding 0 as a sampled image and write binding 1 as a storage
        // image, and push 16 bytes (VUID-VkComputePipelineCreateInfo-layout-07988, -07990,
        // -07987).
        self.from_depth = compute_pipeline(d, shaders::DEPTH_REDUCE, c"from_depth", self.layout)?;
        self.from_level = compute_pipeline(d, shaders::DEPTH_REDUCE, c"from_level", self.layout)?;
        Ok(())
    }

    /// A colour view of `count` mips from `base`.
    fn create_view(&self, base: u32, count: u32) -> Result<vk::ImageView> {
        let info = vk::ImageViewCreateInfo::default()
            .image(self.image.raw())
            .view_type(vk::ImageViewType::TYPE_2D)
            .format(PYRAMID_FORMAT)
            .subresource_range(
                vk::ImageSubresourceRange::default()
                    .aspect_mask(vk::ImageAspectFlags::COLOR)
                    .base_mip_level(base)
                    .level_count(count)
                    .layer_count(1),
            );
        // SAFETY: the image is live, of this device, 2D with one layer, of the view's colour
        // format, with SAMPLED and STORAGE usage (VUID-VkImageViewCreateInfo-image-04441); the
        // mips are within its chain (VUID-VkImageViewCreateInfo-subresourceRange-01718).
        unsafe { self.shared.device.create_image_view(&info, None) }
            .map_err(vk_err("vkCreateImageView"))
    }

    /// The depth image's size the pyramid was built for.
    pub fn depth_extent(&self) -> vk::Extent2D {
        self.depth_extent
    }

    /// Level 0's size: `ceil(W/2)`×`ceil(H/2)`.
    pub fn extent(&self) -> vk::Extent2D {
        self.levels[0]
    }

    /// Number of levels (the last is 1×1); also the image's mip count.
    pub fn levels(&self) -> u32 {
        self.levels.len() as u32
    }

    /// Each level's size, level 0 first. Level `L` is the top left of mip `L`, which may be
    /// larger (the image's base is a power of two per axis; see the module docs).
    pub fn level_extents(&self) -> &[vk::Extent2D] {
        &self.levels
    }

    /// The image ([`PYRAMID_FORMAT`], [`DepthPyramid::levels`] mips, in [`PYRAMID_LAYOUT`] after
    /// a record).
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// Marks the image and the views as used by the frame of `value`: they are retired no
    /// earlier than it (a pass that binds the pyramid calls it).
    pub(crate) fn used_by(&self, value: u64) {
        self.image.touch(value);
        self.last_use.fetch_max(value, Ordering::AcqRel);
    }

    /// A view of every level (colour aspect), for `textureLoad(t, coords, level)` in a compute
    /// shader, in [`PYRAMID_LAYOUT`]. Valid while the pyramid lives, and after it is dropped
    /// until the last frame marked with [`DepthPyramid::used_in`] (or that recorded it)
    /// completes: a frame whose commands read the view must mark the pyramid used first.
    pub fn view(&self) -> vk::ImageView {
        self.view
    }

    /// Marks the pyramid (its image and its views) used by `frame`: they are destroyed, once
    /// the pyramid is dropped, no earlier than that frame completes. For a host's own commands
    /// that read [`DepthPyramid::view`] or [`DepthPyramid::image`] (understory's passes mark
    /// what they record). [`Error::Lifecycle`] for a frame of another context.
    pub fn used_in(&self, frame: &Frame) -> Result<()> {
        self.image.used_in(frame)?;
        self.used_by(frame.value());
        Ok(())
    }

    /// The value of the last frame that recorded the pyramid or was marked with
    /// [`DepthPyramid::used_in`] (0: none): once the pyramid is dropped, its views, pipelines
    /// and sets are destroyed no earlier than that frame completes.
    pub fn last_use(&self) -> u64 {
        self.last_use.load(Ordering::Acquire)
    }

    /// Records the pyramid's build from `depth`: one dispatch per level, the first reading the
    /// depth view, each next one the level before it. Marks the pyramid and its image used by
    /// `frame`.
    ///
    /// Barriers: first, the whole image goes from `UNDEFINED` to [`PYRAMID_LAYOUT`] after every
    /// compute-shader and transfer access recorded before (a previous frame's cull or
    /// readback); between levels, compute writes before compute reads; last, the writes are
    /// made visible to compute-shader reads and transfer reads.
    ///
    /// [`Error::InvalidInput`] for a `depth_layout` not in [`DEPTH_LAYOUTS`] or a null view;
    /// [`Error::Lifecycle`] for a frame of another context. Nothing is recorded on error.
    ///
    /// # Safety
    /// - `cmd` is a command buffer of this context's device, recording, outside a render pass,
    ///   on a queue family with compute, recorded for `frame` (submitted as its submission, or
    ///   before it on the same queue).
    /// - `depth` is a live 2D view of this device of a depth image with `SAMPLED` usage and a
    ///   format with the sampled-image feature (D16, D32, D24S8, ...), the depth aspect only,
    ///   one mip and one layer, of exactly [`DepthPyramid::depth_extent`] (another size gives a
    ///   wrong pyramid; the reads stay within the view).
    /// - That subresource is in `depth_layout` when the commands run, its writes made available
    ///   and visible to compute-shader reads by the caller, and the view is not destroyed before
    ///   `frame` completes.
    pub unsafe fn record(
        &self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        depth: vk::ImageView,
        depth_layout: vk::ImageLayout,
    ) -> Result<()> {
        frame.check(&self.shared, "DepthPyramid::record")?;
        if !DEPTH_LAYOUTS.contains(&depth_layout) {
            return Err(Error::InvalidInput(format!(
                "DepthPyramid::record: depth in {depth_layout:?}, not one of {DEPTH_LAYOUTS:?}"
            )));
        }
        if depth == vk::ImageView::null() {
            return Err(Error::InvalidInput(
                "DepthPyramid::record: null depth view".into(),
            ));
        }
        let value = frame.value();
        let sets = {
            let mut arena = lock(&self.sets);
            (0..self.levels())
                .map(|_| arena.allocate(&self.shared, value, self.set_layout))
                .collect::<Result<Vec<_>>>()?
        };
        self.image.touch(value);
        self.last_use.fetch_max(value, Ordering::AcqRel);
        // Level k reads the depth (k = 0) or level k-1, and writes level k.
        let image = |view, layout| {
            [vk::DescriptorImageInfo::default()
                .image_view(view)
                .image_layout(layout)]
        };
        let sources: Vec<_> = (0..self.level_views.len())
            .map(|k| match k {
                0 => image(depth, depth_layout),
                _ => image(self.level_views[k - 1], PYRAMID_LAYOUT),
            })
            .collect();
        let targets: Vec<_> = self
            .level_views
            .iter()
            .map(|v| image(*v, PYRAMID_LAYOUT))
            .collect();
        let writes: Vec<_> = sets
            .iter()
            .zip(sources.iter().zip(&targets))
            .flat_map(|(set, (src, dst))| {
                [
                    vk::WriteDescriptorSet::default()
                        .dst_set(*set)
                        .dst_binding(0)
                        .descriptor_type(vk::DescriptorType::SAMPLED_IMAGE)
                        .image_info(src),
                    vk::WriteDescriptorSet::default()
                        .dst_set(*set)
                        .dst_binding(1)
                        .descriptor_type(vk::DescriptorType::STORAGE_IMAGE)
                        .image_info(dst),
                ]
            })
            .collect();
        let all = vk::ImageSubresourceRange::default()
            .aspect_mask(vk::ImageAspectFlags::COLOR)
            .level_count(vk::REMAINING_MIP_LEVELS)
            .layer_count(1);
        let compute_write = (
            vk::PipelineStageFlags::COMPUTE_SHADER,
            vk::AccessFlags::SHADER_WRITE,
        );
        let d = &self.shared.device;
        let mut src_size = self.depth_extent;
        // SAFETY (whole body): cmd is recording outside a render pass on a compute queue
        // (caller); the sets are fresh from the arena (no pending command uses them) and every
        // binding is written before it is bound (VUID-vkCmdDispatch-None-02697): the depth view
        // as a sampled image in a layout it may be sampled in
        // (VUID-VkWriteDescriptorSet-descriptorType-04149), the pyramid's views, whose image
        // has SAMPLED and STORAGE usage (-00337, -00339), in GENERAL (-04152); the pyramid's
        // image, views and pipelines are live and marked used by `frame`, and the depth view is
        // the caller's (its contract); the first barrier orders the layout transition after
        // earlier compute and transfer accesses (write-after-read), each level's writes are
        // made visible to the next level's reads, and the last barrier to every reader.
        unsafe {
            d.update_descriptor_sets(&writes, &[]);
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &[image_barrier(
                    self.image.raw(),
                    all,
                    (vk::ImageLayout::UNDEFINED, vk::AccessFlags::SHADER_WRITE),
                    (PYRAMID_LAYOUT, vk::AccessFlags::SHADER_WRITE),
                )],
            );
            for (k, (set, size)) in sets.iter().zip(&self.levels).enumerate() {
                if k == 0 {
                    d.cmd_bind_pipeline(cmd, vk::PipelineBindPoint::COMPUTE, self.from_depth);
                } else {
                    memory_barrier(
                        d,
                        cmd,
                        compute_write,
                        (
                            vk::PipelineStageFlags::COMPUTE_SHADER,
                            vk::AccessFlags::SHADER_READ,
                        ),
                    );
                    if k == 1 {
                        d.cmd_bind_pipeline(cmd, vk::PipelineBindPoint::COMPUTE, self.from_level);
                    }
                }
                d.cmd_bind_descriptor_sets(
                    cmd,
                    vk::PipelineBindPoint::COMPUTE,
                    self.layout,
                    0,
                    &[*set],
                    &[],
                );
                let push: Push = [src_size.width, src_size.height, size.width, size.height];
                d.cmd_push_constants(
                    cmd,
                    self.layout,
                    vk::ShaderStageFlags::COMPUTE,
                    0,
                    bytemuck::bytes_of(&push),
                );
                // The whole mip: texels past the level's size get 1.0. No larger than mip 0,
                // whose groups `new` checked against maxComputeWorkGroupCount.
                let mip_w = (self.image.extent().width >> k).max(1);
                let mip_h = (self.image.extent().height >> k).max(1);
                d.cmd_dispatch(cmd, mip_w.div_ceil(GROUP), mip_h.div_ceil(GROUP), 1);
                src_size = *size;
            }
            memory_barrier(
                d,
                cmd,
                compute_write,
                (
                    vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER,
                    vk::AccessFlags::SHADER_READ | vk::AccessFlags::TRANSFER_READ,
                ),
            );
        }
        Ok(())
    }
}

impl std::fmt::Debug for DepthPyramid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DepthPyramid")
            .field("depth_extent", &self.depth_extent)
            .field("levels", &self.levels.len())
            .field("image", &self.image)
            .field("last_use", &self.last_use.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drop for DepthPyramid {
    fn drop(&mut self) {
        lock(&self.sets).retire(&self.shared);
        let last = *self.last_use.get_mut();
        retire_pipeline_objects(
            &self.shared,
            last,
            &mut self.from_depth,
            &mut self.layout,
            &mut self.set_layout,
        );
        self.shared.retire_object(
            RawObject::Pipeline(std::mem::take(&mut self.from_level)),
            last,
        );
        for view in self
            .level_views
            .drain(..)
            .chain([std::mem::take(&mut self.view)])
        {
            self.shared.retire_object(RawObject::ImageView(view), last);
        }
        // The image retires itself at its own last use when dropped with the pyramid.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes(w: u32, h: u32) -> Vec<(u32, u32)> {
        pyramid_cpu(&vec![0.5; (w * h) as usize], w, h)
            .into_iter()
            .map(|(w, h, t)| {
                assert_eq!(t.len(), (w * h) as usize);
                (w, h)
            })
            .collect()
    }

    #[test]
    fn levels_halve_rounding_up_to_one_texel() {
        assert_eq!(
            sizes(1280, 720),
            [
                (640, 360),
                (320, 180),
                (160, 90),
                (80, 45),
                (40, 23),
                (20, 12),
                (10, 6),
                (5, 3),
                (3, 2),
                (2, 1),
                (1, 1)
            ]
        );
        assert_eq!(
            sizes(37, 23),
            [(19, 12), (10, 6), (5, 3), (3, 2), (2, 1), (1, 1)]
        );
        assert_eq!(sizes(1, 9), [(1, 5), (1, 3), (1, 2), (1, 1)]);
        assert_eq!(sizes(2, 2), [(1, 1)]);
    }

    #[test]
    fn one_texel_is_one_level_of_itself() {
        assert_eq!(pyramid_cpu(&[0.25], 1, 1), [(1, 1, vec![0.25])]);
    }

    #[test]
    fn the_farthest_texel_reaches_every_level_above_it() {
        let (w, h, at) = (37u32, 23u32, (36u32, 22u32));
        let mut depth = vec![0.5f32; (w * h) as usize];
        depth[(at.1 * w + at.0) as usize] = 0.875;
        depth[0] = 0.125; // nearer than the rest: never a max
        for (level, (lw, lh, t)) in pyramid_cpu(&depth, w, h).into_iter().enumerate() {
            let shift = level as u32 + 1;
            for y in 0..lh {
                for x in 0..lw {
                    let want = if (x, y) == (at.0 >> shift, at.1 >> shift) {
                        0.875
                    } else {
                        0.5
                    };
                    assert_eq!(t[(y * lw + x) as usize], want, "level {level} ({x}, {y})");
                }
            }
        }
    }

    #[test]
    fn edge_texels_clamp_to_the_image() {
        let levels = pyramid_cpu(&[0.1, 0.2, 0.3], 3, 1);
        assert_eq!(levels, [(2, 1, vec![0.2, 0.3]), (1, 1, vec![0.3])]);
    }

    #[test]
    fn bad_input_gives_no_levels() {
        assert!(pyramid_cpu(&[], 0, 4).is_empty());
        assert!(pyramid_cpu(&[0.5; 5], 2, 2).is_empty());
    }
}
