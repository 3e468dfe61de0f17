//! The GPU cull pass against its CPU reference, on the real driver under (synchronization)
//! validation: random scenes, instances exactly on band edges and frustum planes, NaNs, empty
//! input, overflow, many sources, both compaction variants.

mod common;

use ash::vk;
use glam::{Mat4, Vec3};
use understory::gpu::context::{Context, Frame};
use understory::gpu::cull::{
    COUNTERS, CascadeView, Compaction, CullDesc, CullPass, CullSource, CullView,
    DrawIndexedIndirect, LIST_GUARD_WORDS, MAX_VIEWS, SOURCES_PER_DISPATCH,
    WIDE_SOURCES_PER_DISPATCH, cull_cpu, cull_views_cpu,
};
use understory::gpu::memory::{Buffer, BufferDesc, MemoryLocation};
use understory::policy::category::Category;
use understory::policy::lod::{Lod, LodBands};
use understory::world::instance::Instance;

const MESHES: [DrawIndexedIndirect; 3] = [
    DrawIndexedIndirect {
        index_count: 900,
        instance_count: 0,
        first_index: 0,
        vertex_offset: 0,
        first_instance: 0,
    },
    DrawIndexedIndirect {
        index_count: 240,
        instance_count: 0,
        first_index: 900,
        vertex_offset: 400,
        first_instance: 0,
    },
    DrawIndexedIndirect {
        index_count: 6,
        instance_count: 0,
        first_index: 1140,
        vertex_offset: 520,
        first_instance: 0,
    },
];

fn upload(ctx: &Context, instances: &[Instance]) -> Buffer {
    let bytes: &[u8] = bytemuck::cast_slice(instances);
    let mut b = ctx
        .create_buffer(&BufferDesc {
            name: "cull test instances",
            size: bytes.len().max(32) as u64,
            usage: vk::BufferUsageFlags::STORAGE_BUFFER,
            location: MemoryLocation::CpuToGpu,
            category: Category::Instances,
        })
        .unwrap();
    b.mapped_mut().unwrap()[..bytes.len()].copy_from_slice(bytes);
    b
}

struct Readback {
    caps: [u32; 3],
    lists: [Vec<u32>; 3],
    counters: [u32; COUNTERS],
    args: [DrawIndexedIndirect; 3],
    guard_intact: bool,
}

/// Sources numbered consecutively with `gap` unused indices between them (bases are the
/// caller's numbering), and the same as (instances, base) for the CPU reference.
fn numbered<'a>(
    parts: &[(&'a Buffer, &'a [Instance])],
    gap: u32,
) -> (Vec<CullSource<'a>>, Vec<(&'a [Instance], u32)>) {
    let mut base = 0u32;
    let mut sources = vec![];
    let mut cpu = vec![];
    for (buffer, instances) in parts {
        let count = instances.len() as u32;
        sources.push(CullSource {
            buffer,
            count,
            base,
        });
        cpu.push((*instances, base));
        base += count + gap;
    }
    (sources, cpu)
}

/// A pass whose lists keep `capacity` entries each.
fn fixed(ctx: &Context, compaction: Compaction, capacity: u32, records: bool) -> CullPass {
    CullPass::from_desc(
        ctx,
        &CullDesc {
            compaction,
            capacity,
            meshes: MESHES,
            records,
            adaptive: false,
            max_sources_per_dispatch: SOURCES_PER_DISPATCH,
            views: 1,
        },
    )
    .unwrap()
}

/// Drops the test's instance buffers and checks the context is clean.
fn finish(ctx: Context, bufs: Vec<Buffer>, what: &str) {
    drop(bufs);
    common::finish(ctx, what);
}

/// A pass of each compaction the device has, each with every width of the descriptor array of
/// sources the device allows (the wide one where it has that many bindings) and with one
/// source per dispatch (the variant for devices with few storage-buffer bindings).
fn passes(ctx: &Context, capacity: u32, records: bool) -> Vec<(String, CullPass)> {
    let mut out: Vec<(String, CullPass)> = Vec::new();
    for compaction in variants(ctx) {
        for max_sources_per_dispatch in [WIDE_SOURCES_PER_DISPATCH, SOURCES_PER_DISPATCH, 1] {
            let pass = CullPass::from_desc(
                ctx,
                &CullDesc {
                    compaction,
                    capacity,
                    meshes: MESHES,
                    records,
                    adaptive: false,
                    max_sources_per_dispatch,
                    views: 1,
                },
            )
            .unwrap();
            let name = format!("{compaction:?} x{}", pass.sources_per_dispatch());
            if out.iter().all(|(n, _)| *n != name) {
                out.push((name, pass));
            }
        }
    }
    out
}

/// Records copies of `(source, offset in read, bytes)` into `read` and the barrier that makes
/// them visible to the host, marking every buffer used by `frame`.
///
/// # Safety
/// `cmd` must be recording for `frame`, outside a render pass; every range must fit.
unsafe fn copy_to_host(
    ctx: &Context,
    frame: &Frame,
    cmd: vk::CommandBuffer,
    read: &Buffer,
    parts: &[(&Buffer, u64, u64)],
) {
    let d = ctx.device();
    read.used_in(frame).unwrap();
    // SAFETY: as the caller vouched; every buffer is marked used by `frame`.
    unsafe {
        for (src, at, size) in parts {
            src.used_in(frame).unwrap();
            let region = vk::BufferCopy {
                src_offset: 0,
                dst_offset: *at,
                size: *size,
            };
            d.cmd_copy_buffer(cmd, src.raw(), read.raw(), &[region]);
        }
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
}

/// Runs the pass over `sources` and reads everything back.
fn run(
    ctx: &Context,
    pass: &mut CullPass,
    sources: &[CullSource<'_>],
    view: &CullView,
) -> Readback {
    run_after(ctx, pass, &[], sources, view)
}

/// As [`run`], after the pass was recorded with `earlier` into the same command buffer (when
/// not empty): the result is `sources`' alone.
fn run_after(
    ctx: &Context,
    pass: &mut CullPass,
    earlier: &[CullSource<'_>],
    sources: &[CullSource<'_>],
    view: &CullView,
) -> Readback {
    let caps = pass.capacities();
    let bases = pass.list_bases();
    let entries: u64 = caps.iter().map(|c| u64::from(*c)).sum();
    let list_bytes = (entries + LIST_GUARD_WORDS) * 4;
    let counter_bytes = COUNTERS as u64 * 4;
    let args_bytes = size_of::<[DrawIndexedIndirect; 3]>() as u64;
    let read = ctx
        .create_buffer(&BufferDesc {
            name: "cull readback",
            size: list_bytes + counter_bytes + args_bytes,
            usage: vk::BufferUsageFlags::TRANSFER_DST,
            location: MemoryLocation::GpuToCpu,
            category: Category::Other,
        })
        .unwrap();
    let lists = pass.lists().unwrap().raw();
    ctx.submit_and_wait(|frame, cmd| {
        let d = ctx.device();
        pass.lists()?.used_in(frame)?;
        // SAFETY: cmd is recording for `frame`; the guard words are set before the pass
        // runs.
        unsafe {
            d.cmd_fill_buffer(cmd, lists, 0, vk::WHOLE_SIZE, 0xDEAD_BEEF);
            let b = [vk::MemoryBarrier::default()
                .src_access_mask(vk::AccessFlags::TRANSFER_WRITE)
                .dst_access_mask(vk::AccessFlags::TRANSFER_WRITE | vk::AccessFlags::SHADER_WRITE)];
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::TRANSFER,
                vk::PipelineStageFlags::TRANSFER | vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::DependencyFlags::empty(),
                &b,
                &[],
                &[],
            );
            if !earlier.is_empty() {
                pass.record(frame, cmd, earlier, view)?;
            }
            pass.record(frame, cmd, sources, view)?;
            copy_to_host(
                ctx,
                frame,
                cmd,
                &read,
                &[
                    (pass.lists()?, 0, list_bytes),
                    (pass.counters()?, list_bytes, counter_bytes),
                    (pass.args()?, list_bytes + counter_bytes, args_bytes),
                ],
            );
        }
        Ok(())
    })
    .unwrap();
    let bytes = read.mapped().unwrap();
    let words: &[u32] = bytemuck::cast_slice(&bytes[..list_bytes as usize]);
    let counters: [u32; COUNTERS] = bytemuck::pod_read_unaligned(
        &bytes[list_bytes as usize..(list_bytes + counter_bytes) as usize],
    );
    let args: [DrawIndexedIndirect; 3] =
        bytemuck::pod_read_unaligned(&bytes[(list_bytes + counter_bytes) as usize..]);
    let mut out: [Vec<u32>; 3] = Default::default();
    for (l, list) in out.iter_mut().enumerate() {
        let n = args[l].instance_count as usize;
        let start = bases[l] as usize;
        *list = words[start..start + n].to_vec();
        list.sort_unstable();
    }
    let guard_intact = words[entries as usize..].iter().all(|w| *w == 0xDEAD_BEEF);
    drop(bytes);
    drop(read);
    Readback {
        lists: out,
        counters,
        args,
        guard_intact,
        caps,
    }
}

fn xorshift(s: &mut u64) -> f32 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    (*s >> 40) as f32 / (1u64 << 24) as f32
}

fn random_scene(n: usize, seed: u64) -> Vec<Instance> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| Instance {
            scale: 0.2 + 2.0 * xorshift(&mut s),
            ..Instance::at(Vec3::new(
                (xorshift(&mut s) - 0.5) * 1000.0,
                (xorshift(&mut s) - 0.5) * 60.0,
                (xorshift(&mut s) - 0.5) * 1000.0,
            ))
        })
        .collect()
}

fn perspective(eye: Vec3, yaw: f32, quality: f32) -> CullView {
    let dir = Vec3::new(yaw.sin(), -0.1, -yaw.cos());
    let view = Mat4::look_at_rh(eye, eye + dir, Vec3::Y);
    let proj = Mat4::perspective_rh(70f32.to_radians(), 16.0 / 9.0, 0.5, 2000.0);
    CullView::new(proj * view, eye, 1.5, &LodBands::default(), quality).unwrap()
}

fn variants(ctx: &Context) -> Vec<Compaction> {
    let mut v = vec![Compaction::Atomic];
    if ctx.adapter().subgroup_ballot_arithmetic_in_compute {
        v.push(Compaction::Subgroup);
    } else {
        common::skip(
            "subgroup variant",
            "no subgroup vote, ballot, arithmetic and shuffle in compute on this device",
        );
    }
    v
}

fn check(rb: &Readback, want: &understory::gpu::cull::CullExpectation, what: &str) {
    assert!(rb.guard_intact, "{what}: wrote past the lists");
    for (l, mesh) in MESHES.iter().enumerate() {
        let cap = rb.caps[l];
        let total = want.lists[l].len() as u32;
        assert_eq!(rb.counters[l], total, "{what}: LOD {l} appended");
        assert_eq!(
            rb.args[l].instance_count,
            total.min(cap),
            "{what}: LOD {l} indirect count"
        );
        assert_eq!(
            rb.counters[4 + l],
            total.saturating_sub(cap),
            "{what}: LOD {l} overflow"
        );
        assert_eq!(
            rb.args[l].first_instance, 0,
            "drawIndirectFirstInstance is not needed"
        );
        assert_eq!(rb.args[l].index_count, mesh.index_count);
        assert_eq!(rb.args[l].first_index, mesh.first_index);
        assert_eq!(rb.args[l].vertex_offset, mesh.vertex_offset);
        if total <= cap {
            assert_eq!(rb.lists[l], want.lists[l], "{what}: LOD {l} set");
        } else {
            let mut dedup = rb.lists[l].clone();
            dedup.dedup();
            assert_eq!(dedup.len(), rb.lists[l].len(), "{what}: no duplicates");
            assert!(
                rb.lists[l]
                    .iter()
                    .all(|i| want.lists[l].binary_search(i).is_ok()),
                "{what}: subset"
            );
        }
    }
    assert_eq!(rb.counters[3], want.invalid, "{what}: invalid count");
}

#[test]
fn random_scenes_match_the_cpu_reference() {
    let Some(ctx) = common::context("random_scenes_match") else {
        return;
    };
    let scene = random_scene(100_000, 7);
    let buf = upload(&ctx, &scene);
    for (name, mut pass) in passes(&ctx, 200_000, false) {
        for (k, (eye, yaw, quality)) in [
            (Vec3::new(0.0, 20.0, 0.0), 0.0, 1.0),
            (Vec3::new(100.0, 5.0, -50.0), 2.0, 0.6),
            (Vec3::new(-300.0, 40.0, 200.0), -1.0, 1.3),
        ]
        .into_iter()
        .enumerate()
        {
            let view = perspective(eye, yaw, quality);
            let rb = run(
                &ctx,
                &mut pass,
                &[CullSource {
                    buffer: &buf,
                    count: scene.len() as u32,
                    base: 0,
                }],
                &view,
            );
            let want = cull_cpu(&[(&scene, 0)], &view);
            assert!(
                want.lists.iter().all(|l| !l.is_empty()),
                "scene {k} exercises every LOD"
            );
            check(&rb, &want, &format!("{name} scene {k}"));
        }
    }
    drop(buf);
    common::finish(ctx, "random scenes");
}

#[test]
fn band_edges_planes_nans_and_many_sources() {
    let Some(ctx) = common::context("band_edges_planes_nans") else {
        return;
    };
    // Box frustum x in [-200, 500], y and z in [-500, 500], exact planes; instances exactly on
    // band edges and planes.
    let planes = [
        [1.0, 0.0, 0.0, 200.0],
        [-1.0, 0.0, 0.0, 500.0],
        [0.0, 1.0, 0.0, 500.0],
        [0.0, -1.0, 0.0, 500.0],
        [0.0, 0.0, 1.0, 500.0],
        [0.0, 0.0, -1.0, 500.0],
    ];
    let view = CullView::from_planes(planes, Vec3::ZERO, 2.0, &LodBands::default(), 1.0).unwrap();
    let mut edge = vec![];
    for d in [
        49.0f32, 50.0, 51.0, 149.0, 150.0, 151.0, 399.0, 400.0, 401.0,
    ] {
        for axis in [Vec3::X, Vec3::Y, Vec3::Z, -Vec3::Y, -Vec3::Z] {
            edge.push(Instance::at(axis * d));
        }
    }
    // On the plane x = -200 - r (d == -r: inside, a billboard at 202 m) and just beyond.
    for (x, scale) in [
        (-202.0f32, 1.0f32),
        (-202.5, 1.0),
        (-204.0, 2.0),
        (-204.5, 2.0),
    ] {
        edge.push(Instance {
            scale,
            ..Instance::at(Vec3::new(x, 0.0, 0.0))
        });
    }
    let mut nans = random_scene(1000, 3);
    for (i, inst) in nans.iter_mut().enumerate() {
        match i % 4 {
            0 => inst.position[0] = f32::NAN,
            1 => inst.position[2] = f32::INFINITY,
            2 => inst.scale = f32::NAN,
            _ => {}
        }
    }
    let many: Vec<Vec<Instance>> = (0..8)
        .map(|k| random_scene(3000 + k * 100, 100 + k as u64))
        .collect();
    let bufs: Vec<Buffer> = std::iter::once(&edge)
        .chain(std::iter::once(&nans))
        .chain(many.iter())
        .map(|s| upload(&ctx, s))
        .collect();
    let scenes: Vec<&Vec<Instance>> = std::iter::once(&edge)
        .chain(std::iter::once(&nans))
        .chain(many.iter())
        .collect();
    let parts: Vec<(&Buffer, &[Instance])> = bufs
        .iter()
        .zip(&scenes)
        .map(|(b, s)| (b, s.as_slice()))
        .collect();
    let (sources, cpu) = numbered(&parts, 17);
    for (name, mut pass) in passes(&ctx, 50_000, false) {
        let rb = run(&ctx, &mut pass, &sources[..1], &view);
        let want = cull_cpu(&cpu[..1], &view);
        assert_eq!(want.lists[0].len(), 5, "49 m on five axes");
        assert_eq!(want.lists[1].len() + want.lists[2].len(), 30 + 2);
        check(&rb, &want, &format!("{name} edges"));

        let rb = run(&ctx, &mut pass, &sources[1..2], &view);
        let want = cull_cpu(&cpu[1..2], &view);
        assert_eq!(want.invalid, 750);
        check(&rb, &want, &format!("{name} nans"));

        let rb = run(&ctx, &mut pass, &sources, &view);
        let want = cull_cpu(&cpu, &view);
        check(&rb, &want, &format!("{name} many sources"));

        let rb = run(&ctx, &mut pass, &[], &view);
        check(&rb, &Default::default(), "no sources");
        let rb = run(
            &ctx,
            &mut pass,
            &[CullSource {
                buffer: &bufs[0],
                count: 0,
                base: 0,
            }],
            &view,
        );
        check(&rb, &Default::default(), "zero instances");
    }
    finish(ctx, bufs, "edges");
}

/// More dispatches than the pass's source-table room: under a budget that refuses to grow it,
/// the dispatches are recorded in rounds of four (the table rewritten between them); with room,
/// the table grows to 64 and 150 dispatches take three rounds. The lists match the CPU
/// reference every time, for each compaction.
#[test]
fn many_dispatches_grow_the_table_or_record_in_rounds() {
    let Some(ctx) = common::context("table_rounds") else {
        return;
    };
    let scene = random_scene(6_000, 23);
    let parts: Vec<&[Instance]> = scene.chunks(40).collect();
    assert_eq!(parts.len(), 150);
    let bufs: Vec<Buffer> = parts.iter().map(|p| upload(&ctx, p)).collect();
    let pairs: Vec<(&Buffer, &[Instance])> = bufs.iter().zip(parts.iter().copied()).collect();
    let (sources, cpu) = numbered(&pairs, 3);
    let view = perspective(Vec3::new(0.0, 20.0, 0.0), 0.5, 1.0);
    let want = cull_cpu(&cpu, &view);
    assert!(want.lists.iter().all(|l| !l.is_empty()), "every LOD drawn");
    for compaction in variants(&ctx) {
        let mut pass = CullPass::from_desc(
            &ctx,
            &CullDesc {
                compaction,
                capacity: 10_000,
                meshes: MESHES,
                records: false,
                adaptive: false,
                max_sources_per_dispatch: 1,
                views: 1,
            },
        )
        .unwrap();
        assert_eq!(pass.source_tables(), (4, 0));
        // Vegetation over its limit: nothing new (the pass's memory was made before).
        let m = ctx.memory();
        m.set_vegetation_limit(0);
        let rb = run(&ctx, &mut pass, &sources, &view);
        check(
            &rb,
            &want,
            &format!("{compaction:?}: 150 dispatches in rounds of 4"),
        );
        assert_eq!(
            pass.source_tables(),
            (4, 1),
            "{compaction:?}: growth refused"
        );
        m.set_vegetation_limit(u64::MAX);
        let rb = run(&ctx, &mut pass, &sources, &view);
        check(
            &rb,
            &want,
            &format!("{compaction:?}: 150 dispatches in rounds of 64"),
        );
        assert_eq!(pass.source_tables(), (64, 1), "{compaction:?}: grown");
        let rb = run(&ctx, &mut pass, &sources[..10], &view);
        check(
            &rb,
            &cull_cpu(&cpu[..10], &view),
            &format!("{compaction:?}: 10 dispatches"),
        );
        assert_eq!(pass.source_tables(), (64, 1), "{compaction:?}: kept");
    }
    finish(ctx, bufs, "table_rounds");
}

/// Records one single-pass cull of `sources` in a frame of its own and waits for it.
fn cull_frame(ctx: &Context, pass: &mut CullPass, sources: &[CullSource<'_>], view: &CullView) {
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: cmd is recording for `frame`, outside a render pass; the sources were
        // uploaded before (`upload` waits).
        unsafe { pass.record(frame, cmd, sources, view) }
    })
    .unwrap();
}

/// A cull that fails after it resized its lists (here the first occlusion phase: visibility
/// bits for indices from 2^31 are past what the device binds, or past the budget) keeps the
/// lists, records and capacities that the last recorded cull's arguments were written
/// against: a draw recorded in that frame after the failed cull indexes within them. The
/// resize it wanted is asked for again by the sizer and made by a later cull. The control: the
/// same history with a first phase that succeeds resizes in that frame.
#[test]
fn a_cull_that_fails_after_resizing_keeps_the_lists_its_arguments_index() {
    let Some(ctx) = common::context("failed_resize") else {
        return;
    };
    let scene = random_scene(60_000, 41);
    let buf = upload(&ctx, &scene);
    let (sources, cpu) = numbered(&[(&buf, &scene[..])], 0);
    let bad = [CullSource {
        base: 1 << 31,
        ..sources[0]
    }];
    let view = perspective(Vec3::new(0.0, 20.0, 0.0), 0.5, 1.0);
    let want = cull_cpu(&cpu, &view);
    let most = want.lists.iter().map(Vec::len).max().unwrap();
    assert!(
        most > 5_000,
        "a list outgrows the first lists (4,096): {most}"
    );
    let m = ctx.memory();
    for compaction in variants(&ctx) {
        let adaptive = |ctx: &Context| {
            CullPass::from_desc(
                ctx,
                &CullDesc {
                    compaction,
                    capacity: 100_000,
                    meshes: MESHES,
                    records: true,
                    adaptive: true,
                    max_sources_per_dispatch: SOURCES_PER_DISPATCH,
                    views: 1,
                },
            )
            .unwrap()
        };
        let (mut control, mut pass) = (adaptive(&ctx), adaptive(&ctx));
        for p in [&mut control, &mut pass] {
            cull_frame(&ctx, p, &sources, &view);
        }
        let caps = pass.capacities();
        assert_eq!(caps, control.capacities());
        // The control's first phase reads the first frame's counts and resizes.
        ctx.submit_and_wait(|frame, cmd| {
            // SAFETY: as in `cull_frame`.
            unsafe { control.record_first(frame, cmd, &sources, &view) }
        })
        .unwrap();
        let grown = control.capacities();
        assert_ne!(grown, caps, "{compaction:?}: the control resized");
        assert_eq!(
            control.resizes().0,
            1,
            "{compaction:?}: the control's resize"
        );
        // The same with a source whose visibility bits can't be had: the first phase fails
        // after its resize (past maxStorageBufferRange, or past the vegetation limit).
        let before = (
            pass.list_bases(),
            pass.lists().unwrap().raw(),
            pass.records().unwrap().raw(),
        );
        m.set_vegetation_limit(m.vegetation_reserved() + (64 << 20));
        let mut failed = None;
        ctx.submit_and_wait(|frame, cmd| {
            // SAFETY: as in `cull_frame`.
            failed = Some(unsafe { pass.record_first(frame, cmd, &bad, &view) });
            Ok(())
        })
        .unwrap();
        m.set_vegetation_limit(u64::MAX);
        let err = failed.unwrap().unwrap_err();
        eprintln!("{compaction:?}: the failed first phase: {err}");
        assert_eq!(pass.capacities(), caps, "{compaction:?}: capacities kept");
        assert_eq!(
            (
                pass.list_bases(),
                pass.lists().unwrap().raw(),
                pass.records().unwrap().raw(),
            ),
            before,
            "{compaction:?}: lists, records and their bases kept"
        );
        assert_eq!(pass.resizes().0, 0, "{compaction:?}: no resize took effect");
        // The failed frame left no counts; the next cull's are asked for again.
        cull_frame(&ctx, &mut pass, &sources, &view);
        assert_eq!(pass.capacities(), caps, "{compaction:?}: no new counts yet");
        cull_frame(&ctx, &mut pass, &sources, &view);
        assert_eq!(
            pass.capacities(),
            grown,
            "{compaction:?}: resized by a later cull"
        );
        let rb = run(&ctx, &mut pass, &sources, &view);
        check(&rb, &want, &format!("{compaction:?}: after the resize"));
    }
    finish(ctx, vec![buf], "failed_resize");
}

/// A resize the budget refuses is asked for again at the next frame's counts, and made once
/// there is room: the sizer measures against the lists the pass kept, not the ones it asked for.
#[test]
fn a_refused_resize_is_asked_for_again() {
    let Some(ctx) = common::context("refused_resize") else {
        return;
    };
    let scene = random_scene(60_000, 41);
    let buf = upload(&ctx, &scene);
    let (sources, cpu) = numbered(&[(&buf, &scene[..])], 0);
    let view = perspective(Vec3::new(0.0, 20.0, 0.0), 0.5, 1.0);
    let want = cull_cpu(&cpu, &view);
    let m = ctx.memory();
    for compaction in variants(&ctx) {
        let mut pass = CullPass::with_records(&ctx, compaction, 100_000, MESHES).unwrap();
        let caps = pass.capacities();
        cull_frame(&ctx, &mut pass, &sources, &view);
        m.set_vegetation_limit(0);
        cull_frame(&ctx, &mut pass, &sources, &view);
        m.set_vegetation_limit(u64::MAX);
        assert_eq!(pass.resizes(), (0, 1), "{compaction:?}: refused");
        assert_eq!(pass.capacities(), caps, "{compaction:?}: kept");
        cull_frame(&ctx, &mut pass, &sources, &view);
        assert_eq!(pass.resizes(), (1, 1), "{compaction:?}: asked for again");
        assert!(
            (0..3).all(|l| pass.capacities()[l] as usize >= want.lists[l].len()),
            "{compaction:?}: room for every list: {:?}",
            pass.capacities()
        );
        let rb = run(&ctx, &mut pass, &sources, &view);
        check(&rb, &want, &format!("{compaction:?}: after the resize"));
    }
    finish(ctx, vec![buf], "refused_resize");
}

#[test]
fn overflow_clamps_and_counts_without_writing_out_of_bounds() {
    let Some(ctx) = common::context("overflow_clamps") else {
        return;
    };
    let scene = random_scene(50_000, 11);
    let buf = upload(&ctx, &scene);
    let view = perspective(Vec3::new(0.0, 20.0, 0.0), 0.5, 1.0);
    let want = cull_cpu(&[(&scene, 0)], &view);
    for compaction in variants(&ctx) {
        let mut pass = fixed(&ctx, compaction, 16, false);
        let rb = run(
            &ctx,
            &mut pass,
            &[CullSource {
                buffer: &buf,
                count: scene.len() as u32,
                base: 0,
            }],
            &view,
        );
        let sizes: Vec<usize> = want.lists.iter().map(Vec::len).collect();
        assert!(
            sizes.iter().all(|n| *n > 16),
            "every list overflows: {sizes:?}"
        );
        check(&rb, &want, &format!("{compaction:?} overflow"));
    }
    let too_few = CullSource {
        buffer: &buf,
        count: scene.len() as u32 + 1,
        base: 0,
    };
    let mut pass = fixed(&ctx, Compaction::Atomic, 10, false);
    let err = ctx
        .submit_and_wait(|frame, cmd| {
            // SAFETY: recording; the call is refused before anything is recorded.
            unsafe { pass.record(frame, cmd, &[too_few], &view) }
        })
        .unwrap_err();
    assert!(matches!(err, understory::Error::InvalidInput(_)), "{err}");
    drop(pass);
    assert!(CullPass::new(&ctx, Compaction::Atomic, 0, MESHES).is_err());
    let max = CullPass::max_capacity(&ctx, true);
    let err = CullPass::with_records(&ctx, Compaction::Atomic, max + 1, MESHES).unwrap_err();
    assert!(
        matches!(err, understory::Error::InvalidInput(ref m) if m.contains("maxStorageBufferRange")),
        "capacity past maxStorageBufferRange: {err}"
    );
    drop(buf);
    common::finish(ctx, "overflow");
}

/// With records on, every written list slot carries the full 32-byte record of the instance its
/// index names, across several source buffers, for both compaction variants.
#[test]
fn records_hold_the_instance_each_list_slot_names() {
    let Some(ctx) = common::context("records_hold_the_instance") else {
        return;
    };
    let mut scene = random_scene(30_000, 11);
    for (i, inst) in scene.iter_mut().enumerate() {
        // Distinct tails so a wrong copy cannot pass by accident.
        inst.tint = i as u32 ^ 0x5a5a_0000;
        inst.patch_slot = (i / 10_000) as u32;
    }
    let parts: Vec<&[Instance]> = scene.chunks(10_000).collect();
    let bufs: Vec<Buffer> = parts.iter().map(|p| upload(&ctx, p)).collect();
    let numbering: Vec<(&Buffer, &[Instance])> = bufs.iter().zip(parts.iter().copied()).collect();
    // No gaps: list indices are indices into `scene`.
    let (sources, cpu) = numbered(&numbering, 0);
    let view = perspective(Vec3::new(0.0, 20.0, 0.0), 0.3, 1.0);
    let cap = 40_000u32;
    assert!(
        CullPass::new(&ctx, Compaction::Atomic, 8, MESHES)
            .unwrap()
            .records()
            .is_err()
    );
    for (name, mut pass) in passes(&ctx, cap, true) {
        let bases = pass.list_bases();
        let record_bytes = u64::from(cap) * 3 * 32;
        let list_bytes = u64::from(cap) * 3 * 4;
        let args_bytes = size_of::<[DrawIndexedIndirect; 3]>() as u64;
        let read = ctx
            .create_buffer(&BufferDesc {
                name: "records readback",
                size: record_bytes + list_bytes + args_bytes,
                usage: vk::BufferUsageFlags::TRANSFER_DST,
                location: MemoryLocation::GpuToCpu,
                category: Category::Other,
            })
            .unwrap();
        ctx.submit_and_wait(|frame, cmd| {
            // SAFETY: cmd is recording for `frame`; the pass ends with a barrier to
            // transfers.
            unsafe {
                pass.record(frame, cmd, &sources, &view)?;
                copy_to_host(
                    &ctx,
                    frame,
                    cmd,
                    &read,
                    &[
                        (pass.records()?, 0, record_bytes),
                        (pass.lists()?, record_bytes, list_bytes),
                        (pass.args()?, record_bytes + list_bytes, args_bytes),
                    ],
                );
            }
            Ok(())
        })
        .unwrap();
        let bytes = read.mapped().unwrap();
        let records: &[Instance] = bytemuck::cast_slice(&bytes[..record_bytes as usize]);
        let lists: &[u32] = bytemuck::cast_slice(
            &bytes[record_bytes as usize..(record_bytes + list_bytes) as usize],
        );
        let args: [DrawIndexedIndirect; 3] =
            bytemuck::pod_read_unaligned(&bytes[(record_bytes + list_bytes) as usize..]);
        let want = cull_cpu(&cpu, &view);
        for l in 0..3 {
            let n = args[l].instance_count as usize;
            assert_eq!(n, want.lists[l].len(), "{name} LOD {l} count");
            assert!(n > 0, "the view exercises LOD {l}");
            for s in 0..n {
                let at = bases[l] as usize + s;
                let i = lists[at] as usize;
                assert_eq!(
                    records[at], scene[i],
                    "{name} LOD {l} slot {s} (instance {i})"
                );
            }
        }
        drop(bytes);
        drop(read);
    }
    finish(ctx, bufs, "records");
}

/// One dispatch reads up to `SOURCES_PER_DISPATCH` buffers, each starting at a fresh workgroup:
/// 3 × 41 sources of awkward sizes (one instance, workgroup edges of both variants, empty ones in
/// between, a prefix of a buffer used again) still match the CPU reference, in both variants.
#[test]
fn sources_are_batched_per_dispatch_and_match_the_reference() {
    let Some(ctx) = common::context("sources_are_batched") else {
        return;
    };
    let sizes = [
        1usize, 255, 256, 257, 0, 1023, 1024, 1025, 2047, 0, 3000, 7, 4096, 4097, 1, 0, 999, 2048,
        513, 12, 5000, 1, 2, 3, 0, 1024, 700, 300, 256, 1, 0, 4500, 64, 65, 1030, 8, 2500, 0, 100,
        1, 3333,
    ];
    let scenes: Vec<Vec<Instance>> = sizes
        .iter()
        .enumerate()
        .map(|(k, &n)| random_scene(n.max(1), 500 + k as u64))
        .collect();
    let bufs: Vec<Buffer> = scenes.iter().map(|s| upload(&ctx, s)).collect();
    // Every size three times over (more than three batches of the narrow array).
    let parts: Vec<(&Buffer, &[Instance])> = (0..3 * sizes.len())
        .map(|j| {
            let k = j % sizes.len();
            // Source 30 reads a prefix of buffer 20 again, under its own base.
            if k == 30 {
                (&bufs[20], &scenes[20][..77])
            } else {
                (&bufs[k], &scenes[k][..sizes[k]])
            }
        })
        .collect();
    let (sources, cpu) = numbered(&parts, 3);
    assert!(sources.len() > 3 * understory::gpu::cull::SOURCES_PER_DISPATCH);
    let view = perspective(Vec3::new(0.0, 20.0, 0.0), 0.4, 1.0);
    let want = cull_cpu(&cpu, &view);
    assert!(
        want.lists.iter().all(|l| !l.is_empty()),
        "every LOD exercised"
    );
    for (name, mut pass) in passes(&ctx, 100_000, false) {
        let rb = run(&ctx, &mut pass, &sources, &view);
        check(&rb, &want, &format!("{name} batched"));
    }
    finish(ctx, bufs, "batched");
}

/// `n` sources of 0..=`most` instances each (prefixes of 64 shared buffers of 600), numbered
/// with a gap of 1, and the context's buffers.
fn many_sources(
    ctx: &Context,
    n: usize,
    most: u64,
    seed: u64,
) -> (Vec<Buffer>, Vec<Vec<Instance>>, Vec<usize>) {
    let scenes: Vec<Vec<Instance>> = (0..64).map(|k| random_scene(600, seed + k)).collect();
    let bufs: Vec<Buffer> = scenes.iter().map(|s| upload(ctx, s)).collect();
    let mut s = seed | 1;
    let counts = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % (most + 1)) as usize
        })
        .collect();
    (bufs, scenes, counts)
}

/// Culls `n` sources of up to `most` instances with every batched width the device allows,
/// `frames` times each (a later frame rewrites the tables an earlier one's dispatches read),
/// against the CPU reference; returns how many live sources there were.
fn cull_many(test: &str, n: usize, most: u64, frames: usize) -> Option<usize> {
    let ctx = common::context(test)?;
    let (bufs, scenes, counts) = many_sources(&ctx, n, most, 9000);
    let parts: Vec<(&Buffer, &[Instance])> = counts
        .iter()
        .enumerate()
        .map(|(j, &c)| (&bufs[j % 64], &scenes[j % 64][..c]))
        .collect();
    let (sources, cpu) = numbered(&parts, 1);
    let live = sources.iter().filter(|s| s.count > 0).count();
    let view = perspective(Vec3::new(0.0, 20.0, 0.0), 0.4, 1.0);
    let want = cull_cpu(&cpu, &view);
    assert!(
        want.lists.iter().all(|l| !l.is_empty()),
        "every LOD exercised"
    );
    for (name, mut pass) in passes(&ctx, 900_000, false) {
        if pass.sources_per_dispatch() == 1 {
            continue; // thousands of dispatches: the batched test covers this variant
        }
        for _ in 0..frames {
            let rb = run(&ctx, &mut pass, &sources, &view);
            check(&rb, &want, &format!("{name} {test}"));
        }
    }
    drop(parts);
    finish(ctx, bufs, test);
    Some(live)
}

/// More sources than the wide array holds (the per-patch buffers of a large world): 8,500
/// sources of 0–128 instances over 64 buffers match the CPU reference with every width.
#[test]
fn thousands_of_sources_match_the_reference() {
    if let Some(live) = cull_many("thousands_of_sources", 8500, 128, 1) {
        assert!(live > 2 * WIDE_SOURCES_PER_DISPATCH, "live {live}");
    }
}

/// The wide array over more than one round of tables (more than 4 × 1,024 live sources) and
/// every other width; twice, so the second frame rewrites the tables the first one's
/// dispatches read.
#[test]
fn rounds_of_tables_match_the_reference() {
    if let Some(live) = cull_many("rounds_of_tables", 20_000, 64, 2) {
        assert!(live > 4 * WIDE_SOURCES_PER_DISPATCH, "live {live}");
    }
}

/// The pass recorded twice into one command buffer (many sources, then few): the second
/// record's table writes wait for the first's dispatches, and its result is the few sources'
/// alone.
#[test]
fn recorded_twice_in_one_command_buffer() {
    let Some(ctx) = common::context("recorded_twice") else {
        return;
    };
    let scenes: Vec<Vec<Instance>> = (0..8).map(|k| random_scene(3000, 100 + k)).collect();
    let bufs: Vec<Buffer> = scenes.iter().map(|s| upload(&ctx, s)).collect();
    let many: Vec<(&Buffer, &[Instance])> = (0..200)
        .map(|j| (&bufs[j % 8], &scenes[j % 8][..(j * 37) % 3000 + 1]))
        .collect();
    let few: Vec<(&Buffer, &[Instance])> =
        (0..5).map(|j| (&bufs[j], &scenes[j][..2000 + j])).collect();
    let (many_s, _) = numbered(&many, 0);
    let (few_s, few_cpu) = numbered(&few, 3);
    let view = perspective(Vec3::new(0.0, 20.0, 0.0), 0.4, 1.0);
    let want = cull_cpu(&few_cpu, &view);
    for (name, mut pass) in passes(&ctx, 700_000, false) {
        let rb = run_after(&ctx, &mut pass, &many_s, &few_s, &view);
        check(&rb, &want, &format!("{name} twice"));
    }
    finish(ctx, bufs, "twice");
}

/// Four orthographic cascades along a sun direction, nested around `eye` (40 m to 320 m); the
/// last two take no billboards, the third not even medium trees.
fn cascades(eye: Vec3) -> Vec<CascadeView> {
    let sun = Vec3::new(-0.4, 0.8, 0.35).normalize();
    [
        (40.0f32, Lod::Billboard),
        (80.0, Lod::Culled),
        (160.0, Lod::Full),
        (320.0, Lod::Medium),
    ]
    .iter()
    .map(|&(half, max_lod)| {
        let view = Mat4::look_at_rh(eye + sun * 600.0, eye, Vec3::Y);
        let proj = Mat4::orthographic_rh(-half, half, -half, half, 0.0, 1200.0);
        CascadeView::new(proj * view).unwrap().with_max_lod(max_lod)
    })
    .collect()
}

/// The camera and four shadow cascades in one pass: every view's lists equal the CPU reference
/// (lists, counts, overflow, the indirect arguments of each view), with NaNs and many sources,
/// for each compaction and source-array width; a cascade's records hold the instances its list
/// names; fewer cascades than views leave the rest empty.
#[test]
fn camera_and_cascades_in_one_pass_match_the_reference() {
    let Some(ctx) = common::context("camera_and_cascades") else {
        return;
    };
    let mut scene = random_scene(60_000, 99);
    for i in [7, 4000, 33_333] {
        scene[i].position[1] = f32::NAN;
    }
    let parts: Vec<&[Instance]> = scene.chunks(7_001).collect();
    let bufs: Vec<Buffer> = parts.iter().map(|p| upload(&ctx, p)).collect();
    let pairs: Vec<(&Buffer, &[Instance])> = bufs.iter().zip(parts.iter().copied()).collect();
    let (sources, cpu) = numbered(&pairs, 3);
    let eye = Vec3::new(10.0, 12.0, -20.0);
    let view = perspective(eye, 0.7, 1.0);
    let all = cascades(eye);
    for compaction in variants(&ctx) {
        for max_sources_per_dispatch in [WIDE_SOURCES_PER_DISPATCH, SOURCES_PER_DISPATCH, 1] {
            for n in [4usize, 2] {
                let what = format!("{compaction:?} x{max_sources_per_dispatch}, {n} cascades");
                let mut pass = CullPass::from_desc(
                    &ctx,
                    &CullDesc {
                        compaction,
                        capacity: 60_000,
                        meshes: MESHES,
                        records: true,
                        adaptive: false,
                        max_sources_per_dispatch,
                        views: MAX_VIEWS,
                    },
                )
                .unwrap();
                pass.set_cascades(&all[..n]).unwrap();
                let want = cull_views_cpu(&cpu, &view, &all[..n]);
                let got = run_views(&ctx, &mut pass, &sources, &view);
                for v in 0..MAX_VIEWS as usize {
                    let empty = understory::gpu::cull::CullExpectation::default();
                    let want = want.get(v).unwrap_or(&empty);
                    let what = format!("{what}, view {v}");
                    for (l, mesh) in MESHES.iter().enumerate() {
                        assert_eq!(got.lists[v][l], want.lists[l], "{what}: LOD {l}");
                        assert_eq!(got.counters[v][l] as usize, want.lists[l].len(), "{what}");
                        assert_eq!(got.counters[v][4 + l], 0, "{what}: overflow");
                        assert_eq!(
                            got.args[6 * v + l].instance_count as usize,
                            want.lists[l].len(),
                            "{what}: indirect count"
                        );
                        assert_eq!(got.args[6 * v + 3 + l].instance_count, 0, "{what}");
                        assert_eq!(got.args[6 * v + l].index_count, mesh.index_count);
                    }
                    let invalid = if v == 0 { 3 } else { 0 };
                    assert_eq!(got.counters[v][3], invalid, "{what}: invalid");
                    // Records: the slot's record is the instance the list names.
                    for (slot, idx) in got.slots[v].iter().take(50) {
                        let (p, base) = cpu.iter().rev().find(|(_, b)| *b <= *idx).unwrap();
                        let inst = p[(*idx - base) as usize];
                        assert_eq!(got.records[*slot as usize], inst, "{what}: record {slot}");
                    }
                }
                eprintln!(
                    "{what}: drawn per view {:?}",
                    got.lists
                        .iter()
                        .map(|l| l.iter().map(Vec::len).sum::<usize>())
                        .collect::<Vec<_>>()
                );
            }
        }
    }
    let mut pass = CullPass::from_desc(
        &ctx,
        &CullDesc {
            compaction: Compaction::Atomic,
            capacity: 1000,
            meshes: MESHES,
            records: false,
            adaptive: false,
            max_sources_per_dispatch: 1,
            views: 3,
        },
    )
    .unwrap();
    assert!(
        pass.set_cascades(&all[..3]).is_err(),
        "3 cascades need 4 views"
    );
    assert!(pass.set_cascades(&all[..2]).is_ok());
    for views in [0, MAX_VIEWS + 1] {
        let r = CullPass::from_desc(
            &ctx,
            &CullDesc {
                compaction: Compaction::Atomic,
                capacity: 1000,
                meshes: MESHES,
                records: false,
                adaptive: false,
                max_sources_per_dispatch: 1,
                views,
            },
        );
        assert!(
            matches!(r, Err(understory::Error::InvalidInput(_))),
            "{views} views"
        );
    }
    drop(pass);
    finish(ctx, bufs, "camera_and_cascades");
}

/// The camera and four cascades in one pass without records and with lists too small for what
/// the views hold: each view's lists hold distinct entries of its reference list, as many as
/// fit; its counters count every one and its overflow words the rest; its commands draw what
/// was written. For each compaction and source-array width.
#[test]
fn camera_and_cascades_overflow_without_records() {
    let Some(ctx) = common::context("cascades_overflow") else {
        return;
    };
    let scene = random_scene(30_000, 7);
    let parts: Vec<&[Instance]> = scene.chunks(7_001).collect();
    let bufs: Vec<Buffer> = parts.iter().map(|p| upload(&ctx, p)).collect();
    let pairs: Vec<(&Buffer, &[Instance])> = bufs.iter().zip(parts.iter().copied()).collect();
    let (sources, cpu) = numbered(&pairs, 5);
    let eye = Vec3::new(10.0, 12.0, -20.0);
    let view = perspective(eye, 0.7, 1.0);
    let all = cascades(eye);
    let want = cull_views_cpu(&cpu, &view, &all);
    const CAP: usize = 300;
    let overflowing = want
        .iter()
        .flat_map(|w| w.lists.iter())
        .filter(|l| l.len() > CAP)
        .count();
    assert!(overflowing >= 3, "only {overflowing} lists overflow");
    for compaction in variants(&ctx) {
        for max_sources_per_dispatch in [WIDE_SOURCES_PER_DISPATCH, SOURCES_PER_DISPATCH, 1] {
            let what = format!("{compaction:?} x{max_sources_per_dispatch}");
            let mut pass = CullPass::from_desc(
                &ctx,
                &CullDesc {
                    compaction,
                    capacity: CAP as u32,
                    meshes: MESHES,
                    records: false,
                    adaptive: false,
                    max_sources_per_dispatch,
                    views: MAX_VIEWS,
                },
            )
            .unwrap();
            pass.set_cascades(&all).unwrap();
            let got = run_views(&ctx, &mut pass, &sources, &view);
            for (v, want) in want.iter().enumerate() {
                for l in 0..3 {
                    let (w, g) = (&want.lists[l], &got.lists[v][l]);
                    let what = format!("{what}, view {v}, LOD {l}");
                    assert_eq!(g.len(), w.len().min(CAP), "{what}: entries");
                    assert!(g.windows(2).all(|p| p[0] < p[1]), "{what}: repeated");
                    assert!(
                        g.iter().all(|i| w.binary_search(i).is_ok()),
                        "{what}: stray"
                    );
                    assert_eq!(got.counters[v][l] as usize, w.len(), "{what}: count");
                    assert_eq!(
                        got.counters[v][4 + l] as usize,
                        w.len().saturating_sub(CAP),
                        "{what}: overflow"
                    );
                }
            }
        }
    }
    finish(ctx, bufs, "cascades_overflow");
}

/// What a pass of several views appended: per view the sorted lists, the counters, the
/// (slot, index) pairs of its lists; the six commands per view; the records.
struct Views {
    lists: Vec<[Vec<u32>; 3]>,
    counters: Vec<[u32; COUNTERS]>,
    slots: Vec<Vec<(u32, u32)>>,
    args: Vec<DrawIndexedIndirect>,
    records: Vec<Instance>,
}

fn run_views(
    ctx: &Context,
    pass: &mut CullPass,
    sources: &[CullSource<'_>],
    view: &CullView,
) -> Views {
    let views = pass.views() as usize;
    let entries: u64 = pass.capacities().iter().map(|c| u64::from(*c)).sum::<u64>() * views as u64;
    let list_bytes = entries * 4;
    let counter_bytes = (COUNTERS * views * 4) as u64;
    let args_bytes = (size_of::<DrawIndexedIndirect>() * 6 * views) as u64;
    // A pass without records: none read back.
    let with_records = pass.records().is_ok();
    let record_bytes = if with_records {
        entries * size_of::<Instance>() as u64
    } else {
        0
    };
    let read = ctx
        .create_buffer(&BufferDesc {
            name: "views readback",
            size: list_bytes + counter_bytes + args_bytes + record_bytes,
            usage: vk::BufferUsageFlags::TRANSFER_DST,
            location: MemoryLocation::GpuToCpu,
            category: Category::Other,
        })
        .unwrap();
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: recording for `frame` outside a render pass; the copies follow the pass's
        // closing barrier (transfer reads).
        unsafe {
            pass.record(frame, cmd, sources, view)?;
            let mut parts = vec![
                (pass.lists()?, 0, list_bytes),
                (pass.counters()?, list_bytes, counter_bytes),
                (pass.args()?, list_bytes + counter_bytes, args_bytes),
            ];
            if with_records {
                parts.push((
                    pass.records()?,
                    list_bytes + counter_bytes + args_bytes,
                    record_bytes,
                ));
            }
            copy_to_host(ctx, frame, cmd, &read, &parts);
        }
        Ok(())
    })
    .unwrap();
    let bytes = read.mapped().unwrap();
    let words: &[u32] = bytemuck::cast_slice(&bytes[..list_bytes as usize]);
    let counters: Vec<[u32; COUNTERS]> = bytes
        [list_bytes as usize..(list_bytes + counter_bytes) as usize]
        .chunks(COUNTERS * 4)
        .map(bytemuck::pod_read_unaligned)
        .collect();
    let at = (list_bytes + counter_bytes) as usize;
    let args: Vec<DrawIndexedIndirect> = bytes[at..at + args_bytes as usize]
        .chunks(size_of::<DrawIndexedIndirect>())
        .map(bytemuck::pod_read_unaligned)
        .collect();
    let records: Vec<Instance> = bytes[at + args_bytes as usize..]
        .chunks(size_of::<Instance>())
        .map(bytemuck::pod_read_unaligned)
        .collect();
    let mut lists = Vec::new();
    let mut slots = Vec::new();
    for v in 0..views {
        let bases = pass.view_list_bases(v as u32);
        let mut per: [Vec<u32>; 3] = Default::default();
        let mut s = Vec::new();
        for (l, list) in per.iter_mut().enumerate() {
            let n = args[6 * v + l].instance_count as usize;
            let start = bases[l] as usize;
            *list = words[start..start + n].to_vec();
            s.extend((start..start + n).map(|k| (k as u32, words[k])));
            list.sort_unstable();
        }
        lists.push(per);
        slots.push(s);
    }
    drop(bytes);
    Views {
        lists,
        counters,
        slots,
        args,
        records,
    }
}
