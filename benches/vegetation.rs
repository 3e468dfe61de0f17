//! The vegetation facade's CPU cost per frame and per spawn/despawn, on the real driver.
//!
//! The world: `VegetationConfig { world_size_m: 3200, leaf_tile_m: 32, world_origin: -1600,
//! atlas_page_px: 512 }`. The quadtree rounds the tile count per side up to a power of two
//! (3200 / 32 = 100 -> 128), so the real leaves are 25 m across; the world fills a centred block
//! of 100 x 100 of them, i.e. exactly 10,000 occupied leaf tiles, each holding 10 patches of 10
//! instances (100,000 patches, 1,000,000 instances, 3 species).
//!
//! - `frame_cpu/10k_tiles_100k_patches`: after ~100 warm-up frames (camera 30 m up, moving 1 m a
//!   frame on a 400 m circle, so tiles keep streaming in and out at a steady rate), one
//!   iteration is one frame, and only `Context::begin_frame` + `Vegetation::update` are timed.
//!   `FrameRing::begin`, `Vegetation::record`, `FrameRing::submit`, `Vegetation::end_frame` and a
//!   wait for that submission run outside the timing; the wait keeps `begin_frame`'s
//!   frames-in-flight throttle (GPU time, not CPU time) out of the number. Target: < 0.5 ms a
//!   frame on a 2-core machine. Before criterion runs, a breakdown over 200 frames is printed:
//!   mean `begin_frame` and mean `update` in µs, plus resident tiles and instances.
//! - `churn/spawn_despawn_1000_patches`: spawning 1000 patches of 64 instances (each inside one
//!   occupied tile, spread over the world) and despawning all of them, with no frame in between
//!   (pure CPU). Throughput is in patches (criterion prints patches/s).
//! - `churn/spawn_update_despawn`: with the camera fixed at the world's west edge, 100 patches are
//!   spawned in empty tiles within draw distance (so they become resident and are uploaded), one
//!   full frame runs (begin_frame, update, record, submit, end_frame), all 100 are despawned and a
//!   second full frame runs; the whole iteration is timed.
//!
//! Run with `cargo bench --bench vegetation`. The device is picked as in the app
//! (`UNDERSTORY_DEVICE` honoured); validation is off. Without a usable Vulkan device the bench
//! prints `*** SKIPPED vegetation bench ... ***` and exits successfully.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use glam::{Vec2, Vec3};
use understory::gpu::context::{Context, ContextOptions, Frame};
use understory::gpu::frame::FrameRing;
use understory::gpu::instance::{InstanceOptions, Validation};
use understory::vegetation::{
    PatchDesc, PatchId, SpeciesDesc, SpeciesId, UpdateReport, Vegetation, VegetationConfig,
};
use understory::world::instance::Instance;

/// Occupied tiles per side of the world's block.
const BLOCK: u32 = 100;
/// Patches per occupied tile.
const PATCHES_PER_TILE: usize = 10;
/// Instances per world patch.
const INSTANCES_PER_PATCH: usize = 10;
/// Warm-up frames before anything is measured.
const WARMUP_FRAMES: u64 = 100;
/// Frames of the printed breakdown.
const BREAKDOWN_FRAMES: u64 = 200;
/// Camera height, metres.
const CAMERA_Y: f32 = 30.0;
/// Radius of the camera's circle, metres (1 m a frame along it).
const CAMERA_RADIUS: f32 = 400.0;
/// Patches per iteration of `churn/spawn_despawn_1000_patches`, and their instances.
const CHURN_PATCHES: usize = 1000;
const CHURN_INSTANCES: usize = 64;
/// Patches per iteration of `churn/spawn_update_despawn`.
const NEAR_PATCHES: usize = 100;

fn xorshift(s: &mut u64) -> f32 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    (*s >> 40) as f32 / (1u64 << 24) as f32
}

fn config() -> VegetationConfig {
    VegetationConfig {
        world_size_m: 3200.0,
        leaf_tile_m: 32.0,
        world_origin: Vec2::splat(-1600.0),
        atlas_page_px: 512,
        ..Default::default()
    }
}

fn species(veg: &mut Vegetation, name: &str, color: [u8; 4]) -> SpeciesId {
    let px: Vec<u8> = color.iter().copied().cycle().take(16 * 32 * 4).collect();
    veg.register_species(&SpeciesDesc {
        name,
        width: 16,
        height: 32,
        rgba8: &px,
    })
    .expect("register_species")
}

/// First leaf index of the centred block of occupied tiles, per axis.
fn block_start(veg: &Vegetation) -> u32 {
    (veg.quadtree().leaves_per_side() - BLOCK) / 2
}

/// `per` random instances inside leaf tile (`tx`, `ty`).
fn tile_instances(veg: &Vegetation, tx: u32, ty: u32, per: usize, s: &mut u64) -> Vec<Instance> {
    let q = veg.quadtree();
    let leaf = q.leaf_m();
    let min = q.origin + Vec2::new(tx as f32, ty as f32) * leaf;
    (0..per)
        .map(|_| {
            // Inset from the edges so float rounding never moves an instance to a neighbour.
            let p = min
                + Vec2::splat(leaf * 0.001)
                + Vec2::new(xorshift(s), xorshift(s)) * leaf * 0.998;
            Instance {
                scale: 0.5 + xorshift(s),
                yaw: xorshift(s) * std::f32::consts::TAU,
                ..Instance::at(Vec3::new(p.x, 0.0, p.y))
            }
        })
        .collect()
}

fn spawn(veg: &mut Vegetation, species: SpeciesId, instances: &[Instance]) -> PatchId {
    veg.spawn(&PatchDesc { species, instances }).expect("spawn")
}

/// The camera of frame `f`: 1 m a frame along a circle around the world's centre.
fn camera(f: u64) -> Vec3 {
    let a = f as f32 / CAMERA_RADIUS;
    Vec3::new(CAMERA_RADIUS * a.cos(), CAMERA_Y, CAMERA_RADIUS * a.sin())
}

/// The frame loop's pieces.
struct Frames {
    ring: FrameRing,
    /// Frames run so far (the camera's clock).
    count: u64,
}

/// What one frame cost on the CPU.
struct FrameTimes {
    begin: Duration,
    update: Duration,
    report: UpdateReport,
}

impl Frames {
    /// One full frame at `camera`: `begin_frame` and `update` timed, then record, submit,
    /// end_frame and a wait for the submission (untimed).
    fn run(&mut self, ctx: &Context, veg: &mut Vegetation, camera: Vec3) -> FrameTimes {
        let t0 = Instant::now();
        let start = ctx.begin_frame().expect("begin_frame");
        let t1 = Instant::now();
        let report = veg.update(&start, camera).expect("update");
        let t2 = Instant::now();
        self.finish(ctx, veg, start);
        FrameTimes {
            begin: t1 - t0,
            update: t2 - t1,
            report,
        }
    }

    /// The untimed rest of a frame: record, submit, wait for the GPU.
    fn finish(&mut self, ctx: &Context, veg: &mut Vegetation, frame: Frame) {
        let cmd = self.ring.begin(&frame).expect("ring.begin");
        // SAFETY: cmd was just begun by the ring for `frame` (recording, primary, outside a
        // render pass) and is submitted right below as its submission.
        unsafe { veg.record(&frame, cmd.raw()).expect("record") };
        let done = self.ring.submit(frame, cmd).expect("submit");
        ctx.wait(done.value(), Duration::from_secs(30))
            .expect("frame completes within 30 s");
        self.count += 1;
    }

    /// The next frame on the camera's circle.
    fn step(&mut self, ctx: &Context, veg: &mut Vegetation) -> FrameTimes {
        self.run(ctx, veg, camera(self.count))
    }
}

/// Resident patches and instances among `ids`.
fn resident(veg: &Vegetation, ids: &[PatchId]) -> (u64, u64) {
    ids.iter()
        .filter_map(|id| veg.patch_gpu(*id).expect("live patch"))
        .fold((0, 0), |(p, i), gpu| {
            (p + 1, i + gpu.instance_bytes / size_of::<Instance>() as u64)
        })
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn vegetation(c: &mut Criterion) {
    let options = ContextOptions {
        instance: InstanceOptions {
            validation: Validation::Off,
            ..Default::default()
        },
        ..Default::default()
    }
    .with_env();
    let ctx = match options.and_then(|o| Context::new(&o)) {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("*** SKIPPED vegetation bench: {e} ***");
            return;
        }
    };
    let adapter = ctx.adapter();
    println!(
        "vegetation bench on {} ({}, {:?})",
        adapter.name, adapter.driver, adapter.device_type
    );

    // The world.
    let built = Instant::now();
    let mut veg = Vegetation::new(&ctx, config()).expect("Vegetation::new");
    let kinds = [
        species(&mut veg, "grass", [60, 170, 60, 255]),
        species(&mut veg, "fern", [30, 120, 50, 255]),
        species(&mut veg, "birch", [200, 200, 180, 255]),
    ];
    let start = block_start(&veg);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut world = Vec::with_capacity((BLOCK * BLOCK) as usize * PATCHES_PER_TILE);
    for ty in start..start + BLOCK {
        for tx in start..start + BLOCK {
            for k in 0..PATCHES_PER_TILE {
                let inst = tile_instances(&veg, tx, ty, INSTANCES_PER_PATCH, &mut seed);
                world.push(spawn(&mut veg, kinds[k % kinds.len()], &inst));
            }
        }
    }
    let s = veg.stats();
    assert_eq!(s.tiles, u64::from(BLOCK * BLOCK), "occupied tiles");
    assert_eq!(s.patches, world.len() as u64);
    assert_eq!(s.instances, 1_000_000);
    println!(
        "world: {} occupied tiles of {:.0} m ({}x{} leaves), {} patches, {} instances, built in {:.0} ms",
        s.tiles,
        veg.quadtree().leaf_m(),
        veg.quadtree().leaves_per_side(),
        veg.quadtree().leaves_per_side(),
        s.patches,
        s.instances,
        built.elapsed().as_secs_f64() * 1e3
    );

    let mut frames = Frames {
        ring: FrameRing::new(&ctx).expect("FrameRing"),
        count: 0,
    };
    let warm = Instant::now();
    for _ in 0..WARMUP_FRAMES {
        frames.step(&ctx, &mut veg);
    }
    println!(
        "warm-up: {WARMUP_FRAMES} frames in {:.0} ms",
        warm.elapsed().as_secs_f64() * 1e3
    );

    // The breakdown, outside criterion.
    let (mut begin, mut update) = (Vec::new(), Vec::new());
    let (mut busy_frames, mut busy_update, mut uploads, mut evictions) =
        (0u32, Duration::ZERO, 0usize, 0usize);
    let wall = Instant::now();
    for _ in 0..BREAKDOWN_FRAMES {
        let t = frames.step(&ctx, &mut veg);
        begin.push(t.begin);
        update.push(t.update);
        if t.report.uploaded_patches > 0 || t.report.evicted_tiles > 0 {
            busy_frames += 1;
            busy_update += t.update;
        }
        uploads += t.report.uploaded_patches;
        evictions += t.report.evicted_tiles;
    }
    let wall = wall.elapsed();
    let mean = |v: &[Duration]| micros(v.iter().sum::<Duration>()) / v.len() as f64;
    let max = |v: &[Duration]| micros(v.iter().copied().max().unwrap_or_default());
    let s = veg.stats();
    let (res_patches, res_instances) = resident(&veg, &world);
    println!(
        "breakdown over {BREAKDOWN_FRAMES} frames: begin_frame mean {:.1} µs (max {:.1}), update mean {:.1} µs (max {:.1}), sum {:.1} µs/frame; \
         {busy_frames} frames uploaded or evicted (update mean {:.1} µs on those), {uploads} patch uploads, {evictions} tile evictions; \
         whole frame incl. record/submit/wait {:.1} µs",
        mean(&begin),
        max(&begin),
        mean(&update),
        max(&update),
        mean(&begin) + mean(&update),
        if busy_frames > 0 {
            micros(busy_update) / f64::from(busy_frames)
        } else {
            0.0
        },
        micros(wall) / BREAKDOWN_FRAMES as f64
    );
    println!(
        "residency: {} of {} tiles resident, {res_patches} patches / {res_instances} instances resident, \
         LOD instances full {} medium {} billboard {} culled {}, quality {:.2}, held {:.2} MiB of a {:.0} MiB budget",
        s.resident_tiles,
        s.tiles,
        s.lod_instances.full,
        s.lod_instances.medium,
        s.lod_instances.billboard,
        s.lod_instances.culled,
        s.quality,
        s.held as f64 / (1 << 20) as f64,
        s.budget as f64 / (1 << 20) as f64
    );

    // frame_cpu: one frame an iteration; only begin_frame + update are timed.
    let mut group = c.benchmark_group("frame_cpu");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    let wall = Instant::now();
    let before = frames.count;
    group.bench_function("10k_tiles_100k_patches", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let t = frames.step(&ctx, &mut veg);
                black_box(&t.report);
                timed += t.begin + t.update;
            }
            timed
        })
    });
    group.finish();
    println!(
        "frame_cpu: {} frames in {:.1} s of wall time",
        frames.count - before,
        wall.elapsed().as_secs_f64()
    );

    // churn/spawn_despawn_1000_patches: pure CPU, into occupied tiles all over the world.
    let churn: Vec<(SpeciesId, Vec<Instance>)> = (0..CHURN_PATCHES)
        .map(|i| {
            let tx = start + (xorshift(&mut seed) * BLOCK as f32) as u32 % BLOCK;
            let ty = start + (xorshift(&mut seed) * BLOCK as f32) as u32 % BLOCK;
            let inst = tile_instances(&veg, tx, ty, CHURN_INSTANCES, &mut seed);
            (kinds[i % kinds.len()], inst)
        })
        .collect();
    let mut group = c.benchmark_group("churn");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(CHURN_PATCHES as u64));
    let mut ids = Vec::with_capacity(CHURN_PATCHES);
    group.bench_function("spawn_despawn_1000_patches", |b| {
        b.iter(|| {
            for (sp, inst) in &churn {
                ids.push(spawn(&mut veg, *sp, inst));
            }
            for id in ids.drain(..) {
                veg.despawn(id).expect("despawn");
            }
        })
    });
    assert_eq!(veg.stats().patches, world.len() as u64);

    // churn/spawn_update_despawn: the camera parks at the block's west edge; the patches go in
    // a 10 x 10 block of empty leaves just west of it (new tiles, so they are uploaded).
    let q = *veg.quadtree();
    let leaf = q.leaf_m();
    let west = q.origin.x + start as f32 * leaf;
    let mid = q.origin.y + (start + BLOCK / 2) as f32 * leaf;
    let park = Vec3::new(west + 10.0, CAMERA_Y, mid);
    let near: Vec<(SpeciesId, Vec<Instance>)> = (0..NEAR_PATCHES as u32)
        .map(|i| {
            let (tx, ty) = (start - 10 + i % 10, start + BLOCK / 2 - 5 + i / 10);
            let inst = tile_instances(&veg, tx, ty, CHURN_INSTANCES, &mut seed);
            (kinds[i as usize % kinds.len()], inst)
        })
        .collect();
    // Settle at the parked camera: uploads around it, and the circle's tiles culled long enough
    // to be evicted, so the timed frames see only this bench's own changes.
    let settle = Instant::now();
    let mut settle_frames = 0;
    loop {
        let t = frames.run(&ctx, &mut veg, park);
        settle_frames += 1;
        if settle_frames > 130 && t.report.uploaded_patches == 0 && t.report.evicted_tiles == 0 {
            break;
        }
    }
    // One checked round: every spawned patch is uploaded in the first frame.
    for (sp, inst) in &near {
        ids.push(spawn(&mut veg, *sp, inst));
    }
    let t = frames.run(&ctx, &mut veg, park);
    let uploaded = ids
        .iter()
        .filter(|id| veg.patch_gpu(**id).expect("live").is_some())
        .count();
    println!(
        "spawn_update_despawn: settled in {settle_frames} frames ({:.0} ms); first frame uploaded {} patches, {uploaded}/{NEAR_PATCHES} of ours resident",
        settle.elapsed().as_secs_f64() * 1e3,
        t.report.uploaded_patches
    );
    assert_eq!(uploaded, NEAR_PATCHES, "the near patches become resident");
    for id in ids.drain(..) {
        veg.despawn(id).expect("despawn");
    }
    frames.run(&ctx, &mut veg, park);

    group.throughput(Throughput::Elements(NEAR_PATCHES as u64));
    group.bench_function("spawn_update_despawn", |b| {
        b.iter_custom(|iters| {
            let t0 = Instant::now();
            for _ in 0..iters {
                for (sp, inst) in &near {
                    ids.push(spawn(&mut veg, *sp, inst));
                }
                let t = frames.run(&ctx, &mut veg, park);
                assert_eq!(t.report.uploaded_patches, NEAR_PATCHES);
                for id in ids.drain(..) {
                    veg.despawn(id).expect("despawn");
                }
                frames.run(&ctx, &mut veg, park);
            }
            t0.elapsed()
        })
    });
    group.finish();

    // A patch spawned into a tile that is already resident: does it get uploaded?
    let (tx, ty) = (start, start + BLOCK / 2);
    let resident_tile_patch = tile_instances(&veg, tx, ty, INSTANCES_PER_PATCH, &mut seed);
    let id = spawn(&mut veg, kinds[0], &resident_tile_patch);
    for _ in 0..3 {
        frames.run(&ctx, &mut veg, park);
    }
    println!(
        "a patch spawned into an already resident tile (0 m from the camera) is resident after 3 frames: {}",
        veg.patch_gpu(id).expect("live").is_some()
    );
    veg.despawn(id).expect("despawn");
    frames.run(&ctx, &mut veg, park);

    let s = veg.stats();
    println!(
        "end: {} frames, {} uploads, {} evictions, {} refused uploads, {} deferred frees completed",
        s.frames, s.uploads, s.evictions, s.refused_uploads, s.memory.frees_completed
    );
    drop((veg, frames));
    let report = ctx.shutdown().expect("shutdown");
    assert!(report.leaks.is_empty(), "leaked: {:?}", report.leaks);
}

criterion_group!(benches, vegetation);
criterion_main!(benches);
