//! Sun shadows: the shadow maps of up to [`MAX_CASCADES`] orthographic cascades, drawn from the
//! cull pass's cascade lists into the caller's command buffer, and the constants the camera
//! draw looks them up with ([`ShadowFrame`], [`DrawPass::prepare_shadows`]).
//!
//! The cascades share one [`SHADOW_FORMAT`] image, each in a square tile of it (two tiles per
//! row; understory's images have one layer, so tiles stand in for array layers). View `c + 1` of
//! the cull pass ([`CullPass::set_cascades`]) holds cascade `c`'s casters: every instance inside
//! its volume, at the LOD the camera's distance bands give it. [`ShadowMaps::record`] draws them
//! depth-only with a depth bias: full and medium meshes turned by their yaw as the camera draw
//! does, billboards turned about +Y to face the sun and cut out by the atlas's alpha, so shadows
//! have the trees' shapes at every LOD.
//!
//! Depth is Vulkan's (0 towards the sun, 1 away), cleared to 1 (nothing casts). A cascade's
//! matrix maps world space to its clip space with x and y in -1..1 over its tile (`uv = xy * 0.5 +
//! 0.5`, no flip), as [`CascadeView::new`](crate::gpu::cull::CascadeView::new) takes it.
//!
//! [`DrawPass::prepare_shadows`]: crate::gpu::draw::DrawPass::prepare_shadows
//! [`CullPass::set_cascades`]: crate::gpu::cull::CullPass::set_cascades

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ash::vk;
use glam::{Mat4, Vec2};

use crate::error::{Error, Result, vk_err};
use crate::gpu::adapter::DeviceFeatures;
use crate::gpu::compute::{
    DescriptorArena, image_barrier, lock, retire_pipeline_objects, shader_module,
};
use crate::gpu::context::{Context, Frame, FrameTag, Shared};
use crate::gpu::cull::{CullPass, DrawIndexedIndirect};
use crate::gpu::draw::{
    Meshes, SPECIES_TABLE_BYTES, SpeciesMeshes, atlas_sampler, atlas_view, check_atlas_page,
    mesh_buffers, record_updates, species_table,
};
use crate::gpu::memory::{Buffer, BufferDesc, Image, ImageDesc, MemoryLocation, RawObject};
use crate::gpu::shaders;
use crate::policy::category::Category;
use crate::vegetation::SpeciesId;
use crate::world::atlas::AtlasRegion;

/// The shadow maps' depth format.
pub const SHADOW_FORMAT: vk::Format = vk::Format::D32_SFLOAT;

/// The layout [`ShadowMaps::record`] leaves the image in: what the camera draw samples.
pub const SHADOW_READ_LAYOUT: vk::ImageLayout = vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL;

/// Most cascades (`array<mat4x4<f32>, 4>` in `shaders/common/shadow.wgsl`; the cull pass's
/// views besides the camera).
pub const MAX_CASCADES: u32 = 4;

/// A depth-aspect 2D view of a shadow maps' image (one mip, one layer).
pub(crate) fn depth_view(device: &ash::Device, image: &Image) -> Result<vk::ImageView> {
    let info = vk::ImageViewCreateInfo::default()
        .image(image.raw())
        .view_type(vk::ImageViewType::TYPE_2D)
        .format(SHADOW_FORMAT)
        .subresource_range(vk::ImageSubresourceRange {
            aspect_mask: vk::ImageAspectFlags::DEPTH,
            base_mip_level: 0,
            level_count: 1,
            base_array_layer: 0,
            layer_count: 1,
        });
    // SAFETY: a live 2D image of this device that ShadowMaps made: SHADOW_FORMAT, a depth-only
    // format, so DEPTH is its only aspect; one mip and one layer, what the view covers
    // (VUID-VkImageViewCreateInfo-subresourceRange-01718); SAMPLED and DEPTH_STENCIL_ATTACHMENT
    // usage (VUID-VkImageViewCreateInfo-image-04441).
    unsafe { device.create_image_view(&info, None) }.map_err(vk_err("vkCreateImageView"))
}

/// Tiles per row of the image.
const COLUMNS: u32 = 2;

/// Fewest texels along a tile's side: the lookup keeps 2.5 texels from each edge.
pub const MIN_TILE_PX: u32 = 16;

/// What the camera draw knows about the shadow maps, laid out exactly as WGSL `ShadowFrame`
/// (`shaders/common/shadow.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct ShadowFrame {
    /// World to each cascade's clip space (column-major).
    pub view_proj: [[[f32; 4]; 4]; MAX_CASCADES as usize],
    /// Each cascade's tile: uv of its corner (xy) and its size (zw).
    pub tiles: [[f32; 4]; MAX_CASCADES as usize],
    /// Metres of world per texel, per cascade.
    pub texel_m: [f32; 4],
    /// x: distance where shadows have faded out (m); y: share of the direct light a shadow
    /// takes; z: one texel as a share of a tile's side; w unused.
    pub params: [f32; 4],
    /// x: cascades.
    pub count: [u32; 4],
}

const _: () = assert!(size_of::<ShadowFrame>() == shaders::layout::SHADOWFRAME_SIZE);
const _: () =
    assert!(std::mem::offset_of!(ShadowFrame, tiles) == shaders::layout::SHADOWFRAME_OFFSET_TILES);
const _: () = assert!(
    std::mem::offset_of!(ShadowFrame, texel_m) == shaders::layout::SHADOWFRAME_OFFSET_TEXEL_M
);
const _: () = assert!(
    std::mem::offset_of!(ShadowFrame, params) == shaders::layout::SHADOWFRAME_OFFSET_PARAMS
);
const _: () =
    assert!(std::mem::offset_of!(ShadowFrame, count) == shaders::layout::SHADOWFRAME_OFFSET_COUNT);

/// `ShadowPush` in `shaders/shadow.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct ShadowPush {
    view_proj: [[f32; 4]; 4],
    /// Horizontal unit direction towards the sun (x, z); zw unused.
    facing: [f32; 4],
    lod: u32,
    base: u32,
    species_count: u32,
    /// Non-zero: the draw indexes the run and the vertex stage fetches each corner's index
    /// ([`Meshes::fetch`]).
    fetch: u32,
}

const _: () = assert!(
    size_of::<ShadowPush>() <= 128,
    "the guaranteed push-constant space"
);

/// How the shadow maps are built.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ShadowDesc {
    /// Cascades, 1..=[`MAX_CASCADES`].
    pub cascades: u32,
    /// Texels along each cascade's square tile (at least [`MIN_TILE_PX`], at most 65,536, and
    /// the device's image and framebuffer limits).
    pub tile_px: u32,
    /// Casters' constant depth bias, in the depth format's smallest steps.
    pub depth_bias_constant: f32,
    /// Casters' depth bias per unit of depth slope.
    pub depth_bias_slope: f32,
    /// Share of the direct light a shadow takes away (1: only the ambient term is left).
    pub strength: f32,
}

impl Default for ShadowDesc {
    fn default() -> Self {
        Self {
            cascades: MAX_CASCADES,
            tile_px: 2048,
            depth_bias_constant: 2.0,
            depth_bias_slope: 2.0,
            strength: 1.0,
        }
    }
}

/// The shadow maps' image, pipeline and buffers. Dropping it retires everything at the last
/// frame that recorded it (the image at its own last use, which may be later: a
/// [`DrawPass`](crate::gpu::draw::DrawPass) that samples it keeps it).
pub struct ShadowMaps {
    shared: Arc<Shared>,
    last_use: AtomicU64,
    desc: ShadowDesc,
    image: Arc<Image>,
    /// The image's depth view, the attachment the casters are drawn into.
    depth_view: vk::ImageView,
    set_layout: vk::DescriptorSetLayout,
    layout: vk::PipelineLayout,
    pipeline: vk::Pipeline,
    sets: Mutex<DescriptorArena>,
    sampler: vk::Sampler,
    /// A view of the atlas page, never the page (see [`DrawPass::new`]: `record` checks the
    /// page by id, so the view is not used once the page is gone).
    ///
    /// [`DrawPass::new`]: crate::gpu::draw::DrawPass::new
    atlas_view: vk::ImageView,
    atlas_image: u64,
    atlas_page: u32,
    vertices: Option<Buffer>,
    indices: Option<Buffer>,
    mesh_table: Option<Buffer>,
    /// The meshes' draws ([`Meshes::lods`]): the cull pass must have been built with them.
    lods: [DrawIndexedIndirect; 3],
    fetch: [bool; 3],
    mesh_sets: u32,
    species_meshes: SpeciesMeshes,
    species: Option<Buffer>,
    /// The frame of the last record and the matrices it drew the cascades with.
    recorded: Mutex<(Option<FrameTag>, Vec<Mat4>)>,
}

impl ShadowMaps {
    /// Builds the image (category [`Category::Outputs`]: within the vegetation budget), the
    /// depth-only pipeline and the mesh and species buffers, and a view of atlas page number
    /// `page_index`, `atlas_page` (the billboards' page, as for
    /// [`DrawPass::new`](crate::gpu::draw::DrawPass::new), whose rules it follows). Needs a
    /// graphics queue and dynamic rendering.
    ///
    /// [`Error::InvalidInput`] for a cascade count outside 1..=[`MAX_CASCADES`], a tile smaller
    /// than [`MIN_TILE_PX`], an image larger than the device's image, framebuffer or viewport
    /// limits, non-finite biases or a strength outside 0..=1, or an atlas page the pass cannot
    /// sample; [`Error::Unsupported`] when [`SHADOW_FORMAT`] cannot be a sampled depth
    /// attachment with optimal tiling; the budget's errors as [`Context::create_image`] returns
    /// them.
    pub fn new(
        ctx: &Context,
        desc: &ShadowDesc,
        atlas_page: &Image,
        page_index: u32,
    ) -> Result<Self> {
        Self::with_meshes(ctx, desc, atlas_page, page_index, &Meshes::trees())
    }

    /// As [`ShadowMaps::new`], casting the mesh sets of `meshes` (those of the
    /// [`DrawPass`](crate::gpu::draw::DrawPass) built with the same, whose
    /// [`lod_meshes`](crate::gpu::draw::DrawPass::lod_meshes) the cull pass has): every
    /// species casts with set 0 until [`ShadowMaps::set_species_meshes`] says otherwise.
    pub fn with_meshes(
        ctx: &Context,
        desc: &ShadowDesc,
        atlas_page: &Image,
        page_index: u32,
        meshes: &Meshes,
    ) -> Result<Self> {
        let shared = ctx.shared();
        shared.require(
            "the shadow maps",
            &DeviceFeatures {
                dynamic_rendering: true,
                ..Default::default()
            },
            vk::QueueFlags::GRAPHICS,
        )?;
        check_atlas_page(shared, atlas_page)?;
        meshes.fits(ctx)?;
        // At most 2^16 texels a tile: the image's extent below cannot overflow (the device's
        // limits are checked after it).
        if !(1..=MAX_CASCADES).contains(&desc.cascades)
            || !(MIN_TILE_PX..=1 << 16).contains(&desc.tile_px)
        {
            return Err(Error::InvalidInput(format!(
                "shadow maps of {} cascades of {} texels (1..={MAX_CASCADES} cascades, at least {MIN_TILE_PX} texels)",
                desc.cascades, desc.tile_px
            )));
        }
        if !(desc.depth_bias_constant.is_finite()
            && desc.depth_bias_slope.is_finite()
            && (0.0..=1.0).contains(&desc.strength))
        {
            return Err(Error::InvalidInput(format!(
                "shadow maps: depth bias {} + {} per slope, strength {}",
                desc.depth_bias_constant, desc.depth_bias_slope, desc.strength
            )));
        }
        let extent = Self::image_extent(desc);
        // SAFETY: the adapter's physical device belongs to the context's live instance
        // (VUID-vkGetPhysicalDeviceProperties-physicalDevice-parameter).
        let limits = unsafe {
            ctx.instance()
                .get_physical_device_properties(ctx.adapter().handle)
        }
        .limits;
        // The image (VUID-VkImageCreateInfo-extent-02252), the render area (at most
        // maxFramebufferWidth x maxFramebufferHeight) and each tile's viewport (at most
        // maxViewportDimensions, VUID-VkViewport-width-01771, -height-01773) fit the device.
        let widest = limits
            .max_image_dimension2_d
            .min(limits.max_framebuffer_width)
            .min(limits.max_framebuffer_height);
        let viewport = limits.max_viewport_dimensions;
        if extent.width.max(extent.height) > widest || desc.tile_px > viewport[0].min(viewport[1]) {
            return Err(Error::InvalidInput(format!(
                "shadow maps of {}x{} texels: the device allows {widest} per side and viewports of {viewport:?}",
                extent.width, extent.height
            )));
        }
        // SAFETY: as above (VUID-vkGetPhysicalDeviceFormatProperties-physicalDevice-parameter);
        // the format is a valid core enum.
        let props = unsafe {
            ctx.instance()
                .get_physical_device_format_properties(ctx.adapter().handle, SHADOW_FORMAT)
        };
        let needed = vk::FormatFeatureFlags::DEPTH_STENCIL_ATTACHMENT
            | vk::FormatFeatureFlags::SAMPLED_IMAGE;
        if !props.optimal_tiling_features.contains(needed) {
            return Err(Error::Unsupported(format!(
                "shadow maps need {SHADOW_FORMAT:?} with {needed:?} (optimal tiling has {:?})",
                props.optimal_tiling_features
            )));
        }
        let image = ctx.create_image(&ImageDesc {
            name: "shadow maps",
            extent,
            format: SHADOW_FORMAT,
            mip_levels: 1,
            // TRANSFER_SRC: tests read the maps back.
            usage: vk::ImageUsageFlags::DEPTH_STENCIL_ATTACHMENT
                | vk::ImageUsageFlags::SAMPLED
                | vk::ImageUsageFlags::TRANSFER_SRC,
            category: Category::Outputs,
        })?;
        let mut this = Self {
            shared: shared.clone(),
            last_use: AtomicU64::new(0),
            desc: *desc,
            image: Arc::new(image),
            depth_view: vk::ImageView::null(),
            set_layout: vk::DescriptorSetLayout::null(),
            layout: vk::PipelineLayout::null(),
            pipeline: vk::Pipeline::null(),
            sets: Mutex::new(DescriptorArena::new(
                &[
                    (vk::DescriptorType::STORAGE_BUFFER, 5),
                    (vk::DescriptorType::SAMPLED_IMAGE, 1),
                    (vk::DescriptorType::SAMPLER, 1),
                ],
                8,
            )),
            sampler: vk::Sampler::null(),
            atlas_view: vk::ImageView::null(),
            atlas_image: atlas_page.id(),
            atlas_page: page_index,
            vertices: None,
            indices: None,
            mesh_table: None,
            lods: meshes.lods(),
            fetch: meshes.fetch(),
            mesh_sets: meshes.sets(),
            species_meshes: SpeciesMeshes::default(),
            species: None,
            recorded: Mutex::new((None, Vec::new())),
        };
        // On error, Drop retires whatever was built (nothing was recorded with it).
        this.build(ctx, atlas_page, meshes)?;
        Ok(this)
    }

    fn image_extent(desc: &ShadowDesc) -> vk::Extent2D {
        let columns = desc.cascades.min(COLUMNS);
        vk::Extent2D {
            width: columns * desc.tile_px,
            height: desc.cascades.div_ceil(columns) * desc.tile_px,
        }
    }

    fn build(&mut self, ctx: &Context, atlas_page: &Image, meshes: &Meshes) -> Result<()> {
        let d = ctx.device();
        self.depth_view = depth_view(d, &self.image)?;
        let [vertices, indices, table] = mesh_buffers(ctx, "shadow", meshes)?;
        self.vertices = Some(vertices);
        self.indices = Some(indices);
        self.mesh_table = Some(table);
        self.species = Some(ctx.create_buffer(&BufferDesc {
            name: "shadow species",
            size: SPECIES_TABLE_BYTES,
            usage: vk::BufferUsageFlags::STORAGE_BUFFER | vk::BufferUsageFlags::TRANSFER_DST,
            location: MemoryLocation::GpuOnly,
            category: Category::Outputs,
        })?);
        self.atlas_view = atlas_view(d, atlas_page)?;
        self.sampler = atlas_sampler(d)?;

        let stages = vk::ShaderStageFlags::VERTEX | vk::ShaderStageFlags::FRAGMENT;
        let bindings = [
            vk::DescriptorType::STORAGE_BUFFER,
            vk::DescriptorType::STORAGE_BUFFER,
            vk::DescriptorType::SAMPLED_IMAGE,
            vk::DescriptorType::SAMPLER,
            vk::DescriptorType::STORAGE_BUFFER,
            vk::DescriptorType::STORAGE_BUFFER,
            vk::DescriptorType::STORAGE_BUFFER,
        ]
        .iter()
        .enumerate()
        .map(|(b, t)| {
            vk::DescriptorSetLayoutBinding::default()
                .binding(b as u32)
                .descriptor_type(*t)
                .descriptor_count(1)
                .stage_flags(stages)
        })
        .collect::<Vec<_>>();
        let info = vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings);
        // SAFETY: valid info (distinct bindings, one descriptor each).
        self.set_layout = unsafe { d.create_descriptor_set_layout(&info, None) }
            .map_err(vk_err("vkCreateDescriptorSetLayout"))?;
        let ranges = [vk::PushConstantRange::default()
            .stage_flags(vk::ShaderStageFlags::VERTEX)
            .size(size_of::<ShadowPush>() as u32)];
        let sets = [self.set_layout];
        let info = vk::PipelineLayoutCreateInfo::default()
            .set_layouts(&sets)
            .push_constant_ranges(&ranges);
        // SAFETY: valid info referencing a live set layout; the range is within the guaranteed
        // 128 bytes (VUID-VkPushConstantRange-size-00298).
        self.layout = unsafe { d.create_pipeline_layout(&info, None) }
            .map_err(vk_err("vkCreatePipelineLayout"))?;
        self.pipeline = self.create_pipeline(d)?;
        Ok(())
    }

    fn create_pipeline(&self, d: &ash::Device) -> Result<vk::Pipeline> {
        // One module per stage (GPU-assisted validation cannot instrument mixed modules).
        let vs = shader_module(d, shaders::SHADOW_VS_MAIN)?;
        let fs = match shader_module(d, shaders::SHADOW_FS_MAIN) {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: just created, used by nothing.
                unsafe { d.destroy_shader_module(vs, None) };
                return Err(e);
            }
        };
        let stage_infos = [
            vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::VERTEX)
                .module(vs)
                .name(c"vs_main"),
            vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::FRAGMENT)
                .module(fs)
                .name(c"fs_main"),
        ];
        // No vertex input: the vertex stage fetches its corners from the mesh buffers.
        let vertex_input = vk::PipelineVertexInputStateCreateInfo::default();
        let assembly = vk::PipelineInputAssemblyStateCreateInfo::default()
            .topology(vk::PrimitiveTopology::TRIANGLE_LIST);
        let viewport = vk::PipelineViewportStateCreateInfo::default()
            .viewport_count(1)
            .scissor_count(1);
        // Both faces cast (the meshes are open and billboards are single quads); the bias
        // keeps lit surfaces from shadowing themselves.
        let raster = vk::PipelineRasterizationStateCreateInfo::default()
            .polygon_mode(vk::PolygonMode::FILL)
            .cull_mode(vk::CullModeFlags::NONE)
            .front_face(vk::FrontFace::COUNTER_CLOCKWISE)
            .depth_bias_enable(true)
            .depth_bias_constant_factor(self.desc.depth_bias_constant)
            .depth_bias_slope_factor(self.desc.depth_bias_slope)
            .line_width(1.0);
        let multisample = vk::PipelineMultisampleStateCreateInfo::default()
            .rasterization_samples(vk::SampleCountFlags::TYPE_1);
        let depth = vk::PipelineDepthStencilStateCreateInfo::default()
            .depth_test_enable(true)
            .depth_write_enable(true)
            .depth_compare_op(vk::CompareOp::LESS);
        let blend = vk::PipelineColorBlendStateCreateInfo::default();
        let dynamic_states = [vk::DynamicState::VIEWPORT, vk::DynamicState::SCISSOR];
        let dynamic = vk::PipelineDynamicStateCreateInfo::default().dynamic_states(&dynamic_states);
        let mut rendering =
            vk::PipelineRenderingCreateInfo::default().depth_attachment_format(SHADOW_FORMAT);
        let info = [vk::GraphicsPipelineCreateInfo::default()
            .stages(&stage_infos)
            .vertex_input_state(&vertex_input)
            .input_assembly_state(&assembly)
            .viewport_state(&viewport)
            .rasterization_state(&raster)
            .multisample_state(&multisample)
            .depth_stencil_state(&depth)
            .color_blend_state(&blend)
            .dynamic_state(&dynamic)
            .layout(self.layout)
            .push_next(&mut rendering)];
        // SAFETY: every state struct is valid and lives for the call; modules and layout are
        // live; dynamic rendering is enabled (checked in new); no colour attachment, so the
        // blend state has none (VUID-VkGraphicsPipelineCreateInfo-renderPass-06055); the depth
        // bias clamp is 0, so the depthBiasClamp feature is not needed (-pDynamicStates-00754).
        let pipelines =
            unsafe { d.create_graphics_pipelines(vk::PipelineCache::null(), &info, None) };
        // SAFETY: the modules are no longer needed once the pipeline exists (or failed).
        unsafe {
            d.destroy_shader_module(vs, None);
            d.destroy_shader_module(fs, None);
        }
        Ok(pipelines
            .map_err(|(_, e)| e)
            .map_err(vk_err("vkCreateGraphicsPipelines"))?[0])
    }

    /// Species `species` casts with mesh set `set` from the next [`ShadowMaps::record`] on
    /// (set 0 until then), as [`DrawPass::set_species_meshes`] for the camera's draws.
    /// [`Error::InvalidInput`] for a set the maps lack or a species id past [`MAX_SPECIES`](crate::gpu::draw::MAX_SPECIES).
    ///
    /// [`DrawPass::set_species_meshes`]: crate::gpu::draw::DrawPass::set_species_meshes
    pub fn set_species_meshes(&self, species: SpeciesId, set: u32) -> Result<()> {
        self.species_meshes.set(species, set, self.mesh_sets)
    }

    /// What it was built with.
    pub fn desc(&self) -> &ShadowDesc {
        &self.desc
    }

    /// Cascades (tiles) the image holds.
    pub fn cascades(&self) -> u32 {
        self.desc.cascades
    }

    /// Cascade `c`'s tile in the image (`None` past the last cascade).
    pub fn tile(&self, c: u32) -> Option<vk::Rect2D> {
        (c < self.desc.cascades).then(|| {
            let columns = self.desc.cascades.min(COLUMNS);
            let px = self.desc.tile_px;
            vk::Rect2D {
                offset: vk::Offset2D {
                    x: ((c % columns) * px) as i32,
                    y: ((c / columns) * px) as i32,
                },
                extent: vk::Extent2D {
                    width: px,
                    height: px,
                },
            }
        })
    }

    /// The image ([`SHADOW_FORMAT`], one mip, in [`SHADOW_READ_LAYOUT`] after a record; the
    /// tiles of [`ShadowMaps::tile`]). A frame that reads it must mark it used.
    pub fn image(&self) -> &Image {
        &self.image
    }

    pub(crate) fn shared_image(&self) -> &Arc<Image> {
        &self.image
    }

    /// The camera draw's constants for what [`ShadowMaps::record`] drew in `frame`: each
    /// cascade's matrix and tile, its texel size in metres (from the matrix's x scale), the
    /// strength, and shadows fading out towards `distance_m` from the camera.
    ///
    /// [`Error::Lifecycle`] if this frame recorded no shadow maps (or for a frame of another
    /// context); [`Error::InvalidInput`] for a `distance_m` that is not positive and finite.
    pub fn constants(&self, frame: &Frame, distance_m: f32) -> Result<ShadowFrame> {
        frame.check(&self.shared, "ShadowMaps::constants")?;
        if !(distance_m > 0.0 && distance_m.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "shadows fading out at {distance_m} m"
            )));
        }
        let recorded = lock(&self.recorded);
        if !recorded.0.as_ref().is_some_and(|t| t.is(frame)) {
            return Err(Error::Lifecycle(format!(
                "no shadow maps recorded for frame {} (the last were for {:?})",
                frame.value(),
                recorded.0.as_ref().map(FrameTag::value)
            )));
        }
        let size = Self::image_extent(&self.desc);
        let size = Vec2::new(size.width as f32, size.height as f32);
        let mut out = ShadowFrame {
            view_proj: [[[0.0; 4]; 4]; MAX_CASCADES as usize],
            tiles: [[0.0; 4]; MAX_CASCADES as usize],
            texel_m: [0.0; 4],
            params: [
                distance_m,
                self.desc.strength,
                1.0 / self.desc.tile_px as f32,
                0.0,
            ],
            count: [recorded.1.len() as u32, 0, 0, 0],
        };
        for (c, m) in recorded.1.iter().enumerate() {
            out.view_proj[c] = m.to_cols_array_2d();
            if let Some(t) = self.tile(c as u32) {
                out.tiles[c] = [
                    t.offset.x as f32 / size.x,
                    t.offset.y as f32 / size.y,
                    t.extent.width as f32 / size.x,
                    t.extent.height as f32 / size.y,
                ];
            }
            // Clip x spans 2 over the tile: the world width of the tile is 2 / |row 0|.
            let scale = m.row(0).truncate().length();
            out.texel_m[c] = 2.0 / (scale * self.desc.tile_px as f32).max(f32::MIN_POSITIVE);
        }
        Ok(out)
    }

    /// Records the shadow maps of `frame`: every tile cleared to 1 (nothing casts), then
    /// cascade `c`'s casters drawn into tile `c` with `view_projs[c]`: the three LOD lists of
    /// the cull pass's view `c + 1`, one indexed indirect draw each, billboards sampling
    /// `atlas_page` with `species`' regions (as [`DrawPass::prepare`] takes them). Tiles past
    /// `view_projs.len()` stay clear. Marks the maps, the page and the cull pass's records and
    /// arguments used by `frame`.
    ///
    /// Barriers: the species table is updated after earlier vertex-shader reads; the image goes
    /// from `UNDEFINED` (its old contents are not needed) to a depth attachment after every
    /// earlier fragment-shader read and depth-test access, and after the draws to
    /// [`SHADOW_READ_LAYOUT`] with the depth writes visible to fragment-shader reads.
    ///
    /// [`Error::InvalidInput`] for more matrices than cascades or than the cull pass has
    /// cascade views, a non-finite matrix, another image than the page the maps were built with,
    /// or more than [`MAX_SPECIES`](crate::gpu::draw::MAX_SPECIES) species; [`Error::Unsupported`] for a species on another
    /// atlas page; [`Error::Lifecycle`] for a cull pass of another context or while a
    /// [`Mapped`](crate::gpu::memory::Mapped) view of its records or arguments is alive. Nothing
    /// is recorded on error.
    ///
    /// # Safety
    /// - `cmd` is recording on this context's device, outside any rendering scope, on a queue
    ///   with graphics, and is recorded for `frame` (submitted as its submission, or before it
    ///   on the same queue).
    /// - The cull pass was built with records and recorded for `frame` before this in
    ///   submission order ([`CullPass::record`] or [`CullPass::record_first`]) with
    ///   [`CullPass::set_cascades`] given these matrices' cascades (lists of other volumes are
    ///   drawn as they are: wrong shadows, nothing unsound).
    /// - The atlas page is in `SHADER_READ_ONLY_OPTIMAL` (as `Vegetation::record` leaves it).
    ///
    /// [`DrawPass::prepare`]: crate::gpu::draw::DrawPass::prepare
    /// [`CullPass::set_cascades`]: crate::gpu::cull::CullPass::set_cascades
    pub unsafe fn record(
        &self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        cull: &CullPass,
        view_projs: &[Mat4],
        species: &[Option<AtlasRegion>],
        atlas_page: &Image,
    ) -> Result<()> {
        frame.check(&self.shared, "ShadowMaps::record")?;
        let count = view_projs.len();
        let views = cull.views() as usize;
        if count > self.desc.cascades as usize || count + 1 > views {
            return Err(Error::InvalidInput(format!(
                "ShadowMaps::record: {count} cascades, the maps hold {} and the cull pass culls {} besides the camera",
                self.desc.cascades,
                views.saturating_sub(1)
            )));
        }
        if let Some(m) = view_projs.iter().find(|m| !m.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "ShadowMaps::record: cascade matrix {m} is not finite"
            )));
        }
        if atlas_page.id() != self.atlas_image {
            return Err(Error::InvalidInput(format!(
                "ShadowMaps::record: atlas page {:?} is not the image the maps were built with",
                atlas_page.name()
            )));
        }
        let species_uv = species_table(species, self.atlas_page, &self.species_meshes)?;
        let (vb, ib, tb, sb) = (
            Self::get(&self.vertices)?,
            Self::get(&self.indices)?,
            Self::get(&self.mesh_table)?,
            Self::get(&self.species)?,
        );
        let (records, args) = (cull.records()?, cull.args()?);
        if !records.belongs_to(&self.shared) {
            return Err(Error::Lifecycle(
                "ShadowMaps::record: the cull pass is of another context".into(),
            ));
        }
        // The indirect commands index the maps' mesh buffers.
        if cull.meshes() != self.lods {
            return Err(Error::InvalidInput(
                "ShadowMaps::record: the cull pass draws other meshes (build it with DrawPass::lod_meshes)".into(),
            ));
        }
        let value = frame.value();
        // Marked before anything is recorded: a buffer with a live `Mapped` view refuses
        // (those marked before it only wait for this frame).
        for b in [vb, ib, tb, sb, records, args] {
            b.mark_used(value)?;
        }
        let set = lock(&self.sets).allocate(&self.shared, value, self.set_layout)?;
        atlas_page.touch(value);
        self.image.touch(value);
        self.last_use.fetch_max(value, Ordering::AcqRel);
        *lock(&self.recorded) = (Some(frame.tag()), view_projs.to_vec());

        let d = &self.shared.device;
        let buf = crate::gpu::compute::whole;
        let (ri, si) = (buf(records), buf(sb));
        let (vi, ii, ti) = (buf(vb), buf(ib), buf(tb));
        let image = [vk::DescriptorImageInfo::default()
            .image_view(self.atlas_view)
            .image_layout(vk::ImageLayout::SHADER_READ_ONLY_OPTIMAL)];
        let sampler = [vk::DescriptorImageInfo::default().sampler(self.sampler)];
        let writes = [
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(0)
                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                .buffer_info(&ri),
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(1)
                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                .buffer_info(&si),
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(2)
                .descriptor_type(vk::DescriptorType::SAMPLED_IMAGE)
                .image_info(&image),
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(3)
                .descriptor_type(vk::DescriptorType::SAMPLER)
                .image_info(&sampler),
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(4)
                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                .buffer_info(&vi),
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(5)
                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                .buffer_info(&ii),
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(6)
                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                .buffer_info(&ti),
        ];
        let depth_range = vk::ImageSubresourceRange {
            aspect_mask: vk::ImageAspectFlags::DEPTH,
            base_mip_level: 0,
            level_count: 1,
            base_array_layer: 0,
            layer_count: 1,
        };
        let tests = vk::PipelineStageFlags::EARLY_FRAGMENT_TESTS
            | vk::PipelineStageFlags::LATE_FRAGMENT_TESTS;
        let attachment = (
            vk::ImageLayout::DEPTH_STENCIL_ATTACHMENT_OPTIMAL,
            vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_READ
                | vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_WRITE,
        );
        let extent = self.image.extent();
        let depth_att = vk::RenderingAttachmentInfo::default()
            .image_view(self.depth_view)
            .image_layout(attachment.0)
            .load_op(vk::AttachmentLoadOp::CLEAR)
            .store_op(vk::AttachmentStoreOp::STORE)
            .clear_value(vk::ClearValue {
                depth_stencil: vk::ClearDepthStencilValue {
                    depth: 1.0,
                    stencil: 0,
                },
            });
        let rendering = vk::RenderingInfo::default()
            .render_area(vk::Rect2D {
                offset: vk::Offset2D::default(),
                extent,
            })
            .layer_count(1)
            .depth_attachment(&depth_att);
        let stride = size_of::<DrawIndexedIndirect>() as u64;
        let species_count = species_uv.len() as u32;
        // SAFETY (whole body): cmd is recording outside rendering on a graphics queue for
        // `frame` (caller); every buffer, view and sampler is live and marked used by `frame`
        // (the atlas view's image is `atlas_page`, checked by id; the depth view is the maps'
        // own, retired with them); the species data fits its buffer (`species_table` checked
        // MAX_SPECIES); the set is fresh from the arena and fully written before it is bound;
        // the image is a depth attachment in DEPTH_STENCIL_ATTACHMENT_OPTIMAL inside the scope
        // (VUID-VkRenderingInfo-pDepthAttachment-06088: it has DEPTH_STENCIL_ATTACHMENT usage)
        // and the render area is the whole image, within maxFramebufferWidth/Height (checked in
        // new); each viewport is a tile within the image and maxViewportDimensions; the
        // indirect arguments were finalized by the cull pass, whose closing barrier covers
        // DRAW_INDIRECT and the vertex stage; each draw reads `records` only within its view's
        // LOD list (counts clamped to capacity by the cull pass) and has firstInstance 0
        // (VUID-VkDrawIndexedIndirectCommand-firstInstance-00554); `view_projs.len() + 1 <=
        // views`, so every argument read is inside `args` (6 commands per view); the push range
        // is the layout's.
        unsafe {
            record_updates(d, cmd, &[(sb, bytemuck::cast_slice(&species_uv))]);
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::FRAGMENT_SHADER | tests,
                tests,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &[image_barrier(
                    self.image.raw(),
                    depth_range,
                    (
                        vk::ImageLayout::UNDEFINED,
                        vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_WRITE,
                    ),
                    attachment,
                )],
            );
            d.update_descriptor_sets(&writes, &[]);
            d.cmd_begin_rendering(cmd, &rendering);
            d.cmd_bind_pipeline(cmd, vk::PipelineBindPoint::GRAPHICS, self.pipeline);
            d.cmd_bind_descriptor_sets(
                cmd,
                vk::PipelineBindPoint::GRAPHICS,
                self.layout,
                0,
                &[set],
                &[],
            );
            d.cmd_bind_index_buffer(cmd, ib.raw(), 0, vk::IndexType::UINT32);
            for (c, m) in view_projs.iter().enumerate() {
                let Some(tile) = self.tile(c as u32) else {
                    break;
                };
                d.cmd_set_viewport(
                    cmd,
                    0,
                    &[vk::Viewport {
                        x: tile.offset.x as f32,
                        y: tile.offset.y as f32,
                        width: tile.extent.width as f32,
                        height: tile.extent.height as f32,
                        min_depth: 0.0,
                        max_depth: 1.0,
                    }],
                );
                d.cmd_set_scissor(cmd, 0, &[tile]);
                let view = c as u32 + 1;
                let bases = cull.view_list_bases(view);
                // Billboards face the sun: clip depth grows away from it along row 2.
                let towards_sun = -m.row(2).truncate();
                let flat = Vec2::new(towards_sun.x, towards_sun.z);
                let facing = if flat.length() > 1e-6 {
                    flat.normalize()
                } else {
                    Vec2::Y
                };
                for l in 0..3u32 {
                    let push = ShadowPush {
                        view_proj: m.to_cols_array_2d(),
                        facing: [facing.x, facing.y, 0.0, 0.0],
                        lod: l,
                        base: bases[l as usize],
                        species_count,
                        fetch: u32::from(self.fetch[l as usize]),
                    };
                    d.cmd_push_constants(
                        cmd,
                        self.layout,
                        vk::ShaderStageFlags::VERTEX,
                        0,
                        bytemuck::bytes_of(&push),
                    );
                    d.cmd_draw_indexed_indirect(
                        cmd,
                        args.raw(),
                        u64::from(6 * view + l) * stride,
                        1,
                        stride as u32,
                    );
                }
            }
            d.cmd_end_rendering(cmd);
            d.cmd_pipeline_barrier(
                cmd,
                tests,
                vk::PipelineStageFlags::FRAGMENT_SHADER,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &[image_barrier(
                    self.image.raw(),
                    depth_range,
                    (
                        attachment.0,
                        vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_WRITE,
                    ),
                    (SHADOW_READ_LAYOUT, vk::AccessFlags::SHADER_READ),
                )],
            );
        }
        Ok(())
    }

    fn get(b: &Option<Buffer>) -> Result<&Buffer> {
        b.as_ref()
            .ok_or_else(|| Error::InvalidInput("shadow maps were destroyed".into()))
    }
}

impl std::fmt::Debug for ShadowMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowMaps")
            .field("desc", &self.desc)
            .field("image", &self.image)
            .field("last_use", &self.last_use.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drop for ShadowMaps {
    fn drop(&mut self) {
        lock(&self.sets).retire(&self.shared);
        let last = *self.last_use.get_mut();
        retire_pipeline_objects(
            &self.shared,
            last,
            &mut self.pipeline,
            &mut self.layout,
            &mut self.set_layout,
        );
        self.shared
            .retire_object(RawObject::Sampler(std::mem::take(&mut self.sampler)), last);
        for view in [&mut self.atlas_view, &mut self.depth_view] {
            self.shared
                .retire_object(RawObject::ImageView(std::mem::take(view)), last);
        }
        // The buffers retire themselves at their own last use when dropped with the maps, and
        // so does the image once no draw pass holds it.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_are_two_to_a_row_and_cover_the_image() {
        for cascades in 1..=MAX_CASCADES {
            let desc = ShadowDesc {
                cascades,
                tile_px: 256,
                ..Default::default()
            };
            let e = ShadowMaps::image_extent(&desc);
            assert_eq!(e.width, cascades.min(2) * 256);
            assert_eq!(e.height, cascades.div_ceil(2) * 256);
            assert!(u64::from(e.width) * u64::from(e.height) >= u64::from(cascades) * 256 * 256);
        }
    }
}
