//! `understory demo`: a seeded, procedurally generated forest that a camera flies over. Tiles
//! stream in and out as it moves, LOD follows the budget, the GPU culls every frame, and the
//! visible trees are drawn (indexed indirect, one draw per LOD) into an offscreen colour and
//! depth image that can be written as PNG. It ends with a summary whose leak and validation
//! counts must be 0.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ash::vk;
use glam::{Mat4, Vec2, Vec3};

use crate::rng::Rng;
use understory::error::{Error, Result};
use understory::gpu::budget::Source;
use understory::gpu::context::{Context, ContextOptions};
use understory::gpu::cull::{COUNTERS, Compaction, CullPass, CullView};
use understory::gpu::draw::{DrawFrame, DrawPass, tree_billboard};
use understory::gpu::frame::FrameRing;
use understory::gpu::memory::{Buffer, BufferDesc, Image, ImageDesc, MemoryLocation};
use understory::policy::category::{Category, PerCategory};
use understory::policy::lod::LodBands;
use understory::vegetation::{PatchDesc, SpeciesDesc, SpeciesId, Vegetation, VegetationConfig};
use understory::world::instance::Instance;

const MIB: f64 = (1u64 << 20) as f64;
/// Most trees the demo generates: the forest is built on the CPU first.
pub const MAX_INSTANCES: u64 = 64 << 20;
const COLOR_FORMAT: vk::Format = vk::Format::R8G8B8A8_UNORM;
const DEPTH_FORMAT: vk::Format = vk::Format::D32_SFLOAT;

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    /// Trees in the world.
    pub instances: u64,
    /// Frames to fly.
    pub frames: u64,
    /// Image width and height in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Seed of the forest.
    pub seed: u64,
    /// Vegetation memory cap in bytes (`None`: the controller's default).
    pub budget_bytes: Option<u64>,
    /// Shrink the budget mid-flight (instance memory to a third of what is held at 25% of the
    /// frames) and restore it at 50%, leaving half the run to watch quality recover.
    pub squeeze: bool,
    /// PNG output: the last frame, or with `png_every` every N frames (`{frame}` in the
    /// path is replaced by the zero-padded frame number).
    pub png: Option<PathBuf>,
    /// Write a PNG every this many frames (the path needs `{frame}`).
    pub png_every: Option<u64>,
    /// Colour instances by LOD (full red, medium yellow, billboard blue).
    pub lod_tint: bool,
    /// Show an indicatif progress bar (on a terminal).
    pub progress: bool,
    /// One stats line this often (0: never).
    pub stats_interval: Duration,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            instances: 100_000,
            frames: 300,
            width: 640,
            height: 360,
            seed: 1,
            budget_bytes: None,
            squeeze: false,
            png: None,
            png_every: None,
            lod_tint: false,
            progress: true,
            stats_interval: Duration::from_secs(1),
        }
    }
}

/// What a demo run did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoReport {
    /// Device name.
    pub device: String,
    /// Where heap budgets came from.
    pub budget_source: Source,
    /// Frames drawn.
    pub frames: u64,
    /// Wall time of the frame loop.
    pub seconds: f64,
    /// Trees in the world and patches they were spawned in.
    pub instances: u64,
    /// Patches.
    pub patches: u64,
    /// Highest bytes in live allocations per category (instances, atlas, staging, other).
    pub peak_bytes: PerCategory<u64>,
    /// Highest vegetation bytes held (instances + atlas).
    pub peak_held: u64,
    /// Highest heap usage of the device-local heap: the driver's with `VK_EXT_memory_budget`,
    /// understory's own otherwise (see `budget_source`).
    pub peak_heap_usage: u64,
    /// That heap's budget at the same frame.
    pub heap_budget: u64,
    /// Lowest LOD quality the controller chose.
    pub min_quality: f32,
    /// Tile evictions.
    pub evictions: u64,
    /// Patch uploads.
    pub uploads: u64,
    /// Uploads refused for the budget.
    pub refused_uploads: u64,
    /// Deferred frees completed.
    pub deferred_frees: u64,
    /// Most instances the GPU drew in one frame, per LOD (full, medium, billboard).
    pub peak_drawn: [u32; 3],
    /// Frames whose LOD lists overflowed (instances not drawn).
    pub overflow_frames: u64,
    /// Median GPU time of the cull pass (uploads included) per frame, milliseconds (`None`
    /// without timestamps on the queue).
    pub gpu_cull_ms: Option<f64>,
    /// Median GPU time of the draw (ground and three indirect draws) per frame, milliseconds.
    pub gpu_draw_ms: Option<f64>,
    /// PNGs written.
    pub pngs: Vec<PathBuf>,
    /// Whether the validation layer was on.
    pub validation: bool,
    /// Leaks reported at shutdown (must be 0).
    pub leaks: usize,
    /// Validation warnings and errors (must be 0).
    pub validation_messages: u64,
}

impl DemoReport {
    /// Nothing leaked and no validation message.
    pub fn passed(&self) -> bool {
        self.leaks == 0 && self.validation_messages == 0
    }
}

/// Parses a byte size: `512MiB`, `1.5GiB`, `300MB`, `64k`, `1048576`.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| Error::InvalidInput(format!("size {text:?}: expected e.g. 512MiB")))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => MIB,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * MIB,
        "gb" => 1e9,
        other => {
            return Err(Error::InvalidInput(format!(
                "size {text:?}: unknown unit {other:?} (B, KiB, MiB, GiB, KB, MB, GB)"
            )));
        }
    };
    let bytes = value * mult;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(Error::InvalidInput(format!("size {text:?} out of range")));
    }
    Ok(bytes as u64)
}

/// Smooth value noise in [0, 1] with lattice spacing 1.
fn value_noise(p: Vec2, seed: u32) -> f32 {
    let hash = |x: i32, y: i32| {
        let h = (x as u32).wrapping_mul(0x8da6_b343)
            ^ (y as u32).wrapping_mul(0xd816_3841)
            ^ seed.wrapping_mul(0xcb1a_b31f);
        let h = (h ^ (h >> 13)).wrapping_mul(0x5bd1_e995);
        (h ^ (h >> 15)) as f32 / u32::MAX as f32
    };
    let (x0, y0) = (p.x.floor(), p.y.floor());
    let (fx, fy) = (p.x - x0, p.y - y0);
    let (sx, sy) = (fx * fx * (3.0 - 2.0 * fx), fy * fy * (3.0 - 2.0 * fy));
    let (ix, iy) = (x0 as i32, y0 as i32);
    let a = hash(ix, iy) + (hash(ix + 1, iy) - hash(ix, iy)) * sx;
    let b = hash(ix, iy + 1) + (hash(ix + 1, iy + 1) - hash(ix, iy + 1)) * sx;
    a + (b - a) * sy
}

/// Species of the forest: name and foliage colour.
const SPECIES: [(&str, [f32; 3]); 3] = [
    ("spruce", [0.20, 0.42, 0.24]),
    ("pine", [0.36, 0.56, 0.26]),
    ("larch", [0.62, 0.64, 0.24]),
];

/// The forest: `n` trees in stands (value noise decides where trees grow and which species),
/// grouped into patches of one species per leaf tile.
fn forest(config: &VegetationConfig, n: u64, seed: u64) -> Vec<(usize, Vec<Instance>)> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let s = seed as u32;
    let size = config.world_size_m;
    let leaf = config.leaf_tile_m;
    let tiles = (size / leaf).round() as i64;
    let mut groups: HashMap<(i64, i64, usize), Vec<Instance>> = HashMap::new();
    let mut placed = 0u64;
    while placed < n {
        let p = Vec2::new(rng.f(), rng.f()) * size * 0.9999 + config.world_origin;
        let density = 0.65 * value_noise(p / 180.0, s) + 0.35 * value_noise(p / 45.0, s ^ 7);
        if rng.f() > ((density - 0.3) * 2.2).clamp(0.02, 1.0) {
            continue;
        }
        let kind = value_noise(p / 260.0 + 31.0, s ^ 13);
        let species = ((kind * 3.0) as usize).min(2);
        let base = SPECIES[species].1;
        let v = 0.8 + 0.35 * rng.f();
        let rgb = base.map(|c| ((c * v).clamp(0.0, 1.0) * 255.0) as u32);
        let inst = Instance {
            scale: 9.0 + 12.0 * rng.f(),
            yaw: rng.f() * std::f32::consts::TAU,
            tint: rgb[0] | (rgb[1] << 8) | (rgb[2] << 16) | (255 << 24),
            ..Instance::at(Vec3::new(p.x, 0.0, p.y))
        };
        let local = (p - config.world_origin) / leaf;
        let key = (
            (local.x as i64).clamp(0, tiles - 1),
            (local.y as i64).clamp(0, tiles - 1),
            species,
        );
        groups.entry(key).or_default().push(inst);
        placed += 1;
    }
    let mut out: Vec<_> = groups.into_iter().collect();
    out.sort_unstable_by_key(|(k, _)| *k);
    let max = config.max_instances_per_patch as usize;
    out.into_iter()
        .flat_map(|((_, _, sp), v)| v.chunks(max).map(|c| (sp, c.to_vec())).collect::<Vec<_>>())
        .collect()
}

/// The camera at `t` in [0, 1]: one lap around the world's centre at tree-top height, looking
/// ahead and a little down.
fn camera(t: f32, radius: f32) -> (Vec3, Vec3) {
    let a = t * std::f32::consts::TAU;
    let eye = Vec3::new(
        radius * a.cos(),
        34.0 + 8.0 * (a * 3.0).sin(),
        radius * a.sin(),
    );
    let ahead = Vec3::new(-a.sin(), 0.0, a.cos());
    let inward = -Vec3::new(a.cos(), 0.0, a.sin());
    (eye, eye + ahead * 0.8 + inward * 0.6 - Vec3::Y * 0.22)
}

/// Offscreen colour + depth targets and the PNG readback buffer.
struct Target {
    color: Option<Image>,
    depth: Option<Image>,
    color_view: vk::ImageView,
    depth_view: vk::ImageView,
    readback: Option<Buffer>,
    extent: vk::Extent2D,
}

impl Target {
    fn new(ctx: &Context, extent: vk::Extent2D, readback: bool) -> Result<Self> {
        let mut t = Self {
            color: None,
            depth: None,
            color_view: vk::ImageView::null(),
            depth_view: vk::ImageView::null(),
            readback: None,
            extent,
        };
        if let Err(e) = t.build(ctx, readback) {
            // Nothing was recorded with the views yet.
            t.destroy(ctx, 0, true);
            return Err(e);
        }
        Ok(t)
    }

    fn build(&mut self, ctx: &Context, readback: bool) -> Result<()> {
        let image = |name, format, usage| {
            ctx.memory().create_image(&ImageDesc {
                name,
                extent: self.extent,
                format,
                mip_levels: 1,
                usage,
                category: Category::Other,
            })
        };
        self.color = Some(image(
            "demo colour",
            COLOR_FORMAT,
            vk::ImageUsageFlags::COLOR_ATTACHMENT | vk::ImageUsageFlags::TRANSFER_SRC,
        )?);
        self.depth = Some(image(
            "demo depth",
            DEPTH_FORMAT,
            vk::ImageUsageFlags::DEPTH_STENCIL_ATTACHMENT,
        )?);
        let view = |image: &Image, aspect| {
            let info = vk::ImageViewCreateInfo::default()
                .image(image.raw())
                .view_type(vk::ImageViewType::TYPE_2D)
                .format(image.format())
                .subresource_range(range(aspect));
            // SAFETY: a live 2D image of this device, one mip, one layer.
            unsafe { ctx.device().create_image_view(&info, None) }
                .map_err(understory::error::vk_err("vkCreateImageView"))
        };
        if let (Some(c), Some(d)) = (&self.color, &self.depth) {
            self.color_view = view(c, vk::ImageAspectFlags::COLOR)?;
            self.depth_view = view(d, vk::ImageAspectFlags::DEPTH)?;
        }
        if readback {
            self.readback = Some(ctx.memory().create_buffer(&BufferDesc {
                name: "demo png readback",
                size: u64::from(self.extent.width) * u64::from(self.extent.height) * 4,
                usage: vk::BufferUsageFlags::TRANSFER_DST,
                location: MemoryLocation::GpuToCpu,
                category: Category::Other,
            })?);
        }
        Ok(())
    }

    /// Retires the images and buffer at `value`, and destroys the views when `idle` (every
    /// submission that used them has completed); otherwise the views are leaked, not freed
    /// under the GPU.
    fn destroy(&mut self, ctx: &Context, value: u64, idle: bool) {
        if idle {
            // SAFETY: idle (caller): no submission uses the views; null is ignored.
            unsafe {
                ctx.device().destroy_image_view(self.color_view, None);
                ctx.device().destroy_image_view(self.depth_view, None);
            }
        } else {
            log::error!("demo target: GPU not idle, image views leaked");
        }
        self.color_view = vk::ImageView::null();
        self.depth_view = vk::ImageView::null();
        let items: [Option<understory::gpu::memory::Retirable>; 3] = [
            self.color.take().map(Into::into),
            self.depth.take().map(Into::into),
            self.readback.take().map(Into::into),
        ];
        for r in items.into_iter().flatten() {
            if let Err(e) = ctx.retire(r, value) {
                log::error!("demo target: {e}");
            }
        }
    }
}

fn range(aspect: vk::ImageAspectFlags) -> vk::ImageSubresourceRange {
    vk::ImageSubresourceRange {
        aspect_mask: aspect,
        base_mip_level: 0,
        level_count: 1,
        base_array_layer: 0,
        layer_count: 1,
    }
}

fn image_barrier<'a>(
    image: vk::Image,
    aspect: vk::ImageAspectFlags,
    from: (vk::ImageLayout, vk::AccessFlags),
    to: (vk::ImageLayout, vk::AccessFlags),
) -> vk::ImageMemoryBarrier<'a> {
    understory::gpu::compute::image_barrier(image, range(aspect), from, to)
}

fn slots_of(ctx: &Context) -> u32 {
    ctx.frames_in_flight().max(1)
}

fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// The path of the PNG for `frame`: `{frame}` replaced by the zero-padded number.
fn png_path(pattern: &Path, frame: u64) -> PathBuf {
    let s = pattern.to_string_lossy();
    if s.contains("{frame}") {
        PathBuf::from(s.replace("{frame}", &format!("{frame:06}")))
    } else {
        pattern.to_path_buf()
    }
}

fn write_png(path: &Path, width: u32, height: u32, rgba: &[u8]) -> Result<()> {
    let io = |e: &dyn std::fmt::Display| Error::InvalidInput(format!("{}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| io(&e))?;
    }
    let file = std::fs::File::create(path).map_err(|e| io(&e))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    enc.set_color(png::ColorType::Rgba);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(|e| io(&e))?;
    w.write_image_data(rgba).map_err(|e| io(&e))?;
    w.finish().map_err(|e| io(&e))
}

/// Runs the demo on a context of its own, shuts it down, and reports.
pub fn run(options: &ContextOptions, config: &DemoConfig) -> Result<DemoReport> {
    if config.instances == 0 || config.frames == 0 {
        return Err(Error::InvalidInput(
            "the demo needs instances and frames".into(),
        ));
    }
    if config.instances > MAX_INSTANCES {
        return Err(Error::InvalidInput(format!(
            "{} trees: the demo generates at most {MAX_INSTANCES} (2 GiB of records on the CPU)",
            config.instances
        )));
    }
    if config.width == 0 || config.height == 0 || config.width > 8192 || config.height > 8192 {
        return Err(Error::InvalidInput(format!(
            "image size {}x{} (1..=8192 each)",
            config.width, config.height
        )));
    }
    if let Some(every) = config.png_every {
        let pattern_ok = config
            .png
            .as_ref()
            .is_some_and(|p| p.to_string_lossy().contains("{frame}"));
        if every == 0 || !pattern_ok {
            return Err(Error::InvalidInput(
                "--png-every N needs N > 0 and a --png path containing {frame}".into(),
            ));
        }
    }
    let mut ctx = Context::new(options)?;
    let canary = ctx.canary().clone();
    let result = demo(&ctx, config);
    let last = ctx.timeline().last_submitted();
    let waited = ctx.timeline().wait(last, Duration::from_secs(30));
    let collected = ctx.collect();
    let leaks = ctx.shutdown().leaks.len();
    drop(ctx);
    let mut report = result?;
    waited?;
    collected?;
    report.leaks = leaks;
    report.validation_messages = canary.total();
    Ok(report)
}

fn demo(ctx: &Context, config: &DemoConfig) -> Result<DemoReport> {
    let mut vconfig = VegetationConfig {
        world_origin: Vec2::splat(-1024.0),
        world_size_m: 2048.0,
        leaf_tile_m: 128.0,
        lod: LodBands {
            full_m: 70.0,
            medium_m: 240.0,
            billboard_m: 720.0,
        },
        atlas_page_px: 512,
        stats_log_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    if let Some(b) = config.budget_bytes {
        vconfig.controller.cap_bytes = b;
    }
    let cap = vconfig.controller.cap_bytes;
    let fog_m = vconfig.lod.billboard_m * 1.15;
    let mut veg = Vegetation::new(ctx, vconfig)?;
    let species: Vec<SpeciesId> = SPECIES
        .iter()
        .enumerate()
        .map(|(k, (name, _))| {
            veg.register_species(
                ctx,
                &SpeciesDesc {
                    name,
                    width: 64,
                    height: 128,
                    rgba8: &tree_billboard(64, 128, k as u32 + 1),
                },
            )
        })
        .collect::<Result<_>>()?;
    let generated = Instant::now();
    let mut patches = 0u64;
    for (sp, instances) in forest(veg.config(), config.instances, config.seed) {
        veg.spawn(&PatchDesc {
            species: species[sp],
            instances: &instances,
        })?;
        patches += 1;
    }
    log::info!(
        "forest: {} trees in {patches} patches, generated in {:.2} s",
        config.instances,
        generated.elapsed().as_secs_f64()
    );
    let result = fly(ctx, &mut veg, config, cap, fog_m);
    let released = veg.release(ctx);
    let mut report = result?;
    released?;
    report.patches = patches;
    Ok(report)
}

struct Passes {
    ring: Option<FrameRing>,
    draw: Option<DrawPass>,
    cull: Option<CullPass>,
    target: Option<Target>,
    counters: Vec<(Buffer, u64)>,
    queries: vk::QueryPool,
}

impl Passes {
    fn destroy(&mut self, ctx: &Context) -> Result<()> {
        // The views and the query pool are destroyed at once: only once the GPU is idle.
        let last = ctx.timeline().last_submitted();
        let idle = ctx
            .timeline()
            .wait(last, Duration::from_secs(30))
            .and_then(|done| {
                if done {
                    Ok(last)
                } else {
                    Err(Error::Vulkan {
                        call: "vkWaitSemaphores (30 s)",
                        result: vk::Result::TIMEOUT,
                    })
                }
            });
        let last = ctx.timeline().last_submitted();
        let waited = idle.is_ok();
        let mut first = idle.map(|_| ());
        if let Some(r) = self.ring.take() {
            first = first.and(r.destroy(ctx));
        }
        if let Some(c) = self.cull.take() {
            first = first.and(c.destroy(ctx));
        }
        if let Some(d) = self.draw.take() {
            first = first.and(d.destroy(ctx));
        }
        if let Some(mut t) = self.target.take() {
            t.destroy(ctx, last, waited);
        }
        for (b, _) in self.counters.drain(..) {
            first = first.and(ctx.retire(b, last));
        }
        if waited {
            // SAFETY: idle (waited above): no submission writes the queries any more.
            unsafe { ctx.device().destroy_query_pool(self.queries, None) };
        } else {
            log::error!("demo: GPU not idle, query pool leaked");
        }
        self.queries = vk::QueryPool::null();
        first
    }
}

fn fly(
    ctx: &Context,
    veg: &mut Vegetation,
    config: &DemoConfig,
    cap: u64,
    fog_m: f32,
) -> Result<DemoReport> {
    let mut passes = Passes {
        ring: None,
        draw: None,
        cull: None,
        target: None,
        counters: Vec::new(),
        queries: vk::QueryPool::null(),
    };
    let result = fly_with(ctx, veg, config, cap, fog_m, &mut passes);
    let destroyed = passes.destroy(ctx);
    let report = result?;
    destroyed?;
    Ok(report)
}

fn fly_with(
    ctx: &Context,
    veg: &mut Vegetation,
    config: &DemoConfig,
    cap: u64,
    fog_m: f32,
    passes: &mut Passes,
) -> Result<DemoReport> {
    let extent = vk::Extent2D {
        width: config.width,
        height: config.height,
    };
    // Species billboards live on atlas page 0 (the demo's three fit many times over).
    let page = veg
        .atlas_page(0)
        .ok_or_else(|| Error::InvalidInput("no atlas page".into()))?;
    passes.draw = Some(DrawPass::new(ctx, COLOR_FORMAT, DEPTH_FORMAT, page, 0)?);
    let draw = passes
        .draw
        .as_ref()
        .ok_or_else(|| Error::InvalidInput("draw".into()))?;
    let compaction = if ctx.adapter().subgroup_ballot_in_compute {
        Compaction::Subgroup
    } else {
        Compaction::Atomic
    };
    let capacity = config.instances.min(16 << 20) as u32;
    passes.cull = Some(CullPass::with_records(
        ctx,
        compaction,
        capacity,
        draw.lod_meshes(),
    )?);
    let cull = passes
        .cull
        .as_ref()
        .ok_or_else(|| Error::InvalidInput("cull".into()))?;
    passes.target = Some(Target::new(ctx, extent, config.png.is_some())?);
    let target = passes
        .target
        .as_ref()
        .ok_or_else(|| Error::InvalidInput("target".into()))?;
    passes.ring = Some(FrameRing::new(ctx)?);
    for _ in 0..slots_of(ctx) {
        passes.counters.push((
            ctx.memory().create_buffer(&BufferDesc {
                name: "demo counters readback",
                size: COUNTERS as u64 * 4,
                usage: vk::BufferUsageFlags::TRANSFER_DST,
                location: MemoryLocation::GpuToCpu,
                category: Category::Other,
            })?,
            0,
        ));
    }
    // Three timestamps per frame slot (start, after the cull, after the draw), where the
    // queue has timestamps.
    // SAFETY: the physical device belongs to the context's instance.
    let families = unsafe {
        ctx.instance()
            .get_physical_device_queue_family_properties(ctx.adapter().handle)
    };
    let timestamps = families
        .get(ctx.queue_family() as usize)
        .is_some_and(|f| f.timestamp_valid_bits > 0)
        && ctx.adapter().timestamp_period_ns > 0.0;
    if timestamps {
        let info = vk::QueryPoolCreateInfo::default()
            .query_type(vk::QueryType::TIMESTAMP)
            .query_count(slots_of(ctx) * 3);
        // SAFETY: valid create info.
        passes.queries = unsafe { ctx.device().create_query_pool(&info, None) }
            .map_err(understory::error::vk_err("vkCreateQueryPool"))?;
    }
    let mut cull_ms = Vec::with_capacity(config.frames as usize);
    let mut draw_ms = Vec::with_capacity(config.frames as usize);
    let ring = passes
        .ring
        .as_mut()
        .ok_or_else(|| Error::InvalidInput("ring".into()))?;
    let (color, depth) = match (&target.color, &target.depth) {
        (Some(c), Some(d)) => (c.raw(), d.raw()),
        _ => return Err(Error::InvalidInput("demo target was destroyed".into())),
    };

    let bar = if config.progress {
        indicatif::ProgressBar::new(config.frames)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} frames ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let say = |line: String| {
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(line);
        }
    };

    let aspect = config.width as f32 / config.height as f32;
    let world = veg.config().world_origin;
    let world_size = veg.config().world_size_m;
    let mut report = DemoReport {
        device: ctx.adapter().name.clone(),
        budget_source: Source::Estimated,
        frames: 0,
        seconds: 0.0,
        instances: config.instances,
        patches: 0,
        peak_bytes: PerCategory([0; 4]),
        peak_held: 0,
        peak_heap_usage: 0,
        heap_budget: 0,
        min_quality: f32::INFINITY,
        evictions: 0,
        uploads: 0,
        refused_uploads: 0,
        deferred_frees: 0,
        peak_drawn: [0; 3],
        overflow_frames: 0,
        gpu_cull_ms: None,
        gpu_draw_ms: None,
        pngs: Vec::new(),
        validation: ctx.validation_enabled(),
        leaks: 0,
        validation_messages: 0,
    };
    let heap = ctx.memory().device_local_heap();
    let squeeze_at = config.frames / 4;
    let release_at = config.frames / 2;
    let started = Instant::now();
    let mut last_line = Instant::now();
    let mut frames_since_line = 0u64;
    let mut gpu_lod = [0u32; 3];
    let slots = passes.counters.len();
    for f in 0..config.frames {
        if config.squeeze && f == squeeze_at {
            // Instance memory down to a third; the atlas (not evictable) keeps its share.
            let stats = veg.stats(ctx);
            let atlas = stats.memory.categories[Category::Atlas].live_bytes;
            let squeezed = (atlas + stats.held.saturating_sub(atlas) / 3).max(1 << 20);
            veg.set_budget_cap(squeezed)?;
            say(format!(
                "frame {f}: squeeze: vegetation cap {:.1} MiB -> {:.1} MiB",
                cap as f64 / MIB,
                squeezed as f64 / MIB
            ));
        }
        if config.squeeze && f == release_at {
            veg.set_budget_cap(cap)?;
            say(format!(
                "frame {f}: squeeze over: vegetation cap back to {:.1} MiB",
                cap as f64 / MIB
            ));
        }
        let (eye, look) = camera(f as f32 / config.frames as f32, world_size * 0.27);
        let start = ctx.begin_frame()?;
        let update = veg.update(ctx, &start, eye)?;
        if let Some(h) = start.heaps.get(heap) {
            if h.budget.usage >= report.peak_heap_usage {
                report.peak_heap_usage = h.budget.usage;
                report.heap_budget = h.budget.budget;
            }
        }
        let quality = update.decision.quality;
        let mut proj = Mat4::perspective_rh(60f32.to_radians(), aspect, 0.5, fog_m * 1.5);
        // Vulkan's clip space has y pointing down.
        proj.y_axis.y = -proj.y_axis.y;
        let view_proj = proj * Mat4::look_at_rh(eye, look, Vec3::Y);
        let view = CullView::new(view_proj, eye, draw.radius(), &veg.config().lod, quality)?;
        let mut frame = DrawFrame::new(
            view_proj,
            eye,
            fog_m * quality.min(1.0),
            [world.x, world.y, world_size],
            config.lod_tint,
        );
        frame.fog[3] = frame.fog[3].max(1.0);
        let species = veg.species_regions();
        let cmd = ring.begin(ctx)?;
        let slot = (f as usize) % slots;
        {
            let (buf, value) = &passes.counters[slot];
            if *value > 0 {
                ctx.timeline().wait(*value, Duration::from_secs(30))?;
                if let Some(m) = buf.mapped() {
                    let c: [u32; COUNTERS] = bytemuck::pod_read_unaligned(&m[..COUNTERS * 4]);
                    gpu_lod = [c[0], c[1], c[2]];
                    for (peak, n) in report.peak_drawn.iter_mut().zip(c) {
                        *peak = (*peak).max(n.min(capacity));
                    }
                    if c[4] + c[5] + c[6] > 0 {
                        report.overflow_frames += 1;
                    }
                }
                if timestamps {
                    let mut t = [0u64; 3];
                    // SAFETY: the three queries of this slot were written by the submission
                    // waited for above.
                    unsafe {
                        ctx.device().get_query_pool_results(
                            passes.queries,
                            slot as u32 * 3,
                            &mut t,
                            vk::QueryResultFlags::TYPE_64,
                        )
                    }
                    .map_err(understory::error::vk_err("vkGetQueryPoolResults"))?;
                    let ms = |a: u64, b: u64| {
                        b.saturating_sub(a) as f64 * f64::from(ctx.adapter().timestamp_period_ns)
                            / 1e6
                    };
                    cull_ms.push(ms(t[0], t[1]));
                    draw_ms.push(ms(t[1], t[2]));
                }
            }
        }
        let png_now = config.png.is_some()
            && match config.png_every {
                Some(n) => f % n == 0 || f + 1 == config.frames,
                None => f + 1 == config.frames,
            };
        let d = ctx.device();
        // SAFETY (whole block): cmd is recording (ring.begin) and is submitted below with the
        // value end_frame receives; every buffer and image used is alive until retired with
        // that value or later; layouts and barriers follow the order documented per command.
        unsafe {
            let q = slot as u32 * 3;
            if timestamps {
                d.cmd_reset_query_pool(cmd, passes.queries, q, 3);
                d.cmd_write_timestamp(cmd, vk::PipelineStageFlags::TOP_OF_PIPE, passes.queries, q);
            }
            veg.record(ctx, cmd)?;
            let sources: Vec<_> = veg.cull_sources().into_iter().map(|(s, _)| s).collect();
            cull.record(ctx, cmd, &sources, &view)?;
            if timestamps {
                d.cmd_write_timestamp(
                    cmd,
                    vk::PipelineStageFlags::BOTTOM_OF_PIPE,
                    passes.queries,
                    q + 1,
                );
            }
            draw.prepare(ctx, cmd, cull, &frame, &species)?;
            // Previous frame's colour/transfer and depth uses before this frame's clears.
            let to_attachment = [
                image_barrier(
                    color,
                    vk::ImageAspectFlags::COLOR,
                    (vk::ImageLayout::UNDEFINED, vk::AccessFlags::empty()),
                    (
                        vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL,
                        vk::AccessFlags::COLOR_ATTACHMENT_WRITE,
                    ),
                ),
                image_barrier(
                    depth,
                    vk::ImageAspectFlags::DEPTH,
                    (
                        vk::ImageLayout::UNDEFINED,
                        vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_WRITE,
                    ),
                    (
                        vk::ImageLayout::DEPTH_ATTACHMENT_OPTIMAL,
                        vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_READ
                            | vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_WRITE,
                    ),
                ),
            ];
            let fragment_tests = vk::PipelineStageFlags::EARLY_FRAGMENT_TESTS
                | vk::PipelineStageFlags::LATE_FRAGMENT_TESTS;
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT
                    | vk::PipelineStageFlags::TRANSFER
                    | fragment_tests,
                vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT | fragment_tests,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &to_attachment,
            );
            let color_att = [vk::RenderingAttachmentInfo::default()
                .image_view(target.color_view)
                .image_layout(vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL)
                .load_op(vk::AttachmentLoadOp::CLEAR)
                .store_op(vk::AttachmentStoreOp::STORE)
                .clear_value(vk::ClearValue {
                    color: vk::ClearColorValue {
                        float32: frame.sky(),
                    },
                })];
            let depth_att = vk::RenderingAttachmentInfo::default()
                .image_view(target.depth_view)
                .image_layout(vk::ImageLayout::DEPTH_ATTACHMENT_OPTIMAL)
                .load_op(vk::AttachmentLoadOp::CLEAR)
                .store_op(vk::AttachmentStoreOp::DONT_CARE)
                .clear_value(vk::ClearValue {
                    depth_stencil: vk::ClearDepthStencilValue {
                        depth: 1.0,
                        stencil: 0,
                    },
                });
            let rendering = vk::RenderingInfo::default()
                .render_area(vk::Rect2D {
                    offset: vk::Offset2D::default(),
                    extent,
                })
                .layer_count(1)
                .color_attachments(&color_att)
                .depth_attachment(&depth_att);
            d.cmd_begin_rendering(cmd, &rendering);
            draw.record(ctx, cmd, cull, extent)?;
            d.cmd_end_rendering(cmd);
            if timestamps {
                d.cmd_write_timestamp(
                    cmd,
                    vk::PipelineStageFlags::BOTTOM_OF_PIPE,
                    passes.queries,
                    q + 2,
                );
            }
            // GPU LOD counts for the stats line (read when this slot comes round again).
            d.cmd_copy_buffer(
                cmd,
                cull.counters()?.raw(),
                passes.counters[slot].0.raw(),
                &[vk::BufferCopy {
                    src_offset: 0,
                    dst_offset: 0,
                    size: COUNTERS as u64 * 4,
                }],
            );
            if png_now {
                let readback = target
                    .readback
                    .as_ref()
                    .ok_or_else(|| Error::InvalidInput("no readback buffer".into()))?;
                d.cmd_pipeline_barrier(
                    cmd,
                    vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT,
                    vk::PipelineStageFlags::TRANSFER,
                    vk::DependencyFlags::empty(),
                    &[],
                    &[],
                    &[image_barrier(
                        color,
                        vk::ImageAspectFlags::COLOR,
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
                    color,
                    vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                    readback.raw(),
                    &[vk::BufferImageCopy {
                        buffer_offset: 0,
                        buffer_row_length: 0,
                        buffer_image_height: 0,
                        image_subresource: vk::ImageSubresourceLayers {
                            aspect_mask: vk::ImageAspectFlags::COLOR,
                            mip_level: 0,
                            base_array_layer: 0,
                            layer_count: 1,
                        },
                        image_offset: vk::Offset3D::default(),
                        image_extent: vk::Extent3D {
                            width: extent.width,
                            height: extent.height,
                            depth: 1,
                        },
                    }],
                );
            }
            understory::gpu::compute::memory_barrier(
                ctx,
                cmd,
                (
                    vk::PipelineStageFlags::TRANSFER,
                    vk::AccessFlags::TRANSFER_WRITE,
                ),
                (vk::PipelineStageFlags::HOST, vk::AccessFlags::HOST_READ),
            );
        }
        let value = ring.submit(ctx, cmd)?;
        passes.counters[slot].1 = value;
        veg.end_frame(ctx, value)?;
        if png_now {
            ctx.timeline().wait(value, Duration::from_secs(30))?;
            let pattern = config
                .png
                .as_ref()
                .ok_or_else(|| Error::InvalidInput("no png path".into()))?;
            let path = png_path(pattern, f);
            let bytes = target
                .readback
                .as_ref()
                .and_then(Buffer::mapped)
                .ok_or_else(|| Error::InvalidInput("readback not mapped".into()))?;
            write_png(&path, extent.width, extent.height, bytes)?;
            report.pngs.push(path);
        }

        let stats = veg.stats(ctx);
        let mem = &stats.memory.categories;
        for (c, peak) in report.peak_bytes.0.iter_mut().enumerate() {
            *peak = (*peak).max(mem.0[c].live_bytes);
        }
        report.peak_held = report.peak_held.max(stats.held);
        report.min_quality = report.min_quality.min(stats.quality);
        report.budget_source = stats.budget_source;
        report.frames = f + 1;
        bar.inc(1);
        frames_since_line += 1;
        if !config.stats_interval.is_zero() && last_line.elapsed() >= config.stats_interval {
            let fps = frames_since_line as f64 / last_line.elapsed().as_secs_f64();
            last_line = Instant::now();
            frames_since_line = 0;
            let gpu = match (cull_ms.last(), draw_ms.last()) {
                (Some(c), Some(d)) => format!(" | GPU cull {c:.2} ms draw {d:.2} ms"),
                _ => String::new(),
            };
            say(format!(
                "frame {f}: {fps:.0} fps{gpu} | held {:.1}/{:.1} MiB ({}) | quality {:.2} | tiles {}/{} | GPU drew full {} medium {} billboard {} | evictions {} | pending frees {}",
                stats.held as f64 / MIB,
                stats.budget as f64 / MIB,
                stats.budget_source,
                stats.quality,
                stats.resident_tiles,
                stats.tiles,
                gpu_lod[0],
                gpu_lod[1],
                gpu_lod[2],
                stats.evictions,
                mem.0.iter().map(|c| c.pending_count).sum::<u64>(),
            ));
        }
    }
    bar.finish_and_clear();
    report.seconds = started.elapsed().as_secs_f64();
    report.gpu_cull_ms = median(&mut cull_ms);
    report.gpu_draw_ms = median(&mut draw_ms);
    let stats = veg.stats(ctx);
    report.evictions = stats.evictions;
    report.uploads = stats.uploads;
    report.refused_uploads = stats.refused_uploads;
    report.deferred_frees = stats.memory.frees_completed;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_reject_garbage() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("300MB").unwrap(), 300_000_000);
        assert_eq!(parse_size("64k").unwrap(), 65_536);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        for bad in ["", "MiB", "12 parsecs", "-5MiB", "0", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_forest_has_every_tree_in_one_tile_and_species() {
        let config = VegetationConfig {
            world_origin: Vec2::splat(-1024.0),
            world_size_m: 2048.0,
            leaf_tile_m: 128.0,
            ..Default::default()
        };
        let patches = forest(&config, 20_000, 3);
        let total: usize = patches.iter().map(|(_, v)| v.len()).sum();
        assert_eq!(total, 20_000);
        let q = understory::world::quadtree::Quadtree::new(
            config.world_origin,
            config.world_size_m,
            config.leaf_tile_m,
        )
        .unwrap();
        for (_, v) in &patches {
            let leaf = q.leaf_at(v[0].pos());
            assert!(leaf.is_some());
            assert!(
                v.iter()
                    .all(|i| q.leaf_at(i.pos()) == leaf && i.is_finite())
            );
        }
        // Stands: some tiles are much denser than others.
        let mut per_tile: HashMap<_, usize> = HashMap::new();
        for (_, v) in &patches {
            *per_tile.entry(q.leaf_at(v[0].pos())).or_default() += v.len();
        }
        let max = per_tile.values().max().copied().unwrap_or(0);
        let min = per_tile.values().min().copied().unwrap_or(0);
        assert!(max > 3 * min.max(1), "density varies: {min}..{max}");
        // Same seed, same forest.
        assert_eq!(
            forest(&config, 1000, 9).len(),
            forest(&config, 1000, 9).len()
        );
    }

    #[test]
    fn png_paths_substitute_the_frame() {
        assert_eq!(
            png_path(Path::new("out/f{frame}.png"), 42),
            PathBuf::from("out/f000042.png")
        );
        assert_eq!(png_path(Path::new("a.png"), 42), PathBuf::from("a.png"));
    }
}
