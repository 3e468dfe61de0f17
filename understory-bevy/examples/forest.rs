//! A headless Bevy app flying over the demo forest: sky (clear colour), ground and sun from
//! Bevy, the vegetation from understory through `UnderstoryPlugin`, on one VkDevice. One of the
//! three species is a broadleaf whose meshes are made from Bevy primitives (`tree_mesh`); the
//! others draw with understory's conifer. The last frame goes to a PNG; the budget line and
//! the leak report are printed at exit.
//!
//! Run: `cargo run --release -p understory-bevy --example forest -- --frames 120 --png forest.png`
//! (options: `--trees N`, `--size WxH`, `--squeeze`). `tests/plugin.rs` runs this code.

#![allow(clippy::too_many_lines)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bevy::app::{AppExit, ScheduleRunnerPlugin};
use bevy::camera::RenderTarget;
use bevy::core_pipeline::tonemapping::Tonemapping;
use bevy::diagnostic::FrameCount;
use bevy::prelude::*;
use bevy::render::RenderPlugin;
use bevy::render::render_resource::TextureFormat;
use bevy::render::view::Msaa;
use bevy::render::view::screenshot::{Screenshot, ScreenshotCaptured};
use bevy::window::{ExitCondition, WindowPlugin};
use understory::gpu::draw::tree_billboard;
use understory::world::instance::Instance;
use understory_bevy::{
    Density, ExitReport, ForestSettings, TreeMeshes, TreePart, UnderstoryPlugin, VegetationCamera,
    VegetationPatch, VegetationSpecies, VramBudget, tree_mesh,
};

type BoxError = Box<dyn std::error::Error>;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Frames before the screenshot is taken (the app runs until it arrives).
    pub frames: u32,
    /// Trees.
    pub trees: u64,
    /// Image size.
    pub width: u32,
    /// Image height.
    pub height: u32,
    /// Where to write the last frame.
    pub png: Option<PathBuf>,
    /// Every frame, despawn and respawn this many patch entities.
    pub churn: usize,
    /// Squeeze the vegetation cap to this many bytes in the middle third.
    pub squeeze_to: Option<u64>,
    /// The shared device's settings.
    pub shared: understory_wgpu::SharedDeviceDesc,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            frames: 120,
            trees: 100_000,
            width: 640,
            height: 360,
            png: None,
            churn: 0,
            squeeze_to: None,
            shared: understory_wgpu::SharedDeviceDesc::default(),
        }
    }
}

/// What the run saw.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// The budget at the last frame.
    pub budget: VramBudget,
    /// Smallest vegetation budget during the squeeze, and the frames over it once settled.
    pub squeezed: (u64, u32),
    /// Patch entities alive at the end, and the patches understory held then.
    pub live_entities: u64,
    /// The exit report (leaks, messages).
    pub exit: ExitReport,
    /// Non-sky pixels in the screenshot, and pixels that differ from the sky and the ground.
    pub drawn_pixels: u64,
    /// Patch entities despawned and spawned again.
    pub churned: u64,
    /// Seconds the app ran.
    pub seconds: f64,
}

#[derive(Resource)]
struct Run {
    options: Options,
    shot: Handle<Image>,
    species: Vec<Handle<VegetationSpecies>>,
    patches: Vec<(Entity, usize)>,
    generated: Arc<Vec<(usize, Vec<Instance>)>>,
    out: Arc<Mutex<Outcome>>,
    requested: bool,
}

const SKY: [f32; 3] = [0.62, 0.74, 0.86];

fn setup(
    mut commands: Commands,
    mut images: ResMut<Assets<Image>>,
    mut meshes: ResMut<Assets<Mesh>>,
    mut materials: ResMut<Assets<StandardMaterial>>,
    mut species_assets: ResMut<Assets<VegetationSpecies>>,
    mut run: ResMut<Run>,
) {
    let (w, h) = (run.options.width, run.options.height);
    let image = Image::new_target_texture(w, h, TextureFormat::Rgba8UnormSrgb, None);
    run.shot = images.add(image);
    commands.spawn((
        Camera3d::default(),
        RenderTarget::Image(run.shot.clone().into()),
        Msaa::Off,
        Tonemapping::None,
        Projection::Perspective(PerspectiveProjection {
            fov: 60f32.to_radians(),
            near: 0.5,
            ..default()
        }),
        Transform::from_xyz(0.0, 34.0, 0.0),
        VegetationCamera,
    ));
    let world = understory_cli::demo::world_config();
    commands.spawn((
        Mesh3d(
            meshes.add(
                Plane3d::default()
                    .mesh()
                    .size(world.world_size_m, world.world_size_m),
            ),
        ),
        MeshMaterial3d(materials.add(StandardMaterial {
            base_color: Color::srgb(0.29, 0.36, 0.19),
            perceptual_roughness: 1.0,
            ..default()
        })),
    ));
    commands.spawn((
        DirectionalLight {
            illuminance: 8_000.0,
            ..default()
        },
        Transform::from_xyz(-0.4, 0.8, 0.35).looking_at(Vec3::ZERO, Vec3::Y),
    ));
    // The second species (the demo's pine) is a round-crowned broadleaf here: its own meshes,
    // made from Bevy primitives, and a billboard of the same outline; the others draw with
    // understory's conifer.
    run.species = understory_cli::demo::SPECIES
        .iter()
        .enumerate()
        .map(|(k, (name, _))| {
            let round = k == BROADLEAF;
            species_assets.add(VegetationSpecies {
                name: if round {
                    "broadleaf".into()
                } else {
                    (*name).into()
                },
                width: 64,
                height: 128,
                rgba8: if round {
                    broadleaf_billboard(64, 128)
                } else {
                    tree_billboard(64, 128, k as u32 + 1)
                },
                meshes: round.then(|| broadleaf().expect("the broadleaf's meshes")),
            })
        })
        .collect();
    let generated = run.generated.clone();
    let mut patches = Vec::new();
    for (g, (sp, instances)) in generated.iter().enumerate() {
        let e = commands
            .spawn(VegetationPatch {
                species: run.species[*sp].clone(),
                instances: instances.as_slice().into(),
            })
            .id();
        patches.push((e, g));
    }
    run.patches = patches;
    // And a grove from a density description: broadleaves scattered over most of the leaf
    // tile at the world's centre (leaf tiles are 128 m from -1024 m).
    match VegetationPatch::scatter(
        run.species[BROADLEAF].clone(),
        &Density {
            size_m: Vec2::splat(120.0),
            trees_per_hectare: 150.0,
            scale: (10.0, 16.0),
            tint: Color::srgb(0.45, 0.62, 0.22),
            seed: 1,
        },
    ) {
        Ok(grove) => {
            commands.spawn((grove, Transform::from_xyz(4.0, 0.0, 4.0)));
        }
        Err(e) => log::error!("the grove: {e}"),
    }
}

/// The demo species drawn as a broadleaf.
const BROADLEAF: usize = 1;

/// The broadleaf's crown: an ellipsoid of these radii (x, y) around this height, on a trunk of
/// this radius and height (a tree 1 tall).
const CROWN: (f32, f32, f32) = (0.3, 0.345, 0.655);
const TRUNK: (f32, f32) = (0.04, 0.5);

/// A round-crowned tree from Bevy primitives: a bark trunk (cylinder) and a foliage crown
/// (icosphere, stretched), at full and medium detail.
pub fn broadleaf() -> Result<TreeMeshes, understory::Error> {
    let bark = Color::linear_rgb(92.0 / 255.0, 62.0 / 255.0, 38.0 / 255.0);
    let lod = |sides: u32, subdivisions: u32| {
        let trunk = Cylinder::new(TRUNK.0, TRUNK.1)
            .mesh()
            .resolution(sides)
            .build()
            .translated_by(Vec3::Y * (TRUNK.1 / 2.0));
        let crown = Sphere::new(1.0)
            .mesh()
            .ico(subdivisions)
            .map_err(|e| understory::Error::InvalidInput(e.to_string()))?
            .scaled_by(Vec3::new(CROWN.0, CROWN.1, CROWN.0))
            .translated_by(Vec3::Y * CROWN.2);
        tree_mesh(&[
            TreePart {
                mesh: &trunk,
                color: bark,
                tint: 0.0,
            },
            TreePart {
                mesh: &crown,
                color: Color::WHITE,
                tint: 1.0,
            },
        ])
    };
    // About the conifer's index counts (264 and 84): every instance of a LOD runs as many
    // vertex-stage corners as that LOD's largest mesh has indices.
    let full = lod(8, 1)?;
    let medium = lod(4, 0)?;
    log::info!(
        "broadleaf: {} and {} indices (the conifer: 264 and 84)",
        full.indices.len(),
        medium.indices.len()
    );
    Ok(TreeMeshes { full, medium })
}

/// The broadleaf's billboard: its crown and trunk outline across understory's billboard quad
/// (0.64 wide, 1 tall), foliage in light greys for the tint to colour.
fn broadleaf_billboard(width: u32, height: u32) -> Vec<u8> {
    let half = understory::gpu::draw::BILLBOARD_HALF_WIDTH;
    let mut out = Vec::with_capacity((width * height * 4) as usize);
    for y in 0..height {
        for x in 0..width {
            let fx = ((x as f32 + 0.5) / width as f32 * 2.0 - 1.0) * half;
            let fy = 1.0 - (y as f32 + 0.5) / height as f32;
            let (cx, cy) = (fx / CROWN.0, (fy - CROWN.2) / CROWN.1);
            let texel = if cx * cx + cy * cy <= 1.0 {
                // Lit from the upper left.
                let g = ((0.78 - 0.2 * cx + 0.12 * cy).clamp(0.0, 1.0) * 255.0) as u8;
                [g, g, g, 255]
            } else if fy <= TRUNK.1 && fx.abs() <= TRUNK.0 * 1.5 {
                [92, 62, 38, 255]
            } else {
                [0, 0, 0, 0]
            };
            out.extend_from_slice(&texel);
        }
    }
    out
}

fn fly(
    mut commands: Commands,
    frames: Res<FrameCount>,
    mut run: ResMut<Run>,
    mut camera: Query<&mut Transform, With<VegetationCamera>>,
    budget: Res<VramBudget>,
    patches: Query<(), With<VegetationPatch>>,
) {
    let f = frames.0;
    let n = run.options.frames.max(1);
    let t = (f.min(n) as f32) / n as f32;
    let world = understory_cli::demo::world_config();
    let (eye, look) =
        understory_cli::demo::camera(t, understory_cli::demo::lap_radius(world.world_size_m));
    if let Ok(mut tr) = camera.single_mut() {
        *tr = Transform::from_xyz(eye.x, eye.y, eye.z)
            .looking_at(Vec3::new(look.x, look.y, look.z), Vec3::Y);
    }
    // Churn: patch entities leave and come back.
    for k in 0..run.options.churn.min(run.patches.len()) {
        let i = (f as usize * 7 + k * 13) % run.patches.len();
        let (e, g) = run.patches[i];
        commands.entity(e).despawn();
        let generated = run.generated.clone();
        let (sp, instances) = &generated[g];
        let ne = commands
            .spawn(VegetationPatch {
                species: run.species[*sp].clone(),
                instances: instances.as_slice().into(),
            })
            .id();
        run.patches[i] = (ne, g);
        run.out.lock().unwrap_or_else(|p| p.into_inner()).churned += 1;
    }
    let (third, two_thirds) = (n / 3, 2 * n / 3);
    if let Some(to) = run.options.squeeze_to {
        if f == third {
            commands.queue(move |w: &mut World| set_cap(w, to));
        }
        if f == two_thirds {
            let cap = understory_cli::demo::world_config().controller.cap_bytes;
            commands.queue(move |w: &mut World| set_cap(w, cap));
        }
        if f > third + 12 && f < two_thirds && budget.frames > 0 {
            let mut o = run.out.lock().unwrap_or_else(|p| p.into_inner());
            o.squeezed.0 = if o.squeezed.0 == 0 {
                budget.budget
            } else {
                o.squeezed.0.min(budget.budget)
            };
            if budget.held > budget.budget.max(1) && budget.quality > 0.0 {
                o.squeezed.1 += 1;
            }
        }
    }
    if f == n && !run.requested {
        run.requested = true;
        let out = run.out.clone();
        let png = run.options.png.clone();
        // Every patch entity alive (the churned ones and the grove).
        let live = patches.iter().count() as u64;
        commands.spawn(Screenshot::image(run.shot.clone())).observe(
            move |ev: On<ScreenshotCaptured>,
                  mut exit: MessageWriter<AppExit>,
                  budget: Res<VramBudget>| {
                let img: &Image = &ev.image;
                let mut o = out.lock().unwrap_or_else(|p| p.into_inner());
                o.budget = budget.clone();
                o.live_entities = live;
                if let Some(data) = img.data.as_ref() {
                    // The sky is stored as the demo's bytes (`Color::srgb`, and understory's fog
                    // decoded for the sRGB target).
                    let sky = SKY.map(|c| (c * 255.0).round() as u8);
                    o.drawn_pixels = data
                        .chunks(4)
                        .filter(|p| p[..3].iter().zip(&sky).any(|(a, b)| a.abs_diff(*b) > 8))
                        .count() as u64;
                }
                if let Some(path) = &png {
                    match img.clone().try_into_dynamic() {
                        Ok(d) => {
                            if let Err(e) = d.to_rgba8().save(path) {
                                eprintln!("png: {e}");
                            } else {
                                println!("wrote {}", path.display());
                            }
                        }
                        Err(e) => eprintln!("png: {e}"),
                    }
                }
                exit.write(AppExit::Success);
            },
        );
    }
    if f > n + 120 {
        eprintln!("no screenshot after 120 frames");
        commands.queue(|w: &mut World| {
            w.write_message(AppExit::error());
        });
    }
}

/// The vegetation cap, set from the main world: the plugin's render-side vegetation takes it
/// through its `ForestSettings` at start; a squeeze goes through this resource.
fn set_cap(world: &mut World, cap: u64) {
    world.insert_resource(understory_bevy::VegetationCap(cap));
}

/// Runs the app.
pub fn run(options: &Options) -> Result<Outcome, BoxError> {
    let mut settings = ForestSettings {
        config: understory_cli::demo::world_config(),
    };
    settings.config.stats_log_interval = Duration::from_secs(3600);
    let (plugin, render_creation) = UnderstoryPlugin::new(&options.shared, settings)?;
    let exit = plugin.exit();
    let generated = Arc::new(understory_cli::demo::forest(
        &understory_cli::demo::world_config(),
        options.trees,
        1,
        None,
    ));
    let out = Arc::new(Mutex::new(Outcome::default()));
    let started = std::time::Instant::now();
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
    .add_plugins(ScheduleRunnerPlugin::run_loop(Duration::ZERO))
    .add_plugins(plugin)
    .insert_resource(ClearColor(Color::srgb(SKY[0], SKY[1], SKY[2])))
    .insert_resource(Run {
        options: options.clone(),
        shot: Handle::default(),
        species: Vec::new(),
        patches: Vec::new(),
        generated,
        out: out.clone(),
        requested: false,
    })
    .add_systems(Startup, setup)
    .add_systems(Update, fly);
    let code = app.run();
    let mut o = out.lock().unwrap_or_else(|p| p.into_inner()).clone();
    o.seconds = started.elapsed().as_secs_f64();
    o.exit = exit.report().ok_or("the plugin did not report at exit")?;
    if code != AppExit::Success {
        return Err(format!("the app exited with {code:?}").into());
    }
    Ok(o)
}

#[allow(dead_code)]
fn main() -> Result<(), BoxError> {
    let mut options = Options {
        shared: understory_wgpu::SharedDeviceDesc::from_env()?,
        ..Default::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--frames" => options.frames = value()?.parse()?,
            "--trees" => options.trees = value()?.parse()?,
            "--png" => options.png = Some(value()?.into()),
            "--squeeze" => options.squeeze_to = Some(16 << 20),
            "--size" => {
                let v = value()?;
                let (w, h) = v.split_once('x').ok_or("--size WxH")?;
                options.width = w.parse()?;
                options.height = h.parse()?;
            }
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    let o = run(&options)?;
    println!("budget: {}", o.budget);
    println!(
        "{} frames in {:.2} s; {} patch entities; exit: {} drained, {} leaks, {} validation messages, {} wgpu errors{}",
        o.budget.frames,
        o.seconds,
        o.live_entities,
        o.exit.drained,
        o.exit.leaks.len(),
        o.exit.messages.layer,
        o.exit.messages.wgpu,
        o.exit
            .error
            .as_ref()
            .map(|e| format!(" (shutdown: {e})"))
            .unwrap_or_default()
    );
    for t in &o.exit.messages.texts {
        eprintln!("message: {t}");
    }
    if !o.exit.leaks.is_empty()
        || o.exit.messages.layer + o.exit.messages.wgpu > 0
        || o.exit.error.is_some()
        || o.budget.errors > 0
        || o.drawn_pixels == 0
    {
        return Err("the run was not clean".into());
    }
    Ok(())
}
