//! Two-phase occlusion culling against its CPU reference on the real driver under
//! (synchronization) validation: a depth image with near walls and far sky, its pyramid, and
//! two frames of first + second phases from two cameras. The GPU's lists must equal the
//! reference's (classify_cpu, phase_lod_cpu, occluded_cpu over pyramid_cpu) exactly.

mod common;

use ash::vk;
use glam::{Mat4, Vec3};
use understory::gpu::context::{Context, Frame};
use understory::gpu::cull::{
    COUNTER_FIRST, COUNTER_HIDDEN, COUNTERS, CascadeView, Compaction, CullDesc, CullPass,
    CullSource, CullView, DrawIndexedIndirect, InstanceBounds, LIST_GUARD_WORDS,
    WIDE_SOURCES_PER_DISPATCH, classify_cpu, cull_views_cpu, occluded_cpu, phase_lod_cpu,
};
use understory::gpu::memory::{Buffer, BufferDesc, Image, MemoryLocation};
use understory::gpu::pyramid::{DepthPyramid, pyramid_cpu};
use understory::policy::category::Category;
use understory::policy::lod::LodBands;
use understory::world::instance::Instance;

const W: u32 = 331;
const H: u32 = 187;
const RADIUS: f32 = 1.5;
/// A box narrower than the cull sphere and standing on the position, as trees are.
const BOUNDS: InstanceBounds = InstanceBounds {
    radius: 0.4,
    y_min: 0.0,
    y_max: 1.5,
};

fn mesh(index_count: u32) -> DrawIndexedIndirect {
    DrawIndexedIndirect {
        index_count,
        ..Default::default()
    }
}

fn xorshift(s: &mut u64) -> f32 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    (*s >> 40) as f32 / (1u64 << 24) as f32
}

/// Trees in front of a camera at the origin looking down -z: 0.5 to 400 m away.
fn scene(n: usize, seed: u64) -> Vec<Instance> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            let z = -0.5 - 400.0 * xorshift(&mut s);
            Instance {
                scale: 0.3 + 1.5 * xorshift(&mut s),
                ..Instance::at(Vec3::new(
                    (xorshift(&mut s) - 0.5) * -z * 2.0,
                    (xorshift(&mut s) - 0.5) * 20.0,
                    z,
                ))
            }
        })
        .collect()
}

/// A depth image: sky (1.0) with near walls (a band of 0.2..0.9 steps) and noise.
fn depth_texels(seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..W * H)
        .map(|i| {
            let (x, y) = (i % W, i / W);
            let wall = (x / 40) % 3;
            if y > H / 3 && wall != 2 {
                0.2 + 0.35 * wall as f32 + 0.05 * xorshift(&mut s)
            } else {
                1.0 - 0.001 * xorshift(&mut s)
            }
        })
        .collect()
}

/// A host-visible instance buffer holding `instances`.
fn instance_buffer(ctx: &Context, instances: &[Instance]) -> Buffer {
    let bytes: &[u8] = bytemuck::cast_slice(instances);
    let mut b = ctx
        .create_buffer(&BufferDesc {
            name: "occlusion test instances",
            size: bytes.len() as u64,
            usage: vk::BufferUsageFlags::STORAGE_BUFFER,
            location: MemoryLocation::CpuToGpu,
            category: Category::Instances,
        })
        .unwrap();
    b.mapped_mut().unwrap().copy_from_slice(bytes);
    b
}

/// A staging buffer holding W x H depth texels (uploaded to the host's depth image by
/// [`frame_of`]).
fn depth_staging(ctx: &Context, texels: &[f32]) -> Buffer {
    let mut b = ctx
        .create_buffer(&BufferDesc {
            name: "depth staging",
            size: u64::from(W * H) * 4,
            usage: vk::BufferUsageFlags::TRANSFER_SRC,
            location: MemoryLocation::CpuToGpu,
            category: Category::Staging,
        })
        .unwrap();
    b.mapped_mut()
        .unwrap()
        .copy_from_slice(bytemuck::cast_slice(texels));
    b
}

/// A depth pyramid for the W x H depth image.
fn pyramid(ctx: &Context) -> DepthPyramid {
    DepthPyramid::new(
        ctx,
        vk::Extent2D {
            width: W,
            height: H,
        },
    )
    .unwrap()
}

/// The compactions this device runs.
fn compactions(ctx: &Context) -> Vec<Compaction> {
    let mut c = vec![Compaction::Atomic];
    if ctx.adapter().subgroup_ballot_arithmetic_in_compute {
        c.push(Compaction::Subgroup);
    }
    c
}

/// A cull pass with records and up to 40,000 entries per list, as the tests here use it.
fn test_pass(
    ctx: &Context,
    compaction: Compaction,
    adaptive: bool,
    max_sources_per_dispatch: usize,
    views: u32,
) -> CullPass {
    CullPass::from_desc(
        ctx,
        &CullDesc {
            compaction,
            capacity: 40_000,
            meshes: [mesh(36), mesh(12), mesh(6)],
            records: true,
            adaptive,
            max_sources_per_dispatch,
            views,
        },
    )
    .unwrap()
}

fn view_proj(yaw: f32) -> Mat4 {
    let eye = Vec3::new(0.0, 2.0, 0.0);
    let dir = Vec3::new(yaw.sin(), -0.05, -yaw.cos());
    let proj = Mat4::perspective_rh(70f32.to_radians(), W as f32 / H as f32, 0.5, 2000.0);
    proj * Mat4::look_at_rh(eye, eye + dir, Vec3::Y)
}

fn cull_view(vp: Mat4) -> CullView {
    CullView::new(
        vp,
        Vec3::new(0.0, 2.0, 0.0),
        RADIUS,
        &LodBands::default(),
        1.0,
    )
    .unwrap()
}

struct Host {
    depth: Image,
    view: vk::ImageView,
}

impl Host {
    fn new(ctx: &Context) -> Self {
        let (depth, view) = common::image_with_view(
            ctx,
            "host depth",
            vk::Extent2D {
                width: W,
                height: H,
            },
            vk::Format::D32_SFLOAT,
            vk::ImageUsageFlags::TRANSFER_DST
                | vk::ImageUsageFlags::SAMPLED
                | vk::ImageUsageFlags::DEPTH_STENCIL_ATTACHMENT,
            vk::ImageAspectFlags::DEPTH,
        );
        Self { depth, view }
    }

    fn destroy(self, ctx: &Context) {
        // SAFETY: every submission that used the view was waited for (submit_and_wait).
        unsafe { ctx.device().destroy_image_view(self.view, None) };
    }
}

/// What one frame's two phases appended per LOD (sorted), and the drawn counts of the six
/// indirect commands.
struct Phases {
    first: [Vec<u32>; 3],
    second: [Vec<u32>; 3],
    /// Six per view.
    args: Vec<DrawIndexedIndirect>,
    /// Every view's counters, view after view.
    counters: Vec<u32>,
}

/// Records, in one frame: the depth upload, the first phase, the pyramid, the second phase,
/// and the readback.
fn frame_of(
    ctx: &Context,
    pass: &mut CullPass,
    pyramid: &DepthPyramid,
    host: &Host,
    staging: &Buffer,
    sources: &[CullSource<'_>],
    vp: Mat4,
) -> Phases {
    let caps = pass.capacities();
    let bases = pass.list_bases();
    let entries: u64 = caps.iter().map(|c| u64::from(*c)).sum();
    let list_bytes = (entries + LIST_GUARD_WORDS) * 4;
    let counter_bytes = COUNTERS as u64 * 4 * u64::from(pass.views());
    let args_bytes = size_of::<[DrawIndexedIndirect; 6]>() as u64 * u64::from(pass.views());
    let read = ctx
        .create_buffer(&BufferDesc {
            name: "occlusion readback",
            size: list_bytes + counter_bytes + args_bytes,
            usage: vk::BufferUsageFlags::TRANSFER_DST,
            location: MemoryLocation::GpuToCpu,
            category: Category::Other,
        })
        .unwrap();
    let view = cull_view(vp);
    ctx.submit_and_wait(|frame: &Frame, cmd| {
        let d = ctx.device();
        host.depth.used_in(frame)?;
        staging.used_in(frame)?;
        read.used_in(frame)?;
        // SAFETY: cmd is recording for `frame` outside a render pass; every object is live and
        // marked used by `frame`; the barriers order the depth upload before the pyramid reads
        // it and every pass write before the copies.
        unsafe {
            pass.record_first(frame, cmd, sources, &view)?;
            let barrier = |old, new, src, dst| {
                understory::gpu::compute::image_barrier(
                    host.depth.raw(),
                    common::DEPTH_ONLY,
                    (old, src),
                    (new, dst),
                )
            };
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::COMPUTE_SHADER,
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
                host.depth.raw(),
                vk::ImageLayout::TRANSFER_DST_OPTIMAL,
                &[vk::BufferImageCopy::default()
                    .image_subresource(vk::ImageSubresourceLayers {
                        aspect_mask: vk::ImageAspectFlags::DEPTH,
                        mip_level: 0,
                        base_array_layer: 0,
                        layer_count: 1,
                    })
                    .image_extent(vk::Extent3D {
                        width: W,
                        height: H,
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
            pyramid.record(
                frame,
                cmd,
                host.view,
                vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL,
            )?;
            pass.record_second(frame, cmd, pyramid, vp, &BOUNDS)?;
            for (src, at, size) in [
                (pass.lists()?, 0, list_bytes),
                (pass.counters()?, list_bytes, counter_bytes),
                (pass.args()?, list_bytes + counter_bytes, args_bytes),
            ] {
                src.used_in(frame)?;
                d.cmd_copy_buffer(
                    cmd,
                    src.raw(),
                    read.raw(),
                    &[vk::BufferCopy {
                        src_offset: 0,
                        dst_offset: at,
                        size,
                    }],
                );
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
        Ok(())
    })
    .unwrap();
    let bytes = read.mapped().unwrap();
    let words: &[u32] = bytemuck::cast_slice(&bytes[..list_bytes as usize]);
    let counters: Vec<u32> = bytes[list_bytes as usize..(list_bytes + counter_bytes) as usize]
        .chunks(4)
        .map(bytemuck::pod_read_unaligned)
        .collect();
    let args: Vec<DrawIndexedIndirect> = bytes[(list_bytes + counter_bytes) as usize..]
        .chunks(size_of::<DrawIndexedIndirect>())
        .map(bytemuck::pod_read_unaligned)
        .collect();
    let mut first: [Vec<u32>; 3] = Default::default();
    let mut second: [Vec<u32>; 3] = Default::default();
    for l in 0..3 {
        let start = bases[l] as usize;
        let n1 = args[l].instance_count as usize;
        let n2 = args[3 + l].instance_count as usize;
        assert_eq!(
            counters[COUNTER_FIRST + l] as usize,
            n1,
            "LOD {l} first kept"
        );
        first[l] = words[start..start + n1].to_vec();
        second[l] = words[start + n1..start + n1 + n2].to_vec();
        first[l].sort_unstable();
        second[l].sort_unstable();
    }
    drop(bytes);
    Phases {
        first,
        second,
        args,
        counters,
    }
}

/// What the CPU reference expects of one frame.
struct Reference {
    /// The first phase's lists.
    first: [Vec<u32>; 3],
    /// The second phase's lists.
    second: [Vec<u32>; 3],
    /// The visibility bits after the frame.
    after: Vec<bool>,
    /// Per LOD, the instances in the frustum that are hidden and neither phase appends.
    hidden: [u32; 3],
}

/// The reference of one frame.
fn reference(
    scene: &[(Vec<Instance>, u32)],
    vp: Mat4,
    levels: &[(u32, u32, Vec<f32>)],
    bits: &[bool],
) -> Reference {
    let view = cull_view(vp);
    let mut first: [Vec<u32>; 3] = Default::default();
    let mut second: [Vec<u32>; 3] = Default::default();
    let mut after = bits.to_vec();
    let mut unseen_hidden = [0u32; 3];
    for (instances, base) in scene {
        for (i, inst) in instances.iter().enumerate() {
            let gi = (base + i as u32) as usize;
            let lod = classify_cpu(inst, &view);
            let (l1, _) = phase_lod_cpu(false, lod, bits[gi], false);
            let hidden = lod < 3
                && occluded_cpu(
                    Vec3::from_array(inst.position),
                    inst.scale,
                    &BOUNDS,
                    &vp,
                    [W, H],
                    levels,
                );
            let (l2, bit) = phase_lod_cpu(true, lod, bits[gi], hidden);
            if l1 < 3 {
                first[l1 as usize].push(gi as u32);
            }
            if l2 < 3 {
                second[l2 as usize].push(gi as u32);
            }
            after[gi] = bit;
            if hidden && !bits[gi] {
                unseen_hidden[lod as usize] += 1;
            }
        }
    }
    Reference {
        first,
        second,
        after,
        hidden: unseen_hidden,
    }
}

#[test]
fn two_phases_match_the_cpu_reference() {
    let Some(ctx) = common::context("two_phases_match") else {
        return;
    };
    let mut parts: Vec<Vec<Instance>> = (0..3)
        .map(|k| scene(12_000 + 977 * k, 11 + k as u64))
        .collect();
    // Invalid instances are counted once, by the second phase.
    for i in [3, 500, 7000] {
        parts[1][i].position[0] = f32::NAN;
    }
    let bufs: Vec<Buffer> = parts.iter().map(|p| instance_buffer(&ctx, p)).collect();
    // Bases with a gap: indices the bits hold but no source uses.
    let mut base = 0u32;
    let mut sources = vec![];
    let mut cpu = vec![];
    for (b, p) in bufs.iter().zip(&parts) {
        sources.push(CullSource {
            buffer: b,
            count: p.len() as u32,
            base,
        });
        cpu.push((p.clone(), base));
        base += p.len() as u32 + 100;
    }
    let texels = depth_texels(5);
    let levels = pyramid_cpu(&texels, W, H);
    let staging = depth_staging(&ctx, &texels);
    let host = Host::new(&ctx);
    let pyramid = pyramid(&ctx);
    for compaction in compactions(&ctx) {
        // With cascades the first phase reads every instance (they are culled there in full):
        // the camera's phases must not change.
        for (max_sources_per_dispatch, views) in [(WIDE_SOURCES_PER_DISPATCH, 1), (1, 1), (1, 3)] {
            let what =
                format!("{compaction:?}, {max_sources_per_dispatch} per dispatch, {views} view(s)");
            let mut pass = test_pass(&ctx, compaction, false, max_sources_per_dispatch, views);
            let cascades: Vec<CascadeView> = [60.0f32, 200.0]
                .iter()
                .map(|&half| {
                    let sun = Vec3::new(-0.4, 0.8, 0.35).normalize();
                    let v = Mat4::look_at_rh(sun * 500.0, Vec3::new(0.0, 0.0, -half), Vec3::Y);
                    let p = Mat4::orthographic_rh(-half, half, -half, half, 0.0, 1000.0);
                    CascadeView::new(p * v).unwrap()
                })
                .collect();
            if views > 1 {
                pass.set_cascades(&cascades).unwrap();
            }
            let mut bits = vec![false; base as usize];
            let mut hidden_total = 0;
            let mut hidden_counted = 0;
            for (f, yaw) in [0.0f32, 0.0, 0.25, -0.3].into_iter().enumerate() {
                let vp = view_proj(yaw);
                let got = frame_of(&ctx, &mut pass, &pyramid, &host, &staging, &sources, vp);
                let Reference {
                    first,
                    second,
                    after,
                    hidden,
                } = reference(&cpu, vp, &levels, &bits);
                if views > 1 {
                    // The cascades: complete after the first phase, nothing added by the second.
                    let refs: Vec<(&[Instance], u32)> =
                        cpu.iter().map(|(p, b)| (p.as_slice(), *b)).collect();
                    let want = cull_views_cpu(&refs, &cull_view(vp), &cascades);
                    for (v, want) in want.iter().enumerate().skip(1) {
                        for l in 0..3 {
                            assert_eq!(
                                got.args[6 * v + l].instance_count as usize,
                                want.lists[l].len(),
                                "{what}, frame {f}: cascade {v} LOD {l}"
                            );
                            assert_eq!(
                                got.counters[v * COUNTERS + COUNTER_HIDDEN + l],
                                0,
                                "{what}, frame {f}: cascade {v} hides nothing"
                            );
                            assert_eq!(got.args[6 * v + 3 + l].instance_count, 0);
                        }
                    }
                }
                for l in 0..3 {
                    assert_eq!(
                        got.first[l], first[l],
                        "{what}, frame {f}: first phase, LOD {l}"
                    );
                    assert_eq!(
                        got.second[l], second[l],
                        "{what}, frame {f}: second phase, LOD {l}"
                    );
                    assert_eq!(got.counters[4 + l], 0, "{what}: no overflow");
                    assert_eq!(
                        got.counters[COUNTER_HIDDEN + l],
                        hidden[l],
                        "{what}, frame {f}: hidden, LOD {l}"
                    );
                    // What the lists are sized from: what a pass without occlusion appends.
                    let in_band = cpu
                        .iter()
                        .flat_map(|(p, _)| p.iter())
                        .filter(|i| classify_cpu(i, &cull_view(vp)) == l as u32)
                        .count() as u32;
                    assert_eq!(
                        got.counters[l] + got.counters[COUNTER_HIDDEN + l],
                        in_band,
                        "{what}, frame {f}: appended + hidden, LOD {l}"
                    );
                    hidden_counted += hidden[l];
                    assert_eq!(got.counters[3], 3, "{what}: invalid instances");
                    assert_eq!(got.args[l].index_count, [36, 12, 6][l]);
                    assert_eq!(got.args[3 + l].index_count, [36, 12, 6][l]);
                }
                let classified: usize = cpu
                    .iter()
                    .flat_map(|(p, _)| p.iter())
                    .filter(|i| classify_cpu(i, &cull_view(vp)) < 3)
                    .count();
                let drawn: usize = (0..3).map(|l| first[l].len() + second[l].len()).sum();
                let now_visible = after.iter().filter(|b| **b).count();
                eprintln!(
                    "{what}, frame {f}: in the frustum {classified}, drawn {drawn} (first {}, second {}), visible now {now_visible}",
                    first.iter().map(Vec::len).sum::<usize>(),
                    second.iter().map(Vec::len).sum::<usize>(),
                );
                hidden_total += classified - now_visible;
                if f == 1 {
                    // The same camera twice: the first phase draws everything visible, the
                    // second nothing new.
                    assert!(second.iter().all(Vec::is_empty), "{what}: nothing new");
                }
                bits = after;
            }
            assert!(
                hidden_total > 1000,
                "{what}: the walls hide something ({hidden_total})"
            );
            assert!(
                hidden_counted > 1000,
                "{what}: the second phase counts hidden instances ({hidden_counted})"
            );
        }
    }
    host.destroy(&ctx);
    drop(pyramid);
    drop(staging);
    drop(bufs);
    common::finish(ctx, "two_phases_match");
}

/// Adaptive lists with occlusion are sized from what the frustum holds (drawn + hidden), so the
/// frame the walls fall, when everything hidden is drawn at once, fits: no overflow. Sized from
/// what was drawn (a third of the frustum here), the lists overflowed in that frame.
#[test]
fn adaptive_lists_have_room_when_the_walls_fall() {
    let Some(ctx) = common::context("walls_fall") else {
        return;
    };
    let part = scene(12_000, 11);
    let buf = instance_buffer(&ctx, &part);
    let walls = depth_staging(&ctx, &depth_texels(5));
    let open = depth_staging(&ctx, &vec![1.0; (W * H) as usize]);
    let host = Host::new(&ctx);
    let pyramid = pyramid(&ctx);
    let sources = [CullSource {
        buffer: &buf,
        count: part.len() as u32,
        base: 0,
    }];
    let vp = view_proj(0.0);
    let in_band: Vec<usize> = (0..3)
        .map(|l| {
            part.iter()
                .filter(|i| classify_cpu(i, &cull_view(vp)) == l)
                .count()
        })
        .collect();
    for compaction in compactions(&ctx) {
        let mut pass = test_pass(&ctx, compaction, true, WIDE_SOURCES_PER_DISPATCH, 1);
        // Behind the walls for a few frames: the lists follow the read-back counts.
        let mut drawn = 0;
        for _ in 0..4 {
            let got = frame_of(&ctx, &mut pass, &pyramid, &host, &walls, &sources, vp);
            drawn = (0..3)
                .map(|l| got.args[l].instance_count + got.args[3 + l].instance_count)
                .sum::<u32>();
        }
        let caps = pass.capacities();
        let got = frame_of(&ctx, &mut pass, &pyramid, &host, &open, &sources, vp);
        let total: usize = in_band.iter().sum();
        eprintln!(
            "{compaction:?}: {total} in the frustum, {drawn} drawn behind the walls, lists {caps:?}"
        );
        assert!(
            (drawn as usize) * 2 < total,
            "the walls hide most of the frustum"
        );
        for l in 0..3 {
            assert_eq!(got.counters[4 + l], 0, "{compaction:?}: LOD {l} overflowed");
            assert_eq!(
                got.counters[l] as usize, in_band[l],
                "{compaction:?}: everything in LOD {l}'s band is drawn once the walls fall"
            );
            assert!(caps[l] as usize >= in_band[l], "{compaction:?}: LOD {l}");
        }
    }
    host.destroy(&ctx);
    drop(pyramid);
    drop((walls, open, buf));
    common::finish(ctx, "walls_fall");
}
