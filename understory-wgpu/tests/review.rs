//! Adversarial review of `understory-wgpu`'s safe API (lavapipe, the Khronos layer with
//! synchronization validation, wgpu's own validation). Each test drives a sequence of safe
//! calls and checks what the docs promise: typed errors for bad input, 0 layer messages,
//! 0 wgpu errors, 0 leaks at shutdown, no panic in library code, no fake success.
//!
//! Besides `SharedDevice::messages()` (which is read before shutdown), a test logger records
//! every warning and error logged on the test's thread, so that messages raised during
//! teardown (shutdown, drops) and the library's own `log::error!`s are seen too.
//!
//! SAFETY of every `unsafe { ….render(..) }` below: `Forest::render`'s one promise holds, as
//! each test destroys textures and buffers only on its own thread, between calls.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use glam::{Mat4, Vec3};
use understory::Error;
use understory::gpu::draw::tree_billboard;
use understory::vegetation::{PatchDesc, PatchId, SpeciesDesc, SpeciesId, Viewer};
use understory_wgpu::{Forest, ForestDesc, ForestView, SharedDevice, SharedDeviceDesc, wgpu};

// ---------------------------------------------------------------------------------------------
// The device and the forest.

fn desc(test: &str) -> Option<SharedDeviceDesc> {
    common::install_logger();
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
    common::take_log(); // start-up noise (none expected) is not the test's
    Some(s)
}

const W: u32 = 160;
const H: u32 = 90;
const COLOR: wgpu::TextureFormat = wgpu::TextureFormat::Rgba8Unorm;
const DEPTH: wgpu::TextureFormat = wgpu::TextureFormat::Depth32Float;

/// A forest of the demo's world with `trees` trees; returns it and its patches.
fn forest(shared: &SharedDevice, trees: u64) -> (Forest, Vec<PatchId>) {
    let (f, ids, _) = forest_with_species(shared, trees);
    (f, ids)
}

/// Spawns `trees` more trees (seed `seed`).
fn spawn(forest: &mut Forest, species: &[SpeciesId], trees: u64, seed: u64) -> Vec<PatchId> {
    let generated = understory_cli::demo::forest(forest.vegetation().config(), trees, seed, None);
    generated
        .iter()
        .map(|(sp, instances)| {
            forest
                .vegetation_mut()
                .spawn(&PatchDesc {
                    species: species[*sp],
                    instances,
                })
                .expect("spawn")
        })
        .collect()
}

fn forest_with_species(
    shared: &SharedDevice,
    trees: u64,
) -> (Forest, Vec<PatchId>, Vec<SpeciesId>) {
    let mut forest = Forest::new(
        shared,
        &ForestDesc {
            config: understory_cli::demo::world_config(),
            color_format: COLOR,
            depth_format: DEPTH,
            ..Default::default()
        },
    )
    .expect("forest");
    let species: Vec<_> = understory_cli::demo::SPECIES
        .iter()
        .enumerate()
        .map(|(k, (name, _))| {
            forest
                .vegetation_mut()
                .register_species(&SpeciesDesc {
                    name,
                    width: 64,
                    height: 128,
                    rgba8: &tree_billboard(64, 128, k as u32 + 1),
                })
                .expect("species")
        })
        .collect();
    let ids = spawn(&mut forest, &species, trees, 1);
    (forest, ids, species)
}

/// The demo camera (at the start of its lap) for a `w`×`h` image.
fn view(forest: &Forest, w: u32, h: u32) -> ForestView {
    let c = forest.vegetation().config().clone();
    let fog_m = c.lod.billboard_m * 1.15;
    let (eye, look) =
        understory_cli::demo::camera(0.1, understory_cli::demo::lap_radius(c.world_size_m));
    let mut proj = Mat4::perspective_rh(60f32.to_radians(), w as f32 / h as f32, 0.5, fog_m * 1.5);
    proj.y_axis.y = -proj.y_axis.y;
    ForestView {
        eye,
        view_proj: proj * Mat4::look_at_rh(eye, look, Vec3::Y),
        fog_m,
    }
}

fn texture(
    device: &wgpu::Device,
    format: wgpu::TextureFormat,
    w: u32,
    h: u32,
    mips: u32,
    layers: u32,
) -> wgpu::Texture {
    device.create_texture(&wgpu::TextureDescriptor {
        label: Some("review target"),
        size: wgpu::Extent3d {
            width: w,
            height: h,
            depth_or_array_layers: layers,
        },
        mip_level_count: mips,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format,
        usage: wgpu::TextureUsages::RENDER_ATTACHMENT | wgpu::TextureUsages::COPY_SRC,
        view_formats: &[],
    })
}

/// The app's colour and depth targets.
fn targets(device: &wgpu::Device) -> (wgpu::Texture, wgpu::Texture) {
    (
        texture(device, COLOR, W, H, 1, 1),
        texture(device, DEPTH, W, H, 1, 1),
    )
}

/// Trees a good frame of these small forests draws at least (the 3,000-tree reference draws
/// 225 on lavapipe, the 2,000-tree ones about 150).
const MIN_TREES: u64 = 20;

/// Magenta: no tree is that colour.
const CLEAR: [u8; 4] = [255, 0, 255, 255];

/// The app's pass: clear colour to magenta and depth to the far plane.
fn clear(
    device: &wgpu::Device,
    color: &wgpu::Texture,
    depth: &wgpu::Texture,
) -> wgpu::CommandBuffer {
    let mut enc = device.create_command_encoder(&Default::default());
    let cv = color.create_view(&wgpu::TextureViewDescriptor {
        mip_level_count: Some(1),
        ..Default::default()
    });
    let dv = depth.create_view(&wgpu::TextureViewDescriptor {
        mip_level_count: Some(1),
        ..Default::default()
    });
    {
        let _pass = enc.begin_render_pass(&wgpu::RenderPassDescriptor {
            label: Some("review clear"),
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

/// A readback of the forest's indirect arguments: the command buffer and the buffer it fills.
fn args_readback(
    device: &wgpu::Device,
    args: &wgpu::Buffer,
) -> (wgpu::CommandBuffer, wgpu::Buffer) {
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("review args readback"),
        size: args.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut enc = device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(args, 0, &buffer, 0, args.size());
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
            timeout: Some(Duration::from_secs(30)),
        })
        .expect("poll");
    rx.recv().expect("map callback").expect("map");
    let bytes = slice.get_mapped_range().to_vec();
    buffer.unmap();
    bytes
}

/// Tree instances the read-back indirect arguments draw (every LOD and phase).
fn trees_in_args(device: &wgpu::Device, buffer: &wgpu::Buffer) -> u64 {
    let bytes = map_bytes(device, buffer);
    bytes
        .chunks_exact(20)
        .map(|d| u64::from(u32::from_le_bytes(d[4..8].try_into().unwrap())))
        .sum()
}

/// A readback of `color` (mip 0): the command buffer and the buffer it fills.
fn readback(device: &wgpu::Device, color: &wgpu::Texture) -> (wgpu::CommandBuffer, wgpu::Buffer) {
    let row = (color.width() * 4).div_ceil(256) * 256;
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("review readback"),
        size: u64::from(row) * u64::from(color.height()),
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
                bytes_per_row: Some(row),
                rows_per_image: None,
            },
        },
        wgpu::Extent3d {
            width: color.width(),
            height: color.height(),
            depth_or_array_layers: 1,
        },
    );
    (enc.finish(), buffer)
}

/// Pixels of a readback that are not the clear colour.
fn drawn_pixels(device: &wgpu::Device, buffer: &wgpu::Buffer, w: u32, h: u32) -> u64 {
    let bytes = map_bytes(device, buffer);
    let row = ((w * 4).div_ceil(256) * 256) as usize;
    let mut n = 0;
    for y in 0..h as usize {
        n += bytes[y * row..][..w as usize * 4]
            .chunks(4)
            .filter(|p| *p != CLEAR)
            .count() as u64;
    }
    n
}

/// One ordinary frame: clear, the forest, and (if asked) a readback of its indirect arguments.
fn frame(
    shared: &SharedDevice,
    forest: &mut Forest,
    color: &wgpu::Texture,
    depth: &wgpu::Texture,
    read: bool,
) -> Option<wgpu::Buffer> {
    let device = shared.device().clone();
    let mut f = shared.begin_frame().expect("begin_frame");
    let v = view(forest, color.width(), color.height());
    unsafe { forest.render(&mut f, &v, color, depth) }.expect("render");
    let (after, buffer) = if read {
        let (cmd, b) = args_readback(&device, &forest.indirect_args().buffer);
        (vec![cmd], Some(b))
    } else {
        (vec![], None)
    };
    shared
        .submit(f, [clear(&device, color, depth)], after)
        .expect("submit");
    buffer
}

/// `frames` frames, the last one's indirect arguments read back: the trees it drew.
fn frames_drawn(
    shared: &SharedDevice,
    forest: &mut Forest,
    color: &wgpu::Texture,
    depth: &wgpu::Texture,
    frames: u32,
) -> u64 {
    let mut last = None;
    for i in 0..frames {
        last = frame(shared, forest, color, depth, i + 1 == frames);
    }
    let b = last.expect("a readback");
    trees_in_args(shared.device(), &b)
}

/// Everything the docs promise at the end: 0 layer messages and wgpu errors before shutdown,
/// shutdown `Ok` with 0 leaks, and nothing bad logged on this thread (teardown included).
fn finish(test: &str, shared: SharedDevice) {
    let m = shared.messages();
    let report = shared.shutdown();
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

fn check(problems: &mut Vec<String>, ok: bool, what: impl Into<String>) {
    if !ok {
        problems.push(what.into());
    }
}

fn messages_line(shared: &SharedDevice) -> Option<String> {
    let m = shared.messages();
    (m.layer + m.wgpu > 0).then(|| {
        format!(
            "{} layer messages, {} wgpu errors: {:#?}",
            m.layer, m.wgpu, m.texts
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Frames.

/// Frames that recorded the forest and were dropped without submit: nothing of them reached
/// the GPU, so later frames must upload again and draw the forest.
#[test]
fn dropped_rendered_frames_then_more_frames_draw_the_forest() {
    if common::isolated("dropped_rendered_frames_then_more_frames_draw_the_forest") {
        return;
    }
    let test = "review_dropped_frames";
    let Some(shared) = shared(test) else { return };
    let (mut forest, _) = forest(&shared, 3_000);
    let (color, depth) = targets(shared.device());
    for _ in 0..3 {
        let mut f = shared.begin_frame().expect("begin");
        let v = view(&forest, W, H);
        unsafe { forest.render(&mut f, &v, &color, &depth) }.expect("render");
        drop(f);
    }
    let drawn = frames_drawn(&shared, &mut forest, &color, &depth, 3);
    eprintln!("{test}: drawn {drawn}");
    assert!(
        drawn > MIN_TREES,
        "{test}: the forest is drawn after dropped frames ({drawn} trees)"
    );
    drop(forest);
    finish(test, shared);
}

/// The reference: the same forest without dropped frames (how much a good frame draws).
#[test]
fn reference_frames_draw_the_forest() {
    if common::isolated("reference_frames_draw_the_forest") {
        return;
    }
    let test = "review_reference";
    let Some(shared) = shared(test) else { return };
    let (mut forest, _) = forest(&shared, 3_000);
    let (color, depth) = targets(shared.device());
    let drawn = frames_drawn(&shared, &mut forest, &color, &depth, 3);
    eprintln!("{test}: drawn {drawn}");
    assert!(drawn > MIN_TREES, "{test}: {drawn} px");
    drop(forest);
    finish(test, shared);
}

/// A frame of device A submitted to device B, and a forest of B rendered with A's frame:
/// `Lifecycle`, nothing else.
#[test]
fn frames_of_another_shared_device_are_refused() {
    if common::isolated("frames_of_another_shared_device_are_refused") {
        return;
    }
    let test = "review_two_devices";
    let Some(a) = shared(test) else { return };
    let Some(b) = shared(test) else { return };
    let (mut forest_b, _) = forest(&b, 1_000);
    let (color_b, depth_b) = targets(b.device());
    let fa = a.begin_frame().expect("frame of a");
    let r = b.submit(fa, [], []);
    assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
    let mut fa = a
        .begin_frame()
        .expect("a again (the refused frame was dropped)");
    let v = view(&forest_b, W, H);
    let r = unsafe { forest_b.render(&mut fa, &v, &color_b, &depth_b) };
    assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
    a.submit(fa, [], []).expect("a's own frame");
    let drawn = frames_drawn(&b, &mut forest_b, &color_b, &depth_b, 2);
    assert!(drawn > 0);
    drop(forest_b);
    finish(test, a);
    finish(test, b);
}

/// Textures of device B handed to a forest of device A (with A's frame): the docs say the safe
/// surface checks its targets; another device's texture must be a typed error, never raw
/// handles of another `VkDevice` recorded into A's command buffer.
#[test]
fn targets_of_another_device_are_a_typed_error() {
    if common::isolated("targets_of_another_device_are_a_typed_error") {
        return;
    }
    let test = "review_foreign_targets";
    let Some(a) = shared(test) else { return };
    let Some(b) = shared(test) else { return };
    let (mut forest_a, _) = forest(&a, 1_000);
    let (color_b, depth_b) = targets(b.device());
    let mut problems = Vec::new();
    let mut fa = a.begin_frame().expect("frame");
    let v = view(&forest_a, W, H);
    let r = unsafe { forest_a.render(&mut fa, &v, &color_b, &depth_b) };
    check(
        &mut problems,
        matches!(r, Err(Error::InvalidInput(_) | Error::Lifecycle(_))),
        format!("render into another device's textures: {r:?}"),
    );
    let s = a.submit(fa, [], []);
    eprintln!("{test}: submit {s:?}");
    if let Some(m) = messages_line(&a) {
        problems.push(format!("device a: {m}"));
    }
    if let Some(m) = messages_line(&b) {
        problems.push(format!("device b: {m}"));
    }
    drop(forest_a);
    let ra = a.shutdown();
    check(
        &mut problems,
        ra.as_ref().is_ok_and(|r| r.leaks.is_empty()),
        format!("shutdown a: {ra:?}"),
    );
    drop((color_b, depth_b));
    let rb = b.shutdown();
    check(
        &mut problems,
        rb.as_ref().is_ok_and(|r| r.leaks.is_empty()),
        format!("shutdown b: {rb:?}"),
    );
    let logged = common::bad_lines(&common::take_log());
    check(
        &mut problems,
        logged.is_empty(),
        format!("logged: {logged:#?}"),
    );
    assert!(problems.is_empty(), "{test}:\n{}", problems.join("\n"));
}

/// A colour target the app destroyed (`wgpu::Texture::destroy`, safe) before the frame: a typed
/// error, and the frame stays good (as `bad_targets_and_an_empty_forest_are_typed_errors`
/// submits a frame after `InvalidInput`s).
#[test]
fn a_destroyed_target_is_a_typed_error_and_the_frame_stays_good() {
    if common::isolated("a_destroyed_target_is_a_typed_error_and_the_frame_stays_good") {
        return;
    }
    let test = "review_destroyed_before_render";
    let Some(shared) = shared(test) else { return };
    let (mut forest, _) = forest(&shared, 2_000);
    let (color, depth) = targets(shared.device());
    frames_drawn(&shared, &mut forest, &color, &depth, 2);
    color.destroy();
    let mut problems = Vec::new();
    let mut f = shared.begin_frame().expect("begin");
    let v = view(&forest, W, H);
    let r = unsafe { forest.render(&mut f, &v, &color, &depth) };
    check(
        &mut problems,
        matches!(r, Err(Error::InvalidInput(_))),
        format!("render into a destroyed texture: {r:?}"),
    );
    let s = shared.submit(f, [], []);
    check(
        &mut problems,
        s.is_ok(),
        format!("submit after the typed error: {s:?}"),
    );
    if let Some(m) = messages_line(&shared) {
        problems.push(m);
    }
    drop(forest);
    let report = shared.shutdown();
    check(
        &mut problems,
        report.as_ref().is_ok_and(|r| r.leaks.is_empty()),
        format!("shutdown: {report:?}"),
    );
    let logged = common::bad_lines(&common::take_log());
    check(
        &mut problems,
        logged.is_empty(),
        format!("logged: {logged:#?}"),
    );
    assert!(problems.is_empty(), "{test}:\n{}", problems.join("\n"));
}

/// The app destroys its colour target after `render` and before `submit`. The README says the
/// submission then fails as a whole; `submit` must not report it as done (`Ok` with a
/// submission index that never reached the GPU), and shutdown must still be clean.
#[test]
fn a_target_destroyed_between_render_and_submit() {
    if common::isolated("a_target_destroyed_between_render_and_submit") {
        return;
    }
    let test = "review_destroyed_before_submit";
    let Some(shared) = shared(test) else { return };
    let (mut forest, _) = forest(&shared, 2_000);
    let (color, depth) = targets(shared.device());
    frames_drawn(&shared, &mut forest, &color, &depth, 2);
    let mut problems = Vec::new();
    let mut f = shared.begin_frame().expect("begin");
    let v = view(&forest, W, H);
    unsafe { forest.render(&mut f, &v, &color, &depth) }.expect("render");
    color.destroy();
    let s = shared.submit(f, [], []);
    check(
        &mut problems,
        s.is_err(),
        format!("submit of a frame whose target was destroyed returned {s:?}"),
    );
    if let Some(m) = messages_line(&shared) {
        eprintln!("{test}: (expected wgpu error) {m}");
    }
    drop(forest);
    let report = shared.shutdown();
    check(
        &mut problems,
        report.as_ref().is_ok_and(|r| r.leaks.is_empty()),
        format!("shutdown after that frame: {report:?}"),
    );
    let logged = common::bad_lines(&common::take_log());
    let logged: Vec<_> = logged
        .into_iter()
        .filter(|l| !l.contains("has been destroyed")) // wgpu's own report of the app's misuse
        .collect();
    check(
        &mut problems,
        logged.is_empty(),
        format!("logged: {logged:#?}"),
    );
    assert!(problems.is_empty(), "{test}:\n{}", problems.join("\n"));
}

/// A submission wgpu refuses (the app's `before` command buffer is invalid: its encoder had a
/// validation error) must not be announced to understory as submitted: the frame's uploads
/// never ran. Afterwards the forest must still be drawn, and shutdown must be clean.
#[test]
fn a_submission_wgpu_refuses_is_not_reported_as_submitted() {
    if common::isolated("a_submission_wgpu_refuses_is_not_reported_as_submitted") {
        return;
    }
    let test = "review_refused_submission";
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut forest, _) = forest(&shared, 3_000);
    let (color, depth) = targets(&device);
    let mut problems = Vec::new();
    // The very first frame (it carries every upload) goes with an invalid app command buffer.
    let small = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("small"),
        size: 16,
        usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let mut enc = device.create_command_encoder(&Default::default());
    enc.copy_buffer_to_buffer(&small, 0, &small, 8, 64); // out of range: wgpu validation error
    let invalid = enc.finish();
    let mut f = shared.begin_frame().expect("begin");
    let v = view(&forest, W, H);
    unsafe { forest.render(&mut f, &v, &color, &depth) }.expect("render");
    let s = shared.submit(f, [invalid], []);
    check(
        &mut problems,
        s.is_err(),
        format!("a submission wgpu refused came back {s:?}"),
    );
    let drawn = frames_drawn(&shared, &mut forest, &color, &depth, 3);
    check(
        &mut problems,
        drawn > MIN_TREES,
        format!("after the refused frame, 3 good frames draw {drawn} trees"),
    );
    let m = shared.messages();
    eprintln!("{test}: {} layer, {} wgpu: {:?}", m.layer, m.wgpu, m.texts);
    check(
        &mut problems,
        m.layer == 0,
        format!("layer messages: {:?}", m.texts),
    );
    drop(forest);
    let report = shared.shutdown();
    check(
        &mut problems,
        report.as_ref().is_ok_and(|r| r.leaks.is_empty()),
        format!("shutdown: {report:?}"),
    );
    assert!(problems.is_empty(), "{test}:\n{}", problems.join("\n"));
}

/// As above, with the refused submission the last one before shutdown.
#[test]
fn shutdown_after_a_refused_last_submission() {
    if common::isolated("shutdown_after_a_refused_last_submission") {
        return;
    }
    let test = "review_refused_last";
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut forest, _) = forest(&shared, 1_000);
    let (color, depth) = targets(&device);
    frames_drawn(&shared, &mut forest, &color, &depth, 2);
    let mut enc = device.create_command_encoder(&Default::default());
    let small = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("small"),
        size: 16,
        usage: wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    enc.clear_buffer(&small, 0, Some(64)); // out of range: invalid command buffer
    let invalid = enc.finish();
    let f = shared.begin_frame().expect("begin");
    let s = shared.submit(f, [invalid], []);
    eprintln!("{test}: submit {s:?}");
    drop(forest);
    let report = shared.shutdown();
    assert!(
        report.as_ref().is_ok_and(|r| r.leaks.is_empty()),
        "{test}: shutdown after a refused submission: {report:?}"
    );
}

/// `forest.indirect_args().buffer` is a plain `&wgpu::Buffer`: `destroy` is safe. The next
/// `render` must be a typed error, never a `vkCmdCopyBuffer` into a destroyed `VkBuffer`.
#[test]
fn destroying_the_indirect_args_buffer_then_rendering() {
    if common::isolated("destroying_the_indirect_args_buffer_then_rendering") {
        return;
    }
    let test = "review_args_destroyed";
    let Some(shared) = shared(test) else { return };
    let (mut forest, _) = forest(&shared, 2_000);
    let (color, depth) = targets(shared.device());
    frames_drawn(&shared, &mut forest, &color, &depth, 2);
    forest.indirect_args().buffer.destroy();
    let mut problems = Vec::new();
    // Let wgpu carry out the destruction (the last submission that used it is done).
    shared
        .device()
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    let mut f = shared.begin_frame().expect("begin");
    let v = view(&forest, W, H);
    let r = unsafe { forest.render(&mut f, &v, &color, &depth) };
    check(
        &mut problems,
        matches!(r, Err(Error::InvalidInput(_) | Error::Lifecycle(_))),
        format!("render with a destroyed args buffer: {r:?}"),
    );
    if r.is_ok() {
        let s = shared.submit(f, [], []);
        eprintln!("{test}: submit {s:?}");
    } else {
        drop(f);
    }
    let m = shared.messages();
    check(
        &mut problems,
        m.layer == 0,
        format!("{} layer messages: {:#?}", m.layer, m.texts),
    );
    check(
        &mut problems,
        m.wgpu == 0,
        format!("{} wgpu errors", m.wgpu),
    );
    drop(forest);
    let report = shared.shutdown();
    check(
        &mut problems,
        report.as_ref().is_ok_and(|r| r.leaks.is_empty()),
        format!("shutdown: {report:?}"),
    );
    assert!(problems.is_empty(), "{test}:\n{}", problems.join("\n"));
}

/// The args buffer destroyed between `render` and `submit` of the first frame (nothing in
/// flight uses it, so wgpu destroys it at once while the recorded copy still names it).
#[test]
fn destroying_the_indirect_args_buffer_before_submit() {
    if common::isolated("destroying_the_indirect_args_buffer_before_submit") {
        return;
    }
    let test = "review_args_destroyed_before_submit";
    let Some(shared) = shared(test) else { return };
    let (mut forest, _) = forest(&shared, 1_000);
    let (color, depth) = targets(shared.device());
    let mut problems = Vec::new();
    let mut f = shared.begin_frame().expect("begin");
    let v = view(&forest, W, H);
    unsafe { forest.render(&mut f, &v, &color, &depth) }.expect("render");
    forest.indirect_args().buffer.destroy();
    let s = shared.submit(f, [], []);
    check(&mut problems, s.is_err(), format!("submit returned {s:?}"));
    let m = shared.messages();
    check(
        &mut problems,
        m.layer == 0,
        format!("{} layer messages: {:#?}", m.layer, m.texts),
    );
    drop(forest);
    let report = shared.shutdown();
    check(
        &mut problems,
        report.as_ref().is_ok_and(|r| r.leaks.is_empty()),
        format!("shutdown: {report:?}"),
    );
    assert!(problems.is_empty(), "{test}:\n{}", problems.join("\n"));
}

/// Targets destroyed and dropped right after submit, the forest dropped with frames in flight,
/// then shutdown: wgpu and understory keep what the GPU still uses.
#[test]
fn everything_dropped_or_destroyed_while_frames_are_in_flight() {
    if common::isolated("everything_dropped_or_destroyed_while_frames_are_in_flight") {
        return;
    }
    let test = "review_drop_in_flight";
    let Some(shared) = shared(test) else { return };
    let (mut forest, ids) = forest(&shared, 2_000);
    let (color, depth) = targets(shared.device());
    frame(&shared, &mut forest, &color, &depth, false);
    // despawn while that frame is in flight
    for id in ids.iter().take(ids.len() / 2) {
        forest.vegetation_mut().despawn(*id).expect("despawn");
    }
    frame(&shared, &mut forest, &color, &depth, false);
    color.destroy();
    depth.destroy();
    forest.indirect_args().buffer.destroy();
    drop((color, depth));
    drop(forest);
    finish(test, shared);
}

/// A forest dropped while the frame it recorded into is still open, then that frame
/// submitted: the frame's commands use the forest's objects.
#[test]
fn forest_dropped_between_render_and_submit() {
    if common::isolated("forest_dropped_between_render_and_submit") {
        return;
    }
    let test = "review_forest_dropped_open_frame";
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut forest, _) = forest(&shared, 2_000);
    let (color, depth) = targets(&device);
    frame(&shared, &mut forest, &color, &depth, false);
    let mut f = shared.begin_frame().expect("begin");
    let v = view(&forest, W, H);
    unsafe { forest.render(&mut f, &v, &color, &depth) }.expect("render");
    drop(forest);
    shared
        .submit(f, [clear(&device, &color, &depth)], [])
        .expect("submit");
    // and one more (empty) frame after
    let f = shared.begin_frame().expect("begin");
    shared.submit(f, [], []).expect("submit");
    finish(test, shared);
}

/// `render` twice in one frame, and two forests in one frame.
#[test]
fn render_twice_in_one_frame_and_two_forests() {
    if common::isolated("render_twice_in_one_frame_and_two_forests") {
        return;
    }
    let test = "review_render_twice";
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut a, _) = forest(&shared, 1_500);
    let (mut b, _) = forest(&shared, 1_500);
    let (color, depth) = targets(&device);
    for i in 0..3 {
        let mut f = shared.begin_frame().expect("begin");
        let v = view(&a, W, H);
        let r1 = unsafe { a.render(&mut f, &v, &color, &depth) };
        let r2 = unsafe { a.render(&mut f, &v, &color, &depth) };
        let r3 = unsafe { b.render(&mut f, &v, &color, &depth) };
        eprintln!(
            "{test} {i}: {:?} / {:?} / {:?}",
            r1.as_ref().map(|_| ()),
            r2.as_ref().map(|_| ()),
            r3.as_ref().map(|_| ())
        );
        r1.expect("first render");
        assert!(
            r2.is_ok() || matches!(r2, Err(Error::Lifecycle(_) | Error::InvalidInput(_))),
            "{r2:?}"
        );
        r3.expect("second forest");
        let s = shared.submit(f, [clear(&device, &color, &depth)], []);
        assert!(
            s.is_ok() || matches!(s, Err(Error::Lifecycle(_))),
            "submit: {s:?}"
        );
    }
    let drawn = frames_drawn(&shared, &mut a, &color, &depth, 2);
    assert!(drawn > 0);
    drop((a, b));
    finish(test, shared);
}

/// Targets with several mips (the forest draws mip 0), and targets the docs refuse: several
/// layers, several samples, sizes that differ.
#[test]
fn odd_targets() {
    if common::isolated("odd_targets") {
        return;
    }
    let test = "review_odd_targets";
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut forest, _) = forest(&shared, 1_000);
    let mip_color = texture(&device, COLOR, W, H, 4, 1);
    let mip_depth = texture(&device, DEPTH, W, H, 3, 1);
    let layered = texture(&device, COLOR, W, H, 1, 2);
    let small_depth = texture(&device, DEPTH, W / 2, H, 1, 1);
    let (color, depth) = targets(&device);
    let msaa = device.create_texture(&wgpu::TextureDescriptor {
        label: None,
        size: wgpu::Extent3d {
            width: W,
            height: H,
            depth_or_array_layers: 1,
        },
        mip_level_count: 1,
        sample_count: 4,
        dimension: wgpu::TextureDimension::D2,
        format: COLOR,
        usage: wgpu::TextureUsages::RENDER_ATTACHMENT,
        view_formats: &[],
    });
    let v = view(&forest, W, H);
    let mut f = shared.begin_frame().expect("begin");
    for (c, d, what) in [
        (&layered, &depth, "two layers"),
        (&color, &small_depth, "sizes differ"),
        (&msaa, &depth, "4 samples"),
    ] {
        let r = unsafe { forest.render(&mut f, &v, c, d) };
        assert!(matches!(r, Err(Error::InvalidInput(_))), "{what}: {r:?}");
    }
    unsafe { forest.render(&mut f, &v, &mip_color, &mip_depth) }.expect("mipped targets");
    shared
        .submit(f, [clear(&device, &mip_color, &mip_depth)], [])
        .expect("submit");
    let drawn = frames_drawn(&shared, &mut forest, &mip_color, &mip_depth, 2);
    assert!(drawn > 0, "{test}: mip 0 shows the forest");
    // 1×1 targets
    let one_c = texture(&device, COLOR, 1, 1, 1, 1);
    let one_d = texture(&device, DEPTH, 1, 1, 1, 1);
    frames_drawn(&shared, &mut forest, &one_c, &one_d, 2);
    drop(forest);
    finish(test, shared);
}

/// Extreme view parameters: a typed error or a frame, never a panic or a validation message.
#[test]
fn extreme_views() {
    if common::isolated("extreme_views") {
        return;
    }
    let test = "review_extreme_views";
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut forest, _) = forest(&shared, 2_000);
    let (color, depth) = targets(&device);
    let good = view(&forest, W, H);
    let views = [
        (
            "fog +inf",
            ForestView {
                fog_m: f32::INFINITY,
                ..good
            },
        ),
        (
            "fog f32::MAX",
            ForestView {
                fog_m: f32::MAX,
                ..good
            },
        ),
        (
            "fog 1e-30",
            ForestView {
                fog_m: 1e-30,
                ..good
            },
        ),
        (
            "fog NaN",
            ForestView {
                fog_m: f32::NAN,
                ..good
            },
        ),
        (
            "fog -1",
            ForestView {
                fog_m: -1.0,
                ..good
            },
        ),
        (
            "zero matrix",
            ForestView {
                view_proj: Mat4::ZERO,
                ..good
            },
        ),
        (
            "huge matrix",
            ForestView {
                view_proj: Mat4::from_diagonal(glam::Vec4::splat(1e38)),
                ..good
            },
        ),
        (
            "eye 1e30",
            ForestView {
                eye: Vec3::splat(1e30),
                ..good
            },
        ),
        (
            "eye f32::MAX",
            ForestView {
                eye: Vec3::new(f32::MAX, -f32::MAX, f32::MAX),
                ..good
            },
        ),
        (
            "matrix inf",
            ForestView {
                view_proj: Mat4::from_diagonal(glam::Vec4::splat(f32::INFINITY)),
                ..good
            },
        ),
    ];
    for (what, v) in views {
        let mut f = shared.begin_frame().expect("begin");
        let r = unsafe { forest.render(&mut f, &v, &color, &depth) };
        eprintln!(
            "{test}: {what}: {:?}",
            r.as_ref().map(|u| u.decision.quality)
        );
        let s = shared.submit(f, [clear(&device, &color, &depth)], []);
        if r.is_ok() {
            s.expect("submit");
        }
        if let Some(m) = messages_line(&shared) {
            panic!("{test}: after {what}: {m}");
        }
    }
    let drawn = frames_drawn(&shared, &mut forest, &color, &depth, 3);
    assert!(drawn > 0, "{test}: the forest after extreme views");
    drop(forest);
    finish(test, shared);
}

/// understory's own frames (`shared.context().begin_frame()`, safe) while a `WgpuFrame` is
/// open, and between frames, used for a vegetation update and dropped.
#[test]
fn context_frames_interleaved_with_wgpu_frames() {
    if common::isolated("context_frames_interleaved_with_wgpu_frames") {
        return;
    }
    let test = "review_ctx_frames";
    let Some(shared) = shared(test) else { return };
    let (mut forest, _) = forest(&shared, 2_000);
    let (color, depth) = targets(shared.device());
    frame(&shared, &mut forest, &color, &depth, false);
    {
        let f = shared.begin_frame().expect("begin");
        let r = shared.context().begin_frame();
        assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
        shared.submit(f, [], []).expect("submit");
    }
    {
        let raw = shared
            .context()
            .begin_frame()
            .expect("a context frame between frames");
        let r = shared.begin_frame();
        assert!(matches!(r, Err(Error::Lifecycle(_))), "{:?}", r.map(|_| ()));
        let v = view(&forest, W, H);
        forest
            .vegetation_mut()
            .update(&raw, Viewer::with_view(v.eye, v.view_proj))
            .expect("update on a context frame");
        drop(raw);
    }
    let drawn = frames_drawn(&shared, &mut forest, &color, &depth, 3);
    assert!(drawn > MIN_TREES, "{test}: {drawn}");
    // A context frame left open at shutdown.
    let raw = shared.context().begin_frame().expect("open");
    drop(forest);
    let m = shared.messages();
    let report = shared.shutdown();
    drop(raw);
    let logged = common::bad_lines(&common::take_log());
    assert_eq!(m.layer + m.wgpu, 0, "{:?}", m.texts);
    assert!(
        report.as_ref().is_ok_and(|r| r.leaks.is_empty()),
        "{test}: shutdown with a context frame open: {report:?}"
    );
    assert!(logged.is_empty(), "{logged:#?}");
}

/// `SharedDevice` dropped without `shutdown`, frames in flight, the forest still alive (it is
/// dropped after): nothing freed in use, nothing logged as an error, and the wgpu device works.
#[test]
fn shared_device_dropped_without_shutdown() {
    if common::isolated("shared_device_dropped_without_shutdown") {
        return;
    }
    let test = "review_drop_without_shutdown";
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let queue = shared.queue().clone();
    let (mut forest, _) = forest(&shared, 2_000);
    let (color, depth) = targets(&device);
    for _ in 0..2 {
        frame(&shared, &mut forest, &color, &depth, false);
    }
    let m = shared.messages();
    drop(shared);
    drop(forest);
    assert_eq!(m.layer + m.wgpu, 0, "{:?}", m.texts);
    // the app's wgpu device still works
    let (cmd, b) = readback(&device, &color);
    queue.submit([clear(&device, &color, &depth), cmd]);
    assert_eq!(drawn_pixels(&device, &b, W, H), 0);
    drop((color, depth, b, queue, device));
    let logged = common::bad_lines(&common::take_log());
    assert!(logged.is_empty(), "{test}: {logged:#?}");
}

/// Many frames with `budget()` every frame and without the app polling, all patches despawned
/// with frames in flight, an empty forest rendered, patches back.
#[test]
fn many_frames_budget_despawn_all_and_respawn() {
    if common::isolated("many_frames_budget_despawn_all_and_respawn") {
        return;
    }
    let test = "review_many_frames";
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut forest, ids, species) = forest_with_species(&shared, 2_000);
    let (color, depth) = targets(&device);
    for _ in 0..12 {
        frame(&shared, &mut forest, &color, &depth, false);
        let b = shared.budget().expect("budget");
        let _ = b.to_string();
    }
    for id in &ids {
        forest.vegetation_mut().despawn(*id).expect("despawn");
    }
    let drawn = frames_drawn(&shared, &mut forest, &color, &depth, 4);
    assert_eq!(drawn, 0, "{test}: an empty forest draws no trees");
    // back, while the empty frames may still be in flight
    spawn(&mut forest, &species, 2_000, 1);
    let drawn = frames_drawn(&shared, &mut forest, &color, &depth, 3);
    assert!(
        drawn > MIN_TREES,
        "{test}: the forest is back ({drawn} trees)"
    );
    for _ in 0..3 {
        let _ = shared.budget().expect("budget");
    }
    drop(forest);
    finish(test, shared);
}

/// A tiny budget cap: frames keep coming (typed errors at worst), nothing invalid.
#[test]
fn tiny_budget_cap() {
    if common::isolated("tiny_budget_cap") {
        return;
    }
    let test = "review_tiny_cap";
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let (mut forest, _) = forest(&shared, 2_000);
    let (color, depth) = targets(&device);
    frame(&shared, &mut forest, &color, &depth, false);
    forest
        .vegetation_mut()
        .set_budget_cap(1)
        .expect("cap of 1 byte");
    for i in 0..6 {
        let mut f = shared.begin_frame().expect("begin");
        let v = view(&forest, W, H);
        let r = unsafe { forest.render(&mut f, &v, &color, &depth) };
        eprintln!("{test} {i}: {:?}", r.as_ref().map(|u| u.decision.budget));
        let s = shared.submit(f, [clear(&device, &color, &depth)], []);
        if r.is_ok() {
            s.expect("submit");
        }
    }
    drop(forest);
    finish(test, shared);
}

/// Bad `SharedDeviceDesc`s: typed errors, no panic, nothing logged as an error.
#[test]
fn bad_shared_device_descs_are_typed_errors() {
    if common::isolated("bad_shared_device_descs_are_typed_errors") {
        return;
    }
    let test = "review_bad_descs";
    let Some(base) = desc(test) else { return };
    common::take_log();
    let supported = {
        let s = SharedDevice::new(&base).expect("device");
        let f = s.adapter().features();
        let l = s.adapter().limits();
        s.shutdown().expect("shutdown");
        (f, l)
    };
    common::take_log();
    let mut problems = Vec::new();
    let mut try_desc = |what: &str, d: SharedDeviceDesc| {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            SharedDevice::new(&d).map(|s| s.shutdown())
        }));
        let logged = common::bad_lines(&common::take_log());
        match r {
            Err(_) => problems.push(format!("{what}: panicked")),
            Ok(Ok(_)) => problems.push(format!("{what}: accepted")),
            Ok(Err(e)) => {
                eprintln!("{test}: {what}: {e}");
            }
        }
        if !logged.is_empty() {
            problems.push(format!("{what}: logged {logged:#?}"));
        }
    };
    let mut d = base.clone();
    d.context.frames_in_flight = 0;
    try_desc("frames_in_flight 0", d);
    let mut d = base.clone();
    d.context.frames_in_flight = 9;
    try_desc("frames_in_flight 9", d);
    let mut d = base.clone();
    d.adapter_name = Some("no such adapter at all".into());
    try_desc("adapter name", d);
    // A feature the adapter lacks and that makes vkCreateDevice fail (ASTC HDR, which does
    // not, is `unsupported_features_and_limits_are_refused`).
    for feature in (wgpu::Features::all() - supported.0)
        .iter()
        .filter(|f| *f != wgpu::Features::TEXTURE_COMPRESSION_ASTC_HDR)
        .take(1)
    {
        let mut d = base.clone();
        d.features = feature;
        try_desc(&format!("feature {feature:?}"), d);
    }
    assert!(problems.is_empty(), "{test}:\n{}", problems.join("\n"));
}

/// Another thread submits its own wgpu work (the docs: "other work as usual") while the frame
/// loop runs. `begin_frame` and `shutdown` wait on the frame's own submission; a completion
/// callback that wgpu attached to the other thread's later submission must not turn that into a
/// false `Timeout`.
#[test]
fn other_threads_submitting_do_not_fake_timeouts() {
    if common::isolated("other_threads_submitting_do_not_fake_timeouts") {
        return;
    }
    let test = "review_threads";
    let Some(shared) = shared(test) else { return };
    let device = shared.device().clone();
    let queue = shared.queue().clone();
    let (mut forest, _) = forest(&shared, 1_000);
    let (color, depth) = targets(&device);
    // Heavy work for the other thread without a shader (on this layer version any wgpu shader
    // under InstanceFlags::DEBUG draws a SPIR-V "source language 10" message): big copies.
    let big = 16u64 << 20;
    let src = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("busy src"),
        size: big,
        usage: wgpu::BufferUsages::COPY_SRC,
        mapped_at_creation: false,
    });
    let dst = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("busy dst"),
        size: big,
        usage: wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (device, queue, stop) = (device.clone(), queue.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) && n < 200_000 {
                // Mostly empty submissions (they slip in between the frame's submit and its
                // `on_submitted_work_done`), every 4th one heavy (so it is still running when
                // the frame's own submission is done).
                let mut enc = device.create_command_encoder(&Default::default());
                enc.copy_buffer_to_buffer(&src, 0, &dst, 0, big);
                queue.submit([enc.finish()]);
                n += 1;
            }
            n
        })
    };
    let mut problems = Vec::new();
    let started = std::time::Instant::now();
    const AFTER: usize = 100;
    let frames: u32 = std::env::var("REVIEW_THREAD_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(120);
    for i in 0..frames {
        let f = match shared.begin_frame() {
            Ok(f) => f,
            Err(e) => {
                problems.push(format!("begin_frame {i}: {e:?}"));
                continue;
            }
        };
        let mut f = f;
        if i % 10 == 0 {
            let v = view(&forest, W, H);
            if let Err(e) = unsafe { forest.render(&mut f, &v, &color, &depth) } {
                problems.push(format!("render {i}: {e:?}"));
            }
        }
        // The app's own (empty) command buffers after the frame: wgpu drops them after its
        // submission and before `submit` registers the frame's completion callback.
        let after: Vec<_> = (0..AFTER)
            .map(|_| device.create_command_encoder(&Default::default()).finish())
            .collect();
        if let Err(e) = shared.submit(f, [], after) {
            problems.push(format!("submit {i}: {e:?}"));
        }
    }
    drop(forest);
    let report = shared.shutdown();
    stop.store(true, Ordering::Relaxed);
    let n = worker.join().expect("worker");
    eprintln!(
        "{test}: {n} other submissions, {:.1} s",
        started.elapsed().as_secs_f64()
    );
    check(
        &mut problems,
        report.as_ref().is_ok_and(|r| r.leaks.is_empty()),
        format!("shutdown: {report:?}"),
    );
    let logged = common::bad_lines(&common::take_log());
    check(
        &mut problems,
        logged.is_empty(),
        format!("logged: {logged:#?}"),
    );
    assert!(problems.is_empty(), "{test}:\n{}", problems.join("\n"));
}

/// Features and limits the adapter does not have must be refused (wgpu's own `request_device`
/// does), not granted: a wgpu device that claims them lets safe wgpu calls pass Vulkan what
/// the driver does not support.
#[test]
fn unsupported_features_and_limits_are_refused() {
    if common::isolated("unsupported_features_and_limits_are_refused") {
        return;
    }
    let test = "review_unsupported_granted";
    let Some(base) = desc(test) else { return };
    let (features, limits) = {
        let s = SharedDevice::new(&base).expect("device");
        let f = s.adapter().features();
        let l = s.adapter().limits();
        s.shutdown().expect("shutdown");
        (f, l)
    };
    common::take_log();
    let mut problems = Vec::new();
    // Limits: twice the adapter's largest 2D texture.
    let mut d = base.clone();
    let too_wide = limits.max_texture_dimension_2d * 2;
    d.limits = wgpu::Limits {
        max_texture_dimension_2d: too_wide,
        ..limits.clone()
    };
    match SharedDevice::new(&d) {
        Err(e) => eprintln!("{test}: limits refused: {e}"),
        Ok(s) => {
            let t = s.device().create_texture(&wgpu::TextureDescriptor {
                label: Some("wider than the adapter allows"),
                size: wgpu::Extent3d {
                    width: too_wide,
                    height: 1,
                    depth_or_array_layers: 1,
                },
                mip_level_count: 1,
                sample_count: 1,
                dimension: wgpu::TextureDimension::D2,
                format: wgpu::TextureFormat::R8Unorm,
                usage: wgpu::TextureUsages::COPY_DST,
                view_formats: &[],
            });
            drop(t);
            let m = s.messages();
            problems.push(format!(
                "limits over the adapter's (max_texture_dimension_2d {too_wide} > {}) were granted; a {too_wide}x1 texture then gave {} layer messages, {} wgpu errors: {:?}",
                limits.max_texture_dimension_2d,
                m.layer,
                m.wgpu,
                m.texts.iter().map(|t| t.chars().take(300).collect::<String>()).collect::<Vec<_>>()
            ));
            let _ = s.shutdown();
        }
    }
    common::take_log();
    // A feature: ASTC HDR, when the adapter lacks it.
    let astc = wgpu::Features::TEXTURE_COMPRESSION_ASTC_HDR;
    if !features.contains(astc) {
        let mut d = base.clone();
        d.features = astc - features;
        match SharedDevice::new(&d) {
            Err(e) => eprintln!("{test}: ASTC refused: {e}"),
            Ok(s) => {
                let granted = s.device().features().contains(astc);
                let t = s.device().create_texture(&wgpu::TextureDescriptor {
                    label: Some("astc hdr"),
                    size: wgpu::Extent3d {
                        width: 4,
                        height: 4,
                        depth_or_array_layers: 1,
                    },
                    mip_level_count: 1,
                    sample_count: 1,
                    dimension: wgpu::TextureDimension::D2,
                    format: wgpu::TextureFormat::Astc {
                        block: wgpu::AstcBlock::B4x4,
                        channel: wgpu::AstcChannel::Hdr,
                    },
                    usage: wgpu::TextureUsages::COPY_DST | wgpu::TextureUsages::TEXTURE_BINDING,
                    view_formats: &[],
                });
                drop(t);
                let m = s.messages();
                problems.push(format!(
                    "features the adapter lacks ({:?}) were granted (device reports them: {granted}); an ASTC HDR texture then gave {} layer messages, {} wgpu errors: {:?}",
                    astc - features,
                    m.layer,
                    m.wgpu,
                    m.texts.iter().map(|t| t.chars().take(300).collect::<String>()).collect::<Vec<_>>()
                ));
                let _ = s.shutdown();
            }
        }
    }
    let logged = common::bad_lines(&common::take_log());
    check(
        &mut problems,
        logged.is_empty(),
        format!("logged: {logged:#?}"),
    );
    assert!(problems.is_empty(), "{test}:\n{}", problems.join("\n"));
}

/// `frames_in_flight` at its bounds (1 and 4), a cull capacity of 1, many frames in a row.
#[test]
fn frames_in_flight_bounds_and_a_tiny_cull() {
    if common::isolated("frames_in_flight_bounds_and_a_tiny_cull") {
        return;
    }
    let test = "review_in_flight_bounds";
    for n in [1, 4] {
        let Some(mut d) = desc(test) else { return };
        d.context.frames_in_flight = n;
        let shared = SharedDevice::new(&d).expect("device");
        common::take_log();
        let (mut forest, _) = forest(&shared, 1_500);
        let (color, depth) = targets(shared.device());
        let drawn = frames_drawn(&shared, &mut forest, &color, &depth, 10);
        assert!(drawn > MIN_TREES, "{test}: {n} in flight: {drawn} trees");
        drop(forest);
        // A cull that keeps one instance per list.
        let mut tiny = Forest::new(
            &shared,
            &ForestDesc {
                config: understory_cli::demo::world_config(),
                cull_capacity: 1,
                ..Default::default()
            },
        )
        .expect("tiny forest");
        let one = tiny
            .vegetation_mut()
            .register_species(&SpeciesDesc {
                name: "one",
                width: 64,
                height: 128,
                rgba8: &tree_billboard(64, 128, 1),
            })
            .expect("species");
        spawn(&mut tiny, &[one; 3], 1_000, 3);
        let drawn = frames_drawn(&shared, &mut tiny, &color, &depth, 3);
        eprintln!("{test}: tiny cull drew {drawn}");
        drop(tiny);
        finish(test, shared);
    }
}
