//! Shadow maps on the real driver under (synchronization) validation: the cull pass's cascade
//! lists drawn into a cascade's tile and read back. Trees seen from a sun at the zenith cover
//! exactly their crowns' disks; a billboard under a low sun faces it and is cut out by the
//! atlas's alpha; bad input is a typed error.

mod common;

use ash::vk;
use glam::{Mat4, Vec3};
use understory::Error;
use understory::gpu::context::Context;
use understory::gpu::cull::{
    CascadeView, Compaction, CullDesc, CullPass, CullSource, CullView, WIDE_SOURCES_PER_DISPATCH,
};
use understory::gpu::draw::{
    CONES_FULL, DrawPass, Mesh, Meshes, TreeMeshes, Vertex, tree_billboard,
};
use understory::gpu::memory::{Buffer, BufferDesc, MemoryLocation};
use understory::gpu::shadow::{SHADOW_READ_LAYOUT, ShadowDesc, ShadowMaps};
use understory::policy::category::Category;
use understory::policy::lod::LodBands;
use understory::vegetation::{SpeciesDesc, Vegetation, VegetationConfig};
use understory::world::instance::Instance;

const TILE: u32 = 128;
/// World metres the cascade covers along x and z (one texel is `SPAN / TILE`).
const SPAN: f32 = 128.0;

/// A cascade looking along `-sun` at the origin, `SPAN` wide, depth over 200 m.
fn cascade(sun: Vec3) -> Mat4 {
    let up = if sun.y.abs() > 0.99 { Vec3::Z } else { Vec3::Y };
    let light = Mat4::look_at_rh(sun * 100.0, Vec3::ZERO, up);
    let h = SPAN / 2.0;
    Mat4::orthographic_rh(-h, h, -h, h, 0.0, 200.0) * light
}

/// The texel of tile 0 that world point `p` falls in (uv = clip * 0.5 + 0.5, no flip).
fn texel_of(view_proj: Mat4, p: Vec3) -> (i64, i64) {
    let c = view_proj.project_point3(p);
    let u = (c.x * 0.5 + 0.5) * TILE as f32;
    let v = (c.y * 0.5 + 0.5) * TILE as f32;
    (u.floor() as i64, v.floor() as i64)
}

struct Scene {
    veg: Vegetation,
    draw: DrawPass,
    maps: ShadowMaps,
    cull: CullPass,
    instances: Buffer,
    readback: Buffer,
}

impl Scene {
    fn new(ctx: &Context, trees: &[Instance]) -> Self {
        Self::with_meshes(ctx, trees, None)
    }

    /// With `meshes` (and the set the species draws with) instead of the conifer.
    fn with_meshes(ctx: &Context, trees: &[Instance], meshes: Option<(Meshes, u32)>) -> Self {
        let mut veg = Vegetation::new(
            ctx,
            VegetationConfig {
                atlas_page_px: 256,
                ..Default::default()
            },
        )
        .unwrap();
        let species = veg
            .register_species(&SpeciesDesc {
                name: "spruce",
                width: 64,
                height: 128,
                rgba8: &tree_billboard(64, 128, 1),
            })
            .unwrap();
        let page = veg.atlas_page(0).unwrap();
        let (meshes, set) = meshes.unwrap_or_else(|| (Meshes::trees(), 0));
        let draw = DrawPass::with_meshes(
            ctx,
            vk::Format::R8G8B8A8_UNORM,
            vk::Format::D32_SFLOAT,
            page,
            0,
            Default::default(),
            &meshes,
        )
        .unwrap();
        let maps = ShadowMaps::with_meshes(
            ctx,
            &ShadowDesc {
                cascades: 1,
                tile_px: TILE,
                ..Default::default()
            },
            page,
            0,
            &meshes,
        )
        .unwrap();
        draw.set_species_meshes(species, set).unwrap();
        maps.set_species_meshes(species, set).unwrap();
        let cull = CullPass::from_desc(
            ctx,
            &CullDesc {
                compaction: Compaction::Atomic,
                capacity: 64,
                adaptive: false,
                meshes: draw.lod_meshes(),
                records: true,
                max_sources_per_dispatch: WIDE_SOURCES_PER_DISPATCH,
                views: 2,
            },
        )
        .unwrap();
        let mut instances = ctx
            .create_buffer(&BufferDesc {
                name: "shadow test instances",
                size: size_of_val(trees) as u64,
                usage: vk::BufferUsageFlags::STORAGE_BUFFER,
                location: MemoryLocation::CpuToGpu,
                category: Category::Instances,
            })
            .unwrap();
        instances.mapped_mut().unwrap()[..size_of_val(trees)]
            .copy_from_slice(bytemuck::cast_slice(trees));
        let readback = ctx
            .create_buffer(&BufferDesc {
                name: "shadow test readback",
                size: u64::from(TILE * TILE) * 4,
                usage: vk::BufferUsageFlags::TRANSFER_DST,
                location: MemoryLocation::GpuToCpu,
                category: Category::Other,
            })
            .unwrap();
        Self {
            veg,
            draw,
            maps,
            cull,
            instances,
            readback,
        }
    }

    /// Culls `count` trees for a camera at `eye` (bands full 50 m, medium 100 m, billboard 1 km)
    /// and the cascade `view_proj`, draws the shadow map and reads tile 0 back.
    fn shadow_map(&mut self, ctx: &Context, eye: Vec3, view_proj: Mat4, count: u32) -> Vec<f32> {
        // Where the camera looks does not matter: cascades are culled whatever it sees.
        let camera = Mat4::perspective_rh(1.0, 1.0, 0.5, 2000.0)
            * Mat4::look_at_rh(eye, eye + Vec3::new(0.0, -0.2, -1.0), Vec3::Y);
        let bands = LodBands {
            full_m: 50.0,
            medium_m: 100.0,
            billboard_m: 1000.0,
        };
        let view = CullView::new(camera, eye, self.draw.radius(), &bands, 1.0).unwrap();
        self.cull
            .set_cascades(&[CascadeView::new(view_proj).unwrap()])
            .unwrap();
        let species = self.veg.species_regions();
        let Self {
            veg,
            maps,
            cull,
            instances,
            readback,
            ..
        } = self;
        ctx.submit_and_wait(|frame, cmd| {
            let range = vk::ImageSubresourceRange {
                aspect_mask: vk::ImageAspectFlags::DEPTH,
                base_mip_level: 0,
                level_count: 1,
                base_array_layer: 0,
                layer_count: 1,
            };
            readback.used_in(frame)?;
            // SAFETY: cmd is recording for `frame` outside any rendering scope on the graphics
            // queue; the atlas is uploaded (and left SHADER_READ_ONLY_OPTIMAL) by veg.record
            // before the cull and the maps, which follow each other in this order; the copy
            // reads the maps' image after the barrier that moves it out of the read layout.
            unsafe {
                veg.record(frame, cmd)?;
                let page = veg.atlas_page(0).unwrap();
                let source = CullSource {
                    buffer: instances,
                    count,
                    base: 0,
                };
                cull.record(frame, cmd, &[source], &view)?;
                maps.record(frame, cmd, cull, &[view_proj], &species, page)?;
                let d = ctx.device();
                d.cmd_pipeline_barrier(
                    cmd,
                    vk::PipelineStageFlags::FRAGMENT_SHADER,
                    vk::PipelineStageFlags::TRANSFER,
                    vk::DependencyFlags::empty(),
                    &[],
                    &[],
                    &[understory::gpu::compute::image_barrier(
                        maps.image().raw(),
                        range,
                        (SHADOW_READ_LAYOUT, vk::AccessFlags::SHADER_READ),
                        (
                            vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                            vk::AccessFlags::TRANSFER_READ,
                        ),
                    )],
                );
                d.cmd_copy_image_to_buffer(
                    cmd,
                    maps.image().raw(),
                    vk::ImageLayout::TRANSFER_SRC_OPTIMAL,
                    readback.raw(),
                    &[vk::BufferImageCopy {
                        buffer_offset: 0,
                        buffer_row_length: 0,
                        buffer_image_height: 0,
                        image_subresource: vk::ImageSubresourceLayers {
                            aspect_mask: vk::ImageAspectFlags::DEPTH,
                            mip_level: 0,
                            base_array_layer: 0,
                            layer_count: 1,
                        },
                        image_offset: vk::Offset3D::default(),
                        image_extent: vk::Extent3D {
                            width: TILE,
                            height: TILE,
                            depth: 1,
                        },
                    }],
                );
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
        })
        .unwrap();
        readback
            .mapped()
            .unwrap()
            .chunks_exact(4)
            .map(bytemuck::pod_read_unaligned)
            .collect()
    }
}

#[test]
fn trees_cast_their_crowns_from_a_sun_overhead() {
    let Some(ctx) = common::context("trees_cast_their_crowns") else {
        return;
    };
    if !ctx.features().dynamic_rendering {
        common::skip("trees_cast_their_crowns", "no dynamic rendering");
        common::finish(ctx, "shadow crowns");
        return;
    }
    // Two at full detail near the camera, two at medium further out (the camera's bands
    // choose, not the cascade): the meshes' widest cones are 0.30 and 0.29 of the height.
    let trees: Vec<Instance> = [
        (-10.0, -10.0, 12.0, 0.3),
        (20.0, -25.0, 16.0, 1.1),
        (-40.0, 35.0, 14.0, 2.0),
        (45.0, 40.0, 20.0, 4.0),
        // Outside the cascade: culled from its lists.
        (200.0, 0.0, 20.0, 0.0),
    ]
    .iter()
    .map(|&(x, z, scale, yaw)| Instance {
        scale,
        yaw,
        ..Instance::at(Vec3::new(x, 0.0, z))
    })
    .collect();
    let mut scene = Scene::new(&ctx, &trees);
    let sun = Vec3::Y;
    let vp = cascade(sun);
    let eye = Vec3::new(0.0, 20.0, 0.0);
    let depth = scene.shadow_map(&ctx, eye, vp, trees.len() as u32);
    let texel_m = SPAN / TILE as f32;
    let widest = CONES_FULL.iter().map(|c| c.2).fold(0.0, f32::max);
    let mut covered = 0;
    for y in 0..TILE as i64 {
        for x in 0..TILE as i64 {
            let d = depth[(y * TILE as i64 + x) as usize];
            // The texel's centre on the ground.
            let inv = vp.inverse();
            let p = inv.project_point3(Vec3::new(
                (x as f32 + 0.5) / TILE as f32 * 2.0 - 1.0,
                (y as f32 + 0.5) / TILE as f32 * 2.0 - 1.0,
                0.5,
            ));
            let near = trees[..4].iter().find_map(|t| {
                let r = Vec3::new(p.x - t.position[0], 0.0, p.z - t.position[2]).length();
                (r < widest * t.scale + 1.5 * texel_m).then_some((r, t.scale))
            });
            match near {
                None => assert_eq!(d, 1.0, "texel ({x}, {y}) at {p} is under no crown"),
                Some((r, scale)) if r < 0.1 * scale => {
                    // Under the crown's middle (the top cone of either mesh, at least 0.74 of
                    // the height there): well above the ground, whatever the depth bias adds.
                    let ground = vp.project_point3(Vec3::new(p.x, 0.0, p.z)).z;
                    let quarter = vp.project_point3(Vec3::new(p.x, 0.25 * scale, p.z)).z;
                    assert!(d < quarter && d < ground, "texel ({x}, {y}): depth {d}");
                    covered += 1;
                }
                Some(_) => {}
            }
        }
    }
    eprintln!("{covered} texels under the crowns' middles");
    assert!(covered >= 4 * 3);
    let far = texel_of(vp, Vec3::new(60.0, 0.0, 0.0));
    assert_eq!(depth[(far.1 * TILE as i64 + far.0) as usize], 1.0);
    drop(scene);
    common::finish(ctx, "shadow crowns");
}

#[test]
fn a_billboard_faces_a_low_sun_and_casts_its_outline() {
    let Some(ctx) = common::context("a_billboard_faces_a_low_sun") else {
        return;
    };
    if !ctx.features().dynamic_rendering {
        common::skip("a_billboard_faces_a_low_sun", "no dynamic rendering");
        common::finish(ctx, "shadow billboard");
        return;
    }
    let scale = 40.0;
    let trees = [Instance {
        scale,
        ..Instance::at(Vec3::ZERO)
    }];
    let mut scene = Scene::new(&ctx, &trees);
    // The camera is 300 m away: billboard LOD. The sun is 40 degrees high, off to the side of
    // the camera, so a quad facing the camera would be seen almost edge-on from the sun.
    let eye = Vec3::new(300.0, 10.0, 0.0);
    let sun = Vec3::new(0.0, 40f32.to_radians().sin(), 40f32.to_radians().cos());
    let vp = cascade(sun);
    let depth = scene.shadow_map(&ctx, eye, vp, 1);
    let covered = depth.iter().filter(|&&d| d < 1.0).count() as f32;
    // The quad seen from the sun: 0.64 of the height wide, the height times cos(40°) tall.
    let texel_m = SPAN / TILE as f32;
    let quad = 0.64 * scale * scale * 40f32.to_radians().cos() / (texel_m * texel_m);
    eprintln!("{covered} texels covered of a {quad:.0}-texel quad");
    // The crown's cones and the trunk cover about a third of the quad.
    assert!(covered > 0.15 * quad, "the billboard faces the sun");
    assert!(
        covered < 0.6 * quad,
        "the atlas's alpha cuts the outline out"
    );
    drop(scene);
    common::finish(ctx, "shadow billboard");
}

#[test]
fn bad_shadow_input_is_a_typed_error() {
    let Some(ctx) = common::context("bad_shadow_input") else {
        return;
    };
    if !ctx.features().dynamic_rendering {
        common::skip("bad_shadow_input", "no dynamic rendering");
        common::finish(ctx, "bad shadow input");
        return;
    }
    let trees = [Instance::at(Vec3::ZERO)];
    let scene = Scene::new(&ctx, &trees);
    let page = scene.veg.atlas_page(0).unwrap();
    for desc in [
        ShadowDesc {
            cascades: 0,
            ..Default::default()
        },
        ShadowDesc {
            cascades: 5,
            ..Default::default()
        },
        ShadowDesc {
            tile_px: 8,
            ..Default::default()
        },
        ShadowDesc {
            tile_px: 1 << 20,
            ..Default::default()
        },
        ShadowDesc {
            strength: 1.5,
            ..Default::default()
        },
        ShadowDesc {
            depth_bias_slope: f32::NAN,
            ..Default::default()
        },
    ] {
        let r = ShadowMaps::new(&ctx, &desc, page, 0);
        assert!(matches!(r, Err(Error::InvalidInput(_))), "{desc:?}: {r:?}");
    }
    let camera_only =
        CullPass::with_records(&ctx, Compaction::Atomic, 64, scene.draw.lod_meshes()).unwrap();
    let vp = cascade(Vec3::Y);
    let species = scene.veg.species_regions();
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: cmd is recording for `frame` outside rendering; every call below is refused
        // before it records anything.
        unsafe {
            let r = scene.draw.prepare_shadows(frame, cmd, &scene.maps, 100.0);
            assert!(matches!(r, Err(Error::Lifecycle(_))), "no maps yet: {r:?}");
            let r = scene
                .maps
                .record(frame, cmd, &scene.cull, &[vp, vp], &species, page);
            assert!(
                matches!(r, Err(Error::InvalidInput(_))),
                "two cascades: {r:?}"
            );
            let r = scene
                .maps
                .record(frame, cmd, &camera_only, &[vp], &species, page);
            assert!(
                matches!(r, Err(Error::InvalidInput(_))),
                "no cascade views: {r:?}"
            );
            let r = scene.maps.record(
                frame,
                cmd,
                &scene.cull,
                &[Mat4::from_cols_array(&[f32::NAN; 16])],
                &species,
                page,
            );
            assert!(
                matches!(r, Err(Error::InvalidInput(_))),
                "NaN matrix: {r:?}"
            );
        }
        Ok(())
    })
    .unwrap();
    drop((camera_only, scene));
    common::finish(ctx, "bad shadow input");
}

/// A flat square slab `2 * half` wide at 0.8..0.9 of the height: a mesh set whose shadow from
/// above is a square, where the conifer's is a disk of radius 0.30.
fn slab(half: f32) -> Mesh {
    let mut vertices = Vec::new();
    for y in [0.8, 0.9] {
        for (x, z) in [(-half, -half), (half, -half), (half, half), (-half, half)] {
            vertices.push(Vertex {
                position: [x, y, z],
                normal: [0.0, 1.0, 0.0],
                uv: [0.0; 2],
                color: [255; 4],
            });
        }
    }
    let mut indices = vec![4, 5, 6, 4, 6, 7, 0, 2, 1, 0, 3, 2];
    for i in 0..4u32 {
        let j = (i + 1) % 4;
        indices.extend_from_slice(&[i, j, 4 + j, i, 4 + j, 4 + i]);
    }
    Mesh { vertices, indices }
}

#[test]
fn a_species_casts_with_its_own_meshes() {
    let Some(ctx) = common::context("a_species_casts_with_its_own_meshes") else {
        return;
    };
    if !ctx.features().dynamic_rendering {
        common::skip(
            "a_species_casts_with_its_own_meshes",
            "no dynamic rendering",
        );
        common::finish(ctx, "shadow meshes");
        return;
    }
    let scale = 20.0;
    // One tree at full detail, one at medium (the camera's bands: 50 m, 100 m).
    let trees: Vec<Instance> = [(-20.0, -20.0), (30.0, 30.0)]
        .iter()
        .map(|&(x, z)| Instance {
            scale,
            ..Instance::at(Vec3::new(x, 0.0, z))
        })
        .collect();
    let eye = Vec3::new(-20.0, 20.0, -40.0);
    let vp = cascade(Vec3::Y);
    let slabs = TreeMeshes {
        full: slab(0.45),
        medium: slab(0.4),
    };
    let meshes = Meshes::new(&[TreeMeshes::conifer(), slabs]).unwrap();
    let mut conifer = Scene::new(&ctx, &trees);
    let cone = conifer.shadow_map(&ctx, eye, vp, trees.len() as u32);
    drop(conifer);
    let mut slabbed = Scene::with_meshes(&ctx, &trees, Some((meshes, 1)));
    let square = slabbed.shadow_map(&ctx, eye, vp, trees.len() as u32);
    drop(slabbed);
    // Near each slab's corners (0.35 out along x and z, so 0.49 from the trunk): the slab
    // casts, the conifer (0.30 wide) does not; both cast at the trunk.
    let mut checked = 0;
    for (t, half) in trees.iter().zip([0.45, 0.4]) {
        let at = |dx: f32, dz: f32| {
            let (x, y) = texel_of(vp, t.pos() + Vec3::new(dx, 0.0, dz) * scale);
            (y * TILE as i64 + x) as usize
        };
        let corner = 0.35f32.min(half - 0.04);
        for (sx, sz) in [(1.0, 1.0), (-1.0, 1.0), (1.0, -1.0), (-1.0, -1.0)] {
            let i = at(sx * corner, sz * corner);
            assert!(square[i] < 1.0, "the slab casts at its corner");
            assert_eq!(cone[i], 1.0, "the conifer casts nothing there");
            checked += 1;
        }
        let centre = at(0.0, 0.0);
        assert!(square[centre] < 1.0 && cone[centre] < 1.0);
    }
    let covered = |d: &[f32]| d.iter().filter(|&&v| v < 1.0).count();
    eprintln!(
        "shadow meshes: {checked} corners; conifer covers {} texels, slabs {}",
        covered(&cone),
        covered(&square)
    );
    assert!(covered(&square) > covered(&cone));
    common::finish(ctx, "shadow meshes");
}
