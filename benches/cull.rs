//! GPU cull pass timed with GPU timestamps against the card's streaming bandwidth.
//!
//! For each size (default 1M, 4M and 16M instances on a GPU, 1M on a CPU driver; override with
//! `UNDERSTORY_CULL_BENCH_MILLIONS=1,4,16`) and each compaction variant, the whole pass (reset,
//! dispatch, finalize) is recorded 15 times between timestamp pairs and the median reported.
//! In the same run a vec4 copy kernel moves as many bytes as the instance buffer holds (read +
//! write): its bandwidth gives the floor, `(bytes read + written by the cull) / copy bandwidth`.
//! Each row also culls the camera and four shadow cascades in one pass. The instances lie in
//! random order, the worst case for the subgroup variant (a subgroup's instances lie anywhere);
//! `UNDERSTORY_CULL_BENCH_ORDER=tiles` stores the same instances tile by tile (64 m tiles) in
//! this table, as the world's patches hold them.
//! A last table compares one source of 1M (and 4M) instances with sources of 1024 instances each
//! (instances spread over many tile allocations), for each width of the pass's binding array of
//! sources the device allows: the wide one (1024 sources a dispatch) and the narrow one (24,
//! a barrier between dispatches).
//!
//! A table of two-phase occlusion culling follows: against a 1280×720 depth image whose lower
//! half is a near wall, the single pass, each phase, the depth pyramid and the whole of it.
//!
//! A pass over 1,024 instances comes first: what a pass costs whatever it reads.
//! `UNDERSTORY_CULL_BENCH_ONLY=single` stops after the first table, `=occlusion` runs the
//! occlusion rows alone, `=spread` the table of many buffers alone (for the sizes of
//! `UNDERSTORY_CULL_BENCH_MILLIONS`, buffers of `UNDERSTORY_CULL_BENCH_PATCH` instances, 1024
//! unless set).
//!
//! Run: `cargo bench --bench cull`; on the GPU machine `.gpu/bin/cull-bench`.

use ash::vk;
use glam::{Mat4, Vec3};
use understory::gpu::compute::{ComputePipeline, ComputePipelineDesc};
use understory::gpu::context::{Context, ContextOptions, Frame};
use understory::gpu::cull::{
    CascadeView, Compaction, CullDesc, CullPass, CullSource, CullView, DrawIndexedIndirect,
    InstanceBounds, MAX_VIEWS, SOURCES_PER_DISPATCH, WIDE_SOURCES_PER_DISPATCH, cull_cpu,
};
use understory::gpu::instance::{InstanceOptions, Validation};
use understory::gpu::memory::{Buffer, BufferDesc, Image, ImageDesc, MemoryConfig, MemoryLocation};
use understory::gpu::pyramid::DepthPyramid;
use understory::gpu::shaders;
use understory::policy::category::{CATEGORIES, Category, PerCategory};
use understory::policy::lod::{Lod, LodBands};
use understory::world::instance::Instance;

const REPEATS: u32 = 15;

/// A pass with fixed lists of `n` entries: one submission holds all the timed repeats, so there
/// is no read-back in between to size them from.
fn fixed_pass(ctx: &Context, compaction: Compaction, n: usize, max_sources: usize) -> CullPass {
    views_pass(ctx, compaction, n, max_sources, 1)
}

/// As [`fixed_pass`], culling `views` views.
fn views_pass(
    ctx: &Context,
    compaction: Compaction,
    n: usize,
    max_sources: usize,
    views: u32,
) -> CullPass {
    CullPass::from_desc(
        ctx,
        &CullDesc {
            compaction,
            capacity: n as u32,
            meshes: MESHES,
            records: false,
            adaptive: false,
            max_sources_per_dispatch: max_sources,
            views,
        },
    )
    .expect("cull pass")
}

/// Four shadow cascades along the sun around the bench camera (half sizes 50 to 400 m).
fn cascades() -> Vec<CascadeView> {
    let (eye, _) = view_proj();
    let sun = Vec3::new(-0.4, 0.8, 0.35).normalize();
    [50.0f32, 100.0, 200.0, 400.0]
        .iter()
        .map(|&half| {
            let v = Mat4::look_at_rh(eye + sun * 800.0, eye, Vec3::Y);
            let p = Mat4::orthographic_rh(-half, half, -half, half, 0.0, 1600.0);
            CascadeView::new(p * v).expect("cascade")
        })
        .collect()
}
/// As the demo casts: billboards only into the two nearest of [`cascades`].
fn near_cascades() -> Vec<CascadeView> {
    cascades()
        .into_iter()
        .enumerate()
        .map(|(c, v)| {
            if c < 2 {
                v
            } else {
                v.with_max_lod(Lod::Medium)
            }
        })
        .collect()
}

const MESHES: [DrawIndexedIndirect; 3] = [DrawIndexedIndirect {
    index_count: 6,
    instance_count: 0,
    first_index: 0,
    vertex_offset: 0,
    first_instance: 0,
}; 3];

fn xorshift(s: &mut u64) -> f32 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    (*s >> 40) as f32 / (1u64 << 24) as f32
}

/// A forest over a 3 km square around the camera: most instances are beyond the 400 m draw
/// distance or behind the camera, as in a real world.
fn forest(n: usize, seed: u64) -> Vec<Instance> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| Instance {
            scale: 0.5 + xorshift(&mut s),
            yaw: xorshift(&mut s) * std::f32::consts::TAU,
            ..Instance::at(Vec3::new(
                (xorshift(&mut s) - 0.5) * 3000.0,
                xorshift(&mut s) * 5.0,
                (xorshift(&mut s) - 0.5) * 3000.0,
            ))
        })
        .collect()
}

/// Tile edge of [`tile_ordered`], in metres.
const TILE_M: f32 = 64.0;

/// `scene` stored tile by tile (square tiles of [`TILE_M`], row by row), as the world's patches
/// hold instances: those of one tile are neighbours in memory.
fn tile_ordered(scene: &[Instance]) -> Vec<Instance> {
    let mut out = scene.to_vec();
    out.sort_by_cached_key(|i| {
        let cell = |v: f32| ((v + 1500.0) / TILE_M).floor() as i64;
        (cell(i.position[2]), cell(i.position[0]))
    });
    out
}

fn view_proj() -> (Vec3, Mat4) {
    let eye = Vec3::new(0.0, 30.0, 0.0);
    let v = Mat4::look_at_rh(eye, eye + Vec3::new(0.3, -0.15, -1.0), Vec3::Y);
    let p = Mat4::perspective_rh(75f32.to_radians(), 16.0 / 9.0, 0.5, 2000.0);
    (eye, p * v)
}

fn view() -> CullView {
    let (eye, vp) = view_proj();
    CullView::new(vp, eye, 2.0, &LodBands::default(), 1.0).expect("view")
}

/// A 1280×720 depth image (sampled, for the pyramid) whose lower half is a wall at depth 0.2
/// and upper half the far plane, its view, in DEPTH_STENCIL_READ_ONLY_OPTIMAL.
fn depth_wall(ctx: &Context) -> (Image, vk::ImageView) {
    let extent = vk::Extent2D {
        width: 1280,
        height: 720,
    };
    let image = ctx
        .create_image(&ImageDesc {
            name: "bench depth",
            extent,
            format: vk::Format::D32_SFLOAT,
            mip_levels: 1,
            usage: vk::ImageUsageFlags::SAMPLED | vk::ImageUsageFlags::TRANSFER_DST,
            category: Category::Other,
        })
        .expect("depth image");
    let range = vk::ImageSubresourceRange {
        aspect_mask: vk::ImageAspectFlags::DEPTH,
        base_mip_level: 0,
        level_count: 1,
        base_array_layer: 0,
        layer_count: 1,
    };
    let info = vk::ImageViewCreateInfo::default()
        .image(image.raw())
        .view_type(vk::ImageViewType::TYPE_2D)
        .format(vk::Format::D32_SFLOAT)
        .subresource_range(range);
    // SAFETY: a live 2D depth image with SAMPLED usage, one level and layer.
    let view = unsafe { ctx.device().create_image_view(&info, None) }.expect("view");
    let texels: Vec<f32> = (0..extent.width * extent.height)
        .map(|i| if i / extent.width > 360 { 0.2 } else { 1.0 })
        .collect();
    let mut staging = ctx
        .create_buffer(&BufferDesc {
            name: "bench depth staging",
            size: texels.len() as u64 * 4,
            usage: vk::BufferUsageFlags::TRANSFER_SRC,
            location: MemoryLocation::CpuToGpu,
            category: Category::Staging,
        })
        .expect("staging");
    staging
        .mapped_mut()
        .expect("mapped")
        .copy_from_slice(bytemuck::cast_slice(&texels));
    ctx.submit_and_wait(|frame, cmd| {
        image.used_in(frame)?;
        staging.used_in(frame)?;
        let d = ctx.device();
        let barrier = |from, to, src, dst| {
            understory::gpu::compute::image_barrier(image.raw(), range, (from, src), (to, dst))
        };
        // SAFETY: recording for `frame`, outside a render pass; both objects are marked used.
        unsafe {
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::TOP_OF_PIPE,
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
            d.cmd_copy_buffer_to_image(
                cmd,
                staging.raw(),
                image.raw(),
                vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                &[vk::BufferImageCopy::default()
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
                    })],
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
        Ok(())
    })
    .expect("depth upload");
    (image, view)
}

fn gpu_buffer(ctx: &Context, name: &str, bytes: u64, usage: vk::BufferUsageFlags) -> Buffer {
    ctx.create_buffer(&BufferDesc {
        name,
        size: bytes,
        usage: usage | vk::BufferUsageFlags::TRANSFER_DST,
        location: MemoryLocation::GpuOnly,
        category: Category::Instances,
    })
    .expect("buffer")
}

/// A device-local storage buffer holding `bytes` (instance records).
fn instance_buffer(ctx: &Context, bytes: &[u8]) -> Buffer {
    let instances = gpu_buffer(
        ctx,
        "bench instances",
        bytes.len() as u64,
        vk::BufferUsageFlags::STORAGE_BUFFER,
    );
    upload(ctx, &instances, bytes);
    instances
}

/// Uploads through a 64 MiB staging buffer.
fn upload(ctx: &Context, dst: &Buffer, data: &[u8]) {
    const CHUNK: usize = 64 << 20;
    let mut staging = ctx
        .create_buffer(&BufferDesc {
            name: "bench staging",
            size: CHUNK.min(data.len()).max(4) as u64,
            usage: vk::BufferUsageFlags::TRANSFER_SRC,
            location: MemoryLocation::CpuToGpu,
            category: Category::Staging,
        })
        .expect("staging");
    for (k, chunk) in data.chunks(CHUNK).enumerate() {
        staging.mapped_mut().expect("mapped")[..chunk.len()].copy_from_slice(chunk);
        ctx.submit_and_wait(|frame, cmd| {
            let region = vk::BufferCopy {
                src_offset: 0,
                dst_offset: (k * CHUNK) as u64,
                size: chunk.len() as u64,
            };
            staging.used_in(frame)?;
            dst.used_in(frame)?;
            // SAFETY: recording for `frame`; both buffers are marked used by it.
            unsafe {
                ctx.device()
                    .cmd_copy_buffer(cmd, staging.raw(), dst.raw(), &[region])
            };
            Ok(())
        })
        .expect("upload");
    }
}

/// Copies of [`WARM_BYTES`] that [`time_gpu`] records before what it times, in the same
/// submission: about 100 ms of work on an H200 (32 µs each), so the GPU runs at the clock it
/// keeps under load. Without it, a GPU left idle for a few seconds (the host sorting 16M
/// instances) dropped its clock from 1,980 to 345 MHz and the short timed submissions did not
/// raise it again: every kernel, the copy yardstick too, took 2.5× as long. Repeating the timed
/// work for 300 ms of wall time first did not help (short submissions with waits between them).
const WARM_COPIES: u32 = 3000;
const WARM_BYTES: u64 = 64 << 20;

/// What the warm-up copies with (made by [`warm_up_begin`], dropped by [`warm_up_end`] before
/// the context shuts down; none on a CPU driver).
struct Warm {
    copy: ComputePipeline,
    src: Buffer,
    dst: Buffer,
}

thread_local! {
    static WARM: std::cell::RefCell<Option<Warm>> = const { std::cell::RefCell::new(None) };
}

fn warm_up_begin(ctx: &Context) {
    if ctx.adapter().device_type == understory::gpu::adapter::DeviceType::Cpu {
        return;
    }
    // SAFETY: as `copy` in main (copy_vec4.wgsl: two storage buffers, 16 bytes of push
    // constants); `record_warm_up` keeps its dispatches within the buffers.
    let copy = unsafe {
        ComputePipeline::new(
            ctx,
            &ComputePipelineDesc {
                name: "warm-up copy",
                spirv: shaders::COPY_VEC4,
                entry: c"main",
                storage_buffers: 2,
                push_constant_bytes: 16,
            },
        )
    }
    .expect("warm-up pipeline");
    let usage = vk::BufferUsageFlags::STORAGE_BUFFER;
    let (src, dst) = (
        instance_buffer(ctx, &vec![0x5a; WARM_BYTES as usize]),
        gpu_buffer(ctx, "warm-up dst", WARM_BYTES, usage),
    );
    WARM.with(|w| *w.borrow_mut() = Some(Warm { copy, src, dst }));
}

fn warm_up_end() {
    WARM.with(|w| w.borrow_mut().take());
}

/// Records the warm-up copies (if any) and a barrier after them, so the timed work starts
/// after them.
/// # Safety
/// `cmd` is recording for `frame`, outside a render pass.
unsafe fn record_warm_up(ctx: &Context, frame: &Frame, cmd: vk::CommandBuffer) {
    WARM.with(|w| {
        let Some(w) = &*w.borrow() else {
            return;
        };
        let vec4s = (WARM_BYTES / 16) as u32;
        let groups = vec4s.div_ceil(256);
        let pc: [u32; 4] = [vec4s, 0, 0, groups * 256];
        let all = vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::MEMORY_WRITE)
            .dst_access_mask(vk::AccessFlags::MEMORY_READ | vk::AccessFlags::MEMORY_WRITE);
        for _ in 0..WARM_COPIES {
            // SAFETY: `vec4s` vec4s in buffers of WARM_BYTES; one row of groups (16,384 of
            // 65,535); the barrier orders each copy after the last (write after write).
            unsafe {
                w.copy
                    .record_dispatch(
                        frame,
                        cmd,
                        &[&w.src, &w.dst],
                        bytemuck::cast_slice(&pc),
                        [groups, 1, 1],
                    )
                    .expect("warm-up copy");
                ctx.device().cmd_pipeline_barrier(
                    cmd,
                    vk::PipelineStageFlags::ALL_COMMANDS,
                    vk::PipelineStageFlags::ALL_COMMANDS,
                    vk::DependencyFlags::empty(),
                    &[all],
                    &[],
                    &[],
                );
            }
        }
    });
}

/// Records `body` REPEATS times between timestamp pairs, returns the median in microseconds.
fn time_gpu(ctx: &Context, mut body: impl FnMut(&Frame, vk::CommandBuffer)) -> f64 {
    let d = ctx.device();
    let info = vk::QueryPoolCreateInfo::default()
        .query_type(vk::QueryType::TIMESTAMP)
        .query_count(REPEATS * 2);
    // SAFETY: valid create info.
    let pool = unsafe { d.create_query_pool(&info, None) }.expect("query pool");
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: recording; the pool lives until after the wait; queries reset before use.
        unsafe {
            record_warm_up(ctx, frame, cmd);
            d.cmd_reset_query_pool(cmd, pool, 0, REPEATS * 2);
            for r in 0..REPEATS {
                d.cmd_write_timestamp(cmd, vk::PipelineStageFlags::TOP_OF_PIPE, pool, r * 2);
                body(frame, cmd);
                d.cmd_write_timestamp(cmd, vk::PipelineStageFlags::BOTTOM_OF_PIPE, pool, r * 2 + 1);
            }
        }
        Ok(())
    })
    .expect("timed submit");
    let mut ticks = vec![0u64; (REPEATS * 2) as usize];
    // SAFETY: the submission completed; WAIT makes the results available.
    unsafe {
        d.get_query_pool_results(
            pool,
            0,
            &mut ticks,
            vk::QueryResultFlags::TYPE_64 | vk::QueryResultFlags::WAIT,
        )
        .expect("query results");
        d.destroy_query_pool(pool, None);
    }
    let period = f64::from(ctx.adapter().timestamp_period_ns);
    let mut us: Vec<f64> = ticks
        .chunks(2)
        .map(|p| p[1].wrapping_sub(p[0]) as f64 * period / 1000.0)
        .collect();
    us.sort_by(f64::total_cmp);
    us[us.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // cargo test --benches asks; there is nothing for it to list
    }
    let options = ContextOptions {
        instance: InstanceOptions {
            validation: Validation::Off,
            ..Default::default()
        },
        memory: MemoryConfig {
            cap_bytes: PerCategory([u64::MAX; CATEGORIES]),
            ..Default::default()
        },
        ..Default::default()
    };
    let ctx = match options.with_env().and_then(|o| Context::new(&o)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("*** SKIPPED cull bench: {e} ***");
            return;
        }
    };
    let a = ctx.adapter().clone();
    println!(
        "cull bench on {} ({}), subgroup size {}",
        a.name, a.driver, a.subgroup_size
    );
    let cpu = a.device_type == understory::gpu::adapter::DeviceType::Cpu;
    let millions: Vec<usize> = std::env::var("UNDERSTORY_CULL_BENCH_MILLIONS")
        .ok()
        .map(|v| v.split(',').filter_map(|m| m.trim().parse().ok()).collect())
        .unwrap_or_else(|| if cpu { vec![1] } else { vec![1, 4, 16] });
    let view = view();
    let tiles = std::env::var("UNDERSTORY_CULL_BENCH_ORDER").is_ok_and(|v| v == "tiles");
    // SAFETY: understory's own shaders (naga-validated at build time), entry point `main`,
    // set 0 bindings 0..2 storage buffers and a 16-byte push-constant block (ProbePush), as
    // shaders/copy_vec4.wgsl and shaders/read_probe.wgsl declare; the dispatches below keep
    // `count` (and `base * count`) within the buffers bound.
    let copy = unsafe {
        ComputePipeline::new(
            &ctx,
            &ComputePipelineDesc {
                name: "copy_vec4",
                spirv: shaders::COPY_VEC4,
                entry: c"main",
                storage_buffers: 2,
                push_constant_bytes: 16,
            },
        )
    }
    .expect("copy pipeline");
    warm_up_begin(&ctx);
    // SAFETY: as above.
    let probe = unsafe {
        ComputePipeline::new(
            &ctx,
            &ComputePipelineDesc {
                name: "read_probe",
                spirv: shaders::READ_PROBE,
                entry: c"main",
                storage_buffers: 2,
                push_constant_bytes: 16,
            },
        )
    }
    .expect("probe pipeline");
    let mut variants = vec![Compaction::Atomic];
    if a.subgroup_ballot_arithmetic_in_compute {
        variants.push(Compaction::Subgroup);
    }
    // `UNDERSTORY_CULL_BENCH_ONLY=occlusion`: the occlusion rows alone (their timings depend on
    // the GPU's clock state, which the sections before them change).
    if std::env::var("UNDERSTORY_CULL_BENCH_ONLY").is_ok_and(|v| v == "occlusion") {
        let spread: &[usize] = if cpu { &[1] } else { &[1, 4] };
        occlusion_rows(&ctx, &variants, spread);
        drop((copy, probe));
        warm_up_end();
        let report = ctx.shutdown().expect("shutdown");
        assert!(report.leaks.is_empty(), "leaks: {:?}", report.leaks);
        return;
    }
    // What a pass costs whatever it reads: its resets, barriers and finalize around a dispatch
    // over 1,024 instances.
    {
        let scene = forest(1024, 5);
        let bytes: &[u8] = bytemuck::cast_slice(&scene);
        let instances = instance_buffer(&ctx, bytes);
        let src = [CullSource {
            buffer: &instances,
            count: 1024,
            base: 0,
        }];
        for &variant in &variants {
            let mut pass = fixed_pass(&ctx, variant, 1024, WIDE_SOURCES_PER_DISPATCH);
            let us = time_gpu(&ctx, |frame, cmd| {
                // SAFETY: recording for `frame`; the pass marks what it reads.
                unsafe { pass.record(frame, cmd, &src, &view).expect("record") };
            });
            println!(
                "{:>9} fixed cost of a pass (1,024 instances): {us:.1} us",
                format!("{variant:?}").to_lowercase()
            );
        }
        drop(instances);
        ctx.collect().expect("collect");
    }
    let only_spread = std::env::var("UNDERSTORY_CULL_BENCH_ONLY").is_ok_and(|v| v == "spread");
    if !only_spread {
        println!(
            "\ninstances {}",
            if tiles {
                "stored tile by tile (64 m tiles, as the world's patches hold them)"
            } else {
                "in random order"
            }
        );
        println!(
            "\n{:>6} {:>9} {:>10} {:>12} {:>10} {:>10} {:>12} {:>10} {:>6}",
            "N", "variant", "visible", "time us", "inst/ms", "B/inst", "GB/s", "floor us", "x"
        );
    }
    for &m in millions.iter().filter(|_| !only_spread) {
        let n = m * 1_000_000;
        let scene = forest(n, 42 + m as u64);
        let scene = if tiles { tile_ordered(&scene) } else { scene };
        let bytes: &[u8] = bytemuck::cast_slice(&scene);
        let instances = instance_buffer(&ctx, bytes);
        // Streaming yardstick: vec4 copy of the instances' bytes (written first: a buffer never
        // written copied at 1,705 GB/s in one 16M run, at 4,200 in the others).
        let src = instance_buffer(&ctx, bytes);
        let dst = gpu_buffer(
            &ctx,
            "copy dst",
            bytes.len() as u64,
            vk::BufferUsageFlags::STORAGE_BUFFER,
        );
        let vec4s = (bytes.len() / 16) as u32;
        let groups = vec4s.div_ceil(256);
        let gx = groups.min(65_535);
        let gy = groups.div_ceil(gx);
        let pc: [u32; 4] = [vec4s, 0, 0, gx * 256];
        let copy_us = time_gpu(&ctx, |frame, cmd| {
            // SAFETY: recording for `frame`; the dispatch marks the buffers used by it.
            unsafe {
                copy.record_dispatch(
                    frame,
                    cmd,
                    &[&src, &dst],
                    bytemuck::cast_slice(&pc),
                    [gx, gy, 1],
                )
                .expect("copy");
                let b = [vk::MemoryBarrier::default()
                    .src_access_mask(vk::AccessFlags::SHADER_WRITE)
                    .dst_access_mask(vk::AccessFlags::SHADER_WRITE)];
                ctx.device().cmd_pipeline_barrier(
                    cmd,
                    vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::PipelineStageFlags::COMPUTE_SHADER,
                    vk::DependencyFlags::empty(),
                    &b,
                    &[],
                    &[],
                );
            }
        });
        let copy_gbs = 2.0 * bytes.len() as f64 / (copy_us * 1e3);
        // Read-only yardsticks over the instance buffer: the cull's pattern (first 16 bytes of
        // every 32-byte record) and a dense read of every byte.
        let mut read_us = [0.0; 2];
        for (k, stride) in [2u32, 1].into_iter().enumerate() {
            let threads = (bytes.len() / 16) as u32 / stride;
            let groups = threads.div_ceil(256);
            let gx = groups.min(65_535);
            let gy = groups.div_ceil(gx);
            let pc: [u32; 4] = [threads, stride, 0, gx * 256];
            read_us[k] = time_gpu(&ctx, |frame, cmd| {
                // SAFETY: recording for `frame`; the dispatch marks the buffers used by it.
                unsafe {
                    probe
                        .record_dispatch(
                            frame,
                            cmd,
                            &[&instances, &dst],
                            bytemuck::cast_slice(&pc),
                            [gx, gy, 1],
                        )
                        .expect("probe");
                }
            });
        }
        let expect = cull_cpu(&[(&scene, 0)], &view);
        let visible: usize = expect.lists.iter().map(Vec::len).sum();
        let cull_bytes = bytes.len() as f64 + visible as f64 * 4.0;
        let floor_us = cull_bytes / (copy_gbs * 1e3);
        for &variant in &variants {
            let mut pass = fixed_pass(&ctx, variant, n, WIDE_SOURCES_PER_DISPATCH);
            let src = [CullSource {
                buffer: &instances,
                count: n as u32,
                base: 0,
            }];
            let us = time_gpu(&ctx, |frame, cmd| {
                // SAFETY: recording for `frame`; the pass marks what it reads.
                unsafe { pass.record(frame, cmd, &src, &view).expect("record") };
            });
            println!(
                "{:>5}M {:>9} {:>9.1}% {:>12.1} {:>10.0} {:>10.2} {:>12.1} {:>10.1} {:>6.2}",
                m,
                format!("{variant:?}").to_lowercase(),
                100.0 * visible as f64 / n as f64,
                us,
                n as f64 / (us / 1000.0),
                cull_bytes / n as f64,
                cull_bytes / (us * 1e3),
                floor_us,
                us / floor_us
            );
            // The camera and four cascades in one read of each instance.
            let mut five = views_pass(&ctx, variant, n, WIDE_SOURCES_PER_DISPATCH, MAX_VIEWS);
            five.set_cascades(&cascades()).expect("cascades");
            let us5 = time_gpu(&ctx, |frame, cmd| {
                // SAFETY: recording for `frame`; the pass marks what it reads.
                unsafe { five.record(frame, cmd, &src, &view).expect("record") };
            });
            five.set_cascades(&near_cascades()).expect("cascades");
            let us5n = time_gpu(&ctx, |frame, cmd| {
                // SAFETY: as above.
                unsafe { five.record(frame, cmd, &src, &view).expect("record") };
            });
            println!(
                "{:>6} {:>9} camera + 4 cascades in one pass: {:.1} us ({:.2}x one view); billboards in the 2 nearest only: {:.1} us ({:.2}x)",
                "",
                "",
                us5,
                us5 / us,
                us5n,
                us5n / us
            );
        }
        println!(
            "{:>6} vec4 copy of {} MiB: {:.1} us, {:.0} GB/s (read + write); read-only: cull pattern {:.1} us ({:.0} GB/s of records), dense {:.1} us ({:.0} GB/s)",
            "",
            bytes.len() >> 20,
            copy_us,
            copy_gbs,
            read_us[0],
            bytes.len() as f64 / (read_us[0] * 1e3),
            read_us[1],
            bytes.len() as f64 / (read_us[1] * 1e3)
        );
        drop((instances, src, dst));
        ctx.collect().expect("collect");
    }
    // `UNDERSTORY_CULL_BENCH_ONLY=single`: the table above alone.
    if std::env::var("UNDERSTORY_CULL_BENCH_ONLY").is_ok_and(|v| v == "single") {
        drop((copy, probe));
        warm_up_end();
        let report = ctx.shutdown().expect("shutdown");
        assert!(report.leaks.is_empty(), "leaks: {:?}", report.leaks);
        return;
    }
    // One source against sources of `patch` instances each (UNDERSTORY_CULL_BENCH_PATCH, 1024
    // unless set): the price of many allocations.
    let patch: usize = std::env::var("UNDERSTORY_CULL_BENCH_PATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&p| p > 0)
        .unwrap_or(1024);
    println!(
        "\none buffer vs buffers of {patch} instances each (wide: up to {WIDE_SOURCES_PER_DISPATCH} buffers a dispatch; narrow: {SOURCES_PER_DISPATCH}; no barrier between the dispatches of one pass):"
    );
    let spread_millions: &[usize] = if only_spread {
        &millions
    } else if cpu {
        &[1]
    } else {
        &[1, 4, 16]
    };
    for &millions in spread_millions {
        let n = millions << 20;
        let scene = forest(n, 7);
        let one = gpu_buffer(
            &ctx,
            "one source",
            (scene.len() * 32) as u64,
            vk::BufferUsageFlags::STORAGE_BUFFER,
        );
        upload(&ctx, &one, bytemuck::cast_slice(&scene));
        let many: Vec<Buffer> = scene
            .chunks(patch)
            .map(|c| {
                let b = gpu_buffer(
                    &ctx,
                    "tile source",
                    (c.len() * 32) as u64,
                    vk::BufferUsageFlags::STORAGE_BUFFER,
                );
                upload(&ctx, &b, bytemuck::cast_slice(c));
                b
            })
            .collect();
        let single = [CullSource {
            buffer: &one,
            count: n as u32,
            base: 0,
        }];
        let spread: Vec<CullSource> = many
            .iter()
            .enumerate()
            .map(|(i, b)| CullSource {
                buffer: b,
                count: patch.min(n - i * patch) as u32,
                base: (i * patch) as u32,
            })
            .collect();
        for &variant in &variants {
            let mut widths = Vec::new();
            for max in [WIDE_SOURCES_PER_DISPATCH, SOURCES_PER_DISPATCH] {
                let mut pass = fixed_pass(&ctx, variant, n, max);
                let width = pass.sources_per_dispatch();
                if widths.contains(&width) {
                    continue;
                }
                widths.push(width);
                // Untimed once first: a new pass's lists are touched for the first time.
                time_gpu(&ctx, |frame, cmd| {
                    // SAFETY: recording for `frame`; the pass marks what it reads.
                    unsafe { pass.record(frame, cmd, &single, &view).expect("record") };
                });
                let t1 = time_gpu(&ctx, |frame, cmd| {
                    // SAFETY: recording for `frame`; the pass marks what it reads.
                    unsafe { pass.record(frame, cmd, &single, &view).expect("record") };
                });
                let t2 = time_gpu(&ctx, |frame, cmd| {
                    // SAFETY: as above.
                    unsafe { pass.record(frame, cmd, &spread, &view).expect("record") };
                });
                println!(
                    "  {:>2}M {:>9} x{:<5}: one buffer {:.1} us, {} buffers {:.1} us ({:.2}x)",
                    millions,
                    format!("{variant:?}").to_lowercase(),
                    width,
                    t1,
                    many.len(),
                    t2,
                    t2 / t1
                );
            }
        }
        drop((one, many));
        ctx.collect().expect("collect");
    }
    // `UNDERSTORY_CULL_BENCH_ONLY=spread`: the table above alone.
    if !only_spread {
        occlusion_rows(
            &ctx,
            &variants,
            &spread_millions[..spread_millions.len().min(2)],
        );
    }
    drop((copy, probe));
    warm_up_end();
    let report = ctx.shutdown().expect("shutdown");
    assert!(report.leaks.is_empty(), "leaks: {:?}", report.leaks);
}

/// Two-phase occlusion culling of `millions` × 2^20 instances in buffers of 1024 (as tiles hold
/// them), after one untimed frame set the visibility bits: the single pass, the first phase,
/// the pyramid of a 1280×720 depth image, the second phase, and all three together.
fn occlusion_rows(ctx: &Context, variants: &[Compaction], millions: &[usize]) {
    let (depth, depth_view) = depth_wall(ctx);
    let pyramid = DepthPyramid::new(
        ctx,
        vk::Extent2D {
            width: 1280,
            height: 720,
        },
    )
    .expect("pyramid");
    let (_, vp) = view_proj();
    let view = view();
    let bounds = InstanceBounds::sphere(2.0);
    let layout = vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL;
    println!(
        "\ntwo-phase occlusion, 1280x720 depth (lower half a near wall), buffers of 1024 instances:"
    );
    for &m in millions {
        let n = m << 20;
        let scene = forest(n, 7);
        let many: Vec<Buffer> = scene
            .chunks(1024)
            .map(|c| {
                let b = gpu_buffer(
                    ctx,
                    "tile source",
                    1024 * 32,
                    vk::BufferUsageFlags::STORAGE_BUFFER,
                );
                upload(ctx, &b, bytemuck::cast_slice(c));
                b
            })
            .collect();
        let sources: Vec<CullSource> = many
            .iter()
            .enumerate()
            .map(|(i, b)| CullSource {
                buffer: b,
                count: 1024,
                base: (i * 1024) as u32,
            })
            .collect();
        for &variant in variants {
            let mut pass = fixed_pass(ctx, variant, n, WIDE_SOURCES_PER_DISPATCH);
            let both = |frame: &Frame, cmd: vk::CommandBuffer, pass: &mut CullPass| {
                // SAFETY: recording for `frame`; the passes mark what they read; the depth
                // image was uploaded and made readable by compute before.
                unsafe {
                    depth.used_in(frame).expect("depth");
                    pass.record_first(frame, cmd, &sources, &view)
                        .expect("first");
                    pyramid
                        .record(frame, cmd, depth_view, layout)
                        .expect("pyramid");
                    pass.record_second(frame, cmd, &pyramid, vp, &bounds)
                        .expect("second");
                }
            };
            time_gpu(ctx, |frame, cmd| both(frame, cmd, &mut pass));
            let single = time_gpu(ctx, |frame, cmd| {
                // SAFETY: as above.
                unsafe { pass.record(frame, cmd, &sources, &view).expect("record") };
            });
            let first = time_gpu(ctx, |frame, cmd| {
                // SAFETY: as above.
                unsafe {
                    pass.record_first(frame, cmd, &sources, &view)
                        .expect("first")
                };
            });
            let build = time_gpu(ctx, |frame, cmd| {
                // SAFETY: as above.
                unsafe {
                    depth.used_in(frame).expect("depth");
                    pyramid
                        .record(frame, cmd, depth_view, layout)
                        .expect("pyramid");
                }
            });
            let total = time_gpu(ctx, |frame, cmd| both(frame, cmd, &mut pass));
            println!(
                "  {:>2}M {:>9}: single pass {:.1} us; first phase {:.1} us, pyramid {:.1} us, first + pyramid + second {:.1} us ({:.2}x the single pass)",
                m,
                format!("{variant:?}").to_lowercase(),
                single,
                first,
                build,
                total,
                total / single
            );
        }
        drop(many);
        ctx.collect().expect("collect");
    }
    drop(pyramid);
    // SAFETY: every submission that used the view completed (submit_and_wait).
    unsafe { ctx.device().destroy_image_view(depth_view, None) };
    drop(depth);
}
