//! The demo forest with wgpu as the host: a wgpu app that owns its colour and depth textures,
//! clears them in its own render pass, lets understory update, cull and draw the forest into
//! them in the same `Queue::submit`, reads the indirect arguments and the image back through
//! wgpu, and writes a PNG. It prints the budget and what wgpu and understory each hold.
//!
//! Run: `cargo run --release -p understory-wgpu --example forest -- --frames 60 --png forest.png`
//! (options: `--trees N`, `--size WxH`, `--wgpu-pressure MiB`, `--squeeze`, `--mesh-sets N`). Validation follows
//! `UNDERSTORY_VALIDATION` (`required` turns on the Khronos layer with synchronization
//! validation; `gpu-assisted` adds GPU-assisted validation). `tests/wgpu_host.rs` runs this code.

#![allow(clippy::too_many_lines)]

use std::path::PathBuf;
use std::time::Instant;

use glam::{Mat4, Vec3};
use understory::gpu::draw::{DrawFrame, tree_billboard};
use understory::vegetation::{PatchDesc, PatchId, SpeciesDesc, SpeciesId};
use understory_wgpu::{Forest, ForestDesc, ForestView, SharedDevice, SharedDeviceDesc, wgpu};

type BoxError = Box<dyn std::error::Error>;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Frames to render.
    pub frames: u32,
    /// Trees in the forest.
    pub trees: u64,
    /// Image size.
    pub width: u32,
    /// Image height.
    pub height: u32,
    /// Where to write the last frame.
    pub png: Option<PathBuf>,
    /// A wgpu buffer of this many MiB the app allocates a third of the way in (and frees at
    /// two thirds): the vegetation budget must follow.
    pub wgpu_pressure_mib: u64,
    /// Squeeze the vegetation cap to a quarter of what the forest holds in the middle third, and
    /// despawn and respawn patches every frame.
    pub squeeze: bool,
    /// Mesh sets: 1 draws every species with understory's conifer (set 0); N adds N - 1 more
    /// copies of it and spreads the species over the sets, so the image is the same while the
    /// full and medium draws take the path of several sets ([`Forest::add_meshes`]).
    pub mesh_sets: u32,
    /// The context's settings (validation from the environment by default).
    pub shared: SharedDeviceDesc,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            frames: 60,
            trees: 100_000,
            width: 640,
            height: 360,
            png: None,
            wgpu_pressure_mib: 0,
            squeeze: false,
            mesh_sets: 1,
            shared: SharedDeviceDesc::default(),
        }
    }
}

/// What the run saw.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Device name.
    pub device: String,
    /// Frames rendered.
    pub frames: u32,
    /// The budget line at the start and at the end.
    pub budget_lines: Vec<String>,
    /// Validation-layer messages and wgpu validation errors, teardown included.
    pub layer_messages: u64,
    /// wgpu's own validation errors.
    pub wgpu_errors: u64,
    /// Allocations understory still held at shutdown.
    pub leaks: usize,
    /// The vegetation budget right before the app's wgpu allocation, and after it.
    pub budget_before_pressure: u64,
    /// The vegetation budget with the app's wgpu allocation alive.
    pub budget_under_pressure: u64,
    /// Foreign bytes on the device-local heap before and with the app's allocation.
    pub foreign: (u64, u64),
    /// The device-local heap's budget at the same two moments (a driver's moves a little).
    pub heap_budget: (u64, u64),
    /// The controller's share of the heap's headroom.
    pub headroom_share: f64,
    /// Frames whose held bytes passed the budget (or the least the picture needs, if more)
    /// once the squeeze settled.
    pub over_budget_frames: u32,
    /// The smallest budget during the squeeze.
    pub squeezed_budget: u64,
    /// Patches despawned and spawned again.
    pub churned: u64,
    /// Deferred frees understory completed.
    pub deferred_frees: u64,
    /// Instances the last frame's indirect arguments draw, per LOD (full, medium, billboard),
    /// read back through wgpu.
    pub drawn: [u64; 3],
    /// What understory read back itself (`Forest::last_drawn`): the frame and its counts.
    pub last_drawn: Option<(u64, [u64; 3])>,
    /// Pixels of the last frame that are not sky.
    pub drawn_pixels: u64,
    /// Whether the wgpu device still cleared and read back a texture after understory shut
    /// down.
    pub wgpu_usable_after: bool,
    /// Seconds for the frames (wall clock).
    pub seconds: f64,
}

const COLOR: wgpu::TextureFormat = wgpu::TextureFormat::Rgba8Unorm;
const DEPTH: wgpu::TextureFormat = wgpu::TextureFormat::Depth32Float;

/// The app's render targets and readback buffers: plain wgpu objects.
struct Targets {
    color: wgpu::Texture,
    depth: wgpu::Texture,
    readback: wgpu::Buffer,
    args_readback: wgpu::Buffer,
    row: u32,
}

impl Targets {
    fn new(device: &wgpu::Device, width: u32, height: u32, args_size: u64) -> Self {
        let size = wgpu::Extent3d {
            width,
            height,
            depth_or_array_layers: 1,
        };
        let texture = |label, format, usage| {
            device.create_texture(&wgpu::TextureDescriptor {
                label: Some(label),
                size,
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format,
                usage,
                view_formats: &[],
            })
        };
        let row = (width * 4).div_ceil(256) * 256;
        Self {
            color: texture(
                "app colour",
                COLOR,
                wgpu::TextureUsages::RENDER_ATTACHMENT | wgpu::TextureUsages::COPY_SRC,
            ),
            depth: texture("app depth", DEPTH, wgpu::TextureUsages::RENDER_ATTACHMENT),
            readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("app readback"),
                size: u64::from(row) * u64::from(height),
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            args_readback: device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("app args readback"),
                size: args_size,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            row,
        }
    }

    /// The app's own pass: clear to the sky and the far plane.
    fn clear(&self, device: &wgpu::Device, sky: [f32; 4]) -> wgpu::CommandBuffer {
        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("app clear"),
        });
        let cv = self.color.create_view(&Default::default());
        let dv = self.depth.create_view(&Default::default());
        {
            let _pass = enc.begin_render_pass(&wgpu::RenderPassDescriptor {
                label: Some("app clear pass"),
                color_attachments: &[Some(wgpu::RenderPassColorAttachment {
                    view: &cv,
                    depth_slice: None,
                    resolve_target: None,
                    ops: wgpu::Operations {
                        load: wgpu::LoadOp::Clear(wgpu::Color {
                            r: f64::from(sky[0]),
                            g: f64::from(sky[1]),
                            b: f64::from(sky[2]),
                            a: 1.0,
                        }),
                        store: wgpu::StoreOp::Store,
                    },
                })],
                depth_stencil_attachment: Some(wgpu::RenderPassDepthStencilAttachment {
                    view: &dv,
                    depth_ops: Some(wgpu::Operations {
                        load: wgpu::LoadOp::Clear(1.0),
                        store: wgpu::StoreOp::Store,
                    }),
                    stencil_ops: None,
                }),
                timestamp_writes: None,
                occlusion_query_set: None,
                multiview_mask: None,
            });
        }
        enc.finish()
    }

    /// The app's readback of the image and of understory's indirect arguments.
    fn read(&self, device: &wgpu::Device, args: &wgpu::Buffer) -> wgpu::CommandBuffer {
        let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("app readback"),
        });
        enc.copy_texture_to_buffer(
            self.color.as_image_copy(),
            wgpu::TexelCopyBufferInfo {
                buffer: &self.readback,
                layout: wgpu::TexelCopyBufferLayout {
                    offset: 0,
                    bytes_per_row: Some(self.row),
                    rows_per_image: None,
                },
            },
            self.color.size(),
        );
        enc.copy_buffer_to_buffer(args, 0, &self.args_readback, 0, args.size());
        enc.finish()
    }
}

/// Maps `buffer` for reading (waiting on the device wgpu and understory share, which this
/// app created) and returns its bytes.
fn map(device: &wgpu::Device, buffer: &wgpu::Buffer) -> Result<Vec<u8>, BoxError> {
    let slice = buffer.slice(..);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    device.poll(wgpu::PollType::Wait {
        submission_index: None,
        timeout: Some(std::time::Duration::from_secs(60)),
    })?;
    rx.recv()??;
    let bytes = slice.get_mapped_range().to_vec();
    buffer.unmap();
    Ok(bytes)
}

fn write_png(
    path: &PathBuf,
    width: u32,
    height: u32,
    row: u32,
    bytes: &[u8],
) -> Result<(), BoxError> {
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, width, height);
    enc.set_color(png::ColorType::Rgba);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    let mut data = Vec::with_capacity((width * height * 4) as usize);
    for y in 0..height as usize {
        let start = y * row as usize;
        data.extend_from_slice(&bytes[start..start + width as usize * 4]);
    }
    w.write_image_data(&data)?;
    Ok(())
}

/// The app's frame loop around understory.
pub fn run(options: &Options) -> Result<Outcome, BoxError> {
    let mut outcome = Outcome::default();
    let shared = SharedDevice::new(&options.shared)?;
    let log = shared.message_log();
    // The app's clones: they stay valid after understory is gone.
    let device = shared.device().clone();
    let queue = shared.queue().clone();
    let start = shared.budget()?;
    outcome.device = start.device.clone();
    outcome.budget_lines.push(start.to_string());
    println!("budget at start: {start}");
    let mut config = understory_cli::demo::world_config();
    config.controller.cap_bytes = if options.wgpu_pressure_mib > 0 {
        // The heap's headroom decides, so that the app's allocation shows.
        u64::MAX / 4
    } else {
        config.controller.cap_bytes
    };
    outcome.headroom_share = config.controller.headroom_share;
    let mut forest = Forest::new(
        &shared,
        &ForestDesc {
            config,
            color_format: COLOR,
            depth_format: DEPTH,
            ..Default::default()
        },
    )?;
    let species: Vec<SpeciesId> = understory_cli::demo::SPECIES
        .iter()
        .enumerate()
        .map(|(k, (name, _))| {
            forest.vegetation_mut().register_species(&SpeciesDesc {
                name,
                width: 64,
                height: 128,
                rgba8: &tree_billboard(64, 128, k as u32 + 1),
            })
        })
        .collect::<understory::Result<_>>()?;
    for _ in 1..options.mesh_sets {
        forest.add_meshes(understory::gpu::draw::TreeMeshes::conifer())?;
    }
    for (k, s) in species.iter().enumerate() {
        forest.set_species_meshes(*s, k as u32 % options.mesh_sets.max(1))?;
    }
    let generated =
        understory_cli::demo::forest(forest.vegetation().config(), options.trees, 1, None);
    let mut live: Vec<(PatchId, usize, usize)> = Vec::new();
    for (i, (sp, instances)) in generated.iter().enumerate() {
        let id = forest.vegetation_mut().spawn(&PatchDesc {
            species: species[*sp],
            instances,
        })?;
        live.push((id, *sp, i));
    }
    let targets = Targets::new(
        &device,
        options.width,
        options.height,
        forest.indirect_args().buffer.size(),
    );
    let (third, two_thirds) = (options.frames / 3, 2 * options.frames / 3);
    let mut pressure: Option<Vec<wgpu::Buffer>> = None;
    let started = Instant::now();
    for f in 0..options.frames {
        if options.squeeze && !live.is_empty() {
            // Churn: two patches leave and come back, every frame.
            for k in 0..2usize {
                let i = (f as usize * 7 + k * 13) % live.len();
                let (id, sp, g) = live[i];
                forest.vegetation_mut().despawn(id)?;
                let nid = forest.vegetation_mut().spawn(&PatchDesc {
                    species: species[sp],
                    instances: &generated[g].1,
                })?;
                live[i] = (nid, sp, g);
                outcome.churned += 1;
            }
            if f == third {
                let held_before_squeeze = forest.vegetation().stats().held;
                forest
                    .vegetation_mut()
                    .set_budget_cap((held_before_squeeze / 4).max(1 << 20))?;
            }
            if f == two_thirds {
                forest
                    .vegetation_mut()
                    .set_budget_cap(understory_cli::demo::world_config().controller.cap_bytes)?;
            }
        }
        if options.wgpu_pressure_mib > 0 && f == third {
            // In buffers of at most wgpu's default `max_buffer_size` (256 MiB).
            let mut left = options.wgpu_pressure_mib << 20;
            let mut buffers = Vec::new();
            while left > 0 {
                let size = left.min(device.limits().max_buffer_size);
                buffers.push(device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("app pressure"),
                    size,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                }));
                left -= size;
            }
            pressure = Some(buffers);
        }
        if f == two_thirds {
            pressure = None;
        }
        let t = f as f32 / options.frames.max(1) as f32;
        let c = forest.vegetation().config().clone();
        let fog_m = c.lod.billboard_m * 1.15;
        let (eye, look) =
            understory_cli::demo::camera(t, understory_cli::demo::lap_radius(c.world_size_m));
        let aspect = options.width as f32 / options.height as f32;
        let mut proj = Mat4::perspective_rh(60f32.to_radians(), aspect, 0.5, fog_m * 1.5);
        proj.y_axis.y = -proj.y_axis.y;
        let view = ForestView {
            eye,
            view_proj: proj * Mat4::look_at_rh(eye, look, Vec3::Y),
            fog_m,
        };
        let sky = DrawFrame::new(view.view_proj, eye, fog_m, [0.0; 3], false).sky();

        let mut frame = shared.begin_frame()?;
        // SAFETY: no other thread exists to destroy the targets or the args buffer.
        let update = unsafe { forest.render(&mut frame, &view, &targets.color, &targets.depth) }?;
        let last = f + 1 == options.frames;
        let before = [targets.clear(&device, sky)];
        let after: Vec<_> = if last {
            vec![targets.read(&device, &forest.indirect_args().buffer)]
        } else {
            Vec::new()
        };
        shared.submit(frame, before, after)?;
        outcome.frames += 1;

        let budget = update.decision.budget;
        if options.wgpu_pressure_mib > 0 {
            let now = shared.budget()?;
            let (foreign, heap) = now.heap().map_or((0, 0), |h| (h.foreign, h.budget.budget));
            if f + 1 == third {
                outcome.budget_before_pressure = budget;
                outcome.foreign.0 = foreign;
                outcome.heap_budget.0 = heap;
            }
            if f == third + 1 {
                outcome.budget_under_pressure = budget;
                outcome.foreign.1 = foreign;
                outcome.heap_budget.1 = heap;
            }
        }
        if options.squeeze && f > third + 8 && f < two_thirds {
            let stats = forest.vegetation().stats();
            let held = stats.held;
            outcome.squeezed_budget = if outcome.squeezed_budget == 0 {
                budget
            } else {
                outcome.squeezed_budget.min(budget)
            };
            // Never blank: the nearest tile, the atlas and the outputs stay even when the
            // budget is below them.
            if held > budget.max(stats.min_footprint) {
                outcome.over_budget_frames += 1;
            }
        }
    }
    outcome.seconds = started.elapsed().as_secs_f64();
    drop(pressure);
    // The app reads back through wgpu.
    let pixels = map(&device, &targets.readback)?;
    let args = map(&device, &targets.args_readback)?;
    let draws = forest.indirect_args().draws as usize;
    for d in 0..draws.min(args.len() / 20) {
        let count = u32::from_le_bytes(args[d * 20 + 4..d * 20 + 8].try_into()?);
        outcome.drawn[d % 3] += u64::from(count);
    }
    let sky = DrawFrame::new(Mat4::IDENTITY, Vec3::ZERO, 1.0, [0.0; 3], false).sky();
    let sky: Vec<u8> = sky.iter().map(|c| (c * 255.0).round() as u8).collect();
    for y in 0..options.height as usize {
        let row = &pixels[y * targets.row as usize..][..options.width as usize * 4];
        outcome.drawn_pixels += row
            .chunks(4)
            .filter(|p| {
                p[..3]
                    .iter()
                    .zip(&sky[..3])
                    .any(|(a, b)| a.abs_diff(*b) > 8)
            })
            .count() as u64;
    }
    if let Some(path) = &options.png {
        write_png(path, options.width, options.height, targets.row, &pixels)?;
        println!("wrote {}", path.display());
    }
    outcome.last_drawn = forest.last_drawn();
    let stats = forest.vegetation().stats();
    outcome.deferred_frees = stats.memory.frees_completed;
    let end = shared.budget()?;
    println!("budget at the end: {end}");
    println!(
        "forest: {} trees in {} patches, {} frames in {:.2} s ({:.2} ms/frame); last frame drew full {}, medium {}, billboard {}; held {:.1} MiB of a {:.1} MiB vegetation budget, quality {:.2}",
        stats.instances,
        stats.patches,
        outcome.frames,
        outcome.seconds,
        outcome.seconds * 1e3 / f64::from(outcome.frames.max(1)),
        outcome.drawn[0],
        outcome.drawn[1],
        outcome.drawn[2],
        stats.held as f64 / f64::from(1 << 20),
        stats.budget as f64 / f64::from(1 << 20),
        stats.quality
    );
    outcome.budget_lines.push(end.to_string());
    drop(forest);
    let report = shared.shutdown()?;
    outcome.leaks = report.leaks.len();
    println!(
        "shutdown: {} drained, {} leaks",
        report.drained,
        report.leaks.len()
    );
    // understory is gone: the app's wgpu device still clears and reads back.
    let mut enc = device.create_command_encoder(&Default::default());
    {
        let cv = targets.color.create_view(&Default::default());
        let _pass = enc.begin_render_pass(&wgpu::RenderPassDescriptor {
            label: Some("after"),
            color_attachments: &[Some(wgpu::RenderPassColorAttachment {
                view: &cv,
                depth_slice: None,
                resolve_target: None,
                ops: wgpu::Operations {
                    load: wgpu::LoadOp::Clear(wgpu::Color {
                        r: 1.0,
                        g: 0.0,
                        b: 1.0,
                        a: 1.0,
                    }),
                    store: wgpu::StoreOp::Store,
                },
            })],
            ..Default::default()
        });
    }
    enc.copy_texture_to_buffer(
        targets.color.as_image_copy(),
        wgpu::TexelCopyBufferInfo {
            buffer: &targets.readback,
            layout: wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some(targets.row),
                rows_per_image: None,
            },
        },
        targets.color.size(),
    );
    queue.submit([enc.finish()]);
    let after = map(&device, &targets.readback)?;
    outcome.wgpu_usable_after = after[..4] == [255, 0, 255, 255];
    drop(targets);
    drop((queue, device));
    // Read last: teardown included (the wgpu device goes with the app's last handle).
    let messages = log.read();
    outcome.layer_messages = messages.layer;
    outcome.wgpu_errors = messages.wgpu;
    for t in &messages.texts {
        eprintln!("message: {t}");
    }
    Ok(outcome)
}

#[allow(dead_code)]
fn main() -> Result<(), BoxError> {
    env_logger::init();
    let mut options = Options {
        shared: SharedDeviceDesc::from_env()?,
        ..Default::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{a} needs a value"));
        match a.as_str() {
            "--frames" => options.frames = value()?.parse()?,
            "--trees" => options.trees = value()?.parse()?,
            "--png" => options.png = Some(value()?.into()),
            "--wgpu-pressure" => options.wgpu_pressure_mib = value()?.parse()?,
            "--squeeze" => options.squeeze = true,
            "--mesh-sets" => options.mesh_sets = value()?.parse()?,
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
    println!(
        "{}: {} frames, {} leaks, {} validation messages, {} wgpu errors, wgpu usable after: {}, {} non-sky pixels",
        o.device,
        o.frames,
        o.leaks,
        o.layer_messages,
        o.wgpu_errors,
        o.wgpu_usable_after,
        o.drawn_pixels
    );
    if o.wgpu_pressure_mib_reported(&options) {
        println!(
            "wgpu allocated {} MiB: foreign {:.1} → {:.1} MiB, vegetation budget {:.1} → {:.1} MiB",
            options.wgpu_pressure_mib,
            o.foreign.0 as f64 / f64::from(1 << 20),
            o.foreign.1 as f64 / f64::from(1 << 20),
            o.budget_before_pressure as f64 / f64::from(1 << 20),
            o.budget_under_pressure as f64 / f64::from(1 << 20)
        );
    }
    if o.leaks > 0
        || o.layer_messages > 0
        || o.wgpu_errors > 0
        || !o.wgpu_usable_after
        || o.drawn_pixels == 0
    {
        return Err("the run was not clean".into());
    }
    Ok(())
}

impl Outcome {
    fn wgpu_pressure_mib_reported(&self, options: &Options) -> bool {
        options.wgpu_pressure_mib > 0
    }
}
