//! The second-generation cull API as an outside engine would misuse it (a fresh-eyes review's
//! adversarial tests, all fixed): two-phase occlusion (`record_first` / `record_second`,
//! `DepthPyramid`), several views (`CullDesc::views`, `set_cascades`), and the shadow maps
//! (`ShadowMaps`, `DrawPass::prepare_shadows`): abandoned frames whose values are reused,
//! bits past `maxStorageBufferRange`, indices past `u32::MAX`, a cull pass of other meshes,
//! cascades never set, non-finite input, strides of several views.
//!
//! Each test states what the public docs promise.

mod common;

use std::time::Duration;

use ash::vk;
use glam::{Mat4, Vec3};
use understory::Error;
use understory::gpu::context::{Context, Frame};
use understory::gpu::cull::{
    COUNTERS, CascadeView, Compaction, CullDesc, CullPass, CullSource, CullView,
    DrawIndexedIndirect, InstanceBounds, WIDE_SOURCES_PER_DISPATCH, occluded_cpu,
};
use understory::gpu::draw::{CENSUS_FORMAT, DrawFrame, DrawOptions, DrawPass, tree_billboard};
use understory::gpu::frame::FrameRing;
use understory::gpu::memory::{
    Buffer, BufferDesc, Image, MemoryConfig, MemoryLocation, size_class,
};
use understory::gpu::pyramid::{DepthPyramid, pyramid_cpu};
use understory::gpu::shadow::{ShadowDesc, ShadowMaps};
use understory::policy::category::Category;
use understory::policy::lod::LodBands;
use understory::vegetation::{SpeciesDesc, Vegetation, VegetationConfig};
use understory::world::instance::Instance;

const W: u32 = 64;
const H: u32 = 48;

fn mesh(index_count: u32) -> DrawIndexedIndirect {
    DrawIndexedIndirect {
        index_count,
        ..Default::default()
    }
}

fn desc(views: u32, records: bool, capacity: u32) -> CullDesc {
    CullDesc {
        compaction: Compaction::Atomic,
        capacity,
        adaptive: false,
        meshes: [mesh(36), mesh(12), mesh(6)],
        records,
        max_sources_per_dispatch: WIDE_SOURCES_PER_DISPATCH,
        views,
    }
}

fn camera() -> (Mat4, Vec3) {
    let eye = Vec3::new(0.0, 2.0, 0.0);
    let proj = Mat4::perspective_rh(70f32.to_radians(), W as f32 / H as f32, 0.5, 2000.0);
    (
        proj * Mat4::look_at_rh(eye, eye + Vec3::new(0.0, 0.0, -1.0), Vec3::Y),
        eye,
    )
}

fn cull_view() -> CullView {
    let (vp, eye) = camera();
    CullView::new(vp, eye, 1.5, &LodBands::default(), 1.0).unwrap()
}

/// `n` trees in front of the camera, 5 to 45 m away.
fn trees(n: usize) -> Vec<Instance> {
    (0..n)
        .map(|i| Instance::at(Vec3::new((i % 7) as f32 - 3.0, 0.0, -5.0 - (i % 40) as f32)))
        .collect()
}

fn upload(ctx: &Context, instances: &[Instance]) -> Buffer {
    let bytes: &[u8] = bytemuck::cast_slice(instances);
    let mut b = ctx
        .create_buffer(&BufferDesc {
            name: "review instances",
            size: bytes.len().max(32) as u64,
            usage: vk::BufferUsageFlags::STORAGE_BUFFER,
            location: MemoryLocation::CpuToGpu,
            category: Category::Instances,
        })
        .unwrap();
    b.mapped_mut().unwrap()[..bytes.len()].copy_from_slice(bytes);
    b
}

fn depth_range() -> vk::ImageSubresourceRange {
    common::DEPTH_ONLY
}

fn color_range() -> vk::ImageSubresourceRange {
    common::single_range(vk::ImageAspectFlags::COLOR)
}

/// The host's depth image (sampled by the pyramid, cleared by transfer, a depth attachment)
/// and a colour target, with their views.
struct Target {
    depth: Image,
    depth_view: vk::ImageView,
    color: Image,
    color_view: vk::ImageView,
}

impl Target {
    fn new(ctx: &Context) -> Self {
        let extent = vk::Extent2D {
            width: W,
            height: H,
        };
        let (depth, depth_view) = common::image_with_view(
            ctx,
            "review depth",
            extent,
            vk::Format::D32_SFLOAT,
            vk::ImageUsageFlags::TRANSFER_DST
                | vk::ImageUsageFlags::SAMPLED
                | vk::ImageUsageFlags::DEPTH_STENCIL_ATTACHMENT,
            vk::ImageAspectFlags::DEPTH,
        );
        let (color, color_view) = common::image_with_view(
            ctx,
            "review color",
            extent,
            vk::Format::R8G8B8A8_UNORM,
            vk::ImageUsageFlags::COLOR_ATTACHMENT,
            vk::ImageAspectFlags::COLOR,
        );
        Self {
            depth,
            depth_view,
            color,
            color_view,
        }
    }

    /// Depth cleared to `value` and left in DEPTH_STENCIL_READ_ONLY_OPTIMAL for the pyramid.
    ///
    /// # Safety
    /// `cmd` recording for `frame` outside rendering.
    unsafe fn clear_depth_for_pyramid(&self, ctx: &Context, frame: &Frame, cmd: vk::CommandBuffer) {
        let d = ctx.device();
        self.depth.used_in(frame).unwrap();
        let barrier = |old, new, src, dst| {
            understory::gpu::compute::image_barrier(
                self.depth.raw(),
                depth_range(),
                (old, src),
                (new, dst),
            )
        };
        // SAFETY: the caller's promises; the image is live and marked used.
        unsafe {
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::COMPUTE_SHADER
                    | vk::PipelineStageFlags::EARLY_FRAGMENT_TESTS
                    | vk::PipelineStageFlags::LATE_FRAGMENT_TESTS,
                vk::PipelineStageFlags::TRANSFER,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &[barrier(
                    vk::ImageLayout::UNDEFINED,
                    vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                    vk::AccessFlags::empty(),
                    vk::AccessFlags::TRANSFER_WRITE,
                )],
            );
            d.cmd_clear_depth_stencil_image(
                cmd,
                self.depth.raw(),
                vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                &vk::ClearDepthStencilValue {
                    depth: 0.5,
                    stencil: 0,
                },
                &[depth_range()],
            );
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::TRANSFER,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &[barrier(
                    vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                    vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL,
                    vk::AccessFlags::TRANSFER_WRITE,
                    vk::AccessFlags::SHADER_READ,
                )],
            );
        }
    }

    /// Begins rendering into both attachments (cleared; depth to 1, far).
    ///
    /// # Safety
    /// `cmd` recording for `frame` outside rendering, on a graphics queue.
    unsafe fn begin_rendering(&self, ctx: &Context, frame: &Frame, cmd: vk::CommandBuffer) {
        // SAFETY: the caller's promises.
        unsafe { self.begin_rendering_cleared(ctx, frame, cmd, 1.0) }
    }

    /// As `begin_rendering`, depth cleared to `depth` (0 for reversed depth).
    ///
    /// # Safety
    /// As `begin_rendering`.
    unsafe fn begin_rendering_cleared(
        &self,
        ctx: &Context,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        depth: f32,
    ) {
        let clear_depth = depth;
        let d = ctx.device();
        self.depth.used_in(frame).unwrap();
        self.color.used_in(frame).unwrap();
        // SAFETY: the caller's promises; the images are live and marked used.
        unsafe {
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::ALL_COMMANDS,
                vk::PipelineStageFlags::EARLY_FRAGMENT_TESTS
                    | vk::PipelineStageFlags::LATE_FRAGMENT_TESTS
                    | vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &[
                    understory::gpu::compute::image_barrier(
                        self.depth.raw(),
                        depth_range(),
                        (vk::ImageLayout::UNDEFINED, vk::AccessFlags::empty()),
                        (
                            vk::ImageLayout::DEPTH_ATTACHMENT_OPTIMAL,
                            vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_READ
                                | vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_WRITE,
                        ),
                    ),
                    understory::gpu::compute::image_barrier(
                        self.color.raw(),
                        color_range(),
                        (vk::ImageLayout::UNDEFINED, vk::AccessFlags::empty()),
                        (
                            vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL,
                            vk::AccessFlags::COLOR_ATTACHMENT_WRITE,
                        ),
                    ),
                ],
            );
            let color = [vk::RenderingAttachmentInfo::default()
                .image_view(self.color_view)
                .image_layout(vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL)
                .load_op(vk::AttachmentLoadOp::CLEAR)
                .store_op(vk::AttachmentStoreOp::STORE)];
            let depth = vk::RenderingAttachmentInfo::default()
                .image_view(self.depth_view)
                .image_layout(vk::ImageLayout::DEPTH_ATTACHMENT_OPTIMAL)
                .load_op(vk::AttachmentLoadOp::CLEAR)
                .store_op(vk::AttachmentStoreOp::STORE)
                .clear_value(vk::ClearValue {
                    depth_stencil: vk::ClearDepthStencilValue {
                        depth: clear_depth,
                        stencil: 0,
                    },
                });
            let info = vk::RenderingInfo::default()
                .render_area(vk::Rect2D {
                    offset: vk::Offset2D::default(),
                    extent: vk::Extent2D {
                        width: W,
                        height: H,
                    },
                })
                .layer_count(1)
                .color_attachments(&color)
                .depth_attachment(&depth);
            d.cmd_begin_rendering(cmd, &info);
        }
    }

    fn destroy(self, ctx: &Context) {
        // SAFETY: every submission that used the views was waited for.
        unsafe {
            ctx.device().destroy_image_view(self.depth_view, None);
            ctx.device().destroy_image_view(self.color_view, None);
        }
    }
}

/// Reads `size` bytes of `src` (from 0) back after `record` recorded into a frame.
fn read_back(
    ctx: &Context,
    size: u64,
    record: impl FnOnce(&Frame, vk::CommandBuffer) -> understory::Result<vk::Buffer>,
) -> Vec<u8> {
    let read = ctx
        .create_buffer(&BufferDesc {
            name: "review readback",
            size,
            usage: vk::BufferUsageFlags::TRANSFER_DST,
            location: MemoryLocation::GpuToCpu,
            category: Category::Other,
        })
        .unwrap();
    ctx.submit_and_wait(|frame, cmd| {
        let src = record(frame, cmd)?;
        read.used_in(frame)?;
        let d = ctx.device();
        // SAFETY: recording for `frame`; the source was marked used by the recorder.
        unsafe {
            understory::gpu::compute::memory_barrier(
                d,
                cmd,
                (
                    vk::PipelineStageFlags::ALL_COMMANDS,
                    vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::TRANSFER_WRITE,
                ),
                (
                    vk::PipelineStageFlags::TRANSFER,
                    vk::AccessFlags::TRANSFER_READ,
                ),
            );
            d.cmd_copy_buffer(
                cmd,
                src,
                read.raw(),
                &[vk::BufferCopy {
                    src_offset: 0,
                    dst_offset: 0,
                    size,
                }],
            );
            understory::gpu::compute::memory_barrier(
                d,
                cmd,
                (
                    vk::PipelineStageFlags::TRANSFER,
                    vk::AccessFlags::TRANSFER_WRITE,
                ),
                (vk::PipelineStageFlags::HOST, vk::AccessFlags::HOST_READ),
            );
        }
        Ok(())
    })
    .unwrap();
    read.mapped().unwrap().to_vec()
}

// ---------------------------------------------------------------------------------------------
// 1. Frame identity: a dropped (never submitted) frame gives its value to the next frame, so
//    state keyed by `frame.value()` leaks from the abandoned frame into the next one.
// ---------------------------------------------------------------------------------------------

/// Doc of `record_second`: "[`Error::Lifecycle`] if this frame recorded no first phase".
/// Frame A records the first phase and is dropped unsubmitted (an engine's error path); frame B
/// (which gets A's value) records no first phase, so `record_second` must refuse.
#[test]
fn record_second_in_a_frame_that_reuses_an_abandoned_frames_value() {
    let test = "record_second_after_abandoned_frame";
    let Some(ctx) = common::context(test) else {
        return;
    };
    let instances = upload(&ctx, &trees(200));
    let mut pass = CullPass::from_desc(&ctx, &desc(1, true, 512)).unwrap();
    let pyramid = DepthPyramid::new(
        &ctx,
        vk::Extent2D {
            width: W,
            height: H,
        },
    )
    .unwrap();
    let target = Target::new(&ctx);
    let ring = FrameRing::new(&ctx).unwrap();
    let view = cull_view();
    let source = CullSource {
        buffer: &instances,
        count: 200,
        base: 0,
    };
    let a_value;
    {
        let a = ctx.begin_frame().unwrap();
        a_value = a.value();
        let cmd = ring.begin(&a).unwrap();
        // SAFETY: recording for `a` outside rendering on the context's queue. The frame is then
        // dropped with its command buffer unsubmitted (an error later in the host's frame).
        unsafe { pass.record_first(&a, cmd.raw(), &[source], &view) }.unwrap();
        drop(cmd);
        drop(a);
    }
    let (vp, _) = camera();
    let mut result = None;
    ctx.submit_and_wait(|b, cmd| {
        assert_eq!(b.value(), a_value, "the dropped frame's value is reused");
        // SAFETY: recording for `b` outside rendering; the pyramid is recorded from a depth
        // image in a read layout before the (expected to be refused) second phase.
        unsafe {
            target.clear_depth_for_pyramid(&ctx, b, cmd);
            pyramid.record(
                b,
                cmd,
                target.depth_view,
                vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL,
            )?;
            result = Some(pass.record_second(b, cmd, &pyramid, vp, &InstanceBounds::sphere(1.5)));
        }
        Ok(())
    })
    .unwrap();
    let r = result.unwrap();
    drop((pass, pyramid, ring, instances));
    target.destroy(&ctx);
    common::finish(ctx, test);
    assert!(
        matches!(r, Err(Error::Lifecycle(_))),
        "frame {a_value} (second use) recorded no first phase, yet record_second returned {r:?}: \
         it replays the abandoned frame's batches over counters and visibility bits the GPU \
         never reset"
    );
}

struct ShadowScene {
    veg: Vegetation,
    draw: DrawPass,
    maps: ShadowMaps,
    cull: CullPass,
    instances: Buffer,
}

fn shadow_scene(ctx: &Context) -> ShadowScene {
    let mut veg = Vegetation::new(
        ctx,
        VegetationConfig {
            atlas_page_px: 256,
            ..Default::default()
        },
    )
    .unwrap();
    veg.register_species(&SpeciesDesc {
        name: "spruce",
        width: 64,
        height: 128,
        rgba8: &tree_billboard(64, 128, 1),
    })
    .unwrap();
    let page = veg.atlas_page(0).unwrap();
    let draw = DrawPass::new(
        ctx,
        vk::Format::R8G8B8A8_UNORM,
        vk::Format::D32_SFLOAT,
        page,
        0,
    )
    .unwrap();
    let maps = ShadowMaps::new(
        ctx,
        &ShadowDesc {
            cascades: 1,
            tile_px: 64,
            ..Default::default()
        },
        page,
        0,
    )
    .unwrap();
    let cull = CullPass::from_desc(
        ctx,
        &CullDesc {
            meshes: draw.lod_meshes(),
            ..desc(2, true, 256)
        },
    )
    .unwrap();
    let instances = upload(ctx, &trees(50));
    ShadowScene {
        veg,
        draw,
        maps,
        cull,
        instances,
    }
}

fn sun_cascade() -> Mat4 {
    let sun = Vec3::new(-0.4, 0.8, 0.35).normalize();
    Mat4::orthographic_rh(-64.0, 64.0, -64.0, 64.0, 0.0, 400.0)
        * Mat4::look_at_rh(sun * 200.0, Vec3::new(0.0, 0.0, -20.0), Vec3::Y)
}

/// Uploads the atlas (left SHADER_READ_ONLY_OPTIMAL by `Vegetation::record`).
fn upload_atlas(ctx: &Context, veg: &mut Vegetation) {
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: recording for `frame` outside rendering.
        unsafe { veg.record(frame, cmd) }
    })
    .unwrap();
}

/// Frame A: the cull, the shadow maps and `prepare_shadows`, then A is dropped unsubmitted.
fn abandoned_shadow_frame(ctx: &Context, s: &mut ShadowScene, ring: &FrameRing) -> u64 {
    let a = ctx.begin_frame().unwrap();
    let value = a.value();
    let cmd = ring.begin(&a).unwrap();
    let species = s.veg.species_regions();
    let vp = sun_cascade();
    s.cull
        .set_cascades(&[CascadeView::new(vp).unwrap()])
        .unwrap();
    let page = s.veg.atlas_page(0).unwrap();
    let source = CullSource {
        buffer: &s.instances,
        count: 50,
        base: 0,
    };
    // SAFETY: recording for `a` outside rendering on the graphics queue; the atlas page was
    // uploaded (SHADER_READ_ONLY_OPTIMAL) by an earlier, completed frame.
    unsafe {
        s.cull
            .record(&a, cmd.raw(), &[source], &cull_view())
            .unwrap();
        s.maps
            .record(&a, cmd.raw(), &s.cull, &[vp], &species, page)
            .unwrap();
        s.draw
            .prepare_shadows(&a, cmd.raw(), &s.maps, 100.0)
            .unwrap();
    }
    drop(cmd);
    drop(a);
    value
}

/// Doc of `ShadowMaps::constants` / `DrawPass::prepare_shadows`: "[`Error::Lifecycle`] if this
/// frame recorded no shadow maps". Frame B reuses abandoned frame A's value and records none.
#[test]
fn shadow_constants_in_a_frame_that_reuses_an_abandoned_frames_value() {
    let test = "shadow_constants_after_abandoned_frame";
    let Some(ctx) = common::context(test) else {
        return;
    };
    if !ctx.features().dynamic_rendering {
        common::skip(test, "no dynamic rendering");
        common::finish(ctx, test);
        return;
    }
    let mut s = shadow_scene(&ctx);
    upload_atlas(&ctx, &mut s.veg);
    let ring = FrameRing::new(&ctx).unwrap();
    let a_value = abandoned_shadow_frame(&ctx, &mut s, &ring);
    let b = ctx.begin_frame().unwrap();
    assert_eq!(b.value(), a_value);
    let r = s.maps.constants(&b, 100.0);
    drop(b);
    assert!(
        matches!(r, Err(Error::Lifecycle(_))),
        "frame {a_value} (second use) recorded no shadow maps, yet constants returned {r:?}"
    );
    drop((s, ring));
    common::finish(ctx, test);
}

/// Doc of `prepare_shadows`: "A frame that does not call it draws without shadows." Frame B
/// (which reuses abandoned frame A's value) calls neither `ShadowMaps::record` nor
/// `prepare_shadows`, and fulfils `DrawPass::record`'s contract for a frame without shadows:
/// the draw must not sample the never-rendered shadow image (still UNDEFINED).
#[test]
fn draw_without_shadows_after_an_abandoned_frame_is_clean() {
    let test = "draw_without_shadows_after_abandoned_frame";
    let Some(ctx) = common::context(test) else {
        return;
    };
    if !ctx.features().dynamic_rendering {
        common::skip(test, "no dynamic rendering");
        common::finish(ctx, test);
        return;
    }
    let mut s = shadow_scene(&ctx);
    upload_atlas(&ctx, &mut s.veg);
    let ring = FrameRing::new(&ctx).unwrap();
    let target = Target::new(&ctx);
    let a_value = abandoned_shadow_frame(&ctx, &mut s, &ring);
    let (vp, eye) = camera();
    let constants = DrawFrame::new(vp, eye, 500.0, [-100.0, -100.0, 200.0], false);
    let species = s.veg.species_regions();
    let ShadowScene {
        veg,
        draw,
        cull,
        instances,
        ..
    } = &mut s;
    let page = veg.atlas_page(0).unwrap();
    ctx.submit_and_wait(|b, cmd| {
        assert_eq!(b.value(), a_value);
        let source = CullSource {
            buffer: instances,
            count: 50,
            base: 0,
        };
        // SAFETY: recording for `b` on the graphics queue: the cull and `prepare` outside
        // rendering, then the draw inside a scope of the pass's formats; the atlas page is in
        // SHADER_READ_ONLY_OPTIMAL (uploaded earlier). No shadows in this frame.
        unsafe {
            cull.record(b, cmd, &[source], &cull_view())?;
            draw.prepare(b, cmd, cull, &constants, &species)?;
            target.begin_rendering(&ctx, b, cmd);
            draw.record(
                b,
                cmd,
                cull,
                page,
                vk::Extent2D {
                    width: W,
                    height: H,
                },
            )?;
            ctx.device().cmd_end_rendering(cmd);
        }
        Ok(())
    })
    .unwrap();
    drop((s, ring));
    target.destroy(&ctx);
    common::finish(ctx, test);
}

/// Doc of `DrawPass::record_census`: each pixel gets the list slot + 1 of the instance it
/// shows, 0 where none; the distinct values are the instances that reach the image. Four trees
/// of 6 m: two stand in view, one is buried under the ground quad (in the frustum, so drawn,
/// but the ground hides it), one is behind the camera (culled). The census holds the two
/// trees in view, with ordinary and with reversed depth (`DrawOptions::reversed_depth`).
#[test]
fn the_census_counts_the_trees_that_reach_the_image() {
    let test = "census";
    let Some(ctx) = common::context(test) else {
        return;
    };
    if !ctx.features().dynamic_rendering {
        common::skip(test, "no dynamic rendering");
        common::finish(ctx, test);
        return;
    }
    for reversed in [false, true] {
        census_case(&ctx, reversed);
    }
    common::finish(ctx, test);
}

fn census_case(ctx: &Context, reversed: bool) {
    let mut s = shadow_scene(ctx);
    if reversed {
        let page = s.veg.atlas_page(0).unwrap();
        s.draw = DrawPass::with_options(
            ctx,
            vk::Format::R8G8B8A8_UNORM,
            vk::Format::D32_SFLOAT,
            page,
            0,
            DrawOptions {
                reversed_depth: true,
                ..Default::default()
            },
        )
        .unwrap();
    }
    upload_atlas(ctx, &mut s.veg);
    let target = Target::new(ctx);
    let extent = vk::Extent2D {
        width: W,
        height: H,
    };
    let (census, census_view) = common::image_with_view(
        ctx,
        "review census",
        extent,
        CENSUS_FORMAT,
        vk::ImageUsageFlags::COLOR_ATTACHMENT | vk::ImageUsageFlags::TRANSFER_SRC,
        vk::ImageAspectFlags::COLOR,
    );
    let tree = |p: Vec3| Instance {
        scale: 6.0,
        ..Instance::at(p)
    };
    let scene = [
        tree(Vec3::new(1.5, 0.0, -12.0)),
        tree(Vec3::new(2.0, -14.0, -30.0)),
        tree(Vec3::new(-5.0, 0.0, -20.0)),
        tree(Vec3::new(0.0, 0.0, 12.0)),
    ];
    let view = cull_view();
    let want = understory::gpu::cull::cull_cpu(&[(&scene, 0)], &view);
    let drawn: Vec<u32> = want.lists.iter().flatten().copied().collect();
    assert_eq!(
        drawn.len(),
        3,
        "the buried tree is in the frustum: {drawn:?}"
    );
    assert!(!drawn.contains(&3), "the tree behind the camera is culled");
    let instances = upload(ctx, &scene);
    let (vp, eye) = camera();
    // Reversed: clip z' = w - z (near 1, far 0).
    let flip = Mat4::from_cols(
        glam::Vec4::X,
        glam::Vec4::Y,
        glam::Vec4::new(0.0, 0.0, -1.0, 0.0),
        glam::Vec4::new(0.0, 0.0, 1.0, 1.0),
    );
    let vp = if reversed { flip * vp } else { vp };
    let constants = DrawFrame::new(vp, eye, 500.0, [-100.0, -100.0, 200.0], false);
    let species = s.veg.species_regions();
    let read = ctx
        .create_buffer(&BufferDesc {
            name: "review census readback",
            size: u64::from(W * H) * 4,
            usage: vk::BufferUsageFlags::TRANSFER_DST,
            location: MemoryLocation::GpuToCpu,
            category: Category::Other,
        })
        .unwrap();
    let ShadowScene {
        veg, draw, cull, ..
    } = &mut s;
    let page = veg.atlas_page(0).unwrap();
    let mut records = Vec::new();
    ctx.submit_and_wait(|f, cmd| {
        let source = CullSource {
            buffer: &instances,
            count: scene.len() as u32,
            base: 0,
        };
        census.used_in(f)?;
        read.used_in(f)?;
        let d = ctx.device();
        let color = [vk::RenderingAttachmentInfo::default()
            .image_view(census_view)
            .image_layout(vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL)
            .load_op(vk::AttachmentLoadOp::CLEAR)
            .store_op(vk::AttachmentStoreOp::STORE)
            .clear_value(vk::ClearValue {
                color: vk::ClearColorValue { uint32: [0; 4] },
            })];
        let depth = vk::RenderingAttachmentInfo::default()
            .image_view(target.depth_view)
            .image_layout(vk::ImageLayout::DEPTH_ATTACHMENT_OPTIMAL)
            .load_op(vk::AttachmentLoadOp::LOAD)
            .store_op(vk::AttachmentStoreOp::NONE);
        let info = vk::RenderingInfo::default()
            .render_area(vk::Rect2D {
                offset: vk::Offset2D::default(),
                extent,
            })
            .layer_count(1)
            .color_attachments(&color)
            .depth_attachment(&depth);
        // SAFETY: recording for `f` on the graphics queue: the cull and `prepare` outside
        // rendering, the draw inside a scope of the pass's formats (its depth stored), then,
        // after the depth writes are ordered before the census's tests, the census inside a
        // scope of CENSUS_FORMAT and that depth; the atlas page is in SHADER_READ_ONLY_OPTIMAL
        // (uploaded earlier); the census image and the readback are marked used by `f`.
        unsafe {
            cull.record(f, cmd, &[source], &view)?;
            draw.prepare(f, cmd, cull, &constants, &species)?;
            target.begin_rendering_cleared(ctx, f, cmd, if reversed { 0.0 } else { 1.0 });
            draw.record(f, cmd, cull, page, extent)?;
            d.cmd_end_rendering(cmd);
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::EARLY_FRAGMENT_TESTS
                    | vk::PipelineStageFlags::LATE_FRAGMENT_TESTS,
                vk::PipelineStageFlags::EARLY_FRAGMENT_TESTS
                    | vk::PipelineStageFlags::LATE_FRAGMENT_TESTS
                    | vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &[
                    understory::gpu::compute::image_barrier(
                        target.depth.raw(),
                        depth_range(),
                        (
                            vk::ImageLayout::DEPTH_ATTACHMENT_OPTIMAL,
                            vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_WRITE,
                        ),
                        (
                            vk::ImageLayout::DEPTH_ATTACHMENT_OPTIMAL,
                            vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_READ,
                        ),
                    ),
                    understory::gpu::compute::image_barrier(
                        census.raw(),
                        color_range(),
                        (vk::ImageLayout::UNDEFINED, vk::AccessFlags::empty()),
                        (
                            vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL,
                            vk::AccessFlags::COLOR_ATTACHMENT_WRITE,
                        ),
                    ),
                ],
            );
            d.cmd_begin_rendering(cmd, &info);
            draw.record_census(f, cmd, cull, page, extent)?;
            d.cmd_end_rendering(cmd);
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT,
                vk::PipelineStageFlags::TRANSFER,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &[understory::gpu::compute::image_barrier(
                    census.raw(),
                    color_range(),
                    (
                        vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL,
                        vk::AccessFlags::COLOR_ATTACHMENT_WRITE,
                    ),
                    (
                        vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                        vk::AccessFlags::TRANSFER_READ,
                    ),
                )],
            );
            d.cmd_copy_image_to_buffer(
                cmd,
                census.raw(),
                vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                read.raw(),
                &[vk::BufferImageCopy {
                    image_subresource: vk::ImageSubresourceLayers {
                        aspect_mask: vk::ImageAspectFlags::COLOR,
                        mip_level: 0,
                        base_array_layer: 0,
                        layer_count: 1,
                    },
                    image_extent: vk::Extent3D {
                        width: W,
                        height: H,
                        depth: 1,
                    },
                    ..Default::default()
                }],
            );
            understory::gpu::compute::memory_barrier(
                d,
                cmd,
                (
                    vk::PipelineStageFlags::TRANSFER,
                    vk::AccessFlags::TRANSFER_WRITE,
                ),
                (vk::PipelineStageFlags::HOST, vk::AccessFlags::HOST_READ),
            );
        }
        Ok(())
    })
    .unwrap();
    let texels: Vec<u32> = read
        .mapped()
        .unwrap()
        .chunks_exact(4)
        .map(bytemuck::pod_read_unaligned)
        .collect();
    let mut shown: Vec<u32> = texels.iter().copied().filter(|v| *v != 0).collect();
    let covered = shown.len();
    shown.sort_unstable();
    shown.dedup();
    // Which instance each slot holds: the cull's records.
    let rec_bytes = read_back(ctx, cull.records().unwrap().size(), |f, _| {
        let r = cull.records()?;
        r.used_in(f)?;
        Ok(r.raw())
    });
    records.extend(
        rec_bytes
            .chunks_exact(size_of::<Instance>())
            .map(bytemuck::pod_read_unaligned::<Instance>),
    );
    let held: Vec<[f32; 3]> = shown
        .iter()
        .map(|v| records[(*v - 1) as usize].position)
        .collect();
    eprintln!(
        "census (reversed {reversed}): {covered} of {} pixels show trees {held:?}",
        W * H
    );
    assert_eq!(
        shown.len(),
        2,
        "reversed {reversed}: two trees reach the image: {held:?}"
    );
    for p in [scene[0].position, scene[2].position] {
        assert!(
            held.contains(&p),
            "reversed {reversed}: {p:?} reaches the image: {held:?}"
        );
    }
    drop((s, read, instances, census));
    target.destroy(ctx);
    // SAFETY: the submission that used the view was waited for.
    unsafe { ctx.device().destroy_image_view(census_view, None) };
}

// ---------------------------------------------------------------------------------------------
// 2. Views and cascades.
// ---------------------------------------------------------------------------------------------

/// Reads the six commands of every view.
fn args_after_record(
    ctx: &Context,
    pass: &mut CullPass,
    src: &Buffer,
    n: u32,
) -> Vec<DrawIndexedIndirect> {
    let views = pass.views();
    let size = size_of::<[DrawIndexedIndirect; 6]>() as u64 * u64::from(views);
    let bytes = read_back(ctx, size, |frame, cmd| {
        let source = CullSource {
            buffer: src,
            count: n,
            base: 0,
        };
        // SAFETY: recording for `frame` outside rendering.
        unsafe { pass.record(frame, cmd, &[source], &cull_view())? };
        let args = pass.args()?;
        args.used_in(frame)?;
        Ok(args.raw())
    });
    bytes
        .chunks_exact(size_of::<DrawIndexedIndirect>())
        .map(bytemuck::pod_read_unaligned)
        .collect()
}

/// `set_cascades`: "fewer leave the remaining views' lists empty". A pass of 2 views whose
/// cascades were never set should have empty cascade lists (as after `set_cascades(&[])`), not
/// every instance (the initial planes are all zero: `0 >= -r` is inside).
#[test]
fn cascade_lists_are_empty_before_set_cascades() {
    let test = "cascade_lists_before_set_cascades";
    let Some(ctx) = common::context(test) else {
        return;
    };
    let src = upload(&ctx, &trees(100));
    let mut pass = CullPass::from_desc(&ctx, &desc(2, false, 256)).unwrap();
    let never_set = args_after_record(&ctx, &mut pass, &src, 100);
    pass.set_cascades(&[]).unwrap();
    let set_empty = args_after_record(&ctx, &mut pass, &src, 100);
    let count =
        |a: &[DrawIndexedIndirect]| -> u32 { a[6..9].iter().map(|c| c.instance_count).sum() };
    eprintln!(
        "cascade 0: {} instances before set_cascades, {} after set_cascades(&[])",
        count(&never_set),
        count(&set_empty)
    );
    assert_eq!(count(&set_empty), 0);
    let r = count(&never_set);
    drop((pass, src));
    common::finish(ctx, test);
    assert_eq!(
        r, 0,
        "cascade 1's lists before any set_cascades hold {r} instances (every one in the bands)"
    );
}

/// `CascadeView::new` refuses non-finite planes, but `CascadeView::planes` is public and
/// `set_cascades` takes anything (`CullView::from_planes` refuses NaN planes for the camera).
#[test]
fn set_cascades_refuses_non_finite_planes() {
    let test = "set_cascades_nan";
    let Some(ctx) = common::context(test) else {
        return;
    };
    let mut pass = CullPass::from_desc(&ctx, &desc(3, false, 256)).unwrap();
    assert!(CascadeView::new(Mat4::from_cols_array(&[f32::NAN; 16])).is_err());
    let nan = CascadeView {
        planes: [[f32::NAN; 4]; 6],
        max_lod: understory::policy::lod::Lod::Billboard,
    };
    let r = pass.set_cascades(&[nan]);
    drop(pass);
    common::finish(ctx, test);
    assert!(
        matches!(r, Err(Error::InvalidInput(_))),
        "NaN cascade planes accepted: {r:?}"
    );
}

/// `view_list_bases`: "views past `views()` start past the lists". With 3 × 1024 entries per
/// view, view 2^22 is 3 · 2^32 entries in: a u32 product that wraps to view 0's lists (or
/// panics with overflow checks).
#[test]
fn view_list_bases_past_the_views_stay_past_the_lists() {
    let test = "view_list_bases_overflow";
    let Some(ctx) = common::context(test) else {
        return;
    };
    let pass = CullPass::from_desc(&ctx, &desc(1, false, 1024)).unwrap();
    assert_eq!(pass.capacities(), [1024; 3]);
    let end = 3 * 1024;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pass.view_list_bases(1 << 22)
    }));
    drop(pass);
    common::finish(ctx, test);
    match r {
        Ok(bases) => assert!(
            bases.iter().all(|b| *b >= end),
            "view 2^22 starts at {bases:?}, inside view 0's lists (end {end})"
        ),
        Err(_) => panic!("view_list_bases panicked on a large view"),
    }
}

/// Counters of a pass of several views: COUNTERS words per view, the camera's invalid count in
/// view 0 only, every cascade's first-kept equal to its appended, second-phase commands zero.
#[test]
fn counters_and_args_strides_for_several_views() {
    let test = "counter_strides";
    let Some(ctx) = common::context(test) else {
        return;
    };
    let mut inst = trees(120);
    inst[5].position[1] = f32::NAN;
    let src = upload(&ctx, &inst);
    let mut pass = CullPass::from_desc(&ctx, &desc(3, false, 256)).unwrap();
    let vp = sun_cascade();
    pass.set_cascades(&[CascadeView::new(vp).unwrap()]).unwrap();
    let views = pass.views() as usize;
    let args_bytes = size_of::<[DrawIndexedIndirect; 6]>() * views;
    let counter_bytes = COUNTERS * 4 * views;
    assert_eq!(pass.counters().unwrap().size(), counter_bytes as u64);
    assert_eq!(pass.args().unwrap().size(), args_bytes as u64);
    let bytes = read_back(&ctx, counter_bytes as u64, |frame, cmd| {
        let source = CullSource {
            buffer: &src,
            count: 120,
            base: 0,
        };
        // SAFETY: recording for `frame` outside rendering.
        unsafe { pass.record(frame, cmd, &[source], &cull_view())? };
        let c = pass.counters()?;
        c.used_in(frame)?;
        Ok(c.raw())
    });
    let c: Vec<u32> = bytemuck::cast_slice(&bytes).to_vec();
    eprintln!("counters: {c:?}");
    assert_eq!(c[3], 1, "camera's invalid");
    for v in 1..views {
        let w = &c[COUNTERS * v..COUNTERS * (v + 1)];
        assert_eq!(w[3], 0, "view {v} counts no invalid");
        assert_eq!(&w[0..3], &w[8..11], "view {v}: first kept = appended");
    }
    let w2 = &c[COUNTERS * 2..COUNTERS * 3];
    assert_eq!(&w2[0..3], &[0, 0, 0], "unset cascade 2 is empty");
    drop((pass, src));
    common::finish(ctx, test);
}

// ---------------------------------------------------------------------------------------------
// 3. Input validation and sizes.
// ---------------------------------------------------------------------------------------------

/// `CullSource::base`: "Index of its first instance in the lists". A base + count past
/// u32::MAX wraps the indices the lists (and the visibility bits) hold.
#[test]
fn a_source_whose_indices_overflow_u32_is_refused() {
    let test = "source_base_overflow";
    let Some(ctx) = common::context(test) else {
        return;
    };
    let src = upload(&ctx, &trees(100));
    let mut pass = CullPass::from_desc(&ctx, &desc(1, false, 256)).unwrap();
    let mut r = None;
    ctx.submit_and_wait(|frame, cmd| {
        let source = CullSource {
            buffer: &src,
            count: 100,
            base: u32::MAX - 10,
        };
        // SAFETY: recording for `frame` outside rendering.
        r = Some(unsafe { pass.record(frame, cmd, &[source], &cull_view()) });
        Ok(())
    })
    .unwrap();
    let r = r.unwrap();
    drop((pass, src));
    common::finish(ctx, test);
    assert!(
        matches!(r, Err(Error::InvalidInput(_))),
        "base u32::MAX - 10 with 100 instances: {r:?}"
    );
}

/// The visibility bits are sized from the highest `base + count` (rounded up to a power of two)
/// and bound whole as a storage buffer: with a sparse base they may exceed
/// `maxStorageBufferRange` (VUID-VkWriteDescriptorSet-descriptorType-00333), which the lists,
/// records and sources are all checked against. Expected: a typed error or a clean frame.
#[test]
fn visibility_bits_fit_max_storage_buffer_range() {
    let test = "visibility_bits_range";
    let Some(ctx) = common::context(test) else {
        return;
    };
    let range = u64::from(ctx.adapter().limits.max_storage_buffer_range);
    eprintln!("maxStorageBufferRange {range}");
    // Bits past `range` bytes: base = range * 8 (as an index) when it fits in u32.
    let base = range * 8;
    if base + 100 > u64::from(u32::MAX) {
        eprintln!(
            "{test}: maxStorageBufferRange {range} cannot be exceeded by u32 indices on this \
             device (the spec minimum 2^27 can: base 2^30 gives 256 MiB of bits)"
        );
        common::finish(ctx, test);
        return;
    }
    let src = upload(&ctx, &trees(100));
    let mut pass = CullPass::from_desc(&ctx, &desc(1, false, 256)).unwrap();
    let mut r = None;
    let sub = ctx.submit_and_wait(|frame, cmd| {
        let source = CullSource {
            buffer: &src,
            count: 100,
            base: base as u32,
        };
        // SAFETY: recording for `frame` outside rendering.
        r = Some(unsafe { pass.record_first(frame, cmd, &[source], &cull_view()) });
        Ok(())
    });
    eprintln!(
        "record_first with base {base}: {:?}; submit {:?}",
        r,
        sub.is_ok()
    );
    drop((pass, src));
    common::finish(ctx, test);
}

/// A source of the largest size `maxStorageBufferRange` allows, whose size class does not fit
/// the range, gives a clean frame under validation (VUID-VkWriteDescriptorSet-descriptorType-00333),
/// by two means, each checked alone:
/// - made at its own size: too large for the `Instances` cache, so not rounded to its class
///   (`predicted_bytes` says so, and the frame is clean with the default memory options);
/// - bound by its size, not `VK_WHOLE_SIZE`: with an `Instances` cache of 8 GiB the buffer is
///   made at its 4 GiB class, and the frame is still clean. Bound whole, the layer reported
///   -00333 on the H200. That variant is left out under GPU-assisted validation, a layer
///   limitation: GPU-AV keeps each buffer descriptor's buffer size in a 32-bit word where 0
///   means "not written" (Vulkan-ValidationLayers, layers/gpu_validation/gpu_validation.cpp,
///   `GpuAssisted::SetBindingState`: `static_cast<uint32_t>(buffer_state->createInfo.size)`),
///   so layer 1.3.239 reports a 4 GiB buffer's descriptor "uninitialized"; 4 GiB - 256 B is clean.
///
/// Runs only where the range is not a size class itself (NVIDIA: 2^32 - 1, a source of
/// 4 GiB - 256 B); elsewhere every class within the range fits it.
#[test]
fn a_source_is_bound_by_its_size_not_its_size_class() {
    let test = "source_size_class";
    let Some(ctx) = common::context(test) else {
        return;
    };
    let range = u64::from(ctx.adapter().limits.max_storage_buffer_range);
    // Whole instances, and whole 256-byte steps (what `predicted_bytes` counts in) within it.
    let size = range.saturating_sub(255) / 256 * 256;
    if size == 0 || size_class(size) <= range {
        eprintln!(
            "{test}: every size class up to maxStorageBufferRange {range} fits it on this device"
        );
        common::finish(ctx, test);
        return;
    }
    assert!(
        ctx.memory().predicted_bytes(Category::Instances, size) <= range,
        "made at its own size, not its class"
    );
    cull_one_source(&ctx, size);
    common::finish(ctx, test);
    let gpu_assisted =
        std::env::var("UNDERSTORY_VALIDATION").is_ok_and(|v| v.trim() == "gpu-assisted");
    if gpu_assisted {
        eprintln!(
            "{test}: the 4 GiB class left out under GPU-assisted validation (its 32-bit sizes)"
        );
        return;
    }
    let mut memory = MemoryConfig::default();
    memory.cache_bytes[Category::Instances] = 8 << 30;
    let test = "source_size_class (an 8 GiB cache)";
    let ctx = common::context_with_memory(test, memory).unwrap();
    assert!(
        ctx.memory().predicted_bytes(Category::Instances, size) > range,
        "made at its class"
    );
    cull_one_source(&ctx, size);
    common::finish(ctx, test);
}

/// Culls one source of `size` bytes (zeros: instances at the origin) in a frame of its own.
fn cull_one_source(ctx: &Context, size: u64) {
    let src = ctx
        .create_buffer(&BufferDesc {
            name: "source of the largest bindable size",
            size,
            usage: vk::BufferUsageFlags::STORAGE_BUFFER | vk::BufferUsageFlags::TRANSFER_DST,
            location: MemoryLocation::GpuOnly,
            category: Category::Instances,
        })
        .unwrap();
    let mut pass = CullPass::from_desc(ctx, &desc(1, false, 256)).unwrap();
    ctx.submit_and_wait(|frame, cmd| {
        src.used_in(frame)?;
        let source = CullSource {
            buffer: &src,
            count: (size / 32) as u32,
            base: 0,
        };
        // SAFETY: recording for `frame` outside rendering; the source is marked used by it and
        // written (zeros) before the cull reads it.
        unsafe {
            common::zero_for_compute(ctx, cmd, &src);
            pass.record(frame, cmd, &[source], &cull_view())
        }
    })
    .unwrap();
    drop((pass, src));
    ctx.memory().flush_cache();
}

/// Huge depth extents give typed errors, never a panic.
#[test]
fn huge_pyramids_are_typed_errors() {
    let test = "huge_pyramids";
    let Some(ctx) = common::context(test) else {
        return;
    };
    for (w, h) in [
        (u32::MAX, 1),
        (1, u32::MAX),
        (u32::MAX, u32::MAX),
        (1 << 31, 3),
        // Level 0 35,000 wide: a 65,536-texel image, past maxImageDimension2D on lavapipe and
        // on the H200 (32,768); 40,000 fit the H200.
        (70_000, 8),
        (1 << 20, 1 << 20),
    ] {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            DepthPyramid::new(
                &ctx,
                vk::Extent2D {
                    width: w,
                    height: h,
                },
            )
            .map(|_| ())
        }));
        match r {
            Ok(Err(Error::InvalidInput(_) | Error::Unsupported(_) | Error::OverBudget { .. })) => {}
            other => panic!("pyramid {w}x{h}: {other:?}"),
        }
    }
    common::finish(ctx, test);
}

/// `ShadowDesc::tile_px` this large overflows `cascades.min(2) * tile_px` in `image_extent`
/// before any check (a panic with overflow checks, a wrapped extent without).
#[test]
fn huge_shadow_tiles_are_typed_errors() {
    let test = "huge_shadow_tiles";
    let Some(ctx) = common::context(test) else {
        return;
    };
    if !ctx.features().dynamic_rendering {
        common::skip(test, "no dynamic rendering");
        common::finish(ctx, test);
        return;
    }
    let mut veg = Vegetation::new(
        &ctx,
        VegetationConfig {
            atlas_page_px: 256,
            ..Default::default()
        },
    )
    .unwrap();
    veg.register_species(&SpeciesDesc {
        name: "spruce",
        width: 64,
        height: 128,
        rgba8: &tree_billboard(64, 128, 1),
    })
    .unwrap();
    let page = veg.atlas_page(0).unwrap();
    for (cascades, tile_px) in [(4, u32::MAX), (2, 1 << 31), (3, (1 << 31) + 16)] {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            ShadowMaps::new(
                &ctx,
                &ShadowDesc {
                    cascades,
                    tile_px,
                    ..Default::default()
                },
                page,
                0,
            )
            .map(|_| ())
        }));
        assert!(
            matches!(r, Ok(Err(Error::InvalidInput(_)))),
            "{cascades} cascades of {tile_px}: {r:?}"
        );
    }
    drop(veg);
    common::finish(ctx, test);
}

/// The CPU reference of the occlusion test is a public function; a non-finite matrix must not
/// panic (the shader path rejects it, the reference underflows `b - a` with overflow checks).
#[test]
fn occluded_cpu_with_a_non_finite_matrix_does_not_panic() {
    let depth = vec![0.5f32; 16];
    let levels = pyramid_cpu(&depth, 4, 4);
    let mut m = Mat4::IDENTITY.to_cols_array();
    m[0] = f32::INFINITY;
    let vp = Mat4::from_cols_array(&m);
    let r = std::panic::catch_unwind(|| {
        occluded_cpu(
            Vec3::new(0.0, 0.0, 0.5),
            1.0,
            &InstanceBounds::sphere(0.1),
            &vp,
            [4, 4],
            &levels,
        )
    });
    assert!(r.is_ok(), "occluded_cpu panicked");
}

// ---------------------------------------------------------------------------------------------
// 4. Controls: what the API says it refuses, and dropping objects the GPU still reads.
// ---------------------------------------------------------------------------------------------

/// `record_second` refuses: no first phase, a first phase of another (submitted) frame, a
/// `record` after the first phase, a non-finite matrix, bad bounds; an error keeps the first
/// phase for a retry.
#[test]
fn record_second_refusals() {
    let test = "record_second_refusals";
    let Some(ctx) = common::context(test) else {
        return;
    };
    let src = upload(&ctx, &trees(100));
    let mut pass = CullPass::from_desc(&ctx, &desc(1, false, 256)).unwrap();
    let pyramid = DepthPyramid::new(
        &ctx,
        vk::Extent2D {
            width: W,
            height: H,
        },
    )
    .unwrap();
    let target = Target::new(&ctx);
    let (vp, _) = camera();
    let b = InstanceBounds::sphere(1.5);
    let source = CullSource {
        buffer: &src,
        count: 100,
        base: 0,
    };
    // No first phase at all.
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: refused before recording anything.
        let r = unsafe { pass.record_second(frame, cmd, &pyramid, vp, &b) };
        assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
        Ok(())
    })
    .unwrap();
    // First phase in one frame, second in the next.
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: recording for `frame` outside rendering.
        unsafe { pass.record_first(frame, cmd, &[source], &cull_view()) }
    })
    .unwrap();
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: refused before recording anything.
        let r = unsafe { pass.record_second(frame, cmd, &pyramid, vp, &b) };
        assert!(
            matches!(r, Err(Error::Lifecycle(_))),
            "another frame: {r:?}"
        );
        Ok(())
    })
    .unwrap();
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: recording for `frame` outside rendering; the pyramid is recorded before the
        // accepted second phase.
        unsafe {
            pass.record_first(frame, cmd, &[source], &cull_view())?;
            let bad = [
                (Mat4::from_cols_array(&[f32::NAN; 16]), b),
                (vp, InstanceBounds::sphere(-1.0)),
                (
                    vp,
                    InstanceBounds {
                        radius: 1.0,
                        y_min: 2.0,
                        y_max: 1.0,
                    },
                ),
                (
                    vp,
                    InstanceBounds {
                        radius: f32::INFINITY,
                        y_min: 0.0,
                        y_max: 1.0,
                    },
                ),
            ];
            for (m, bounds) in bad {
                let r = pass.record_second(frame, cmd, &pyramid, m, &bounds);
                assert!(
                    matches!(r, Err(Error::InvalidInput(_))),
                    "{m} {bounds:?}: {r:?}"
                );
            }
            target.clear_depth_for_pyramid(&ctx, frame, cmd);
            pyramid.record(
                frame,
                cmd,
                target.depth_view,
                vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL,
            )?;
            // The refusals kept the first phase.
            pass.record_second(frame, cmd, &pyramid, vp, &b)?;
            let r = pass.record_second(frame, cmd, &pyramid, vp, &b);
            assert!(matches!(r, Err(Error::Lifecycle(_))), "twice: {r:?}");
            pass.record_first(frame, cmd, &[source], &cull_view())?;
            pass.record(frame, cmd, &[source], &cull_view())?;
            let r = pass.record_second(frame, cmd, &pyramid, vp, &b);
            assert!(matches!(r, Err(Error::Lifecycle(_))), "after record: {r:?}");
        }
        Ok(())
    })
    .unwrap();
    // A pyramid of another context.
    if let Some(other) = common::context("record_second_refusals (other)") {
        let foreign = DepthPyramid::new(
            &other,
            vk::Extent2D {
                width: W,
                height: H,
            },
        )
        .unwrap();
        ctx.submit_and_wait(|frame, cmd| {
            // SAFETY: recording for `frame` outside rendering; the second phase is refused.
            unsafe {
                pass.record_first(frame, cmd, &[source], &cull_view())?;
                let r = pass.record_second(frame, cmd, &foreign, vp, &b);
                assert!(matches!(r, Err(Error::Lifecycle(_))), "foreign: {r:?}");
            }
            Ok(())
        })
        .unwrap();
        drop(foreign);
        common::finish(other, "record_second_refusals (other)");
    }
    drop((pass, pyramid, src));
    target.destroy(&ctx);
    common::finish(ctx, test);
}

/// Dropping the cull pass, the pyramid, the shadow maps and the draw pass after recording and
/// before the submission: nothing may be destroyed while the GPU uses it (validation clean).
#[test]
fn dropping_everything_before_submission_is_clean() {
    let test = "drop_before_submit";
    let Some(ctx) = common::context(test) else {
        return;
    };
    if !ctx.features().dynamic_rendering {
        common::skip(test, "no dynamic rendering");
        common::finish(ctx, test);
        return;
    }
    let mut s = shadow_scene(&ctx);
    upload_atlas(&ctx, &mut s.veg);
    let ring = FrameRing::new(&ctx).unwrap();
    let target = Target::new(&ctx);
    let pyramid = DepthPyramid::new(
        &ctx,
        vk::Extent2D {
            width: W,
            height: H,
        },
    )
    .unwrap();
    let (vp, eye) = camera();
    let constants = DrawFrame::new(vp, eye, 500.0, [-100.0, -100.0, 200.0], false);
    let species = s.veg.species_regions();
    let sun = sun_cascade();
    s.cull
        .set_cascades(&[CascadeView::new(sun).unwrap()])
        .unwrap();
    let extent = vk::Extent2D {
        width: W,
        height: H,
    };
    let frame = ctx.begin_frame().unwrap();
    let cmd = ring.begin(&frame).unwrap();
    let c = cmd.raw();
    let ShadowScene {
        veg,
        draw,
        maps,
        mut cull,
        instances,
    } = s;
    {
        let page = veg.atlas_page(0).unwrap();
        let source = CullSource {
            buffer: &instances,
            count: 50,
            base: 0,
        };
        let d = ctx.device();
        // SAFETY: recording for `frame` on the graphics queue: each cull and compute step
        // outside rendering, the draws inside; the atlas is SHADER_READ_ONLY_OPTIMAL.
        unsafe {
            cull.record_first(&frame, c, &[source], &cull_view())
                .unwrap();
            maps.record(&frame, c, &cull, &[sun], &species, page)
                .unwrap();
            draw.prepare(&frame, c, &cull, &constants, &species)
                .unwrap();
            draw.prepare_shadows(&frame, c, &maps, 100.0).unwrap();
            target.begin_rendering(&ctx, &frame, c);
            draw.record_phase(
                &frame,
                c,
                &cull,
                page,
                extent,
                understory::gpu::draw::DrawPhase::First,
            )
            .unwrap();
            d.cmd_end_rendering(c);
            d.cmd_pipeline_barrier(
                c,
                vk::PipelineStageFlags::LATE_FRAGMENT_TESTS
                    | vk::PipelineStageFlags::EARLY_FRAGMENT_TESTS,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &[understory::gpu::compute::image_barrier(
                    target.depth.raw(),
                    depth_range(),
                    (
                        vk::ImageLayout::DEPTH_ATTACHMENT_OPTIMAL,
                        vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_WRITE,
                    ),
                    (
                        vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL,
                        vk::AccessFlags::SHADER_READ,
                    ),
                )],
            );
            pyramid
                .record(
                    &frame,
                    c,
                    target.depth_view,
                    vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL,
                )
                .unwrap();
            cull.record_second(&frame, c, &pyramid, vp, &draw.bounds())
                .unwrap();
            // The second phase's draws (the attachments cleared again: only the hazards on the
            // cull pass's buffers matter here).
            target.begin_rendering(&ctx, &frame, c);
            draw.record_phase(
                &frame,
                c,
                &cull,
                page,
                extent,
                understory::gpu::draw::DrawPhase::Second,
            )
            .unwrap();
            d.cmd_end_rendering(c);
        }
    }
    // Everything understory made goes away before the submission.
    drop(pyramid);
    drop(maps);
    drop(cull);
    drop(draw);
    drop(veg);
    drop(instances);
    let submitted = ring.submit(frame, cmd).unwrap();
    ctx.wait(submitted.value(), Duration::from_secs(60))
        .unwrap();
    ctx.collect().unwrap();
    drop(ring);
    target.destroy(&ctx);
    common::finish(ctx, test);
}

/// `CullDesc::meshes` / `CullPass::with_records(.., meshes)` are free input of safe
/// constructors, and become the `firstIndex`/`indexCount`/`vertexOffset` of the indirect
/// commands that `DrawPass::record` (and `ShadowMaps::record`) draw with *their own* index and
/// vertex buffers (`Meshes::trees()`). Neither `# Safety` list says the cull pass must have been
/// built with `DrawPass::lod_meshes()`, and nothing checks it: a mismatch makes the GPU fetch
/// indices past the bound index buffer (VUID-VkDrawIndexedIndirectCommand-robustBufferAccess2-08798).
/// Only GPU-assisted validation sees indirect contents, so this test turns it on.
#[test]
fn draw_pass_with_a_cull_pass_of_other_meshes() {
    let test = "draw_with_foreign_meshes";
    let mut options = common::options();
    options.instance.gpu_assisted = true;
    let Some(ctx) = common::context_with(test, &options) else {
        return;
    };
    if !ctx.features().dynamic_rendering {
        common::skip(test, "no dynamic rendering");
        common::finish(ctx, test);
        return;
    }
    let mut veg = Vegetation::new(
        &ctx,
        VegetationConfig {
            atlas_page_px: 256,
            ..Default::default()
        },
    )
    .unwrap();
    veg.register_species(&SpeciesDesc {
        name: "spruce",
        width: 64,
        height: 128,
        rgba8: &tree_billboard(64, 128, 1),
    })
    .unwrap();
    upload_atlas(&ctx, &mut veg);
    let page = veg.atlas_page(0).unwrap();
    let draw = DrawPass::new(
        &ctx,
        vk::Format::R8G8B8A8_UNORM,
        vk::Format::D32_SFLOAT,
        page,
        0,
    )
    .unwrap();
    let own = draw.lod_meshes();
    let foreign = [DrawIndexedIndirect {
        index_count: 3,
        first_index: 1 << 20,
        ..Default::default()
    }; 3];
    eprintln!("draw pass meshes {own:?}");
    let mut cull = CullPass::with_records(&ctx, Compaction::Atomic, 256, foreign).unwrap();
    let src = upload(&ctx, &trees(20));
    let target = Target::new(&ctx);
    let (vp, eye) = camera();
    let constants = DrawFrame::new(vp, eye, 500.0, [-100.0, -100.0, 200.0], false);
    let species = veg.species_regions();
    let mut drawn = None;
    ctx.submit_and_wait(|frame, cmd| {
        let source = CullSource {
            buffer: &src,
            count: 20,
            base: 0,
        };
        // SAFETY: every item of the `# Safety` lists of CullPass::record, DrawPass::prepare and
        // DrawPass::record holds: recording for `frame` on the graphics queue, the cull and
        // prepare outside rendering, the draw inside a scope of the pass's formats, the atlas
        // page in SHADER_READ_ONLY_OPTIMAL (uploaded earlier), the cull built with records.
        unsafe {
            cull.record(frame, cmd, &[source], &cull_view())?;
            draw.prepare(frame, cmd, &cull, &constants, &species)?;
            target.begin_rendering(&ctx, frame, cmd);
            drawn = Some(draw.record(
                frame,
                cmd,
                &cull,
                page,
                vk::Extent2D {
                    width: W,
                    height: H,
                },
            ));
            ctx.device().cmd_end_rendering(cmd);
        }
        Ok(())
    })
    .unwrap();
    // What those indirect commands were (the same cull again).
    let args = args_after_record(&ctx, &mut cull, &src, 20);
    let indices = own
        .iter()
        .map(|m| m.first_index + m.index_count)
        .max()
        .unwrap();
    eprintln!(
        "the draw pass's index buffer holds {indices} indices; the commands it drew: {:?}",
        &args[..3]
    );
    drop((cull, draw, veg, src));
    target.destroy(&ctx);
    common::finish(ctx, test);
    let past = args[..3]
        .iter()
        .any(|a| a.instance_count > 0 && a.first_index + a.index_count > indices);
    let drawn = drawn.unwrap();
    assert!(
        matches!(drawn, Err(Error::InvalidInput(_))) || !past,
        "DrawPass::record accepted ({drawn:?}) a cull pass whose commands index past its \
         {indices}-index buffer: {:?}",
        &args[..3]
    );
}

/// Capacity × views × record size: the largest capacity `max_capacity_of` allows for five views
/// with records builds (or is refused by the budget), binds within `maxStorageBufferRange` and
/// records cleanly; one more is `InvalidInput`.
#[test]
fn max_capacity_of_five_views_with_records_fits_one_binding() {
    let test = "max_capacity_five_views";
    let Some(ctx) = common::context(test) else {
        return;
    };
    let max = CullPass::max_capacity_of(&ctx, true, 5);
    let range = u64::from(ctx.adapter().limits.max_storage_buffer_range);
    eprintln!("max capacity for 5 views with records: {max} (range {range})");
    let r = CullPass::from_desc(&ctx, &desc(5, true, max + 1));
    assert!(
        matches!(r, Err(Error::InvalidInput(_))),
        "{:?}",
        r.map(|_| ())
    );
    match CullPass::from_desc(&ctx, &desc(5, true, max)) {
        Ok(mut pass) => {
            assert!(pass.lists().unwrap().size() <= range);
            assert!(pass.records().unwrap().size() <= range);
            let src = upload(&ctx, &trees(100));
            ctx.submit_and_wait(|frame, cmd| {
                let source = CullSource {
                    buffer: &src,
                    count: 100,
                    base: 0,
                };
                // SAFETY: recording for `frame` outside rendering.
                unsafe { pass.record(frame, cmd, &[source], &cull_view()) }
            })
            .unwrap();
            drop((pass, src));
        }
        Err(e @ (Error::OverBudget { .. } | Error::OutOfDeviceMemory { .. })) => {
            eprintln!("{test}: refused by the budget: {e}");
        }
        Err(e) => panic!("{test}: {e}"),
    }
    common::finish(ctx, test);
}
