//! The depth pyramid against its CPU reference, on the real driver under (synchronization)
//! validation: odd sizes, one pixel, 720p, every accepted depth layout but
//! `DEPTH_READ_ONLY_OPTIMAL` (it needs a feature the test context does not enable), two records
//! in one command buffer and in two frames, and the refusals.

mod common;

use ash::vk;
use understory::Error;
use understory::gpu::compute::{image_barrier, memory_barrier};
use understory::gpu::context::{Context, Frame};
use understory::gpu::memory::{Buffer, BufferDesc, Image, MemoryLocation};
use understory::gpu::pyramid::{DepthPyramid, PYRAMID_FORMAT, PYRAMID_LAYOUT, pyramid_cpu};
use understory::policy::category::Category;

use common::DEPTH_ONLY;

/// A D32 depth image, a view of it and a host buffer of its texels.
struct Depth {
    image: Image,
    view: vk::ImageView,
    staging: Buffer,
    texels: Vec<f32>,
}

/// Deterministic depths in [0, 1], with exact 0 and 1 among them.
fn depths(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            match i % 97 {
                13 => 0.0,
                71 => 1.0,
                _ => (s >> 40) as f32 / (1u64 << 24) as f32,
            }
        })
        .collect()
}

fn depth_image(ctx: &Context, extent: vk::Extent2D, seed: u64) -> Depth {
    let (image, view) = common::image_with_view(
        ctx,
        "test depth",
        extent,
        vk::Format::D32_SFLOAT,
        vk::ImageUsageFlags::TRANSFER_DST
            | vk::ImageUsageFlags::SAMPLED
            | vk::ImageUsageFlags::DEPTH_STENCIL_ATTACHMENT,
        vk::ImageAspectFlags::DEPTH,
    );
    let texels = depths((extent.width * extent.height) as usize, seed);
    let staging = ctx
        .create_buffer(&BufferDesc {
            name: "test depth staging",
            size: (texels.len() * 4) as u64,
            usage: vk::BufferUsageFlags::TRANSFER_SRC,
            location: MemoryLocation::CpuToGpu,
            category: Category::Staging,
        })
        .unwrap();
    let mut depth = Depth {
        image,
        view,
        staging,
        texels,
    };
    depth.fill(seed);
    depth
}

impl Depth {
    /// New texels from `seed` in the staging buffer.
    fn fill(&mut self, seed: u64) {
        self.texels = depths(self.texels.len(), seed);
        let bytes: &[u8] = bytemuck::cast_slice(&self.texels);
        self.staging.mapped_mut().unwrap()[..bytes.len()].copy_from_slice(bytes);
    }

    /// Records the upload and the transition to `layout`, visible to compute-shader reads
    /// (after any earlier compute reads of the image).
    ///
    /// # Safety
    /// `cmd` is recording for `frame`, outside a render pass.
    unsafe fn upload(
        &self,
        ctx: &Context,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        layout: vk::ImageLayout,
    ) {
        self.image.used_in(frame).unwrap();
        self.staging.used_in(frame).unwrap();
        let d = ctx.device();
        let extent = self.image.extent();
        let region = vk::BufferImageCopy::default()
            .image_subresource(vk::ImageSubresourceLayers {
                aspect_mask: vk::ImageAspectFlags::DEPTH,
                mip_level: 0,
                base_array_layer: 0,
                layer_count: 1,
            })
            .image_extent(vk::Extent3D {
                width: extent.width,
                height: extent.height,
                depth: 1,
            });
        // SAFETY: as the caller vouched; the image and buffer are live, marked used by `frame`,
        // and the copy covers exactly the image.
        unsafe {
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::PipelineStageFlags::TRANSFER,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &[image_barrier(
                    self.image.raw(),
                    DEPTH_ONLY,
                    (vk::ImageLayout::UNDEFINED, vk::AccessFlags::empty()),
                    (
                        vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                        vk::AccessFlags::TRANSFER_WRITE,
                    ),
                )],
            );
            d.cmd_copy_buffer_to_image(
                cmd,
                self.staging.raw(),
                self.image.raw(),
                vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                &[region],
            );
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::TRANSFER,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &[image_barrier(
                    self.image.raw(),
                    DEPTH_ONLY,
                    (
                        vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                        vk::AccessFlags::TRANSFER_WRITE,
                    ),
                    (layout, vk::AccessFlags::SHADER_READ),
                )],
            );
        }
    }

    /// Destroys the view (every frame that used it has completed) and the rest.
    fn destroy(self, ctx: &Context) {
        // SAFETY: every submission that used the view was waited for.
        unsafe { ctx.device().destroy_image_view(self.view, None) };
    }
}

/// Each mip's size: the pyramid's levels live at their top left.
fn mips(p: &DepthPyramid) -> Vec<vk::Extent2D> {
    let base = p.image().extent();
    (0..p.levels())
        .map(|k| vk::Extent2D {
            width: (base.width >> k).max(1),
            height: (base.height >> k).max(1),
        })
        .collect()
}

/// A host buffer for every mip of `p`.
fn readback_buffer(ctx: &Context, p: &DepthPyramid) -> Buffer {
    let bytes: u64 = mips(p)
        .iter()
        .map(|m| u64::from(m.width * m.height) * 4)
        .sum();
    ctx.create_buffer(&BufferDesc {
        name: "pyramid readback",
        size: bytes,
        usage: vk::BufferUsageFlags::TRANSFER_DST,
        location: MemoryLocation::GpuToCpu,
        category: Category::Other,
    })
    .unwrap()
}

/// Records copies of every whole mip into `read` (mip after mip) and the barrier to the host.
/// The pyramid goes to `TRANSFER_SRC_OPTIMAL` first: the layer warns (performance) about copies
/// from `GENERAL`, and the next record starts from `UNDEFINED` whatever the layout.
///
/// # Safety
/// `cmd` is recording for `frame` outside a render pass, after `p` was recorded.
unsafe fn copy_levels(
    ctx: &Context,
    frame: &Frame,
    cmd: vk::CommandBuffer,
    p: &DepthPyramid,
    read: &Buffer,
) {
    read.used_in(frame).unwrap();
    p.image().used_in(frame).unwrap();
    let mut offset = 0;
    let regions: Vec<_> = mips(p)
        .iter()
        .enumerate()
        .map(|(k, m)| {
            let r = vk::BufferImageCopy::default()
                .buffer_offset(offset)
                .image_subresource(vk::ImageSubresourceLayers {
                    aspect_mask: vk::ImageAspectFlags::COLOR,
                    mip_level: k as u32,
                    base_array_layer: 0,
                    layer_count: 1,
                })
                .image_extent(vk::Extent3D {
                    width: m.width,
                    height: m.height,
                    depth: 1,
                });
            offset += u64::from(m.width * m.height) * 4;
            r
        })
        .collect();
    let all = vk::ImageSubresourceRange {
        aspect_mask: vk::ImageAspectFlags::COLOR,
        base_mip_level: 0,
        level_count: p.levels(),
        base_array_layer: 0,
        layer_count: 1,
    };
    // SAFETY: as the caller vouched; the pyramid's last barrier made its writes available, in
    // PYRAMID_LAYOUT; the buffer holds every mip.
    unsafe {
        ctx.device().cmd_pipeline_barrier(
            cmd,
            vk::PipelineStageFlags::COMPUTE_SHADER,
            vk::PipelineStageFlags::TRANSFER,
            vk::DependencyFlags::empty(),
            &[],
            &[],
            &[image_barrier(
                p.image().raw(),
                all,
                (PYRAMID_LAYOUT, vk::AccessFlags::SHADER_WRITE),
                (
                    vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                    vk::AccessFlags::TRANSFER_READ,
                ),
            )],
        );
        ctx.device().cmd_copy_image_to_buffer(
            cmd,
            p.image().raw(),
            vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
            read.raw(),
            &regions,
        );
        memory_barrier(
            ctx.device(),
            cmd,
            (
                vk::PipelineStageFlags::TRANSFER,
                vk::AccessFlags::TRANSFER_WRITE,
            ),
            (vk::PipelineStageFlags::HOST, vk::AccessFlags::HOST_READ),
        );
    }
}

/// Every level read back equals the CPU reference bit for bit, and the rest of each mip is 1.0.
fn check(p: &DepthPyramid, read: &Buffer, depth: &Depth, what: &str) {
    let e = p.depth_extent();
    let want = pyramid_cpu(&depth.texels, e.width, e.height);
    assert_eq!(want.len() as u32, p.levels(), "{what}: levels");
    let bytes = read.mapped().unwrap();
    let got: &[f32] = bytemuck::cast_slice(&bytes[..]);
    let mut at = 0;
    for (k, ((w, h, texels), m)) in want.iter().zip(mips(p)).enumerate() {
        assert_eq!(
            p.level_extents()[k],
            vk::Extent2D {
                width: *w,
                height: *h
            },
            "{what}: level {k} size"
        );
        for y in 0..m.height {
            for x in 0..m.width {
                let g = got[at + (y * m.width + x) as usize];
                let expected = if x < *w && y < *h {
                    texels[(y * w + x) as usize]
                } else {
                    1.0
                };
                assert_eq!(
                    g.to_bits(),
                    expected.to_bits(),
                    "{what}: level {k} ({w}x{h} in a {}x{} mip) texel ({x}, {y})",
                    m.width,
                    m.height
                );
            }
        }
        at += (m.width * m.height) as usize;
    }
}

fn extent(width: u32, height: u32) -> vk::Extent2D {
    vk::Extent2D { width, height }
}

#[test]
fn levels_match_the_cpu_reference() {
    let Some(ctx) = common::context("levels_match_the_cpu_reference") else {
        return;
    };
    let cases = [
        (
            extent(37, 23),
            vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL,
        ),
        (extent(641, 359), vk::ImageLayout::SHADER_READ_ONLY_OPTIMAL),
        (extent(1, 1), vk::ImageLayout::GENERAL),
        (
            extent(1, 9),
            vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL,
        ),
        (
            extent(1280, 720),
            vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL,
        ),
    ];
    for (i, (e, layout)) in cases.into_iter().enumerate() {
        let what = format!("{}x{} in {layout:?}", e.width, e.height);
        let depth = depth_image(&ctx, e, 7 + i as u64);
        let pyramid = DepthPyramid::new(&ctx, e).unwrap();
        let read = readback_buffer(&ctx, &pyramid);
        ctx.submit_and_wait(|frame, cmd| {
            // SAFETY: submit_and_wait's command buffer for `frame`; the depth view is of the
            // uploaded image, made visible to compute reads in `layout`, and outlives the wait.
            unsafe {
                depth.upload(&ctx, frame, cmd, layout);
                pyramid.record(frame, cmd, depth.view, layout)?;
                copy_levels(&ctx, frame, cmd, &pyramid, &read);
            }
            Ok(())
        })
        .unwrap();
        check(&pyramid, &read, &depth, &what);
        drop((pyramid, read));
        depth.destroy(&ctx);
        common::assert_clean(ctx.canary(), &what);
    }
    common::finish(ctx, "levels_match_the_cpu_reference");
}

/// Twice in one command buffer (each read back), then again in the next frame over new depths:
/// the barrier chain holds under synchronization validation, and each build is whole.
#[test]
fn records_twice_in_one_buffer_and_again_next_frame() {
    let Some(ctx) = common::context("records_twice_in_one_buffer_and_again_next_frame") else {
        return;
    };
    let e = extent(641, 359);
    let layout = vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL;
    let mut depth = depth_image(&ctx, e, 3);
    let pyramid = DepthPyramid::new(&ctx, e).unwrap();
    let reads = [
        readback_buffer(&ctx, &pyramid),
        readback_buffer(&ctx, &pyramid),
    ];
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: as in levels_match_the_cpu_reference.
        unsafe {
            depth.upload(&ctx, frame, cmd, layout);
            for read in &reads {
                pyramid.record(frame, cmd, depth.view, layout)?;
                copy_levels(&ctx, frame, cmd, &pyramid, read);
            }
        }
        Ok(())
    })
    .unwrap();
    for (i, read) in reads.iter().enumerate() {
        check(
            &pyramid,
            read,
            &depth,
            &format!("record {i} of one command buffer"),
        );
    }
    let first = pyramid.image().last_use();
    depth.fill(4);
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: as above; the upload waits for the previous frame's reads of the depth.
        unsafe {
            depth.upload(&ctx, frame, cmd, layout);
            pyramid.record(frame, cmd, depth.view, layout)?;
            copy_levels(&ctx, frame, cmd, &pyramid, &reads[0]);
        }
        Ok(())
    })
    .unwrap();
    check(&pyramid, &reads[0], &depth, "the next frame");
    assert!(
        pyramid.image().last_use() > first,
        "the record marks the image used"
    );
    drop((pyramid, reads));
    depth.destroy(&ctx);
    common::finish(ctx, "records_twice_in_one_buffer_and_again_next_frame");
}

#[test]
fn refuses_bad_input_and_describes_itself() {
    let Some(ctx) = common::context("refuses_bad_input_and_describes_itself") else {
        return;
    };
    for e in [extent(0, 5), extent(5, 0), extent(0, 0)] {
        assert!(
            matches!(DepthPyramid::new(&ctx, e), Err(Error::InvalidInput(_))),
            "{e:?}"
        );
    }
    let e = extent(1280, 720);
    let pyramid = DepthPyramid::new(&ctx, e).unwrap();
    assert_eq!(pyramid.depth_extent(), e);
    assert_eq!(pyramid.extent(), extent(640, 360));
    assert_eq!(pyramid.levels(), 11);
    assert_eq!(*pyramid.level_extents().last().unwrap(), extent(1, 1));
    let image = pyramid.image();
    assert_eq!(
        image.extent(),
        extent(1024, 512),
        "level 0 rounded up to powers of two"
    );
    assert_eq!(image.mip_levels(), 11);
    assert_eq!(image.format(), PYRAMID_FORMAT);
    assert_eq!(image.category(), Category::Outputs);
    assert!(image.usage().contains(
        vk::ImageUsageFlags::STORAGE
            | vk::ImageUsageFlags::SAMPLED
            | vk::ImageUsageFlags::TRANSFER_SRC
    ));
    assert_ne!(pyramid.view(), vk::ImageView::null());

    let depth = depth_image(&ctx, e, 5);
    ctx.submit_and_wait(|frame, cmd| {
        for layout in [
            vk::ImageLayout::UNDEFINED,
            vk::ImageLayout::DEPTH_STENCIL_ATTACHMENT_OPTIMAL,
            vk::ImageLayout::TRANSFER_DST_OPTIMAL,
        ] {
            // SAFETY: refused before anything is recorded.
            let r = unsafe { pyramid.record(frame, cmd, depth.view, layout) };
            assert!(
                matches!(r, Err(Error::InvalidInput(_))),
                "{layout:?}: {r:?}"
            );
        }
        // SAFETY: refused before anything is recorded.
        let r = unsafe {
            pyramid.record(
                frame,
                cmd,
                vk::ImageView::null(),
                vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL,
            )
        };
        assert!(matches!(r, Err(Error::InvalidInput(_))), "null view: {r:?}");
        Ok(())
    })
    .unwrap();
    assert_eq!(pyramid.image().last_use(), 0, "refusals mark nothing");
    drop(pyramid);
    depth.destroy(&ctx);
    common::finish(ctx, "refuses_bad_input_and_describes_itself");
}

/// `DepthPyramid::used_in` marks the pyramid's image (and views, retired with it) used by the
/// frame, so a host's own commands that use it may be recorded after the pyramid is dropped
/// (here a layout transition of the image, under validation): they are destroyed, like every
/// image, no earlier than the last frame marked. A frame of another context is refused.
#[test]
fn used_in_keeps_the_image_and_views_for_the_frame() {
    let test = "pyramid_used_in";
    let Some(ctx) = common::context(test) else {
        return;
    };
    let pyramid = DepthPyramid::new(&ctx, extent(64, 32)).unwrap();
    let (image, view, mips) = (
        pyramid.image().raw(),
        pyramid.view(),
        pyramid.image().mip_levels(),
    );
    assert_ne!(view, vk::ImageView::null());
    ctx.submit_and_wait(|frame, cmd| {
        assert_eq!(pyramid.last_use(), 0);
        pyramid.used_in(frame)?;
        assert_eq!(pyramid.image().last_use(), frame.value());
        assert_eq!(pyramid.last_use(), frame.value(), "the views' retire value");
        drop(pyramid);
        let range = vk::ImageSubresourceRange {
            aspect_mask: vk::ImageAspectFlags::COLOR,
            base_mip_level: 0,
            level_count: mips,
            base_array_layer: 0,
            layer_count: 1,
        };
        // SAFETY: cmd is recording for `frame`, outside rendering; the image was marked used
        // by `frame`, so the dropped pyramid's image lives until the frame completes.
        unsafe {
            ctx.device().cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::TOP_OF_PIPE,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &[image_barrier(
                    image,
                    range,
                    (vk::ImageLayout::UNDEFINED, vk::AccessFlags::empty()),
                    (PYRAMID_LAYOUT, vk::AccessFlags::SHADER_READ),
                )],
            );
        }
        Ok(())
    })
    .unwrap();
    let other = common::context(&format!("{test} (another context)")).unwrap();
    let pyramid = DepthPyramid::new(&ctx, extent(8, 8)).unwrap();
    other
        .submit_and_wait(|frame, _| {
            let r = pyramid.used_in(frame);
            assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
            Ok(())
        })
        .unwrap();
    drop(pyramid);
    common::finish(other, &format!("{test} (another context)"));
    common::finish(ctx, test);
}
