//! The wgpu host, on whatever Vulkan device is present (lavapipe here), under the Khronos layer
//! with synchronization validation (GPU-assisted with `UNDERSTORY_VALIDATION=gpu-assisted`) and
//! wgpu's own validation: many frames with churn and a budget squeeze, the budget following
//! wgpu's allocations, understory refusing to submit on wgpu's queue, bad targets refused.
//! The frame loop is `examples/forest.rs`.

#[path = "../../tests/common/mod.rs"]
mod common;

#[path = "../examples/forest.rs"]
mod forest;

use std::time::Duration;

use understory::Error;
use understory_wgpu::{Forest, ForestDesc, ForestView, SharedDevice, SharedDeviceDesc, wgpu};

/// The shared device's settings: validation required (the layer, synchronization validation),
/// or `None` (a loud skip) where there is no device or no layer.
fn desc(test: &str) -> Option<SharedDeviceDesc> {
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

fn clean(test: &str, o: &forest::Outcome) {
    eprintln!("{test}: {o:?}");
    assert_eq!(
        o.layer_messages, 0,
        "validation messages, teardown included"
    );
    assert_eq!(o.wgpu_errors, 0, "wgpu validation errors");
    assert_eq!(o.leaks, 0, "nothing alive at shutdown");
    assert!(
        o.wgpu_usable_after,
        "the wgpu device works after understory"
    );
    assert!(o.drawn_pixels > 1000, "the last frame shows a forest");
}

#[test]
fn many_frames_with_churn_and_a_budget_squeeze() {
    let test = "wgpu_many_frames";
    let Some(shared) = desc(test) else { return };
    let frames = 48;
    let o = forest::run(&forest::Options {
        frames,
        trees: 20_000,
        width: 320,
        height: 180,
        squeeze: true,
        shared,
        ..Default::default()
    })
    .expect("the wgpu app's run");
    clean(test, &o);
    assert_eq!(o.frames, frames);
    assert!(o.churned >= u64::from(frames) * 2);
    assert!(
        o.deferred_frees > 0,
        "despawned patches were freed, frame-fenced"
    );
    assert!(o.squeezed_budget > 0, "the squeeze ran");
    assert_eq!(
        o.over_budget_frames, 0,
        "held ≤ budget once the squeeze settled"
    );
    assert!(
        o.drawn.iter().sum::<u64>() > 0,
        "the indirect args, read through wgpu, draw trees"
    );
    let (frame, drawn) = o
        .last_drawn
        .expect("understory read back what the GPU drew");
    assert!(
        frame > 1 && drawn.iter().sum::<u64>() > 0,
        "{frame}: {drawn:?}"
    );
}

#[test]
fn the_vegetation_budget_follows_wgpu_allocations() {
    let test = "wgpu_budget_follows";
    let Some(shared) = desc(test) else { return };
    let mib = 256u64;
    let o = forest::run(&forest::Options {
        frames: 9,
        trees: 5_000,
        width: 160,
        height: 90,
        wgpu_pressure_mib: mib,
        shared,
        ..Default::default()
    })
    .expect("the wgpu app's run");
    clean(test, &o);
    let grew = o.foreign.1 - o.foreign.0;
    assert!(
        grew >= mib << 20,
        "wgpu's {mib} MiB show as foreign bytes: {} → {}",
        o.foreign.0,
        o.foreign.1
    );
    // budget = share × (heap budget − foreign): it drops by the share of what wgpu took (and
    // of what the driver's heap budget moved, a few MiB on NVIDIA).
    let headroom = |hb: u64, f: u64| hb as f64 - f as f64;
    let expected = (o.headroom_share
        * (headroom(o.heap_budget.0, o.foreign.0) - headroom(o.heap_budget.1, o.foreign.1)))
        as u64;
    let dropped = o.budget_before_pressure - o.budget_under_pressure;
    assert!(
        // Within 5%: the update read the heap at the start of its frame, this test after it,
        // and understory's own uploads in between move the driver's usage (H200: 124.3 MiB
        // against 128.3; lavapipe: exact).
        dropped.abs_diff(expected) <= (1 << 20) + expected / 20,
        "the vegetation budget dropped {dropped} bytes for {grew} foreign (share {}: expected {expected})",
        o.headroom_share
    );
}

/// A 2D texture of one mip, one layer and one sample.
fn texture(
    device: &wgpu::Device,
    (width, height): (u32, u32),
    format: wgpu::TextureFormat,
    usage: wgpu::TextureUsages,
) -> wgpu::Texture {
    device.create_texture(&wgpu::TextureDescriptor {
        label: None,
        size: wgpu::Extent3d {
            width,
            height,
            depth_or_array_layers: 1,
        },
        mip_level_count: 1,
        sample_count: 1,
        dimension: wgpu::TextureDimension::D2,
        format,
        usage,
        view_formats: &[],
    })
}

/// One device for the small tests below.
fn shared(test: &str) -> Option<SharedDevice> {
    Some(SharedDevice::new(&desc(test)?).expect("shared device"))
}

#[test]
fn understory_never_submits_on_wgpus_queue() {
    let Some(shared) = shared("wgpu_no_submits") else {
        return;
    };
    let ctx = shared.context();
    let r = ctx.submit_and_wait(|_, _| Ok(()));
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    let ring = understory::gpu::frame::FrameRing::new(ctx).expect("ring");
    let frame = ctx.begin_frame().expect("frame");
    let cmd = ring.begin(&frame).expect("begin");
    let r = ring.submit(frame, cmd);
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
    drop(ring);
    // The shared device's own frames still work, and an unsubmitted frame is just dropped.
    let frame = shared.begin_frame().expect("frame");
    drop(frame);
    let frame = shared.begin_frame().expect("frame after a dropped one");
    shared.submit(frame, [], []).expect("an empty frame");
    let messages = shared.messages();
    let report = shared.shutdown().expect("shutdown");
    assert!(report.leaks.is_empty(), "{:?}", report.leaks);
    assert_eq!(messages.layer + messages.wgpu, 0, "{:?}", messages.texts);
}

#[test]
fn bad_targets_and_an_empty_forest_are_typed_errors() {
    let Some(shared) = shared("wgpu_bad_targets") else {
        return;
    };
    let device = shared.device().clone();
    let texture = |format, usage| texture(&device, (64, 32), format, usage);
    let color = texture(
        wgpu::TextureFormat::Rgba8Unorm,
        wgpu::TextureUsages::RENDER_ATTACHMENT,
    );
    let depth = texture(
        wgpu::TextureFormat::Depth32Float,
        wgpu::TextureUsages::RENDER_ATTACHMENT,
    );
    let sampled_only = texture(
        wgpu::TextureFormat::Rgba8Unorm,
        wgpu::TextureUsages::TEXTURE_BINDING,
    );
    let float = texture(
        wgpu::TextureFormat::Rgba16Float,
        wgpu::TextureUsages::RENDER_ATTACHMENT,
    );
    let mut forest = Forest::new(&shared, &ForestDesc::default()).expect("forest");
    let view = ForestView {
        eye: glam::Vec3::new(0.0, 20.0, 0.0),
        view_proj: glam::Mat4::IDENTITY,
        fog_m: 500.0,
    };
    let mut frame = shared.begin_frame().expect("frame");
    for (c, d, what) in [
        (&sampled_only, &depth, "no RENDER_ATTACHMENT"),
        (&float, &depth, "a format the forest was not made for"),
        (&color, &color, "a colour texture as depth"),
    ] {
        // SAFETY: one thread; nothing is destroyed.
        let r = unsafe { forest.render(&mut frame, &view, c, d) };
        assert!(matches!(r, Err(Error::InvalidInput(_))), "{what}: {r:?}");
    }
    let nan = ForestView {
        eye: glam::Vec3::NAN,
        ..view
    };
    // SAFETY: as above.
    let r = unsafe { forest.render(&mut frame, &nan, &color, &depth) };
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
    // No species registered yet: nothing to draw with.
    // SAFETY: as above.
    let r = unsafe { forest.render(&mut frame, &view, &color, &depth) };
    assert!(matches!(r, Err(Error::Lifecycle(_))), "{r:?}");
    shared
        .submit(frame, [], [])
        .expect("the frame is still good");
    assert!(
        Forest::new(
            &shared,
            &ForestDesc {
                color_format: wgpu::TextureFormat::R32Float,
                ..Default::default()
            }
        )
        .is_err()
    );
    drop(forest);
    let messages = shared.messages();
    let report = shared.shutdown().expect("shutdown");
    assert!(report.leaks.is_empty(), "{:?}", report.leaks);
    assert_eq!(messages.layer + messages.wgpu, 0, "{:?}", messages.texts);
    // The wgpu device outlives understory.
    device
        .poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: Some(Duration::from_secs(10)),
        })
        .expect("wgpu still polls");
}

#[test]
fn a_host_that_submits_itself() {
    let Some(shared) = shared("wgpu_host_submits") else {
        return;
    };
    let device = shared.device().clone();
    let queue = shared.queue().clone();
    let mut forest = Forest::new(&shared, &ForestDesc::default()).expect("forest");
    let species = forest
        .vegetation_mut()
        .register_species(&understory::vegetation::SpeciesDesc {
            name: "spruce",
            width: 32,
            height: 64,
            rgba8: &understory::gpu::draw::tree_billboard(32, 64, 1),
        })
        .expect("species");
    let trees: Vec<_> = (0..200)
        .map(|i| understory::world::instance::Instance {
            scale: 8.0,
            ..understory::world::instance::Instance::at(glam::Vec3::new(
                1.0 + (i % 20) as f32 * 0.7,
                0.0,
                1.0 + (i / 20) as f32 * 1.3,
            ))
        })
        .collect();
    forest
        .vegetation_mut()
        .spawn(&understory::vegetation::PatchDesc {
            species,
            instances: &trees,
        })
        .expect("spawn");
    let texture = |format, usage| texture(&device, (128, 64), format, usage);
    let color = texture(
        wgpu::TextureFormat::Rgba8Unorm,
        wgpu::TextureUsages::RENDER_ATTACHMENT,
    );
    let depth = texture(
        wgpu::TextureFormat::Depth32Float,
        wgpu::TextureUsages::RENDER_ATTACHMENT,
    );
    let eye = glam::Vec3::new(0.0, 20.0, -40.0);
    let mut proj = glam::Mat4::perspective_rh(1.0, 2.0, 0.5, 800.0);
    proj.y_axis.y = -proj.y_axis.y;
    let view = ForestView {
        eye,
        view_proj: proj
            * glam::Mat4::look_at_rh(eye, glam::Vec3::new(0.0, 0.0, 30.0), glam::Vec3::Y),
        fog_m: 700.0,
    };
    for f in 0..8 {
        let mut frame = shared.begin_frame().expect("frame");
        // SAFETY: one thread; nothing is destroyed.
        unsafe { forest.render(&mut frame, &view, &color, &depth) }.expect("render");
        // SAFETY: the command buffers go to this queue's submit right below, before the
        // HostFrame is announced or dropped.
        let (cmds, host) = unsafe { shared.finish(frame) }.expect("finish");
        queue.submit(cmds);
        if f % 2 == 0 {
            shared.host_submitted(host).expect("announced");
        } else {
            // Dropped instead: announced at the next begin_frame.
            drop(host);
        }
    }
    // A frame of another kind in between: the plain submit still works.
    let frame = shared.begin_frame().expect("frame");
    shared.submit(frame, [], []).expect("submit");
    drop(forest);
    let log = shared.message_log();
    let report = shared.shutdown().expect("shutdown");
    assert!(report.leaks.is_empty(), "{:?}", report.leaks);
    drop((queue, device, color, depth));
    let m = log.read();
    assert_eq!(m.layer + m.wgpu, 0, "{:?}", m.texts);
}

/// Eye and target of [`side_view`]: low over the edge of [`small_forest`], looking across it.
const SIDE: (glam::Vec3, glam::Vec3) = (
    glam::Vec3::new(14.0, 6.0, -12.0),
    glam::Vec3::new(14.0, 2.0, 20.0),
);

/// The view of [`small_forest`] the image tests draw (128×96, Vulkan clip space, depth 0 near).
fn side_view(fog_m: f32) -> ForestView {
    let (eye, target) = SIDE;
    let look = glam::Mat4::look_at_rh(eye, target, glam::Vec3::Y);
    let flip = glam::Mat4::from_scale(glam::Vec3::new(1.0, -1.0, 1.0));
    ForestView {
        eye,
        view_proj: flip * glam::Mat4::perspective_rh(1.0, 128.0 / 96.0, 0.5, 1000.0) * look,
        fog_m,
    }
}

/// A forest of 300 trees of one species in one tile, on `shared`, with these draw options.
fn small_forest(shared: &SharedDevice, draw: understory::gpu::draw::DrawOptions) -> Forest {
    small_forest_and_species(shared, draw).0
}

/// [`small_forest`] and its species.
fn small_forest_and_species(
    shared: &SharedDevice,
    draw: understory::gpu::draw::DrawOptions,
) -> (Forest, understory::vegetation::SpeciesId) {
    small_forest_in(shared, draw, wgpu::TextureFormat::Rgba8Unorm)
}

/// [`small_forest_and_species`] for colour targets of `format`.
fn small_forest_in(
    shared: &SharedDevice,
    draw: understory::gpu::draw::DrawOptions,
    color_format: wgpu::TextureFormat,
) -> (Forest, understory::vegetation::SpeciesId) {
    let mut forest = Forest::new(
        shared,
        &ForestDesc {
            draw,
            color_format,
            ..Default::default()
        },
    )
    .expect("forest");
    let species = forest
        .vegetation_mut()
        .register_species(&understory::vegetation::SpeciesDesc {
            name: "spruce",
            width: 32,
            height: 64,
            rgba8: &understory::gpu::draw::tree_billboard(32, 64, 1),
        })
        .expect("species");
    let trees: Vec<_> = (0..300)
        .map(|i| understory::world::instance::Instance {
            scale: 3.0 + (i % 7) as f32,
            ..understory::world::instance::Instance::at(glam::Vec3::new(
                1.0 + (i % 20) as f32 * 1.4,
                0.0,
                1.0 + (i / 20) as f32 * 1.9,
            ))
        })
        .collect();
    forest
        .vegetation_mut()
        .spawn(&understory::vegetation::PatchDesc {
            species,
            instances: &trees,
        })
        .expect("spawn");
    (forest, species)
}

/// Renders `frames` frames of `forest` into fresh targets cleared to `depth_clear`, and reads
/// the last image back through wgpu.
fn render_image(
    shared: &SharedDevice,
    forest: &mut Forest,
    view: &ForestView,
    depth_clear: f32,
    frames: u32,
) -> Vec<u8> {
    render_image_as(shared, forest, view, depth_clear, frames, false)
}

/// As [`render_image`]; with `split`, as a host whose cull and draws are separate systems
/// would: `Forest::cull`, `finish`, `resume`, `Forest::draw`, `finish`, one `Queue::submit`
/// of both parts by the test, `host_submitted`.
fn render_image_as(
    shared: &SharedDevice,
    forest: &mut Forest,
    view: &ForestView,
    depth_clear: f32,
    frames: u32,
    split: bool,
) -> Vec<u8> {
    render_image_in(
        shared,
        forest,
        view,
        (depth_clear, frames, split),
        wgpu::TextureFormat::Rgba8Unorm,
    )
}

/// As [`render_image_as`] ((depth clear, frames, split)) into a colour target of `format`.
fn render_image_in(
    shared: &SharedDevice,
    forest: &mut Forest,
    view: &ForestView,
    (depth_clear, frames, split): (f32, u32, bool),
    format: wgpu::TextureFormat,
) -> Vec<u8> {
    let device = shared.device();
    let (w, h) = (128u32, 96u32);
    let texture = |format, usage| texture(device, (w, h), format, usage);
    let color = texture(
        format,
        wgpu::TextureUsages::RENDER_ATTACHMENT | wgpu::TextureUsages::COPY_SRC,
    );
    let depth = texture(
        wgpu::TextureFormat::Depth32Float,
        wgpu::TextureUsages::RENDER_ATTACHMENT,
    );
    let readback = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: u64::from(w * 4 * h),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    for f in 0..frames {
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
                        load: wgpu::LoadOp::Clear(depth_clear),
                        store: wgpu::StoreOp::Store,
                    }),
                    stencil_ops: None,
                }),
                ..Default::default()
            });
        }
        let mut frame = shared.begin_frame().expect("frame");
        if split {
            // SAFETY: one thread; nothing is destroyed.
            unsafe { forest.cull(&mut frame, view) }.expect("cull");
            // SAFETY: both parts' command buffers go to the queue below, in order, before the
            // last HostFrame is announced.
            let (first, host) = unsafe { shared.finish(frame) }.expect("finish the cull");
            let mut frame = shared.resume(host).expect("resume");
            // SAFETY: as above.
            unsafe { forest.draw(&mut frame, &color, &depth) }.expect("draw");
            // SAFETY: as above.
            let (second, host) = unsafe { shared.finish(frame) }.expect("finish the draws");
            let mut cmds = vec![enc.finish()];
            cmds.extend(first);
            cmds.extend(second);
            if f + 1 == frames {
                let mut enc = device.create_command_encoder(&Default::default());
                enc.copy_texture_to_buffer(
                    color.as_image_copy(),
                    wgpu::TexelCopyBufferInfo {
                        buffer: &readback,
                        layout: wgpu::TexelCopyBufferLayout {
                            offset: 0,
                            bytes_per_row: Some(w * 4),
                            rows_per_image: None,
                        },
                    },
                    color.size(),
                );
                cmds.push(enc.finish());
            }
            shared.queue().submit(cmds);
            shared.host_submitted(host).expect("announce");
            continue;
        }
        // SAFETY: one thread; nothing is destroyed.
        unsafe { forest.render(&mut frame, view, &color, &depth) }.expect("render");
        let mut after = Vec::new();
        if f + 1 == frames {
            let mut enc = device.create_command_encoder(&Default::default());
            enc.copy_texture_to_buffer(
                color.as_image_copy(),
                wgpu::TexelCopyBufferInfo {
                    buffer: &readback,
                    layout: wgpu::TexelCopyBufferLayout {
                        offset: 0,
                        bytes_per_row: Some(w * 4),
                        rows_per_image: None,
                    },
                },
                color.size(),
            );
            after.push(enc.finish());
        }
        shared.submit(frame, [enc.finish()], after).expect("submit");
    }
    let slice = readback.slice(..);
    slice.map_async(wgpu::MapMode::Read, |r| r.expect("map"));
    device
        .poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: Some(Duration::from_secs(60)),
        })
        .expect("poll");
    let bytes = slice.get_mapped_range().to_vec();
    readback.unmap();
    bytes
}

#[test]
fn reversed_depth_draws_the_same_forest() {
    use understory::gpu::draw::DrawOptions;
    let Some(shared) = shared("wgpu_reversed_depth") else {
        return;
    };
    let normal = side_view(700.0);
    let (eye, look) = SIDE;
    let look = glam::Mat4::look_at_rh(eye, look, glam::Vec3::Y);
    let flip = glam::Mat4::from_scale(glam::Vec3::new(1.0, -1.0, 1.0));
    // Bevy's projection: reversed, infinite.
    let reversed = ForestView {
        view_proj: flip
            * glam::Mat4::perspective_infinite_reverse_rh(1.0, 128.0 / 96.0, 0.5)
            * look,
        ..normal
    };
    let mut a = small_forest(
        &shared,
        DrawOptions {
            ground: false,
            ..Default::default()
        },
    );
    let mut b = small_forest(
        &shared,
        DrawOptions {
            ground: false,
            reversed_depth: true,
        },
    );
    let image_a = render_image(&shared, &mut a, &normal, 1.0, 3);
    let image_b = render_image(&shared, &mut b, &reversed, 0.0, 3);
    let drawn = image_a.chunks(4).filter(|p| p[..3] != [0, 0, 0]).count();
    let differ = image_a
        .chunks(4)
        .zip(image_b.chunks(4))
        .filter(|(p, q)| p.iter().zip(q.iter()).any(|(x, y)| x.abs_diff(*y) > 2))
        .count();
    eprintln!("reversed depth: {drawn} px drawn, {differ} differ");
    assert!(drawn > 2000, "trees cover the view: {drawn} px");
    assert!(
        differ * 200 <= drawn,
        "the same forest with reversed depth: {differ} of {drawn} px differ"
    );
    drop((a, b));
    let log = shared.message_log();
    let report = shared.shutdown().expect("shutdown");
    assert!(report.leaks.is_empty(), "{:?}", report.leaks);
    let m = log.read();
    assert_eq!(m.layer + m.wgpu, 0, "{:?}", m.texts);
}

/// A box 0.5 wide and 0.9 tall in bark red: a mesh set nothing like the conifer.
fn box_tree() -> understory::gpu::draw::TreeMeshes {
    use understory::gpu::draw::{Mesh, TreeMeshes, Vertex};
    let mut vertices = Vec::new();
    let mut indices = Vec::new();
    // Four sides and a lid, each its own quad with its own normal.
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

#[test]
fn species_draw_with_their_own_meshes() {
    use understory::gpu::draw::{DrawOptions, Mesh};
    let Some(shared) = shared("wgpu_species_meshes") else {
        return;
    };
    let view = side_view(700.0);
    let options = DrawOptions {
        ground: false,
        ..Default::default()
    };
    // A: understory's conifer (set 0).
    let mut a = small_forest(&shared, options);
    let image_a = render_image(&shared, &mut a, &view, 1.0, 3);
    // B: the box as set 1 and the conifer again as set 2; the species draws with set 2.
    let (mut b, species) = small_forest_and_species(&shared, options);
    assert_eq!(b.add_meshes(box_tree()).expect("box"), 1);
    assert_eq!(
        b.add_meshes(understory::gpu::draw::TreeMeshes::conifer())
            .expect("conifer"),
        2
    );
    b.set_species_meshes(species, 2).expect("set 2");
    let image_b = render_image(&shared, &mut b, &view, 1.0, 3);
    // Then the box (set 1), set on the live draw pass.
    b.set_species_meshes(species, 1).expect("set 1");
    let image_box = render_image(&shared, &mut b, &view, 1.0, 3);
    // Bad meshes and sets are refused and change nothing.
    let mut broken = box_tree();
    broken.medium = Mesh::default();
    assert!(matches!(b.add_meshes(broken), Err(Error::InvalidInput(_))));
    assert!(matches!(
        b.set_species_meshes(species, 3),
        Err(Error::InvalidInput(_))
    ));
    let image_box_again = render_image(&shared, &mut b, &view, 1.0, 3);

    let drawn = |img: &[u8]| img.chunks(4).filter(|p| p[..3] != [0, 0, 0]).count();
    let differ = |x: &[u8], y: &[u8]| {
        x.chunks(4)
            .zip(y.chunks(4))
            .filter(|(p, q)| p.iter().zip(q.iter()).any(|(u, v)| u.abs_diff(*v) > 2))
            .count()
    };
    // Red-dominant pixels: the box's colour (the conifer is green foliage and brown bark).
    let red = |img: &[u8]| {
        img.chunks(4)
            .filter(|p| p[0] > 60 && u16::from(p[0]) > 2 * u16::from(p[1]))
            .count()
    };
    let (da, dbox) = (drawn(&image_a), drawn(&image_box));
    eprintln!(
        "species meshes: conifer {da} px, set 2 differs on {} px, box {dbox} px ({} red, conifer {} red)",
        differ(&image_a, &image_b),
        red(&image_box),
        red(&image_a)
    );
    assert!(da > 2000, "trees cover the view: {da} px");
    assert_eq!(
        differ(&image_a, &image_b),
        0,
        "the conifer as set 2 draws exactly as set 0"
    );
    assert!(
        red(&image_box) > 1000 && red(&image_a) < 50,
        "the box draws where the conifer did"
    );
    assert!(differ(&image_a, &image_box) > 1000);
    assert_eq!(
        differ(&image_box, &image_box_again),
        0,
        "refused changes change nothing"
    );
    drop((a, b));
    let log = shared.message_log();
    let report = shared.shutdown().expect("shutdown");
    assert!(report.leaks.is_empty(), "{:?}", report.leaks);
    let m = log.read();
    assert_eq!(m.layer + m.wgpu, 0, "{:?}", m.texts);
}

#[test]
fn cull_and_draws_in_separate_parts_of_a_frame() {
    use understory::gpu::draw::DrawOptions;
    let Some(shared) = shared("wgpu_cull_draw_parts") else {
        return;
    };
    let view = side_view(700.0);
    let options = DrawOptions {
        ground: false,
        ..Default::default()
    };
    let mut a = small_forest(&shared, options);
    let whole = render_image(&shared, &mut a, &view, 1.0, 3);
    let mut b = small_forest(&shared, options);
    let parts = render_image_as(&shared, &mut b, &view, 1.0, 3, true);
    let drawn = whole.chunks(4).filter(|p| p[..3] != [0, 0, 0]).count();
    assert!(drawn > 2000, "trees cover the view: {drawn} px");
    assert!(
        whole == parts,
        "render and cull + draw in two parts draw the same image"
    );

    // Misuse is a typed error with nothing recorded, and never leaves a frame unannounced.
    let device = shared.device().clone();
    let t = |format, usage| texture(&device, (128, 96), format, usage);
    let color = t(
        wgpu::TextureFormat::Rgba8Unorm,
        wgpu::TextureUsages::RENDER_ATTACHMENT,
    );
    let depth = t(
        wgpu::TextureFormat::Depth32Float,
        wgpu::TextureUsages::RENDER_ATTACHMENT,
    );
    let mut frame = shared.begin_frame().expect("frame");
    // SAFETY (every call below): one thread; nothing is destroyed.
    let undrawn = unsafe { b.draw(&mut frame, &color, &depth) };
    assert!(matches!(undrawn, Err(Error::Lifecycle(_))), "{undrawn:?}");
    unsafe { b.cull(&mut frame, &view) }.expect("cull");
    let twice = unsafe { b.cull(&mut frame, &view) };
    assert!(matches!(twice, Err(Error::Lifecycle(_))), "{twice:?}");
    // SAFETY: the first part's command buffers are submitted below before the frame is
    // announced (the resumed part's refusal sends it to be announced at the next frame).
    let (first, host) = unsafe { shared.finish(frame) }.expect("finish");
    let mut resumed = shared.resume(host).expect("resume");
    unsafe { b.draw(&mut resumed, &color, &depth) }.expect("draw");
    let again = unsafe { b.draw(&mut resumed, &color, &depth) };
    assert!(matches!(again, Err(Error::Lifecycle(_))), "{again:?}");
    shared.queue().submit(first);
    // The plain submit refuses a resumed frame; it is announced at the next begin_frame.
    let refused = shared.submit(resumed, [], []);
    assert!(matches!(refused, Err(Error::Lifecycle(_))), "{refused:?}");
    let frame = shared.begin_frame().expect("the next frame begins");
    shared.submit(frame, [], []).expect("submit");
    drop((a, b, color, depth, device));
    let log = shared.message_log();
    let report = shared.shutdown().expect("shutdown");
    assert!(report.leaks.is_empty(), "{:?}", report.leaks);
    let m = log.read();
    assert_eq!(m.layer + m.wgpu, 0, "{:?}", m.texts);
}

#[test]
fn an_srgb_target_stores_the_same_colours() {
    use understory::gpu::draw::DrawOptions;
    let Some(shared) = shared("wgpu_srgb_target") else {
        return;
    };
    let view = side_view(60.0);
    let image = |format| {
        let (mut forest, _) = small_forest_in(&shared, DrawOptions::default(), format);
        render_image_in(&shared, &mut forest, &view, (1.0, 3, false), format)
    };
    let unorm = image(wgpu::TextureFormat::Rgba8Unorm);
    let srgb = image(wgpu::TextureFormat::Rgba8UnormSrgb);
    let drawn = unorm.chunks(4).filter(|p| p[..3] != [0, 0, 0]).count();
    let worst = unorm
        .iter()
        .zip(&srgb)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    eprintln!("srgb target: {drawn} px drawn, largest byte difference {worst}");
    assert!(drawn > 4000, "{drawn} px");
    // Decoding then encoding an 8-bit value comes back within one step of rounding.
    assert!(
        worst <= 1,
        "the sRGB target stores what the UNORM one does (largest difference {worst})"
    );
    let log = shared.message_log();
    let report = shared.shutdown().expect("shutdown");
    assert!(report.leaks.is_empty(), "{:?}", report.leaks);
    let m = log.read();
    assert_eq!(m.layer + m.wgpu, 0, "{:?}", m.texts);
}
