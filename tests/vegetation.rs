//! The vegetation world on the real driver, under validation: a million instances, a camera
//! flying over them, and a budget that shrinks to a quarter mid-flight and recovers.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use glam::{Vec2, Vec3};
use understory::Error;
use understory::gpu::adapter::HeapInfo;
use understory::gpu::budget::{BudgetSource, HeapBudgets, RawHeap};
use understory::gpu::context::Context;
use understory::gpu::frame::FrameRing;
use understory::policy::category::Category;
use understory::vegetation::{PatchDesc, SpeciesDesc, SpeciesId, Vegetation, VegetationConfig};
use understory::world::instance::Instance;

const MIB: u64 = 1 << 20;

/// Estimate-path heaps whose size a test sets (budget = 80% of it), like a driver whose budget
/// moves under other processes.
struct Scripted {
    heaps: Vec<HeapInfo>,
    size: Arc<AtomicU64>,
}
impl BudgetSource for Scripted {
    fn query(&mut self) -> understory::Result<Vec<RawHeap>> {
        let size = self.size.load(Ordering::Relaxed);
        Ok(self
            .heaps
            .iter()
            .map(|h| RawHeap {
                info: HeapInfo {
                    size: if h.device_local { size } else { h.size },
                    device_local: h.device_local,
                },
                driver: None,
            })
            .collect())
    }
}

fn xorshift(s: &mut u64) -> f32 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    (*s >> 40) as f32 / (1u64 << 24) as f32
}

fn species(veg: &mut Vegetation, name: &str, color: [u8; 4]) -> SpeciesId {
    let px: Vec<u8> = color.iter().copied().cycle().take(32 * 64 * 4).collect();
    veg.register_species(&SpeciesDesc {
        name,
        width: 32,
        height: 64,
        rgba8: &px,
    })
    .expect("species")
}

/// One frame: update, record, submit through the ring.
fn frame(
    ctx: &Context,
    veg: &mut Vegetation,
    ring: &mut FrameRing,
    camera: Vec3,
) -> understory::vegetation::UpdateReport {
    let frame = ctx.begin_frame().expect("begin_frame");
    let report = veg.update(&frame, camera).expect("update never fails");
    let cmd = ring.begin(&frame).unwrap();
    // SAFETY: cmd is recording for `frame` and is submitted right below as its submission.
    unsafe { veg.record(&frame, cmd.raw()).unwrap() };
    ring.submit(frame, cmd).unwrap();
    report
}

/// `n` patches of `per` instances, each inside one tile of a `side` m square at the origin.
fn patches(
    veg: &Vegetation,
    n: usize,
    per: usize,
    side: f32,
    species: &[SpeciesId],
    seed: u64,
) -> Vec<(SpeciesId, Vec<Instance>)> {
    let leaf = veg.quadtree().leaf_m();
    let mut s = seed | 1;
    (0..n)
        .map(|i| {
            let corner = Vec2::new(xorshift(&mut s), xorshift(&mut s)) * (side - leaf) - side / 2.0;
            // Snap to the tile grid so the whole patch lies in one tile.
            let tile_min = (corner / leaf).floor() * leaf;
            let inst = (0..per)
                .map(|_| {
                    let p =
                        tile_min + Vec2::new(xorshift(&mut s), xorshift(&mut s)) * (leaf * 0.999);
                    Instance {
                        scale: 0.5 + xorshift(&mut s),
                        yaw: xorshift(&mut s) * std::f32::consts::TAU,
                        ..Instance::at(Vec3::new(p.x, 0.0, p.y))
                    }
                })
                .collect();
            (species[i % species.len()], inst)
        })
        .collect()
}

#[test]
fn bad_patches_are_typed_errors_and_allocate_nothing() {
    let Some(ctx) = common::context("bad_patches") else {
        return;
    };
    let mut veg = Vegetation::new(&ctx, VegetationConfig::default()).unwrap();
    let grass = species(&mut veg, "grass", [40, 160, 40, 255]);
    let before = ctx.memory().stats().categories[Category::Instances];
    let ok = Instance::at(Vec3::new(1.0, 0.0, 1.0));
    let cases: Vec<(&str, Vec<Instance>)> = vec![
        ("empty", vec![]),
        (
            "nan position",
            vec![Instance::at(Vec3::new(f32::NAN, 0.0, 0.0))],
        ),
        (
            "inf scale",
            vec![Instance {
                scale: f32::INFINITY,
                ..ok
            }],
        ),
        ("zero scale", vec![Instance { scale: 0.0, ..ok }]),
        (
            "nan yaw",
            vec![Instance {
                yaw: f32::NAN,
                ..ok
            }],
        ),
        (
            "outside the world",
            vec![Instance::at(Vec3::new(1e6, 0.0, 0.0))],
        ),
        (
            "two tiles",
            vec![ok, Instance::at(Vec3::new(100.0, 0.0, 1.0))],
        ),
        ("too many", vec![ok; 65_537]),
    ];
    for (what, instances) in cases {
        let err = veg
            .spawn(&PatchDesc {
                species: grass,
                instances: &instances,
            })
            .unwrap_err();
        assert!(matches!(err, Error::InvalidInput(_)), "{what}: {err}");
    }
    let gone = species(&mut veg, "gone", [1, 2, 3, 4]);
    veg.unregister_species(gone).unwrap();
    let err = veg
        .spawn(&PatchDesc {
            species: gone,
            instances: &[ok],
        })
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput(_)),
        "unknown species: {err}"
    );
    assert_eq!(ctx.memory().stats().categories[Category::Instances], before);
    assert_eq!(veg.stats().patches, 0);

    let id = veg
        .spawn(&PatchDesc {
            species: grass,
            instances: &[ok],
        })
        .unwrap();
    veg.despawn(id).unwrap();
    assert!(
        matches!(veg.despawn(id), Err(Error::InvalidInput(_))),
        "double despawn"
    );
    assert!(veg.patch_gpu(id).is_err(), "stale id");
    let too_big = vec![0u8; 4096 * 4096 * 4];
    let err = veg
        .register_species(&SpeciesDesc {
            name: "huge",
            width: 4096,
            height: 4096,
            rgba8: &too_big,
        })
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput(_)),
        "region larger than a page: {err}"
    );
    assert!(matches!(
        veg.unregister_species(gone),
        Err(Error::InvalidInput(_))
    ));
    let id = veg
        .spawn(&PatchDesc {
            species: grass,
            instances: &[ok],
        })
        .unwrap();
    assert!(
        matches!(veg.unregister_species(grass), Err(Error::InvalidInput(_))),
        "in use"
    );
    veg.despawn(id).unwrap();
    veg.unregister_species(grass).unwrap();
    let nan = ctx.begin_frame().unwrap();
    assert!(
        matches!(veg.update(&nan, Vec3::NAN), Err(Error::InvalidInput(_))),
        "NaN camera"
    );
    drop(nan);
    // A frame of another context is refused before anything happens.
    if let Some(other) = common::context("bad_patches other") {
        let foreign = other.begin_frame().unwrap();
        assert!(matches!(
            veg.update(&foreign, Vec3::ZERO),
            Err(Error::Lifecycle(_))
        ));
        drop(foreign);
        common::finish(other, "bad patches other");
    }
    drop(veg);
    common::finish(ctx, "bad patches");
}

#[test]
fn a_million_instances_fly_over_with_a_squeezed_budget() {
    let test = "a_million_instances_fly_over";
    let Some(ctx) = common::context(test) else {
        return;
    };
    let heap_size = Arc::new(AtomicU64::new(100 * MIB));
    ctx.memory()
        .set_budget_source(HeapBudgets::new(Box::new(Scripted {
            heaps: ctx.memory().heaps().to_vec(),
            size: heap_size.clone(),
        })))
        .unwrap();
    let mut config = VegetationConfig {
        atlas_page_px: 512,
        ..Default::default()
    };
    config.controller.cap_bytes = 64 * MIB;
    config.residency.max_upload_bytes_per_frame = 8 * MIB;
    let mut veg = Vegetation::new(&ctx, config).unwrap();
    let kinds = [
        species(&mut veg, "grass", [60, 170, 60, 255]),
        species(&mut veg, "fern", [30, 120, 50, 255]),
        species(&mut veg, "birch", [200, 200, 180, 255]),
    ];
    let world = patches(&veg, 10_000, 100, 1024.0, &kinds, 42);
    let mut ids = Vec::with_capacity(world.len());
    for (sp, inst) in &world {
        ids.push(
            veg.spawn(&PatchDesc {
                species: *sp,
                instances: inst,
            })
            .unwrap(),
        );
    }
    assert_eq!(veg.stats().instances, 1_000_000);

    let mut ring = FrameRing::new(&ctx).unwrap();
    let settle = ctx.frames_in_flight() as usize + 2;
    let (squeeze_at, recover_at, frames) = (60usize, 120usize, 200usize);
    let mut peak_held = 0;
    let mut refusals_seen = false;
    for f in 0..frames {
        if f == squeeze_at {
            heap_size.store(25 * MIB, Ordering::Relaxed); // a quarter
        }
        if f == recover_at {
            heap_size.store(100 * MIB, Ordering::Relaxed);
        }
        let x = -700.0 + 1400.0 * f as f32 / frames as f32;
        let camera = Vec3::new(x, 30.0, 80.0 * (f as f32 * 0.05).sin());
        let report = frame(&ctx, &mut veg, &mut ring, camera);

        let stats = veg.stats();
        let c = &stats.memory.categories;
        let held = c[Category::Instances].live_bytes + c[Category::Atlas].live_bytes;
        peak_held = peak_held.max(held);
        refusals_seen |= stats.refused_uploads > 0;
        let since_change = if f >= recover_at {
            f - recover_at
        } else if f >= squeeze_at {
            f - squeeze_at
        } else {
            f
        };
        if since_change >= settle {
            assert!(
                held <= report.decision.budget,
                "frame {f}: held {held} > budget {} ({} frames after the change)",
                report.decision.budget,
                since_change
            );
        }
        if f == recover_at - 1 {
            assert!(
                report.decision.budget <= 10 * MIB,
                "squeezed budget {}",
                report.decision.budget
            );
            assert!(stats.quality < 1.0, "quality stepped down under pressure");
            assert!(stats.evictions > 0, "far tiles were evicted");
        }
        if f == squeeze_at - 1 {
            assert!(stats.resident_tiles > 100, "tiles streamed in: {stats:?}");
            assert!(
                stats.lod_instances.full
                    + stats.lod_instances.medium
                    + stats.lod_instances.billboard
                    > 0
            );
        }
    }
    let stats = veg.stats();
    eprintln!(
        "after {} frames: peak held {:.1} MiB, {} evictions, {} uploads, {} refused, {} deferred frees, quality {:.2}",
        stats.frames,
        peak_held as f64 / MIB as f64,
        stats.evictions,
        stats.uploads,
        stats.refused_uploads,
        stats.memory.frees_completed,
        stats.quality
    );
    assert!(stats.memory.frees_completed > 0);
    let _ = refusals_seen;

    // The GPU cull pass over the resident patches, many tile allocations, matches the CPU.
    let view = understory::gpu::cull::CullView::new(
        glam::Mat4::perspective_rh(1.2, 1.5, 0.5, 1000.0)
            * glam::Mat4::look_at_rh(
                Vec3::new(0.0, 30.0, 0.0),
                Vec3::new(0.0, 20.0, -100.0),
                Vec3::Y,
            ),
        Vec3::new(0.0, 30.0, 0.0),
        1.0,
        &veg.config().lod,
        1.0,
    )
    .unwrap();
    let sources = veg.cull_sources();
    assert!(sources.len() > 100, "{} resident patches", sources.len());
    let mut pass = understory::gpu::cull::CullPass::new(
        &ctx,
        understory::gpu::cull::Compaction::Atomic,
        1 << 20,
        [Default::default(); 3],
    )
    .unwrap();
    let read = ctx
        .create_buffer(&understory::gpu::memory::BufferDesc {
            name: "cull counters readback",
            size: 32,
            usage: ash::vk::BufferUsageFlags::TRANSFER_DST,
            location: understory::gpu::memory::MemoryLocation::GpuToCpu,
            category: Category::Other,
        })
        .unwrap();
    let gpu_sources: Vec<_> = sources.iter().map(|(s, _)| *s).collect();
    ctx.submit_and_wait(|frame, cmd| {
        read.used_in(frame)?;
        // SAFETY: recording for `frame`; the pass marks its sources and counters used by
        // it, `read` is marked above.
        unsafe {
            pass.record(frame, cmd, &gpu_sources, &view)?;
            let region = ash::vk::BufferCopy {
                src_offset: 0,
                dst_offset: 0,
                size: 32,
            };
            ctx.device()
                .cmd_copy_buffer(cmd, pass.counters()?.raw(), read.raw(), &[region]);
            let b = [ash::vk::MemoryBarrier::default()
                .src_access_mask(ash::vk::AccessFlags::TRANSFER_WRITE)
                .dst_access_mask(ash::vk::AccessFlags::HOST_READ)];
            ctx.device().cmd_pipeline_barrier(
                cmd,
                ash::vk::PipelineStageFlags::TRANSFER,
                ash::vk::PipelineStageFlags::HOST,
                ash::vk::DependencyFlags::empty(),
                &b,
                &[],
                &[],
            );
        }
        Ok(())
    })
    .unwrap();
    let counters: [u32; 8] = bytemuck::pod_read_unaligned(&read.mapped().unwrap());
    let cpu_sources: Vec<(&[Instance], u32)> = sources.iter().map(|(s, i)| (*i, s.base)).collect();
    let want = understory::gpu::cull::cull_cpu(&cpu_sources, &view);
    for (l, list) in want.lists.iter().enumerate() {
        assert_eq!(
            counters[l] as usize,
            list.len(),
            "LOD {l} over {} patches",
            sources.len()
        );
    }
    drop(sources);
    drop((read, pass));
    // Churn: despawn half, the rest stays; then drop everything.
    for id in ids.iter().step_by(2) {
        veg.despawn(*id).unwrap();
    }
    assert_eq!(veg.stats().instances, 500_000);
    drop((veg, ring));
    common::finish(ctx, test);
}

#[test]
fn patches_spawned_into_resident_tiles_are_uploaded() {
    let Some(ctx) = common::context("patches_spawned_into_resident_tiles") else {
        return;
    };
    let mut veg = Vegetation::new(&ctx, VegetationConfig::default()).unwrap();
    let grass = species(&mut veg, "grass", [40, 160, 40, 255]);
    let mut ring = FrameRing::new(&ctx).unwrap();
    let mut frame = |veg: &mut Vegetation| {
        frame(&ctx, veg, &mut ring, Vec3::new(5.0, 2.0, 5.0));
    };
    let a = veg
        .spawn(&PatchDesc {
            species: grass,
            instances: &[Instance::at(Vec3::new(1.0, 0.0, 1.0))],
        })
        .unwrap();
    frame(&mut veg);
    assert!(veg.patch_gpu(a).unwrap().is_some(), "first patch uploaded");
    let b = veg
        .spawn(&PatchDesc {
            species: grass,
            instances: &[Instance::at(Vec3::new(2.0, 0.0, 2.0))],
        })
        .unwrap();
    frame(&mut veg);
    let gpu = veg
        .patch_gpu(b)
        .unwrap()
        .expect("a patch spawned into a resident tile is uploaded");
    assert_eq!(gpu.instance_bytes, 32);
    assert!(gpu.bytes >= 32);
    assert_eq!(
        gpu.node,
        veg.quadtree().leaf_at(Vec3::new(2.0, 0.0, 2.0)).unwrap()
    );
    drop((veg, ring));
    common::finish(ctx, "resident tile spawn");
}

/// Uploads are never lost and never copy from freed staging: staged and not recorded for a few
/// frames, then recorded into a frame that is dropped unsubmitted (its commands never run), the
/// instances still reach the GPU with the next recorded and submitted frame, byte for byte.
#[test]
fn uploads_survive_frames_that_skip_record_or_are_dropped() {
    let Some(ctx) = common::context("uploads_survive_dropped_frames") else {
        return;
    };
    let mut veg = Vegetation::new(&ctx, VegetationConfig::default()).unwrap();
    let grass = species(&mut veg, "grass", [40, 160, 40, 255]);
    let instances: Vec<Instance> = (0..100)
        .map(|i| Instance::at(Vec3::new(1.0 + i as f32 * 0.1, 0.0, 2.0)))
        .collect();
    let id = veg
        .spawn(&PatchDesc {
            species: grass,
            instances: &instances,
        })
        .unwrap();
    let camera = Vec3::new(5.0, 2.0, 5.0);
    // Two frames that update (staging the upload) but record nothing and submit nothing.
    for _ in 0..2 {
        let frame = ctx.begin_frame().unwrap();
        veg.update(&frame, camera).unwrap();
        drop(frame);
    }
    let gpu = veg.patch_gpu(id).unwrap().expect("resident");
    assert!(!gpu.uploaded(), "staged, not recorded");
    // Recorded into a frame that is then dropped: the commands never run.
    let mut ring = FrameRing::new(&ctx).unwrap();
    {
        let frame = ctx.begin_frame().unwrap();
        veg.update(&frame, camera).unwrap();
        let cmd = ring.begin(&frame).unwrap();
        // SAFETY: recording for `frame`; the frame is dropped unsubmitted, so nothing runs.
        unsafe { veg.record(&frame, cmd.raw()).unwrap() };
        assert!(
            veg.patch_gpu(id).unwrap().unwrap().uploaded(),
            "in this frame"
        );
        drop(cmd);
        drop(frame);
    }
    assert!(
        !veg.patch_gpu(id).unwrap().unwrap().uploaded(),
        "its frame was dropped"
    );
    // The next frame records and submits it: the buffer holds the instances.
    frame(&ctx, &mut veg, &mut ring, camera);
    let gpu = veg.patch_gpu(id).unwrap().expect("resident");
    assert!(gpu.uploaded());
    let bytes = gpu.instance_bytes;
    let read = ctx
        .create_buffer(&understory::gpu::memory::BufferDesc {
            name: "patch readback",
            size: bytes,
            usage: ash::vk::BufferUsageFlags::TRANSFER_DST,
            location: understory::gpu::memory::MemoryLocation::GpuToCpu,
            category: Category::Other,
        })
        .unwrap();
    let src = &veg.patch_gpu(id).unwrap().unwrap().buffer;
    ctx.submit_and_wait(|frame, cmd| {
        src.used_in(frame)?;
        read.used_in(frame)?;
        // SAFETY: recording for `frame`; both buffers are marked used by it; the copy follows
        // the upload's frame on the same queue (and its closing barrier).
        unsafe {
            ctx.device().cmd_copy_buffer(
                cmd,
                src.raw(),
                read.raw(),
                &[ash::vk::BufferCopy {
                    src_offset: 0,
                    dst_offset: 0,
                    size: bytes,
                }],
            );
            understory::gpu::compute::memory_barrier(
                ctx.device(),
                cmd,
                (
                    ash::vk::PipelineStageFlags::TRANSFER,
                    ash::vk::AccessFlags::TRANSFER_WRITE,
                ),
                (
                    ash::vk::PipelineStageFlags::HOST,
                    ash::vk::AccessFlags::HOST_READ,
                ),
            );
        }
        Ok(())
    })
    .unwrap();
    let view = read.mapped().unwrap();
    let got: &[Instance] = bytemuck::cast_slice(&view);
    for (g, want) in got.iter().zip(&instances) {
        assert_eq!(g.position, want.position);
        assert_eq!(g.scale, want.scale);
    }
    assert_eq!(got.len(), instances.len());
    drop(view);
    drop((read, veg, ring));
    common::finish(ctx, "uploads survive dropped frames");
}
