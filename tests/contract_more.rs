//! More of the host contract's soundness holes found in review (findings c, e and h), each as a
//! regression test in the style of `tests/contract.rs`: what a sequence of safe calls (or unsafe
//! calls whose contract is honoured) must not do. Each test says whether it fails on the code
//! before its fix. Where a fix is by types, a compile-fail doctest next to the type shows what
//! no longer compiles (`Mapped` in `src/gpu/memory.rs`).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ash::vk;
use glam::Vec3;
use understory::Error;
use understory::gpu::atlas::ATLAS_FORMAT;

use understory::gpu::context::Context;
use understory::gpu::cull::{
    Compaction, CullDesc, CullPass, CullSource, CullView, DrawIndexedIndirect, SOURCES_PER_DISPATCH,
};
use understory::gpu::debug::Canary;
use understory::gpu::draw::DrawPass;
use understory::gpu::frame::FrameRing;
use understory::gpu::memory::{Buffer, BufferDesc, Image, ImageDesc, MemoryLocation};
use understory::gpu::scan::BlockScan;
use understory::policy::category::Category;
use understory::policy::lod::LodBands;
use understory::vegetation::{SpeciesDesc, Vegetation, VegetationConfig};

/// The GPU tests of this file run one at a time (the race below measures interleavings, and a
/// 2-core machine running several lavapipe contexts at once blurs them).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drains the canary, printing what it held; returns how many messages there were.
fn messages(canary: &Arc<Canary>, what: &str) -> usize {
    let msgs = canary.drain();
    for m in &msgs {
        eprintln!("[{what}] VALIDATION: {m}");
    }
    msgs.len()
}

fn buffer(
    ctx: &Context,
    name: &str,
    size: u64,
    usage: vk::BufferUsageFlags,
    location: MemoryLocation,
) -> Buffer {
    ctx.create_buffer(&BufferDesc {
        name,
        size,
        usage,
        location,
        category: Category::Other,
    })
    .expect("buffer")
}

const MESHES: [DrawIndexedIndirect; 3] = [DrawIndexedIndirect {
    index_count: 6,
    instance_count: 0,
    first_index: 0,
    vertex_offset: 0,
    first_instance: 0,
}; 3];

fn cull_pass(ctx: &Context) -> CullPass {
    CullPass::from_desc(
        ctx,
        &CullDesc {
            compaction: Compaction::Atomic,
            capacity: 64,
            adaptive: false,
            meshes: MESHES,
            records: false,
            max_sources_per_dispatch: SOURCES_PER_DISPATCH,
            views: 1,
        },
    )
    .expect("cull pass")
}

/// x, y, z in [-100, 100] around the origin.
fn box_view() -> CullView {
    let planes = [
        [1.0, 0.0, 0.0, 100.0],
        [-1.0, 0.0, 0.0, 100.0],
        [0.0, 1.0, 0.0, 100.0],
        [0.0, -1.0, 0.0, 100.0],
        [0.0, 0.0, 1.0, 100.0],
        [0.0, 0.0, -1.0, 100.0],
    ];
    CullView::from_planes(planes, Vec3::ZERO, 1.0, &LodBands::default(), 1.0).unwrap()
}

// ---- c. the GPU never writes a buffer while a mapping of it is alive ----------------------

/// A host-visible storage buffer is mapped (`Buffer::mapped`) and, while that view is alive,
/// every path that lets a frame use the buffer is tried: `used_in`, the block scan (which
/// writes it), a raw compute dispatch and the cull pass (which reads it as a source). Each is
/// refused with `Lifecycle` and records nothing; once the view is dropped, the same calls go
/// through and the scan's result is seen through a new mapping after the frame completed.
///
/// Before the fix every call succeeded, and the scan wrote the bytes the live `&[u8]` pointed
/// at (mutation behind a shared reference).
#[test]
fn no_frame_uses_a_buffer_while_a_mapping_of_it_is_alive() {
    let _serial = serial();
    let Some(ctx) = common::context("mapped_vs_frames") else {
        return;
    };
    let canary = ctx.canary().clone();
    let scan = BlockScan::new(&ctx).unwrap();
    let raw = common::block_scan_by_hand(&ctx, "block scan by hand");
    let mut cull = cull_pass(&ctx);
    let storage = vk::BufferUsageFlags::STORAGE_BUFFER;
    let mut input = buffer(&ctx, "in", 1024, storage, MemoryLocation::CpuToGpu);
    let mut out = buffer(&ctx, "out", 1024, storage, MemoryLocation::GpuToCpu);
    let sums = buffer(&ctx, "sums", 64, storage, MemoryLocation::GpuOnly);
    input.mapped_mut().unwrap().fill(0);
    out.mapped_mut().unwrap().fill(0xab);
    let ring = FrameRing::new(&ctx).unwrap();

    let view = out.mapped().expect("idle and host-visible");
    let before = view[..].to_vec();
    let frame = ctx.begin_frame().unwrap();
    let cmd = ring.begin(&frame).unwrap();
    let source = [CullSource {
        buffer: &out,
        count: 32,
        base: 0,
    }];
    // SAFETY: the ring's recording command buffer for `frame`, outside a render pass, offered
    // as the frame's submission; the buffers hold the 256 elements the scan touches and the 32
    // instances the cull reads.
    let refused = unsafe {
        [
            ("used_in", out.used_in(&frame)),
            (
                "BlockScan::record",
                scan.record(&frame, cmd.raw(), &input, &out, &sums, 256),
            ),
            (
                "ComputePipeline::record_dispatch",
                raw.record_dispatch(
                    &frame,
                    cmd.raw(),
                    &[&input, &out, &sums],
                    &256u32.to_le_bytes(),
                    [1, 1, 1],
                ),
            ),
            (
                "CullPass::record",
                cull.record(&frame, cmd.raw(), &source, &box_view()),
            ),
        ]
    };
    for (what, r) in &refused {
        eprintln!("{what} while mapped -> {r:?}");
    }
    let s = ring.submit(frame, cmd).unwrap();
    ctx.wait(s.value(), Duration::from_secs(30)).unwrap();
    for (what, r) in refused {
        assert!(matches!(r, Err(Error::Lifecycle(_))), "{what}: {r:?}");
    }
    assert_eq!(out.last_use(), 0, "no frame used the mapped buffer");
    assert_eq!(&view[..], &before[..], "nothing wrote the mapped bytes");
    drop(view);

    // Without the view, the same calls go through, and a mapping waits for the frame.
    let frame = ctx.begin_frame().unwrap();
    let cmd = ring.begin(&frame).unwrap();
    out.used_in(&frame).unwrap();
    // SAFETY: as above; the barrier makes the shader's writes visible to the host.
    unsafe {
        scan.record(&frame, cmd.raw(), &input, &out, &sums, 256)
            .unwrap();
        understory::gpu::compute::memory_barrier(
            ctx.device(),
            cmd.raw(),
            (
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::AccessFlags::SHADER_WRITE,
            ),
            (vk::PipelineStageFlags::HOST, vk::AccessFlags::HOST_READ),
        );
    }
    let busy = out.mapped().map(|m| m.len());
    assert!(matches!(busy, Err(Error::NotReady(_))), "{busy:?}");
    let s = ring.submit(frame, cmd).unwrap();
    ctx.wait(s.value(), Duration::from_secs(30)).unwrap();
    let after = out.mapped().unwrap();
    assert!(
        after[..1024].iter().all(|b| *b == 0),
        "the scan of zeros ran"
    );
    drop(after);
    drop((scan, raw, cull, input, out, sums, ring));
    assert_eq!(messages(&canary, "mapped vs frames"), 0);
    common::finish(ctx, "mapped_vs_frames");
}

/// One thread maps a buffer over and over and holds each view a little while; another begins
/// frames that mark the buffer used (`used_in`) and submits them. While a view is alive, the
/// buffer's last use must not move (no frame may start using it). Before the fix the marks
/// went through under live views and the last use moved (the assertion fails within a few
/// hundred frames); after it, a mark is refused exactly while a view is alive, so both
/// threads still make progress.
#[test]
fn a_mapping_and_a_mark_racing_on_two_threads_never_overlap() {
    let _serial = serial();
    let Some(ctx) = common::context("mapped_race") else {
        return;
    };
    let canary = ctx.canary().clone();
    let b = buffer(
        &ctx,
        "raced",
        256,
        vk::BufferUsageFlags::STORAGE_BUFFER,
        MemoryLocation::GpuToCpu,
    );
    let ring = FrameRing::new(&ctx).unwrap();
    let stop = AtomicBool::new(false);
    let (views, moved) = (AtomicU64::new(0), AtomicU64::new(0));
    let (mut marks, mut refusals) = (0u64, 0u64);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                let Ok(view) = b.mapped() else {
                    std::thread::yield_now();
                    continue;
                };
                let first = b.last_use();
                let t = Instant::now();
                while t.elapsed() < Duration::from_micros(200) {
                    std::hint::black_box(view[0]);
                }
                if b.last_use() != first {
                    moved.fetch_add(1, Ordering::Relaxed);
                }
                drop(view);
                views.fetch_add(1, Ordering::Relaxed);
                // As long without a view, so that frames can mark the buffer too.
                let t = Instant::now();
                while t.elapsed() < Duration::from_micros(200) {
                    std::hint::spin_loop();
                }
            }
        });
        let t = Instant::now();
        let mut frames = 0;
        let starved = |marks: u64| marks < 20 || views.load(Ordering::Relaxed) < 20;
        while frames < 400 || (starved(marks) && t.elapsed().as_secs() < 30) {
            let frame = ctx.begin_frame().unwrap();
            match b.used_in(&frame) {
                Ok(()) => marks += 1,
                Err(Error::Lifecycle(_)) => refusals += 1,
                Err(e) => panic!("used_in: {e}"),
            }
            let cmd = ring.begin(&frame).unwrap();
            ring.submit(frame, cmd).unwrap();
            frames += 1;
        }
        stop.store(true, Ordering::Relaxed);
    });
    let (views, moved) = (views.into_inner(), moved.into_inner());
    eprintln!("marks {marks}, refused {refusals}, views {views}, views that saw a mark {moved}");
    assert_eq!(
        moved, 0,
        "a frame marked the buffer while a view of it was alive"
    );
    assert!(marks > 0 && views > 0, "both sides made progress");
    ctx.wait(b.last_use(), Duration::from_secs(30)).unwrap();
    drop((b, ring));
    assert_eq!(messages(&canary, "mapped race"), 0);
    common::finish(ctx, "mapped_race");
}

/// A view that is leaked (`mem::forget`, which safe code may do) keeps the buffer from every
/// frame for good, as a leaked `RefCell` borrow does, but not from more views or from
/// `mapped_mut` (which needs the only reference). Before the fix, `used_in` went through.
#[test]
fn a_leaked_mapping_keeps_the_buffer_from_frames() {
    let _serial = serial();
    let Some(ctx) = common::context("mapped_leak") else {
        return;
    };
    let canary = ctx.canary().clone();
    let mut b = buffer(
        &ctx,
        "leaked view",
        256,
        vk::BufferUsageFlags::STORAGE_BUFFER,
        MemoryLocation::CpuToGpu,
    );
    std::mem::forget(b.mapped().unwrap());
    let frame = ctx.begin_frame().unwrap();
    let r = b.used_in(&frame);
    eprintln!("used_in after a leaked view -> {r:?}");
    assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
    drop(frame);
    assert_eq!(b.mapped().unwrap().len(), 256, "more views are fine");
    b.mapped_mut().unwrap()[0] = 1;
    assert_eq!(b.mapped().unwrap()[0], 1);
    drop(b);
    assert_eq!(messages(&canary, "mapped leak"), 0);
    common::finish(ctx, "mapped_leak");
}

// ---- e. cull sources are storage buffers within maxStorageBufferRange ---------------------

/// A source without `STORAGE_BUFFER` usage is refused with `InvalidInput` before anything is
/// recorded (also one with no instances, which the pass marks used too), and so is one larger
/// than `maxStorageBufferRange` where the device's range is small enough to allocate such a
/// buffer in a test. Before the fix the first was bound as a storage buffer
/// (VUID-VkWriteDescriptorSet-descriptorType-00331, reported by the layer) and the record
/// succeeded.
#[test]
fn cull_sources_need_storage_usage() {
    let _serial = serial();
    let Some(ctx) = common::context("cull_source_usage") else {
        return;
    };
    let canary = ctx.canary().clone();
    let mut cull = cull_pass(&ctx);
    let bytes = 32 * size_of::<understory::world::instance::Instance>() as u64;
    let vertex = buffer(
        &ctx,
        "vertex only",
        bytes,
        vk::BufferUsageFlags::VERTEX_BUFFER | vk::BufferUsageFlags::TRANSFER_DST,
        MemoryLocation::GpuOnly,
    );
    let storage = buffer(
        &ctx,
        "storage",
        bytes,
        vk::BufferUsageFlags::STORAGE_BUFFER | vk::BufferUsageFlags::TRANSFER_DST,
        MemoryLocation::GpuOnly,
    );
    let range = u64::from(ctx.adapter().limits.max_storage_buffer_range);
    // Only where that is cheap (lavapipe: 128 MiB of host memory, never touched), and only if
    // the memory caps allow it.
    let too_large = if range <= 256 << 20 {
        ctx.create_buffer(&BufferDesc {
            name: "over maxStorageBufferRange",
            size: range + 256,
            usage: vk::BufferUsageFlags::STORAGE_BUFFER,
            location: MemoryLocation::GpuOnly,
            category: Category::Other,
        })
        .inspect_err(|e| eprintln!("a buffer over maxStorageBufferRange ({range}): {e}"))
        .ok()
    } else {
        None
    };
    if too_large.is_none() {
        eprintln!("maxStorageBufferRange is {range} bytes: the over-range source is not tried");
    }
    let source = |buffer, count| CullSource {
        buffer,
        count,
        base: 0,
    };
    let mut refused = Vec::new();
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: submit_and_wait's recording command buffer for `frame`, outside a render
        // pass; the refused calls record nothing, the last one a whole pass over `storage`,
        // whose 32 instances are written: zeros (the buffer is filled first).
        unsafe {
            storage.used_in(frame)?;
            common::zero_for_compute(&ctx, cmd, &storage);
            let view = box_view();
            refused.push((
                "VERTEX_BUFFER source",
                cull.record(
                    frame,
                    cmd,
                    &[source(&storage, 32), source(&vertex, 32)],
                    &view,
                ),
            ));
            refused.push((
                "VERTEX_BUFFER source of no instances",
                cull.record(frame, cmd, &[source(&vertex, 0)], &view),
            ));
            if let Some(b) = &too_large {
                refused.push((
                    "source over maxStorageBufferRange",
                    cull.record(frame, cmd, &[source(b, 32)], &view),
                ));
            }
            cull.record(frame, cmd, &[source(&storage, 32)], &view)
        }
    })
    .unwrap();
    for (what, r) in refused {
        eprintln!("CullPass::record with a {what} -> {r:?}");
        assert!(matches!(r, Err(Error::InvalidInput(_))), "{what}: {r:?}");
    }
    drop((cull, vertex, storage, too_large));
    ctx.collect().unwrap();
    assert_eq!(messages(&canary, "cull source usage"), 0);
    common::finish(ctx, "cull_source_usage");
}

// ---- h. the draw pass samples only a sampled page of the atlas format ----------------------

const COLOR: vk::Format = vk::Format::R8G8B8A8_UNORM;
const DEPTH: vk::Format = vk::Format::D32_SFLOAT;

fn image(
    ctx: &Context,
    name: &str,
    format: vk::Format,
    usage: vk::ImageUsageFlags,
) -> understory::Result<Image> {
    ctx.create_image(&ImageDesc {
        name,
        extent: vk::Extent2D {
            width: 64,
            height: 64,
        },
        format,
        mip_levels: 7,
        usage,
        category: Category::Atlas,
    })
}

/// `DrawPass::new` refuses a page it cannot sample: no `SAMPLED` usage, a colour format other
/// than the atlas's, a depth format (whose view with a colour aspect is invalid). Before the
/// fix each was accepted: the first two bound as sampled images later
/// (VUID-VkWriteDescriptorSet-descriptorType-00337 for the first), the depth image's colour
/// view reported by the layer at once.
#[test]
fn draw_pass_needs_a_sampled_page_of_the_atlas_format() {
    let _serial = serial();
    let Some(ctx) = common::context("draw_page_checks") else {
        return;
    };
    let canary = ctx.canary().clone();
    let sampled = vk::ImageUsageFlags::SAMPLED | vk::ImageUsageFlags::TRANSFER_DST;
    let pages = [
        (
            "RGBA8 without SAMPLED",
            image(
                &ctx,
                "not sampled",
                ATLAS_FORMAT,
                vk::ImageUsageFlags::TRANSFER_DST | vk::ImageUsageFlags::COLOR_ATTACHMENT,
            ),
        ),
        (
            "R32_SFLOAT",
            image(&ctx, "float", vk::Format::R32_SFLOAT, sampled),
        ),
        (
            "D32_SFLOAT",
            image(&ctx, "depth", vk::Format::D32_SFLOAT, sampled),
        ),
    ];
    for (what, page) in pages {
        let Ok(page) = page else {
            eprintln!("{what}: the device cannot create it ({page:?}); not tried");
            continue;
        };
        let r = DrawPass::new(&ctx, COLOR, DEPTH, &page, 0);
        eprintln!("DrawPass::new with a {what} page -> {:?}", r.as_ref().err());
        assert!(matches!(r, Err(Error::InvalidInput(_))), "{what}");
        drop(page);
        assert_eq!(messages(&canary, what), 0, "{what}");
    }
    let page = image(&ctx, "atlas page", ATLAS_FORMAT, sampled).unwrap();
    assert_eq!(
        page.usage(),
        sampled,
        "Image::usage is what it was created with"
    );
    let draw = DrawPass::new(&ctx, COLOR, DEPTH, &page, 0).expect("a sampled RGBA8 page");
    drop((draw, page));
    ctx.collect().unwrap();
    assert_eq!(messages(&canary, "valid page"), 0);
    common::finish(ctx, "draw_page_checks");
}

/// The pass holds a view of its page, not the page. When the page's last species is
/// unregistered the page image retires at its last use while the pass keeps its view; the pass
/// never uses that view again: `record` takes the page by reference and refuses any other image
/// (ids are never reused), here the page that replaces it. Dropping the pass afterwards destroys
/// the view of the destroyed image with no validation message. Also (finding c) the pass does
/// not record while a view of the cull pass's arguments is alive. Passes before the fix too
/// except for the last point: it pins the documented behaviour.
#[test]
fn draw_pass_refuses_to_record_once_its_page_is_replaced() {
    let _serial = serial();
    let Some(ctx) = common::context("draw_page_retired") else {
        return;
    };
    let canary = ctx.canary().clone();
    let mut veg = Vegetation::new(
        &ctx,
        VegetationConfig {
            atlas_page_px: 64,
            ..Default::default()
        },
    )
    .unwrap();
    let texels = understory::gpu::draw::tree_billboard(32, 48, 1);
    let species = |name| SpeciesDesc {
        name,
        width: 32,
        height: 48,
        rgba8: &texels,
    };
    let a = veg.register_species(&species("a")).unwrap();
    let draw = DrawPass::new(&ctx, COLOR, DEPTH, veg.atlas_page(0).unwrap(), 0).unwrap();
    let cull = CullPass::with_records(&ctx, Compaction::Atomic, 64, draw.lod_meshes()).unwrap();
    let extent = vk::Extent2D {
        width: 64,
        height: 64,
    };
    let ring = FrameRing::new(&ctx).unwrap();
    let frame = ctx.begin_frame().unwrap();
    let cmd = ring.begin(&frame).unwrap();
    // SAFETY: the ring's recording command buffer for `frame`; every call below is refused
    // before it records anything (so no rendering scope is needed), and the submission is empty.
    let mapped_args = match cull.args().unwrap().mapped() {
        Ok(view) => Some(unsafe {
            let r = draw.record(&frame, cmd.raw(), &cull, veg.atlas_page(0).unwrap(), extent);
            drop(view);
            r
        }),
        Err(e) => {
            eprintln!("the cull pass's arguments are not host-visible here ({e}); not tried");
            None
        }
    };
    ring.submit(frame, cmd).unwrap();
    if let Some(r) = mapped_args {
        eprintln!("DrawPass::record while the cull arguments are mapped -> {r:?}");
        assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
    }

    veg.unregister_species(a).unwrap();
    assert!(veg.atlas_page(0).is_none(), "the emptied page is retired");
    ctx.collect().unwrap();
    veg.register_species(&species("b")).unwrap();
    let frame = ctx.begin_frame().unwrap();
    let cmd = ring.begin(&frame).unwrap();
    // SAFETY: as above.
    let r = unsafe { draw.record(&frame, cmd.raw(), &cull, veg.atlas_page(0).unwrap(), extent) };
    eprintln!("DrawPass::record with the page that replaced its own -> {r:?}");
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    let s = ring.submit(frame, cmd).unwrap();
    ctx.wait(s.value(), Duration::from_secs(10)).unwrap();
    drop(draw);
    ctx.collect().unwrap();
    drop((cull, veg, ring));
    assert_eq!(messages(&canary, "draw page retired"), 0);
    common::finish(ctx, "draw_page_retired");
}
