//! `understory demo`: a seeded, procedurally generated forest that a camera flies over. Tiles
//! stream in and out as it moves, LOD follows the budget, the GPU culls every frame, and the
//! visible trees are drawn (indexed indirect, one draw per LOD) into an offscreen colour and
//! depth image that can be written as PNG. With `--shadows on` the same cull pass also culls four
//! sun shadow cascades, whose lists are drawn into shadow maps the camera draw looks up. It ends
//! with a summary whose leak and validation counts must be 0.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ash::vk;
use glam::{Mat4, Vec2, Vec3};

use crate::rng::Rng;
use understory::error::{Error, Result};
use understory::gpu::budget::Source;
use understory::gpu::context::{Context, ContextOptions, Frame};
use understory::gpu::cull::{
    COUNTERS, CascadeView, Compaction, CullDesc, CullPass, CullView, WIDE_SOURCES_PER_DISPATCH,
};
use understory::gpu::draw::{CENSUS_FORMAT, DrawFrame, DrawPass, DrawPhase, tree_billboard};
use understory::gpu::frame::FrameRing;
use understory::gpu::memory::{Buffer, BufferDesc, Image, ImageDesc, MemoryLocation, RawObject};
use understory::gpu::pyramid::DepthPyramid;
use understory::gpu::shadow::{MAX_CASCADES, ShadowDesc, ShadowMaps};
use understory::policy::category::{CATEGORIES, Category, PerCategory};
use understory::policy::lod::{Lod, LodBands};
use understory::vegetation::{
    PatchDesc, SpeciesDesc, SpeciesId, Stats, Vegetation, VegetationConfig, Viewer,
};
use understory::world::atlas::AtlasRegion;
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
    /// Two-phase occlusion culling: draw what was visible last frame, build a depth pyramid
    /// from it, test the rest against it and draw what is newly visible.
    pub occlusion: bool,
    /// Sun shadows: the cull pass also culls [`MAX_CASCADES`] shadow cascades, whose lists are
    /// drawn into shadow maps that the camera draw looks up.
    pub shadows: bool,
    /// Texels along each cascade's square shadow map.
    pub shadow_map_px: u32,
    /// The census ([`DrawPass::record_census`]): after each frame's draws, which drawn
    /// instances reach the image, counted on the CPU (each frame is waited for).
    pub census: bool,
    /// Where the camera flies.
    pub flight: Flight,
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
            occlusion: false,
            shadows: false,
            shadow_map_px: 1024,
            census: false,
            flight: Flight::Canopy,
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
    /// Highest bytes in live allocations per category (instances, atlas, outputs, staging,
    /// other).
    pub peak_bytes: PerCategory<u64>,
    /// Highest vegetation bytes held in a settled frame (not within [`SETTLE_FRAMES`] after the
    /// budget fell, when the old blocks are still being given back): blocks of instances,
    /// atlas and cull and draw outputs (everything understory holds on the GPU for
    /// vegetation), retired-but-unfreed included.
    pub peak_held: u64,
    /// Highest vegetation bytes held in any frame (the moment a budget falls included).
    pub peak_held_any: u64,
    /// The vegetation budget in the frame of `peak_held`.
    pub peak_held_budget: u64,
    /// Frames whose held bytes passed the budget, not counting the [`SETTLE_FRAMES`] after the
    /// budget fell (the GPU's latency, then the frees).
    pub over_budget_frames: u64,
    /// Frames after the first [`BLANK_GRACE_FRAMES`] in which the GPU drew no instance while
    /// the budget held at least the nearest tile's minimum footprint
    /// ([`understory::vegetation::Stats::min_footprint`]).
    pub blank_frames: u64,
    /// Frames from the end of the last squeeze (the cap restored) to quality 1.00 (0 if it
    /// never dropped; `None` if it did not come back before the run ended).
    pub recovery_frames: Option<u64>,
    /// Highest heap usage of the device-local heap: the driver's with `VK_EXT_memory_budget`,
    /// understory's own otherwise (see `budget_source`).
    pub peak_heap_usage: u64,
    /// Usage of the device-local heap (as `peak_heap_usage`) when the context was new, and
    /// after the demo released everything it made, before shutdown: with the driver's numbers,
    /// what the driver keeps past its objects (scratch memory of the pipelines, say).
    pub heap_usage_start_after: (u64, u64),
    /// That heap's budget at the same frame.
    pub heap_budget: u64,
    /// The driver's allocation granularity understory counts memory of its own at, and
    /// whether it was measured (`VK_EXT_memory_budget`) or assumed.
    pub allocation_granularity: (u64, bool),
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
    /// With shadows: most instances drawn into each cascade's shadow map in one frame, per LOD
    /// (empty without shadows).
    pub peak_drawn_cascades: Vec<[u32; 3]>,
    /// Instances drawn over the whole flight (every LOD, every frame read back).
    pub drawn_total: u64,
    /// With the census: the instances that reached the image (at least one pixel shows them),
    /// over the frames of `drawn_total`. No conservative culling draws fewer at that image.
    pub reached_total: Option<u64>,
    /// Two-phase occlusion culling was on.
    pub occlusion: bool,
    /// Where the camera flew.
    pub flight: Flight,
    /// Sun shadows were on.
    pub shadows: bool,
    /// Frames whose LOD lists overflowed (instances not drawn).
    pub overflow_frames: u64,
    /// Frames in which a cascade's lists overflowed (casters not drawn).
    pub shadow_overflow_frames: u64,
    /// Median GPU time of the cull pass (uploads included; with occlusion both phases and the
    /// depth pyramid) per frame, milliseconds (`None` without timestamps on the queue).
    pub gpu_cull_ms: Option<f64>,
    /// Median GPU time of the draw (ground and the indirect draws; with occlusion both
    /// phases'; with shadows the shadow maps too) per frame, milliseconds.
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

/// Frames after the budget falls before held bytes must be inside it again.
pub const SETTLE_FRAMES: u64 = 8;
/// Frames at the start that cannot be blank (uploads and the first lists are on their way).
pub const BLANK_GRACE_FRAMES: u64 = 10;

impl DemoReport {
    /// Nothing leaked and no validation message.
    pub fn passed(&self) -> bool {
        self.leaks == 0 && self.validation_messages == 0
    }

    /// The budget line of the summary.
    pub fn budget_line(&self) -> String {
        let mib = |b: u64| b as f64 / MIB;
        let recovery = match self.recovery_frames {
            Some(n) => format!("{n} frames"),
            None => "never (below 1.00 when the run ended)".into(),
        };
        format!(
            "budget: peak device bytes {:.1} MiB of {:.1} MiB (everything understory holds); frames over budget after settling {}; blank frames {}; recovery to quality 1.00 in {recovery}",
            mib(self.peak_held),
            mib(self.peak_held_budget),
            self.over_budget_frames,
            self.blank_frames,
        )
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
pub const SPECIES: [(&str, [f32; 3]); 3] = [
    ("spruce", [0.20, 0.42, 0.24]),
    ("pine", [0.36, 0.56, 0.26]),
    ("larch", [0.62, 0.64, 0.24]),
];

/// The forest: `n` trees in stands (value noise decides where trees grow and which species),
/// grouped into patches of one species per leaf tile.
///
/// With `track` (the [`Flight::Ground`] lap's radius) no tree grows within
/// [`TRACK_HALF_WIDTH_M`] of the lap around the world's centre.
pub fn forest(
    config: &VegetationConfig,
    n: u64,
    seed: u64,
    track: Option<f32>,
) -> Vec<(usize, Vec<Instance>)> {
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
        // The lap goes around the origin, as the cameras do.
        if track.is_some_and(|r| (p.length() - r).abs() < TRACK_HALF_WIDTH_M) {
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

/// Where the demo's camera flies: one lap around the world's centre, at
/// [`DemoConfig::frames`] frames a lap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Flight {
    /// 26–42 m above the ground, over a canopy of 9–21 m trees, looking ahead and a little down
    /// ([`camera`]).
    #[default]
    Canopy,
    /// At eye height (1.8 m) along a forest track: a ring without trees,
    /// [`TRACK_HALF_WIDTH_M`] either side of the lap, looking along it ([`ground_camera`]).
    Ground,
}

/// Half the width of the track the [`Flight::Ground`] camera walks along: no tree grows within
/// this distance of the lap.
pub const TRACK_HALF_WIDTH_M: f32 = 4.0;

/// The lap's radius around the world's centre in a world `world_size_m` across.
pub fn lap_radius(world_size_m: f32) -> f32 {
    world_size_m * 0.27
}

/// The camera (eye, a point it looks at) of `flight` at `t` in [0, 1] of a lap of `radius`.
pub fn flight_camera(flight: Flight, t: f32, radius: f32) -> (Vec3, Vec3) {
    match flight {
        Flight::Canopy => camera(t, radius),
        Flight::Ground => ground_camera(t, radius),
    }
}

/// The camera at `t` in [0, 1]: one lap around the world's centre at tree-top height, looking
/// ahead and a little down.
pub fn camera(t: f32, radius: f32) -> (Vec3, Vec3) {
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

/// The camera at `t` in [0, 1] walking the track: one lap of `radius` around the world's
/// centre at eye height, looking along the track (at a point on it 40 m ahead) and a little up.
pub fn ground_camera(t: f32, radius: f32) -> (Vec3, Vec3) {
    let a = t * std::f32::consts::TAU;
    let on = |a: f32| Vec3::new(radius * a.cos(), 1.8, radius * a.sin());
    let eye = on(a);
    let ahead = on(a + 40.0 / radius);
    (eye, ahead + Vec3::Y * 2.0)
}

/// Offscreen colour + depth targets and the PNG readback buffer: the host's own objects. The
/// images and the buffer are understory's (dropped, they retire at their last frame); the views
/// are raw handles, retired through `Context::retire_object` at the last frame that drew.
struct Target<'a> {
    ctx: &'a Context,
    color: Image,
    depth: Image,
    color_view: vk::ImageView,
    depth_view: vk::ImageView,
    readback: Option<Buffer>,
    /// With the census: its image, view and readback.
    census: Option<(Image, vk::ImageView, Buffer)>,
    extent: vk::Extent2D,
}

impl<'a> Target<'a> {
    fn new(ctx: &'a Context, extent: vk::Extent2D, readback: bool, census: bool) -> Result<Self> {
        let image = |name, format, usage| {
            ctx.create_image(&ImageDesc {
                name,
                extent,
                format,
                mip_levels: 1,
                usage,
                category: Category::Other,
            })
        };
        let color = image(
            "demo colour",
            COLOR_FORMAT,
            vk::ImageUsageFlags::COLOR_ATTACHMENT | vk::ImageUsageFlags::TRANSFER_SRC,
        )?;
        // Sampled: the occlusion pyramid is built from it.
        let depth = image(
            "demo depth",
            DEPTH_FORMAT,
            vk::ImageUsageFlags::DEPTH_STENCIL_ATTACHMENT | vk::ImageUsageFlags::SAMPLED,
        )?;
        let mut t = Self {
            ctx,
            color,
            depth,
            color_view: vk::ImageView::null(),
            depth_view: vk::ImageView::null(),
            readback: None,
            census: None,
            extent,
        };
        // On error, Drop retires the views made so far.
        t.color_view = view(ctx, &t.color, vk::ImageAspectFlags::COLOR)?;
        t.depth_view = view(ctx, &t.depth, vk::ImageAspectFlags::DEPTH)?;
        if readback {
            t.readback = Some(ctx.create_buffer(&BufferDesc {
                name: "demo png readback",
                size: u64::from(extent.width) * u64::from(extent.height) * 4,
                usage: vk::BufferUsageFlags::TRANSFER_DST,
                location: MemoryLocation::GpuToCpu,
                category: Category::Other,
            })?);
        }
        if census {
            let image = image(
                "demo census",
                CENSUS_FORMAT,
                vk::ImageUsageFlags::COLOR_ATTACHMENT | vk::ImageUsageFlags::TRANSFER_SRC,
            )?;
            let readback = ctx.create_buffer(&BufferDesc {
                name: "demo census readback",
                size: u64::from(extent.width) * u64::from(extent.height) * 4,
                usage: vk::BufferUsageFlags::TRANSFER_DST,
                location: MemoryLocation::GpuToCpu,
                category: Category::Other,
            })?;
            let v = view(ctx, &image, vk::ImageAspectFlags::COLOR)?;
            t.census = Some((image, v, readback));
        }
        Ok(t)
    }

    /// Marks the images and the readback used by `frame` (their views are used with them).
    fn used_in(&self, frame: &Frame) -> Result<()> {
        self.color.used_in(frame)?;
        self.depth.used_in(frame)?;
        if let Some(r) = &self.readback {
            r.used_in(frame)?;
        }
        if let Some((image, _, readback)) = &self.census {
            image.used_in(frame)?;
            readback.used_in(frame)?;
        }
        Ok(())
    }
}

impl Drop for Target<'_> {
    fn drop(&mut self) {
        let last = self.color.last_use();
        let census = self.census.as_ref().map(|c| c.1);
        for v in [self.color_view, self.depth_view].into_iter().chain(census) {
            // SAFETY: views of this context's device, destroyed by nothing else; every frame
            // that used them also used `color`, whose last use is `last`.
            if let Err(e) = unsafe { self.ctx.retire_object(RawObject::ImageView(v), last) } {
                log::error!("demo target: {e}");
            }
        }
    }
}

fn view(ctx: &Context, image: &Image, aspect: vk::ImageAspectFlags) -> Result<vk::ImageView> {
    let info = vk::ImageViewCreateInfo::default()
        .image(image.raw())
        .view_type(vk::ImageViewType::TYPE_2D)
        .format(image.format())
        .subresource_range(range(aspect));
    // SAFETY: a live 2D image of this device, one mip, one layer.
    unsafe { ctx.device().create_image_view(&info, None) }
        .map_err(understory::error::vk_err("vkCreateImageView"))
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
    let ctx = Context::new(options)?;
    let canary = ctx.canary().clone();
    let heap_usage = |ctx: &Context| -> Result<u64> {
        let heap = ctx.memory().device_local_heap();
        Ok(ctx
            .memory()
            .refresh_budget()?
            .get(heap)
            .map_or(0, |h| h.budget.usage))
    };
    let start = heap_usage(&ctx);
    // Everything the demo made is dropped inside `demo`, so shutdown finds nothing alive.
    let result = demo(&ctx, config);
    // Everything was dropped; wait for the GPU, free, give blocks back, and read the driver.
    let after = ctx
        .wait(ctx.last_submitted(), Duration::from_secs(30))
        .and_then(|()| ctx.collect())
        .and_then(|_| {
            ctx.memory().flush_cache();
            ctx.memory().release_empty_blocks()
        })
        .and_then(|_| heap_usage(&ctx));
    let shutdown = ctx.shutdown();
    let mut report = result?;
    report.heap_usage_start_after = (start?, after?);
    report.leaks = shutdown?.leaks.len();
    report.validation_messages = canary.total();
    Ok(report)
}

/// The demo's world: 2 km square, 128 m leaf tiles, its LOD bands and atlas page size (other
/// hosts, such as `understory-wgpu`'s example, fly over the same forest).
pub fn world_config() -> VegetationConfig {
    VegetationConfig {
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
    }
}

fn demo(ctx: &Context, config: &DemoConfig) -> Result<DemoReport> {
    let mut vconfig = world_config();
    if let Some(b) = config.budget_bytes {
        vconfig.controller.cap_bytes = b;
    }
    let mut veg = Vegetation::new(ctx, vconfig)?;
    let species: Vec<SpeciesId> = SPECIES
        .iter()
        .enumerate()
        .map(|(k, (name, _))| {
            veg.register_species(&SpeciesDesc {
                name,
                width: 64,
                height: 128,
                rgba8: &tree_billboard(64, 128, k as u32 + 1),
            })
        })
        .collect::<Result<_>>()?;
    let generated = Instant::now();
    let mut patches = 0u64;
    let track = (config.flight == Flight::Ground).then(|| lap_radius(veg.config().world_size_m));
    for (sp, instances) in forest(veg.config(), config.instances, config.seed, track) {
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
    let mut report = fly(ctx, &mut veg, config)?;
    report.patches = patches;
    Ok(report)
}

/// Everything the demo draws with: the passes, the target, and per frame in flight a counters
/// readback and three timestamps (the command ring is apart: its commands borrow it while they
/// are recorded).
struct Gpu<'a> {
    ctx: &'a Context,
    draw: DrawPass,
    cull: CullPass,
    /// With occlusion culling: the depth pyramid of the target's depth.
    pyramid: Option<DepthPyramid>,
    /// With shadows: the cascades' shadow maps.
    shadows: Option<ShadowMaps>,
    target: Target<'a>,
    /// Per slot: the LOD counters (every view's) of the frame that last used it, and that
    /// frame's value.
    counters: Vec<(Buffer, u64)>,
    /// [`STAMPS`] timestamps per slot, where the queue has timestamps.
    queries: Option<vk::QueryPool>,
}

/// Bytes of the counters of a cull pass of `views` views.
fn counter_bytes(views: u32) -> u64 {
    COUNTERS as u64 * 4 * u64::from(views)
}

/// Timestamps per frame: start, after the (first) cull, after the (first) draw, after the
/// pyramid and the second cull, after the second draw (without occlusion the middle two are
/// written right after the first draw).
const STAMPS: u32 = 5;

impl<'a> Gpu<'a> {
    fn new(ctx: &'a Context, veg: &Vegetation, config: &DemoConfig) -> Result<Self> {
        // Species billboards live on atlas page 0 (the demo's three fit many times over).
        let page = veg
            .atlas_page(0)
            .ok_or_else(|| Error::InvalidInput("no atlas page".into()))?;
        let draw = DrawPass::new(ctx, COLOR_FORMAT, DEPTH_FORMAT, page, 0)?;
        let compaction = if ctx.adapter().subgroup_ballot_arithmetic_in_compute {
            Compaction::Subgroup
        } else {
            Compaction::Atomic
        };
        let capacity = config
            .instances
            .min(16 << 20)
            .min(u64::from(CullPass::max_capacity(ctx, true))) as u32;
        let views = if config.shadows { 1 + MAX_CASCADES } else { 1 };
        let cull = CullPass::from_desc(
            ctx,
            &CullDesc {
                compaction,
                capacity,
                adaptive: true,
                meshes: draw.lod_meshes(),
                records: true,
                max_sources_per_dispatch: WIDE_SOURCES_PER_DISPATCH,
                views,
            },
        )?;
        let shadows = if config.shadows {
            Some(ShadowMaps::new(
                ctx,
                &ShadowDesc {
                    cascades: MAX_CASCADES,
                    tile_px: config.shadow_map_px,
                    ..Default::default()
                },
                page,
                0,
            )?)
        } else {
            None
        };
        let extent = vk::Extent2D {
            width: config.width,
            height: config.height,
        };
        let target = Target::new(ctx, extent, config.png.is_some(), config.census)?;
        let pyramid = if config.occlusion {
            Some(DepthPyramid::new(ctx, extent)?)
        } else {
            None
        };
        let slots = ctx.frames_in_flight();
        let counters = (0..slots)
            .map(|_| {
                ctx.create_buffer(&BufferDesc {
                    name: "demo counters readback",
                    size: counter_bytes(views),
                    usage: vk::BufferUsageFlags::TRANSFER_DST,
                    location: MemoryLocation::GpuToCpu,
                    category: Category::Other,
                })
                .map(|b| (b, 0))
            })
            .collect::<Result<_>>()?;
        // SAFETY: the physical device belongs to the context's instance.
        let families = unsafe {
            ctx.instance()
                .get_physical_device_queue_family_properties(ctx.adapter().handle)
        };
        let timestamps = families
            .get(ctx.queue_family() as usize)
            .is_some_and(|f| f.timestamp_valid_bits > 0)
            && ctx.adapter().timestamp_period_ns > 0.0;
        let mut gpu = Self {
            ctx,
            draw,
            cull,
            pyramid,
            shadows,
            target,
            counters,
            queries: None,
        };
        if timestamps {
            let info = vk::QueryPoolCreateInfo::default()
                .query_type(vk::QueryType::TIMESTAMP)
                .query_count(slots * STAMPS);
            // SAFETY: valid create info.
            gpu.queries = Some(
                unsafe { ctx.device().create_query_pool(&info, None) }
                    .map_err(understory::error::vk_err("vkCreateQueryPool"))?,
            );
        }
        Ok(gpu)
    }

    /// Reads what the GPU counted in the frame that last used `slot` (waiting for it): the
    /// instances drawn per LOD, overflow, and the GPU times.
    fn read_back(&self, slot: usize, acc: &mut Accumulator) -> Result<()> {
        let (buf, value) = &self.counters[slot];
        if *value == 0 {
            return Ok(());
        }
        self.ctx.wait(*value, Duration::from_secs(30))?;
        let words: Vec<u32> = buf.mapped()?[..counter_bytes(self.cull.views()) as usize]
            .chunks_exact(4)
            .map(bytemuck::pod_read_unaligned)
            .collect();
        // Appended minus what did not fit the list: what was drawn (view 0 the camera, views
        // 1.. the cascades).
        let per_view: Vec<([u32; 3], bool)> = words
            .chunks_exact(COUNTERS)
            .map(|c| {
                (
                    [c[0] - c[4], c[1] - c[5], c[2] - c[6]],
                    c[4] + c[5] + c[6] > 0,
                )
            })
            .collect();
        let c = &words[..COUNTERS];
        let drawn = per_view[0].0;
        for (peak, (n, _)) in acc
            .report
            .peak_drawn_cascades
            .iter_mut()
            .zip(&per_view[1..])
        {
            for (p, n) in peak.iter_mut().zip(n) {
                *p = (*p).max(*n);
            }
        }
        if per_view[1..].iter().any(|(_, overflow)| *overflow) {
            acc.report.shadow_overflow_frames += 1;
        }
        acc.gpu_lod = drawn;
        let (counted, could_draw) = acc.slot_frames[slot];
        if counted >= BLANK_GRACE_FRAMES && could_draw && drawn.iter().all(|n| *n == 0) {
            acc.report.blank_frames += 1;
            log::warn!("frame {counted}: the GPU drew no tree");
        }
        acc.report.drawn_total += drawn.iter().map(|n| u64::from(*n)).sum::<u64>();
        if let Some(r) = acc.report.reached_total.as_mut() {
            *r += acc.reached.get(counted as usize).copied().unwrap_or(0);
        }
        for (peak, n) in acc.report.peak_drawn.iter_mut().zip(drawn) {
            *peak = (*peak).max(n);
        }
        if c[4] + c[5] + c[6] > 0 {
            acc.report.overflow_frames += 1;
        }
        if let Some(pool) = self.queries {
            let mut t = [0u64; STAMPS as usize];
            // SAFETY: the queries of this slot were written by the frame waited for.
            unsafe {
                self.ctx.device().get_query_pool_results(
                    pool,
                    slot as u32 * STAMPS,
                    &mut t,
                    vk::QueryResultFlags::TYPE_64,
                )
            }
            .map_err(understory::error::vk_err("vkGetQueryPoolResults"))?;
            let period = f64::from(self.ctx.adapter().timestamp_period_ns);
            let ms = |a: u64, b: u64| b.saturating_sub(a) as f64 * period / 1e6;
            acc.cull_ms.push(ms(t[0], t[1]) + ms(t[2], t[3]));
            acc.draw_ms.push(ms(t[1], t[2]) + ms(t[3], t[4]));
        }
        Ok(())
    }

    /// Records the frame: uploads, cull (with `sun`, the shadow cascades too), shadow maps,
    /// draw into the target, the counters copy and (with `png`) the colour image's readback.
    ///
    /// # Safety
    /// `cmd` is recording for `frame` and is submitted as its submission.
    #[allow(clippy::too_many_arguments)]
    unsafe fn record(
        &mut self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        slot: usize,
        veg: &mut Vegetation,
        view: &CullView,
        constants: &DrawFrame,
        sun: Option<&Cascades>,
        png: bool,
    ) -> Result<()> {
        if let Some(sun) = sun {
            // Billboards (the far trees: 640,063 in the 4th cascade at 4M trees on an H200, a few
            // texels each) cast only into the two nearest cascades.
            let views = sun
                .view_projs
                .iter()
                .enumerate()
                .map(|(c, m)| {
                    let max = if c < 2 { Lod::Billboard } else { Lod::Medium };
                    CascadeView::new(*m).map(|v| v.with_max_lod(max))
                })
                .collect::<Result<Vec<_>>>()?;
            self.cull.set_cascades(&views)?;
        }
        let d = self.ctx.device();
        let q = slot as u32 * STAMPS;
        let stamp = |stage, at| {
            if let Some(pool) = self.queries {
                // SAFETY: recording (caller); the query was reset in this command buffer.
                unsafe { d.cmd_write_timestamp(cmd, stage, pool, at) };
            }
        };
        if let Some(pool) = self.queries {
            // SAFETY: recording outside a render pass; the slot's previous frame completed
            // (the ring waited for it), so its queries are not in use.
            unsafe { d.cmd_reset_query_pool(cmd, pool, q, STAMPS) };
        }
        stamp(vk::PipelineStageFlags::TOP_OF_PIPE, q);
        let species = veg.species_regions();
        // SAFETY (whole block): cmd is recording for `frame` (caller); understory's recording
        // functions mark what they use; the host's own images and buffers are marked below.
        unsafe {
            veg.record(frame, cmd)?;
            let sources: Vec<_> = veg.cull_sources().into_iter().map(|(s, _)| s).collect();
            let bottom = vk::PipelineStageFlags::BOTTOM_OF_PIPE;
            self.target.used_in(frame)?;
            if let Some(pyramid) = &self.pyramid {
                self.cull.record_first(frame, cmd, &sources, view)?;
                stamp(bottom, q + 1);
                self.prepare(frame, cmd, veg, constants, sun, &species)?;
                self.render(frame, cmd, veg, constants, Some(DrawPhase::First))?;
                stamp(bottom, q + 2);
                self.depth_for_pyramid(cmd, true);
                pyramid.record(
                    frame,
                    cmd,
                    self.target.depth_view,
                    vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL,
                )?;
                let view_proj = Mat4::from_cols_array_2d(&constants.view_proj);
                let bounds = self.draw.bounds();
                self.cull
                    .record_second(frame, cmd, pyramid, view_proj, &bounds)?;
                stamp(bottom, q + 3);
                self.depth_for_pyramid(cmd, false);
                self.render(frame, cmd, veg, constants, Some(DrawPhase::Second))?;
            } else {
                self.cull.record(frame, cmd, &sources, view)?;
                stamp(bottom, q + 1);
                self.prepare(frame, cmd, veg, constants, sun, &species)?;
                self.render(frame, cmd, veg, constants, None)?;
                stamp(bottom, q + 2);
                stamp(bottom, q + 3);
            }
            stamp(bottom, q + 4);
            if self.target.census.is_some() {
                self.census(frame, cmd, veg)?;
            }
            let (counters, _) = &self.counters[slot];
            counters.used_in(frame)?;
            let src = self.cull.counters()?;
            src.used_in(frame)?;
            d.cmd_copy_buffer(
                cmd,
                src.raw(),
                counters.raw(),
                &[vk::BufferCopy {
                    src_offset: 0,
                    dst_offset: 0,
                    size: counter_bytes(self.cull.views()),
                }],
            );
            if png {
                self.copy_color(cmd)?;
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
    }

    /// After the cull: the shadow maps of `sun`'s cascades (the cull's cascade lists), then the
    /// camera draw's constants, which look the maps up when there are any.
    ///
    /// # Safety
    /// As [`Gpu::record`]; after the cull ([`CullPass::record`] or [`CullPass::record_first`])
    /// of this frame, outside a rendering scope.
    unsafe fn prepare(
        &self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        veg: &Vegetation,
        constants: &DrawFrame,
        sun: Option<&Cascades>,
        species: &[Option<AtlasRegion>],
    ) -> Result<()> {
        let page = veg
            .atlas_page(0)
            .ok_or_else(|| Error::InvalidInput("no atlas page".into()))?;
        let shadows = self.shadows.as_ref().zip(sun);
        // SAFETY: the caller's promises; the cull recorded this frame's cascades before, and
        // the maps are recorded before the draw's constants that look them up.
        unsafe {
            if let Some((maps, sun)) = shadows {
                maps.record(frame, cmd, &self.cull, &sun.view_projs, species, page)?;
            }
            self.draw
                .prepare(frame, cmd, &self.cull, constants, species)?;
            if let Some((maps, sun)) = shadows {
                self.draw
                    .prepare_shadows(frame, cmd, maps, sun.distance_m)?;
            }
        }
        Ok(())
    }

    /// The depth image from the first phase's attachment to what the pyramid reads
    /// (`to_pyramid`), or back for the second phase's draws.
    ///
    /// # Safety
    /// As [`Gpu::record`].
    unsafe fn depth_for_pyramid(&self, cmd: vk::CommandBuffer, to_pyramid: bool) {
        let tests = vk::PipelineStageFlags::EARLY_FRAGMENT_TESTS
            | vk::PipelineStageFlags::LATE_FRAGMENT_TESTS;
        let attachment = (
            vk::ImageLayout::DEPTH_ATTACHMENT_OPTIMAL,
            vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_READ
                | vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_WRITE,
        );
        let read = (
            vk::ImageLayout::DEPTH_STENCIL_READ_ONLY_OPTIMAL,
            vk::AccessFlags::SHADER_READ,
        );
        let compute = vk::PipelineStageFlags::COMPUTE_SHADER;
        let output = vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT;
        let (src, dst, from, to) = if to_pyramid {
            (tests, compute, attachment, read)
        } else {
            (compute | output, tests | output, read, attachment)
        };
        let mut barriers = vec![image_barrier(
            self.target.depth.raw(),
            vk::ImageAspectFlags::DEPTH,
            from,
            to,
        )];
        if !to_pyramid {
            // The second phase's colour writes after the first's.
            let color = (
                vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL,
                vk::AccessFlags::COLOR_ATTACHMENT_WRITE,
            );
            barriers.push(image_barrier(
                self.target.color.raw(),
                vk::ImageAspectFlags::COLOR,
                color,
                (
                    color.0,
                    vk::AccessFlags::COLOR_ATTACHMENT_READ
                        | vk::AccessFlags::COLOR_ATTACHMENT_WRITE,
                ),
            ));
        }
        // SAFETY: cmd is recording outside a rendering scope (caller); the depth image is
        // marked used by the frame and in `from`'s layout.
        unsafe {
            self.ctx.device().cmd_pipeline_barrier(
                cmd,
                src,
                dst,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &barriers,
            )
        };
    }

    /// The rendering scope: clear to the sky, ground and trees (`phase` `None`: everything the
    /// cull appended; the first occlusion phase clears too, the second loads what it stored).
    ///
    /// # Safety
    /// As [`Gpu::record`].
    unsafe fn render(
        &self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        veg: &Vegetation,
        constants: &DrawFrame,
        phase: Option<DrawPhase>,
    ) -> Result<()> {
        let d = self.ctx.device();
        let t = &self.target;
        let second = phase == Some(DrawPhase::Second);
        let load = if second {
            vk::AttachmentLoadOp::LOAD
        } else {
            vk::AttachmentLoadOp::CLEAR
        };
        // Previous frame's colour/transfer and depth uses before this frame's clears.
        let to_attachment = [
            image_barrier(
                t.color.raw(),
                vk::ImageAspectFlags::COLOR,
                (vk::ImageLayout::UNDEFINED, vk::AccessFlags::empty()),
                (
                    vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL,
                    vk::AccessFlags::COLOR_ATTACHMENT_WRITE,
                ),
            ),
            image_barrier(
                t.depth.raw(),
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
        let color_att = [vk::RenderingAttachmentInfo::default()
            .image_view(t.color_view)
            .image_layout(vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL)
            .load_op(load)
            .store_op(vk::AttachmentStoreOp::STORE)
            .clear_value(vk::ClearValue {
                color: vk::ClearColorValue {
                    float32: constants.sky(),
                },
            })];
        let depth_att = vk::RenderingAttachmentInfo::default()
            .image_view(t.depth_view)
            .image_layout(vk::ImageLayout::DEPTH_ATTACHMENT_OPTIMAL)
            .load_op(load)
            .store_op(if phase == Some(DrawPhase::First) || t.census.is_some() {
                vk::AttachmentStoreOp::STORE
            } else {
                vk::AttachmentStoreOp::DONT_CARE
            })
            .clear_value(vk::ClearValue {
                depth_stencil: vk::ClearDepthStencilValue {
                    depth: 1.0,
                    stencil: 0,
                },
            });
        let rendering = vk::RenderingInfo::default()
            .render_area(vk::Rect2D {
                offset: vk::Offset2D::default(),
                extent: t.extent,
            })
            .layer_count(1)
            .color_attachments(&color_att)
            .depth_attachment(&depth_att);
        let page = veg
            .atlas_page(0)
            .ok_or_else(|| Error::InvalidInput("no atlas page".into()))?;
        // SAFETY: cmd is recording for `frame` (caller), outside a render pass; the target's
        // images are marked used by `frame`; the layouts follow the barriers.
        unsafe {
            if !second {
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
            }
            d.cmd_begin_rendering(cmd, &rendering);
            let drawn = match phase {
                Some(p) => self
                    .draw
                    .record_phase(frame, cmd, &self.cull, page, t.extent, p),
                None => self.draw.record(frame, cmd, &self.cull, page, t.extent),
            };
            d.cmd_end_rendering(cmd);
            drawn
        }
    }

    /// The census: the frame's instances drawn again into the census image against the depth
    /// the draws stored ([`DrawPass::record_census`]), copied into its readback.
    ///
    /// # Safety
    /// As [`Gpu::record`]; after the frame's last [`Gpu::render`] (which stored the depth).
    unsafe fn census(&self, frame: &Frame, cmd: vk::CommandBuffer, veg: &Vegetation) -> Result<()> {
        let d = self.ctx.device();
        let t = &self.target;
        let (image, census_view, readback) = t
            .census
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("no census image".into()))?;
        let page = veg
            .atlas_page(0)
            .ok_or_else(|| Error::InvalidInput("no atlas page".into()))?;
        let fragment_tests = vk::PipelineStageFlags::EARLY_FRAGMENT_TESTS
            | vk::PipelineStageFlags::LATE_FRAGMENT_TESTS;
        let barriers = [
            // The last frame's copy read it; this frame clears it.
            image_barrier(
                image.raw(),
                vk::ImageAspectFlags::COLOR,
                (vk::ImageLayout::UNDEFINED, vk::AccessFlags::empty()),
                (
                    vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL,
                    vk::AccessFlags::COLOR_ATTACHMENT_WRITE,
                ),
            ),
            // The draws' depth writes before the census's depth tests.
            image_barrier(
                t.depth.raw(),
                vk::ImageAspectFlags::DEPTH,
                (
                    vk::ImageLayout::DEPTH_ATTACHMENT_OPTIMAL,
                    vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_WRITE,
                ),
                (
                    vk::ImageLayout::DEPTH_ATTACHMENT_OPTIMAL,
                    vk::AccessFlags::DEPTH_STENCIL_ATTACHMENT_READ,
                ),
            ),
        ];
        let color_att = [vk::RenderingAttachmentInfo::default()
            .image_view(*census_view)
            .image_layout(vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL)
            .load_op(vk::AttachmentLoadOp::CLEAR)
            .store_op(vk::AttachmentStoreOp::STORE)
            .clear_value(vk::ClearValue {
                color: vk::ClearColorValue { uint32: [0; 4] },
            })];
        let depth_att = vk::RenderingAttachmentInfo::default()
            .image_view(t.depth_view)
            .image_layout(vk::ImageLayout::DEPTH_ATTACHMENT_OPTIMAL)
            .load_op(vk::AttachmentLoadOp::LOAD)
            .store_op(vk::AttachmentStoreOp::NONE);
        let rendering = vk::RenderingInfo::default()
            .render_area(vk::Rect2D {
                offset: vk::Offset2D::default(),
                extent: t.extent,
            })
            .layer_count(1)
            .color_attachments(&color_att)
            .depth_attachment(&depth_att);
        // SAFETY: cmd is recording for `frame` (caller), outside a rendering scope; the
        // target's images and the census readback are marked used by `frame` (`used_in`); the
        // depth holds what this frame's draws stored (the render before stored it), ordered by
        // the barrier; the census image is in the layout of its barrier.
        unsafe {
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::TRANSFER | fragment_tests,
                vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT | fragment_tests,
                vk::DependencyFlags::empty(),
                &[],
                &[],
                &barriers,
            );
            d.cmd_begin_rendering(cmd, &rendering);
            let drawn = self
                .draw
                .record_census(frame, cmd, &self.cull, page, t.extent);
            d.cmd_end_rendering(cmd);
            drawn?;
            copy_to_readback(d, cmd, image, readback, t.extent);
        }
        Ok(())
    }

    /// Copies the colour image into the PNG readback buffer.
    ///
    /// # Safety
    /// As [`Gpu::record`]; after [`Gpu::render`].
    unsafe fn copy_color(&self, cmd: vk::CommandBuffer) -> Result<()> {
        let d = self.ctx.device();
        let t = &self.target;
        let readback = t
            .readback
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("no readback buffer".into()))?;
        // SAFETY: as the caller vouched; the readback is marked with the target.
        unsafe { copy_to_readback(d, cmd, &t.color, readback, t.extent) };
        Ok(())
    }
}

impl Drop for Gpu<'_> {
    fn drop(&mut self) {
        if let Some(pool) = self.queries.take() {
            let last = self.counters.iter().map(|(_, v)| *v).max().unwrap_or(0);
            // SAFETY: a query pool of this device that only the frames up to `last` used.
            if let Err(e) = unsafe { self.ctx.retire_object(RawObject::QueryPool(pool), last) } {
                log::error!("demo: {e}");
            }
        }
    }
}

/// What the frames add up to: the report, GPU times, the progress bar and the stats lines.
struct Accumulator {
    report: DemoReport,
    cull_ms: Vec<f64>,
    draw_ms: Vec<f64>,
    /// With the census: per frame, the instances that reached the image.
    reached: Vec<u64>,
    gpu_lod: [u32; 3],
    /// Per counters slot: the frame it counted, and whether that frame could be blank (its
    /// budget held the nearest tile's minimum footprint).
    slot_frames: Vec<(u64, bool)>,
    last_budget: u64,
    settled_from: u64,
    /// The frame the last squeeze ended, and whether quality has been 1.00 since.
    squeeze_ended: Option<u64>,
    bar: indicatif::ProgressBar,
    last_line: Instant,
    frames_since_line: u64,
}

impl Accumulator {
    fn new(ctx: &Context, config: &DemoConfig) -> Self {
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
        Self {
            report: DemoReport {
                device: ctx.adapter().name.clone(),
                budget_source: Source::Estimated,
                frames: 0,
                seconds: 0.0,
                instances: config.instances,
                patches: 0,
                peak_bytes: PerCategory([0; CATEGORIES]),
                peak_held: 0,
                peak_held_any: 0,
                peak_held_budget: 0,
                over_budget_frames: 0,
                blank_frames: 0,
                recovery_frames: Some(0),
                peak_heap_usage: 0,
                heap_usage_start_after: (0, 0),
                heap_budget: 0,
                allocation_granularity: ctx.memory().allocation_granularity(),
                min_quality: f32::INFINITY,
                evictions: 0,
                uploads: 0,
                refused_uploads: 0,
                deferred_frees: 0,
                peak_drawn: [0; 3],
                peak_drawn_cascades: if config.shadows {
                    vec![[0; 3]; MAX_CASCADES as usize]
                } else {
                    Vec::new()
                },
                drawn_total: 0,
                reached_total: config.census.then_some(0),
                occlusion: config.occlusion,
                flight: config.flight,
                shadows: config.shadows,
                overflow_frames: 0,
                shadow_overflow_frames: 0,
                gpu_cull_ms: None,
                gpu_draw_ms: None,
                pngs: Vec::new(),
                validation: ctx.validation_enabled(),
                leaks: 0,
                validation_messages: 0,
            },
            cull_ms: Vec::with_capacity(config.frames as usize),
            reached: Vec::new(),
            draw_ms: Vec::with_capacity(config.frames as usize),
            gpu_lod: [0; 3],
            slot_frames: vec![(0, false); ctx.frames_in_flight() as usize],
            last_budget: 0,
            settled_from: 0,
            squeeze_ended: None,
            bar,
            last_line: Instant::now(),
            frames_since_line: 0,
        }
    }

    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// After frame `f`: peaks, progress, and a stats line every `interval`.
    fn frame(&mut self, f: u64, stats: &Stats, interval: Duration) {
        let mem = &stats.memory.categories;
        for (c, peak) in self.report.peak_bytes.0.iter_mut().enumerate() {
            *peak = (*peak).max(mem.0[c].live_bytes);
        }
        let r = &mut self.report;
        // Held within the budget once the GPU had time to give back what a fall asks for.
        if stats.budget < self.last_budget {
            self.settled_from = f + SETTLE_FRAMES;
        }
        r.peak_held_any = r.peak_held_any.max(stats.held);
        if f >= self.settled_from && stats.held >= r.peak_held {
            r.peak_held = stats.held;
            r.peak_held_budget = stats.budget;
        }
        self.last_budget = stats.budget;
        if f >= self.settled_from && stats.held > stats.budget {
            r.over_budget_frames += 1;
        }
        if let Some(end) = self.squeeze_ended {
            if stats.quality >= 1.0 {
                r.recovery_frames = Some(f - end);
                self.squeeze_ended = None;
            }
        }
        r.min_quality = r.min_quality.min(stats.quality);
        r.budget_source = stats.budget_source;
        log::debug!(
            "frame {f}: held {} budget {} min footprint {} quality {:.2} tiles {}/{} relocations {} GPU drew {:?} (frame {})",
            stats.held,
            stats.budget,
            stats.min_footprint,
            stats.quality,
            stats.resident_tiles,
            stats.tiles,
            stats.relocations,
            self.gpu_lod,
            f.saturating_sub(self.slot_frames.len() as u64),
        );
        r.frames = f + 1;
        self.bar.inc(1);
        self.frames_since_line += 1;
        if interval.is_zero() || self.last_line.elapsed() < interval {
            return;
        }
        let fps = self.frames_since_line as f64 / self.last_line.elapsed().as_secs_f64();
        self.last_line = Instant::now();
        self.frames_since_line = 0;
        let gpu = match (self.cull_ms.last(), self.draw_ms.last()) {
            (Some(c), Some(d)) => format!(" | GPU cull {c:.2} ms draw {d:.2} ms"),
            _ => String::new(),
        };
        let [full, medium, billboard] = self.gpu_lod;
        self.say(format!(
            "frame {f}: {fps:.0} fps{gpu} | held {:.1}/{:.1} MiB ({}) | quality {:.2} | tiles {}/{} | GPU drew full {full} medium {medium} billboard {billboard} | evictions {} | pending frees {}",
            stats.held as f64 / MIB,
            stats.budget as f64 / MIB,
            stats.budget_source,
            stats.quality,
            stats.resident_tiles,
            stats.tiles,
            stats.evictions,
            mem.0.iter().map(|c| c.pending_count).sum::<u64>(),
        ));
    }

    fn finish(mut self, started: Instant, stats: &Stats) -> DemoReport {
        self.bar.finish_and_clear();
        let r = &mut self.report;
        if self.squeeze_ended.is_some() || stats.quality < 1.0 {
            r.recovery_frames = None;
        }
        r.seconds = started.elapsed().as_secs_f64();
        r.gpu_cull_ms = median(&mut self.cull_ms);
        r.gpu_draw_ms = median(&mut self.draw_ms);
        r.evictions = stats.evictions;
        r.uploads = stats.uploads;
        r.refused_uploads = stats.refused_uploads;
        r.deferred_frees = stats.memory.frees_completed;
        self.report
    }
}

/// Copies a colour attachment just rendered (in COLOR_ATTACHMENT_OPTIMAL, left in
/// TRANSFER_SRC_OPTIMAL) of `extent` into `readback`.
///
/// # Safety
/// `cmd` is recording outside a rendering scope; the image and the buffer are live, marked used
/// by the frame `cmd` records, and the buffer holds 4 bytes per texel.
unsafe fn copy_to_readback(
    d: &ash::Device,
    cmd: vk::CommandBuffer,
    image: &Image,
    readback: &Buffer,
    extent: vk::Extent2D,
) {
    // SAFETY: the caller's promises; the barrier orders the attachment writes before the copy.
    unsafe {
        d.cmd_pipeline_barrier(
            cmd,
            vk::PipelineStageFlags::COLOR_ATTACHMENT_OUTPUT,
            vk::PipelineStageFlags::TRANSFER,
            vk::DependencyFlags::empty(),
            &[],
            &[],
            &[image_barrier(
                image.raw(),
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
            image.raw(),
            vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
            readback.raw(),
            &[vk::BufferImageCopy {
                image_subresource: vk::ImageSubresourceLayers {
                    aspect_mask: vk::ImageAspectFlags::COLOR,
                    mip_level: 0,
                    base_array_layer: 0,
                    layer_count: 1,
                },
                image_extent: vk::Extent3D {
                    width: extent.width,
                    height: extent.height,
                    depth: 1,
                },
                ..Default::default()
            }],
        );
    }
}

/// The distinct non-zero values among the census image's texels (little-endian u32): the
/// instances that reached the image.
fn distinct_slots(texels: &[u8]) -> u64 {
    let mut seen: Vec<u64> = Vec::new();
    let mut distinct = 0;
    for t in texels.chunks_exact(4) {
        let v = u32::from_le_bytes([t[0], t[1], t[2], t[3]]) as usize;
        if v == 0 {
            continue;
        }
        let (w, bit) = (v / 64, 1u64 << (v % 64));
        if w >= seen.len() {
            seen.resize(w + 1, 0);
        }
        if seen[w] & bit == 0 {
            seen[w] |= bit;
            distinct += 1;
        }
    }
    distinct
}

/// `--squeeze`: at a quarter of the run the cap drops to a third of what instances hold (the
/// atlas and the outputs keep their share); at half the run it is restored.
fn squeeze(veg: &mut Vegetation, config: &DemoConfig, f: u64, acc: &mut Accumulator) -> Result<()> {
    if !config.squeeze {
        return Ok(());
    }
    let cap = veg.config().controller.cap_bytes;
    if f == config.frames / 4 {
        let c = veg.stats().memory.categories;
        let fixed = c[Category::Atlas].reserved_bytes + c[Category::Outputs].reserved_bytes;
        let instances = c[Category::Instances].reserved_bytes;
        let squeezed = (fixed + instances / 3).max(1 << 20);
        veg.set_budget_cap(squeezed)?;
        acc.say(format!(
            "frame {f}: squeeze: vegetation cap {:.1} MiB -> {:.1} MiB",
            cap as f64 / MIB,
            squeezed as f64 / MIB
        ));
    }
    if f == config.frames / 2 {
        veg.set_budget_cap(cap)?;
        acc.squeeze_ended = Some(f);
        acc.say(format!(
            "frame {f}: squeeze over: vegetation cap back to {:.1} MiB",
            cap as f64 / MIB
        ));
    }
    Ok(())
}

/// The camera for frame `f`, the cull view and the draw constants at `quality`.
fn view_of(
    veg: &Vegetation,
    config: &DemoConfig,
    f: u64,
    quality: f32,
    radius: f32,
) -> Result<(CullView, DrawFrame)> {
    let c = veg.config();
    let fog_m = c.lod.billboard_m * 1.15;
    let (eye, view_proj) = view_matrix(veg, config, f);
    let view = CullView::new(view_proj, eye, radius, &c.lod, quality)?;
    let mut constants = DrawFrame::new(
        view_proj,
        eye,
        fog_m * quality.min(1.0),
        [c.world_origin.x, c.world_origin.y, c.world_size_m],
        config.lod_tint,
    );
    constants.fog[3] = constants.fog[3].max(1.0);
    Ok((view, constants))
}

/// The camera for frame `f` and its view-projection (Vulkan clip space).
fn view_matrix(veg: &Vegetation, config: &DemoConfig, f: u64) -> (Vec3, Mat4) {
    let c = veg.config();
    let fog_m = c.lod.billboard_m * 1.15;
    let (eye, look) = flight_camera(
        config.flight,
        f as f32 / config.frames as f32,
        lap_radius(c.world_size_m),
    );
    let aspect = config.width as f32 / config.height as f32;
    let mut proj = Mat4::perspective_rh(FOV_Y_DEG.to_radians(), aspect, NEAR_M, fog_m * 1.5);
    // Vulkan's clip space has y pointing down.
    proj.y_axis.y = -proj.y_axis.y;
    (eye, proj * Mat4::look_at_rh(eye, look, Vec3::Y))
}

/// The camera's vertical field of view, degrees.
const FOV_Y_DEG: f32 = 60.0;
/// The camera's near plane, metres.
const NEAR_M: f32 = 0.5;
/// How far shadows reach from the camera, in medium LOD bands (240 m in the demo: 300 m, where
/// trees are small enough on screen that their shadows stop mattering).
const SHADOW_REACH_BANDS: f32 = 1.25;
/// Weight of the logarithmic splits in the practical split scheme (the rest uniform): 0.5 gives
/// the nearest cascade about 30 m of the demo's 300.
const SPLIT_LAMBDA: f32 = 0.5;
/// How far towards the sun casters may stand outside a cascade's sphere and still shade it:
/// the tallest tree (21 m) seen along a sun at least 40 degrees high reaches 33 m.
const CASTER_REACH_M: f32 = 40.0;

/// The sun's shadow cascades of one frame.
#[derive(Clone, Debug)]
struct Cascades {
    /// World to each cascade's clip space, nearest cascade first.
    view_projs: Vec<Mat4>,
    /// Where shadows have faded out, metres from the camera.
    distance_m: f32,
}

/// Where each of `count` slices of the camera's depth range `near..far` ends, by the practical
/// split scheme: `lambda` of the logarithmic split plus the rest of the uniform one.
fn cascade_splits(near: f32, far: f32, count: usize, lambda: f32) -> Vec<f32> {
    (1..=count)
        .map(|i| {
            let t = i as f32 / count as f32;
            let log = near * (far / near).powf(t);
            let uniform = near + (far - near) * t;
            lambda * log + (1.0 - lambda) * uniform
        })
        .collect()
}

/// The shadow cascades of a camera at `eye` looking towards `look` (vertical field of view
/// [`FOV_Y_DEG`], `aspect`, near plane [`NEAR_M`]), up to `distance_m`, in the sun's direction
/// `sun` (unit, towards the sun), for shadow maps of `tile_px` texels. Each slice of the view
/// ([`cascade_splits`]) is enclosed in its smallest sphere, whose radius is the same every
/// frame; the sphere's square, seen from the sun, is the cascade's x/y extent, its centre
/// snapped to whole texels of the sun's fixed rotation, so trees standing still cast shadows
/// that stand still. Depth spans the sphere plus [`CASTER_REACH_M`] towards the sun.
fn shadow_cascades(
    eye: Vec3,
    look: Vec3,
    aspect: f32,
    sun: Vec3,
    distance_m: f32,
    count: usize,
    tile_px: u32,
) -> Vec<Mat4> {
    let forward = (look - eye).normalize();
    let tan_y = (FOV_Y_DEG.to_radians() * 0.5).tan();
    // Squared slope of the slice's corners off the view axis.
    let k = tan_y * tan_y * (1.0 + aspect * aspect);
    let up = if sun.y.abs() > 0.99 { Vec3::Z } else { Vec3::Y };
    let light = Mat4::look_to_rh(Vec3::ZERO, -sun, up);
    let mut near = NEAR_M;
    cascade_splits(NEAR_M, distance_m, count, SPLIT_LAMBDA)
        .into_iter()
        .map(|far| {
            // The smallest sphere around the slice's corners has its centre on the view axis,
            // equally far from the near and far corners (or at the far face's centre).
            let z = ((1.0 + k) * (far + near) * 0.5).min(far);
            let radius = (k * far * far + (far - z) * (far - z)).sqrt();
            let radius = (radius * 16.0).ceil() / 16.0;
            near = far;
            let centre = light.transform_point3(eye + forward * z);
            let texel = 2.0 * radius / tile_px as f32;
            let (x, y) = (
                (centre.x / texel).round() * texel,
                (centre.y / texel).round() * texel,
            );
            let proj = Mat4::orthographic_rh(
                x - radius,
                x + radius,
                y - radius,
                y + radius,
                -centre.z - radius - CASTER_REACH_M,
                -centre.z + radius,
            );
            proj * light
        })
        .collect()
}

/// The cascades of frame `f`: the camera's, along the sun of `constants`.
fn cascades_of(veg: &Vegetation, config: &DemoConfig, f: u64, constants: &DrawFrame) -> Cascades {
    let c = veg.config();
    let (eye, look) = flight_camera(
        config.flight,
        f as f32 / config.frames as f32,
        lap_radius(c.world_size_m),
    );
    let sun = Vec3::new(constants.sun[0], constants.sun[1], constants.sun[2]);
    let distance_m = c.lod.medium_m * SHADOW_REACH_BANDS;
    Cascades {
        view_projs: shadow_cascades(
            eye,
            look,
            config.width as f32 / config.height as f32,
            sun,
            distance_m,
            MAX_CASCADES as usize,
            config.shadow_map_px,
        ),
        distance_m,
    }
}

/// The frame loop: stream (budget, update), read back the slot's last frame, record, submit,
/// report.
fn fly(ctx: &Context, veg: &mut Vegetation, config: &DemoConfig) -> Result<DemoReport> {
    let mut gpu = Gpu::new(ctx, veg, config)?;
    let ring = FrameRing::new(ctx)?;
    let mut acc = Accumulator::new(ctx, config);
    let heap = ctx.memory().device_local_heap();
    let slots = gpu.counters.len();
    let started = Instant::now();
    for f in 0..config.frames {
        // Stream: the budget schedule, the frame, the controller and residency.
        squeeze(veg, config, f, &mut acc)?;
        let frame = ctx.begin_frame()?;
        // Residency ranks tiles by what this frame's view sees.
        let (eye, view_proj) = view_matrix(veg, config, f);
        let update = veg.update(&frame, Viewer::with_view(eye, view_proj))?;
        if let Some(h) = frame.heaps().get(heap) {
            if h.budget.usage >= acc.report.peak_heap_usage {
                acc.report.peak_heap_usage = h.budget.usage;
                acc.report.heap_budget = h.budget.budget;
            }
        }
        let (view, constants) =
            view_of(veg, config, f, update.decision.quality, gpu.draw.radius())?;
        let sun = config
            .shadows
            .then(|| cascades_of(veg, config, f, &constants));
        // Read back what this slot's previous frame counted.
        let slot = (f as usize) % slots;
        gpu.read_back(slot, &mut acc)?;
        let stats = veg.stats();
        acc.slot_frames[slot] = (f, stats.budget >= stats.min_footprint);
        // Record and submit.
        let png = config.png.is_some()
            && match config.png_every {
                Some(n) => f % n == 0 || f + 1 == config.frames,
                None => f + 1 == config.frames,
            };
        let cmd = ring.begin(&frame)?;
        // SAFETY: cmd is recording for `frame` and is submitted right below as its submission.
        unsafe {
            gpu.record(
                &frame,
                cmd.raw(),
                slot,
                veg,
                &view,
                &constants,
                sun.as_ref(),
                png,
            )?
        };
        let done = ring.submit(frame, cmd)?;
        gpu.counters[slot].1 = done.value();
        if let Some((_, _, readback)) = &gpu.target.census {
            ctx.wait(done.value(), Duration::from_secs(30))?;
            acc.reached.push(distinct_slots(&readback.mapped()?));
        }
        // Report.
        if png {
            ctx.wait(done.value(), Duration::from_secs(30))?;
            let pattern = config
                .png
                .as_ref()
                .ok_or_else(|| Error::InvalidInput("no png path".into()))?;
            let path = png_path(pattern, f);
            let readback = gpu
                .target
                .readback
                .as_ref()
                .ok_or_else(|| Error::InvalidInput("no readback buffer".into()))?;
            write_png(&path, config.width, config.height, &readback.mapped()?)?;
            acc.report.pngs.push(path);
        }
        acc.frame(f, &veg.stats(), config.stats_interval);
    }
    Ok(acc.finish(started, &veg.stats()))
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
        let patches = forest(&config, 20_000, 3, None);
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
            forest(&config, 1000, 9, None).len(),
            forest(&config, 1000, 9, None).len()
        );
    }

    #[test]
    fn cascade_splits_blend_uniform_and_logarithmic() {
        let uniform = cascade_splits(1.0, 101.0, 4, 0.0);
        assert_eq!(uniform, [26.0, 51.0, 76.0, 101.0]);
        let log = cascade_splits(1.0, 10_000.0, 4, 1.0);
        for (got, want) in log.iter().zip([10.0, 100.0, 1000.0, 10_000.0]) {
            assert!((got / want - 1.0).abs() < 1e-4, "{got} vs {want}");
        }
        let mixed = cascade_splits(NEAR_M, 300.0, 4, SPLIT_LAMBDA);
        assert!(mixed.windows(2).all(|w| w[0] < w[1]));
        assert!((mixed[3] - 300.0).abs() < 1e-3);
        assert!((10.0..60.0).contains(&mixed[0]), "{mixed:?}");
    }

    /// Every cascade holds its slice of the view (and what stands up to CASTER_REACH_M
    /// towards the sun from it) inside its clip volume, and moving the camera moves the
    /// cascades by whole texels only.
    #[test]
    fn cascades_hold_their_slices_and_snap_to_texels() {
        let sun = Vec3::new(-0.4, 0.8, 0.35).normalize();
        let (aspect, tile, far) = (16.0 / 9.0, 512, 300.0);
        let inside = |m: Mat4, p: Vec3| {
            let c = m.project_point3(p);
            c.x.abs() <= 1.0 + 1e-4 && c.y.abs() <= 1.0 + 1e-4 && (-1e-4..=1.0001).contains(&c.z)
        };
        for (k, (eye, look)) in [0.0f32, 0.13, 0.5, 0.77]
            .iter()
            .map(|t| camera(*t, 550.0))
            .enumerate()
        {
            let cascades = shadow_cascades(eye, look, aspect, sun, far, 4, tile);
            assert_eq!(cascades.len(), 4);
            let forward = (look - eye).normalize();
            let right = forward.cross(Vec3::Y).normalize();
            let up = right.cross(forward);
            let tan_y = (FOV_Y_DEG.to_radians() * 0.5).tan();
            let mut near = NEAR_M;
            for (c, (m, split)) in cascades
                .iter()
                .zip(cascade_splits(NEAR_M, far, 4, SPLIT_LAMBDA))
                .enumerate()
            {
                for d in [near, split] {
                    for (sx, sy) in [(-1.0, -1.0), (1.0, -1.0), (-1.0, 1.0), (1.0, 1.0)] {
                        let p = eye
                            + forward * d
                            + right * (sx * tan_y * aspect * d)
                            + up * (sy * tan_y * d);
                        assert!(inside(*m, p), "camera {k} cascade {c}: corner {p}");
                        let caster = p + sun * (CASTER_REACH_M - 1.0);
                        assert!(
                            inside(*m, caster),
                            "camera {k} cascade {c}: caster {caster}"
                        );
                    }
                }
                near = split;
            }
        }
        // Two nearby cameras: the world's origin lands on the same spot within a texel.
        let (e0, l0) = camera(0.2, 550.0);
        let (e1, l1) = camera(0.2005, 550.0);
        let a = shadow_cascades(e0, l0, aspect, sun, far, 4, tile);
        let b = shadow_cascades(e1, l1, aspect, sun, far, 4, tile);
        for (ma, mb) in a.iter().zip(&b) {
            let texel = |m: &Mat4| {
                let c = m.project_point3(Vec3::ZERO);
                (
                    (c.x * 0.5 + 0.5) * tile as f32,
                    (c.y * 0.5 + 0.5) * tile as f32,
                )
            };
            let (ta, tb) = (texel(ma), texel(mb));
            // Distance between the sub-texel offsets, around the wrap.
            let apart = |a: f32, b: f32| {
                let d = (a - a.floor() - (b - b.floor())).abs();
                d.min(1.0 - d)
            };
            assert!(
                apart(ta.0, tb.0) < 0.02 && apart(ta.1, tb.1) < 0.02,
                "{ta:?} vs {tb:?}"
            );
        }
    }

    #[test]
    fn distinct_slots_counts_each_non_zero_value_once() {
        let texels: Vec<u8> = [0u32, 5, 5, 1, 0, 64, 63, 5, 1_000_000, 64]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(distinct_slots(&texels), 5, "1, 5, 63, 64 and 1,000,000");
        assert_eq!(distinct_slots(&[0; 16]), 0);
        assert_eq!(distinct_slots(&[]), 0);
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
