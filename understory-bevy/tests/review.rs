//! Adversarial review of `understory-bevy` through its public API and docs only: small headless
//! Bevy apps on lavapipe under the Khronos layer (synchronization validation, as
//! `tests/common` sets it up), each stepped frame by frame with `App::update`, poking at the
//! plugin between frames (odd species, odd patches, odd cameras, budget caps, exits), and
//! checking what the docs promise: refusals logged and counted in `VramBudget::errors`, patches
//! that follow their entities, what is drawn (screenshots and `VramBudget::drawn`), and a clean
//! `ExitReport` (no leaks, no layer or wgpu messages).
//!
//! Every test runs in a child process of this binary (Bevy's logger and task pools are
//! process-wide, and a driver crash then fails one test alone).
//!
//! Eight of these showed bugs when written (a species asset arriving late never used, a patch
//! removed and inserted in one frame lost, a species off the first atlas page stopping the
//! forest, species never unregistered, an empty patch counted as an error, no exit report
//! before the first frame, `VramBudget::drawn` stale without a vegetation camera, a patch of
//! a removed species asset no longer following its entity); they pass since the fixes.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bevy::app::PluginsState;
use bevy::asset::RenderAssetUsages;
use bevy::camera::{Hdr, RenderTarget, Viewport};
use bevy::core_pipeline::tonemapping::Tonemapping;
use bevy::mesh::{Indices, PrimitiveTopology};
use bevy::prelude::*;
use bevy::render::RenderPlugin;
use bevy::render::render_resource::TextureFormat;
use bevy::render::view::Msaa;
use bevy::render::view::screenshot::{Screenshot, ScreenshotCaptured};
use bevy::window::{ExitCondition, WindowPlugin};
use understory::Error;
use understory::gpu::draw::tree_billboard;
use understory::vegetation::VegetationConfig;
use understory_bevy::{
    Density, ExitHandle, ExitReport, ForestSettings, TreeMeshes, TreePart, UnderstoryPlugin,
    VegetationCamera, VegetationCap, VegetationPatch, VegetationSpecies, VramBudget, tree_mesh,
};

// ---------------------------------------------------------------------------------------------
// A headless app stepped by hand.

const W: u32 = 160;
const H: u32 = 90;
/// The clear colour (the demo's sky, which understory's fog also fades to).
const SKY: [f32; 3] = [0.62, 0.74, 0.86];

/// The demo's world (origin -1024 m, 2,048 m, leaf tiles of 128 m, a 512 px atlas page).
fn config() -> VegetationConfig {
    let mut c = understory_cli::demo::world_config();
    c.stats_log_interval = Duration::from_secs(3600);
    c
}

struct Harness {
    app: App,
    exit: ExitHandle,
}

impl Harness {
    fn new(test: &str) -> Option<Self> {
        Self::with_config(test, config())
    }

    fn with_config(test: &str, config: VegetationConfig) -> Option<Self> {
        let probe = common::context(test)?;
        drop(probe);
        let desc = understory_wgpu::SharedDeviceDesc {
            context: understory::gpu::context::ContextOptions {
                device: None,
                ..common::options()
            },
            ..Default::default()
        };
        let (plugin, render_creation) =
            UnderstoryPlugin::new(&desc, ForestSettings { config }).expect("the plugin");
        let exit = plugin.exit();
        let mut app = App::new();
        app.add_plugins(
            DefaultPlugins
                .set(WindowPlugin {
                    primary_window: None,
                    exit_condition: ExitCondition::DontExit,
                    ..default()
                })
                .set(RenderPlugin {
                    render_creation,
                    synchronous_pipeline_compilation: true,
                    ..default()
                }),
        )
        .add_plugins(plugin)
        .insert_resource(ClearColor(Color::srgb(SKY[0], SKY[1], SKY[2])));
        while app.plugins_state() == PluginsState::Adding {
            bevy::tasks::tick_global_task_pools_on_main_thread();
        }
        app.finish();
        app.cleanup();
        Some(Self { app, exit })
    }

    fn world(&mut self) -> &mut World {
        self.app.world_mut()
    }

    fn frames(&mut self, n: u32) {
        for _ in 0..n {
            self.app.update();
        }
    }

    /// The budget as of the latest rendered frame.
    fn budget(&self) -> VramBudget {
        self.exit.budget()
    }

    /// A camera rendering into its own `W × H` image, looking at the groves below.
    fn camera(&mut self, order: isize, vegetation: bool) -> (Entity, Handle<Image>) {
        let image = Image::new_target_texture(W, H, TextureFormat::Rgba8UnormSrgb, None);
        let handle = self.world().resource_mut::<Assets<Image>>().add(image);
        let mut e = self.world().spawn((
            Camera3d::default(),
            Camera { order, ..default() },
            RenderTarget::Image(handle.clone().into()),
            Msaa::Off,
            Tonemapping::None,
            Projection::Perspective(PerspectiveProjection {
                fov: 60f32.to_radians(),
                near: 0.5,
                ..default()
            }),
            Transform::from_xyz(60.0, 45.0, -70.0).looking_at(Vec3::new(60.0, 0.0, 60.0), Vec3::Y),
        ));
        if vegetation {
            e.insert(VegetationCamera);
        }
        (e.id(), handle)
    }

    fn species(&mut self, s: VegetationSpecies) -> Handle<VegetationSpecies> {
        self.world()
            .resource_mut::<Assets<VegetationSpecies>>()
            .add(s)
    }

    /// A grove of `species` (100 × 100 m from `at`, `trees` trees).
    fn grove(&mut self, species: &Handle<VegetationSpecies>, at: Vec3, trees: f32) -> Entity {
        let patch = grove(species.clone(), trees, 1);
        self.world()
            .spawn((patch, Transform::from_translation(at)))
            .id()
    }

    /// The image's RGBA8 bytes, after a screenshot.
    fn shot(&mut self, image: &Handle<Image>) -> Vec<u8> {
        let out: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let o = out.clone();
        self.world()
            .spawn(Screenshot::image(image.clone()))
            .observe(move |ev: On<ScreenshotCaptured>| {
                *o.lock().unwrap_or_else(|p| p.into_inner()) = ev.image.data.clone();
            });
        for _ in 0..30 {
            self.app.update();
            if let Some(d) = out.lock().unwrap_or_else(|p| p.into_inner()).take() {
                assert_eq!(d.len(), (W * H * 4) as usize, "an RGBA8 {W}x{H} screenshot");
                return d;
            }
        }
        panic!("no screenshot after 30 frames");
    }

    /// Drops the app (and with it Bevy's render world) and returns the exit report.
    fn finish(self) -> ExitReport {
        let exit = self.exit.clone();
        drop(self.app);
        exit.report()
            .expect("the plugin reports once the render world is gone")
    }
}

fn grove(species: Handle<VegetationSpecies>, trees: f32, seed: u64) -> VegetationPatch {
    VegetationPatch::scatter(
        species,
        &Density {
            size_m: Vec2::splat(100.0),
            trees_per_hectare: trees,
            scale: (8.0, 12.0),
            tint: Color::srgb(0.2, 0.5, 0.25),
            seed,
        },
    )
    .expect("scatter")
}

/// A species drawn with understory's conifer.
fn conifer(name: &str, seed: u32) -> VegetationSpecies {
    VegetationSpecies {
        name: name.into(),
        width: 64,
        height: 128,
        rgba8: tree_billboard(64, 128, seed),
        meshes: None,
    }
}

/// A small valid LOD from Bevy primitives (a trunk and a crown).
fn small_lod() -> understory::gpu::draw::Mesh {
    let trunk = Cylinder::new(0.04, 0.5)
        .mesh()
        .resolution(4)
        .build()
        .translated_by(Vec3::Y * 0.25);
    let crown = Sphere::new(0.3)
        .mesh()
        .ico(0)
        .expect("icosphere")
        .translated_by(Vec3::Y * 0.65);
    tree_mesh(&[
        TreePart {
            mesh: &trunk,
            color: Color::linear_rgb(0.36, 0.24, 0.15),
            tint: 0.0,
        },
        TreePart {
            mesh: &crown,
            color: Color::WHITE,
            tint: 1.0,
        },
    ])
    .expect("a valid tree mesh")
}

fn broadleaf(name: &str) -> VegetationSpecies {
    VegetationSpecies {
        meshes: Some(TreeMeshes {
            full: small_lod(),
            medium: small_lod(),
        }),
        ..conifer(name, 2)
    }
}

/// Pixels of columns `xs` that differ from the sky.
fn non_sky(data: &[u8], xs: std::ops::Range<u32>) -> u64 {
    let sky = SKY.map(|c| (c * 255.0).round() as u8);
    data.chunks(4)
        .enumerate()
        .filter(|(i, p)| {
            xs.contains(&((*i as u32) % W))
                && p[..3].iter().zip(&sky).any(|(a, b)| a.abs_diff(*b) > 8)
        })
        .count() as u64
}

fn assert_clean(r: &ExitReport) {
    assert!(r.error.is_none(), "shutdown failed: {:?}", r.error);
    assert!(r.leaks.is_empty(), "leaks at exit: {:?}", r.leaks);
    assert_eq!(
        r.messages.layer + r.messages.wgpu,
        0,
        "validation messages: {:?}",
        r.messages.texts
    );
}

fn drawn(b: &VramBudget) -> u64 {
    b.drawn.iter().sum()
}

// ---------------------------------------------------------------------------------------------
// Species.

#[test]
fn invalid_species_stay_unregistered_counted_and_a_valid_one_still_draws() {
    let test = "invalid_species_stay_unregistered_counted_and_a_valid_one_still_draws";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    let (_, image) = h.camera(0, true);
    let mut past = small_lod();
    past.indices.extend([0, 1, 9_999]);
    let mut ragged = small_lod();
    ragged.indices.push(0); // not whole triangles
    let bad = [
        VegetationSpecies {
            meshes: Some(TreeMeshes {
                full: understory::gpu::draw::Mesh::default(),
                medium: small_lod(),
            }),
            ..conifer("empty full mesh", 1)
        },
        VegetationSpecies {
            meshes: Some(TreeMeshes {
                full: small_lod(),
                medium: past,
            }),
            ..conifer("index past the vertices", 1)
        },
        VegetationSpecies {
            meshes: Some(TreeMeshes {
                full: ragged,
                medium: small_lod(),
            }),
            ..conifer("ragged", 1)
        },
        VegetationSpecies {
            rgba8: vec![0; 12],
            ..conifer("short billboard", 1)
        },
        VegetationSpecies {
            width: 0,
            height: 0,
            rgba8: Vec::new(),
            ..conifer("no billboard", 1)
        },
        VegetationSpecies {
            width: 1024,
            height: 1024,
            rgba8: vec![255; 1024 * 1024 * 4],
            ..conifer("larger than the atlas page", 1)
        },
    ];
    let handles: Vec<_> = bad.into_iter().map(|s| h.species(s)).collect();
    for (k, s) in handles.iter().enumerate() {
        h.grove(s, Vec3::new(10.0 + 128.0 * k as f32, 0.0, 10.0), 200.0);
    }
    h.frames(4);
    let b = h.budget();
    assert_eq!(b.patches, 0, "no patch of a refused species: {b:?}");
    assert_eq!(
        b.errors,
        handles.len() as u64,
        "one counted error per refusal"
    );
    assert_eq!(b.frames, 0, "nothing to cull without a species");
    // A later patch of a refused species is refused again (and counted), not half-registered.
    h.grove(&handles[0], Vec3::new(10.0, 0.0, 138.0), 200.0);
    h.frames(2);
    assert_eq!(h.budget().errors, handles.len() as u64 + 1);
    // Valid species still work: a broadleaf of Bevy meshes and a conifer.
    let leaf = h.species(broadleaf("broadleaf"));
    let pine = h.species(conifer("pine", 3));
    h.grove(&leaf, Vec3::new(10.0, 0.0, 10.0), 300.0);
    h.grove(&pine, Vec3::new(10.0, 0.0, -110.0), 300.0);
    h.frames(8);
    let b = h.budget();
    assert_eq!(b.patches, 2, "{b:?}");
    assert_eq!(b.errors, handles.len() as u64 + 1, "no new error: {b:?}");
    assert!(drawn(&b) > 0, "{b:?}");
    let pixels = h.shot(&image);
    assert!(non_sky(&pixels, 0..W) > 200, "trees in the image");
    assert_clean(&h.finish());
}

#[test]
fn tree_mesh_takes_odd_bevy_meshes() {
    let tri = |indices: Option<Indices>, colors: Option<Vec<[f32; 4]>>| {
        let mut m = Mesh::new(
            PrimitiveTopology::TriangleList,
            RenderAssetUsages::default(),
        )
        .with_inserted_attribute(
            Mesh::ATTRIBUTE_POSITION,
            vec![[0.0f32, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 1.0, 0.0]],
        )
        .with_inserted_attribute(Mesh::ATTRIBUTE_NORMAL, vec![[0.0f32, 0.0, 1.0]; 3]);
        if let Some(c) = colors {
            m.insert_attribute(Mesh::ATTRIBUTE_COLOR, c);
        }
        if let Some(i) = indices {
            m.insert_indices(i);
        }
        m
    };
    let part = |mesh, color, tint| TreePart { mesh, color, tint };
    // No indices: the vertices in order.
    let plain = tri(None, None);
    let m = tree_mesh(&[part(&plain, Color::WHITE, 1.0)]).expect("no indices");
    assert_eq!(m.indices, [0, 1, 2]);
    // U16 indices, a second part's offset past the first part's vertices.
    let u16s = tri(Some(Indices::U16(vec![2, 1, 0])), None);
    let m = tree_mesh(&[
        part(&plain, Color::WHITE, 1.0),
        part(&u16s, Color::BLACK, 0.0),
    ])
    .expect("U16 indices");
    assert_eq!(m.indices, [0, 1, 2, 5, 4, 3]);
    assert_eq!(m.vertices[3].color, [0, 0, 0, 0]);
    // Vertex colours multiply the part's colour (linear); out-of-range colours clamp.
    let coloured = tri(
        Some(Indices::U32(vec![0, 1, 2])),
        Some(vec![[0.5, 1.0, 0.0, 1.0], [2.0, 2.0, 2.0, 1.0], [1.0; 4]]),
    );
    let m = tree_mesh(&[part(&coloured, Color::linear_rgb(1.0, 0.5, 1.0), 0.5)]).expect("colours");
    assert_eq!(m.vertices[0].color, [128, 128, 0, 128]);
    assert_eq!(m.vertices[1].color, [255, 255, 255, 128]);
    TreeMeshes {
        full: m.clone(),
        medium: m,
    }
    .check()
    .expect("a valid LOD");
    // A NaN tint, an index past the vertices: typed errors.
    assert!(matches!(
        tree_mesh(&[part(&plain, Color::WHITE, f32::NAN)]),
        Err(Error::InvalidInput(_))
    ));
    let past = tri(Some(Indices::U16(vec![0, 1, 3])), None);
    assert!(matches!(
        tree_mesh(&[part(&past, Color::WHITE, 1.0)]),
        Err(Error::InvalidInput(_))
    ));
    // What tree_mesh lets through, TreeMeshes::check refuses (the plugin then counts it).
    let ragged = tri(Some(Indices::U16(vec![0, 1, 2, 0])), None);
    let empty = Mesh::new(
        PrimitiveTopology::TriangleList,
        RenderAssetUsages::default(),
    )
    .with_inserted_attribute(Mesh::ATTRIBUTE_POSITION, Vec::<[f32; 3]>::new())
    .with_inserted_attribute(Mesh::ATTRIBUTE_NORMAL, Vec::<[f32; 3]>::new());
    let far = plain
        .clone()
        .with_inserted_attribute(Mesh::ATTRIBUTE_POSITION, vec![[f32::NAN; 3]; 3]);
    for (what, mesh) in [("ragged", &ragged), ("empty", &empty), ("NaN", &far)] {
        let m = tree_mesh(&[part(mesh, Color::WHITE, 1.0)]).expect(what);
        assert!(
            TreeMeshes {
                full: m.clone(),
                medium: m,
            }
            .check()
            .is_err(),
            "{what}"
        );
    }
}

/// A species asset that is not there yet when its patch is spawned (a handle reserved now,
/// the asset inserted later: how a loaded asset arrives) is spawned once the asset arrives.
#[test]
fn a_patch_whose_species_arrives_later_is_spawned_then() {
    let test = "a_patch_whose_species_arrives_later_is_spawned_then";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    h.camera(0, true);
    let pine = h.species(conifer("pine", 1));
    h.grove(&pine, Vec3::new(10.0, 0.0, -110.0), 100.0);
    let later = h
        .world()
        .resource::<Assets<VegetationSpecies>>()
        .reserve_handle();
    h.grove(&later, Vec3::new(10.0, 0.0, 10.0), 100.0);
    h.frames(3);
    assert_eq!(h.budget().patches, 1, "the loaded species' patch only");
    h.world()
        .resource_mut::<Assets<VegetationSpecies>>()
        .insert(later.id(), conifer("late", 2))
        .expect("insert");
    h.frames(5);
    let b = h.budget();
    let report = h.finish();
    assert_clean(&report);
    assert_eq!(b.errors, 0, "{b:?}");
    assert_eq!(
        b.patches, 2,
        "the late species' patch is spawned once its asset arrives: {b:?}"
    );
}

/// Species made and dropped over time (each asset removed once no patch uses it) must not use
/// up understory's species slots, atlas or mesh sets: the current one still draws.
#[test]
fn species_that_come_and_go_do_not_use_up_the_atlas() {
    let test = "species_that_come_and_go_do_not_use_up_the_atlas";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    let (_, image) = h.camera(0, true);
    let mut live: Option<(Entity, Handle<VegetationSpecies>)> = None;
    for k in 0..40u32 {
        if let Some((e, s)) = live.take() {
            h.world().despawn(e);
            h.world()
                .resource_mut::<Assets<VegetationSpecies>>()
                .remove(&s);
        }
        let s = h.species(conifer(&format!("species {k}"), k + 1));
        let e = h.grove(&s, Vec3::new(10.0, 0.0, 10.0), 100.0);
        live = Some((e, s));
        h.frames(1);
    }
    h.frames(6);
    let b = h.budget();
    let pixels = h.shot(&image);
    let report = h.finish();
    assert_clean(&report);
    assert_eq!(b.patches, 1, "{b:?}");
    assert_eq!(b.errors, 0, "{b:?}");
    assert!(
        non_sky(&pixels, 0..W) > 100,
        "the last species' grove is drawn"
    );
}

/// A species whose billboard does not fit the first atlas page lands on another page (the docs:
/// species share one page). That species may be refused, but the others must keep drawing.
#[test]
fn a_species_off_the_first_atlas_page_spoils_only_itself() {
    let test = "a_species_off_the_first_atlas_page_spoils_only_itself";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    let (_, image) = h.camera(0, true);
    let pine = h.species(conifer("pine", 1));
    h.grove(&pine, Vec3::new(10.0, 0.0, 10.0), 300.0);
    h.frames(6);
    let before = h.budget();
    assert!(drawn(&before) > 0, "{before:?}");
    // 400 × 400 fits an empty 512 px page, but not the first one beside the pine.
    let big = h.species(VegetationSpecies {
        width: 400,
        height: 400,
        rgba8: vec![200; 400 * 400 * 4],
        ..conifer("big billboard", 2)
    });
    h.grove(&big, Vec3::new(10.0, 0.0, -110.0), 100.0);
    h.frames(8);
    let after = h.budget();
    let pixels = h.shot(&image);
    let report = h.finish();
    assert_clean(&report);
    assert!(
        after.frames >= before.frames + 8,
        "the forest is still culled every frame: {before:?} -> {after:?}"
    );
    assert!(
        after.errors <= 1,
        "at most the big species refused once: {after:?}"
    );
    assert!(
        non_sky(&pixels, 0..W) > 100,
        "the pine grove is still drawn"
    );
}

// ---------------------------------------------------------------------------------------------
// Patches.

#[test]
fn scatter_at_its_edges() {
    let density = Density {
        size_m: Vec2::splat(128.0),
        trees_per_hectare: 40_000.0,
        scale: (1.0, 2.0),
        tint: Color::WHITE,
        seed: 3,
    };
    let full = VegetationPatch::scatter(Handle::default(), &density).expect("65,536 trees");
    assert_eq!(full.instances.len(), 65_536);
    assert!(
        full.instances
            .iter()
            .all(|i| i.position[0] < 128.0 && i.position[2] < 128.0)
    );
    let over = Density {
        trees_per_hectare: 40_001.0,
        ..density
    };
    assert!(matches!(
        VegetationPatch::scatter(Handle::default(), &over),
        Err(Error::InvalidInput(_))
    ));
    let none = Density {
        trees_per_hectare: 0.0,
        size_m: Vec2::splat(1e20),
        ..density
    };
    assert_eq!(
        VegetationPatch::scatter(Handle::default(), &none)
            .expect("no trees")
            .instances
            .len(),
        0
    );
    for bad in [
        Density {
            size_m: Vec2::new(f32::INFINITY, 1.0),
            ..density
        },
        Density {
            size_m: Vec2::new(0.0, 1.0),
            ..density
        },
        Density {
            trees_per_hectare: f32::NAN,
            ..density
        },
        Density {
            scale: (0.0, 1.0),
            ..density
        },
        Density {
            scale: (1.0, f32::INFINITY),
            ..density
        },
        // 1e38 m² at one tree per hectare: far past 65,536, and no overflow on the way.
        Density {
            size_m: Vec2::splat(1e19),
            trees_per_hectare: 1.0,
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

/// Patches the render world must refuse (across a tile boundary, outside the world, NaN
/// positions) are logged and counted; a full 65,536-tree patch is taken; valid ones draw.
#[test]
fn refused_patches_are_counted_and_a_full_patch_is_taken() {
    let test = "refused_patches_are_counted_and_a_full_patch_is_taken";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    let (_, image) = h.camera(0, true);
    let pine = h.species(conifer("pine", 1));
    let full = VegetationPatch::scatter(
        pine.clone(),
        &Density {
            size_m: Vec2::splat(128.0),
            trees_per_hectare: 40_000.0,
            scale: (0.5, 1.0),
            tint: Color::srgb(0.3, 0.5, 0.2),
            seed: 9,
        },
    )
    .expect("65,536 trees");
    h.world().spawn((full, Transform::from_xyz(0.0, 0.0, 0.0)));
    let g = grove(pine.clone(), 100.0, 2);
    for at in [
        Vec3::new(100.0, 0.0, 100.0), // crosses the tile boundary at 128 m
        Vec3::splat(1e30),            // outside the world
        Vec3::new(f32::NAN, 0.0, 0.0),
        Vec3::new(f32::INFINITY, 0.0, 0.0),
        Vec3::new(-2000.0, 0.0, 10.0),
    ] {
        h.world()
            .spawn((g.clone(), Transform::from_translation(at)));
    }
    // Hand-made instances: a NaN scale, a zero scale.
    let mut odd = understory::world::instance::Instance::at(glam::Vec3::new(20.0, 0.0, 20.0));
    odd.scale = f32::NAN;
    let mut flat = odd;
    flat.scale = 0.0;
    for i in [odd, flat] {
        h.world().spawn(VegetationPatch {
            species: pine.clone(),
            instances: vec![i].into(),
        });
    }
    h.frames(6);
    let b = h.budget();
    assert_eq!(b.patches, 1, "only the full patch: {b:?}");
    assert_eq!(b.errors, 7, "every refusal counted once: {b:?}");
    assert!(drawn(&b) > 0, "{b:?}");
    assert!(non_sky(&h.shot(&image), 0..W) > 100);
    assert_clean(&h.finish());
}

/// `scatter` accepts a density of 0 trees per hectare (no refusal is documented for it); the
/// patch it gives should not be an error in the render world either.
#[test]
fn an_empty_patch_is_not_an_error() {
    let test = "an_empty_patch_is_not_an_error";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    h.camera(0, true);
    let pine = h.species(conifer("pine", 1));
    let e = h.grove(&pine, Vec3::new(10.0, 0.0, 10.0), 100.0);
    h.frames(4);
    assert_eq!(h.budget().patches, 1);
    // The density drops to nothing: the patch becomes empty.
    let empty = grove(pine.clone(), 0.0, 1);
    assert!(empty.instances.is_empty());
    h.world().entity_mut(e).insert(empty);
    h.frames(4);
    let b = h.budget();
    let report = h.finish();
    assert_clean(&report);
    assert_eq!(b.patches, 0, "the emptied patch holds nothing: {b:?}");
    assert_eq!(b.errors, 0, "an empty patch is no error: {b:?}");
}

/// A patch moved every frame, and one whose species changes, follow their entities: drawn
/// where the entity is, not drawn once it moved out of view; one patch per entity throughout.
#[test]
fn moving_patches_and_changing_species_follow_their_entities() {
    let test = "moving_patches_and_changing_species_follow_their_entities";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    let (_, image) = h.camera(0, true);
    let pine = h.species(conifer("pine", 1));
    let leaf = h.species(broadleaf("broadleaf"));
    // Behind the camera (in the tile [-256, -128) of z).
    let behind = Vec3::new(10.0, 0.0, -250.0);
    let e = h.grove(&pine, behind, 300.0);
    h.frames(6);
    let b = h.budget();
    assert_eq!((b.patches, drawn(&b)), (1, 0), "out of view: {b:?}");
    assert_eq!(non_sky(&h.shot(&image), 0..W), 0);
    // Into view, then a step each frame (still in its tile), the species flipping.
    for k in 0..12 {
        let mut ent = h.world().entity_mut(e);
        ent.get_mut::<Transform>().expect("transform").translation =
            Vec3::new(10.0 + k as f32, 0.0, 10.0);
        if k % 3 == 2 {
            let species = if k % 2 == 0 {
                pine.clone()
            } else {
                leaf.clone()
            };
            ent.get_mut::<VegetationPatch>().expect("patch").species = species;
        }
        h.frames(1);
        assert_eq!(h.budget().patches, 1);
    }
    h.frames(6);
    let b = h.budget();
    assert_eq!(b.patches, 1, "{b:?}");
    assert!(drawn(&b) > 0, "in view: {b:?}");
    assert!(non_sky(&h.shot(&image), 0..W) > 100);
    // Behind the camera again: nothing drawn, the moved-away copies retired.
    h.world()
        .entity_mut(e)
        .get_mut::<Transform>()
        .expect("transform")
        .translation = behind;
    h.frames(8);
    let b = h.budget();
    assert_eq!((b.patches, drawn(&b)), (1, 0), "out of view again: {b:?}");
    assert_eq!(non_sky(&h.shot(&image), 0..W), 0, "nothing left behind");
    assert_eq!(b.errors, 0);
    assert_clean(&h.finish());
}

/// Removing a patch and inserting a new one on the same entity between two frames (a rebuild)
/// leaves the entity with its new patch.
#[test]
fn a_patch_removed_and_inserted_again_in_one_frame_stays() {
    let test = "a_patch_removed_and_inserted_again_in_one_frame_stays";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    let (_, image) = h.camera(0, true);
    let pine = h.species(conifer("pine", 1));
    let e = h.grove(&pine, Vec3::new(10.0, 0.0, 10.0), 300.0);
    h.frames(4);
    assert_eq!(h.budget().patches, 1);
    let again = grove(pine.clone(), 300.0, 2);
    h.world()
        .entity_mut(e)
        .remove::<VegetationPatch>()
        .insert(again);
    h.frames(6);
    let b = h.budget();
    let pixels = h.shot(&image);
    let report = h.finish();
    assert_clean(&report);
    assert_eq!(b.patches, 1, "the entity's new patch: {b:?}");
    assert!(non_sky(&pixels, 0..W) > 100, "and it is drawn");
}

/// A patch changed to a refused species loses its old trees (counted), and comes back when
/// changed to a valid one again.
#[test]
fn a_patch_changed_to_a_refused_species_and_back() {
    let test = "a_patch_changed_to_a_refused_species_and_back";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    h.camera(0, true);
    let pine = h.species(conifer("pine", 1));
    let bad = h.species(VegetationSpecies {
        rgba8: Vec::new(),
        ..conifer("bad", 2)
    });
    let e = h.grove(&pine, Vec3::new(10.0, 0.0, 10.0), 300.0);
    h.frames(4);
    assert_eq!(h.budget().patches, 1);
    h.world()
        .entity_mut(e)
        .get_mut::<VegetationPatch>()
        .expect("patch")
        .species = bad;
    h.frames(4);
    let b = h.budget();
    assert_eq!((b.patches, b.errors), (0, 1), "{b:?}");
    h.world()
        .entity_mut(e)
        .get_mut::<VegetationPatch>()
        .expect("patch")
        .species = pine;
    h.frames(6);
    let b = h.budget();
    assert_eq!((b.patches, b.errors), (1, 1), "{b:?}");
    assert!(drawn(&b) > 0, "{b:?}");
    assert_clean(&h.finish());
}

#[test]
fn despawning_everything_then_spawning_again() {
    let test = "despawning_everything_then_spawning_again";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    let (_, image) = h.camera(0, true);
    let pine = h.species(conifer("pine", 1));
    let leaf = h.species(broadleaf("broadleaf"));
    let spots = [
        Vec3::new(10.0, 0.0, 10.0),
        Vec3::new(-118.0, 0.0, 10.0),
        Vec3::new(138.0, 0.0, 10.0),
        Vec3::new(10.0, 0.0, 138.0),
    ];
    let spawn_all = |h: &mut Harness| -> Vec<Entity> {
        spots
            .iter()
            .enumerate()
            .map(|(k, at)| h.grove(if k % 2 == 0 { &pine } else { &leaf }, *at, 500.0))
            .collect()
    };
    let es = spawn_all(&mut h);
    h.frames(6);
    let b = h.budget();
    assert_eq!(b.patches, 4);
    assert!(drawn(&b) > 0 && b.held > 0, "{b:?}");
    for e in es {
        h.world().despawn(e);
    }
    h.frames(8);
    let b = h.budget();
    assert_eq!((b.patches, drawn(&b)), (0, 0), "{b:?}");
    assert_eq!(b.lod_instances, [0; 3], "{b:?}");
    assert_eq!(b.pending_free_bytes, 0, "the frees ran: {b:?}");
    assert_eq!(non_sky(&h.shot(&image), 0..W), 0);
    spawn_all(&mut h);
    h.frames(6);
    let b = h.budget();
    assert_eq!(b.patches, 4);
    assert!(drawn(&b) > 0, "{b:?}");
    assert!(non_sky(&h.shot(&image), 0..W) > 100);
    assert_eq!(b.errors, 0);
    assert_clean(&h.finish());
}

// ---------------------------------------------------------------------------------------------
// Cameras.

/// Two cameras with `VegetationCamera` (only the first draws, per the docs) and one without.
#[test]
fn only_one_vegetation_camera_draws_and_a_plain_camera_none() {
    let test = "only_one_vegetation_camera_draws_and_a_plain_camera_none";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    let (_, a) = h.camera(0, true);
    let (_, b) = h.camera(1, true);
    let (_, c) = h.camera(2, false);
    let pine = h.species(conifer("pine", 1));
    h.grove(&pine, Vec3::new(10.0, 0.0, 10.0), 300.0);
    h.frames(6);
    let budget = h.budget();
    assert!(drawn(&budget) > 0, "{budget:?}");
    let frames = budget.frames;
    h.frames(4);
    assert!(
        h.budget().frames <= frames + 4 + 1,
        "one cull per frame, not one per camera"
    );
    let (pa, pb, pc) = (
        non_sky(&h.shot(&a), 0..W),
        non_sky(&h.shot(&b), 0..W),
        non_sky(&h.shot(&c), 0..W),
    );
    assert_eq!(pc, 0, "the plain camera shows no trees");
    assert!(
        (pa > 100) != (pb > 100) && pa.min(pb) == 0,
        "exactly one vegetation camera draws: {pa} and {pb} tree pixels"
    );
    assert_eq!(h.budget().errors, 0);
    assert_clean(&h.finish());
}

/// Removing `VegetationCamera` stops the drawing; the budget's `drawn` (what the GPU drew in
/// the latest completed frame) then says 0; inserting it again draws again.
#[test]
fn removing_the_vegetation_camera_stops_drawing_and_the_budget_says_so() {
    let test = "removing_the_vegetation_camera_stops_drawing_and_the_budget_says_so";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    let (cam, image) = h.camera(0, true);
    let pine = h.species(conifer("pine", 1));
    h.grove(&pine, Vec3::new(10.0, 0.0, 10.0), 300.0);
    h.frames(6);
    assert!(drawn(&h.budget()) > 0);
    h.world().entity_mut(cam).remove::<VegetationCamera>();
    h.frames(6);
    assert_eq!(non_sky(&h.shot(&image), 0..W), 0, "no trees drawn");
    h.world().entity_mut(cam).insert(VegetationCamera);
    h.frames(6);
    assert!(drawn(&h.budget()) > 0);
    assert!(non_sky(&h.shot(&image), 0..W) > 100, "drawn again");
    h.world().entity_mut(cam).remove::<VegetationCamera>();
    h.frames(8);
    let b = h.budget();
    let diag = h
        .world()
        .resource::<bevy::diagnostic::DiagnosticsStore>()
        .get(&understory_bevy::LOD_INSTANCES[2])
        .and_then(|d| d.value());
    let report = h.finish();
    assert_clean(&report);
    assert_eq!(b.errors, 0);
    assert_eq!(
        b.drawn, [0; 3],
        "nothing drawn for 8 frames, yet drawn says {:?} (billboard diagnostic {diag:?})",
        b.drawn
    );
}

/// A vegetation camera with MSAA (the docs require `Msaa::Off`): refused with counted errors,
/// never a wgpu or layer message, and a clean exit.
#[test]
fn an_msaa_vegetation_camera_is_a_counted_error() {
    let test = "an_msaa_vegetation_camera_is_a_counted_error";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    let (cam, _) = h.camera(0, true);
    h.world().entity_mut(cam).insert(Msaa::Sample4);
    let pine = h.species(conifer("pine", 1));
    h.grove(&pine, Vec3::new(10.0, 0.0, 10.0), 300.0);
    h.frames(8);
    let b = h.budget();
    assert!(b.errors > 0, "the refusal is counted: {b:?}");
    assert_eq!(b.patches, 1);
    // Msaa off again: drawn from then on, no new error.
    h.world().entity_mut(cam).insert(Msaa::Off);
    h.frames(3);
    let errors = h.budget().errors;
    h.frames(5);
    let b = h.budget();
    assert_eq!(b.errors, errors, "{b:?}");
    assert!(drawn(&b) > 0, "{b:?}");
    assert_clean(&h.finish());
}

/// An HDR vegetation camera (the docs require HDR off): counted errors, clean exit.
#[test]
fn an_hdr_vegetation_camera_is_a_counted_error() {
    let test = "an_hdr_vegetation_camera_is_a_counted_error";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    let (cam, _) = h.camera(0, true);
    h.world().entity_mut(cam).insert(Hdr);
    let pine = h.species(conifer("pine", 1));
    h.grove(&pine, Vec3::new(10.0, 0.0, 10.0), 300.0);
    h.frames(8);
    let b = h.budget();
    assert!(b.errors > 0, "the refusal is counted: {b:?}");
    assert_clean(&h.finish());
}

/// A camera with a viewport (split screen): the vegetation must stay inside it.
#[test]
fn a_viewport_camera_draws_only_inside_its_viewport() {
    let test = "a_viewport_camera_draws_only_inside_its_viewport";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    let (cam, image) = h.camera(0, true);
    h.world()
        .entity_mut(cam)
        .get_mut::<Camera>()
        .expect("camera")
        .viewport = Some(Viewport {
        physical_position: UVec2::ZERO,
        physical_size: UVec2::new(W / 2, H),
        ..default()
    });
    let pine = h.species(conifer("pine", 1));
    for k in 0..3 {
        h.grove(
            &pine,
            Vec3::new(-118.0 + 128.0 * k as f32, 0.0, 10.0),
            400.0,
        );
    }
    h.frames(6);
    let pixels = h.shot(&image);
    let b = h.budget();
    let report = h.finish();
    assert_clean(&report);
    assert_eq!(b.errors, 0);
    let (inside, outside) = (non_sky(&pixels, 0..W / 2), non_sky(&pixels, W / 2..W));
    assert!(inside > 100, "trees inside the viewport: {inside}");
    assert_eq!(outside, 0, "{outside} tree pixels outside the viewport");
}

// ---------------------------------------------------------------------------------------------
// The budget cap, start and exit.

#[test]
fn vegetation_cap_of_zero_is_counted_and_extremes_work() {
    let test = "vegetation_cap_of_zero_is_counted_and_extremes_work";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    h.camera(0, true);
    let pine = h.species(conifer("pine", 1));
    h.grove(&pine, Vec3::new(10.0, 0.0, 10.0), 500.0);
    h.frames(4);
    h.world().insert_resource(VegetationCap(0));
    h.frames(3);
    let b = h.budget();
    assert_eq!(b.errors, 1, "a 0-byte cap refused and counted: {b:?}");
    assert!(drawn(&b) > 0, "the forest keeps its budget: {b:?}");
    h.world().insert_resource(VegetationCap(u64::MAX));
    h.frames(5);
    let b = h.budget();
    assert_eq!(b.errors, 1, "{b:?}");
    assert!(b.budget > 0 && b.budget < u64::MAX, "{b:?}");
    assert!(drawn(&b) > 0, "{b:?}");
    h.world().insert_resource(VegetationCap(1));
    h.frames(12);
    let b = h.budget();
    assert_eq!(b.errors, 1, "{b:?}");
    assert!(b.budget <= 1, "capped to a byte: {b:?}");
    assert!(
        (b.quality - config().controller.min_quality).abs() < 1e-6,
        "lowest quality: {b:?}"
    );
    h.world()
        .insert_resource(VegetationCap(config().controller.cap_bytes));
    // The controller raises the budget and quality only after its hold frames.
    h.frames(30);
    let b = h.budget();
    assert_eq!(b.errors, 1, "{b:?}");
    assert!(drawn(&b) > 0, "back from the squeeze: {b:?}");
    assert_clean(&h.finish());
}

#[test]
fn no_species_at_all_draws_nothing_and_exits_clean() {
    let test = "no_species_at_all_draws_nothing_and_exits_clean";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    let (_, image) = h.camera(0, true);
    h.frames(6);
    let b = h.budget();
    assert_eq!((b.frames, b.patches, b.errors, drawn(&b)), (0, 0, 0, 0));
    assert!(
        !b.device.is_empty() && b.heap_budget > 0,
        "the budget is published: {b:?}"
    );
    assert_eq!(non_sky(&h.shot(&image), 0..W), 0);
    // The main world's resource and the diagnostics agree.
    let main = h.world().resource::<VramBudget>().clone();
    assert_eq!(main.device, b.device);
    assert!(
        h.world()
            .resource::<bevy::diagnostic::DiagnosticsStore>()
            .get(&understory_bevy::HELD_BYTES)
            .is_some()
    );
    assert_clean(&h.finish());
}

#[test]
fn exiting_after_the_first_frame_is_clean() {
    let test = "exiting_after_the_first_frame_is_clean";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    h.camera(0, true);
    let pine = h.species(conifer("pine", 1));
    let leaf = h.species(broadleaf("broadleaf"));
    h.grove(&pine, Vec3::new(10.0, 0.0, 10.0), 500.0);
    h.grove(&leaf, Vec3::new(-118.0, 0.0, 10.0), 500.0);
    h.frames(1);
    let b = h.budget();
    assert_eq!((b.patches, b.errors), (2, 0), "{b:?}");
    assert_clean(&h.finish());
}

/// An app whose render world is dropped before its first frame (set up, never updated: an app
/// that fails during start-up) still reports its exit.
#[test]
fn exiting_before_any_frame_still_reports() {
    let test = "exiting_before_any_frame_still_reports";
    if common::isolated(test) {
        return;
    }
    let Some(h) = Harness::new(test) else {
        return;
    };
    let exit = h.exit.clone();
    drop(h.app);
    let report = exit.report().expect("an exit report");
    assert_clean(&report);
}

/// The vegetation camera despawned mid-run (and a new one spawned later), then the exit.
#[test]
fn the_vegetation_camera_despawned_and_replaced() {
    let test = "the_vegetation_camera_despawned_and_replaced";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    let (cam, _) = h.camera(0, true);
    let pine = h.species(conifer("pine", 1));
    h.grove(&pine, Vec3::new(10.0, 0.0, 10.0), 300.0);
    h.frames(4);
    h.world().despawn(cam);
    h.frames(4);
    let frames = h.budget().frames;
    h.frames(2);
    assert_eq!(h.budget().frames, frames, "no camera, no cull");
    let (_, image) = h.camera(0, true);
    h.frames(6);
    let b = h.budget();
    assert!(b.frames > frames && drawn(&b) > 0, "{b:?}");
    assert!(non_sky(&h.shot(&image), 0..W) > 100);
    assert_eq!(b.errors, 0);
    assert_clean(&h.finish());
}

/// Two plugin apps one after the other in one process (a game that restarts its renderer):
/// both draw and both exit clean.
#[test]
fn two_apps_one_after_the_other() {
    let test = "two_apps_one_after_the_other";
    if common::isolated(test) {
        return;
    }
    for round in 0..2 {
        let Some(mut h) = Harness::new(test) else {
            return;
        };
        let (_, image) = h.camera(0, true);
        let pine = h.species(conifer("pine", 1));
        h.grove(&pine, Vec3::new(10.0, 0.0, 10.0), 300.0);
        h.frames(6);
        let b = h.budget();
        assert!(drawn(&b) > 0 && b.errors == 0, "round {round}: {b:?}");
        assert!(non_sky(&h.shot(&image), 0..W) > 100, "round {round}");
        assert_clean(&h.finish());
    }
}

/// A patch whose species asset was removed from `Assets` (the species is registered already:
/// the docs say it is read once) still follows its entity when moved, or its move is refused
/// with a counted error; it never silently stays where it was.
#[test]
fn a_patch_whose_species_asset_is_gone_still_follows_its_entity() {
    let test = "a_patch_whose_species_asset_is_gone_still_follows_its_entity";
    if common::isolated(test) {
        return;
    }
    let Some(mut h) = Harness::new(test) else {
        return;
    };
    let (_, image) = h.camera(0, true);
    let pine = h.species(conifer("pine", 1));
    let e = h.grove(&pine, Vec3::new(10.0, 0.0, 10.0), 300.0);
    h.frames(6);
    assert!(drawn(&h.budget()) > 0);
    h.world()
        .resource_mut::<Assets<VegetationSpecies>>()
        .remove(&pine);
    h.frames(2);
    // Behind the camera.
    h.world()
        .entity_mut(e)
        .get_mut::<Transform>()
        .expect("transform")
        .translation = Vec3::new(10.0, 0.0, -250.0);
    h.frames(8);
    let b = h.budget();
    let pixels = non_sky(&h.shot(&image), 0..W);
    let report = h.finish();
    assert_clean(&report);
    assert!(
        pixels == 0 || b.errors > 0,
        "the grove stayed in view ({pixels} tree pixels, {:?} drawn) with no error counted: {b:?}",
        b.drawn
    );
}
