//! Outside pressure on the real driver path, without a second process: an injected budget
//! source plays what `understory soak --pressure` makes a child process do on NVIDIA — another
//! process takes VRAM in steps until the driver's `heapBudget` leaves vegetation less than it
//! holds, then gives it back. Vegetation follows the driver's numbers down and up: held inside
//! the budget once settled, something drawable every frame, full quality within 60 frames of the
//! pressure ending. And the driver refusing memory outright (`VK_ERROR_OUT_OF_DEVICE_MEMORY`) is
//! pressure, never an error out of `update`.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use glam::{Vec2, Vec3};
use understory::gpu::adapter::HeapInfo;
use understory::gpu::budget::{
    BudgetSource, Clamp, DriverNumbers, HeapBudgets, RawHeap, Source, estimated_budget,
};
use understory::gpu::context::Context;
use understory::gpu::frame::FrameRing;
use understory::gpu::memory::HeapReport;
use understory::policy::controller::ControllerConfig;
use understory::vegetation::{PatchDesc, SpeciesDesc, SpeciesId, Vegetation, VegetationConfig};
use understory::world::instance::Instance;

const MIB: u64 = 1 << 20;
/// What the rest of the engine holds in the heap (its render targets): the driver's heapUsage
/// minus ours.
const FOREIGN: u64 = 64 * MIB;
/// Frames after the budget falls before held must be inside it (frames in flight, then frees).
const SETTLE: usize = 8;

/// `VK_EXT_memory_budget` numbers as a driver reports them while another process takes VRAM:
/// `heapBudget` from the script, `heapUsage` = what understory holds + the engine's own bytes.
struct Driver {
    heaps: Vec<HeapInfo>,
    device_heap: usize,
    budget: Arc<AtomicU64>,
    ours: u64,
}

impl BudgetSource for Driver {
    fn observe_ours(&mut self, ours: &[u64]) {
        self.ours = ours.get(self.device_heap).copied().unwrap_or(0);
    }

    fn query(&mut self) -> understory::Result<Vec<RawHeap>> {
        Ok(self
            .heaps
            .iter()
            .enumerate()
            .map(|(i, h)| RawHeap {
                info: *h,
                driver: Some(if i == self.device_heap {
                    DriverNumbers {
                        budget: self.budget.load(Ordering::Relaxed).min(h.size),
                        usage: self.ours + FOREIGN,
                    }
                } else {
                    DriverNumbers {
                        budget: h.size / 2,
                        usage: 0,
                    }
                }),
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

fn species(veg: &mut Vegetation) -> SpeciesId {
    let px: Vec<u8> = [60u8, 170, 60, 255]
        .iter()
        .copied()
        .cycle()
        .take(32 * 64 * 4)
        .collect();
    veg.register_species(&SpeciesDesc {
        name: "pine",
        width: 32,
        height: 64,
        rgba8: &px,
    })
    .expect("species")
}

/// `n` patches of `per` trees, each inside one tile of a `side` m square at the origin.
fn forest(veg: &mut Vegetation, n: usize, per: usize, side: f32, seed: u64) {
    let sp = species(veg);
    let leaf = veg.quadtree().leaf_m();
    let mut s = seed | 1;
    for _ in 0..n {
        let corner = Vec2::new(xorshift(&mut s), xorshift(&mut s)) * (side - leaf) - side / 2.0;
        let tile_min = (corner / leaf).floor() * leaf;
        let inst: Vec<Instance> = (0..per)
            .map(|_| {
                let p = tile_min + Vec2::new(xorshift(&mut s), xorshift(&mut s)) * (leaf * 0.999);
                Instance::at(Vec3::new(p.x, 0.0, p.y))
            })
            .collect();
        veg.spawn(&PatchDesc {
            species: sp,
            instances: &inst,
        })
        .expect("spawn");
    }
}

/// One frame; returns the update's report and the device-local heap as the frame read it.
fn frame(
    ctx: &Context,
    veg: &mut Vegetation,
    ring: &mut FrameRing,
    camera: Vec3,
) -> (understory::vegetation::UpdateReport, HeapReport) {
    let frame = ctx.begin_frame().expect("begin_frame");
    let heap = frame.heaps()[ctx.memory().device_local_heap()].clone();
    let report = veg.update(&frame, camera).expect("update never fails");
    let cmd = ring.begin(&frame).unwrap();
    // SAFETY: cmd is recording for `frame` and is submitted right below as its submission.
    unsafe { veg.record(&frame, cmd.raw()).unwrap() };
    ring.submit(frame, cmd).unwrap();
    (report, heap)
}

/// The driver's heapBudget per frame, MiB: plenty, then another process takes VRAM in five
/// five steps until vegetation's share ((heapBudget - foreign) / 2) is less than it holds, holds it
/// there, and gives it back in two steps.
fn trajectory(f: usize) -> u64 {
    let mib = match f {
        0..40 => 4096,
        40..50 => 200,
        50..60 => 140,
        60..70 => 100,
        70..85 => 84,
        85..130 => 76,
        130..140 => 200,
        _ => 4096,
    };
    mib * MIB
}

/// Installs the scripted driver (heapBudget `initial`, settable through the returned knob) and
/// makes the vegetation.
fn driven(ctx: &Context, initial: u64) -> (Arc<AtomicU64>, Vegetation) {
    let budget = Arc::new(AtomicU64::new(initial));
    ctx.memory()
        .set_budget_source(HeapBudgets::new(Box::new(Driver {
            heaps: ctx.memory().heaps().to_vec(),
            device_heap: ctx.memory().device_local_heap(),
            budget: budget.clone(),
            ours: 0,
        })))
        .unwrap();
    let veg = Vegetation::new(
        ctx,
        VegetationConfig {
            atlas_page_px: 512,
            ..Default::default()
        },
    )
    .unwrap();
    (budget, veg)
}

#[test]
fn vegetation_follows_the_drivers_budget_down_and_up() {
    let test = "vegetation_follows_the_drivers_budget";
    let Some(ctx) = common::context(test) else {
        return;
    };
    let (budget, mut veg) = driven(&ctx, trajectory(0));
    // 480k trees, 15 MiB of instances, over a square kilometre.
    forest(&mut veg, 1200, 400, 1024.0, 7);
    let mut ring = FrameRing::new(&ctx).unwrap();
    let frames = 200;
    let mut settled_from = 0;
    let mut last_budget = 0;
    let mut last_expect = u64::MAX;
    let mut rose_at = 0;
    let mut lowest = u64::MAX;
    let mut min_quality: f32 = 1.0;
    let mut recovered_at = None;
    let mut held_before_pressure = 0;
    for f in 0..frames {
        budget.store(trajectory(f), Ordering::Relaxed);
        let x = -300.0 + 600.0 * f as f32 / frames as f32;
        let camera = Vec3::new(x, 25.0, 60.0 * (f as f32 * 0.03).sin());
        let (report, heap) = frame(&ctx, &mut veg, &mut ring, camera);
        let stats = veg.stats();
        assert_eq!(stats.budget_source, Source::Ext);
        let heap_budget = trajectory(f).min(heap.budget.size);
        assert_eq!(
            heap.budget.budget, heap_budget,
            "frame {f}: the driver's heapBudget"
        );
        let b = report.decision.budget;
        // The budget is the driver's: half of what its heapBudget leaves after the rest of the
        // process (heapUsage - ours: the engine's bytes), at most the cap.
        assert_eq!(heap.foreign, FOREIGN, "frame {f}");
        let expect = ((heap_budget - FOREIGN) / 2).min(512 * MIB);
        // A fall is followed at once, a rise once it has lasted `rise_hold_frames`.
        if expect > last_expect {
            rose_at = f;
        }
        last_expect = expect;
        if f < rose_at + ControllerConfig::default().rise_hold_frames as usize {
            assert!(
                b <= expect,
                "frame {f}: budget {b} above heapBudget's {expect}"
            );
        } else {
            assert_eq!(b, expect, "frame {f}: budget from heapBudget");
        }
        if b < last_budget {
            settled_from = f + SETTLE;
        }
        last_budget = b;
        lowest = lowest.min(b);
        min_quality = min_quality.min(stats.quality);
        if f == 39 {
            held_before_pressure = stats.held;
        }
        if f >= settled_from {
            assert!(
                stats.held <= b,
                "frame {f}: held {} > budget {b} ({} frames after it fell)",
                stats.held,
                f + SETTLE - settled_from
            );
        }
        // Never blank: while the budget holds the nearest tile's minimum footprint, resident
        // instances within the draw distance.
        let l = stats.lod_instances;
        if f >= 10 && b >= stats.min_footprint {
            assert!(
                l.full + l.medium + l.billboard > 0,
                "frame {f}: nothing resident to draw under a budget of {b} (minimum footprint {}): {stats:?}",
                stats.min_footprint
            );
        }
        // The other process starts giving VRAM back at frame 130.
        if f >= 130 && recovered_at.is_none() && stats.quality >= 1.0 {
            recovered_at = Some(f - 130);
        }
    }
    eprintln!(
        "held {:.1} MiB before the pressure, budget down to {:.1} MiB, quality down to {min_quality:.2}, back to 1.00 {:?} frames after it ended; {} evictions, {} relocations",
        held_before_pressure as f64 / MIB as f64,
        lowest as f64 / MIB as f64,
        recovered_at,
        veg.stats().evictions,
        veg.stats().relocations
    );
    assert!(
        lowest < held_before_pressure,
        "the pressure left vegetation less than it held ({lowest} vs {held_before_pressure})"
    );
    assert!(min_quality < 1.0, "quality stepped down");
    let recovery = recovered_at.expect("full quality after the pressure");
    assert!(recovery <= 60, "recovery took {recovery} frames");
    drop((veg, ring));
    common::finish(ctx, test);
}

#[test]
fn driver_out_of_memory_is_pressure_not_an_error() {
    let test = "driver_out_of_memory_is_pressure";
    let mut memory = common::no_cache();
    // Every 40th allocation: VK_ERROR_OUT_OF_DEVICE_MEMORY, as a driver past its VRAM returns.
    memory.fail_every_nth_allocation = std::num::NonZeroU64::new(40);
    let Some(ctx) = common::context_with_memory(test, memory) else {
        return;
    };
    let mut veg = Vegetation::new(
        &ctx,
        VegetationConfig {
            atlas_page_px: 512,
            ..Default::default()
        },
    )
    .unwrap();
    forest(&mut veg, 300, 100, 512.0, 3);
    let mut ring = FrameRing::new(&ctx).unwrap();
    let mut limited = 0;
    for f in 0..120 {
        let camera = Vec3::new(-200.0 + 3.0 * f as f32, 20.0, 0.0);
        // Every update succeeds: the refusals are counted and retried.
        let (report, _) = frame(&ctx, &mut veg, &mut ring, camera);
        limited += u32::from(report.decision.oom_limited);
    }
    let stats = veg.stats();
    eprintln!(
        "{} driver refusals, {limited} frames with the budget held below them, {} of {} tiles resident, {} uploads",
        stats.out_of_memory, stats.resident_tiles, stats.tiles, stats.uploads
    );
    assert!(stats.out_of_memory > 0, "the injected refusals were seen");
    assert!(limited > 0, "the budget stayed below what was held then");
    assert!(stats.resident_tiles > 0, "uploads were retried and landed");
    drop((veg, ring));
    common::finish(ctx, test);
}

/// A driver budget of 0 falls back to the labelled 80% estimate, and `Stats` says so (and that
/// the driver's usage stands); a sane budget again clears the label.
#[test]
fn a_zero_driver_budget_is_labelled_in_the_stats() {
    let test = "a_zero_driver_budget_is_labelled";
    let Some(ctx) = common::context(test) else {
        return;
    };
    let size = ctx.memory().heaps()[ctx.memory().device_local_heap()].size;
    let (budget, mut veg) = driven(&ctx, 0);
    forest(&mut veg, 50, 100, 256.0, 11);
    let mut ring = FrameRing::new(&ctx).unwrap();
    let (_, heap) = frame(&ctx, &mut veg, &mut ring, Vec3::new(0.0, 20.0, 0.0));
    let stats = veg.stats();
    assert_eq!(stats.budget_clamped, Some(Clamp::Zero));
    assert!(!stats.usage_estimated);
    assert_eq!(stats.budget_source, Source::Ext);
    assert_eq!(
        heap.budget.budget,
        estimated_budget(size),
        "the 80% estimate"
    );
    budget.store(4096 * MIB, Ordering::Relaxed);
    frame(&ctx, &mut veg, &mut ring, Vec3::new(0.0, 20.0, 0.0));
    assert_eq!(veg.stats().budget_clamped, None);
    drop((veg, ring));
    common::finish(ctx, test);
}
