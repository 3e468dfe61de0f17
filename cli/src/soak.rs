//! `understory soak`: a long session of spawn/despawn churn, camera motion and budget changes,
//! with the GPU cull every frame. Writes one CSV row per frame, plots VRAM against the budget
//! (SVG), and checks at the end that live allocations return to 0 and, where
//! `VK_EXT_memory_budget` exists, that the driver's heap usage returns to its baseline.
//!
//! The budget changes come from the vegetation cap (squeezed to a quarter and back), or with
//! `pressure` from outside: another process takes VRAM in steps until the driver's
//! `heapBudget` leaves vegetation less than it holds, then gives it back.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use ash::vk;
use glam::{Mat4, Vec2, Vec3};

use crate::pressure::PressureChild;
use crate::rng::Rng;
use understory::error::{Error, Result};
use understory::gpu::budget::Source;
use understory::gpu::context::{Context, ContextOptions};
use understory::gpu::cull::{Compaction, CullPass, CullSource, CullView};
use understory::gpu::frame::FrameRing;
use understory::gpu::memory::{BufferDesc, MemoryLocation};
use understory::policy::category::Category;
use understory::vegetation::{
    PatchDesc, PatchId, SpeciesDesc, SpeciesId, Vegetation, VegetationConfig, Viewer,
};
use understory::world::instance::Instance;

const MIB: f64 = (1u64 << 20) as f64;

/// What to run.
#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// Frames to run.
    pub frames: u64,
    /// Stop earlier after this many seconds.
    pub max_seconds: Option<f64>,
    /// Seed of the world and the churn.
    pub seed: u64,
    /// Patches alive at any time.
    pub patches: usize,
    /// Instances per patch.
    pub instances_per_patch: usize,
    /// Patches despawned and respawned elsewhere every frame.
    pub churn_per_frame: usize,
    /// The vegetation cap alternates between `cap_bytes` and a quarter of it every this many
    /// frames.
    pub squeeze_period_frames: u64,
    /// Vegetation cap in bytes.
    pub cap_bytes: u64,
    /// Where to write the CSV (one row per frame).
    pub csv: Option<PathBuf>,
    /// Where to write the SVG plot.
    pub svg: Option<PathBuf>,
    /// Outside pressure instead of cap squeezes: the binary to start as the other process
    /// (`understory`, which has the `pressure-child` command). Needs `VK_EXT_memory_budget`.
    pub pressure: Option<PathBuf>,
}

impl Default for SoakConfig {
    fn default() -> Self {
        Self {
            frames: 10_000,
            max_seconds: None,
            seed: 1,
            patches: 20_000,
            instances_per_patch: 64,
            churn_per_frame: 20,
            squeeze_period_frames: 2_000,
            cap_bytes: 32 << 20,
            csv: None,
            svg: None,
            pressure: None,
        }
    }
}

/// What a soak found.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SoakReport {
    /// Frames run.
    pub frames: u64,
    /// Wall time.
    pub seconds: f64,
    /// Device.
    pub device: String,
    /// Where budgets came from.
    pub budget_source: Source,
    /// Highest vegetation bytes held (instances, atlas, cull outputs: blocks, pending frees
    /// included).
    pub peak_held: u64,
    /// Frames, past the settle time after the budget fell, whose held bytes exceeded it.
    pub over_budget_frames: u64,
    /// Frames past the first 10 with nothing resident to draw while the budget held the
    /// nearest tile's minimum footprint.
    pub blank_frames: u64,
    /// Lowest quality.
    pub min_quality: f32,
    /// Frames from the last time the budget rose back (the end of a squeeze or of the outside
    /// pressure) to the quality before it fell (1.00 where the cap holds the whole view; a
    /// soak's world may need more than its cap); `None` if it did not come back.
    pub recovery_frames: Option<u64>,
    /// With `pressure`: the most VRAM the other process held, and the lowest vegetation
    /// budget it caused.
    pub pressure_peak: u64,
    /// Lowest vegetation budget.
    pub lowest_budget: u64,
    /// Tile evictions.
    pub evictions: u64,
    /// Patch uploads.
    pub uploads: u64,
    /// Deferred frees completed.
    pub frees_completed: u64,
    /// Driver heap usage when the context was new (the estimate's, without the extension).
    pub first_usage: u64,
    /// Driver heap usage before the soak allocated anything, after one cull pass was made and
    /// dropped (the driver may keep memory of its own for its first pipelines and descriptor
    /// pools).
    pub baseline_usage: u64,
    /// Driver heap usage after everything was released.
    pub final_usage: u64,
    /// Live allocations left after release (must be 0).
    pub live_allocations_after: u64,
    /// Leaks reported at shutdown (must be 0).
    pub leaks: usize,
    /// Validation warnings and errors (must be 0).
    pub validation_messages: u64,
    /// Whether GPU-assisted validation was on: the layer then allocates device memory of its own
    /// in this process (64 KiB on an H200), which heapUsage counts, so the baseline check allows
    /// [`GPU_ASSISTED_SLACK`] more.
    pub gpu_assisted: bool,
}

/// What the baseline check allows past the baseline under GPU-assisted validation.
pub const GPU_ASSISTED_SLACK: u64 = 1 << 20;

impl SoakReport {
    /// Whether every check passed: nothing live or leaked, no validation message, held within
    /// the budget once settled, and (with the extension) driver usage back to its baseline.
    pub fn passed(&self) -> bool {
        self.live_allocations_after == 0
            && self.leaks == 0
            && self.validation_messages == 0
            && self.over_budget_frames == 0
            && self.blank_frames == 0
            && (self.budget_source != Source::Ext
                || self.final_usage
                    <= self.baseline_usage
                        + if self.gpu_assisted {
                            GPU_ASSISTED_SLACK
                        } else {
                            0
                        })
    }
}

fn patch(veg: &Vegetation, rng: &mut Rng, n: usize) -> Vec<Instance> {
    let q = veg.quadtree();
    let leaf = q.leaf_m();
    let tile = (Vec2::new(rng.f(), rng.f()) * (q.size_m / leaf - 1.0)).floor() * leaf + q.origin;
    (0..n)
        .map(|_| {
            let p = tile + Vec2::new(rng.f(), rng.f()) * leaf * 0.999;
            Instance {
                scale: 0.5 + rng.f(),
                yaw: rng.f() * std::f32::consts::TAU,
                ..Instance::at(Vec3::new(p.x, 0.0, p.y))
            }
        })
        .collect()
}

/// One CSV row.
struct Row {
    frame: u64,
    ours: [u64; 5],
    ours_total: u64,
    pending: u64,
    usage: u64,
    heap_budget: u64,
    foreign: u64,
    pressure: u64,
    budget: u64,
    held: u64,
    min_footprint: u64,
    over_budget: bool,
    quality: f32,
    lod: [u64; 4],
}

/// Frames after the budget falls before held must be inside it.
const SETTLE_FRAMES: u64 = 8;

/// The outside pressure's steps: (share of the run, vegetation budget the other process leaves,
/// as a multiple of what vegetation held before it started; `None`: it gives everything back).
const PRESSURE_STEPS: [(f64, Option<f64>); 6] = [
    (0.2, Some(1.5)),
    (0.3, Some(1.0)),
    (0.4, Some(0.6)),
    (0.5, Some(0.35)),
    (0.65, Some(1.0)),
    (0.75, None),
];

/// Makes a cull pass, runs it once over one instance (waiting for it) and drops it all.
fn warm_up(ctx: &Context) -> Result<()> {
    let mut pass = CullPass::new(
        ctx,
        if ctx.adapter().subgroup_ballot_arithmetic_in_compute {
            Compaction::Subgroup
        } else {
            Compaction::Atomic
        },
        (1 << 20).min(CullPass::max_capacity(ctx, false)),
        [Default::default(); 3],
    )?;
    let one = [Instance::at(Vec3::ZERO)];
    let mut buffer = ctx.create_buffer(&BufferDesc {
        name: "soak warm-up instance",
        size: size_of_val(&one) as u64,
        usage: vk::BufferUsageFlags::STORAGE_BUFFER,
        location: MemoryLocation::CpuToGpu,
        category: Category::Other,
    })?;
    buffer
        .mapped_mut()?
        .copy_from_slice(bytemuck::cast_slice(&one));
    let view = CullView::from_planes(
        [[0.0, 0.0, 0.0, 1.0]; 6],
        Vec3::ZERO,
        1.0,
        &Default::default(),
        1.0,
    )?;
    ctx.submit_and_wait(|frame, cmd| {
        let source = [CullSource {
            buffer: &buffer,
            count: 1,
            base: 0,
        }];
        // SAFETY: cmd is recording for `frame` outside a render pass on understory's queue
        // (submit_and_wait); the instance was written through its mapping before.
        unsafe { pass.record(frame, cmd, &source, &view) }
    })?;
    Ok(())
}

/// Runs a soak on a context of its own, shuts it down, and reports.
pub fn run(options: &ContextOptions, config: &SoakConfig) -> Result<SoakReport> {
    if config.frames == 0 || config.patches == 0 || config.instances_per_patch == 0 {
        return Err(Error::InvalidInput(
            "soak needs frames, patches and instances".into(),
        ));
    }
    let ctx = Context::new(options)?;
    let canary = ctx.canary().clone();
    let heap = ctx.memory().device_local_heap();
    let first_usage = ctx.memory().refresh_budget()?[heap].budget.usage;
    // The driver's own one-time memory (pipelines, descriptor pools, the scratch a pipeline's
    // first dispatch takes, which the NVIDIA driver keeps for the device's life) is not ours to
    // return: a cull pass made, run once over one instance and dropped first, so the baseline
    // includes it.
    warm_up(&ctx)?;
    ctx.collect()?;
    ctx.memory().flush_cache();
    ctx.memory().release_empty_blocks()?;
    let baseline_usage = ctx.memory().refresh_budget()?[heap].budget.usage;
    let result = soak(&ctx, config, heap);
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            if let Err(s) = ctx.shutdown() {
                log::error!("soak: shutdown after {e}: {s}");
            }
            return Err(e);
        }
    };
    report.baseline_usage = baseline_usage;
    report.first_usage = first_usage;
    report.gpu_assisted = ctx.validation_enabled() && options.instance.gpu_assisted;
    // Everything was dropped; wait for the GPU, free, give blocks back, and read the driver.
    ctx.wait(ctx.last_submitted(), std::time::Duration::from_secs(30))?;
    ctx.collect()?;
    ctx.memory().flush_cache();
    ctx.memory().release_empty_blocks()?;
    let stats = ctx.memory().stats();
    report.live_allocations_after = stats.categories.iter().map(|(_, c)| c.allocations).sum();
    report.final_usage = ctx.memory().refresh_budget()?[heap].budget.usage;
    report.leaks = ctx.shutdown()?.leaks.len();
    report.validation_messages = canary.total();
    Ok(report)
}

fn soak(ctx: &Context, config: &SoakConfig, heap: usize) -> Result<SoakReport> {
    let mut vconfig = VegetationConfig {
        world_origin: Vec2::splat(-512.0),
        world_size_m: 1024.0,
        atlas_page_px: 512,
        ..Default::default()
    };
    vconfig.controller.cap_bytes = config.cap_bytes;
    let mut veg = Vegetation::new(ctx, vconfig)?;
    let mut rng = Rng(config.seed | 1);
    let texels: Vec<u8> = [50u8, 140, 60, 255]
        .iter()
        .copied()
        .cycle()
        .take(32 * 64 * 4)
        .collect();
    let species: Vec<SpeciesId> = ["grass", "fern", "pine"]
        .iter()
        .map(|name| {
            veg.register_species(&SpeciesDesc {
                name,
                width: 32,
                height: 64,
                rgba8: &texels,
            })
        })
        .collect::<Result<_>>()?;
    let mut live: Vec<PatchId> = Vec::with_capacity(config.patches);
    for i in 0..config.patches {
        let inst = patch(&veg, &mut rng, config.instances_per_patch);
        live.push(veg.spawn(&PatchDesc {
            species: species[i % species.len()],
            instances: &inst,
        })?);
    }
    let ring = FrameRing::new(ctx)?;
    let compaction = if ctx.adapter().subgroup_ballot_arithmetic_in_compute {
        Compaction::Subgroup
    } else {
        Compaction::Atomic
    };
    let mut cull = Some(CullPass::new(
        ctx,
        compaction,
        (1 << 20).min(CullPass::max_capacity(ctx, false)),
        [Default::default(); 3],
    )?);
    let mut pressure = match &config.pressure {
        Some(exe) => {
            if !ctx.features().memory_budget {
                return Err(Error::Unsupported(
                    "soak --pressure follows the driver's heapBudget: it needs VK_EXT_memory_budget"
                        .into(),
                ));
            }
            Some(PressureChild::spawn(exe)?)
        }
        None => None,
    };
    let mut rows: Vec<Row> = Vec::with_capacity(config.frames as usize);
    let mut settled_from = 0;
    let mut last_budget = 0u64;
    let mut rise_at: Option<u64> = None;
    let mut quality_before: f32 = 1.0;
    let mut recovery = Some(0);
    let mut over = 0;
    let mut blank = 0;
    let mut peak = 0;
    let mut held_ref = 0;
    let mut pressure_peak = 0;
    let mut lowest_budget = u64::MAX;
    let mut min_quality: f32 = 1.0;
    let started = Instant::now();
    let mut frames = 0;
    let outcome = (|| -> Result<()> {
        for f in 0..config.frames {
            if config
                .max_seconds
                .is_some_and(|s| started.elapsed().as_secs_f64() >= s)
            {
                break;
            }
            let squeezed = pressure.is_none() && (f / config.squeeze_period_frames) % 2 == 1;
            let cap = if squeezed {
                config.cap_bytes / 4
            } else {
                config.cap_bytes
            };
            veg.set_budget_cap(cap)?;
            if let (Some(child), Some(last)) = (pressure.as_mut(), rows.last()) {
                if f as f64 <= config.frames as f64 * PRESSURE_STEPS[0].0 {
                    held_ref = held_ref.max(last.held);
                }
                for (share, leave) in PRESSURE_STEPS {
                    if f != (config.frames as f64 * share) as u64 {
                        continue;
                    }
                    // Vegetation's budget is half of what heapBudget leaves after the rest of
                    // this process: to leave it `leave` × what it held, the other process
                    // takes the difference.
                    let target = leave.map_or(0, |m| {
                        let room = last.heap_budget.saturating_sub(last.foreign);
                        let want = (2.0 * m * held_ref as f64) as u64;
                        (child.held() + room).saturating_sub(want)
                    });
                    let got = child.hold(target)?;
                    pressure_peak = pressure_peak.max(got);
                    log::info!(
                        "frame {f}: the other process holds {:.1} MiB (asked {:.1} MiB)",
                        got as f64 / MIB,
                        target as f64 / MIB
                    );
                }
            }
            for _ in 0..config.churn_per_frame.min(live.len()) {
                let k = (rng.f() * live.len() as f32) as usize % live.len();
                veg.despawn(live.swap_remove(k))?;
                let inst = patch(&veg, &mut rng, config.instances_per_patch);
                let sp = species[(rng.f() * 3.0) as usize % 3];
                live.push(veg.spawn(&PatchDesc {
                    species: sp,
                    instances: &inst,
                })?);
            }
            let t = f as f32 * 0.004;
            let eye = Vec3::new(400.0 * (t * 1.3).sin(), 40.0, 400.0 * (t * 0.7).cos());
            let look = eye + Vec3::new((t * 2.0).cos(), -0.2, (t * 2.0).sin());
            let frame = ctx.begin_frame()?;
            let report = veg.update(&frame, Viewer::looking(eye, look - eye))?;
            let cmd = ring.begin(&frame)?;
            // SAFETY: cmd is recording for `frame` and is submitted below as its submission.
            unsafe { veg.record(&frame, cmd.raw())? };
            if let Some(pass) = cull.as_mut() {
                let view = CullView::new(
                    Mat4::perspective_rh(1.2, 16.0 / 9.0, 0.5, 2000.0)
                        * Mat4::look_at_rh(eye, look, Vec3::Y),
                    eye,
                    2.0,
                    &veg.config().lod,
                    report.decision.quality,
                )?;
                let sources: Vec<_> = veg.cull_sources().into_iter().map(|(s, _)| s).collect();
                // SAFETY: recording for `frame`, after the uploads; the pass marks the
                // sources used by it.
                unsafe { pass.record(&frame, cmd.raw(), &sources, &view)? };
            }
            let h = frame.heaps()[heap].clone();
            ring.submit(frame, cmd)?;
            let stats = veg.stats();
            let held = stats.held;
            let budget = report.decision.budget;
            peak = peak.max(held);
            lowest_budget = lowest_budget.min(budget);
            min_quality = min_quality.min(report.decision.quality);
            // Held inside the budget once the GPU had time to give back what a fall asks for.
            if budget < last_budget {
                settled_from = f + SETTLE_FRAMES;
            }
            // The quality before the budget fell by a tenth or more: what recovery returns to.
            if (budget as f64) < last_budget as f64 * 0.9
                && rise_at.is_none_or(|_| recovery.is_some())
            {
                quality_before = rows.last().map_or(1.0, |r| r.quality);
            }
            // Recovery: from the last time the budget rose back by a tenth or more.
            if budget as f64 > last_budget as f64 * 1.1 && f > 0 {
                rise_at = Some(f);
                recovery = None;
            }
            last_budget = budget;
            if let Some(r) = rise_at {
                if recovery.is_none() && report.decision.quality >= quality_before.min(1.0) - 0.02 {
                    recovery = Some(f - r);
                }
            }
            let over_budget = f >= settled_from && held > budget;
            over += u64::from(over_budget);
            let l = stats.lod_instances;
            // Blank: nothing resident within the draw distance while the budget held the
            // nearest tile's minimum footprint.
            if f >= 10
                && budget >= stats.min_footprint
                && l.full + l.medium + l.billboard == 0
                && stats.patches > 0
            {
                blank += 1;
            }
            rows.push(Row {
                frame: f,
                ours: [
                    h.ours[Category::Instances],
                    h.ours[Category::Atlas],
                    h.ours[Category::Outputs],
                    h.ours[Category::Staging],
                    h.ours[Category::Other],
                ],
                ours_total: h.ours_total,
                pending: h.pending,
                usage: h.budget.usage,
                heap_budget: h.budget.budget,
                foreign: h.foreign,
                pressure: pressure.as_ref().map_or(0, PressureChild::held),
                budget,
                held,
                min_footprint: stats.min_footprint,
                over_budget,
                quality: report.decision.quality,
                lod: [l.full, l.medium, l.billboard, l.culled],
            });
            frames += 1;
        }
        Ok(())
    })();
    let stats = veg.stats();
    drop((veg, cull, ring));
    let released = pressure.take().map(PressureChild::finish);
    outcome?;
    released.transpose()?;
    if let Some(path) = &config.csv {
        write_csv(path, &rows)?;
    }
    if let Some(path) = &config.svg {
        plot(path, &rows, &ctx.adapter().name, stats.budget_source)?;
    }
    Ok(SoakReport {
        frames,
        seconds: started.elapsed().as_secs_f64(),
        device: ctx.adapter().name.clone(),
        budget_source: stats.budget_source,
        peak_held: peak,
        over_budget_frames: over,
        blank_frames: blank,
        min_quality,
        recovery_frames: recovery,
        pressure_peak,
        lowest_budget,
        evictions: stats.evictions,
        uploads: stats.uploads,
        frees_completed: ctx.memory().stats().frees_completed,
        first_usage: 0,
        baseline_usage: 0,
        final_usage: 0,
        live_allocations_after: 0,
        leaks: 0,
        validation_messages: 0,
        gpu_assisted: false,
    })
}

fn io(path: &std::path::Path, e: std::io::Error) -> Error {
    Error::InvalidInput(format!("{}: {e}", path.display()))
}

fn write_csv(path: &std::path::Path, rows: &[Row]) -> Result<()> {
    let file = std::fs::File::create(path).map_err(|e| io(path, e))?;
    let mut w = std::io::BufWriter::new(file);
    let header = "frame,ours_instances,ours_atlas,ours_outputs,ours_staging,ours_other,ours_total,pending,driver_usage,heap_budget,foreign,other_process,vegetation_budget,vegetation_held,min_footprint,over_budget,quality,lod_full,lod_medium,lod_billboard,lod_culled";
    writeln!(w, "{header}").map_err(|e| io(path, e))?;
    for r in rows {
        writeln!(
            w,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.4},{},{},{},{}",
            r.frame,
            r.ours[0],
            r.ours[1],
            r.ours[2],
            r.ours[3],
            r.ours[4],
            r.ours_total,
            r.pending,
            r.usage,
            r.heap_budget,
            r.foreign,
            r.pressure,
            r.budget,
            r.held,
            r.min_footprint,
            u8::from(r.over_budget),
            r.quality,
            r.lod[0],
            r.lod[1],
            r.lod[2],
            r.lod[3]
        )
        .map_err(|e| io(path, e))?;
    }
    w.flush().map_err(|e| io(path, e))
}

fn plot(path: &std::path::Path, rows: &[Row], device: &str, source: Source) -> Result<()> {
    use plotters::prelude::*;
    let err =
        |e: &dyn std::fmt::Display| Error::InvalidInput(format!("{}: plot: {e}", path.display()));
    let root = SVGBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(560);
    let mib = |b: u64| (b as f64 / MIB).max(0.01);
    let max_y = rows
        .iter()
        .map(|r| {
            mib(r
                .heap_budget
                .max(r.usage)
                .max(r.pressure)
                .max(r.budget)
                .max(r.held))
        })
        .fold(1.0, f64::max)
        * 2.0;
    let min_y = rows
        .iter()
        .map(|r| mib(r.held.min(r.budget)))
        .fold(max_y, f64::min)
        .max(0.01)
        / 2.0;
    let n = rows.len().max(2) as u64;
    // Log scale: the heap (tens of GiB on a real GPU) and vegetation (MiB) on one plot.
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!("understory soak on {device} (budget: {source})"),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0u64..n, (min_y..max_y).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .y_desc("MiB (log)")
        .draw()
        .map_err(|e| err(&e))?;
    type Series = (&'static str, RGBColor, fn(&Row) -> u64);
    let series: [Series; 6] = [
        (
            "driver heapBudget (estimated without the extension)",
            BLACK,
            |r| r.heap_budget,
        ),
        ("other process's VRAM (--pressure)", MAGENTA, |r| r.pressure),
        ("understory, all its blocks in the heap", GREEN, |r| {
            r.ours_total
        }),
        ("vegetation budget", RED, |r| r.budget),
        ("vegetation held (instances, atlas, outputs)", BLUE, |r| {
            r.held
        }),
        ("nearest tile's minimum footprint", CYAN, |r| {
            r.min_footprint
        }),
    ];
    for (label, color, f) in series {
        if rows.iter().all(|r| f(r) == 0) {
            continue;
        }
        chart
            .draw_series(LineSeries::new(
                rows.iter().map(|r| (r.frame, mib(f(r)))),
                color.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    let mut q = ChartBuilder::on(&bottom)
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0u64..n, 0f64..1.05)
        .map_err(|e| err(&e))?;
    q.configure_mesh()
        .x_desc("frame")
        .y_desc("quality")
        .draw()
        .map_err(|e| err(&e))?;
    q.draw_series(LineSeries::new(
        rows.iter().map(|r| (r.frame, f64::from(r.quality))),
        BLUE.stroke_width(2),
    ))
    .map_err(|e| err(&e))?
    .label("LOD quality (1.00: full draw distance)")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    q.draw_series(
        rows.iter()
            .filter(|r| r.over_budget)
            .map(|r| Circle::new((r.frame, 0.02), 3, RED.filled())),
    )
    .map_err(|e| err(&e))?
    .label("held over budget after settling")
    .legend(|(x, y)| Circle::new((x + 10, y), 3, RED.filled()));
    q.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}
