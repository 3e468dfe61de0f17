//! The vegetation facade: spawn and despawn patches, `update(camera)` once a frame, `record(cmd)`
//! into the host's command buffer, `end_frame(value)` with the timeline value of that
//! submission. Budget, LOD and residency decisions come from the pure policy modules.
//!
//! ```no_run
//! # use understory::{gpu::context::Context, vegetation::*, world::instance::Instance};
//! # fn main() -> understory::Result<()> {
//! let ctx = Context::from_env()?;
//! let mut ring = understory::gpu::frame::FrameRing::new(&ctx)?;
//! let mut veg = Vegetation::new(&ctx, VegetationConfig::default())?;
//! let grass = veg.register_species(&ctx, &SpeciesDesc { name: "grass", width: 4, height: 4, rgba8: &[255; 64] })?;
//! let patch = veg.spawn(&PatchDesc { species: grass, instances: &[Instance::at(glam::Vec3::ZERO)] })?;
//! for _ in 0..3 {
//!     let frame = ctx.begin_frame()?;
//!     veg.update(&ctx, &frame, glam::Vec3::new(0.0, 2.0, 0.0))?;
//!     let cmd = ring.begin(&ctx)?;
//!     // SAFETY: cmd is recording and submitted below; its value goes to end_frame.
//!     unsafe { veg.record(&ctx, cmd)? };
//!     let value = ring.submit(&ctx, cmd)?;
//!     veg.end_frame(&ctx, value)?;
//! }
//! veg.despawn(patch)?;
//! veg.release(&ctx)?;
//! ring.destroy(&ctx)?;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ash::vk;
use glam::{Vec2, Vec3};

use crate::error::{Error, Result};
use crate::gpu::atlas::{self, RegionUpload};
use crate::gpu::budget::Source;
use crate::gpu::context::{Context, FrameStart};
use crate::gpu::cull::CullSource;
use crate::gpu::memory::{Buffer, BufferDesc, Image, MemoryLocation, MemoryStats, Retirable};
use crate::policy::category::Category;
use crate::policy::controller::{BudgetController, BudgetInput, ControllerConfig, Decision};
use crate::policy::lod::{FrameTimeQuality, Lod, LodBands};
use crate::policy::residency::{self, ResidencyConfig, TileView};
use crate::world::atlas::{AtlasPacker, AtlasRegion};
use crate::world::instance::Instance;
use crate::world::quadtree::{NodeId, Quadtree};

/// Vegetation tunables, units in the names.
#[derive(Clone, Debug)]
pub struct VegetationConfig {
    /// Lowest (x, z) corner of the world, metres.
    pub world_origin: Vec2,
    /// Side of the square world, metres.
    pub world_size_m: f32,
    /// Largest leaf tile side, metres (the unit of residency).
    pub leaf_tile_m: f32,
    /// LOD distance bands at quality 1.
    pub lod: LodBands,
    /// Budget controller.
    pub controller: ControllerConfig,
    /// Residency.
    pub residency: ResidencyConfig,
    /// Most instances in one patch.
    pub max_instances_per_patch: u32,
    /// Atlas page side, texels.
    pub atlas_page_px: u32,
    /// Border around each atlas region, texels.
    pub atlas_padding_px: u32,
    /// How often `update` logs a stats line at info level.
    pub stats_log_interval: Duration,
}

impl Default for VegetationConfig {
    fn default() -> Self {
        Self {
            world_origin: Vec2::splat(-2048.0),
            world_size_m: 4096.0,
            leaf_tile_m: 32.0,
            lod: LodBands::default(),
            controller: ControllerConfig::default(),
            residency: ResidencyConfig::default(),
            max_instances_per_patch: 65_536,
            atlas_page_px: 2048,
            atlas_padding_px: 4,
            stats_log_interval: Duration::from_secs(10),
        }
    }
}

/// A registered species (its billboard lives in the atlas).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpeciesId(u32);

/// A spawned patch. Stale ids (despawned) are detected by generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PatchId {
    slot: u32,
    generation: u32,
}

/// A species: name and billboard texture.
#[derive(Clone, Copy, Debug)]
pub struct SpeciesDesc<'a> {
    /// Name, for diagnostics.
    pub name: &'a str,
    /// Billboard width in texels.
    pub width: u32,
    /// Billboard height in texels.
    pub height: u32,
    /// Tightly packed RGBA8 texels, `width * height * 4` bytes.
    pub rgba8: &'a [u8],
}

/// A patch to spawn: instances of one species, all in one leaf tile.
#[derive(Clone, Copy, Debug)]
pub struct PatchDesc<'a> {
    /// The species.
    pub species: SpeciesId,
    /// The instances (their `patch_slot` and the species bits, the low 16 of
    /// `species_variant`, are overwritten).
    pub instances: &'a [Instance],
}

/// A resident patch's GPU record: real handles, the seed's `VegetationGpuResources` made real.
#[derive(Debug)]
pub struct PatchGpu {
    /// The instance buffer (a sub-allocation in the instances category).
    pub buffer: Buffer,
    /// Bytes of instance data at the start of `buffer`.
    pub instance_bytes: u64,
    /// The species' billboard in the atlas.
    pub atlas: AtlasRegion,
    /// The quadtree leaf.
    pub node: NodeId,
    /// Bytes of GPU memory held.
    pub bytes: u64,
}

struct Species {
    name: String,
    region: AtlasRegion,
    patches: u32,
}

struct Patch {
    generation: u32,
    species: SpeciesId,
    node: NodeId,
    instances: Vec<Instance>,
    gpu: Option<PatchGpu>,
}

#[derive(Default)]
struct Tile {
    patches: Vec<u32>,
    instances: u64,
    resident: bool,
    culled_frames: u32,
    distance: f32,
}

struct PendingCopy {
    src_offset: u64,
    dst: vk::Buffer,
    bytes: u64,
}

struct Page {
    image: Image,
    initialized: bool,
}

/// Counts per LOD level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PerLod {
    /// Full detail.
    pub full: u64,
    /// Medium detail.
    pub medium: u64,
    /// Billboards.
    pub billboard: u64,
    /// Culled (or not resident).
    pub culled: u64,
}

impl PerLod {
    fn add(&mut self, lod: Lod, n: u64) {
        match lod {
            Lod::Full => self.full += n,
            Lod::Medium => self.medium += n,
            Lod::Billboard => self.billboard += n,
            Lod::Culled => self.culled += n,
        }
    }
}

/// A snapshot for diagnostics and tools.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Stats {
    /// Frames updated.
    pub frames: u64,
    /// understory's memory: per-category bytes, peaks, pending frees, deferred frees completed.
    pub memory: MemoryStats,
    /// The vegetation budget in bytes.
    pub budget: u64,
    /// Where the heap budget came from.
    pub budget_source: Source,
    /// Vegetation bytes held (instances + atlas, pending frees included).
    pub held: u64,
    /// Held ÷ budget.
    pub pressure: f64,
    /// LOD distance scale.
    pub quality: f32,
    /// Live patches.
    pub patches: u64,
    /// Live instances.
    pub instances: u64,
    /// Tiles with patches.
    pub tiles: u64,
    /// Tiles whose GPU memory is resident.
    pub resident_tiles: u64,
    /// Instances per LOD, by their tile's distance (the GPU pass refines this per instance).
    pub lod_instances: PerLod,
    /// Tile evictions since creation.
    pub evictions: u64,
    /// Patch uploads since creation.
    pub uploads: u64,
    /// Uploads refused (budget or `OverBudget`) since creation.
    pub refused_uploads: u64,
}

/// What one `update` did.
#[derive(Clone, Debug)]
pub struct UpdateReport {
    /// The controller's decision.
    pub decision: Decision,
    /// Tiles evicted this frame.
    pub evicted_tiles: usize,
    /// Patches uploaded this frame.
    pub uploaded_patches: usize,
    /// Bytes of instance data uploaded this frame.
    pub uploaded_bytes: u64,
}

/// The vegetation system of one context.
pub struct Vegetation {
    config: VegetationConfig,
    quadtree: Quadtree,
    heap: usize,
    tiles: HashMap<NodeId, Tile>,
    patches: Vec<Option<Patch>>,
    generations: Vec<u32>,
    free_slots: Vec<u32>,
    species: Vec<Option<Species>>,
    packer: AtlasPacker,
    pages: Vec<Option<Page>>,
    controller: BudgetController,
    frame_time: Option<FrameTimeQuality>,
    last_decision: Option<Decision>,
    last_held: u64,
    budget_source: Source,
    // This frame's work.
    staging: Vec<Buffer>,
    copies: Vec<(usize, PendingCopy)>,
    atlas_uploads: Vec<(u32, usize, RegionUpload)>,
    to_retire: Vec<Retirable>,
    /// Resident tiles with patches spawned since their upload.
    incomplete: std::collections::HashSet<NodeId>,
    // Counters.
    frames: u64,
    live_instances: u64,
    evictions: u64,
    uploads: u64,
    refused_uploads: u64,
    lod_instances: PerLod,
    last_log: Instant,
    released: bool,
}

impl Vegetation {
    /// An empty world.
    pub fn new(ctx: &Context, config: VegetationConfig) -> Result<Self> {
        if !config.lod.is_valid() {
            return Err(Error::InvalidInput(format!("LOD bands {:?}", config.lod)));
        }
        if !config.controller.is_valid() {
            return Err(Error::InvalidInput(format!(
                "controller {:?}",
                config.controller
            )));
        }
        if config.max_instances_per_patch == 0 {
            return Err(Error::InvalidInput("max_instances_per_patch is 0".into()));
        }
        let quadtree = Quadtree::new(config.world_origin, config.world_size_m, config.leaf_tile_m)?;
        let packer = AtlasPacker::new(config.atlas_page_px, config.atlas_padding_px)?;
        let heap = ctx.memory().device_local_heap();
        Ok(Self {
            controller: BudgetController::new(config.controller),
            frame_time: None,
            config,
            quadtree,
            heap,
            tiles: HashMap::new(),
            patches: Vec::new(),
            generations: Vec::new(),
            free_slots: Vec::new(),
            species: Vec::new(),
            packer,
            pages: Vec::new(),
            last_decision: None,
            last_held: 0,
            budget_source: Source::Estimated,
            staging: Vec::new(),
            copies: Vec::new(),
            atlas_uploads: Vec::new(),
            to_retire: Vec::new(),
            incomplete: Default::default(),
            frames: 0,
            live_instances: 0,
            evictions: 0,
            uploads: 0,
            refused_uploads: 0,
            lod_instances: PerLod::default(),
            last_log: Instant::now(),
            released: false,
        })
    }

    /// Feeds the last frame's time (milliseconds) to the frame-time quality scale, the
    /// optional second input to LOD quality (the seed's adaptive LOD): above `target_ms` the
    /// draw distances shrink, below it they recover slowly. Off until first called.
    pub fn set_frame_time(&mut self, frame_ms: f32, target_ms: f32) -> Result<f32> {
        if !(target_ms.is_finite() && target_ms > 0.0) {
            return Err(Error::InvalidInput(format!(
                "target frame time {target_ms} ms"
            )));
        }
        let ft = self
            .frame_time
            .get_or_insert_with(|| FrameTimeQuality::new(target_ms));
        ft.target_ms = target_ms;
        Ok(ft.step(frame_ms))
    }

    /// Changes the vegetation cap in bytes (e.g. from the engine's settings menu); the budget is
    /// still at most the controller's share of the heap's real headroom.
    pub fn set_budget_cap(&mut self, cap_bytes: u64) -> Result<()> {
        if cap_bytes == 0 {
            return Err(Error::InvalidInput("vegetation cap of 0 bytes".into()));
        }
        self.controller.set_cap(cap_bytes);
        Ok(())
    }

    fn check_live(&self) -> Result<()> {
        if self.released {
            return Err(Error::InvalidInput(
                "this Vegetation was released; create a new one".into(),
            ));
        }
        Ok(())
    }

    /// The world's quadtree.
    pub fn quadtree(&self) -> &Quadtree {
        &self.quadtree
    }

    /// The configuration.
    pub fn config(&self) -> &VegetationConfig {
        &self.config
    }

    /// Registers a species: packs its billboard into the atlas and queues the upload (recorded
    /// by the next [`Vegetation::record`]).
    pub fn register_species(&mut self, ctx: &Context, desc: &SpeciesDesc<'_>) -> Result<SpeciesId> {
        self.check_live()?;
        let texels = u64::from(desc.width) * u64::from(desc.height) * 4;
        if desc.rgba8.len() as u64 != texels {
            return Err(Error::InvalidInput(format!(
                "species {:?}: {} bytes of texels for {}x{} RGBA8 ({texels} expected)",
                desc.name,
                desc.rgba8.len(),
                desc.width,
                desc.height
            )));
        }
        let placed = self.packer.allocate(desc.width, desc.height)?;
        let region = placed.region;
        let page = region.page as usize;
        if placed.new_page {
            let image = match atlas::create_page(ctx, region.page, self.config.atlas_page_px) {
                Ok(i) => i,
                Err(e) => {
                    let _ = self.packer.free(&region);
                    return Err(e);
                }
            };
            if self.pages.len() <= page {
                self.pages.resize_with(page + 1, || None);
            }
            self.pages[page] = Some(Page {
                image,
                initialized: false,
            });
        }
        let staging = match self.staging_buffer(ctx, "species billboard staging", texels) {
            Ok(s) => s,
            Err(e) => {
                self.free_region(&region)?;
                return Err(e);
            }
        };
        let mut staging = staging;
        if let Some(m) = staging.mapped_mut() {
            m[..desc.rgba8.len()].copy_from_slice(desc.rgba8);
        }
        self.staging.push(staging);
        self.atlas_uploads.push((
            region.page,
            self.staging.len() - 1,
            RegionUpload {
                rect: region.rect,
                staging_offset: 0,
            },
        ));
        let id = match self.species.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.species.push(None);
                self.species.len() - 1
            }
        };
        self.species[id] = Some(Species {
            name: desc.name.to_owned(),
            region,
            patches: 0,
        });
        Ok(SpeciesId(id as u32))
    }

    /// The atlas region of every species, indexed by species id (`None` where unregistered).
    pub fn species_regions(&self) -> Vec<Option<AtlasRegion>> {
        self.species
            .iter()
            .map(|s| s.as_ref().map(|s| s.region))
            .collect()
    }

    /// An atlas page image (`None` if that page does not exist). Pages are created by
    /// [`Vegetation::register_species`] and filled by the next [`Vegetation::record`], which
    /// leaves them in `SHADER_READ_ONLY_OPTIMAL` layout.
    pub fn atlas_page(&self, page: u32) -> Option<&Image> {
        self.pages
            .get(page as usize)
            .and_then(Option::as_ref)
            .map(|p| &p.image)
    }

    /// Removes a species no patch uses; its atlas space is returned, and an emptied page is
    /// retired at the next [`Vegetation::end_frame`].
    pub fn unregister_species(&mut self, id: SpeciesId) -> Result<()> {
        let s = self
            .species
            .get(id.0 as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::InvalidInput(format!("unknown species {id:?}")))?;
        if s.patches > 0 {
            return Err(Error::InvalidInput(format!(
                "species {:?} is used by {} patches",
                s.name, s.patches
            )));
        }
        let region = s.region;
        self.species[id.0 as usize] = None;
        self.free_region(&region)
    }

    fn free_region(&mut self, region: &AtlasRegion) -> Result<()> {
        if let Some(page) = self.packer.free(region)? {
            if let Some(p) = self.pages.get_mut(page as usize).and_then(Option::take) {
                self.to_retire.push(p.image.into());
            }
        }
        Ok(())
    }

    fn staging_buffer(&self, ctx: &Context, name: &str, bytes: u64) -> Result<Buffer> {
        ctx.memory().create_buffer(&BufferDesc {
            name,
            size: bytes.max(4),
            usage: vk::BufferUsageFlags::TRANSFER_SRC,
            location: MemoryLocation::CpuToGpu,
            category: Category::Staging,
        })
    }

    /// Spawns a patch. Validates everything first and allocates nothing on error: unknown
    /// species, no instances, more than the configured maximum, non-finite positions, scales or
    /// rotations, instances outside the world or spread over several tiles.
    pub fn spawn(&mut self, desc: &PatchDesc<'_>) -> Result<PatchId> {
        let species = self
            .species
            .get(desc.species.0 as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| Error::InvalidInput(format!("unknown species {:?}", desc.species)))?;
        let n = desc.instances.len();
        if n == 0 {
            return Err(Error::InvalidInput("patch with no instances".into()));
        }
        if n > self.config.max_instances_per_patch as usize {
            return Err(Error::InvalidInput(format!(
                "patch of {n} instances, at most {}",
                self.config.max_instances_per_patch
            )));
        }
        if let Some(i) = desc.instances.iter().position(|i| !i.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "instance {i}: non-finite position, scale or rotation, or scale <= 0"
            )));
        }
        let node = self
            .quadtree
            .leaf_at(desc.instances[0].pos())
            .ok_or_else(|| Error::InvalidInput("instance 0 lies outside the world".into()))?;
        if let Some(i) = desc
            .instances
            .iter()
            .position(|i| self.quadtree.leaf_at(i.pos()) != Some(node))
        {
            return Err(Error::InvalidInput(format!(
                "instance {i} is outside the patch's tile {node:?} (a patch lies in one tile)"
            )));
        }
        let _ = species;
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.patches.push(None);
                self.generations.push(0);
                (self.patches.len() - 1) as u32
            }
        };
        let generation = self.generations[slot as usize];
        let instances: Vec<Instance> = desc
            .instances
            .iter()
            .map(|i| Instance {
                patch_slot: slot,
                // The species id goes in the low 16 bits (the draw pass finds the billboard's
                // atlas region with it); the variant in the high 16 bits is the caller's.
                species_variant: (i.species_variant & 0xffff_0000) | (desc.species.0 & 0xffff),
                ..*i
            })
            .collect();
        if let Some(s) = self.species[desc.species.0 as usize].as_mut() {
            s.patches += 1;
        }
        let tile = self.tiles.entry(node).or_default();
        if tile.resident {
            // Resident tiles get new patches uploaded by the next update, budget permitting.
            self.incomplete.insert(node);
        }
        tile.patches.push(slot);
        tile.instances += n as u64;
        self.live_instances += n as u64;
        self.patches[slot as usize] = Some(Patch {
            generation,
            species: desc.species,
            node,
            instances,
            gpu: None,
        });
        Ok(PatchId { slot, generation })
    }

    /// Despawns a patch; its GPU memory is retired at the next [`Vegetation::end_frame`]'s value.
    /// Unknown or already despawned ids are errors.
    pub fn despawn(&mut self, id: PatchId) -> Result<()> {
        let valid = self
            .patches
            .get(id.slot as usize)
            .and_then(Option::as_ref)
            .is_some_and(|p| p.generation == id.generation);
        if !valid {
            return Err(Error::InvalidInput(format!(
                "unknown or already despawned patch {id:?}"
            )));
        }
        let patch = self.patches[id.slot as usize]
            .take()
            .ok_or_else(|| Error::InvalidInput("patch vanished".into()))?;
        self.generations[id.slot as usize] = self.generations[id.slot as usize].wrapping_add(1);
        self.free_slots.push(id.slot);
        if let Some(gpu) = patch.gpu {
            self.to_retire.push(gpu.buffer.into());
        }
        if let Some(s) = self.species[patch.species.0 as usize].as_mut() {
            s.patches -= 1;
        }
        let n = patch.instances.len() as u64;
        self.live_instances -= n;
        if let Some(tile) = self.tiles.get_mut(&patch.node) {
            tile.patches.retain(|s| *s != id.slot);
            tile.instances -= n;
            if tile.patches.is_empty() {
                self.tiles.remove(&patch.node);
            }
        }
        Ok(())
    }

    /// The GPU record of a resident patch (`None` when not resident).
    pub fn patch_gpu(&self, id: PatchId) -> Result<Option<&PatchGpu>> {
        let p = self
            .patches
            .get(id.slot as usize)
            .and_then(Option::as_ref)
            .filter(|p| p.generation == id.generation)
            .ok_or_else(|| Error::InvalidInput(format!("unknown patch {id:?}")))?;
        Ok(p.gpu.as_ref())
    }

    fn held_and_pending(&self, ctx: &Context) -> (u64, u64) {
        let st = ctx.memory().stats();
        let c = &st.categories;
        (
            c[Category::Instances].live_bytes + c[Category::Atlas].live_bytes,
            c[Category::Instances].pending_bytes + c[Category::Atlas].pending_bytes,
        )
    }

    /// Once a frame, after [`Context::begin_frame`]: steps the budget controller, evicts and
    /// uploads tiles, and counts LODs. Uploads are staged here and recorded by
    /// [`Vegetation::record`].
    pub fn update(
        &mut self,
        ctx: &Context,
        frame: &FrameStart,
        camera: Vec3,
    ) -> Result<UpdateReport> {
        self.check_live()?;
        if !camera.is_finite() {
            return Err(Error::InvalidInput(format!("camera at {camera}")));
        }
        let heap = frame
            .heaps
            .get(self.heap)
            .ok_or_else(|| Error::InvalidInput("frame has no heap report".into()))?;
        self.budget_source = heap.budget.source;
        let (mut held, mut pending) = self.held_and_pending(ctx);
        // Released instance buffers kept for reuse count as held; over the high watermark they
        // are the first thing to give back, before any tile is evicted.
        let high = self.controller.config().high_watermark;
        let budget_now = self.controller.budget_for(&BudgetInput {
            heap_budget: heap.budget.budget,
            heap_usage: heap.budget.usage,
            ours: heap.ours_total,
            held,
            pending,
        });
        if held as f64 > budget_now as f64 * high
            && ctx.memory().flush_cache_of(Category::Instances) > 0
        {
            (held, pending) = self.held_and_pending(ctx);
        }
        let mut decision = self.controller.step(&BudgetInput {
            heap_budget: heap.budget.budget,
            heap_usage: heap.budget.usage,
            ours: heap.ours_total,
            held,
            pending,
        });
        // The optional second input: frame time scales quality further (never up past the
        // budget's choice).
        if let Some(ft) = &self.frame_time {
            decision.quality *= ft.scale;
        }
        // Tile views: distances and culled-frame counts.
        let draw = self.config.lod.draw_distance(decision.quality);
        let mut views = Vec::with_capacity(self.tiles.len());
        let mut lod = PerLod::default();
        for (node, tile) in self.tiles.iter_mut() {
            tile.distance = self.quadtree.distance(*node, camera);
            let tile_lod = self.config.lod.select(tile.distance, decision.quality);
            if tile.distance >= draw {
                tile.culled_frames = tile.culled_frames.saturating_add(1);
            } else {
                tile.culled_frames = 0;
            }
            lod.add(
                if tile.resident { tile_lod } else { Lod::Culled },
                tile.instances,
            );
            views.push(TileView {
                id: node.packed(),
                distance: tile.distance,
                bytes: tile.instances * std::mem::size_of::<Instance>() as u64,
                resident: tile.resident,
                culled_frames: tile.culled_frames,
            });
        }
        self.lod_instances = lod;
        let plan = residency::plan(&views, &self.config.lod, &decision, &self.config.residency);
        self.refused_uploads += u64::from(plan.refused);
        let mut evicted = 0;
        for (packed, _) in &plan.evict {
            let node = NodeId::from_packed(*packed);
            if self.tiles.contains_key(&node) {
                self.evict_tile(node);
                evicted += 1;
            }
        }
        let mut upload_nodes: Vec<NodeId> = plan
            .upload
            .iter()
            .map(|p| NodeId::from_packed(*p))
            .collect();
        if plan.evict.is_empty() && decision.upload_bytes > plan.upload_bytes {
            upload_nodes.extend(
                self.incomplete
                    .drain()
                    .filter(|n| self.tiles.get(n).is_some_and(|t| t.resident)),
            );
        }
        let (uploaded_patches, uploaded_bytes) = self.upload_tiles(ctx, &upload_nodes)?;
        self.frames += 1;
        self.last_held = held;
        self.last_decision = Some(decision);
        if self.last_log.elapsed() >= self.config.stats_log_interval {
            self.last_log = Instant::now();
            log::info!(
                "vegetation: {} patches, {} instances, {}/{} tiles resident, held {:.1}/{:.1} MiB ({}), quality {:.2}, evictions {}",
                self.patches.len() - self.free_slots.len(),
                self.live_instances,
                self.tiles.values().filter(|t| t.resident).count(),
                self.tiles.len(),
                held as f64 / (1 << 20) as f64,
                decision.budget as f64 / (1 << 20) as f64,
                self.budget_source,
                decision.quality,
                self.evictions
            );
        }
        Ok(UpdateReport {
            decision,
            evicted_tiles: evicted,
            uploaded_patches,
            uploaded_bytes,
        })
    }

    fn evict_tile(&mut self, node: NodeId) {
        if let Some(tile) = self.tiles.get_mut(&node) {
            tile.culled_frames = 0;
        }
        self.drop_tile_buffers(node);
        self.evictions += 1;
    }

    /// Retires the instance buffers of a tile's patches (at this frame's end) and marks the tile
    /// not resident.
    fn drop_tile_buffers(&mut self, node: NodeId) {
        let Some(tile) = self.tiles.get_mut(&node) else {
            return;
        };
        tile.resident = false;
        for slot in &tile.patches {
            if let Some(p) = self.patches[*slot as usize].as_mut() {
                if let Some(gpu) = p.gpu.take() {
                    self.to_retire.push(gpu.buffer.into());
                }
            }
        }
    }

    /// Creates instance buffers for the tiles' patches and stages their data. Stops at the first
    /// refusal (`OverBudget`): refusing uploads is the controller's last resort.
    fn upload_tiles(&mut self, ctx: &Context, nodes: &[NodeId]) -> Result<(usize, u64)> {
        if nodes.is_empty() {
            return Ok((0, 0));
        }
        let total: u64 = nodes
            .iter()
            .filter_map(|n| self.tiles.get(n))
            .flat_map(|t| t.patches.iter())
            .filter_map(|s| self.patches[*s as usize].as_ref())
            .filter(|p| p.gpu.is_none())
            .map(|p| std::mem::size_of_val(p.instances.as_slice()) as u64)
            .sum();
        if total == 0 {
            for n in nodes {
                if let Some(t) = self.tiles.get_mut(n) {
                    t.resident = true;
                }
            }
            return Ok((0, 0));
        }
        let mut staging = match self.staging_buffer(ctx, "instance staging", total) {
            Ok(s) => s,
            Err(Error::OverBudget { .. }) => {
                self.refused_uploads += nodes.len() as u64;
                return Ok((0, 0));
            }
            Err(e) => return Err(e),
        };
        let staging_index = self.staging.len();
        let mut offset = 0u64;
        let mut patches = 0;
        'tiles: for node in nodes {
            let Some(tile) = self.tiles.get(node) else {
                continue;
            };
            let slots = tile.patches.clone();
            for slot in slots {
                let Some(p) = self.patches[slot as usize].as_mut() else {
                    continue;
                };
                if p.gpu.is_some() {
                    continue;
                }
                let bytes: &[u8] = bytemuck::cast_slice(&p.instances);
                let len = bytes.len() as u64;
                let buffer = match ctx.memory().create_buffer(&BufferDesc {
                    name: "patch instances",
                    size: len,
                    usage: vk::BufferUsageFlags::STORAGE_BUFFER
                        | vk::BufferUsageFlags::VERTEX_BUFFER
                        | vk::BufferUsageFlags::TRANSFER_DST,
                    location: MemoryLocation::GpuOnly,
                    category: Category::Instances,
                }) {
                    Ok(b) => b,
                    Err(Error::OverBudget { .. }) => {
                        self.refused_uploads += 1;
                        // All or nothing per tile: give back what this tile got so far (the
                        // copies into it are in this frame's commands; retiring at this frame's
                        // value keeps them valid).
                        self.drop_tile_buffers(*node);
                        break 'tiles;
                    }
                    Err(e) => {
                        self.staging.push(staging);
                        return Err(e);
                    }
                };
                if let Some(m) = staging.mapped_mut() {
                    m[offset as usize..(offset + len) as usize].copy_from_slice(bytes);
                }
                self.copies.push((
                    staging_index,
                    PendingCopy {
                        src_offset: offset,
                        dst: buffer.raw(),
                        bytes: len,
                    },
                ));
                offset += len;
                let region = self.species[p.species.0 as usize]
                    .as_ref()
                    .map(|s| s.region)
                    .ok_or_else(|| Error::InvalidInput("patch of an unregistered species".into()));
                let region = match region {
                    Ok(r) => r,
                    Err(e) => {
                        self.to_retire.push(buffer.into());
                        self.staging.push(staging);
                        return Err(e);
                    }
                };
                let gpu_bytes = buffer.bytes();
                p.gpu = Some(PatchGpu {
                    buffer,
                    instance_bytes: len,
                    atlas: region,
                    node: p.node,
                    bytes: gpu_bytes,
                });
                patches += 1;
                self.uploads += 1;
            }
            if let Some(t) = self.tiles.get_mut(node) {
                t.resident = t.patches.iter().all(|s| {
                    self.patches[*s as usize]
                        .as_ref()
                        .is_some_and(|p| p.gpu.is_some())
                });
            }
        }
        self.staging.push(staging);
        Ok((patches, offset))
    }

    /// Records this frame's uploads (instance copies, atlas regions with their mips) and the
    /// barrier that makes them visible to compute, vertex and fragment shaders.
    ///
    /// # Safety
    /// `cmd` must be a primary command buffer of `ctx`'s device, recording, outside a render
    /// pass, and it must be submitted with the timeline value then passed to
    /// [`Vegetation::end_frame`].
    pub unsafe fn record(&mut self, ctx: &Context, cmd: vk::CommandBuffer) -> Result<()> {
        let d = ctx.device();
        let mut by_staging: HashMap<usize, Vec<vk::BufferCopy>> = HashMap::new();
        let mut dsts: Vec<(usize, vk::Buffer)> = Vec::new();
        for (s, c) in self.copies.drain(..) {
            by_staging.entry(s).or_default();
            dsts.push((s, c.dst));
            // One copy region per destination buffer.
            let region = vk::BufferCopy {
                src_offset: c.src_offset,
                dst_offset: 0,
                size: c.bytes,
            };
            // SAFETY: cmd is recording (caller); the staging buffer and the destination are
            // alive until end_frame retires them with this submission's value; the ranges lie
            // inside both (sized from the same instance bytes).
            unsafe {
                d.cmd_copy_buffer(cmd, self.staging[s].raw(), c.dst, &[region]);
            }
        }
        let mut pages: Vec<u32> = self.atlas_uploads.iter().map(|u| u.0).collect();
        pages.sort_unstable();
        pages.dedup();
        for page in pages {
            let Some(p) = self.pages.get_mut(page as usize).and_then(Option::as_mut) else {
                continue;
            };
            // Uploads of one page, grouped per staging buffer.
            let mut groups: HashMap<usize, Vec<RegionUpload>> = HashMap::new();
            for (_, s, r) in self.atlas_uploads.iter().filter(|u| u.0 == page) {
                groups.entry(*s).or_default().push(*r);
            }
            for (s, regions) in groups {
                // SAFETY: as above; the page image lives until retired after this submission.
                unsafe {
                    atlas::record_uploads(
                        ctx,
                        cmd,
                        &p.image,
                        !p.initialized,
                        self.staging[s].raw(),
                        &regions,
                    )
                };
                p.initialized = true;
            }
        }
        self.atlas_uploads.clear();
        if !dsts.is_empty() {
            let barrier = vk::MemoryBarrier::default()
                .src_access_mask(vk::AccessFlags::TRANSFER_WRITE)
                .dst_access_mask(
                    vk::AccessFlags::SHADER_READ | vk::AccessFlags::VERTEX_ATTRIBUTE_READ,
                );
            // SAFETY: recording; a global barrier from the copies to every later shader read.
            unsafe {
                d.cmd_pipeline_barrier(
                    cmd,
                    vk::PipelineStageFlags::TRANSFER,
                    vk::PipelineStageFlags::VERTEX_INPUT
                        | vk::PipelineStageFlags::VERTEX_SHADER
                        | vk::PipelineStageFlags::COMPUTE_SHADER
                        | vk::PipelineStageFlags::FRAGMENT_SHADER,
                    vk::DependencyFlags::empty(),
                    &[barrier],
                    &[],
                    &[],
                );
            }
        }
        Ok(())
    }

    /// End of a frame: everything staged, evicted or despawned this frame is retired with
    /// `value`, the timeline value of the submission that carried [`Vegetation::record`]'s
    /// commands.
    pub fn end_frame(&mut self, ctx: &Context, value: u64) -> Result<()> {
        let mut first_err = None;
        for s in self.staging.drain(..) {
            if let Err(e) = ctx.retire(s, value) {
                first_err.get_or_insert(e);
            }
        }
        for r in self.to_retire.drain(..) {
            if let Err(e) = ctx.retire(r, value) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The resident patches as sources for the GPU cull pass, numbered consecutively (`base`)
    /// in patch-slot order, with the instances they hold on the CPU (for references and tests).
    pub fn cull_sources(&self) -> Vec<(CullSource<'_>, &[Instance])> {
        let mut base = 0u32;
        let mut out = Vec::new();
        for p in self.patches.iter().flatten() {
            if let Some(gpu) = &p.gpu {
                let count = p.instances.len() as u32;
                out.push((
                    CullSource {
                        buffer: &gpu.buffer,
                        count,
                        base,
                    },
                    p.instances.as_slice(),
                ));
                base += count;
            }
        }
        out
    }

    /// A stats snapshot.
    pub fn stats(&self, ctx: &Context) -> Stats {
        let d = self.last_decision;
        Stats {
            frames: self.frames,
            memory: ctx.memory().stats(),
            budget: d.map_or(0, |d| d.budget),
            budget_source: self.budget_source,
            held: self.last_held,
            pressure: d.map_or(0.0, |d| d.pressure),
            quality: self.last_decision.map_or(1.0, |d| d.quality),
            patches: (self.patches.len() - self.free_slots.len()) as u64,
            instances: self.live_instances,
            tiles: self.tiles.len() as u64,
            resident_tiles: self.tiles.values().filter(|t| t.resident).count() as u64,
            lod_instances: self.lod_instances,
            evictions: self.evictions,
            uploads: self.uploads,
            refused_uploads: self.refused_uploads,
        }
    }

    /// Retires every GPU resource (at the context's newest submitted value) so that the context
    /// can shut down with nothing leaked. Final: afterwards `update` and `register_species`
    /// return errors; the CPU side (patches, species, stats) stays readable.
    pub fn release(&mut self, ctx: &Context) -> Result<()> {
        for p in self.patches.iter_mut().flatten() {
            if let Some(gpu) = p.gpu.take() {
                self.to_retire.push(gpu.buffer.into());
            }
        }
        for t in self.tiles.values_mut() {
            t.resident = false;
        }
        for p in self.pages.iter_mut().filter_map(Option::take) {
            self.to_retire.push(p.image.into());
        }
        self.copies.clear();
        self.atlas_uploads.clear();
        self.released = true;
        self.end_frame(ctx, ctx.timeline().last_submitted())
    }
}

impl Drop for Vegetation {
    fn drop(&mut self) {
        if !self.released && !std::thread::panicking() {
            log::error!("Vegetation dropped without release(): its GPU resources are leaked");
        }
    }
}
