//! The vegetation facade: spawn and despawn patches, `update(frame, camera)` once a frame,
//! `record(frame, cmd)` into the host's command buffer. Budget, LOD and residency decisions
//! come from the pure policy modules; what the GPU may still read is kept until the frames that
//! read it complete (despawned and evicted patches, staging), and the Vulkan calls are in
//! `gpu::atlas` and [`Vegetation::record`]'s single copy path.
//!
//! ```no_run
//! # use understory::{gpu::context::Context, vegetation::*, world::instance::Instance};
//! # fn main() -> understory::Result<()> {
//! let ctx = Context::from_env()?;
//! let ring = understory::gpu::frame::FrameRing::new(&ctx)?;
//! let mut veg = Vegetation::new(&ctx, VegetationConfig::default())?;
//! let grass = veg.register_species(&SpeciesDesc { name: "grass", width: 4, height: 4, rgba8: &[255; 64] })?;
//! let patch = veg.spawn(&PatchDesc { species: grass, instances: &[Instance::at(glam::Vec3::ZERO)] })?;
//! for _ in 0..3 {
//!     let frame = ctx.begin_frame()?;
//!     veg.update(&frame, glam::Vec3::new(0.0, 2.0, 0.0))?;
//!     let cmd = ring.begin(&frame)?;
//!     // SAFETY: cmd is recording, and is submitted below as this frame's submission.
//!     unsafe { veg.record(&frame, cmd.raw())? };
//!     ring.submit(frame, cmd)?;
//! }
//! veg.despawn(patch)?; // retired: freed once the last frame that read it completes
//! drop((veg, ring));
//! assert!(ctx.shutdown()?.leaks.is_empty());
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU8;
use std::time::{Duration, Instant};

use ash::vk;
use glam::{Vec2, Vec3};

use crate::error::{Error, Result};
use crate::gpu::atlas::{self, RegionUpload};
use crate::gpu::budget::{Clamp, Source};
use crate::gpu::context::{Context, Frame, FrameFate, Shared};
use crate::gpu::cull::CullSource;
use crate::gpu::memory::{
    Buffer, BufferDesc, HeapReport, Image, MemoryLocation, MemoryStats, Placement, Pool,
    SMALL_BLOCK,
};
use crate::gpu::upload;
use crate::policy::category::Category;
use crate::policy::controller::{
    BudgetController, BudgetInput, ControllerConfig, Decision, Demand,
};
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

impl SpeciesId {
    /// The species' index in [`Vegetation::species_regions`] and the passes' species tables
    /// (the low 16 bits of each of its instances' `species_variant`).
    pub fn index(self) -> u32 {
        self.0
    }
}

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
    /// Which upload this is: a pending copy applies only to the upload it was staged for.
    upload: u64,
    state: UploadState,
}

impl PatchGpu {
    /// Whether its instances are on the GPU, or will be by the time the open frame's commands
    /// after [`Vegetation::record`] run: only then is it a cull source.
    pub fn uploaded(&self) -> bool {
        match &self.state {
            UploadState::Staged => false,
            UploadState::Recorded(fate) => FrameFate::of(fate) != FrameFate::Dropped,
            UploadState::Uploaded => true,
        }
    }
}

/// Where a patch's upload is.
#[derive(Debug)]
enum UploadState {
    /// Staged, not recorded yet.
    Staged,
    /// Recorded into a frame whose submission is not known yet.
    Recorded(Arc<AtomicU8>),
    /// Recorded into a submitted frame.
    Uploaded,
}

/// Uploads recorded into a frame whose submission is not known yet: confirmed once it is
/// submitted; staged again if it is dropped unsubmitted (its commands never run).
struct RecordedUploads {
    fate: Arc<AtomicU8>,
    staging: Vec<Buffer>,
    copies: Vec<PendingCopy>,
    regions: Vec<PendingRegion>,
    /// Pages (index, image id) this batch uploaded to first: their layout is undefined again
    /// if it never runs.
    first_uses: Vec<(u32, u64)>,
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
    rank: f32,
}

/// Where the camera is, and (optionally) where it looks: what [`Vegetation::update`] ranks
/// tiles by. A `Vec3` converts into a viewer without a direction.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Viewer {
    /// The camera position, world space.
    pub position: Vec3,
    /// The view direction (any length but 0). With it, tiles behind the camera rank as if
    /// [`BEHIND_RANK_FACTOR`] times farther: under a tight budget the memory goes to what is in
    /// front, and a tile behind is still kept while nothing in front needs its bytes.
    pub forward: Option<Vec3>,
    /// The view-projection matrix (Vulkan clip space). With it, tiles outside the view
    /// frustum (their box up to [`TILE_HEIGHT_M`]) rank as if [`BEHIND_RANK_FACTOR`] times
    /// farther, which also covers those behind.
    pub view_proj: Option<glam::Mat4>,
}

/// The height of a tile's box for [`Viewer::view_proj`] (trees stand within it).
pub const TILE_HEIGHT_M: f32 = 60.0;

/// How far outside the frustum a sampled tree may stand and still count as seen (its crown).
const SAMPLE_RADIUS_M: f32 = 10.0;

/// How much farther a tile wholly behind the camera ranks ([`Viewer::forward`]).
pub const BEHIND_RANK_FACTOR: f32 = 4.0;

impl From<Vec3> for Viewer {
    fn from(position: Vec3) -> Self {
        Self {
            position,
            forward: None,
            view_proj: None,
        }
    }
}

impl Viewer {
    /// A viewer at `position` looking along `forward`.
    pub fn looking(position: Vec3, forward: Vec3) -> Self {
        Self {
            position,
            forward: Some(forward),
            view_proj: None,
        }
    }

    /// A viewer at `position` seeing through `view_proj`.
    pub fn with_view(position: Vec3, view_proj: glam::Mat4) -> Self {
        Self {
            position,
            forward: None,
            view_proj: Some(view_proj),
        }
    }
}

/// A staged copy of one patch's instances, recorded by the next [`Vegetation::record`].
struct PendingCopy {
    /// Index in `Vegetation::staging`.
    staging: usize,
    src_offset: u64,
    bytes: u64,
    /// The patch slot and the upload it was staged for (skipped if the patch was despawned
    /// or evicted since).
    slot: u32,
    upload: u64,
}

/// A staged atlas region, recorded by the next [`Vegetation::record`].
struct PendingRegion {
    page: u32,
    /// The page image it is for (skipped if the page was retired since).
    image: u64,
    staging: usize,
    region: RegionUpload,
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
    /// Why the driver's budget was replaced by the labelled estimate (0, or above the heap
    /// size), if it was.
    pub budget_clamped: Option<Clamp>,
    /// Whether the driver's usage was implausible (above the heap size) and understory's own
    /// bytes stand in for it.
    pub usage_estimated: bool,
    /// Vegetation bytes held now: blocks of instances, atlas and outputs, pending frees
    /// included.
    pub held: u64,
    /// The least the picture needs: the nearest tile within the draw distance (its instances),
    /// the atlas and the cull and draw outputs, as of the last update. While the budget is at
    /// least this, that tile stays drawn.
    pub min_footprint: u64,
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
    /// Instances per LOD, by their tile's distance, of patches on the GPU (uploaded, or staged
    /// for the frame's [`Vegetation::record`]); everything else counts as culled. The GPU pass
    /// refines this per instance (frustum, exact distance).
    pub lod_instances: PerLod,
    /// Tile evictions since creation.
    pub evictions: u64,
    /// Tiles whose patches moved out of blocks too big for the budget (to allocations of
    /// their own) since creation.
    pub relocations: u64,
    /// Patch uploads since creation.
    pub uploads: u64,
    /// Uploads refused (budget or `OverBudget`) since creation.
    pub refused_uploads: u64,
    /// Times the driver refused memory (`VK_ERROR_OUT_OF_DEVICE_MEMORY`): each made the budget
    /// stay below what was held then, for a while.
    pub out_of_memory: u64,
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

/// The vegetation system of one context. Dropping it retires every GPU resource it holds at
/// the last frame that used it.
pub struct Vegetation {
    shared: Arc<Shared>,
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
    budget_source: Source,
    budget_clamped: Option<Clamp>,
    usage_estimated: bool,
    // Uploads staged and not yet recorded.
    staging: Vec<Buffer>,
    copies: Vec<PendingCopy>,
    atlas_uploads: Vec<PendingRegion>,
    recorded: Vec<RecordedUploads>,
    next_upload: u64,
    // Counters.
    frames: u64,
    live_instances: u64,
    evictions: u64,
    relocations: u64,
    min_footprint: u64,
    uploads: u64,
    refused_uploads: u64,
    out_of_memory: u64,
    lod_instances: PerLod,
    last_log: Instant,
}

impl std::fmt::Debug for Vegetation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vegetation")
            .field("patches", &(self.patches.len() - self.free_slots.len()))
            .field("tiles", &self.tiles.len())
            .field("instances", &self.live_instances)
            .field("frames", &self.frames)
            .finish()
    }
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
        if config.residency.max_upload_bytes_per_frame == 0 {
            return Err(Error::InvalidInput(
                "residency.max_upload_bytes_per_frame is 0".into(),
            ));
        }
        let quadtree = Quadtree::new(config.world_origin, config.world_size_m, config.leaf_tile_m)?;
        let packer = AtlasPacker::new(config.atlas_page_px, config.atlas_padding_px)?;
        let heap = ctx.memory().device_local_heap();
        Ok(Self {
            shared: ctx.shared().clone(),
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
            budget_source: Source::Estimated,
            budget_clamped: None,
            usage_estimated: false,
            staging: Vec::new(),
            copies: Vec::new(),
            atlas_uploads: Vec::new(),
            recorded: Vec::new(),
            next_upload: 1,
            frames: 0,
            live_instances: 0,
            evictions: 0,
            relocations: 0,
            min_footprint: 0,
            uploads: 0,
            refused_uploads: 0,
            out_of_memory: 0,
            lod_instances: PerLod::default(),
            last_log: Instant::now(),
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
        if !(frame_ms.is_finite() && frame_ms >= 0.0) {
            return Err(Error::InvalidInput(format!("frame time {frame_ms} ms")));
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
    pub fn register_species(&mut self, desc: &SpeciesDesc<'_>) -> Result<SpeciesId> {
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
            let image =
                match atlas::create_page(&self.shared, region.page, self.config.atlas_page_px) {
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
        let filled = self
            .staging_buffer("species billboard staging", texels)
            .and_then(|mut staging| {
                staging.mapped_mut()?[..desc.rgba8.len()].copy_from_slice(desc.rgba8);
                Ok(staging)
            });
        let staging = match filled {
            Ok(s) => s,
            Err(e) => {
                self.free_region(&region)?;
                return Err(e);
            }
        };
        self.staging.push(staging);
        let image = self.pages[page]
            .as_ref()
            .map(|p| p.image.id())
            .ok_or_else(|| Error::InvalidInput(format!("atlas page {page} vanished")))?;
        self.atlas_uploads.push(PendingRegion {
            page: region.page,
            image,
            staging: self.staging.len() - 1,
            region: RegionUpload {
                rect: region.rect,
                staging_offset: 0,
            },
        });
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
    /// retired (freed once the last frame that sampled it completes).
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
            // Dropping the image retires it at its last use.
            drop(self.pages.get_mut(page as usize).and_then(Option::take));
        }
        Ok(())
    }

    /// Upload staging in host memory (`GpuToCpu` picks host-visible, coherent, cached memory:
    /// system RAM on a discrete GPU, so staging never competes with vegetation for VRAM or the
    /// BAR window).
    fn staging_buffer(&self, name: &str, bytes: u64) -> Result<Buffer> {
        self.shared.create_buffer(&BufferDesc {
            name,
            size: bytes.max(4),
            usage: vk::BufferUsageFlags::TRANSFER_SRC,
            location: MemoryLocation::GpuToCpu,
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
        // A patch spawned into a resident tile is uploaded by a later update, counted against
        // the budget first (the tile's missing bytes).
        let tile = self.tiles.entry(node).or_default();
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

    /// Despawns a patch; its GPU memory is retired (freed once the last frame that read it
    /// completes). Unknown or already despawned ids are errors.
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
        // Dropping the buffer retires it at its last use; a copy still pending for it is
        // skipped by `record` (the patch is gone).
        drop(patch.gpu);
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

    /// Once a frame, after [`Context::begin_frame`]: steps the budget controller with the
    /// frame's heap budgets, evicts and uploads tiles, and counts LODs. Uploads are staged here
    /// and recorded by [`Vegetation::record`] (until then they stay staged).
    pub fn update(&mut self, frame: &Frame, viewer: impl Into<Viewer>) -> Result<UpdateReport> {
        frame.check(&self.shared, "Vegetation::update")?;
        self.settle_recorded();
        let viewer = viewer.into();
        let camera = viewer.position;
        if !camera.is_finite() {
            return Err(Error::InvalidInput(format!("camera at {camera}")));
        }
        let forward = match viewer.forward {
            None => None,
            Some(f) if f.is_finite() && f.length_squared() > 0.0 => {
                Some(Vec2::new(f.x, f.z).normalize_or_zero())
            }
            Some(f) => return Err(Error::InvalidInput(format!("view direction {f}"))),
        };
        // The frustum's side planes (normals inside), from the view-projection matrix.
        let planes = match viewer.view_proj {
            None => None,
            Some(m) if m.is_finite() => Some(
                [
                    m.row(3) + m.row(0),
                    m.row(3) - m.row(0),
                    m.row(3) + m.row(1),
                    m.row(3) - m.row(1),
                    m.row(2),
                ]
                .map(|p| p / p.truncate().length().max(f32::MIN_POSITIVE)),
            ),
            Some(_) => return Err(Error::InvalidInput("view-projection not finite".into())),
        };
        let heap = frame
            .heaps()
            .get(self.heap)
            .ok_or_else(|| Error::InvalidInput("frame has no heap report".into()))?
            .clone();
        self.budget_source = heap.budget.source;
        self.budget_clamped = heap.budget.clamped;
        self.usage_estimated = heap.budget.usage_estimated;
        // Tile views: distances, culled-frame counts, bytes held and still missing.
        let draw = self
            .config
            .lod
            .draw_distance(self.controller.quality() * self.frame_time_scale());
        let mut views = Vec::with_capacity(self.tiles.len());
        let mut least = Vec::with_capacity(self.tiles.len());
        let mut resident_bytes = 0;
        let m = &self.shared.memory;
        let own_memory = m.blocks_too_big();
        for (node, tile) in self.tiles.iter_mut() {
            tile.distance = self.quadtree.distance(*node, camera);
            // Wholly behind the camera (every corner behind its plane): ranks farther.
            let behind = forward.is_some_and(|f| {
                f != Vec2::ZERO && {
                    let (min, max) = self.quadtree.bounds(*node);
                    let c = Vec2::new(camera.x, camera.z);
                    [min, max, Vec2::new(min.x, max.y), Vec2::new(max.x, min.y)]
                        .iter()
                        .all(|p| (*p - c).dot(f) < 0.0)
                }
            });
            // Outside the frustum: some side plane has the whole box behind it, or none of a
            // sample of its trees (up to 32, spread over its patches) is inside (the camera's
            // own tile may hold only trees behind it).
            let outside = planes.is_some_and(|planes| {
                let (min, max) = self.quadtree.bounds(*node);
                let box_out = planes.iter().any(|p| {
                    let far = Vec3::new(
                        if p.x >= 0.0 { max.x } else { min.x },
                        if p.y >= 0.0 { TILE_HEIGHT_M } else { 0.0 },
                        if p.z >= 0.0 { max.y } else { min.y },
                    );
                    p.truncate().dot(far) + p.w < 0.0
                });
                box_out || {
                    let inside = |pos: Vec3| {
                        planes
                            .iter()
                            .all(|p| p.truncate().dot(pos) + p.w >= -SAMPLE_RADIUS_M)
                    };
                    let per = (32 / tile.patches.len().max(1)).max(1);
                    let mut sampled = 0;
                    let mut seen = false;
                    for slot in &tile.patches {
                        if let Some(p) = self.patches[*slot as usize].as_ref() {
                            let step = (p.instances.len() / per).max(1);
                            for i in p.instances.iter().step_by(step).take(per) {
                                sampled += 1;
                                seen |= inside(Vec3::from(i.position));
                            }
                        }
                        if seen {
                            break;
                        }
                    }
                    sampled > 0 && !seen
                }
            });
            tile.rank = if behind || outside {
                tile.distance * BEHIND_RANK_FACTOR + self.quadtree.leaf_m()
            } else {
                tile.distance
            };
            if tile.distance >= draw {
                tile.culled_frames = tile.culled_frames.saturating_add(1);
            } else {
                tile.culled_frames = 0;
            }
            let (mut held, mut missing) = (0, 0);
            let (mut own, mut plain) = (0u64, 0u64);
            for slot in &tile.patches {
                if let Some(p) = self.patches[*slot as usize].as_ref() {
                    let size = std::mem::size_of_val(p.instances.as_slice()) as u64;
                    let footprint = m.dedicated_footprint(size);
                    own += footprint;
                    plain += size;
                    match &p.gpu {
                        Some(g) => held += g.bytes,
                        // What it will reserve: memory of its own while blocks are too big
                        // for the budget, its size class in a block otherwise.
                        None if own_memory => missing += footprint,
                        None => missing += m.predicted_bytes(Category::Instances, size),
                    }
                }
            }
            // The least the tile can cost alone: memory of its own per patch, or one small
            // block.
            least.push(own.min(plain.max(SMALL_BLOCK)));
            if tile.resident {
                resident_bytes += held;
            }
            views.push(TileView {
                id: node.packed(),
                distance: tile.distance,
                rank: tile.rank,
                bytes: held + missing,
                resident: tile.resident,
                missing: if tile.resident { missing } else { 0 },
                culled_frames: tile.culled_frames,
            });
        }
        let demand = Demand::new(views.iter().map(|v| (v.distance, v.bytes)));
        let full = self.config.lod.draw_distance(1.0);
        let nearest = views
            .iter()
            .zip(&least)
            .filter(|(v, _)| v.distance < full && v.bytes > 0)
            .min_by(|a, b| a.0.rank.total_cmp(&b.0.rank))
            .map_or(0, |(_, l)| *l);
        let (mut input, mut budget_now) = self.budget_input(&heap, resident_bytes);
        {
            let c = &self.shared.memory.stats().categories;
            self.min_footprint =
                nearest + c[Category::Atlas].reserved_bytes + c[Category::Outputs].reserved_bytes;
        }
        // Released instance buffers kept for reuse count as held; past the target they are the
        // first thing to give back, before any tile is evicted or an upload refused.
        let target = self.controller.config().target;
        if input.held as f64 > budget_now as f64 * target
            && self.shared.memory.flush_cache_of(Category::Instances) > 0
        {
            (input, budget_now) = self.budget_input(&heap, resident_bytes);
        }
        let _ = budget_now;
        let mut decision = self.controller.step(&input, &demand, &self.config.lod);
        log::trace!("budget input {input:?} decision {decision:?}");
        // The optional second input: frame time scales quality further (never up past the
        // budget's choice).
        decision.quality *= self.frame_time_scale();
        // Nothing of the vegetation categories is reserved past the budget.
        self.shared.memory.set_vegetation_limit(decision.budget);
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
        let upload_nodes: Vec<NodeId> = plan
            .upload
            .iter()
            .map(|p| NodeId::from_packed(*p))
            .collect();
        let (mut uploaded_patches, mut uploaded_bytes) = self.upload_tiles(
            &upload_nodes,
            input.held,
            Placement::Auto,
            self.config.residency.max_upload_bytes_per_frame,
            &Default::default(),
        )?;
        let room = self
            .config
            .residency
            .max_upload_bytes_per_frame
            .saturating_sub(uploaded_bytes);
        let (p, b) = self.relocate(decision.budget, room, input.held)?;
        uploaded_patches += p;
        uploaded_bytes += b;
        // Instances per LOD by their tile's distance, of patches that are on the GPU (or whose
        // copy this frame records): what the cull pass can draw.
        let mut lod = PerLod::default();
        for tile in self.tiles.values() {
            let tile_lod = self.config.lod.select(tile.distance, decision.quality);
            let (mut on_gpu, mut off) = (0u64, 0u64);
            for slot in &tile.patches {
                if let Some(p) = self.patches[*slot as usize].as_ref() {
                    let n = p.instances.len() as u64;
                    if tile.resident && p.gpu.is_some() {
                        on_gpu += n;
                    } else {
                        off += n;
                    }
                }
            }
            lod.add(tile_lod, on_gpu);
            lod.add(Lod::Culled, off);
        }
        self.lod_instances = lod;
        self.frames += 1;
        self.last_decision = Some(decision);
        if self.last_log.elapsed() >= self.config.stats_log_interval {
            self.last_log = Instant::now();
            log::info!(
                "vegetation: {} patches, {} instances, {}/{} tiles resident, held {:.1}/{:.1} MiB ({}), quality {:.2}, evictions {}",
                self.patches.len() - self.free_slots.len(),
                self.live_instances,
                self.tiles.values().filter(|t| t.resident).count(),
                self.tiles.len(),
                input.held as f64 / (1 << 20) as f64,
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

    fn frame_time_scale(&self) -> f32 {
        self.frame_time.as_ref().map_or(1.0, |ft| ft.scale)
    }

    /// The controller's input from the heap report and what vegetation holds: every block of
    /// the vegetation categories (instances, atlas, outputs), pending frees included.
    fn budget_input(&self, heap: &HeapReport, resident: u64) -> (BudgetInput, u64) {
        let m = &self.shared.memory;
        let st = m.stats();
        let c = &st.categories;
        let pending: u64 = Category::VEGETATION
            .iter()
            .map(|k| c[*k].pending_bytes)
            .sum();
        let input = BudgetInput {
            heap_budget: heap.budget.budget,
            heap_usage: heap.budget.usage,
            ours: heap.ours_total,
            held: m.vegetation_reserved(),
            pending,
            outputs: c[Category::Outputs].reserved_bytes,
            resident,
            // Block slack goes back by relocation only while allocations of their own may
            // still be made; otherwise evictions have to empty the blocks.
            slack: if m.dedicated_room() > 0 {
                m.block_slack(Category::Instances)
            } else {
                0
            } + c[Category::Instances].cached_bytes,
        };
        let budget = self.controller.budget_for(&input);
        (input, budget)
    }

    /// The driver refused memory: pressure, not an error.
    fn out_of_memory(&mut self, held: u64) {
        self.out_of_memory += 1;
        self.controller.out_of_memory(held);
        log::warn!(
            "vegetation: the driver is out of device memory; the budget stays below {} bytes for a while",
            held
        );
    }

    fn evict_tile(&mut self, node: NodeId) {
        if let Some(tile) = self.tiles.get_mut(&node) {
            tile.culled_frames = 0;
        }
        self.drop_tile_buffers(node);
        self.evictions += 1;
    }

    /// Retires the instance buffers of a tile's patches (each at its last use) and marks the
    /// tile not resident.
    fn drop_tile_buffers(&mut self, node: NodeId) {
        let Some(tile) = self.tiles.get_mut(&node) else {
            return;
        };
        tile.resident = false;
        for slot in &tile.patches {
            if let Some(p) = self.patches[*slot as usize].as_mut() {
                drop(p.gpu.take());
            }
        }
    }

    /// Over the budget with blocks bigger than it allows (the budget fell after they were
    /// made), the evictions free sub-allocations but not the blocks around the tiles that stay.
    /// Those tiles' patches move, nearest first and within `room` bytes a frame, to
    /// allocations of their own: a new copy is uploaded in this frame (drawn from it at once)
    /// and the old buffer retires at its last use, so the blocks empty and go back to the
    /// driver without a tile leaving the screen. Once the budget has room for blocks again,
    /// patches move back into them (a quarter of `room` a frame), so allocations of their own
    /// stay few.
    fn relocate(&mut self, budget: u64, room: u64, held: u64) -> Result<(usize, u64)> {
        let m = &self.shared.memory;
        let out = m.vegetation_reserved() > budget && m.block_slack(Category::Instances) > 0;
        let back = !out && m.blocks_fit_again();
        if !out && !back {
            return Ok((0, 0));
        }
        let (mut count_room, room, placement) = if out {
            m.release_empty_blocks_of(Category::Instances)?;
            let in_blocks = m.block_bytes(Category::Instances);
            if in_blocks == 0 {
                return Ok((0, 0));
            }
            // Only what the budget can keep moves: the nearest tiles, up to what the budget
            // leaves beside what is outside blocks already (the rest is evicted).
            let outside = m.vegetation_reserved().saturating_sub(in_blocks);
            (
                m.dedicated_room(),
                room.min(budget.saturating_sub(outside)),
                Placement::Relocate,
            )
        } else {
            (u64::MAX, room / 4, Placement::Shared)
        };
        let mut nodes: Vec<(f32, NodeId)> = self
            .tiles
            .iter()
            .filter(|(_, t)| t.resident)
            .map(|(n, t)| (t.rank, *n))
            .collect();
        nodes.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut moving = Vec::new();
        let mut slots = std::collections::HashSet::new();
        let mut evict = Vec::new();
        let mut bytes = 0u64;
        let mut full = false;
        for (_, node) in nodes {
            let tile = &self.tiles[&node];
            let mut moved_any = false;
            let mut stuck = false;
            for slot in &tile.patches {
                let Some(p) = self.patches[*slot as usize].as_mut() else {
                    continue;
                };
                // Out of blocks, or back from memory of its own.
                let movable = p
                    .gpu
                    .as_ref()
                    .is_some_and(|g| (g.buffer.pool() == Pool::Dedicated) != out);
                if !movable {
                    continue;
                }
                let size = std::mem::size_of_val(p.instances.as_slice()) as u64;
                // What the move costs: memory of its own out of blocks, its size into them.
                let len = if out {
                    m.dedicated_footprint(size)
                } else {
                    size
                };
                if full || bytes + len > room || count_room == 0 {
                    full = true;
                    stuck = true;
                    break;
                }
                bytes += len;
                count_room -= 1;
                moved_any = true;
                // Replaced (and retired at its last use) once its new buffer exists; the new
                // copy is recorded in this frame.
                slots.insert(*slot);
            }
            if stuck && out {
                // The budget has no room for it beside the nearer tiles: it leaves, so that
                // its blocks drain (it comes back when there is room).
                evict.push(node);
            } else if moved_any {
                moving.push(node);
            }
            if full && !out {
                break;
            }
        }
        for node in evict {
            self.evict_tile(node);
        }
        if moving.is_empty() {
            return Ok((0, 0));
        }
        self.relocations += moving.len() as u64;
        let done = self.upload_tiles(&moving, held, placement, room.max(1), &slots)?;
        if out {
            // What could not move (the heap itself had no room for the copies or their
            // staging) leaves, so that its blocks still drain: over the budget, tiles go before
            // blocks stay. The nearest stays drawn (its blocks drain when it moves later).
            for node in moving.into_iter().skip(1) {
                let stuck = self.tiles.get(&node).is_some_and(|t| {
                    t.patches.iter().any(|s| {
                        slots.contains(s)
                            && self.patches[*s as usize]
                                .as_ref()
                                .and_then(|p| p.gpu.as_ref())
                                .is_some_and(|g| g.buffer.pool() != Pool::Dedicated)
                    })
                });
                if stuck {
                    self.evict_tile(node);
                }
            }
        }
        Ok(done)
    }

    /// Creates instance buffers for the tiles' patches and stages their data. Stops at the first
    /// refusal (`OverBudget`): refusing uploads is the controller's last resort.
    ///
    /// At most `limit` bytes are staged (at least one patch): a tile larger than that becomes
    /// resident with what fits, and the rest of its patches follow in the next frames.
    /// Patches in `relocating` already have a buffer: it is replaced only once the new one
    /// exists (a refusal keeps the old one).
    fn upload_tiles(
        &mut self,
        nodes: &[NodeId],
        held: u64,
        placement: Placement,
        limit: u64,
        relocating: &std::collections::HashSet<u32>,
    ) -> Result<(usize, u64)> {
        if nodes.is_empty() {
            return Ok((0, 0));
        }
        // Destinations first, staging for what they got: a refused destination costs no
        // staging (on a device with one heap, staging nobody copies from would take the room
        // the next frames' uploads need).
        let mut made: Vec<(NodeId, u32, Buffer)> = Vec::new();
        let mut bytes = 0u64;
        let mut complete = Vec::new();
        'tiles: for node in nodes {
            let Some(tile) = self.tiles.get(node) else {
                continue;
            };
            let was_resident = tile.resident;
            for &slot in &tile.patches {
                let Some(p) = self.patches[slot as usize].as_ref() else {
                    continue;
                };
                let moving = relocating.contains(&slot);
                if p.gpu.is_some() && !moving {
                    continue;
                }
                let len = std::mem::size_of_val(p.instances.as_slice()) as u64;
                if bytes > 0 && bytes + len > limit {
                    // This frame's share is used (at least one patch goes): the rest comes
                    // next frames (the tile is resident with what it has).
                    break 'tiles;
                }
                let desc = BufferDesc {
                    name: "patch instances",
                    size: len,
                    usage: vk::BufferUsageFlags::STORAGE_BUFFER
                        | vk::BufferUsageFlags::VERTEX_BUFFER
                        | vk::BufferUsageFlags::TRANSFER_DST
                        | vk::BufferUsageFlags::TRANSFER_SRC,
                    location: MemoryLocation::GpuOnly,
                    category: Category::Instances,
                };
                let memory = &self.shared.memory;
                let mut created = memory.create_buffer_placed(&self.shared, &desc, placement);
                if matches!(created, Err(Error::OverBudget { .. }))
                    && memory.flush_cache_of(Category::Instances) > 0
                {
                    // Released buffers kept for reuse go back before an upload is refused.
                    created = memory.create_buffer_placed(&self.shared, &desc, placement);
                }
                match created {
                    Ok(b) => {
                        bytes += len;
                        made.push((*node, slot, b));
                    }
                    Err(e @ (Error::OverBudget { .. } | Error::OutOfDeviceMemory { .. })) => {
                        if matches!(e, Error::OutOfDeviceMemory { .. }) {
                            // Driver out-of-memory is pressure: counted, quality steps down,
                            // the upload is retried later.
                            self.out_of_memory(held);
                        }
                        self.refused_uploads += 1;
                        log::debug!("upload refused: {e}");
                        // All or nothing for a tile that was not resident: what it got so far
                        // goes back (nothing recorded those buffers). A resident tile keeps
                        // what it has (a patch being moved keeps its old buffer); the rest
                        // comes later.
                        if !was_resident {
                            made.retain(|(n, s, _)| n != node || relocating.contains(s));
                            bytes = made
                                .iter()
                                .map(|(_, s, _)| self.patch_instance_bytes(*s))
                                .sum();
                        }
                        break 'tiles;
                    }
                    // Nothing recorded the buffers made so far: dropping them frees them.
                    Err(e) => return Err(e),
                }
            }
            complete.push(*node);
        }
        if made.is_empty() {
            // Nothing to upload for the tiles gone through (all their patches are on the GPU).
            for node in complete {
                if let Some(t) = self.tiles.get_mut(&node) {
                    t.resident = true;
                }
            }
            return Ok((0, 0));
        }
        // The staging: all of it, or less at once (a heap this tight, one heap for instances
        // and staging, may still take a smaller buffer; the destinations past it go back).
        let mut want = bytes;
        let mut created = self.staging_buffer("instance staging", want);
        let mut driver_refused = false;
        while matches!(
            created,
            Err(Error::OverBudget { .. } | Error::OutOfDeviceMemory { .. })
        ) {
            driver_refused |= matches!(created, Err(Error::OutOfDeviceMemory { .. }));
            let mut half = 0u64;
            for (_, s, _) in &made {
                let len = self.patch_instance_bytes(*s);
                if half > 0 && half + len > want / 2 {
                    break;
                }
                half += len;
            }
            if half >= want {
                break;
            }
            want = half;
            created = self.staging_buffer("instance staging", want);
        }
        let mut staging = match created {
            Ok(s) => {
                if driver_refused {
                    // A smaller staging buffer fitted, but the driver refused first: pressure.
                    self.out_of_memory(held);
                }
                s
            }
            Err(e @ (Error::OverBudget { .. } | Error::OutOfDeviceMemory { .. }))
            | Err(e @ Error::OutOfHostMemory { .. }) => {
                if !matches!(e, Error::OverBudget { .. }) {
                    // Driver out-of-memory is pressure, never an error out of update.
                    self.out_of_memory(held);
                }
                log::debug!("upload staging refused: {e}");
                self.refused_uploads += made.len() as u64;
                return Ok((0, 0));
            }
            Err(e) => return Err(e),
        };
        // Destinations past what the staging holds go back (never recorded); their tiles are
        // resident with what they got (at least one patch), the rest follows; a tile that lost
        // any is no longer complete.
        let mut covered = 0u64;
        let mut cut = made.len();
        for (i, (_, s, _)) in made.iter().enumerate() {
            let len = self.patch_instance_bytes(*s);
            if covered + len > want {
                cut = i;
                break;
            }
            covered += len;
        }
        if cut < made.len() {
            self.refused_uploads += (made.len() - cut) as u64;
            let lost: std::collections::HashSet<NodeId> =
                made[cut..].iter().map(|(n, _, _)| *n).collect();
            complete.retain(|n| !lost.contains(n));
            made.truncate(cut);
        }
        let mapped = match staging.mapped_mut() {
            Ok(m) => m,
            Err(e) => {
                self.staging.push(staging);
                return Err(e);
            }
        };
        let staging_index = self.staging.len();
        let mut offset = 0u64;
        let mut patches = 0;
        let mut touched = Vec::new();
        for (node, slot, buffer) in made {
            let Some(p) = self.patches[slot as usize].as_mut() else {
                continue;
            };
            let Some(region) = self.species[p.species.0 as usize]
                .as_ref()
                .map(|s| s.region)
            else {
                continue;
            };
            let bytes: &[u8] = bytemuck::cast_slice(&p.instances);
            let len = bytes.len() as u64;
            mapped[offset as usize..(offset + len) as usize].copy_from_slice(bytes);
            let upload = self.next_upload;
            self.next_upload += 1;
            self.copies.push(PendingCopy {
                staging: staging_index,
                src_offset: offset,
                bytes: len,
                slot,
                upload,
            });
            offset += len;
            // Memory of its own costs what the driver reserves for it.
            let memory = &self.shared.memory;
            let gpu_bytes = if buffer.pool() == Pool::Dedicated {
                memory.dedicated_footprint(buffer.bytes())
            } else {
                buffer.bytes()
            };
            // A moved patch's old buffer retires here, at its last use.
            p.gpu = Some(PatchGpu {
                buffer,
                instance_bytes: len,
                atlas: region,
                node: p.node,
                bytes: gpu_bytes,
                upload,
                state: UploadState::Staged,
            });
            patches += 1;
            self.uploads += 1;
            touched.push(node);
        }
        for node in touched.into_iter().chain(complete) {
            if let Some(t) = self.tiles.get_mut(&node) {
                t.resident = true;
            }
        }
        self.staging.push(staging);
        Ok((patches, offset))
    }

    /// Bytes of a patch's instance records (0 for a despawned slot).
    fn patch_instance_bytes(&self, slot: u32) -> u64 {
        self.patches[slot as usize]
            .as_ref()
            .map_or(0, |p| std::mem::size_of_val(p.instances.as_slice()) as u64)
    }

    /// Records the uploads staged so far (instance copies, atlas regions with their mips) and
    /// the barrier that makes them visible to compute, vertex and fragment shaders. Marks the
    /// staging, the destinations and the atlas pages used by `frame`; the staging is then
    /// retired (freed once `frame` completes). Uploads staged for a patch or page that is gone
    /// since are skipped.
    ///
    /// Recording into a raw command buffer is the caller's promise, so it takes `unsafe`:
    ///
    /// ```compile_fail,E0133
    /// # fn f(veg: &mut understory::vegetation::Vegetation, frame: &understory::gpu::context::Frame,
    /// #      cmd: ash::vk::CommandBuffer) -> understory::Result<()> {
    /// veg.record(frame, cmd)?; // call to unsafe function
    /// # Ok(()) }
    /// ```
    ///
    /// # Safety
    /// `cmd` must be a primary command buffer of this context's device, recording, outside a
    /// render pass, on understory's queue family (atlas mips are blits on a graphics queue), and
    /// recorded for `frame`: submitted as its submission, or before it on the same queue.
    pub unsafe fn record(&mut self, frame: &Frame, cmd: vk::CommandBuffer) -> Result<()> {
        frame.check(&self.shared, "Vegetation::record")?;
        self.settle_recorded();
        let value = frame.value();
        let fate = frame.fate();
        let d = &self.shared.device;
        let graphics = self.shared.queue_flags.contains(vk::QueueFlags::GRAPHICS);
        let mut copies = Vec::with_capacity(self.copies.len());
        let mut batch = RecordedUploads {
            fate: fate.clone(),
            staging: std::mem::take(&mut self.staging),
            copies: Vec::new(),
            regions: Vec::new(),
            first_uses: Vec::new(),
        };
        for c in std::mem::take(&mut self.copies) {
            let Some(gpu) = self.patches[c.slot as usize]
                .as_mut()
                .and_then(|p| p.gpu.as_mut())
                .filter(|g| g.upload == c.upload)
            else {
                continue;
            };
            let Some(staging) = batch.staging.get_mut(c.staging) else {
                continue;
            };
            // One copy region per destination buffer.
            let region = vk::BufferCopy {
                src_offset: c.src_offset,
                dst_offset: 0,
                size: c.bytes,
            };
            staging.touch(value);
            gpu.buffer.touch(value);
            gpu.state = UploadState::Recorded(fate.clone());
            copies.push((staging.raw(), gpu.buffer.raw(), region));
            batch.copies.push(c);
        }
        // SAFETY: cmd is recording outside a render pass on understory's queue (caller); both
        // buffers of each copy are live and marked used by `frame`, so neither is freed before
        // it completes; each range lies inside both (sized from the same instance bytes);
        // staging is TRANSFER_SRC and instance buffers TRANSFER_DST.
        unsafe { upload::record_copies(d, cmd, graphics, &copies) };
        let mut pages: Vec<u32> = self.atlas_uploads.iter().map(|u| u.page).collect();
        pages.sort_unstable();
        pages.dedup();
        let regions = std::mem::take(&mut self.atlas_uploads);
        for page in pages {
            let Some(p) = self.pages.get_mut(page as usize).and_then(Option::as_mut) else {
                continue;
            };
            // Uploads of one page, grouped per staging buffer.
            let mut groups: HashMap<usize, Vec<RegionUpload>> = HashMap::new();
            for u in regions
                .iter()
                .filter(|u| u.page == page && u.image == p.image.id())
            {
                groups.entry(u.staging).or_default().push(u.region);
            }
            for (s, group) in groups {
                let Some(staging) = batch.staging.get_mut(s) else {
                    continue;
                };
                staging.touch(value);
                p.image.touch(value);
                if !p.initialized {
                    batch.first_uses.push((page, p.image.id()));
                }
                // SAFETY: as above; the page image and the staging are marked used by `frame`.
                unsafe {
                    atlas::record_uploads(
                        d,
                        graphics,
                        cmd,
                        &p.image,
                        !p.initialized,
                        staging.raw(),
                        &group,
                    )
                };
                p.initialized = true;
            }
        }
        batch.regions = regions;
        if !batch.staging.is_empty() {
            self.recorded.push(batch);
        }
        Ok(())
    }

    /// Settles uploads recorded into frames that were submitted (confirmed, their staging
    /// retired) or dropped (staged again, to be recorded by the next `record`).
    fn settle_recorded(&mut self) {
        let mut open = Vec::new();
        for batch in std::mem::take(&mut self.recorded) {
            match FrameFate::of(&batch.fate) {
                FrameFate::Open => open.push(batch),
                FrameFate::Submitted => {
                    for c in &batch.copies {
                        if let Some(gpu) = self.patches[c.slot as usize]
                            .as_mut()
                            .and_then(|p| p.gpu.as_mut())
                            .filter(|g| g.upload == c.upload)
                        {
                            gpu.state = UploadState::Uploaded;
                        }
                    }
                    // The staging drops here, retiring at the frame that used it.
                }
                FrameFate::Dropped => self.restage(batch),
            }
        }
        self.recorded = open;
    }

    /// Puts a dropped frame's uploads back in front of what is staged now.
    fn restage(&mut self, batch: RecordedUploads) {
        let shift = batch.staging.len();
        for c in &mut self.copies {
            c.staging += shift;
        }
        for r in &mut self.atlas_uploads {
            r.staging += shift;
        }
        for c in &batch.copies {
            if let Some(gpu) = self.patches[c.slot as usize]
                .as_mut()
                .and_then(|p| p.gpu.as_mut())
                .filter(|g| g.upload == c.upload)
            {
                gpu.state = UploadState::Staged;
            }
        }
        for (page, image) in &batch.first_uses {
            if let Some(p) = self
                .pages
                .get_mut(*page as usize)
                .and_then(Option::as_mut)
                .filter(|p| p.image.id() == *image)
            {
                p.initialized = false;
            }
        }
        let mut staging = batch.staging;
        staging.append(&mut self.staging);
        self.staging = staging;
        let mut copies = batch.copies;
        copies.append(&mut self.copies);
        self.copies = copies;
        let mut regions = batch.regions;
        regions.append(&mut self.atlas_uploads);
        self.atlas_uploads = regions;
    }

    /// The resident patches whose instances are uploaded ([`PatchGpu::uploaded`]: their copy
    /// recorded into a submitted frame, or into the open frame by [`Vegetation::record`]), as
    /// sources for the GPU cull pass, numbered consecutively (`base`) in patch-slot order, with
    /// the instances they hold on the CPU (for references and tests).
    pub fn cull_sources(&self) -> Vec<(CullSource<'_>, &[Instance])> {
        let mut base = 0u32;
        let mut out = Vec::new();
        for p in self.patches.iter().flatten() {
            if let Some(gpu) = p.gpu.as_ref().filter(|g| g.uploaded()) {
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
    pub fn stats(&self) -> Stats {
        let d = self.last_decision;
        Stats {
            frames: self.frames,
            memory: self.shared.memory.stats(),
            budget: d.map_or(0, |d| d.budget),
            budget_source: self.budget_source,
            budget_clamped: self.budget_clamped,
            usage_estimated: self.usage_estimated,
            held: self.shared.memory.vegetation_reserved(),
            min_footprint: self.min_footprint,
            pressure: d.map_or(0.0, |d| d.pressure),
            quality: self.last_decision.map_or(1.0, |d| d.quality),
            patches: (self.patches.len() - self.free_slots.len()) as u64,
            instances: self.live_instances,
            tiles: self.tiles.len() as u64,
            resident_tiles: self.tiles.values().filter(|t| t.resident).count() as u64,
            lod_instances: self.lod_instances,
            evictions: self.evictions,
            relocations: self.relocations,
            uploads: self.uploads,
            refused_uploads: self.refused_uploads,
            out_of_memory: self.out_of_memory,
        }
    }
}
