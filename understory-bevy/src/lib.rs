//! The understory Bevy plugin: vegetation patches as entities, the real VRAM budget as a
//! resource, and the forest culled and drawn in Bevy's frame, on Bevy's own `VkDevice`.
//!
//! ```no_run
//! use bevy::prelude::*;
//! use understory_bevy::{UnderstoryPlugin, VegetationCamera};
//! # fn f() -> understory::Result<()> {
//! // The shared device first: Bevy's renderer is built on it (RenderCreation::manual).
//! let (plugin, render_creation) = UnderstoryPlugin::new(
//!     &understory_wgpu::SharedDeviceDesc::from_env()?,
//!     understory_bevy::ForestSettings::default(),
//! )?;
//! App::new()
//!     .add_plugins(DefaultPlugins.set(bevy::render::RenderPlugin {
//!         render_creation,
//!         ..default()
//!     }))
//!     .add_plugins(plugin)
//!     .run();
//! # Ok(()) }
//! ```
//!
//! # What it does, frame by frame
//! - **Main world, `UnderstorySystems::Update`** (in `PostUpdate`): a [`VegetationPatch`]
//!   added or changed on an entity queues its instances (moved by the entity's `Transform`)
//!   for the render world; `UnderstorySystems::Cleanup`: a patch removed or an entity
//!   despawned queues its despawn. `UnderstorySystems::Init` copies the last frame's budget
//!   into [`VramBudget`] and Bevy's `DiagnosticsStore`.
//! - **Render world, `Render` / `RenderSystems::Prepare`** (`UnderstorySystems::Update`):
//!   the queued spawns and despawns reach understory's vegetation (a despawned patch is
//!   retired frame-fenced: freed once the GPU passed its last frame).
//! - **`Core3d` / `Core3dSystems::MainPass`**, after the opaque pass and before the
//!   transparent one, for the first camera with [`VegetationCamera`], as command buffers in
//!   Bevy's own submission (`RenderContext::add_command_buffer`):
//!   - `UnderstorySystems::Cull`: the budget controller, residency, uploads and the GPU cull
//!     (`Forest::cull`);
//!   - `UnderstorySystems::Draw`: the indirect draws into the camera's colour and depth
//!     textures, depth-tested against Bevy's reversed depth (`Forest::draw`, the same
//!     understory frame reopened with `SharedDevice::resume`).
//! - **`RenderSystems::Cleanup`** (`UnderstorySystems::Cleanup`), after Bevy submitted: the
//!   frame is announced to understory (`SharedDevice::host_submitted`); its completion comes
//!   from wgpu.
//! - **Exit:** when Bevy drops its render world, the plugin waits for its last frame, drains
//!   every deferred free and reports leaks ([`ExitReport`], through [`UnderstoryPlugin::exit`]).
//!
//! # Requirements on the camera
//! `Msaa::Off` (understory draws single-sampled), HDR off (`Rgba8UnormSrgb` main texture), and
//! the `Core3d` pipeline. Species share one billboard atlas page. A species draws its own full-
//! and medium-detail meshes ([`VegetationSpecies::meshes`], made from Bevy meshes by
//! [`tree_mesh`]) or, without them, understory's conifer.

#![warn(missing_docs)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bevy::asset::{Asset, AssetId};
use bevy::core_pipeline::core_3d::{main_opaque_pass_3d, main_transparent_pass_3d};
use bevy::core_pipeline::{Core3d, Core3dSystems};
use bevy::diagnostic::{Diagnostic, DiagnosticPath, Diagnostics, RegisterDiagnostic};
use bevy::prelude::*;
use bevy::reflect::TypePath;
use bevy::render::extract_component::{ExtractComponent, ExtractComponentPlugin};
use bevy::render::renderer::{
    RenderAdapter, RenderAdapterInfo, RenderContext, RenderDevice, RenderInstance, RenderQueue,
    ViewQuery, WgpuWrapper,
};
use bevy::render::settings::RenderCreation;
use bevy::render::view::{ExtractedView, ViewDepthTexture, ViewTarget};
use bevy::render::{Render, RenderApp, RenderSystems};
use understory::error::{Error, Result};
use understory::gpu::draw::DrawOptions;
use understory::vegetation::{PatchDesc, PatchId, SpeciesDesc, SpeciesId, VegetationConfig};
use understory::world::instance::Instance;
use understory_wgpu::{Forest, ForestDesc, ForestView, HostFrame, Messages, SharedDevice};

pub use understory;
pub use understory::gpu::draw::TreeMeshes;
pub use understory_wgpu;

/// The Bevy version this crate is built against (`Cargo.toml` pins it, in one place).
pub const BEVY_VERSION: &str = "0.19.1";

/// The plugin's system sets, in the spirit of the vegetation system it grew from.
#[derive(SystemSet, Debug, Clone, PartialEq, Eq, Hash)]
pub enum UnderstorySystems {
    /// Main world, start of `PostUpdate`: the budget and diagnostics of the last frame.
    Init,
    /// Main world: patch changes queued; render world: applied to the vegetation.
    Update,
    /// Render world, `Core3d`: the budget controller, residency, uploads and the GPU cull for
    /// the vegetation camera, as command buffers in Bevy's submission.
    Cull,
    /// Render world, `Core3d`: the indirect draws of what the cull kept, into the camera's
    /// main and depth textures (after `Cull`, in the same frame).
    Draw,
    /// Main world: removed patches queued for despawn; render world: the frame announced.
    Cleanup,
}

/// A species: its billboard (RGBA8, `width × height`, the coarsest LOD), packed into the atlas
/// when first used, and its full- and medium-detail meshes. Read once, when the first patch of
/// it reaches the render world (later changes to the asset are not picked up; a patch whose
/// asset is not loaded yet waits for it). Removing the asset unregisters the species once no
/// patch uses it (its atlas space is free again; a mesh set added for it stays, unused, and
/// at most 255 can be added). The billboards of all species share the first atlas page
/// (`VegetationConfig::atlas_page_px`); a species that does not fit it is refused.
#[derive(Asset, TypePath, Clone, Debug)]
pub struct VegetationSpecies {
    /// Name (for logs and stats).
    pub name: String,
    /// Billboard width in pixels.
    pub width: u32,
    /// Billboard height in pixels.
    pub height: u32,
    /// `width × height × 4` bytes, RGBA8.
    pub rgba8: Vec<u8>,
    /// Full- and medium-detail meshes of a tree of scale 1 (base at the origin, +Y up; see
    /// [`tree_mesh`]), or `None` for understory's conifer
    /// ([`TreeMeshes::conifer`]). Meshes [`TreeMeshes::check`] refuses leave the
    /// species unregistered, with the error logged and counted in [`VramBudget::errors`].
    pub meshes: Option<TreeMeshes>,
}

/// One part of a tree mesh for [`tree_mesh`]: a Bevy triangle-list mesh with positions and
/// normals, its colour, and how much of each instance's tint colours it.
#[derive(Clone, Copy, Debug)]
pub struct TreePart<'a> {
    /// Positions (`Float32x3`) and normals (`Float32x3`); vertex colours (`Float32x4`, linear)
    /// multiply `color` where present. Texture coordinates are not used (only billboards are
    /// textured). Without indices, vertices are taken in order.
    pub mesh: &'a Mesh,
    /// The part's colour (understory lights it in linear RGB).
    pub color: Color,
    /// 0..=1: how much of the instance tint applies (1 for foliage, 0 for bark).
    pub tint: f32,
}

/// An understory mesh (one LOD of [`TreeMeshes`]) from Bevy meshes: a tree of scale 1 with its
/// base at the origin and +Y up, made of `parts`.
///
/// [`Error::InvalidInput`] for no part, a part that is not a triangle list, lacks positions or
/// normals, has attributes of other lengths or an index past its vertices, or a `tint` outside
/// 0..=1. ([`TreeMeshes::check`] checks the rest when the species is first used.)
pub fn tree_mesh(parts: &[TreePart<'_>]) -> Result<understory::gpu::draw::Mesh> {
    use bevy::mesh::{PrimitiveTopology, VertexAttributeValues};
    if parts.is_empty() {
        return Err(Error::InvalidInput("tree_mesh: no parts".into()));
    }
    let mut out = understory::gpu::draw::Mesh::default();
    for (k, part) in parts.iter().enumerate() {
        let bad = |why: String| Error::InvalidInput(format!("tree_mesh: part {k}: {why}"));
        let mesh = part.mesh;
        if mesh.primitive_topology() != PrimitiveTopology::TriangleList {
            return Err(bad(format!(
                "{:?}, a triangle list is needed",
                mesh.primitive_topology()
            )));
        }
        if !(0.0..=1.0).contains(&part.tint) {
            return Err(bad(format!("tint {} (0..=1)", part.tint)));
        }
        let read3 = |id, what| match mesh.try_attribute_option(id) {
            Ok(Some(VertexAttributeValues::Float32x3(v))) => Ok(v.as_slice()),
            _ => Err(bad(format!("{what} must be Float32x3"))),
        };
        let positions = read3(Mesh::ATTRIBUTE_POSITION, "positions")?;
        let normals = read3(Mesh::ATTRIBUTE_NORMAL, "normals")?;
        let colors = match mesh.try_attribute_option(Mesh::ATTRIBUTE_COLOR) {
            Ok(Some(VertexAttributeValues::Float32x4(c))) => Some(c.as_slice()),
            Ok(None) => None,
            _ => return Err(bad("colours must be Float32x4".into())),
        };
        if normals.len() != positions.len() || colors.is_some_and(|c| c.len() != positions.len()) {
            return Err(bad(format!(
                "{} positions, {} normals, {:?} colours",
                positions.len(),
                normals.len(),
                colors.map(<[_]>::len)
            )));
        }
        let base = out.vertices.len();
        let rgb = part.color.to_linear();
        let byte = |x: f32| (x.clamp(0.0, 1.0) * 255.0).round() as u8;
        out.vertices.extend(
            positions
                .iter()
                .zip(normals)
                .enumerate()
                .map(|(i, (p, n))| {
                    let c = colors.map_or([1.0; 4], |c| c[i]);
                    understory::gpu::draw::Vertex {
                        position: *p,
                        normal: *n,
                        uv: [0.0; 2],
                        color: [
                            byte(rgb.red * c[0]),
                            byte(rgb.green * c[1]),
                            byte(rgb.blue * c[2]),
                            byte(part.tint),
                        ],
                    }
                }),
        );
        let count = positions.len();
        let indices: Vec<usize> = match mesh.indices() {
            Some(i) => i.iter().collect(),
            None => (0..count).collect(),
        };
        if let Some(i) = indices.iter().find(|&&i| i >= count) {
            return Err(bad(format!("index {i} of {count} vertices")));
        }
        out.indices
            .extend(indices.iter().map(|&i| (base + i) as u32));
    }
    Ok(out)
}

/// A patch of vegetation on an entity: instances of one species, relative to the entity's
/// `Transform` translation. Spawning the entity spawns the patch; changing the component
/// updates it; despawning the entity (or removing the component) retires its GPU resources,
/// frame-fenced. A patch must lie in one leaf tile of the world; one without instances holds
/// nothing.
#[derive(Component, Clone, Debug)]
#[require(Transform)]
pub struct VegetationPatch {
    /// Its species.
    pub species: Handle<VegetationSpecies>,
    /// Its instances (positions relative to the entity).
    pub instances: Arc<[Instance]>,
}

/// A density description of a patch, for [`VegetationPatch::scatter`]: trees scattered over
/// a rectangle from the entity's origin (+x, +z), each with a random yaw, a scale in `scale`
/// and `tint` varied by up to ±15% per tree. The same description and seed give the same trees.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Density {
    /// The rectangle's size in metres along x and z.
    pub size_m: Vec2,
    /// Trees per hectare (10,000 m²).
    pub trees_per_hectare: f32,
    /// Smallest and largest tree scale (height in metres for understory's conifer).
    pub scale: (f32, f32),
    /// The trees' tint (foliage takes it; see [`TreePart::tint`]).
    pub tint: Color,
    /// Seed of the scatter.
    pub seed: u64,
}

impl VegetationPatch {
    /// A patch of `species` scattered as `density` describes (instance records made here,
    /// once). [`Error::InvalidInput`] for a size, density or scale that is not finite and
    /// positive (smallest ≤ largest), or more trees than a patch holds (65,536). The patch
    /// must still lie in one leaf tile of the world (checked when it reaches the render world,
    /// where a refusal is logged and counted in [`VramBudget::errors`]).
    pub fn scatter(species: Handle<VegetationSpecies>, density: &Density) -> Result<Self> {
        let d = density;
        let positive = |x: f32| x.is_finite() && x > 0.0;
        if !(positive(d.size_m.x)
            && positive(d.size_m.y)
            && d.trees_per_hectare.is_finite()
            && d.trees_per_hectare >= 0.0
            && positive(d.scale.0)
            && positive(d.scale.1)
            && d.scale.0 <= d.scale.1)
        {
            return Err(Error::InvalidInput(format!("scatter: {d:?}")));
        }
        let count = (f64::from(d.size_m.x) * f64::from(d.size_m.y) / 10_000.0
            * f64::from(d.trees_per_hectare))
        .round();
        if count > 65_536.0 {
            return Err(Error::InvalidInput(format!(
                "scatter: {count} trees, a patch holds at most 65,536"
            )));
        }
        // SplitMix64: a small, well-mixed generator; the same seed gives the same trees.
        let mut state = d.seed;
        let mut next = move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
        };
        let rgb = d.tint.to_srgba();
        let instances: Arc<[Instance]> = (0..count as u32)
            .map(|_| {
                let (x, z) = (next() * d.size_m.x, next() * d.size_m.y);
                let yaw = next() * std::f32::consts::TAU;
                let scale = d.scale.0 + (d.scale.1 - d.scale.0) * next();
                let v = 0.85 + 0.3 * next();
                let byte = |c: f32| u32::from(((c * v).clamp(0.0, 1.0) * 255.0).round() as u8);
                Instance {
                    scale,
                    yaw,
                    tint: byte(rgb.red)
                        | (byte(rgb.green) << 8)
                        | (byte(rgb.blue) << 16)
                        | (255 << 24),
                    ..Instance::at(glam::Vec3::new(x, 0.0, z))
                }
            })
            .collect();
        Ok(Self { species, instances })
    }
}

/// Marks the camera whose view the forest is culled for and drawn into (the first one, if
/// several). Needs `Msaa::Off` and HDR off.
#[derive(Component, Clone, Copy, Debug, Default, ExtractComponent)]
pub struct VegetationCamera;

/// The real VRAM budget and vegetation's share of it, as of the last rendered frame.
#[derive(Resource, Clone, Debug, Default)]
pub struct VramBudget {
    /// The GPU.
    pub device: String,
    /// `ext` (`VK_EXT_memory_budget`) or `estimated` (the labelled estimate).
    pub source: String,
    /// The device-local heap's budget for this process, bytes.
    pub heap_budget: u64,
    /// Its usage, bytes.
    pub heap_usage: u64,
    /// What the rest of the process (Bevy's wgpu allocations) holds there, bytes.
    pub foreign: u64,
    /// Bytes wgpu's allocator holds.
    pub wgpu_reserved: u64,
    /// Vegetation bytes held (pending frees included).
    pub held: u64,
    /// The vegetation budget the controller set.
    pub budget: u64,
    /// LOD distance scale (1 = full quality).
    pub quality: f32,
    /// Bytes whose frees wait for the GPU to pass their last frame.
    pub pending_free_bytes: u64,
    /// Live patches understory holds.
    pub patches: u64,
    /// Instances per LOD the last update counted (full, medium, billboard), on the CPU.
    pub lod_instances: [u64; 3],
    /// Instances per LOD the GPU drew in the latest completed frame (the cull's indirect
    /// arguments, read back by understory); zeros in a frame that drew no vegetation (no
    /// vegetation camera, or its frame failed).
    pub drawn: [u64; 3],
    /// Frames rendered.
    pub frames: u64,
    /// Errors the render world logged (recording, submission).
    pub errors: u64,
}

impl std::fmt::Display for VramBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        write!(
            f,
            "{}: heap budget {:.1} MiB ({}), usage {:.1} MiB, foreign {:.1} MiB (wgpu holds {:.1} MiB); vegetation {:.1} of {:.1} MiB, quality {:.2}, {} patches, pending frees {:.1} MiB",
            self.device,
            mib(self.heap_budget),
            self.source,
            mib(self.heap_usage),
            mib(self.foreign),
            mib(self.wgpu_reserved),
            mib(self.held),
            mib(self.budget),
            self.quality,
            self.patches,
            mib(self.pending_free_bytes)
        )
    }
}

/// The vegetation cap in bytes (e.g. from the game's settings menu): inserted or changed, it
/// reaches the budget controller next frame. The budget is still at most the controller's
/// share of the heap's real headroom.
#[derive(Resource, Clone, Copy, Debug, PartialEq, Eq)]
pub struct VegetationCap(pub u64);

/// What the plugin reports when Bevy's render world goes away.
#[derive(Clone, Debug, Default)]
pub struct ExitReport {
    /// Resources drained at shutdown.
    pub drained: u64,
    /// Allocations still alive (names): a clean exit has none.
    pub leaks: Vec<String>,
    /// Validation messages (the Khronos layer, wgpu) over the run, teardown included up to
    /// understory's shutdown.
    pub messages: Messages,
    /// Set if shutdown itself failed.
    pub error: Option<String>,
}

/// Diagnostic: vegetation bytes held.
pub const HELD_BYTES: DiagnosticPath = DiagnosticPath::const_new("understory/held_bytes");
/// Diagnostic: bytes whose frees wait for the GPU.
pub const PENDING_FREES: DiagnosticPath =
    DiagnosticPath::const_new("understory/pending_free_bytes");
/// Diagnostic: LOD quality.
pub const QUALITY: DiagnosticPath = DiagnosticPath::const_new("understory/quality");
/// Diagnostics: instances per LOD the GPU drew (full, medium, billboard).
pub const LOD_INSTANCES: [DiagnosticPath; 3] = [
    DiagnosticPath::const_new("understory/drawn_full"),
    DiagnosticPath::const_new("understory/drawn_medium"),
    DiagnosticPath::const_new("understory/drawn_billboard"),
];

/// What the main world sends the render world.
enum PatchCommand {
    Spawn {
        entity: Entity,
        species: AssetId<VegetationSpecies>,
        /// `None`: the asset is gone; the render world uses the species it registered.
        species_data: Option<Arc<VegetationSpecies>>,
        instances: Vec<Instance>,
    },
    Despawn(Entity),
    /// The species asset was removed: unregister it once no patch uses it.
    ForgetSpecies(AssetId<VegetationSpecies>),
}

/// Shared between the two worlds.
#[derive(Default)]
struct BridgeInner {
    commands: Vec<PatchCommand>,
    cap: Option<u64>,
    budget: VramBudget,
    exit: Option<ExitReport>,
}

#[derive(Resource, Clone, Default)]
struct Bridge(Arc<Mutex<BridgeInner>>);

impl Bridge {
    fn lock(&self) -> std::sync::MutexGuard<'_, BridgeInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The forest's settings.
#[derive(Clone, Debug, Default)]
pub struct ForestSettings {
    /// The vegetation world (bands, cap, tiles).
    pub config: VegetationConfig,
}

/// The plugin. Make it with [`UnderstoryPlugin::new`] (which also makes the device Bevy
/// renders with).
pub struct UnderstoryPlugin {
    setup: Mutex<Option<(SharedDevice, ForestSettings)>>,
    bridge: Bridge,
}

impl UnderstoryPlugin {
    /// Creates the shared device (understory-wgpu's) and returns the plugin and the
    /// `RenderCreation` to give Bevy's `RenderPlugin`, so that Bevy renders on that device.
    pub fn new(
        desc: &understory_wgpu::SharedDeviceDesc,
        settings: ForestSettings,
    ) -> Result<(Self, RenderCreation)> {
        let shared = SharedDevice::new(desc)?;
        let creation = RenderCreation::manual(
            RenderDevice::from(shared.device().clone()),
            RenderQueue(Arc::new(WgpuWrapper::new(shared.queue().clone()))),
            RenderAdapterInfo(WgpuWrapper::new(shared.adapter().get_info())),
            RenderAdapter(Arc::new(WgpuWrapper::new(shared.adapter().clone()))),
            RenderInstance(Arc::new(WgpuWrapper::new(shared.instance().clone()))),
        );
        Ok((
            Self {
                setup: Mutex::new(Some((shared, settings))),
                bridge: Bridge::default(),
            },
            creation,
        ))
    }

    /// A handle that gets the [`ExitReport`] once Bevy's render world is gone (after
    /// `App::run` returns).
    pub fn exit(&self) -> ExitHandle {
        ExitHandle(self.bridge.clone())
    }
}

/// Reads the [`ExitReport`] after the app ran ([`UnderstoryPlugin::exit`]).
#[derive(Clone)]
pub struct ExitHandle(Bridge);

impl ExitHandle {
    /// The report, once the render world is gone.
    pub fn report(&self) -> Option<ExitReport> {
        self.0.lock().exit.clone()
    }

    /// The last frame's budget.
    pub fn budget(&self) -> VramBudget {
        self.0.lock().budget.clone()
    }
}

impl Plugin for UnderstoryPlugin {
    fn build(&self, app: &mut App) {
        let Some((shared, settings)) = self.setup.lock().unwrap_or_else(|p| p.into_inner()).take()
        else {
            log::error!("UnderstoryPlugin added twice");
            return;
        };
        if app.get_sub_app(RenderApp).is_none() {
            // Nothing to draw into: the shared device is shut down here, and no main-world
            // system queues patches for a render world that would never take them.
            log::error!("UnderstoryPlugin needs Bevy's RenderPlugin, added before it");
            return;
        }
        app.init_asset::<VegetationSpecies>()
            .init_resource::<MainPatches>()
            .insert_resource(self.bridge.clone())
            .init_resource::<VramBudget>()
            .register_diagnostic(Diagnostic::new(HELD_BYTES).with_suffix(" B"))
            .register_diagnostic(Diagnostic::new(PENDING_FREES).with_suffix(" B"))
            .register_diagnostic(Diagnostic::new(QUALITY))
            .add_plugins(ExtractComponentPlugin::<VegetationCamera>::default())
            .configure_sets(
                PostUpdate,
                (
                    UnderstorySystems::Init,
                    UnderstorySystems::Update,
                    UnderstorySystems::Cleanup,
                )
                    .chain(),
            )
            .add_systems(
                PostUpdate,
                (
                    publish_budget.in_set(UnderstorySystems::Init),
                    (queue_cap, queue_patches).in_set(UnderstorySystems::Update),
                    (queue_removals, queue_species_removals).in_set(UnderstorySystems::Cleanup),
                ),
            );
        for p in LOD_INSTANCES {
            app.register_diagnostic(Diagnostic::new(p));
        }
        let mut state = RenderState::new(shared, settings);
        // The exit report goes to the main world even if the render world never runs.
        state.bridge = Some(self.bridge.clone());
        let Some(render_app) = app.get_sub_app_mut(RenderApp) else {
            return; // checked above
        };
        render_app
            .insert_resource(self.bridge.clone())
            .insert_resource(RenderForest(Mutex::new(state)))
            .configure_sets(
                Core3d,
                (UnderstorySystems::Cull, UnderstorySystems::Draw)
                    .chain()
                    .in_set(Core3dSystems::MainPass)
                    .after(main_opaque_pass_3d)
                    .before(main_transparent_pass_3d),
            )
            .add_systems(
                Render,
                (
                    apply_patches
                        .in_set(RenderSystems::Prepare)
                        .in_set(UnderstorySystems::Update),
                    announce_frame
                        .in_set(RenderSystems::Cleanup)
                        .in_set(UnderstorySystems::Cleanup),
                ),
            )
            .add_systems(
                Core3d,
                (
                    cull_vegetation.in_set(UnderstorySystems::Cull),
                    draw_vegetation.in_set(UnderstorySystems::Draw),
                ),
            );
    }
}

/// Main world: copies the last frame's numbers into [`VramBudget`] and the diagnostics.
fn publish_budget(bridge: Res<Bridge>, mut budget: ResMut<VramBudget>, mut diag: Diagnostics) {
    let b = bridge.lock().budget.clone();
    diag.add_measurement(&HELD_BYTES, || b.held as f64);
    diag.add_measurement(&PENDING_FREES, || b.pending_free_bytes as f64);
    diag.add_measurement(&QUALITY, || f64::from(b.quality));
    for (p, n) in LOD_INSTANCES.iter().zip(b.drawn) {
        diag.add_measurement(p, || n as f64);
    }
    *budget = b;
}

/// A patch added, changed or moved.
type ChangedPatch = Or<(Changed<VegetationPatch>, Changed<Transform>)>;

/// Main world: patches added or changed (or moved) go to the render world.
/// Main world: patches whose species asset was not there yet (spawned once it is), and the
/// species sent to the render world (a patch of a species whose asset was removed since still
/// moves and changes with it: the render world keeps a species while patches use it).
#[derive(Resource, Default)]
struct MainPatches {
    waiting: HashSet<Entity>,
    sent: HashSet<AssetId<VegetationSpecies>>,
    /// One shared copy of each loaded species asset's data, for every patch change that sends
    /// it (a churning patch would copy the billboard each time).
    copies: HashMap<AssetId<VegetationSpecies>, Arc<VegetationSpecies>>,
}

fn queue_patches(
    bridge: Res<Bridge>,
    species: Res<Assets<VegetationSpecies>>,
    mut main: ResMut<MainPatches>,
    changed: Query<Entity, ChangedPatch>,
    patches: Query<(&VegetationPatch, &Transform)>,
) {
    let mut b = bridge.lock();
    let main = &mut *main;
    let mut todo: Vec<Entity> = changed.iter().collect();
    todo.extend(main.waiting.drain());
    todo.sort_unstable();
    todo.dedup();
    for entity in todo {
        let Ok((patch, transform)) = patches.get(entity) else {
            continue; // despawned meanwhile
        };
        let id = patch.species.id();
        let data = match species.get(id) {
            Some(d) => {
                main.sent.insert(id);
                Some(
                    main.copies
                        .entry(id)
                        .or_insert_with(|| Arc::new(d.clone()))
                        .clone(),
                )
            }
            // Gone since it was sent: the render world has it (or says it does not).
            None if main.sent.contains(&id) => None,
            None => {
                // The asset is not there yet: looked at again every frame until it is.
                main.waiting.insert(entity);
                continue;
            }
        };
        let offset = glam::Vec3::from_array(transform.translation.to_array());
        let instances = patch
            .instances
            .iter()
            .map(|i| {
                let mut i = *i;
                i.position = (glam::Vec3::from_array(i.position) + offset).to_array();
                i
            })
            .collect();
        b.commands.push(PatchCommand::Spawn {
            entity,
            species: id,
            species_data: data,
            instances,
        });
    }
}

/// Main world: a species asset removed goes from the render world too, once no patch uses it.
fn queue_species_removals(
    bridge: Res<Bridge>,
    mut main: ResMut<MainPatches>,
    mut events: MessageReader<AssetEvent<VegetationSpecies>>,
) {
    for e in events.read() {
        if let AssetEvent::Modified { id } | AssetEvent::Removed { id } = e {
            main.copies.remove(id);
        }
        if let AssetEvent::Removed { id } = e {
            // `MainPatches::sent` keeps the id: patches of it still move (the render world
            // keeps the species while they use it).
            bridge
                .lock()
                .commands
                .push(PatchCommand::ForgetSpecies(*id));
        }
    }
}

/// Main world: a changed [`VegetationCap`] goes to the render world.
fn queue_cap(bridge: Res<Bridge>, cap: Option<Res<VegetationCap>>) {
    if let Some(cap) = cap.filter(|c| c.is_changed()) {
        bridge.lock().cap = Some(cap.0);
    }
}

/// Main world: removed patches (and despawned entities) are retired.
fn queue_removals(
    bridge: Res<Bridge>,
    mut main: ResMut<MainPatches>,
    mut removed: RemovedComponents<VegetationPatch>,
    still: Query<(), With<VegetationPatch>>,
) {
    let mut b = bridge.lock();
    for e in removed.read() {
        if still.contains(e) {
            // Removed and inserted again since: its spawn (queued this frame) replaces it.
            continue;
        }
        main.waiting.remove(&e);
        b.commands.push(PatchCommand::Despawn(e));
    }
}

/// The render world's understory state.
struct RenderState {
    // Dropped in this order by `Drop`: the pending frame, the forest, then the device.
    pending: Option<HostFrame>,
    /// The view whose cull is in `pending`, until its draws are recorded.
    culled_view: Option<Entity>,
    forest: Option<Forest>,
    shared: Option<SharedDevice>,
    /// Each patch entity's patch and species.
    patches: HashMap<Entity, (PatchId, AssetId<VegetationSpecies>)>,
    /// Species whose assets were removed, unregistered once no patch uses them.
    forgetting: HashSet<AssetId<VegetationSpecies>>,
    species: HashMap<AssetId<VegetationSpecies>, SpeciesId>,
    errors: u64,
    frames: u64,
    /// The main world's bridge, for the exit report (set at the first system run).
    bridge: Option<Bridge>,
}

#[derive(Resource)]
struct RenderForest(Mutex<RenderState>);

impl RenderForest {
    fn lock(&self) -> std::sync::MutexGuard<'_, RenderState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl RenderState {
    fn new(shared: SharedDevice, settings: ForestSettings) -> Self {
        let forest = Forest::new(
            &shared,
            &ForestDesc {
                config: settings.config,
                color_format: bevy::render::render_resource::TextureFormat::Rgba8UnormSrgb,
                depth_format: bevy::render::render_resource::TextureFormat::Depth32Float,
                draw: DrawOptions {
                    reversed_depth: true,
                    ground: false,
                },
                ..Default::default()
            },
        );
        let forest = match forest {
            Ok(f) => Some(f),
            Err(e) => {
                log::error!("understory: the forest could not be made: {e}");
                None
            }
        };
        Self {
            pending: None,
            culled_view: None,
            forest,
            shared: Some(shared),
            patches: HashMap::new(),
            species: HashMap::new(),
            forgetting: HashSet::new(),
            errors: 0,
            frames: 0,
            bridge: None,
        }
    }

    fn error(&mut self, what: &str, e: &Error) {
        self.errors += 1;
        log::error!("understory: {what}: {e}");
    }

    fn apply(&mut self, commands: Vec<PatchCommand>) {
        for c in commands {
            let r = (|| -> Result<()> {
                let Some(forest) = self.forest.as_mut() else {
                    return Ok(());
                };
                match c {
                    PatchCommand::Despawn(entity) => {
                        if let Some((id, _)) = self.patches.remove(&entity) {
                            forest.vegetation_mut().despawn(id)?;
                        }
                    }
                    PatchCommand::ForgetSpecies(species) => {
                        self.forgetting.insert(species);
                    }
                    PatchCommand::Spawn {
                        entity,
                        species,
                        species_data,
                        instances,
                    } => {
                        if let Some((id, _)) = self.patches.remove(&entity) {
                            forest.vegetation_mut().despawn(id)?;
                        }
                        if instances.is_empty() {
                            return Ok(()); // an empty patch holds nothing
                        }
                        let sp = match (self.species.get(&species), species_data) {
                            (Some(s), _) => *s,
                            (None, None) => {
                                return Err(Error::Lifecycle(
                                    "a patch of a species whose asset was removed (and which no patch used since)".into(),
                                ));
                            }
                            (None, Some(species_data)) => {
                                if let Some(m) = &species_data.meshes {
                                    m.check().map_err(|e| {
                                        Error::InvalidInput(format!(
                                            "species {:?}: {e}",
                                            species_data.name
                                        ))
                                    })?;
                                }
                                let s = forest.vegetation_mut().register_species(&SpeciesDesc {
                                    name: &species_data.name,
                                    width: species_data.width,
                                    height: species_data.height,
                                    rgba8: &species_data.rgba8,
                                })?;
                                // The forest draws the billboards of the first atlas page.
                                let page = forest
                                    .vegetation()
                                    .species_regions()
                                    .get(s.index() as usize)
                                    .copied()
                                    .flatten()
                                    .map(|r| r.page);
                                if page != Some(0) {
                                    let _ = forest.vegetation_mut().unregister_species(s);
                                    return Err(Error::Unsupported(format!(
                                        "species {:?}: its billboard does not fit the first atlas page (page {page:?}); the plugin draws species of that page only (ForestSettings::config.atlas_page_px sets its size)",
                                        species_data.name
                                    )));
                                }
                                // A new species' id may be a forgotten one's: its own set, or 0.
                                let set = match &species_data.meshes {
                                    Some(m) => forest.add_meshes(m.clone()),
                                    None => Ok(0),
                                }
                                .and_then(|set| forest.set_species_meshes(s, set));
                                if let Err(e) = set {
                                    // Not registered after all: the next patch tries again.
                                    let _ = forest.vegetation_mut().unregister_species(s);
                                    return Err(e);
                                }
                                self.species.insert(species, s);
                                s
                            }
                        };
                        let id = forest.vegetation_mut().spawn(&PatchDesc {
                            species: sp,
                            instances: &instances,
                        })?;
                        self.patches.insert(entity, (id, species));
                    }
                }
                Ok(())
            })();
            if let Err(e) = r {
                self.error("a patch change", &e);
            }
        }
        self.forget_species();
    }

    /// Unregisters the species whose assets were removed, once no patch uses them (their
    /// atlas space and id are free again; a mesh set added for one stays, unused).
    fn forget_species(&mut self) {
        let Some(forest) = self.forest.as_mut() else {
            return;
        };
        let used: HashSet<AssetId<VegetationSpecies>> =
            self.patches.values().map(|(_, s)| *s).collect();
        let mut failed = Vec::new();
        self.forgetting.retain(|species| {
            if used.contains(species) {
                return true; // a patch still uses it: later
            }
            if let Some(s) = self.species.remove(species) {
                if let Err(e) = forest.vegetation_mut().unregister_species(s) {
                    failed.push(e);
                }
            }
            false
        });
        for e in failed {
            self.error("forgetting a species", &e);
        }
    }

    /// The numbers for the main world; `drew`: a vegetation frame was recorded this frame
    /// (else nothing is drawn now, whatever the last completed frame drew).
    fn budget(&mut self, drew: bool) -> Option<VramBudget> {
        let (shared, forest) = (self.shared.as_ref()?, self.forest.as_mut()?);
        let drawn = forest
            .last_drawn()
            .filter(|_| drew)
            .map_or([0; 3], |(_, d)| d);
        let b = shared.budget().ok()?;
        let h = b.heap()?;
        let stats = forest.vegetation().stats();
        Some(VramBudget {
            device: b.device.clone(),
            source: h.budget.source.to_string(),
            heap_budget: h.budget.budget,
            heap_usage: h.budget.usage,
            foreign: h.foreign,
            wgpu_reserved: b.wgpu_reserved.unwrap_or(0),
            held: stats.held,
            budget: stats.budget,
            quality: stats.quality,
            pending_free_bytes: stats
                .memory
                .categories
                .iter()
                .map(|(_, c)| c.pending_bytes)
                .sum(),
            patches: stats.patches,
            lod_instances: [
                stats.lod_instances.full,
                stats.lod_instances.medium,
                stats.lod_instances.billboard,
            ],
            drawn,
            frames: self.frames,
            errors: self.errors,
        })
    }
}

impl Drop for RenderState {
    fn drop(&mut self) {
        // Bevy drops its render world: announce the last frame, drop the forest (its
        // resources retire at their last frames), then wait, drain and report.
        let mut report = ExitReport::default();
        if let (Some(shared), Some(pending)) = (self.shared.as_ref(), self.pending.take()) {
            if let Err(e) = shared.host_submitted(pending) {
                log::error!("understory: the last frame: {e}");
            }
        }
        drop(self.forest.take());
        if let Some(shared) = self.shared.take() {
            let log = shared.message_log();
            match shared.shutdown() {
                Ok(r) => {
                    report.drained = r.drained;
                    report.leaks = r.leaks.iter().map(|l| l.name.clone()).collect();
                }
                Err(e) => report.error = Some(e.to_string()),
            }
            report.messages = log.read();
        }
        log::info!(
            "understory: exit: {} drained, {} leaks, {} validation messages, {} wgpu errors",
            report.drained,
            report.leaks.len(),
            report.messages.layer,
            report.messages.wgpu
        );
        if let Some(b) = &self.bridge {
            b.lock().exit = Some(report);
        }
    }
}

/// Render world: the queued patch changes reach the vegetation.
fn apply_patches(bridge: Res<Bridge>, forest: Res<RenderForest>) {
    let (commands, cap) = {
        let mut b = bridge.lock();
        (std::mem::take(&mut b.commands), b.cap.take())
    };
    let mut state = forest.lock();
    if state.bridge.is_none() {
        state.bridge = Some(bridge.clone());
    }
    if let Some(cap) = cap {
        let r = state
            .forest
            .as_mut()
            .map(|f| f.vegetation_mut().set_budget_cap(cap));
        if let Some(Err(e)) = r {
            state.error("the vegetation cap", &e);
        }
    }
    state.apply(commands);
}

/// The camera's views of the vegetation camera, as `Core3d`'s systems see them.
type VegetationView = (
    &'static ExtractedView,
    &'static ViewTarget,
    &'static ViewDepthTexture,
    &'static VegetationCamera,
);

/// Render world, `Core3d`, [`UnderstorySystems::Cull`]: for the first vegetation camera of the
/// frame, the budget controller, residency, uploads and the GPU cull, as command buffers in
/// Bevy's submission. The frame stays open for [`draw_vegetation`].
fn cull_vegetation(
    view: ViewQuery<VegetationView>,
    forest: Res<RenderForest>,
    mut ctx: RenderContext,
) {
    let entity = view.entity();
    let (extracted, _, _, _) = view.into_inner();
    let mut guard = forest.lock();
    let state = &mut *guard;
    if state.pending.is_some() {
        // Another vegetation camera culled this frame already.
        return;
    }
    let (Some(shared), Some(forest)) = (state.shared.as_ref(), state.forest.as_mut()) else {
        return;
    };
    if forest.vegetation().atlas_page(0).is_none() {
        return; // no species yet
    }
    let clip_from_world = extracted.clip_from_world.unwrap_or_else(|| {
        extracted.clip_from_view * extracted.world_from_view.to_matrix().inverse()
    });
    let to_glam = |m: Mat4| glam::Mat4::from_cols_array(&m.to_cols_array());
    // Bevy's clip space has y up; understory draws with Vulkan's (y down).
    let flip = glam::Mat4::from_scale(glam::Vec3::new(1.0, -1.0, 1.0));
    let eye = glam::Vec3::from_array(extracted.world_from_view.translation().to_array());
    let fog_m = forest.vegetation().config().lod.billboard_m * 1.15;
    let view = ForestView {
        eye,
        view_proj: flip * to_glam(clip_from_world),
        fog_m,
    };
    let result = (|| -> Result<(Vec<understory_wgpu::wgpu::CommandBuffer>, HostFrame)> {
        let mut frame = shared.begin_frame()?;
        // SAFETY: the args buffer is the forest's own; nothing destroys it.
        unsafe { forest.cull(&mut frame, &view) }?;
        // SAFETY: the command buffers go to Bevy's pending list right below, which Bevy
        // submits in this frame's render schedule, before those of `draw_vegetation` (system
        // order); `announce_frame` (in RenderSystems::Cleanup, after that submit) hands the
        // last HostFrame of the frame back.
        unsafe { shared.finish(frame) }
    })();
    match result {
        Ok((cmds, host)) => {
            for c in cmds {
                ctx.add_command_buffer(c);
            }
            state.pending = Some(host);
            state.culled_view = Some(entity);
            state.frames += 1;
        }
        Err(e) => state.error("the vegetation cull", &e),
    }
}

/// Render world, `Core3d`, [`UnderstorySystems::Draw`]: the draws of what
/// [`cull_vegetation`] kept, into the camera's main and depth textures, as command buffers in
/// Bevy's submission after the cull's.
fn draw_vegetation(
    view: ViewQuery<VegetationView>,
    forest: Res<RenderForest>,
    mut ctx: RenderContext,
) {
    let entity = view.entity();
    let (_, target, depth, _) = view.into_inner();
    let mut guard = forest.lock();
    let state = &mut *guard;
    if state.culled_view != Some(entity) {
        return; // another camera's frame, or nothing culled
    }
    state.culled_view = None;
    let (Some(shared), Some(forest), Some(host)) = (
        state.shared.as_ref(),
        state.forest.as_mut(),
        state.pending.take(),
    ) else {
        return;
    };
    let result = (|| -> Result<(Vec<understory_wgpu::wgpu::CommandBuffer>, HostFrame)> {
        // A failure below drops the resumed frame: it is announced at the next begin_frame
        // (its cull's command buffers are Bevy's to submit), never dropped.
        let mut frame = shared.resume(host)?;
        // SAFETY: Bevy destroys a view's textures only when the view goes away, outside
        // this system and after the frame's submission, never from another thread during it.
        unsafe { forest.draw(&mut frame, target.main_texture(), &depth.texture) }?;
        // SAFETY: as in `cull_vegetation`: Bevy submits these after the cull's, and
        // `announce_frame` hands the HostFrame back after that submit.
        unsafe { shared.finish(frame) }
    })();
    match result {
        Ok((cmds, host)) => {
            for c in cmds {
                ctx.add_command_buffer(c);
            }
            state.pending = Some(host);
        }
        Err(e) => state.error("the vegetation draws", &e),
    }
}

/// Render world, after Bevy's submit: announce the frame, publish the budget.
fn announce_frame(bridge: Res<Bridge>, forest: Res<RenderForest>) {
    let mut state = forest.lock();
    state.culled_view = None;
    let drew = state.pending.is_some();
    if let Some(pending) = state.pending.take() {
        let r = state.shared.as_ref().map(|s| s.host_submitted(pending));
        if let Some(Err(e)) = r {
            state.error("announcing the frame", &e);
        }
    }
    if let Some(b) = state.budget(drew) {
        bridge.lock().budget = b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bevy::asset::RenderAssetUsages;
    use bevy::mesh::{Indices, PrimitiveTopology};

    #[test]
    fn tree_mesh_merges_parts_with_their_colour_and_tint() {
        let trunk = Cylinder::new(0.05, 0.4).mesh().resolution(6).build();
        let crown = Sphere::new(0.3).mesh().ico(1).expect("icosphere");
        let (nt, nc) = (trunk.count_vertices(), crown.count_vertices());
        let m = tree_mesh(&[
            TreePart {
                mesh: &trunk,
                color: Color::linear_rgb(0.4, 0.2, 0.1),
                tint: 0.0,
            },
            TreePart {
                mesh: &crown,
                color: Color::WHITE,
                tint: 1.0,
            },
        ])
        .expect("mesh");
        assert_eq!(m.vertices.len(), nt + nc);
        let ti = trunk.indices().expect("indexed").len();
        assert_eq!(
            m.indices.len(),
            ti + crown.indices().expect("indexed").len()
        );
        // The crown's indices point past the trunk's vertices.
        assert!(m.indices[ti..].iter().all(|&i| i as usize >= nt));
        assert_eq!(m.vertices[0].color, [102, 51, 26, 0]);
        assert_eq!(m.vertices[nt].color, [255, 255, 255, 255]);
        TreeMeshes {
            full: m.clone(),
            medium: m,
        }
        .check()
        .expect("a valid LOD");
    }

    #[test]
    fn scatter_follows_the_density_and_refuses_nonsense() {
        let density = Density {
            size_m: Vec2::new(30.0, 20.0),
            trees_per_hectare: 500.0,
            scale: (8.0, 12.0),
            tint: Color::srgb(0.2, 0.5, 0.25),
            seed: 7,
        };
        let p = VegetationPatch::scatter(Handle::default(), &density).expect("scatter");
        // 600 m² at 500 per hectare.
        assert_eq!(p.instances.len(), 30);
        for i in p.instances.iter() {
            let [x, y, z] = i.position;
            assert!((0.0..30.0).contains(&x) && y == 0.0 && (0.0..20.0).contains(&z));
            assert!((8.0..=12.0).contains(&i.scale) && i.is_finite());
        }
        let again = VegetationPatch::scatter(Handle::default(), &density).expect("scatter");
        assert_eq!(
            p.instances, again.instances,
            "the same seed, the same trees"
        );
        let other = VegetationPatch::scatter(Handle::default(), &Density { seed: 8, ..density })
            .expect("scatter");
        assert_ne!(p.instances, other.instances);
        for bad in [
            Density {
                size_m: Vec2::new(f32::NAN, 1.0),
                ..density
            },
            Density {
                trees_per_hectare: -1.0,
                ..density
            },
            Density {
                scale: (12.0, 8.0),
                ..density
            },
            Density {
                size_m: Vec2::new(1000.0, 1000.0),
                trees_per_hectare: 1000.0,
                ..density
            },
        ] {
            assert!(
                matches!(
                    VegetationPatch::scatter(Handle::default(), &bad),
                    Err(Error::InvalidInput(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn tree_mesh_refuses_what_it_cannot_draw() {
        let lines = Mesh::new(PrimitiveTopology::LineList, RenderAssetUsages::default())
            .with_inserted_attribute(Mesh::ATTRIBUTE_POSITION, vec![[0.0f32; 3]; 2])
            .with_inserted_attribute(Mesh::ATTRIBUTE_NORMAL, vec![[0.0f32, 1.0, 0.0]; 2]);
        let no_normals = Mesh::new(
            PrimitiveTopology::TriangleList,
            RenderAssetUsages::default(),
        )
        .with_inserted_attribute(Mesh::ATTRIBUTE_POSITION, vec![[0.0f32; 3]; 3]);
        let bad_index = Mesh::new(
            PrimitiveTopology::TriangleList,
            RenderAssetUsages::default(),
        )
        .with_inserted_attribute(Mesh::ATTRIBUTE_POSITION, vec![[0.0f32; 3]; 3])
        .with_inserted_attribute(Mesh::ATTRIBUTE_NORMAL, vec![[0.0f32, 1.0, 0.0]; 3])
        .with_inserted_indices(Indices::U16(vec![0, 1, 3]));
        let sphere = Sphere::new(0.3).mesh().ico(0).expect("icosphere");
        let part = |mesh, tint| TreePart {
            mesh,
            color: Color::WHITE,
            tint,
        };
        for (what, parts) in [
            ("no parts", vec![]),
            ("lines", vec![part(&lines, 1.0)]),
            ("no normals", vec![part(&no_normals, 1.0)]),
            ("index past the vertices", vec![part(&bad_index, 1.0)]),
            ("tint 2", vec![part(&sphere, 2.0)]),
        ] {
            assert!(
                matches!(tree_mesh(&parts), Err(Error::InvalidInput(_))),
                "{what}"
            );
        }
    }
}
