//! Adversarial review of the mesh-set API (`understory::gpu::draw::{Mesh, TreeMeshes,
//! Meshes}`, `DrawPass::with_meshes`, `CullPass::set_meshes`, `Forest::add_meshes`,
//! `Forest::set_species_meshes`) and of the split frame (`Forest::cull`, `Forest::draw`,
//! `SharedDevice::{finish, resume, host_submitted, submit}`), on lavapipe under the Khronos
//! layer with synchronization validation and wgpu's own validation. Each test drives safe
//! calls (and unsafe ones within their `# Safety` lists) and checks what the docs promise:
//! typed errors for bad input, 0 layer messages, 0 wgpu errors, 0 leaks at shutdown, no panic
//! in library code, and the right pixels.
//!
//! The six tests of the five bugs it found first (a never-culled frame drawn, a cull pass's
//! `set_meshes` passing the draw pass's check, mesh buffers past `maxStorageBufferRange`, and
//! a radius overflowing to infinity, which bricked a forest) pass since they were fixed.
//!
//! SAFETY of every `unsafe { forest.render / cull / draw }` and `unsafe { shared.finish }`
//! below, unless a comment says more: one thread; textures are destroyed only on the test's
//! thread, between calls; every command buffer `finish` returns is submitted to the shared
//! queue (in order) or dropped before its `HostFrame` is announced or dropped.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use glam::{Mat4, Vec3};
use understory::Error;
use understory::gpu::draw::{
    DrawOptions, MAX_MESH_INDICES, MAX_MESH_SETS, MAX_MESH_VERTICES, Mesh, Meshes, TreeMeshes,
    Vertex, tree_billboard,
};
use understory::vegetation::{PatchDesc, SpeciesDesc, SpeciesId};
use understory_wgpu::{Forest, ForestDesc, ForestView, SharedDevice, SharedDeviceDesc, wgpu};

// ---------------------------------------------------------------------------------------------
// The device, the forest and images.

fn desc(test: &str) -> Option<SharedDeviceDesc> {
    common::install_logger();
    // The tests that run in this process (not `isolated`) run one at a time (see `alone`).
    common::alone();
    let probe = common::context(test)?;
    drop(probe);
    let options = common::options();
    Some(SharedDeviceDesc {
        adapter_name: std::env::var("UNDERSTORY_DEVICE")
            .ok()
            .filter(|v| v.parse::<u32>().is_err()),
        context: understory::gpu::context::ContextOptions {
            device: None,
            ..options
        },
        ..Default::default()
    })
}

fn shared(test: &str) -> Option<SharedDevice> {
    let d = desc(test)?;
    let s = SharedDevice::new(&d).expect("shared device");
    common::take_log();
    Some(s)
}

/// 0 layer messages and wgpu errors (teardown included), shutdown `Ok` with 0 leaks, nothing
/// bad logged on this thread.
fn finish(test: &str, shared: SharedDevice) {
    let log = shared.message_log();
    let report = shared.shutdown();
    let m = log.read();
    let logged = common::bad_lines(&common::take_log());
    let mut problems = Vec::new();
    if m.layer != 0 || m.wgpu != 0 {
        problems.push(format!(
            "{} layer messages, {} wgpu errors: {:#?}",
            m.layer, m.wgpu, m.texts
        ));
    }
    match &report {
        Ok(r) if r.leaks.is_empty() => {}
        Ok(r) => problems.push(format!("leaks at shutdown: {:?}", r.leaks)),
        Err(e) => problems.push(format!("shutdown failed: {e:?}")),
    }
    if !logged.is_empty() {
        problems.push(format!("logged: {logged:#?}"));
    }
    assert!(problems.is_empty(), "{test}:\n{}", problems.join("\n"));
}

const W: u32 = 128;
const H: u32 = 96;
const COLOR: wgpu::TextureFormat = wgpu::TextureFormat::Rgba8Unorm;
const DEPTH: wgpu::TextureFormat = wgpu::TextureFormat::Depth32Float;

fn texture(
    device: &wgpu::Device,
    format: wgpu::TextureFormat,
    (w, h): (u32, u32),
) -> wgpu::Texture {
    device.create_texture(&wgpu::TextureDescriptor {
        label: Some("review_meshes target"),
        size: wgpu::Extent3d {
            width: w,
            height: h,
            depth_or_array_layers: 1,
        },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format,
        usage: wgpu::TextureUsages::RENDER_ATTACHMENT | wgpu::TextureUsages::COPY_SRC,
        view_formats: &[],
    })
}

fn targets(device: &wgpu::Device) -> (wgpu::Texture, wgpu::Texture) {
    (
        texture(device, COLOR, (W, H)),
        texture(device, DEPTH, (W, H)),
    )
}

const NO_GROUND: DrawOptions = DrawOptions {
    reversed_depth: false,
    ground: false,
};

/// Registers a species of a 32x64 billboard.
fn species(forest: &mut Forest, name: &str, seed: u32) -> SpeciesId {
    forest
        .vegetation_mut()
        .register_species(&SpeciesDesc {
            name,
            width: 32,
            height: 64,
            rgba8: &tree_billboard(32, 64, seed),
        })
        .expect("species")
}

/// Spawns `trees` trees of `species` in rows in front of [`view`]'s camera.
fn spawn(forest: &mut Forest, species: SpeciesId, trees: u32) {
    let instances: Vec<_> = (0..trees)
        .map(|i| understory::world::instance::Instance {
            scale: 3.0 + (i % 7) as f32,
            ..understory::world::instance::Instance::at(Vec3::new(
                1.0 + (i % 20) as f32 * 1.4,
                0.0,
                1.0 + (i / 20) as f32 * 1.9,
            ))
        })
        .collect();
    forest
        .vegetation_mut()
        .spawn(&PatchDesc {
            species,
            instances: &instances,
        })
        .expect("spawn");
}

/// A forest of `trees` trees of one species, without ground.
fn small_forest(shared: &SharedDevice, trees: u32) -> (Forest, SpeciesId) {
    let mut forest = Forest::new(
        shared,
        &ForestDesc {
            draw: NO_GROUND,
            ..Default::default()
        },
    )
    .expect("forest");
    let s = species(&mut forest, "spruce", 1);
    spawn(&mut forest, s, trees);
    (forest, s)
}

fn view() -> ForestView {
    let eye = Vec3::new(14.0, 6.0, -12.0);
    let look = Mat4::look_at_rh(eye, Vec3::new(14.0, 2.0, 20.0), Vec3::Y);
    let flip = Mat4::from_scale(Vec3::new(1.0, -1.0, 1.0));
    ForestView {
        eye,
        view_proj: flip * Mat4::perspective_rh(1.0, W as f32 / H as f32, 0.5, 1000.0) * look,
        fog_m: 700.0,
    }
}

/// A command buffer that clears `color` to black and `depth` to 1.
fn clear(
    device: &wgpu::Device,
    color: &wgpu::Texture,
    depth: &wgpu::Texture,
) -> wgpu::CommandBuffer {
    let mut enc = device.create_command_encoder(&Default::default());
    {
        let cv = color.create_view(&Default::default());
        let dv = depth.create_view(&Default::default());
        let _pass = enc.begin_render_pass(&wgpu::RenderPassDescriptor {
            color_attachments: &[Some(wgpu::RenderPassColorAttachment {
                view: &cv,
                depth_slice: None,
                resolve_target: None,
                ops: wgpu::Operations {
                    load: wgpu::LoadOp::Clear(wgpu::Color::BLACK),
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
            ..Default::default()
        });
    }
    enc.finish()
}

/// A copy of `color` (W x H RGBA8: rows of 512 bytes) into a new mappable buffer.
fn readback(device: &wgpu::Device, color: &wgpu::Texture) -> (wgpu::CommandBuffer, wgpu::Buffer) {
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: u64::from(W * 4 * H),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = device.create_command_encoder(&Default::default());
    enc.copy_texture_to_buffer(
        color.as_image_copy(),
        wgpu::TexelCopyBufferInfo {
            buffer: &buffer,
            layout: wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some(W * 4),
                rows_per_image: None,
            },
        },
        color.size(),
    );
    (enc.finish(), buffer)
}

fn map_bytes(device: &wgpu::Device, buffer: &wgpu::Buffer) -> Vec<u8> {
    let slice = buffer.slice(..);
    let (tx, rx) = std::sync::mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    device
        .poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: Some(Duration::from_secs(120)),
        })
        .expect("poll");
    rx.recv().expect("map callback").expect("map");
    let bytes = slice.get_mapped_range().to_vec();
    buffer.unmap();
    bytes
}

/// How a frame is recorded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `Forest::render` and `SharedDevice::submit`.
    Render,
    /// `cull`, `finish`, `resume`, `draw`, `finish`, one `Queue::submit`, `host_submitted`.
    Split,
}

/// `frames` frames of `forest` into fresh targets (cleared to black); the last image.
fn render_image(shared: &SharedDevice, forest: &mut Forest, frames: u32, mode: Mode) -> Vec<u8> {
    let device = shared.device().clone();
    let (color, depth) = targets(&device);
    let v = view();
    let mut last = None;
    for f in 0..frames {
        let (rb_cmd, rb) = readback(&device, &color);
        let after = if f + 1 == frames {
            last = Some(rb);
            vec![rb_cmd]
        } else {
            vec![]
        };
        let mut frame = shared.begin_frame().expect("frame");
        match mode {
            Mode::Render => {
                unsafe { forest.render(&mut frame, &v, &color, &depth) }.expect("render");
                shared
                    .submit(frame, [clear(&device, &color, &depth)], after)
                    .expect("submit");
            }
            Mode::Split => {
                unsafe { forest.cull(&mut frame, &v) }.expect("cull");
                let (first, host) = unsafe { shared.finish(frame) }.expect("finish the cull");
                let mut frame = shared.resume(host).expect("resume");
                unsafe { forest.draw(&mut frame, &color, &depth) }.expect("draw");
                let (second, host) = unsafe { shared.finish(frame) }.expect("finish the draws");
                let mut cmds = vec![clear(&device, &color, &depth)];
                cmds.extend(first);
                cmds.extend(second);
                cmds.extend(after);
                shared.queue().submit(cmds);
                shared.host_submitted(host).expect("announce");
            }
        }
    }
    map_bytes(&device, &last.expect("a readback"))
}

fn drawn(img: &[u8]) -> usize {
    img.chunks(4).filter(|p| p[..3] != [0, 0, 0]).count()
}

fn differ(x: &[u8], y: &[u8]) -> usize {
    x.chunks(4)
        .zip(y.chunks(4))
        .filter(|(p, q)| p.iter().zip(q.iter()).any(|(u, v)| u.abs_diff(*v) > 2))
        .count()
}

/// Red-dominant pixels: the box's colour (the conifer is green foliage and brown bark).
fn red(img: &[u8]) -> usize {
    img.chunks(4)
        .filter(|p| p[0] > 60 && u16::from(p[0]) > 2 * u16::from(p[1]))
        .count()
}

fn vertex(position: [f32; 3], color: [u8; 4]) -> Vertex {
    Vertex {
        position,
        normal: [0.0, 1.0, 0.0],
        uv: [0.0; 2],
        color,
    }
}

/// A box 0.5 wide and 0.9 tall in red: a mesh set nothing like the conifer.
fn box_tree() -> TreeMeshes {
    let mut vertices = Vec::new();
    let mut indices = Vec::new();
    let (w, h) = (0.25f32, 0.9f32);
    let faces: [([f32; 3], [[f32; 3]; 4]); 5] = [
        (
            [0.0, 0.0, -1.0],
            [[-w, 0.0, -w], [w, 0.0, -w], [w, h, -w], [-w, h, -w]],
        ),
        (
            [1.0, 0.0, 0.0],
            [[w, 0.0, -w], [w, 0.0, w], [w, h, w], [w, h, -w]],
        ),
        (
            [0.0, 0.0, 1.0],
            [[w, 0.0, w], [-w, 0.0, w], [-w, h, w], [w, h, w]],
        ),
        (
            [-1.0, 0.0, 0.0],
            [[-w, 0.0, w], [-w, 0.0, -w], [-w, h, -w], [-w, h, w]],
        ),
        (
            [0.0, 1.0, 0.0],
            [[-w, h, -w], [w, h, -w], [w, h, w], [-w, h, w]],
        ),
    ];
    for (normal, corners) in faces {
        let base = vertices.len() as u32;
        vertices.extend(corners.map(|position| Vertex {
            position,
            normal,
            uv: [0.0; 2],
            color: [220, 30, 30, 0],
        }));
        indices.extend([0, 1, 2, 0, 2, 3].map(|i| base + i));
    }
    let mesh = Mesh { vertices, indices };
    TreeMeshes {
        full: mesh.clone(),
        medium: mesh,
    }
}

/// One small triangle (the tiny set of the padding path).
fn tiny_tree() -> TreeMeshes {
    let c = [220, 30, 30, 0];
    let mesh = Mesh {
        vertices: vec![
            vertex([-0.01, 0.0, 0.0], c),
            vertex([0.01, 0.0, 0.0], c),
            vertex([0.0, 0.02, 0.0], c),
        ],
        indices: vec![0, 1, 2],
    };
    TreeMeshes {
        full: mesh.clone(),
        medium: mesh,
    }
}

/// The most indices a mesh can have: whole triangles, at most [`MAX_MESH_INDICES`].
const MAX_INDICES: usize = MAX_MESH_INDICES / 3 * 3;

/// A mesh of `indices` indices (all zero-area triangles on vertex 0) over `vertices` vertices.
fn degenerate(vertices: usize, indices: usize) -> Mesh {
    Mesh {
        vertices: vec![vertex([0.0, 0.5, 0.0], [0, 255, 0, 0]); vertices],
        indices: vec![0; indices],
    }
}

// ---------------------------------------------------------------------------------------------
// Pure CPU: Meshes and TreeMeshes.

#[test]
fn meshes_new_refuses_bad_sets_with_typed_errors() {
    let conifer = TreeMeshes::conifer();
    conifer.check().expect("the conifer checks");
    let ok = |sets: &[TreeMeshes]| Meshes::new(sets);
    let invalid = |r: understory::Result<Meshes>, what: &str| {
        assert!(
            matches!(r, Err(Error::InvalidInput(_))),
            "{what}: {:?}",
            r.map(|m| m.sets())
        );
    };
    invalid(ok(&[]), "no set");
    invalid(
        ok(&vec![conifer.clone(); MAX_MESH_SETS + 1]),
        "MAX_MESH_SETS + 1 sets",
    );
    let with = |f: &dyn Fn(&mut Mesh)| {
        let mut t = conifer.clone();
        f(&mut t.medium);
        t
    };
    let bad: Vec<(&str, TreeMeshes)> = vec![
        ("empty", with(&|m| *m = Mesh::default())),
        ("no indices", with(&|m| m.indices.clear())),
        ("4 indices", with(&|m| m.indices.truncate(4))),
        (
            "index past the vertices",
            with(&|m| m.indices[5] = m.vertices.len() as u32),
        ),
        ("index u32::MAX", with(&|m| m.indices[0] = u32::MAX)),
        (
            "NaN position",
            with(&|m| m.vertices[3].position[1] = f32::NAN),
        ),
        (
            "inf normal",
            with(&|m| m.vertices[0].normal[2] = f32::INFINITY),
        ),
        (
            "-inf uv",
            with(&|m| m.vertices[1].uv[0] = f32::NEG_INFINITY),
        ),
        (
            "too many indices",
            TreeMeshes {
                full: conifer.full.clone(),
                medium: degenerate(3, MAX_MESH_INDICES + 3),
            },
        ),
        (
            "too many vertices",
            TreeMeshes {
                full: degenerate(MAX_MESH_VERTICES + 1, 3),
                medium: conifer.medium.clone(),
            },
        ),
    ];
    for (what, t) in bad {
        assert!(
            matches!(t.check(), Err(Error::InvalidInput(_))),
            "check: {what}"
        );
        invalid(ok(&[conifer.clone(), t.clone()]), what);
        invalid(ok(&[t]), what);
    }
    // At the limits (whole triangles: MAX_MESH_INDICES is not a multiple of 3): accepted.
    let edge = TreeMeshes {
        full: degenerate(MAX_MESH_VERTICES, MAX_INDICES),
        medium: degenerate(1, 3),
    };
    edge.check().expect("exactly the limits");
    let m = Meshes::new(&[conifer.clone(), edge]).expect("limits");
    assert_eq!(m.sets(), 2);
    assert!(m.fetch()[0] && m.fetch()[1] && !m.fetch()[2]);
    assert_eq!(m.lods()[0].index_count as usize, MAX_INDICES);
    let all = Meshes::new(&vec![conifer.clone(); MAX_MESH_SETS]).expect("MAX_MESH_SETS sets");
    assert_eq!(all.sets() as usize, MAX_MESH_SETS);
    assert_eq!(all.table().len(), 2 + 2 * MAX_MESH_SETS);
    // One set: the trees' own draws (no fetch), the same radius and bounds as trees().
    let one = Meshes::new(std::slice::from_ref(&conifer)).expect("one");
    let trees = Meshes::trees();
    assert_eq!(one.lods(), trees.lods());
    assert_eq!(one.fetch(), [false; 3]);
    assert_eq!(one.radius(), trees.radius());
    assert_eq!(all.radius(), trees.radius(), "copies change no radius");
    // Every table entry points inside the buffers.
    for m in [&one, &all] {
        for e in m.table() {
            assert!((e[0] + e[1]) as usize <= m.indices().len(), "{e:?}");
            assert!((e[2] as usize) < m.vertices().len(), "{e:?}");
        }
        for l in m.lods() {
            assert!((l.first_index + l.index_count) as usize <= m.indices().len());
        }
    }
    // A far vertex: radius and bounds follow it.
    let mut far = box_tree();
    far.full.vertices[0].position = [30.0, -2.0, 40.0];
    let m = Meshes::new(&[conifer, far]).expect("far");
    assert!((m.radius() - (30f32 * 30.0 + 4.0 + 1600.0).sqrt()).abs() < 1e-3);
    let b = m.bounds();
    assert!((b.radius - 50.0).abs() < 1e-3 && b.y_min == -2.0, "{b:?}");
}

/// A mesh whose coordinates are finite but whose length is not (3e38 on each axis):
/// `TreeMeshes::check` and `Meshes::new` accept it, and its radius is infinite.
fn overflowing_tree() -> TreeMeshes {
    let mut t = box_tree();
    t.full.vertices[0].position = [3e38, 3e38, 3e38];
    t
}

#[test]
fn meshes_with_an_infinite_radius_are_refused() {
    let t = overflowing_tree();
    let r = Meshes::new(&[TreeMeshes::conifer(), t]);
    match r {
        Err(Error::InvalidInput(_)) => {}
        Ok(m) => panic!(
            "accepted: radius {}, bounds {:?} (the cull view refuses a radius that is not finite)",
            m.radius(),
            m.bounds()
        ),
        Err(e) => panic!("{e:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Forest: mesh sets.

#[test]
fn max_mesh_sets_draw_and_one_more_is_refused() {
    let test = "max_mesh_sets_draw_and_one_more_is_refused";
    if common::isolated(test) {
        return;
    }
    let Some(shared) = shared(test) else { return };
    let (mut a, _) = small_forest(&shared, 300);
    let image_a = render_image(&shared, &mut a, 3, Mode::Render);
    let (mut b, s) = small_forest(&shared, 300);
    for k in 1..MAX_MESH_SETS as u32 {
        let set = if k == 100 {
            box_tree()
        } else {
            TreeMeshes::conifer()
        };
        assert_eq!(b.add_meshes(set).expect("add"), k);
    }
    let more = b.add_meshes(TreeMeshes::conifer());
    assert!(matches!(more, Err(Error::InvalidInput(_))), "{more:?}");
    b.set_species_meshes(s, MAX_MESH_SETS as u32 - 1)
        .expect("the last set");
    let bad = b.set_species_meshes(s, MAX_MESH_SETS as u32);
    assert!(matches!(bad, Err(Error::InvalidInput(_))), "{bad:?}");
    let image_last = render_image(&shared, &mut b, 3, Mode::Render);
    b.set_species_meshes(s, 100).expect("the box");
    let image_box = render_image(&shared, &mut b, 3, Mode::Split);
    let (da, dbox) = (drawn(&image_a), drawn(&image_box));
    eprintln!(
        "{test}: conifer {da} px, set 255 differs on {}, box {dbox} px ({} red)",
        differ(&image_a, &image_last),
        red(&image_box)
    );
    assert!(da > 2000, "trees cover the view: {da}");
    assert_eq!(differ(&image_a, &image_last), 0, "set 255 is the conifer");
    assert!(
        red(&image_box) > 1000 && red(&image_a) < 50,
        "set 100 is the box"
    );
    drop((a, b));
    finish(test, shared);
}

#[test]
fn a_tiny_set_next_to_a_max_size_set_pads() {
    let test = "a_tiny_set_next_to_a_max_size_set_pads";
    if common::isolated(test) {
        return;
    }
    let Some(shared) = shared(test) else { return };
    let trees = 40;
    let (mut a, _) = small_forest(&shared, trees);
    let image_a = render_image(&shared, &mut a, 2, Mode::Render);
    let (mut b, s) = small_forest(&shared, trees);
    // Set 1: the tiny triangle; set 2: MAX_MESH_INDICES corners of empty triangles over
    // MAX_MESH_VERTICES vertices (every instance runs that many corners); set 3: the conifer.
    assert_eq!(b.add_meshes(tiny_tree()).expect("tiny"), 1);
    let huge = TreeMeshes {
        full: degenerate(MAX_MESH_VERTICES, MAX_INDICES),
        medium: degenerate(MAX_MESH_VERTICES, MAX_INDICES),
    };
    assert_eq!(b.add_meshes(huge).expect("huge"), 2);
    assert_eq!(b.add_meshes(TreeMeshes::conifer()).expect("conifer"), 3);
    b.set_species_meshes(s, 3).expect("conifer");
    let image_conifer = render_image(&shared, &mut b, 2, Mode::Render);
    b.set_species_meshes(s, 1).expect("tiny");
    let image_tiny = render_image(&shared, &mut b, 2, Mode::Split);
    b.set_species_meshes(s, 2).expect("huge, zero-area");
    let image_empty = render_image(&shared, &mut b, 2, Mode::Render);
    eprintln!(
        "{test}: conifer {} px, set 3 differs on {}, tiny {} px, degenerate {} px",
        drawn(&image_a),
        differ(&image_a, &image_conifer),
        drawn(&image_tiny),
        drawn(&image_empty)
    );
    assert!(drawn(&image_a) > 1000);
    assert_eq!(
        differ(&image_a, &image_conifer),
        0,
        "padded conifer draws the same"
    );
    assert!(drawn(&image_tiny) < drawn(&image_a) / 4, "tiny triangles");
    // Only billboards (far trees) may show: the meshes have no area.
    assert!(drawn(&image_empty) < drawn(&image_a) / 4);
    drop((a, b));
    finish(test, shared);
}

#[test]
fn a_mesh_with_an_overflowing_radius_bricks_the_forest() {
    let test = "a_mesh_with_an_overflowing_radius_bricks_the_forest";
    if common::isolated(test) {
        return;
    }
    let Some(shared) = shared(test) else { return };
    let (mut forest, _) = small_forest(&shared, 40);
    render_image(&shared, &mut forest, 1, Mode::Render);
    let added = forest.add_meshes(overflowing_tree());
    let device = shared.device().clone();
    let (color, depth) = targets(&device);
    let mut frame = shared.begin_frame().expect("frame");
    let rendered = unsafe { forest.render(&mut frame, &view(), &color, &depth) };
    eprintln!("{test}: add_meshes {added:?}, render {rendered:?}");
    drop(frame);
    let ok = match (&added, &rendered) {
        (Err(Error::InvalidInput(_)), Ok(_)) => true, // refused up front, forest fine
        (Ok(_), Ok(_)) => true,                       // accepted and drawn
        _ => false,
    };
    drop(forest);
    finish(test, shared);
    assert!(
        ok,
        "add_meshes {added:?} then render {rendered:?}: the accepted set makes every frame fail"
    );
}

#[test]
fn degenerate_and_far_meshes_draw_cleanly() {
    let test = "degenerate_and_far_meshes_draw_cleanly";
    if common::isolated(test) {
        return;
    }
    let Some(shared) = shared(test) else { return };
    let (mut forest, s) = small_forest(&shared, 60);
    let image_a = render_image(&shared, &mut forest, 2, Mode::Render);
    // Set 1: all corners on one vertex, unused vertices; set 2: a triangle far away (1,000
    // tree heights: a huge radius, so nothing is culled; 1e6 is refused) and 1e-30 small;
    // set 3: subnormal.
    let c = [220, 30, 30, 0];
    // Past MAX_MESH_EXTENT: refused.
    let too_far = Mesh {
        vertices: vec![vertex([1e6, 0.0, 0.0], c); 3],
        indices: vec![0, 1, 2],
    };
    assert!(matches!(
        forest.add_meshes(TreeMeshes {
            full: too_far.clone(),
            medium: too_far,
        }),
        Err(understory::Error::InvalidInput(_))
    ));
    let far = Mesh {
        vertices: vec![
            vertex([1000.0, 0.0, 0.0], c),
            vertex([1000.0, 1.0, 0.0], c),
            vertex([1000.0, 0.0, 1.0], c),
            vertex([1e-30, 0.0, 0.0], c),
            vertex([0.0, 1e-30, 0.0], c),
            vertex([0.0, 0.0, 1e-30], c),
        ],
        indices: vec![0, 1, 2, 3, 4, 5],
    };
    let sub = Mesh {
        vertices: vec![vertex([f32::MIN_POSITIVE / 4.0, 0.0, 0.0], c); 3],
        indices: vec![0, 1, 2],
    };
    let sets = [
        TreeMeshes {
            full: degenerate(1000, 999),
            medium: degenerate(1, 3),
        },
        TreeMeshes {
            full: far.clone(),
            medium: far,
        },
        TreeMeshes {
            full: sub.clone(),
            medium: sub,
        },
    ];
    for (k, t) in sets.into_iter().enumerate() {
        assert_eq!(forest.add_meshes(t).expect("add") as usize, k + 1);
    }
    let mut images = Vec::new();
    for set in 1..=3 {
        forest.set_species_meshes(s, set).expect("set");
        let mode = if set == 2 { Mode::Split } else { Mode::Render };
        images.push(render_image(&shared, &mut forest, 2, mode));
    }
    forest
        .set_species_meshes(s, 0)
        .expect("back to the conifer");
    let image_back = render_image(&shared, &mut forest, 2, Mode::Render);
    eprintln!(
        "{test}: conifer {} px; degenerate sets {:?} px; back to set 0 differs on {}",
        drawn(&image_a),
        images.iter().map(|i| drawn(i)).collect::<Vec<_>>(),
        differ(&image_a, &image_back)
    );
    assert!(drawn(&image_a) > 1000);
    assert_eq!(
        differ(&image_a, &image_back),
        0,
        "set 0 again draws as before"
    );
    drop(forest);
    finish(test, shared);
}

#[test]
fn species_meshes_follow_ids_through_unregister_and_bad_ids() {
    let test = "species_meshes_follow_ids_through_unregister_and_bad_ids";
    if common::isolated(test) {
        return;
    }
    let Some(shared) = shared(test) else { return };
    let (mut forest, s) = small_forest(&shared, 300);
    let image_a = render_image(&shared, &mut forest, 2, Mode::Render);
    assert_eq!(forest.add_meshes(box_tree()).expect("box"), 1);
    // A second species with no patches, mapped to the box, then unregistered: its id comes
    // back with the next species, which (as documented) keeps the box.
    let other = species(&mut forest, "fir", 2);
    forest.set_species_meshes(other, 1).expect("other → box");
    render_image(&shared, &mut forest, 1, Mode::Render);
    forest
        .vegetation_mut()
        .unregister_species(other)
        .expect("unregister");
    // An unregistered id: still accepted (the choice belongs to the id).
    forest
        .set_species_meshes(other, 1)
        .expect("an unregistered id");
    render_image(&shared, &mut forest, 1, Mode::Render);
    let again = species(&mut forest, "pine", 3);
    assert_eq!(again.index(), other.index(), "ids are reused");
    // Move the trees to the re-registered species: despawn all, respawn as `again`.
    let mut fresh = Forest::new(
        &shared,
        &ForestDesc {
            draw: NO_GROUND,
            ..Default::default()
        },
    )
    .expect("forest");
    let s0 = species(&mut fresh, "spruce", 1);
    let s1 = species(&mut fresh, "fir", 2);
    assert_eq!(fresh.add_meshes(box_tree()).expect("box"), 1);
    fresh.set_species_meshes(s1, 1).expect("fir → box");
    fresh
        .vegetation_mut()
        .unregister_species(s1)
        .expect("unregister");
    let s2 = species(&mut fresh, "pine", 3);
    assert_eq!(s2.index(), s1.index());
    spawn(&mut fresh, s2, 300);
    let image_kept = render_image(&shared, &mut fresh, 2, Mode::Split);
    fresh.set_species_meshes(s2, 0).expect("pine → conifer");
    let image_reset = render_image(&shared, &mut fresh, 2, Mode::Render);
    let _ = s0;
    // Bad sets change nothing.
    for set in [2, 3, u32::MAX] {
        let r = fresh.set_species_meshes(s2, set);
        assert!(matches!(r, Err(Error::InvalidInput(_))), "set {set}: {r:?}");
    }
    let image_reset_again = render_image(&shared, &mut fresh, 2, Mode::Render);
    eprintln!(
        "{test}: conifer {} px, kept box {} red px, reset {} red px",
        drawn(&image_a),
        red(&image_kept),
        red(&image_reset)
    );
    assert!(drawn(&image_a) > 2000);
    assert!(red(&image_kept) > 1000, "the id kept the box");
    assert!(red(&image_reset) < 50, "set 0 again");
    assert_eq!(differ(&image_reset, &image_reset_again), 0);
    // The species of the first forest draws unchanged (set 0).
    let image_s = render_image(&shared, &mut forest, 2, Mode::Render);
    let _ = s;
    assert_eq!(differ(&image_a, &image_s), 0, "s never left set 0");
    drop((forest, fresh));
    finish(test, shared);
}

// ---------------------------------------------------------------------------------------------
// Forest: add_meshes and set_species_meshes in the middle of frames.

#[test]
fn add_meshes_between_cull_and_draw() {
    let test = "add_meshes_between_cull_and_draw";
    if common::isolated(test) {
        return;
    }
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut forest, s) = small_forest(&shared, 300);
    let image_a = render_image(&shared, &mut forest, 2, Mode::Render);
    let (color, depth) = targets(&device);
    let v = view();

    // One frame: cull, add a set, draw: the draw pass is gone (typed error), the frame still
    // submits (its cull ran), and nothing is left unannounced.
    let mut frame = shared.begin_frame().expect("frame");
    unsafe { forest.cull(&mut frame, &v) }.expect("cull");
    assert_eq!(forest.add_meshes(box_tree()).expect("box"), 1);
    forest.set_species_meshes(s, 1).expect("species → box");
    let drawn_after_add = unsafe { forest.draw(&mut frame, &color, &depth) };
    eprintln!("{test}: draw after add_meshes: {drawn_after_add:?}");
    assert!(
        matches!(
            drawn_after_add,
            Ok(()) | Err(Error::Lifecycle(_) | Error::InvalidInput(_))
        ),
        "{drawn_after_add:?}"
    );
    shared
        .submit(frame, [clear(&device, &color, &depth)], [])
        .expect("submit");

    // The same in two parts, the set added between the host's parts.
    let mut frame = shared.begin_frame().expect("frame");
    unsafe { forest.cull(&mut frame, &v) }.expect("cull");
    let (first, host) = unsafe { shared.finish(frame) }.expect("finish");
    assert_eq!(
        forest.add_meshes(TreeMeshes::conifer()).expect("conifer"),
        2
    );
    let mut frame = shared.resume(host).expect("resume");
    let r = unsafe { forest.draw(&mut frame, &color, &depth) };
    assert!(
        matches!(
            r,
            Ok(()) | Err(Error::Lifecycle(_) | Error::InvalidInput(_))
        ),
        "{r:?}"
    );
    let (second, host) = unsafe { shared.finish(frame) }.expect("finish");
    let mut cmds = vec![clear(&device, &color, &depth)];
    cmds.extend(first);
    cmds.extend(second);
    shared.queue().submit(cmds);
    shared.host_submitted(host).expect("announce");

    // The next frames draw the box (set 1), then the conifer copy (set 2) as set 0 did.
    let image_box = render_image(&shared, &mut forest, 2, Mode::Render);
    forest.set_species_meshes(s, 2).expect("set 2");
    let image_2 = render_image(&shared, &mut forest, 2, Mode::Split);
    eprintln!(
        "{test}: box {} red px; conifer copy differs on {}",
        red(&image_box),
        differ(&image_a, &image_2)
    );
    assert!(red(&image_box) > 1000);
    assert_eq!(differ(&image_a, &image_2), 0);
    drop(forest);
    finish(test, shared);
}

#[test]
fn set_species_meshes_between_cull_and_draw_applies_next_frame() {
    let test = "set_species_meshes_between_cull_and_draw_applies_next_frame";
    if common::isolated(test) {
        return;
    }
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut forest, s) = small_forest(&shared, 300);
    forest.add_meshes(box_tree()).expect("box");
    let image_a = render_image(&shared, &mut forest, 2, Mode::Render);
    let (color, depth) = targets(&device);
    let v = view();
    let mut frame = shared.begin_frame().expect("frame");
    unsafe { forest.cull(&mut frame, &v) }.expect("cull");
    forest.set_species_meshes(s, 1).expect("→ box");
    unsafe { forest.draw(&mut frame, &color, &depth) }.expect("draw");
    let (rb_cmd, rb) = readback(&device, &color);
    shared
        .submit(frame, [clear(&device, &color, &depth)], [rb_cmd])
        .expect("submit");
    let this_frame = map_bytes(&device, &rb);
    let next = render_image(&shared, &mut forest, 1, Mode::Render);
    eprintln!(
        "{test}: this frame {} red px (conifer differs on {}), next {} red",
        red(&this_frame),
        differ(&image_a, &this_frame),
        red(&next)
    );
    assert_eq!(
        differ(&image_a, &this_frame),
        0,
        "the frame's species table was recorded by its cull"
    );
    assert!(red(&next) > 1000);
    drop(forest);
    finish(test, shared);
}

// ---------------------------------------------------------------------------------------------
// Forest: cull and draw lifecycles.

#[test]
fn cull_and_draw_misuse_across_frames_is_typed() {
    let test = "cull_and_draw_misuse_across_frames_is_typed";
    if common::isolated(test) {
        return;
    }
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut forest, _) = small_forest(&shared, 300);
    let (color, depth) = targets(&device);
    let v = view();
    // Draw without any cull ever (no draw pass yet).
    let mut frame = shared.begin_frame().expect("frame");
    let r = unsafe { forest.draw(&mut frame, &color, &depth) };
    assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
    unsafe { forest.cull(&mut frame, &v) }.expect("cull");
    // Culled in frame N, submitted without draws; drawn in frame N+1: refused.
    shared.submit(frame, [], []).expect("submit the cull alone");
    let mut frame = shared.begin_frame().expect("frame");
    let r = unsafe { forest.draw(&mut frame, &color, &depth) };
    assert!(matches!(r, Err(Error::Lifecycle(_))), "N+1: {r:?}");
    // Cull then render in one frame: the render's cull is refused, nothing half-recorded.
    unsafe { forest.cull(&mut frame, &v) }.expect("cull");
    let r = unsafe { forest.render(&mut frame, &v, &color, &depth) };
    assert!(
        matches!(r, Err(Error::Lifecycle(_))),
        "render after cull: {r:?}"
    );
    unsafe { forest.draw(&mut frame, &color, &depth) }.expect("draw");
    let r = unsafe { forest.draw(&mut frame, &color, &depth) };
    assert!(matches!(r, Err(Error::Lifecycle(_))), "twice: {r:?}");
    // Cull again after the draw in the same frame: the docs say "not culled twice in one
    // frame"; it is accepted (as `render` twice in one frame is), so it must then draw
    // cleanly (validation is checked at the end).
    let r = unsafe { forest.cull(&mut frame, &v) }.map(drop);
    eprintln!("{test}: cull after draw in the same frame: {r:?}");
    match r {
        Ok(()) => unsafe { forest.draw(&mut frame, &color, &depth) }.expect("second draw"),
        Err(e) => assert!(matches!(e, Error::Lifecycle(_)), "{e:?}"),
    }
    let (rb_cmd, rb) = readback(&device, &color);
    shared
        .submit(frame, [clear(&device, &color, &depth)], [rb_cmd])
        .expect("submit");
    let img = map_bytes(&device, &rb);
    assert!(drawn(&img) > 2000, "the frame drew: {}", drawn(&img));
    // Bad views: typed, nothing recorded.
    let mut frame = shared.begin_frame().expect("frame");
    for bad in [
        ForestView { fog_m: 0.0, ..v },
        ForestView {
            fog_m: f32::NAN,
            ..v
        },
        ForestView {
            eye: Vec3::splat(f32::INFINITY),
            ..v
        },
        ForestView {
            view_proj: Mat4::from_cols_array(&[f32::NAN; 16]),
            ..v
        },
        ForestView {
            view_proj: Mat4::ZERO,
            ..v
        },
    ] {
        let r = unsafe { forest.cull(&mut frame, &bad) };
        assert!(
            matches!(r, Err(Error::InvalidInput(_))),
            "{bad:?}: {:?}",
            r.map(|_| ())
        );
    }
    unsafe { forest.render(&mut frame, &v, &color, &depth) }.expect("render after bad views");
    shared
        .submit(frame, [clear(&device, &color, &depth)], [])
        .expect("submit");
    drop(forest);
    finish(test, shared);
}

#[test]
fn draw_in_a_new_frame_after_a_dropped_culled_frame_is_refused() {
    let test = "draw_in_a_new_frame_after_a_dropped_culled_frame_is_refused";
    if common::isolated(test) {
        return;
    }
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut forest, _) = small_forest(&shared, 300);
    let (color, depth) = targets(&device);
    let v = view();
    render_image(&shared, &mut forest, 2, Mode::Render);
    let mut frame = shared.begin_frame().expect("frame");
    let value = frame.frame().value();
    unsafe { forest.cull(&mut frame, &v) }.expect("cull");
    drop(frame); // nothing of it reaches the GPU
    let mut frame = shared.begin_frame().expect("the next frame");
    let reused = frame.frame().value() == value;
    let r = unsafe { forest.draw(&mut frame, &color, &depth) };
    eprintln!("{test}: value reused {reused}; draw without a cull in this frame: {r:?}");
    // Not submitted: the draws would read a cull (and draw constants) that never ran.
    drop(frame);
    drop(forest);
    finish(test, shared);
    assert!(
        matches!(r, Err(Error::Lifecycle(_))),
        "Forest::draw in a frame that was never culled: {r:?}"
    );
}

#[test]
fn draw_after_a_refused_submit_is_refused() {
    let test = "draw_after_a_refused_submit_is_refused";
    if common::isolated(test) {
        return;
    }
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut forest, _) = small_forest(&shared, 300);
    let v = view();
    render_image(&shared, &mut forest, 2, Mode::Render);
    let (color, depth) = targets(&device);
    // A frame culled, holding targets (as a host that takes them before its draw would),
    // refused at submit because one was destroyed: dropped, nothing of it ran.
    let mut frame = shared.begin_frame().expect("frame");
    unsafe { forest.cull(&mut frame, &v) }.expect("cull");
    frame
        .targets(&color, &depth)
        .expect("targets held by the frame");
    color.destroy();
    let value = frame.frame().value();
    let refused = shared.submit(frame, [], []);
    assert!(
        matches!(refused, Err(Error::InvalidInput(_))),
        "{refused:?}"
    );
    let (color, depth) = targets(&device);
    let mut frame = shared.begin_frame().expect("next frame");
    let reused = frame.frame().value() == value;
    let r = unsafe { forest.draw(&mut frame, &color, &depth) };
    eprintln!("{test}: value reused {reused}; draw without a cull: {r:?}");
    drop(frame);
    drop(forest);
    finish(test, shared);
    assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
}

#[test]
fn wrong_targets_in_draw_after_a_good_cull() {
    let test = "wrong_targets_in_draw_after_a_good_cull";
    if common::isolated(test) {
        return;
    }
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut forest, _) = small_forest(&shared, 300);
    let v = view();
    let (color, depth) = targets(&device);
    let small_depth = texture(&device, DEPTH, (W / 2, H));
    let bgra = texture(&device, wgpu::TextureFormat::Bgra8Unorm, (W, H));
    let rgba16 = texture(&device, wgpu::TextureFormat::Rgba16Float, (W, H));
    let depth24 = texture(&device, wgpu::TextureFormat::Depth24Plus, (W, H));
    let dead = texture(&device, COLOR, (W, H));
    dead.destroy();
    let no_attachment = device.create_texture(&wgpu::TextureDescriptor {
        label: None,
        size: wgpu::Extent3d {
            width: W,
            height: H,
            depth_or_array_layers: 1,
        },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format: COLOR,
        usage: wgpu::TextureUsages::TEXTURE_BINDING,
        view_formats: &[],
    });
    for split in [false, true] {
        let mut frame = shared.begin_frame().expect("frame");
        unsafe { forest.cull(&mut frame, &v) }.expect("cull");
        let mut first = Vec::new();
        if split {
            let (cmds, host) = unsafe { shared.finish(frame) }.expect("finish");
            first = cmds;
            frame = shared.resume(host).expect("resume");
        }
        let bad: [(&wgpu::Texture, &wgpu::Texture, &str); 7] = [
            (&color, &small_depth, "sizes differ"),
            (&bgra, &depth, "another colour format"),
            (&rgba16, &depth, "unsupported colour format"),
            (&color, &depth24, "unsupported depth format"),
            (&depth, &color, "swapped"),
            (&dead, &depth, "destroyed"),
            (&no_attachment, &depth, "no RENDER_ATTACHMENT"),
        ];
        for (c, d, what) in bad {
            let r = unsafe { forest.draw(&mut frame, c, d) };
            assert!(
                matches!(r, Err(Error::InvalidInput(_) | Error::Lifecycle(_))),
                "{what}: {r:?}"
            );
        }
        unsafe { forest.draw(&mut frame, &color, &depth) }.expect("draw into good targets");
        let (rb_cmd, rb) = readback(&device, &color);
        if split {
            let (second, host) = unsafe { shared.finish(frame) }.expect("finish");
            let mut cmds = vec![clear(&device, &color, &depth)];
            cmds.extend(first);
            cmds.extend(second);
            cmds.push(rb_cmd);
            shared.queue().submit(cmds);
            shared.host_submitted(host).expect("announce");
        } else {
            shared
                .submit(frame, [clear(&device, &color, &depth)], [rb_cmd])
                .expect("submit");
        }
        let img = map_bytes(&device, &rb);
        assert!(drawn(&img) > 2000, "split {split}: {} px", drawn(&img));
    }
    drop(forest);
    finish(test, shared);
}

#[test]
fn a_target_destroyed_between_draw_and_finish() {
    let test = "a_target_destroyed_between_draw_and_finish";
    if common::isolated(test) {
        return;
    }
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut forest, _) = small_forest(&shared, 300);
    let v = view();
    render_image(&shared, &mut forest, 1, Mode::Render);
    // Split: cull part submitted by the host; draw into a target destroyed before finish.
    let (color, depth) = targets(&device);
    let mut frame = shared.begin_frame().expect("frame");
    unsafe { forest.cull(&mut frame, &v) }.expect("cull");
    let (first, host) = unsafe { shared.finish(frame) }.expect("finish");
    let mut frame = shared.resume(host).expect("resume");
    unsafe { forest.draw(&mut frame, &color, &depth) }.expect("draw");
    color.destroy();
    let r = unsafe { shared.finish(frame) };
    assert!(
        matches!(r, Err(Error::InvalidInput(_))),
        "{:?}",
        r.map(|_| ())
    );
    // The host submits the first part it already has; the frame was sent to be announced.
    shared.queue().submit(first);
    // Render (one part) into a depth target destroyed before finish.
    let (color, depth) = targets(&device);
    let mut frame = shared.begin_frame().expect("frame");
    unsafe { forest.render(&mut frame, &v, &color, &depth) }.expect("render");
    depth.destroy();
    let r = unsafe { shared.finish(frame) };
    assert!(
        matches!(r, Err(Error::InvalidInput(_))),
        "{:?}",
        r.map(|_| ())
    );
    // And more frames are fine.
    let img = render_image(&shared, &mut forest, 3, Mode::Split);
    assert!(drawn(&img) > 2000);
    drop(forest);
    finish(test, shared);
}

// ---------------------------------------------------------------------------------------------
// SharedDevice: finish, resume, host_submitted, submit.

#[test]
fn host_frames_resumed_dropped_and_announced_in_odd_orders() {
    let test = "host_frames_resumed_dropped_and_announced_in_odd_orders";
    if common::isolated(test) {
        return;
    }
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut forest, _) = small_forest(&shared, 300);
    let v = view();
    let (color, depth) = targets(&device);

    // A frame is open while its HostFrame lives: no next frame begins (typed).
    let mut frame = shared.begin_frame().expect("frame");
    unsafe { forest.cull(&mut frame, &v) }.expect("cull");
    let (first, host) = unsafe { shared.finish(frame) }.expect("finish");
    let r = shared.begin_frame().map(drop);
    assert!(
        matches!(r, Err(Error::Lifecycle(_))),
        "begin_frame with a HostFrame alive: {r:?}"
    );
    // Resumed: still open.
    let mut frame = shared.resume(host).expect("resume");
    let r = shared.begin_frame().map(drop);
    assert!(
        matches!(r, Err(Error::Lifecycle(_))),
        "begin_frame with a resumed frame alive: {r:?}"
    );
    unsafe { forest.draw(&mut frame, &color, &depth) }.expect("draw");
    // Resumed frame given to submit: refused (and announced later).
    shared.queue().submit(first);
    let r = shared.submit(frame, [], []);
    assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");

    // A resumed frame just dropped (its first part submitted).
    let mut frame = shared
        .begin_frame()
        .expect("frame after a refused resumed submit");
    unsafe { forest.cull(&mut frame, &v) }.expect("cull");
    let (first, host) = unsafe { shared.finish(frame) }.expect("finish");
    shared.queue().submit(first);
    let frame = shared.resume(host).expect("resume");
    drop(frame);

    // Resume twice in a row (finish, resume, finish, resume, ...), the draw in the third part.
    let mut frame = shared.begin_frame().expect("frame");
    unsafe { forest.cull(&mut frame, &v) }.expect("cull");
    let mut parts = vec![clear(&device, &color, &depth)];
    let (cmds, host) = unsafe { shared.finish(frame) }.expect("finish 1");
    parts.extend(cmds);
    let frame = shared.resume(host).expect("resume 1");
    let (cmds, host) = unsafe { shared.finish(frame) }.expect("finish 2 (empty part)");
    parts.extend(cmds);
    let mut frame = shared.resume(host).expect("resume 2");
    unsafe { forest.draw(&mut frame, &color, &depth) }.expect("draw");
    let (cmds, host) = unsafe { shared.finish(frame) }.expect("finish 3");
    parts.extend(cmds);
    let (rb_cmd, rb) = readback(&device, &color);
    parts.push(rb_cmd);
    shared.queue().submit(parts);
    shared.host_submitted(host).expect("announce");
    let img = map_bytes(&device, &rb);
    assert!(drawn(&img) > 2000, "three parts: {} px", drawn(&img));

    // A HostFrame dropped (its command buffers dropped unsubmitted): announced at the next
    // begin_frame; then a finish whose HostFrame is announced twice is impossible (moved).
    let mut frame = shared.begin_frame().expect("frame");
    unsafe { forest.render(&mut frame, &v, &color, &depth) }.expect("render");
    let (cmds, host) = unsafe { shared.finish(frame) }.expect("finish");
    drop(cmds);
    drop(host);
    // An empty frame finished, resumed, finished, announced.
    let frame = shared
        .begin_frame()
        .expect("frame after a dropped HostFrame");
    let (cmds, host) = unsafe { shared.finish(frame) }.expect("finish empty");
    shared.queue().submit(cmds);
    let frame = shared.resume(host).expect("resume empty");
    let (cmds, host) = unsafe { shared.finish(frame) }.expect("finish empty 2");
    shared.queue().submit(cmds);
    shared.host_submitted(host).expect("announce");

    let img = render_image(&shared, &mut forest, 3, Mode::Split);
    assert!(drawn(&img) > 2000);
    drop(forest);
    finish(test, shared);
}

#[test]
fn host_frames_of_another_shared_device() {
    let test = "host_frames_of_another_shared_device";
    if common::isolated(test) {
        return;
    }
    let Some(a) = shared(test) else { return };
    let b = SharedDevice::new(&desc(test).expect("desc")).expect("second shared device");
    let (mut forest_a, _) = small_forest(&a, 100);
    let (mut forest_b, _) = small_forest(&b, 100);
    let v = view();
    let (ca, da) = targets(a.device());
    let (cb, db) = targets(b.device());

    // A HostFrame of A resumed on B: refused; A's frame is announced at A's next begin_frame.
    let mut frame = a.begin_frame().expect("a frame");
    unsafe { forest_a.cull(&mut frame, &v) }.expect("cull a");
    let (first, host) = unsafe { a.finish(frame) }.expect("finish a");
    a.queue().submit(first);
    let r = b.resume(host).map(drop);
    assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
    // B is unaffected; A's next frame begins.
    let mut frame = b.begin_frame().expect("b frame");
    let r = unsafe { forest_a.cull(&mut frame, &v) };
    assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
    unsafe { forest_b.render(&mut frame, &v, &cb, &db) }.expect("render b");
    let (cmds, host_b) = unsafe { b.finish(frame) }.expect("finish b");
    b.queue().submit(cmds);
    // B's HostFrame announced on A: refused (and B's frame announced at B's next frame).
    let r = a.host_submitted(host_b);
    assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
    // A's frame given to B's submit and finish: refused.
    let mut frame = a.begin_frame().expect("a frame after the refused resume");
    unsafe { forest_a.render(&mut frame, &v, &ca, &da) }.expect("render a");
    let r = b.submit(frame, [], []);
    assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
    let frame = a.begin_frame().expect("a frame");
    let r = unsafe { b.finish(frame) }.map(drop);
    assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
    // Textures of B given to A's forest draw: refused.
    let mut frame = a.begin_frame().expect("a frame");
    unsafe { forest_a.cull(&mut frame, &v) }.expect("cull a");
    let r = unsafe { forest_a.draw(&mut frame, &cb, &db) };
    assert!(
        matches!(r, Err(Error::InvalidInput(_) | Error::Lifecycle(_))),
        "{r:?}"
    );
    unsafe { forest_a.draw(&mut frame, &ca, &da) }.expect("draw a");
    a.submit(frame, [clear(a.device(), &ca, &da)], [])
        .expect("submit a");
    let img_a = render_image(&a, &mut forest_a, 2, Mode::Split);
    let img_b = render_image(&b, &mut forest_b, 2, Mode::Split);
    assert!(drawn(&img_a) > 1000 && drawn(&img_b) > 1000);
    assert_eq!(differ(&img_a, &img_b), 0, "the same forest on both");
    drop((forest_a, forest_b, ca, da, cb, db));
    // Messages are per process instance: read once, after both shut down.
    let rb = b.shutdown().expect("shutdown b");
    assert!(rb.leaks.is_empty(), "{:?}", rb.leaks);
    finish(test, a);
}

// ---------------------------------------------------------------------------------------------
// Core passes on the shared context: a draw pass and a cull pass of other meshes.

/// Records, into `frame`, a cull of no sources by `cull` and (inside a rendering scope over
/// `color`/`depth`) `draw`'s prepare and record; returns what `DrawPass::record` returned.
/// With `swap`, `cull.set_meshes(swap)` runs between the cull's record and the draw's.
///
/// # Safety
/// As `WgpuFrame::record`; the frame is dropped by the caller, never submitted.
#[allow(clippy::too_many_arguments)]
unsafe fn cull_then_draw(
    shared: &SharedDevice,
    frame: &mut understory_wgpu::WgpuFrame<'_>,
    cull: &mut understory::gpu::cull::CullPass,
    draw: &understory::gpu::draw::DrawPass,
    page: &understory::gpu::memory::Image,
    color: &wgpu::Texture,
    depth: &wgpu::Texture,
    swap: Option<[understory::gpu::cull::DrawIndexedIndirect; 3]>,
) -> understory::Result<()> {
    use ash::vk;
    let t = frame.targets(color, depth)?;
    let device = shared.context().device().clone();
    let v = view();
    let bands = understory::vegetation::VegetationConfig::default().lod;
    let cull_view =
        understory::gpu::cull::CullView::new(v.view_proj, v.eye, draw.radius(), &bands, 1.0)?;
    let constants =
        understory::gpu::draw::DrawFrame::new(v.view_proj, v.eye, v.fog_m, [0.0; 3], false);
    let mut out = Ok(());
    // SAFETY: understory objects through their functions for this frame; the targets in the
    // layouts `targets` returned them in; the rendering scope is closed before returning.
    unsafe {
        frame.record(|f, cmd| {
            cull.record(f, cmd, &[], &cull_view)?;
            draw.prepare(f, cmd, cull, &constants, &[])?;
            if let Some(m) = swap {
                cull.set_meshes(m);
            }
            let color_att = [vk::RenderingAttachmentInfo::default()
                .image_view(t.color.1)
                .image_layout(vk::ImageLayout::COLOR_ATTACHMENT_OPTIMAL)
                .load_op(vk::AttachmentLoadOp::LOAD)
                .store_op(vk::AttachmentStoreOp::STORE)];
            let depth_att = vk::RenderingAttachmentInfo::default()
                .image_view(t.depth.1)
                .image_layout(vk::ImageLayout::DEPTH_STENCIL_ATTACHMENT_OPTIMAL)
                .load_op(vk::AttachmentLoadOp::LOAD)
                .store_op(vk::AttachmentStoreOp::STORE);
            let rendering = vk::RenderingInfo::default()
                .render_area(vk::Rect2D {
                    offset: vk::Offset2D::default(),
                    extent: t.extent,
                })
                .layer_count(1)
                .color_attachments(&color_att)
                .depth_attachment(&depth_att);
            device.cmd_begin_rendering(cmd, &rendering);
            out = draw.record(f, cmd, cull, page, t.extent);
            device.cmd_end_rendering(cmd);
            Ok(())
        })?;
    }
    out
}

#[test]
fn a_cull_pass_of_other_meshes_is_refused_by_the_draw_pass() {
    let test = "a_cull_pass_of_other_meshes_is_refused_by_the_draw_pass";
    if common::isolated(test) {
        return;
    }
    let Some(shared) = shared(test) else { return };
    let ctx = shared.context();
    let device = shared.device().clone();
    let (mut forest, _) = small_forest(&shared, 10);
    // One frame so that the atlas page is uploaded (SHADER_READ_ONLY_OPTIMAL).
    render_image(&shared, &mut forest, 1, Mode::Render);
    let page = forest.vegetation().atlas_page(0).expect("page");
    let conifer = Meshes::trees();
    let boxes = Meshes::new(&[box_tree()]).expect("box meshes");
    assert_ne!(conifer.lods(), boxes.lods());
    let cull_desc = |m: &Meshes| understory::gpu::cull::CullDesc {
        compaction: understory::gpu::cull::Compaction::Atomic,
        capacity: 4096,
        adaptive: false,
        meshes: m.lods(),
        records: true,
        max_sources_per_dispatch: 1,
        views: 1,
    };
    let mut cull = understory::gpu::cull::CullPass::from_desc(ctx, &cull_desc(&conifer))
        .expect("cull pass (conifer)");
    let vk_color = ash::vk::Format::R8G8B8A8_UNORM;
    let vk_depth = ash::vk::Format::D32_SFLOAT;
    let draw_box = understory::gpu::draw::DrawPass::with_meshes(
        ctx, vk_color, vk_depth, page, 0, NO_GROUND, &boxes,
    )
    .expect("draw pass (box)");
    assert_eq!(draw_box.mesh_sets(), 1);
    assert_eq!(draw_box.lod_meshes(), boxes.lods());
    let (color, depth) = targets(&device);

    // 1. The cull pass of the conifer, the draw pass of the box: refused.
    let mut frame = shared.begin_frame().expect("frame");
    let r = unsafe {
        cull_then_draw(
            &shared, &mut frame, &mut cull, &draw_box, page, &color, &depth, None,
        )
    };
    assert!(matches!(r, Err(Error::InvalidInput(_))), "mismatch: {r:?}");
    drop(frame);

    // 2. The same, with set_meshes(box) after the cull recorded the conifer's args.
    cull.set_meshes(conifer.lods());
    let mut frame = shared.begin_frame().expect("frame");
    let r = unsafe {
        cull_then_draw(
            &shared,
            &mut frame,
            &mut cull,
            &draw_box,
            page,
            &color,
            &depth,
            Some(boxes.lods()),
        )
    };
    eprintln!(
        "{test}: set_meshes between the cull's record and the draw's: {r:?} (args recorded: {:?}; box index buffer: {} indices)",
        conifer.lods(),
        boxes.indices().len()
    );
    // Never submitted: the draw would index the box's buffers with the conifer's ranges.
    drop(frame);
    drop((cull, draw_box, forest));
    finish(test, shared);
    assert!(
        matches!(r, Err(Error::InvalidInput(_))),
        "DrawPass::record accepted a cull whose recorded args are of other meshes: {r:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Device limits: mesh buffers bound whole as storage buffers.

#[test]
fn mesh_buffers_past_max_storage_buffer_range() {
    let test = "mesh_buffers_past_max_storage_buffer_range";
    if common::isolated(test) {
        return;
    }
    let Some(shared) = shared(test) else { return };
    let ctx = shared.context();
    // SAFETY: the context's physical device, of its live instance.
    let props = unsafe {
        ctx.instance()
            .get_physical_device_properties(ctx.adapter().handle)
    };
    let range = u64::from(props.limits.max_storage_buffer_range);
    // Each set: full and medium of MAX_MESH_VERTICES vertices (36 bytes), one triangle each.
    let per_set = 2 * MAX_MESH_VERTICES as u64 * std::mem::size_of::<Vertex>() as u64;
    let sets = range / per_set + 1;
    let worst = MAX_MESH_SETS as u64 * per_set;
    eprintln!(
        "{test}: maxStorageBufferRange {range} bytes; {per_set} bytes of vertices per set; {sets} sets pass it; MAX_MESH_SETS sets of MAX_MESH_VERTICES take {worst} bytes"
    );
    if sets >= MAX_MESH_SETS as u64 || sets * per_set > 3 << 30 {
        // Not a skip (the GPU suite makes skips fatal): a range this large (NVIDIA: 4 GiB)
        // takes more than 3 GiB of meshes to pass; the refusal is checked where the range
        // is smaller (lavapipe: 128 MiB).
        eprintln!("{test}: a buffer past this range needs more than 3 GiB of meshes: not built");
        let log = shared.message_log();
        let report = shared.shutdown().expect("shutdown");
        assert!(report.leaks.is_empty(), "{:?}", report.leaks);
        assert_eq!(log.read().layer, 0);
        return;
    }
    let (mut forest, s) = small_forest(&shared, 20);
    let big = TreeMeshes {
        full: degenerate(MAX_MESH_VERTICES, 3),
        medium: degenerate(MAX_MESH_VERTICES, 3),
    };
    let mut added = Ok(0);
    for _ in 0..sets {
        added = forest.add_meshes(big.clone());
        if added.is_err() {
            break;
        }
    }
    eprintln!("{test}: add_meshes x {sets}: {added:?}");
    let device = shared.device().clone();
    let (color, depth) = targets(&device);
    let mut frame = shared.begin_frame().expect("frame");
    if let Ok(set) = &added {
        forest.set_species_meshes(s, *set).expect("the last set");
    }
    let r = unsafe { forest.render(&mut frame, &view(), &color, &depth) }.map(drop);
    eprintln!("{test}: render: {r:?}");
    if r.is_ok() {
        shared
            .submit(frame, [clear(&device, &color, &depth)], [])
            .expect("submit");
    } else {
        drop(frame);
    }
    let typed = added.is_err() || r.is_err();
    drop(forest);
    finish(test, shared);
    assert!(
        typed,
        "a typed error, not a binding past the device's limit"
    );
}
