//! The draw pass: one indexed indirect draw per LOD from the cull pass's arguments, recorded
//! inside the caller's dynamic-rendering scope. Full and medium detail are procedural tree
//! meshes; billboards are quads turned about +Y towards the camera that sample the species'
//! region of the atlas. The vertex stage reads each visible instance from the cull pass's
//! records ([`CullPass::with_records`]), so instances may live in any number of buffers.
//!
//! Per frame: [`DrawPass::prepare`] outside the rendering scope (frame constants and the
//! species table, by `vkCmdUpdateBuffer`), then [`DrawPass::record`] inside it.
//!
//! Sun shadows: after [`ShadowMaps::record`] and [`DrawPass::prepare_shadows`] in the same
//! frame, the frame's draws use a second pipeline whose fragment stage looks the sun up in the
//! cascades' shadow maps; in a frame without `prepare_shadows` the pass draws as it always did.

use std::f32::consts::TAU;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ash::vk;
use glam::{Mat4, Vec3};

use crate::error::{Error, Result, vk_err};
use crate::gpu::adapter::DeviceFeatures;
use crate::gpu::atlas::ATLAS_FORMAT;
use crate::gpu::compute::{DescriptorArena, lock, retire_pipeline_objects, shader_module};
use crate::gpu::context::{Context, Frame, FrameTag, Shared};
use crate::gpu::cull::{CullPass, DrawIndexedIndirect, InstanceBounds};
use crate::gpu::memory::{Buffer, BufferDesc, Image, MemoryLocation, RawObject};
use crate::gpu::shaders;
use crate::gpu::shadow::{SHADOW_FORMAT, SHADOW_READ_LAYOUT, ShadowFrame, ShadowMaps, depth_view};
use crate::policy::category::Category;
use crate::vegetation::SpeciesId;
use crate::world::atlas::AtlasRegion;

/// Species the table holds (16 bytes each; one `vkCmdUpdateBuffer` is at most 64 KiB).
pub const MAX_SPECIES: usize = 1024;

/// One mesh vertex: 36 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Vertex {
    /// Position for an instance of scale 1 (trees are 1 tall, base at the origin).
    pub position: [f32; 3],
    /// Unit normal.
    pub normal: [f32; 3],
    /// Texture coordinate (billboards: the species' atlas region, v down).
    pub uv: [f32; 2],
    /// RGB colour, and in alpha how much the instance's tint applies (foliage 255, bark 0).
    pub color: [u8; 4],
}

/// One mesh of a tree 1 tall at scale 1, its base at the origin and +Y up: vertices, and a
/// triangle list of indices into them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Mesh {
    /// The vertices.
    pub vertices: Vec<Vertex>,
    /// Three per triangle, each less than `vertices.len()`.
    pub indices: Vec<u32>,
}

/// A species' meshes at full and medium detail ([`Meshes::new`]); its billboard (the
/// coarsest LOD) is its atlas image on a quad turned towards the camera. Instances scale and
/// turn them about +Y; foliage vertices (colour alpha 255) take the instance tint.
#[derive(Clone, Debug, PartialEq)]
pub struct TreeMeshes {
    /// Full detail (the nearest band).
    pub full: Mesh,
    /// Medium detail.
    pub medium: Mesh,
}

/// Most mesh sets one [`Meshes`] holds.
pub const MAX_MESH_SETS: usize = 256;
/// Most indices (three per triangle) of one mesh. Every instance of a LOD runs the vertex
/// stage as many times as the largest set's mesh of that LOD has indices (smaller meshes end
/// in empty triangles), so one heavy mesh costs every species of its LOD.
pub const MAX_MESH_INDICES: usize = 3 * 87_381;
/// Most vertices of one mesh.
pub const MAX_MESH_VERTICES: usize = 1 << 18;
/// Largest coordinate of a mesh vertex, in tree heights (the mesh is of a tree of scale 1).
pub const MAX_MESH_EXTENT: f32 = 1024.0;

impl TreeMeshes {
    /// understory's conifer: a bark trunk and stacked foliage cones, at full (12 sides, 3
    /// cones) and medium (5 sides, 2 cones) detail.
    pub fn conifer() -> Self {
        let mut b = Builder {
            vertices: Vec::new(),
            indices: Vec::new(),
        };
        b.cylinder(TRUNK.0, 0.0, TRUNK.1, 8, BARK);
        for (y0, y1, r) in CONES_FULL {
            b.cone(r, y0, y1, 12, FOLIAGE);
        }
        let full = b.take();
        b.cylinder(TRUNK.0 * 1.2, 0.0, TRUNK.1, 4, BARK);
        for (y0, y1, r) in CONES_MEDIUM {
            b.cone(r, y0, y1, 5, FOLIAGE);
        }
        let medium = b.take();
        Self { full, medium }
    }

    /// [`Error::InvalidInput`] unless both meshes have 1..=[`MAX_MESH_INDICES`] indices in
    /// whole triangles, each less than the vertex count (at most [`MAX_MESH_VERTICES`]),
    /// positions within ±[`MAX_MESH_EXTENT`], and finite normals and texture coordinates.
    pub fn check(&self) -> Result<()> {
        for (name, m) in [("full", &self.full), ("medium", &self.medium)] {
            let bad = |why: String| Err(Error::InvalidInput(format!("{name} mesh: {why}")));
            if m.indices.is_empty() || !m.indices.len().is_multiple_of(3) {
                return bad(format!(
                    "{} indices (a triangle list needs a positive multiple of 3)",
                    m.indices.len()
                ));
            }
            if m.indices.len() > MAX_MESH_INDICES || m.vertices.len() > MAX_MESH_VERTICES {
                return bad(format!(
                    "{} indices and {} vertices (at most {MAX_MESH_INDICES} and {MAX_MESH_VERTICES})",
                    m.indices.len(),
                    m.vertices.len()
                ));
            }
            if let Some(i) = m.indices.iter().find(|&&i| i as usize >= m.vertices.len()) {
                return bad(format!("index {i} of {} vertices", m.vertices.len()));
            }
            if let Some(v) = m.vertices.iter().find(|v| {
                !(v.normal.iter().chain(&v.uv).all(|x| x.is_finite())
                    && v.position.iter().all(|x| x.abs() <= MAX_MESH_EXTENT))
            }) {
                return bad(format!(
                    "vertex {v:?}: positions within ±{MAX_MESH_EXTENT}, finite normals and uv"
                ));
            }
        }
        Ok(())
    }
}

/// The meshes of every LOD of every mesh set, the billboard quad and the ground, in one vertex
/// and one index buffer, as the draw and shadow passes read them (as storage buffers: the
/// vertex stage fetches its vertex itself). A LOD with one mesh (the billboard, the ground, and
/// full and medium detail with one set) is an ordinary indexed draw of that mesh. A LOD with
/// several sets draws the run `0, 1, 2, ...` as far as its largest mesh, and the vertex stage
/// looks up the corner's index in the mesh of the instance's species' set (from `table`): one
/// indirect draw per LOD still covers every species. That costs a vertex-stage invocation per
/// corner instead of per vertex, and smaller meshes pad with empty triangles.
///
/// Built only by [`Meshes::new`], which checks every index and range, and read-only after: the
/// passes' vertex stages read what it holds, so a changed field could send them past their
/// buffers.
///
/// ```compile_fail
/// let mut m = understory::gpu::draw::Meshes::trees();
/// m.indices[0] = 1_000_000; // private: only `Meshes::new` writes it
/// ```
#[derive(Clone, Debug)]
pub struct Meshes {
    /// Vertices of every mesh.
    vertices: Vec<Vertex>,
    /// Indices of every mesh (relative to each mesh's `vertex_offset`), then `0, 1, 2, ...`:
    /// the run every draw indexes, so that the vertex stage sees the corner number.
    indices: Vec<u32>,
    /// The draws of full, medium and billboard: the mesh itself where the LOD has one
    /// (`fetch` false), else as many corners of the run as that LOD's largest mesh has
    /// indices, vertex offset 0.
    lods: [DrawIndexedIndirect; 3],
    /// Per LOD: the draw indexes the run and the vertex stage fetches each corner's index
    /// (several sets), or it indexes the mesh itself.
    fetch: [bool; 3],
    /// The draw of the ground quad.
    ground: DrawIndexedIndirect,
    /// Per mesh, `[first index, index count, vertex offset, 0]`: the ground, the billboard,
    /// then full and medium of each set in order.
    table: Vec<[u32; 4]>,
    /// Vertices of the tree meshes (every set's and the billboard's): `0..tree_vertices`.
    tree_vertices: usize,
}

const BARK: [u8; 4] = [92, 62, 38, 0];
const FOLIAGE: [u8; 4] = [255, 255, 255, 255];
const GROUND: [u8; 4] = [74, 92, 48, 0];

/// Foliage cones of a tree 1 tall: (bottom, top, radius).
pub const CONES_FULL: [(f32, f32, f32); 3] =
    [(0.18, 0.62, 0.30), (0.40, 0.84, 0.23), (0.62, 1.0, 0.16)];
const CONES_MEDIUM: [(f32, f32, f32); 2] = [(0.18, 0.70, 0.29), (0.48, 1.0, 0.20)];
/// Trunk radius and height of a tree 1 tall.
pub const TRUNK: (f32, f32) = (0.035, 0.3);
/// Half width of the billboard quad (it is 1 tall).
pub const BILLBOARD_HALF_WIDTH: f32 = 0.32;

struct Builder {
    vertices: Vec<Vertex>,
    indices: Vec<u32>,
}

impl Builder {
    fn vertex(
        &mut self,
        position: [f32; 3],
        normal: [f32; 3],
        uv: [f32; 2],
        color: [u8; 4],
    ) -> u32 {
        self.vertices.push(Vertex {
            position,
            normal,
            uv,
            color,
        });
        (self.vertices.len() - 1) as u32
    }

    /// Open cylinder from y0 to y1.
    fn cylinder(&mut self, radius: f32, y0: f32, y1: f32, sides: u32, color: [u8; 4]) {
        let base = self.vertices.len() as u32;
        for i in 0..=sides {
            let a = i as f32 / sides as f32 * TAU;
            let (s, c) = a.sin_cos();
            self.vertex([c * radius, y0, s * radius], [c, 0.0, s], [0.0; 2], color);
            self.vertex([c * radius, y1, s * radius], [c, 0.0, s], [0.0; 2], color);
        }
        for i in 0..sides {
            let k = base + 2 * i;
            self.indices
                .extend_from_slice(&[k, k + 2, k + 1, k + 1, k + 2, k + 3]);
        }
    }

    /// Cone from a ring at y0 to an apex at y1, with a flat underside.
    fn cone(&mut self, radius: f32, y0: f32, y1: f32, sides: u32, color: [u8; 4]) {
        let h = y1 - y0;
        let len = (h * h + radius * radius).sqrt();
        for i in 0..sides {
            let a0 = i as f32 / sides as f32 * TAU;
            let a1 = (i + 1) as f32 / sides as f32 * TAU;
            let am = (a0 + a1) * 0.5;
            let n = |a: f32| [a.cos() * h / len, radius / len, a.sin() * h / len];
            let p = |a: f32| [a.cos() * radius, y0, a.sin() * radius];
            let v0 = self.vertex(p(a0), n(a0), [0.0; 2], color);
            let v1 = self.vertex(p(a1), n(a1), [0.0; 2], color);
            let apex = self.vertex([0.0, y1, 0.0], n(am), [0.0; 2], color);
            self.indices.extend_from_slice(&[v0, apex, v1]);
        }
        let centre = self.vertex([0.0, y0, 0.0], [0.0, -1.0, 0.0], [0.0; 2], color);
        let first = self.vertices.len() as u32;
        for i in 0..sides {
            let a = i as f32 / sides as f32 * TAU;
            self.vertex(
                [a.cos() * radius, y0, a.sin() * radius],
                [0.0, -1.0, 0.0],
                [0.0; 2],
                color,
            );
        }
        for i in 0..sides {
            self.indices
                .extend_from_slice(&[centre, first + (i + 1) % sides, first + i]);
        }
    }

    /// The mesh built so far; the builder starts empty again.
    fn take(&mut self) -> Mesh {
        Mesh {
            vertices: std::mem::take(&mut self.vertices),
            indices: std::mem::take(&mut self.indices),
        }
    }
}

impl Meshes {
    /// Every set's meshes (checked by [`TreeMeshes::check`]), with the billboard quad and the
    /// ground. Set `k` is what [`DrawPass::set_species_meshes`] and the shadow maps' species
    /// take as `k`. [`Error::InvalidInput`] for no set, more than [`MAX_MESH_SETS`], or a
    /// mesh `check` refuses.
    pub fn new(sets: &[TreeMeshes]) -> Result<Self> {
        if sets.is_empty() || sets.len() > MAX_MESH_SETS {
            return Err(Error::InvalidInput(format!(
                "{} mesh sets (1..={MAX_MESH_SETS})",
                sets.len()
            )));
        }
        for (k, set) in sets.iter().enumerate() {
            set.check()
                .map_err(|e| Error::InvalidInput(format!("mesh set {k}: {e}")))?;
        }
        let w = BILLBOARD_HALF_WIDTH;
        let n = [0.0, 0.0, 1.0];
        let quad = |p: [[f32; 3]; 4], uv: [[f32; 2]; 4], normal, color| Mesh {
            vertices: (0..4)
                .map(|i| Vertex {
                    position: p[i],
                    normal,
                    uv: uv[i],
                    color,
                })
                .collect(),
            indices: vec![0, 1, 2, 0, 2, 3],
        };
        let billboard = quad(
            [[-w, 0.0, 0.0], [w, 0.0, 0.0], [w, 1.0, 0.0], [-w, 1.0, 0.0]],
            [[0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]],
            n,
            FOLIAGE,
        );
        let ground = quad(
            [
                [0.0, 0.0, 0.0],
                [1.0, 0.0, 0.0],
                [1.0, 0.0, 1.0],
                [0.0, 0.0, 1.0],
            ],
            [[0.0; 2]; 4],
            [0.0, 1.0, 0.0],
            GROUND,
        );
        let mut vertices = Vec::new();
        let mut indices = Vec::new();
        let mut push = |m: &Mesh| {
            let entry = [
                indices.len() as u32,
                m.indices.len() as u32,
                vertices.len() as u32,
                0,
            ];
            vertices.extend_from_slice(&m.vertices);
            indices.extend_from_slice(&m.indices);
            entry
        };
        let billboard_entry = push(&billboard);
        let mut table = vec![[0; 4], billboard_entry];
        for set in sets {
            table.push(push(&set.full));
            table.push(push(&set.medium));
        }
        table[0] = push(&ground);
        // The ground's vertices come last.
        let tree_vertices = table[0][2] as usize;
        let corners = |lod: usize| {
            table[2..]
                .iter()
                .skip(lod)
                .step_by(2)
                .map(|e| e[1])
                .max()
                .unwrap_or(0)
        };
        let direct = |e: [u32; 4]| DrawIndexedIndirect {
            index_count: e[1],
            instance_count: 0,
            first_index: e[0],
            vertex_offset: e[2] as i32,
            first_instance: 0,
        };
        let fetch = [sets.len() > 1, sets.len() > 1, false];
        let mut lods = [direct(table[2]), direct(table[3]), direct(table[1])];
        if sets.len() > 1 {
            let run = indices.len() as u32;
            let longest = corners(0).max(corners(1));
            indices.extend(0..longest);
            for (lod, d) in lods.iter_mut().enumerate().take(2) {
                *d = DrawIndexedIndirect {
                    index_count: corners(lod),
                    first_index: run,
                    vertex_offset: 0,
                    ..*d
                };
            }
        }
        Ok(Self {
            vertices,
            indices,
            lods,
            fetch,
            ground: direct(table[0]),
            table,
            tree_vertices,
        })
    }

    /// [`Error::InvalidInput`] unless each of the buffers the passes bind (vertices, indices,
    /// table) fits the device's `maxStorageBufferRange` (128 MiB on many devices: about 3.7M
    /// vertices). [`DrawPass::with_meshes`] and
    /// [`ShadowMaps::with_meshes`](crate::gpu::shadow::ShadowMaps::with_meshes) check it.
    pub fn fits(&self, ctx: &Context) -> Result<()> {
        let range = u64::from(ctx.adapter().limits.max_storage_buffer_range);
        let bytes = self.largest_buffer();
        if bytes > range {
            return Err(Error::InvalidInput(format!(
                "meshes: a buffer of {bytes} bytes, past the device's maxStorageBufferRange of {range}"
            )));
        }
        Ok(())
    }

    /// Bytes of the largest of the buffers the passes bind (vertices, indices, table).
    pub fn largest_buffer(&self) -> u64 {
        [
            size_of_val(self.vertices.as_slice()),
            size_of_val(self.indices.as_slice()),
            size_of_val(self.table.as_slice()),
        ]
        .into_iter()
        .max()
        .unwrap_or(0) as u64
    }

    /// [`TreeMeshes::conifer`] as the only set.
    pub fn trees() -> Self {
        Self::new(&[TreeMeshes::conifer()]).expect("the conifer is a valid mesh set")
    }

    /// Vertices of every mesh.
    pub fn vertices(&self) -> &[Vertex] {
        &self.vertices
    }

    /// Indices of every mesh, then the run `0, 1, 2, ...` where a LOD has several sets.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }

    /// The draws of full, medium and billboard: the mesh itself where the LOD has one, else
    /// the run as long as its largest mesh, vertex offset 0. The cull pass is built with
    /// these ([`DrawPass::lod_meshes`] returns the same).
    pub fn lods(&self) -> [DrawIndexedIndirect; 3] {
        self.lods
    }

    /// Per LOD: whether its draw indexes the run and the vertex stage fetches each corner's
    /// index (several sets), or it indexes its one mesh.
    pub fn fetch(&self) -> [bool; 3] {
        self.fetch
    }

    /// The ground quad's draw.
    pub fn ground(&self) -> DrawIndexedIndirect {
        self.ground
    }

    /// Per mesh, `[first index, index count, vertex offset, 0]`: the ground, the billboard,
    /// then full and medium of each set in order.
    pub fn table(&self) -> &[[u32; 4]] {
        &self.table
    }

    /// Mesh sets held.
    pub fn sets(&self) -> u32 {
        (self.table.len() as u32 - 2) / 2
    }

    /// Distance from the base (the instance position) to the farthest vertex of any LOD mesh of
    /// any set at scale 1: the radius the cull pass must use
    /// ([`CullView`](crate::gpu::cull::CullView)'s `radius_m`) so that nothing visible is
    /// culled.
    pub fn radius(&self) -> f32 {
        self.vertices[..self.tree_vertices]
            .iter()
            .map(|v| Vec3::from_array(v.position).length())
            .fold(0.0, f32::max)
    }

    /// Where every vertex of every LOD mesh of every set lies around the base at scale 1,
    /// whatever the yaw (billboards turn about the vertical axis too): the box the occlusion
    /// test uses.
    pub fn bounds(&self) -> InstanceBounds {
        let trees = &self.vertices[..self.tree_vertices];
        let mut b = InstanceBounds {
            radius: 0.0,
            y_min: f32::INFINITY,
            y_max: f32::NEG_INFINITY,
        };
        for v in trees {
            let [x, y, z] = v.position;
            b.radius = b.radius.max(x.hypot(z));
            b.y_min = b.y_min.min(y);
            b.y_max = b.y_max.max(y);
        }
        b
    }
}

/// The billboard texture of a tree like [`Meshes::trees`]: `width` × `height` RGBA8, the
/// foliage in light greys (the instance tint colours it), the trunk in bark brown, transparent
/// around it.
pub fn tree_billboard(width: u32, height: u32, seed: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity((width * height * 4) as usize);
    for y in 0..height {
        for x in 0..width {
            // Quad coordinates: x in [-w, w], y in [0, 1] upwards.
            let fx = ((x as f32 + 0.5) / width as f32 * 2.0 - 1.0) * BILLBOARD_HALF_WIDTH;
            let fy = 1.0 - (y as f32 + 0.5) / height as f32;
            let foliage = CONES_FULL
                .iter()
                .any(|&(y0, y1, r)| fy >= y0 && fy <= y1 && fx.abs() <= r * (y1 - fy) / (y1 - y0));
            let texel = if foliage {
                // Light from the upper left, a little noise so the crown is not flat.
                let h = (x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663) ^ seed)
                    .wrapping_mul(2_654_435_761)
                    >> 27;
                let shade =
                    0.72 + 0.25 * (0.5 - fx / (2.0 * BILLBOARD_HALF_WIDTH)) + h as f32 / 200.0;
                let g = (shade.clamp(0.0, 1.0) * 255.0) as u8;
                [g, g, g, 255]
            } else if fy <= TRUNK.1 && fx.abs() <= TRUNK.0 * 1.5 {
                [BARK[0], BARK[1], BARK[2], 255]
            } else {
                [0, 0, 0, 0]
            };
            out.extend_from_slice(&texel);
        }
    }
    out
}

/// Checks that `page` is an image a pass of `shared` can sample as an atlas page: of this
/// context, `SAMPLED` usage, [`ATLAS_FORMAT`], at least one mip.
pub(crate) fn check_atlas_page(shared: &Arc<Shared>, page: &Image) -> Result<()> {
    if !page.belongs_to(shared) {
        return Err(Error::Lifecycle(format!(
            "atlas page {:?} is of another context",
            page.name()
        )));
    }
    // VUID-VkWriteDescriptorSet-descriptorType-00337: the view is bound as a sampled
    // image, so its image needs SAMPLED usage (which also makes the view valid to create:
    // VUID-VkImageViewCreateInfo-image-04441).
    if !page.usage().contains(vk::ImageUsageFlags::SAMPLED) {
        return Err(Error::InvalidInput(format!(
            "atlas page {:?} (usage {:?}) lacks SAMPLED usage: the pass samples it",
            page.name(),
            page.usage()
        )));
    }
    // The view takes the colour aspect, and the fragment shader samples floats through a
    // linear filter: the atlas format (R8G8B8A8_UNORM, for which sampling and linear
    // filtering are mandatory features) is what the passes are built for.
    if page.format() != ATLAS_FORMAT {
        return Err(Error::InvalidInput(format!(
            "atlas page {:?} has format {:?}; the pass samples {ATLAS_FORMAT:?} pages",
            page.name(),
            page.format()
        )));
    }
    if page.mip_levels() == 0 {
        return Err(Error::InvalidInput(format!(
            "atlas page {:?} has no mip level",
            page.name()
        )));
    }
    Ok(())
}

/// A view of every mip of an atlas page that [`check_atlas_page`] accepted.
pub(crate) fn atlas_view(device: &ash::Device, page: &Image) -> Result<vk::ImageView> {
    let view_info = vk::ImageViewCreateInfo::default()
        .image(page.raw())
        .view_type(vk::ImageViewType::TYPE_2D)
        .format(page.format())
        .subresource_range(vk::ImageSubresourceRange {
            aspect_mask: vk::ImageAspectFlags::COLOR,
            base_mip_level: 0,
            level_count: page.mip_levels(),
            base_array_layer: 0,
            layer_count: 1,
        });
    // SAFETY: the page is a live 2D image of this device (an Image is always 2D, one
    // layer), of the atlas colour format (so the COLOR aspect is its only aspect) with
    // SAMPLED usage (VUID-VkImageViewCreateInfo-image-04441), all checked by
    // `check_atlas_page`; the view covers exactly its mip levels
    // (VUID-VkImageViewCreateInfo-subresourceRange-01718).
    unsafe { device.create_image_view(&view_info, None) }.map_err(vk_err("vkCreateImageView"))
}

/// The linear, edge-clamped sampler billboards sample the atlas with.
pub(crate) fn atlas_sampler(device: &ash::Device) -> Result<vk::Sampler> {
    let sampler_info = vk::SamplerCreateInfo::default()
        .mag_filter(vk::Filter::LINEAR)
        .min_filter(vk::Filter::LINEAR)
        .mipmap_mode(vk::SamplerMipmapMode::LINEAR)
        .address_mode_u(vk::SamplerAddressMode::CLAMP_TO_EDGE)
        .address_mode_v(vk::SamplerAddressMode::CLAMP_TO_EDGE)
        .address_mode_w(vk::SamplerAddressMode::CLAMP_TO_EDGE)
        .max_lod(vk::LOD_CLAMP_NONE);
    // SAFETY: valid create info.
    unsafe { device.create_sampler(&sampler_info, None) }.map_err(vk_err("vkCreateSampler"))
}

/// Host-visible buffers holding `meshes` (category `Outputs`): its vertices, indices and
/// table, named `"{who} vertices"`, `"{who} indices"` and `"{who} meshes"`, read as storage
/// buffers by the vertex stage (the indices are also the draws' index buffer).
pub(crate) fn mesh_buffers(ctx: &Context, who: &str, meshes: &Meshes) -> Result<[Buffer; 3]> {
    let host_buffer = |name: &str, bytes: &[u8], usage| -> Result<Buffer> {
        let mut b = ctx.create_buffer(&BufferDesc {
            name,
            size: bytes.len() as u64,
            usage: usage | vk::BufferUsageFlags::STORAGE_BUFFER,
            location: MemoryLocation::CpuToGpu,
            category: Category::Outputs,
        })?;
        b.mapped_mut()?[..bytes.len()].copy_from_slice(bytes);
        Ok(b)
    };
    Ok([
        host_buffer(
            &format!("{who} vertices"),
            bytemuck::cast_slice(&meshes.vertices),
            vk::BufferUsageFlags::empty(),
        )?,
        host_buffer(
            &format!("{who} indices"),
            bytemuck::cast_slice(&meshes.indices),
            vk::BufferUsageFlags::INDEX_BUFFER,
        )?,
        host_buffer(
            &format!("{who} meshes"),
            bytemuck::cast_slice(&meshes.table),
            vk::BufferUsageFlags::empty(),
        )?,
    ])
}

/// A species as the passes read it, laid out exactly as WGSL `SpeciesEntry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct SpeciesEntry {
    /// The billboard's UV rectangle (min u, min v, max u, max v).
    rect: [f32; 4],
    /// x: the mesh set.
    mesh: [u32; 4],
}
const _: () = assert!(size_of::<SpeciesEntry>() == shaders::layout::SPECIESENTRY_SIZE);
/// Bytes of a species table buffer (one `vkCmdUpdateBuffer`: at most 64 KiB).
pub(crate) const SPECIES_TABLE_BYTES: u64 = (MAX_SPECIES * size_of::<SpeciesEntry>()) as u64;
const _: () = assert!(SPECIES_TABLE_BYTES <= 65_536);

/// Which mesh set each species (by id) draws with, for a pass of `sets` sets; species past
/// the end draw with set 0.
#[derive(Debug, Default)]
pub(crate) struct SpeciesMeshes(Mutex<Vec<u32>>);

impl SpeciesMeshes {
    /// Species `species` draws with set `set` from now on ([`Error::InvalidInput`] for a set
    /// the pass lacks or an id past [`MAX_SPECIES`]).
    pub(crate) fn set(&self, species: SpeciesId, set: u32, sets: u32) -> Result<()> {
        let id = species.index() as usize;
        if set >= sets || id >= MAX_SPECIES {
            return Err(Error::InvalidInput(format!(
                "species {id} with mesh set {set}: the pass has {sets} sets and {MAX_SPECIES} species"
            )));
        }
        let mut v = lock(&self.0);
        if v.len() <= id {
            v.resize(id + 1, 0);
        }
        v[id] = set;
        Ok(())
    }

    fn get(&self) -> Vec<u32> {
        lock(&self.0).clone()
    }
}

/// The species table of a pass that samples atlas page `page`: each species' UV rectangle
/// (min u, min v, max u, max v), zeros for an id without a region, and its mesh set. At most
/// [`MAX_SPECIES`] ([`Error::InvalidInput`]); a species on another page is
/// [`Error::Unsupported`].
pub(crate) fn species_table(
    species: &[Option<AtlasRegion>],
    page: u32,
    meshes: &SpeciesMeshes,
) -> Result<Vec<SpeciesEntry>> {
    if species.len() > MAX_SPECIES {
        return Err(Error::InvalidInput(format!(
            "{} species, the table holds {MAX_SPECIES}",
            species.len()
        )));
    }
    let sets = meshes.get();
    species
        .iter()
        .enumerate()
        .map(|(id, r)| {
            let rect = match r {
                Some(r) if r.page != page => {
                    return Err(Error::Unsupported(format!(
                        "species {id} is on atlas page {}; the pass samples page {page}",
                        r.page
                    )));
                }
                Some(r) => [r.uv_min[0], r.uv_min[1], r.uv_max[0], r.uv_max[1]],
                None => [0.0; 4],
            };
            let set = sets.get(id).copied().unwrap_or(0);
            Ok(SpeciesEntry {
                rect,
                mesh: [set, 0, 0, 0],
            })
        })
        .collect()
}

/// Records `vkCmdUpdateBuffer` of each `(buffer, bytes)` at offset 0 (empty ones skipped),
/// after every vertex- and fragment-shader read recorded before and before every one recorded
/// after.
///
/// # Safety
/// `cmd` is recording on `device`, outside any rendering scope; each buffer is live, of
/// `device`, marked used by the frame `cmd` is recorded for, has `TRANSFER_DST` usage and holds
/// its bytes, which are a multiple of 4 and at most 65,536 (VUID-vkCmdUpdateBuffer-dataSize-00037,
/// -00038, -dstOffset-00032).
pub(crate) unsafe fn record_updates(
    device: &ash::Device,
    cmd: vk::CommandBuffer,
    updates: &[(&Buffer, &[u8])],
) {
    let readers = vk::PipelineStageFlags::VERTEX_SHADER | vk::PipelineStageFlags::FRAGMENT_SHADER;
    let reads = vk::AccessFlags::UNIFORM_READ | vk::AccessFlags::SHADER_READ;
    let barrier = |src, dst| {
        [vk::MemoryBarrier::default()
            .src_access_mask(src)
            .dst_access_mask(dst)]
    };
    // SAFETY: the caller's promises; the barriers need nothing else.
    unsafe {
        device.cmd_pipeline_barrier(
            cmd,
            readers,
            vk::PipelineStageFlags::TRANSFER,
            vk::DependencyFlags::empty(),
            &barrier(vk::AccessFlags::empty(), vk::AccessFlags::TRANSFER_WRITE),
            &[],
            &[],
        );
        for (buffer, bytes) in updates.iter().filter(|(_, b)| !b.is_empty()) {
            device.cmd_update_buffer(cmd, buffer.raw(), 0, bytes);
        }
        device.cmd_pipeline_barrier(
            cmd,
            vk::PipelineStageFlags::TRANSFER,
            readers,
            vk::DependencyFlags::empty(),
            &barrier(vk::AccessFlags::TRANSFER_WRITE, reads),
            &[],
            &[],
        );
    }
}

/// The frame constants, laid out exactly as WGSL `DrawFrame` (`shaders/common/draw.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DrawFrame {
    /// View-projection (Vulkan clip space, depth 0..1), column-major.
    pub view_proj: [[f32; 4]; 4],
    /// Camera position (xyz).
    pub camera: [f32; 4],
    /// Unit direction towards the sun (xyz), ambient term (w).
    pub sun: [f32; 4],
    /// Sky and fog colour (rgb), distance of full fog in metres (w).
    pub fog: [f32; 4],
    /// Ground rectangle: lowest x, lowest z, side in metres.
    pub ground: [f32; 4],
    /// x: unused; y: flags ([`DrawFrame::LOD_TINT`], [`DrawFrame::SRGB_TARGET`]); z: species in the table (set by
    /// [`DrawPass::prepare`]).
    pub params: [u32; 4],
}

const _: () = assert!(size_of::<DrawFrame>() == shaders::layout::DRAWFRAME_SIZE);
const _: () =
    assert!(std::mem::offset_of!(DrawFrame, camera) == shaders::layout::DRAWFRAME_OFFSET_CAMERA);
const _: () =
    assert!(std::mem::offset_of!(DrawFrame, params) == shaders::layout::DRAWFRAME_OFFSET_PARAMS);
const _: () =
    assert!(std::mem::offset_of!(DrawFrame, ground) == shaders::layout::DRAWFRAME_OFFSET_GROUND);

impl DrawFrame {
    /// Flag: colour instances by LOD (full red, medium yellow, billboard blue).
    pub const LOD_TINT: u32 = 1;
    /// Flag set by [`DrawPass::prepare`] for a pass built for an sRGB colour format: the
    /// colours (sky and fog included) are meant as the bytes a UNORM target stores, so the
    /// fragment stage decodes them before the attachment encodes them again, and an sRGB
    /// target stores the same bytes (within rounding).
    pub const SRGB_TARGET: u32 = 2;

    /// Frame constants for a camera, with a default sun, sky and fog.
    pub fn new(
        view_proj: Mat4,
        camera: Vec3,
        fog_m: f32,
        ground: [f32; 3],
        lod_tint: bool,
    ) -> Self {
        let sun = Vec3::new(-0.4, 0.8, 0.35).normalize();
        Self {
            view_proj: view_proj.to_cols_array_2d(),
            camera: [camera.x, camera.y, camera.z, 0.0],
            sun: [sun.x, sun.y, sun.z, 0.4],
            fog: [0.62, 0.74, 0.86, fog_m],
            ground: [ground[0], ground[1], ground[2], 0.0],
            params: [0, if lod_tint { Self::LOD_TINT } else { 0 }, 0, 0],
        }
    }

    /// The sky colour as RGBA (the clear colour that matches the fog).
    pub fn sky(&self) -> [f32; 4] {
        [self.fog[0], self.fog[1], self.fog[2], 1.0]
    }
}

/// Whether attachments of `format` encode what the shader writes as sRGB.
fn is_srgb(format: vk::Format) -> bool {
    matches!(
        format,
        vk::Format::R8_SRGB
            | vk::Format::R8G8_SRGB
            | vk::Format::R8G8B8_SRGB
            | vk::Format::B8G8R8_SRGB
            | vk::Format::R8G8B8A8_SRGB
            | vk::Format::B8G8R8A8_SRGB
            | vk::Format::A8B8G8R8_SRGB_PACK32
    )
}

/// The colour format of [`DrawPass::record_census`]'s attachment: per pixel, the list slot + 1
/// of the instance it shows; pixels that show none keep what the attachment was cleared to
/// (clear it to 0).
pub const CENSUS_FORMAT: vk::Format = vk::Format::R32_UINT;

/// How a [`DrawPass`] fits the host's frame ([`DrawPass::with_options`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrawOptions {
    /// Reversed depth: near is 1, far 0, the depth attachment cleared to 0 and tested
    /// `GREATER` (wgpu and Bevy's convention). The view-projection given in [`DrawFrame`] must
    /// then be the host's reversed one. Default `false`: near 0, far 1, `LESS`.
    pub reversed_depth: bool,
    /// Draw the ground quad under the world ([`DrawFrame::ground`]). Default `true`; a host
    /// with its own terrain turns it off.
    pub ground: bool,
}

impl Default for DrawOptions {
    fn default() -> Self {
        Self {
            reversed_depth: false,
            ground: true,
        }
    }
}

/// The draw pass's push constants (`DrawPush` in `shaders/draw.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct DrawPush {
    /// 0: instances of `lod`; 1: the ground.
    mode: u32,
    /// The LOD whose list this draw reads.
    lod: u32,
    /// Where that list starts in the cull pass's records.
    base: u32,
    /// Non-zero for the second occlusion phase's draws (they start after the first phase's
    /// entries of the list, a count the vertex stage reads from the cull pass's counters).
    second: u32,
    /// Non-zero: the draw indexes the run, and the vertex stage fetches each corner's index
    /// ([`Meshes::fetch`]).
    fetch: u32,
}

/// Which of the cull pass's lists a draw records ([`DrawPass::record_phase`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrawPhase {
    /// The ground and what [`CullPass::record`] or [`CullPass::record_first`] appended.
    First,
    /// What [`CullPass::record_second`] appended (no ground: the first phase drew it).
    Second,
}

/// The shadow maps a [`DrawPass`] samples: the image (kept alive by the pass while its view
/// lives), the pass's own view of it, and the frame [`DrawPass::prepare_shadows`] last ran for.
struct ShadowBinding {
    image: Arc<Image>,
    view: vk::ImageView,
    frame: Option<FrameTag>,
}

/// The pipeline and the buffers it reads besides the cull pass's. Dropping it retires
/// everything at the last frame that recorded it.
pub struct DrawPass {
    shared: Arc<Shared>,
    last_use: AtomicU64,
    set_layout: vk::DescriptorSetLayout,
    layout: vk::PipelineLayout,
    pipeline: vk::Pipeline,
    /// Set 1 of the shadowed pipeline: the shadow maps, their sampler and [`ShadowFrame`].
    shadow_set_layout: vk::DescriptorSetLayout,
    /// Sets 0 and 1, the same push constants.
    shadow_layout: vk::PipelineLayout,
    /// The same with `fs_shadowed`: used in frames that ran [`DrawPass::prepare_shadows`].
    shadowed: vk::Pipeline,
    /// `vs_census` and `fs_census` for [`CENSUS_FORMAT`] and the depth format, with `layout`:
    /// made by the first [`DrawPass::record_census`].
    census: Mutex<vk::Pipeline>,
    depth_format: vk::Format,
    sets: Mutex<DescriptorArena>,
    shadow_sets: Mutex<DescriptorArena>,
    sampler: vk::Sampler,
    /// Depth comparison (`LESS_OR_EQUAL`), linear where the shadow format allows it.
    shadow_sampler: vk::Sampler,
    shadow: Mutex<Option<ShadowBinding>>,
    /// A view of the atlas page, not the page: the page may be retired and destroyed while
    /// the pass lives; `record` then refuses (it takes the page and checks `atlas_image`), so
    /// the view is never used again, and it is destroyed with the pass.
    atlas_view: vk::ImageView,
    /// The image the view is of ([`Image::id`], never reused), checked at every record.
    atlas_image: u64,
    atlas_page: u32,
    lods: [DrawIndexedIndirect; 3],
    fetch: [bool; 3],
    ground: DrawIndexedIndirect,
    options: DrawOptions,
    /// The colour format is sRGB ([`DrawFrame::SRGB_TARGET`]).
    srgb_target: bool,
    radius: f32,
    bounds: InstanceBounds,
    vertices: Option<Buffer>,
    indices: Option<Buffer>,
    /// [`Meshes::table`].
    mesh_table: Option<Buffer>,
    /// Mesh sets in the buffers, and which one each species draws with.
    mesh_sets: u32,
    species_meshes: SpeciesMeshes,
    frame: Option<Buffer>,
    species: Option<Buffer>,
    /// The [`ShadowFrame`] uniform.
    shadow_frame: Option<Buffer>,
}

impl DrawPass {
    /// Builds the pipeline for colour and depth attachments of these formats, the meshes of
    /// [`Meshes::trees`], and a view of atlas page number `page_index`, `atlas_page` (the
    /// billboards' page: every drawn species must be on it; [`DrawPass::record`] takes the same
    /// image every frame, and a page that is replaced needs a new pass). Needs a graphics
    /// queue and dynamic rendering.
    ///
    /// The page must be an image the pass can sample: `SAMPLED` usage, the atlas format
    /// ([`ATLAS_FORMAT`], as [`Vegetation`](crate::vegetation::Vegetation)'s pages are) and at
    /// least one mip level; [`Error::InvalidInput`] otherwise.
    ///
    /// The pass holds a view of the page, not the page itself. When the page goes away (its
    /// last species is unregistered with
    /// [`Vegetation::unregister_species`](crate::vegetation::Vegetation::unregister_species),
    /// or its owner drops it), the page retires at its own last use (the last frame that
    /// uploaded to it or recorded this pass with it) and is destroyed once that frame
    /// completed, while the pass keeps its view. The view is never used again: every
    /// [`DrawPass::record`] takes the page by reference and returns [`Error::InvalidInput`]
    /// for any other image, including the page that replaces it (image ids are never reused).
    /// The view is destroyed with the pass; build a new pass for the new page.
    pub fn new(
        ctx: &Context,
        color_format: vk::Format,
        depth_format: vk::Format,
        atlas_page: &Image,
        page_index: u32,
    ) -> Result<Self> {
        Self::with_options(
            ctx,
            color_format,
            depth_format,
            atlas_page,
            page_index,
            DrawOptions::default(),
        )
    }

    /// As [`DrawPass::new`], for a host whose frame has other conventions
    /// ([`DrawOptions`]: reversed depth, its own ground).
    pub fn with_options(
        ctx: &Context,
        color_format: vk::Format,
        depth_format: vk::Format,
        atlas_page: &Image,
        page_index: u32,
        options: DrawOptions,
    ) -> Result<Self> {
        Self::with_meshes(
            ctx,
            color_format,
            depth_format,
            atlas_page,
            page_index,
            options,
            &Meshes::trees(),
        )
    }

    /// As [`DrawPass::with_options`], drawing the mesh sets of `meshes` ([`Meshes::new`]):
    /// every species draws with set 0 until [`DrawPass::set_species_meshes`] says otherwise.
    /// The cull pass it draws from must be built with [`DrawPass::lod_meshes`], and the cull
    /// view with [`DrawPass::radius`] (both cover every set).
    pub fn with_meshes(
        ctx: &Context,
        color_format: vk::Format,
        depth_format: vk::Format,
        atlas_page: &Image,
        page_index: u32,
        options: DrawOptions,
        meshes: &Meshes,
    ) -> Result<Self> {
        let shared = ctx.shared();
        shared.require(
            "the draw pass",
            &DeviceFeatures {
                dynamic_rendering: true,
                ..Default::default()
            },
            vk::QueueFlags::GRAPHICS,
        )?;
        check_atlas_page(shared, atlas_page)?;
        meshes.fits(ctx)?;
        let mut this = Self {
            shared: shared.clone(),
            last_use: AtomicU64::new(0),
            set_layout: vk::DescriptorSetLayout::null(),
            layout: vk::PipelineLayout::null(),
            pipeline: vk::Pipeline::null(),
            shadow_set_layout: vk::DescriptorSetLayout::null(),
            shadow_layout: vk::PipelineLayout::null(),
            shadowed: vk::Pipeline::null(),
            census: Mutex::new(vk::Pipeline::null()),
            depth_format,
            sets: Mutex::new(DescriptorArena::new(
                &[
                    (vk::DescriptorType::UNIFORM_BUFFER, 1),
                    (vk::DescriptorType::STORAGE_BUFFER, 6),
                    (vk::DescriptorType::SAMPLED_IMAGE, 1),
                    (vk::DescriptorType::SAMPLER, 1),
                ],
                8,
            )),
            shadow_sets: Mutex::new(DescriptorArena::new(
                &[
                    (vk::DescriptorType::SAMPLED_IMAGE, 1),
                    (vk::DescriptorType::SAMPLER, 1),
                    (vk::DescriptorType::UNIFORM_BUFFER, 1),
                ],
                8,
            )),
            sampler: vk::Sampler::null(),
            shadow_sampler: vk::Sampler::null(),
            shadow: Mutex::new(None),
            atlas_view: vk::ImageView::null(),
            atlas_image: atlas_page.id(),
            atlas_page: page_index,
            lods: meshes.lods,
            fetch: meshes.fetch,
            ground: meshes.ground,
            options,
            srgb_target: is_srgb(color_format),
            radius: meshes.radius(),
            bounds: meshes.bounds(),
            vertices: None,
            indices: None,
            mesh_table: None,
            mesh_sets: meshes.sets(),
            species_meshes: SpeciesMeshes::default(),
            frame: None,
            species: None,
            shadow_frame: None,
        };
        // On error, Drop retires whatever was built (nothing was recorded with it).
        this.build(ctx, color_format, depth_format, atlas_page, meshes)?;
        Ok(this)
    }

    /// Index count, first index and vertex offset of each LOD's draw ([`Meshes::lods`]), for
    /// [`CullPass::with_records`].
    pub fn lod_meshes(&self) -> [DrawIndexedIndirect; 3] {
        self.lods
    }

    /// Mesh sets the pass draws ([`Meshes::sets`]).
    pub fn mesh_sets(&self) -> u32 {
        self.mesh_sets
    }

    /// Species `species` draws with mesh set `set` from the next [`DrawPass::prepare`] on
    /// (set 0 until then). [`Error::InvalidInput`] for a set the pass lacks or a species id
    /// past [`MAX_SPECIES`].
    pub fn set_species_meshes(&self, species: SpeciesId, set: u32) -> Result<()> {
        self.species_meshes.set(species, set, self.mesh_sets)
    }

    /// The meshes' bounding radius at scale 1 ([`Meshes::radius`]), for the cull view.
    pub fn radius(&self) -> f32 {
        self.radius
    }

    /// The meshes' box at scale 1 ([`Meshes::bounds`]), for the occlusion test
    /// ([`CullPass::record_second`]).
    pub fn bounds(&self) -> InstanceBounds {
        self.bounds
    }

    fn build(
        &mut self,
        ctx: &Context,
        color_format: vk::Format,
        depth_format: vk::Format,
        atlas_page: &Image,
        meshes: &Meshes,
    ) -> Result<()> {
        let d = ctx.device();
        let [vertices, indices, table] = mesh_buffers(ctx, "draw", meshes)?;
        self.vertices = Some(vertices);
        self.indices = Some(indices);
        self.mesh_table = Some(table);
        let gpu_buffer = |name, size, usage| {
            ctx.create_buffer(&BufferDesc {
                name,
                size,
                usage: usage | vk::BufferUsageFlags::TRANSFER_DST,
                location: MemoryLocation::GpuOnly,
                category: Category::Outputs,
            })
        };
        self.frame = Some(gpu_buffer(
            "draw frame",
            size_of::<DrawFrame>() as u64,
            vk::BufferUsageFlags::UNIFORM_BUFFER,
        )?);
        self.species = Some(gpu_buffer(
            "draw species",
            SPECIES_TABLE_BYTES,
            vk::BufferUsageFlags::STORAGE_BUFFER,
        )?);
        self.shadow_frame = Some(gpu_buffer(
            "draw shadows",
            size_of::<ShadowFrame>() as u64,
            vk::BufferUsageFlags::UNIFORM_BUFFER,
        )?);

        self.atlas_view = atlas_view(d, atlas_page)?;
        self.sampler = atlas_sampler(d)?;
        // Hardware 2x2 filtering of the comparisons where the format allows it
        // (VUID-vkCmdDraw-magFilter-04553), single comparisons otherwise.
        // SAFETY: the adapter's physical device belongs to the context's live instance
        // (VUID-vkGetPhysicalDeviceFormatProperties-physicalDevice-parameter).
        let props = unsafe {
            ctx.instance()
                .get_physical_device_format_properties(ctx.adapter().handle, SHADOW_FORMAT)
        };
        let filter = if props
            .optimal_tiling_features
            .contains(vk::FormatFeatureFlags::SAMPLED_IMAGE_FILTER_LINEAR)
        {
            vk::Filter::LINEAR
        } else {
            vk::Filter::NEAREST
        };
        let shadow_info = vk::SamplerCreateInfo::default()
            .mag_filter(filter)
            .min_filter(filter)
            .mipmap_mode(vk::SamplerMipmapMode::NEAREST)
            .address_mode_u(vk::SamplerAddressMode::CLAMP_TO_EDGE)
            .address_mode_v(vk::SamplerAddressMode::CLAMP_TO_EDGE)
            .address_mode_w(vk::SamplerAddressMode::CLAMP_TO_EDGE)
            .compare_enable(true)
            .compare_op(vk::CompareOp::LESS_OR_EQUAL)
            .max_lod(0.0);
        // SAFETY: valid create info (compareEnable is core; no anisotropy, no unnormalized
        // coordinates).
        self.shadow_sampler =
            unsafe { d.create_sampler(&shadow_info, None) }.map_err(vk_err("vkCreateSampler"))?;

        let stages = vk::ShaderStageFlags::VERTEX | vk::ShaderStageFlags::FRAGMENT;
        let binding = |b: u32, t| {
            vk::DescriptorSetLayoutBinding::default()
                .binding(b)
                .descriptor_type(t)
                .descriptor_count(1)
                .stage_flags(stages)
        };
        let bindings = [
            binding(0, vk::DescriptorType::UNIFORM_BUFFER),
            binding(1, vk::DescriptorType::STORAGE_BUFFER),
            binding(2, vk::DescriptorType::STORAGE_BUFFER),
            binding(3, vk::DescriptorType::SAMPLED_IMAGE),
            binding(4, vk::DescriptorType::SAMPLER),
            binding(5, vk::DescriptorType::STORAGE_BUFFER),
            binding(6, vk::DescriptorType::STORAGE_BUFFER),
            binding(7, vk::DescriptorType::STORAGE_BUFFER),
            binding(8, vk::DescriptorType::STORAGE_BUFFER),
        ];
        let info = vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings);
        // SAFETY: valid info.
        self.set_layout = unsafe { d.create_descriptor_set_layout(&info, None) }
            .map_err(vk_err("vkCreateDescriptorSetLayout"))?;
        let fragment = |b: u32, t| {
            vk::DescriptorSetLayoutBinding::default()
                .binding(b)
                .descriptor_type(t)
                .descriptor_count(1)
                .stage_flags(vk::ShaderStageFlags::FRAGMENT)
        };
        let bindings = [
            fragment(0, vk::DescriptorType::SAMPLED_IMAGE),
            fragment(1, vk::DescriptorType::SAMPLER),
            fragment(2, vk::DescriptorType::UNIFORM_BUFFER),
        ];
        let info = vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings);
        // SAFETY: valid info.
        self.shadow_set_layout = unsafe { d.create_descriptor_set_layout(&info, None) }
            .map_err(vk_err("vkCreateDescriptorSetLayout"))?;
        let ranges = [vk::PushConstantRange::default()
            .stage_flags(vk::ShaderStageFlags::VERTEX)
            .size(size_of::<DrawPush>() as u32)];
        // The same set 0 and push constants in both: the shadowed layout adds set 1 only.
        let plain = [self.set_layout];
        let shadowed = [self.set_layout, self.shadow_set_layout];
        for (sets, layout) in [
            (&plain[..], &mut self.layout),
            (&shadowed[..], &mut self.shadow_layout),
        ] {
            let info = vk::PipelineLayoutCreateInfo::default()
                .set_layouts(sets)
                .push_constant_ranges(&ranges);
            // SAFETY: valid info referencing live set layouts.
            *layout = unsafe { d.create_pipeline_layout(&info, None) }
                .map_err(vk_err("vkCreatePipelineLayout"))?;
        }
        self.pipeline = self.create_pipeline(
            d,
            color_format,
            depth_format,
            (shaders::DRAW_FS_MAIN, c"fs_main"),
            self.layout,
            false,
        )?;
        self.shadowed = self.create_pipeline(
            d,
            color_format,
            depth_format,
            (shaders::DRAW_FS_SHADOWED, c"fs_shadowed"),
            self.shadow_layout,
            false,
        )?;
        Ok(())
    }

    /// The pipeline of `vs_main` and the fragment stage `fs`: (module, entry point), with
    /// `layout`; with `census`, of `vs_census` instead, testing depth without writing it
    /// (`LESS_OR_EQUAL`, or `GREATER_OR_EQUAL` reversed: the census's fragments meet the
    /// depth the draws stored).
    fn create_pipeline(
        &self,
        d: &ash::Device,
        color_format: vk::Format,
        depth_format: vk::Format,
        (fs_spirv, fs_entry): (&[u8], &std::ffi::CStr),
        layout: vk::PipelineLayout,
        census: bool,
    ) -> Result<vk::Pipeline> {
        // One module per stage: GPU-assisted validation cannot instrument a module that holds
        // both ("Mixed stage shader module not supported").
        let (vs_spirv, vs_entry) = if census {
            (shaders::DRAW_VS_CENSUS, c"vs_census")
        } else {
            (shaders::DRAW_VS_MAIN, c"vs_main")
        };
        let vs = shader_module(d, vs_spirv)?;
        let fs = match shader_module(d, fs_spirv) {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: just created, used by nothing.
                unsafe { d.destroy_shader_module(vs, None) };
                return Err(e);
            }
        };
        let stage_infos = [
            vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::VERTEX)
                .module(vs)
                .name(vs_entry),
            vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::FRAGMENT)
                .module(fs)
                .name(fs_entry),
        ];
        // No vertex input: the vertex stage fetches its corners from the mesh buffers.
        let vertex_input = vk::PipelineVertexInputStateCreateInfo::default();
        let assembly = vk::PipelineInputAssemblyStateCreateInfo::default()
            .topology(vk::PrimitiveTopology::TRIANGLE_LIST);
        let viewport = vk::PipelineViewportStateCreateInfo::default()
            .viewport_count(1)
            .scissor_count(1);
        let raster = vk::PipelineRasterizationStateCreateInfo::default()
            .polygon_mode(vk::PolygonMode::FILL)
            .cull_mode(vk::CullModeFlags::NONE)
            .front_face(vk::FrontFace::COUNTER_CLOCKWISE)
            .line_width(1.0);
        let multisample = vk::PipelineMultisampleStateCreateInfo::default()
            .rasterization_samples(vk::SampleCountFlags::TYPE_1);
        let depth = vk::PipelineDepthStencilStateCreateInfo::default()
            .depth_test_enable(true)
            .depth_write_enable(!census)
            .depth_compare_op(match (census, self.options.reversed_depth) {
                (false, false) => vk::CompareOp::LESS,
                (false, true) => vk::CompareOp::GREATER,
                (true, false) => vk::CompareOp::LESS_OR_EQUAL,
                (true, true) => vk::CompareOp::GREATER_OR_EQUAL,
            });
        let blend_attachments = [vk::PipelineColorBlendAttachmentState::default()
            .color_write_mask(vk::ColorComponentFlags::RGBA)];
        let blend =
            vk::PipelineColorBlendStateCreateInfo::default().attachments(&blend_attachments);
        let dynamic_states = [vk::DynamicState::VIEWPORT, vk::DynamicState::SCISSOR];
        let dynamic = vk::PipelineDynamicStateCreateInfo::default().dynamic_states(&dynamic_states);
        let color_formats = [color_format];
        let mut rendering = vk::PipelineRenderingCreateInfo::default()
            .color_attachment_formats(&color_formats)
            .depth_attachment_format(depth_format);
        let info = [vk::GraphicsPipelineCreateInfo::default()
            .stages(&stage_infos)
            .vertex_input_state(&vertex_input)
            .input_assembly_state(&assembly)
            .viewport_state(&viewport)
            .rasterization_state(&raster)
            .multisample_state(&multisample)
            .depth_stencil_state(&depth)
            .color_blend_state(&blend)
            .dynamic_state(&dynamic)
            .layout(layout)
            .push_next(&mut rendering)];
        // SAFETY: every state struct is valid and lives for the call; module and layout are
        // live; dynamic rendering is enabled (checked in new).
        let pipelines =
            unsafe { d.create_graphics_pipelines(vk::PipelineCache::null(), &info, None) };
        // SAFETY: the modules are no longer needed once the pipeline exists (or failed).
        unsafe {
            d.destroy_shader_module(vs, None);
            d.destroy_shader_module(fs, None);
        }
        Ok(pipelines
            .map_err(|(_, e)| e)
            .map_err(vk_err("vkCreateGraphicsPipelines"))?[0])
    }

    fn get(b: &Option<Buffer>) -> Result<&Buffer> {
        b.as_ref()
            .ok_or_else(|| Error::InvalidInput("draw pass was destroyed".into()))
    }

    /// Records the frame constants and the species table (each species' atlas region,
    /// indexed by species id as `Vegetation::species_regions` returns them), with the barriers
    /// that order them after the previous frame's draws and before this frame's. `frame.params`
    /// x and z are filled in here. A species on another atlas page than the pass's is an error.
    ///
    /// # Safety
    /// `cmd` must be recording on this context's device, outside any rendering scope, and be
    /// recorded for `frame` (submitted as its submission, or before it on the same queue).
    pub unsafe fn prepare(
        &self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        cull: &CullPass,
        constants: &DrawFrame,
        species: &[Option<AtlasRegion>],
    ) -> Result<()> {
        frame.check(&self.shared, "DrawPass::prepare")?;
        let species_uv = species_table(species, self.atlas_page, &self.species_meshes)?;
        let mut f = *constants;
        f.params[0] = 0;
        f.params[1] &= !DrawFrame::SRGB_TARGET;
        if self.srgb_target {
            f.params[1] |= DrawFrame::SRGB_TARGET;
        }
        f.params[2] = species_uv.len() as u32;
        if !cull.args()?.belongs_to(&self.shared) {
            return Err(Error::Lifecycle(
                "DrawPass::prepare: the cull pass is of another context".into(),
            ));
        }
        let (fb, sb) = (Self::get(&self.frame)?, Self::get(&self.species)?);
        // Marked before anything is recorded (refused while a `Mapped` view is alive).
        fb.mark_used(frame.value())?;
        sb.mark_used(frame.value())?;
        self.last_use.fetch_max(frame.value(), Ordering::AcqRel);
        // SAFETY: cmd is recording outside rendering for `frame` (caller); both buffers are
        // live, marked used by `frame`, and the data fits them (the species table holds
        // MAX_SPECIES, checked by `species_table`).
        unsafe {
            record_updates(
                &self.shared.device,
                cmd,
                &[
                    (fb, bytemuck::bytes_of(&f)),
                    (sb, bytemuck::cast_slice(&species_uv)),
                ],
            )
        };
        Ok(())
    }

    /// Points this frame's draws at the sun's shadow maps: records the [`ShadowFrame`] of what
    /// `shadows` rendered in this frame ([`ShadowMaps::constants`]; shadows fade out towards
    /// `distance_m` from the camera), with the barriers that order it after the previous
    /// frame's draws and before this frame's, and makes [`DrawPass::record`] and
    /// [`DrawPass::record_phase`] use the shadowed pipeline for the rest of `frame`. A frame
    /// that does not call it draws without shadows. The first call with a shadow image (and
    /// each call with another one) makes the pass a view of it; the pass keeps that image
    /// alive while the view lives (until the next image, or the pass, retires it).
    ///
    /// [`Error::Lifecycle`] if `shadows` did not record for `frame`, or is of another context;
    /// [`Error::InvalidInput`] for a `distance_m` that is not positive and finite. Nothing is
    /// recorded on error.
    ///
    /// # Safety
    /// As [`DrawPass::prepare`], and: [`ShadowMaps::record`] for `frame` was recorded before
    /// this in submission order, and no other recording that writes the shadow image comes
    /// between it and this frame's draws.
    pub unsafe fn prepare_shadows(
        &self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        shadows: &ShadowMaps,
        distance_m: f32,
    ) -> Result<()> {
        frame.check(&self.shared, "DrawPass::prepare_shadows")?;
        let image = shadows.shared_image();
        if !image.belongs_to(&self.shared) {
            return Err(Error::Lifecycle(
                "DrawPass::prepare_shadows: the shadow maps are of another context".into(),
            ));
        }
        let constants = shadows.constants(frame, distance_m)?;
        let ub = Self::get(&self.shadow_frame)?;
        let mut binding = lock(&self.shadow);
        let view = match binding.as_ref() {
            Some(b) if b.image.id() == image.id() => None,
            _ => Some(depth_view(&self.shared.device, image)?),
        };
        // Marked before anything is recorded (refused while a `Mapped` view is alive).
        if let Err(e) = ub.mark_used(frame.value()) {
            if let Some(v) = view {
                // SAFETY: just created, used by nothing.
                unsafe { self.shared.device.destroy_image_view(v, None) };
            }
            return Err(e);
        }
        if let Some(view) = view {
            let old = binding.replace(ShadowBinding {
                image: image.clone(),
                view,
                frame: None,
            });
            if let Some(old) = old {
                // Every frame that drew with the old view is at or below the pass's last use.
                self.shared.retire_object(
                    RawObject::ImageView(old.view),
                    self.last_use.load(Ordering::Acquire),
                );
            }
        }
        if let Some(b) = binding.as_mut() {
            b.frame = Some(frame.tag());
        }
        self.last_use.fetch_max(frame.value(), Ordering::AcqRel);
        // SAFETY: cmd is recording outside rendering for `frame` (caller); the buffer is live,
        // marked used by `frame`, and holds exactly one ShadowFrame.
        unsafe {
            record_updates(
                &self.shared.device,
                cmd,
                &[(ub, bytemuck::bytes_of(&constants))],
            )
        };
        Ok(())
    }

    /// Records the ground and the indirect draws (full, medium, billboard) of everything the
    /// cull pass appended this frame (by [`CullPass::record`], or by both occlusion phases)
    /// over the whole `extent`, sampling `atlas_page` (the image the pass was built with).
    /// Marks the pass, the page and the cull pass's records, arguments and counters used by
    /// `frame`.
    ///
    /// [`Error::InvalidInput`] for another image than the pass's page (also once that page was
    /// retired: see [`DrawPass::new`]); [`Error::Lifecycle`] while a
    /// [`Mapped`](crate::gpu::memory::Mapped) view of the cull pass's records or arguments is
    /// alive. Nothing is recorded on error.
    ///
    /// # Safety
    /// `cmd` must be recording on this context's device inside a dynamic-rendering scope whose
    /// attachments have the formats given to [`DrawPass::new`], recorded for `frame`;
    /// [`CullPass::record`] (with records) and [`DrawPass::prepare`] must have been recorded
    /// before it in submission order; the atlas page must be in `SHADER_READ_ONLY_OPTIMAL`
    /// layout (as `Vegetation::record` leaves it); in a frame that ran
    /// [`DrawPass::prepare_shadows`], its contract holds.
    pub unsafe fn record(
        &self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        cull: &CullPass,
        atlas_page: &Image,
        extent: vk::Extent2D,
    ) -> Result<()> {
        // SAFETY: the caller's promises are this function's.
        unsafe {
            self.record_lists(
                frame,
                cmd,
                cull,
                atlas_page,
                extent,
                &[DrawPhase::First, DrawPhase::Second],
                false,
            )
        }
    }

    /// As [`DrawPass::record`], one occlusion phase's draws: [`DrawPhase::First`] (the ground
    /// and what [`CullPass::record_first`] appended) after the first phase,
    /// [`DrawPhase::Second`] (what [`CullPass::record_second`] appended) after the second,
    /// typically into the same attachments (the second loading what the first stored).
    ///
    /// # Safety
    /// As [`DrawPass::record`], with the phase's cull recorded before it in submission order.
    pub unsafe fn record_phase(
        &self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        cull: &CullPass,
        atlas_page: &Image,
        extent: vk::Extent2D,
        phase: DrawPhase,
    ) -> Result<()> {
        // SAFETY: the caller's promises are this function's.
        unsafe { self.record_lists(frame, cmd, cull, atlas_page, extent, &[phase], false) }
    }

    /// The census: which of the drawn instances reach the image. Draws the instances
    /// [`DrawPass::record`] draws (both occlusion phases' lists; not the ground) again, with the
    /// same vertices, into a [`CENSUS_FORMAT`] colour attachment, testing against the depth
    /// the draws stored without writing it, with early fragment tests: each pixel gets the
    /// list slot + 1 of the instance whose surface it shows (a billboard's clear texels show
    /// none), 0 where none. The distinct non-zero values of the attachment (clear it to 0) are
    /// the instances that reach the image; no conservative culling can draw fewer at the same
    /// image. A diagnostic for measuring culling (`understory demo --census on`): it costs a
    /// second draw of every instance.
    ///
    /// The positions are invariant in both vertex stages, so a fragment of the surface the
    /// draws kept meets its stored depth exactly (`LESS_OR_EQUAL`, `GREATER_OR_EQUAL`
    /// reversed). Where two instances' surfaces share a depth, the census keeps one of them.
    ///
    /// # Safety
    /// `cmd` must be recording on this context's device inside a dynamic-rendering scope whose
    /// colour attachment has [`CENSUS_FORMAT`] and whose depth attachment has the depth format
    /// the pass was built with ([`DrawPass::new`], [`DrawPass::with_options`] or
    /// [`DrawPass::with_meshes`]), in a layout for reading depth as an attachment, holding
    /// what this frame's [`DrawPass::record`] (or both [`DrawPass::record_phase`]s) stored,
    /// with the memory dependency from those depth writes to this scope's depth tests
    /// recorded before it; recorded for `frame`, after those draws in submission order, with
    /// no cull of `cull` recorded between; otherwise as [`DrawPass::record`].
    ///
    /// For a meaningful count (not for soundness): the same `extent` as the draws, and no
    /// [`DrawPass::prepare`] with other constants recorded between them and the census.
    pub unsafe fn record_census(
        &self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        cull: &CullPass,
        atlas_page: &Image,
        extent: vk::Extent2D,
    ) -> Result<()> {
        // SAFETY: the caller's promises are this function's.
        unsafe {
            self.record_lists(
                frame,
                cmd,
                cull,
                atlas_page,
                extent,
                &[DrawPhase::First, DrawPhase::Second],
                true,
            )
        }
    }

    /// The census pipeline, made the first time.
    fn census_pipeline(&self) -> Result<vk::Pipeline> {
        let mut census = lock(&self.census);
        if *census == vk::Pipeline::null() {
            *census = self.create_pipeline(
                &self.shared.device,
                CENSUS_FORMAT,
                self.depth_format,
                (shaders::DRAW_FS_CENSUS, c"fs_census"),
                self.layout,
                true,
            )?;
        }
        Ok(*census)
    }

    /// # Safety
    /// As [`DrawPass::record`] (with `census`, as [`DrawPass::record_census`]).
    #[allow(clippy::too_many_arguments)]
    unsafe fn record_lists(
        &self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        cull: &CullPass,
        atlas_page: &Image,
        extent: vk::Extent2D,
        phases: &[DrawPhase],
        census: bool,
    ) -> Result<()> {
        frame.check(&self.shared, "DrawPass::record")?;
        if atlas_page.id() != self.atlas_image {
            return Err(Error::InvalidInput(format!(
                "DrawPass::record: atlas page {:?} is not the image the pass was built with",
                atlas_page.name()
            )));
        }
        let (vb, ib, tb, fb, sb) = (
            Self::get(&self.vertices)?,
            Self::get(&self.indices)?,
            Self::get(&self.mesh_table)?,
            Self::get(&self.frame)?,
            Self::get(&self.species)?,
        );
        let (records, args, counters) = (cull.records()?, cull.args()?, cull.counters()?);
        // The indirect commands index this pass's mesh buffers.
        if cull.meshes() != self.lods {
            return Err(Error::InvalidInput(format!(
                "DrawPass::record: the cull pass draws meshes {:?}, this pass has {:?} (build it with DrawPass::lod_meshes)",
                cull.meshes(),
                self.lods
            )));
        }
        let bases = cull.list_bases();
        if !records.belongs_to(&self.shared) {
            return Err(Error::Lifecycle(
                "DrawPass::record: the cull pass is of another context".into(),
            ));
        }
        let census_pipeline = if census {
            Some(self.census_pipeline()?)
        } else {
            None
        };
        let value = frame.value();
        let shadow_guard = lock(&self.shadow);
        // Shadows in the frames that prepared them (their uniform and image are this frame's);
        // the census draws no colour, so it never shades.
        let shadow = shadow_guard
            .as_ref()
            .filter(|b| !census && b.frame.as_ref().is_some_and(|t| t.is(frame)));
        let shadow_frame = match shadow {
            Some(_) => Some(Self::get(&self.shadow_frame)?),
            None => None,
        };
        // Marked before anything is recorded: a buffer with a live `Mapped` view refuses
        // (those marked before it only wait for this frame).
        for b in [vb, ib, tb, fb, sb, records, args, counters]
            .into_iter()
            .chain(shadow_frame)
        {
            b.mark_used(value)?;
        }
        atlas_page.touch(value);
        if let Some(b) = shadow {
            b.image.touch(value);
        }
        let set = lock(&self.sets).allocate(&self.shared, value, self.set_layout)?;
        let shadow_set = match shadow {
            Some(_) => Some(lock(&self.shadow_sets).allocate(
                &self.shared,
                value,
                self.shadow_set_layout,
            )?),
            None => None,
        };
        self.last_use.fetch_max(value, Ordering::AcqRel);
        let d = &self.shared.device;
        let buf = crate::gpu::compute::whole;
        let (fi, ri, si, ci) = (buf(fb), buf(records), buf(sb), buf(counters));
        let (vi, ii, ti) = (buf(vb), buf(ib), buf(tb));
        let image = [vk::DescriptorImageInfo::default()
            .image_view(self.atlas_view)
            .image_layout(vk::ImageLayout::SHADER_READ_ONLY_OPTIMAL)];
        let sampler = [vk::DescriptorImageInfo::default().sampler(self.sampler)];
        let shadow_image = [vk::DescriptorImageInfo::default()
            .image_view(shadow.map_or(vk::ImageView::null(), |b| b.view))
            .image_layout(SHADOW_READ_LAYOUT)];
        let shadow_sampler = [vk::DescriptorImageInfo::default().sampler(self.shadow_sampler)];
        let shadow_info = buf(shadow_frame.unwrap_or(fb));
        let mut writes = vec![
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(0)
                .descriptor_type(vk::DescriptorType::UNIFORM_BUFFER)
                .buffer_info(&fi),
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(1)
                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                .buffer_info(&ri),
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(2)
                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                .buffer_info(&si),
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(3)
                .descriptor_type(vk::DescriptorType::SAMPLED_IMAGE)
                .image_info(&image),
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(4)
                .descriptor_type(vk::DescriptorType::SAMPLER)
                .image_info(&sampler),
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(5)
                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                .buffer_info(&ci),
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(6)
                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                .buffer_info(&vi),
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(7)
                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                .buffer_info(&ii),
            vk::WriteDescriptorSet::default()
                .dst_set(set)
                .dst_binding(8)
                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                .buffer_info(&ti),
        ];
        if let Some(s) = shadow_set {
            writes.extend([
                vk::WriteDescriptorSet::default()
                    .dst_set(s)
                    .dst_binding(0)
                    .descriptor_type(vk::DescriptorType::SAMPLED_IMAGE)
                    .image_info(&shadow_image),
                vk::WriteDescriptorSet::default()
                    .dst_set(s)
                    .dst_binding(1)
                    .descriptor_type(vk::DescriptorType::SAMPLER)
                    .image_info(&shadow_sampler),
                vk::WriteDescriptorSet::default()
                    .dst_set(s)
                    .dst_binding(2)
                    .descriptor_type(vk::DescriptorType::UNIFORM_BUFFER)
                    .buffer_info(&shadow_info),
            ]);
        }
        let (pipeline, layout) = match (census_pipeline, shadow) {
            (Some(p), _) => (p, self.layout),
            (None, Some(_)) => (self.shadowed, self.shadow_layout),
            (None, None) => (self.pipeline, self.layout),
        };
        let sets: Vec<vk::DescriptorSet> = [set].into_iter().chain(shadow_set).collect();
        let stride = size_of::<DrawIndexedIndirect>() as u64;
        // SAFETY (whole body): cmd is recording inside a compatible rendering scope (caller);
        // every buffer, view and sampler is live and marked used by `frame` (the view's image
        // is `atlas_page`, checked by id); the set is fresh from the arena (no pending command
        // uses it) and fully written before it is bound (with shadows, set 1 too, bound with
        // the layout the shadowed pipeline was made with); the indirect arguments were finalized by the cull
        // pass, whose closing barrier covers DRAW_INDIRECT and the vertex stage; each draw
        // reads `records` only within its LOD's list (instance counts are clamped to capacity;
        // a second-phase draw starts at the first phase's kept entries and counts only what
        // follows them up to capacity) and has firstInstance 0 (VUID-VkDrawIndexedIndirectCommand-firstInstance-00554).
        // With shadows: the shadow view is of the image the binding keeps alive, touched by
        // `frame`, a depth view in SHADOW_READ_LAYOUT (ShadowMaps::record for this frame left it
        // there: prepare_shadows' contract), which VUID-VkWriteDescriptorSet-descriptorType-04149
        // allows for a sampled image; the comparison sampler's filter is one the format
        // supports (VUID-vkCmdDraw-magFilter-04553).
        // Meshes: the arguments index this pass's index buffer with this pass's ranges (the
        // cull pass's meshes are the pass's `lods`, checked above, and the arguments were
        // written with them); each index is in its mesh's vertices and each vertex-stage read
        // of the mesh buffers stays in range (`Meshes::new` checked them; a corner past its
        // mesh's index count reads nothing), and every buffer fits maxStorageBufferRange
        // (`Meshes::fits`, VUID-VkWriteDescriptorSet-descriptorType-00333).
        unsafe {
            d.cmd_bind_pipeline(cmd, vk::PipelineBindPoint::GRAPHICS, pipeline);
            d.cmd_set_viewport(
                cmd,
                0,
                &[vk::Viewport {
                    x: 0.0,
                    y: 0.0,
                    width: extent.width as f32,
                    height: extent.height as f32,
                    min_depth: 0.0,
                    max_depth: 1.0,
                }],
            );
            d.cmd_set_scissor(
                cmd,
                0,
                &[vk::Rect2D {
                    offset: vk::Offset2D::default(),
                    extent,
                }],
            );
            d.update_descriptor_sets(&writes, &[]);
            d.cmd_bind_descriptor_sets(cmd, vk::PipelineBindPoint::GRAPHICS, layout, 0, &sets, &[]);
            d.cmd_bind_index_buffer(cmd, ib.raw(), 0, vk::IndexType::UINT32);
            let constants = |p: DrawPush| {
                d.cmd_push_constants(
                    cmd,
                    layout,
                    vk::ShaderStageFlags::VERTEX,
                    0,
                    bytemuck::bytes_of(&p),
                )
            };
            for &phase in phases {
                let second = u32::from(phase == DrawPhase::Second);
                if phase == DrawPhase::First && self.options.ground && !census {
                    constants(DrawPush {
                        mode: 1,
                        ..Default::default()
                    });
                    let g = self.ground;
                    d.cmd_draw_indexed(cmd, g.index_count, 1, g.first_index, g.vertex_offset, 0);
                }
                for l in 0..3u32 {
                    constants(DrawPush {
                        mode: 0,
                        lod: l,
                        base: bases[l as usize],
                        second,
                        fetch: u32::from(self.fetch[l as usize]),
                    });
                    d.cmd_draw_indexed_indirect(
                        cmd,
                        args.raw(),
                        u64::from(3 * second + l) * stride,
                        1,
                        stride as u32,
                    );
                }
            }
        }
        drop(shadow_guard);
        Ok(())
    }
}

impl std::fmt::Debug for DrawPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DrawPass")
            .field("atlas_page", &self.atlas_page)
            .field("radius", &self.radius)
            .field("last_use", &self.last_use.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drop for DrawPass {
    fn drop(&mut self) {
        lock(&self.sets).retire(&self.shared);
        lock(&self.shadow_sets).retire(&self.shared);
        let last = *self.last_use.get_mut();
        retire_pipeline_objects(
            &self.shared,
            last,
            &mut self.pipeline,
            &mut self.layout,
            &mut self.set_layout,
        );
        retire_pipeline_objects(
            &self.shared,
            last,
            &mut self.shadowed,
            &mut self.shadow_layout,
            &mut self.shadow_set_layout,
        );
        let census = std::mem::take(self.census.get_mut().unwrap_or_else(|p| p.into_inner()));
        if census != vk::Pipeline::null() {
            self.shared.retire_object(RawObject::Pipeline(census), last);
        }
        for sampler in [&mut self.sampler, &mut self.shadow_sampler] {
            self.shared
                .retire_object(RawObject::Sampler(std::mem::take(sampler)), last);
        }
        self.shared.retire_object(
            RawObject::ImageView(std::mem::take(&mut self.atlas_view)),
            last,
        );
        if let Some(b) = self
            .shadow
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            self.shared
                .retire_object(RawObject::ImageView(b.view), last);
        }
        // The buffers (and the shadow image, when this held its last reference) retire
        // themselves at their own last use when dropped with the pass.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A box 0.5 wide and 1.5 tall: taller and wider than the conifer.
    fn tall_box() -> Mesh {
        let mut vertices = Vec::new();
        for y in [0.0, 1.5] {
            for (x, z) in [(-0.25, -0.25), (0.25, -0.25), (0.25, 0.25), (-0.25, 0.25)] {
                vertices.push(Vertex {
                    position: [x, y, z],
                    normal: [0.0, 1.0, 0.0],
                    uv: [0.0; 2],
                    color: [200, 40, 40, 0],
                });
            }
        }
        let mut indices = Vec::new();
        for i in 0..4u32 {
            let j = (i + 1) % 4;
            indices.extend_from_slice(&[i, j, 4 + j, i, 4 + j, 4 + i]);
        }
        indices.extend_from_slice(&[4, 5, 6, 4, 6, 7]);
        Mesh { vertices, indices }
    }

    #[test]
    fn meshes_index_inside_their_own_vertices() {
        let boxes = TreeMeshes {
            full: tall_box(),
            medium: tall_box(),
        };
        for m in [
            Meshes::trees(),
            Meshes::new(&[TreeMeshes::conifer(), boxes.clone()]).unwrap(),
        ] {
            // Entries in the order they were laid out: billboard, each set's, ground last.
            let mut order: Vec<[u32; 4]> = m.table[1..].to_vec();
            order.push(m.table[0]);
            for (k, e) in order.iter().enumerate() {
                let end = order
                    .get(k + 1)
                    .map_or(m.table[0][2] as usize + 4, |n| n[2] as usize);
                let count = end - e[2] as usize;
                let idx = &m.indices[e[0] as usize..(e[0] + e[1]) as usize];
                assert!(!idx.is_empty() && idx.len().is_multiple_of(3), "mesh {k}");
                assert!(idx.iter().all(|&i| (i as usize) < count), "mesh {k}");
            }
            assert_eq!(m.vertices.len(), m.table[0][2] as usize + 4);
            // A LOD of several sets indexes the run 0, 1, 2, ... as far as its largest mesh;
            // one of a single mesh draws that mesh.
            assert_eq!(m.fetch, [m.sets() > 1, m.sets() > 1, false]);
            for (lod, d) in m.lods.iter().enumerate() {
                if !m.fetch[lod] {
                    let e = m.table[if lod == 2 { 1 } else { 2 + lod }];
                    assert_eq!([d.first_index, d.index_count, d.vertex_offset as u32, 0], e);
                    continue;
                }
                let largest = m.table[1..]
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| match lod {
                        2 => *i == 0,
                        _ => *i > 0 && (*i - 1) % 2 == lod,
                    })
                    .map(|(_, e)| e[1])
                    .max()
                    .unwrap();
                assert_eq!(d.index_count, largest, "lod {lod}");
                assert_eq!(d.vertex_offset, 0);
                let run = &m.indices[d.first_index as usize..][..d.index_count as usize];
                assert!(run.iter().enumerate().all(|(i, &v)| v == i as u32));
            }
            let g = m.ground;
            assert_eq!(
                [g.first_index, g.index_count, g.vertex_offset as u32, 0],
                m.table[0]
            );
        }
        let conifer = Meshes::trees();
        // Full detail has more triangles than medium, medium more than the billboard.
        assert!(conifer.lods[0].index_count > conifer.lods[1].index_count);
        assert!(conifer.lods[1].index_count > conifer.lods[2].index_count);
        // Every tree vertex fits the cull radius around the base, which is a tight bound.
        let r = conifer.radius();
        assert!((1.0..1.1).contains(&r), "radius {r}");
        for v in &conifer.vertices[..conifer.table[0][2] as usize] {
            assert!(Vec3::from_array(v.position).length() <= r);
        }
        // The occlusion box is tighter than the sphere: trees stand on their base and are
        // narrower than tall.
        let b = conifer.bounds();
        assert!(
            b.y_min >= 0.0 && b.y_max <= r && b.radius < 0.5 * r,
            "{b:?}"
        );
        // With the box, radius and bounds cover it too (1.5 tall, corners 0.354 out).
        let both = Meshes::new(&[TreeMeshes::conifer(), boxes]).unwrap();
        assert_eq!(both.sets(), 2);
        let r2 = both.radius();
        assert!((r2 - (1.5f32.powi(2) + 0.125).sqrt()).abs() < 1e-5, "{r2}");
        let b2 = both.bounds();
        assert!(
            (b2.y_max - 1.5).abs() < 1e-6 && b2.radius >= 0.3535,
            "{b2:?}"
        );
    }

    #[test]
    fn bad_meshes_are_refused() {
        let ok = TreeMeshes::conifer();
        assert!(matches!(Meshes::new(&[]), Err(Error::InvalidInput(_))));
        let many = vec![ok.clone(); MAX_MESH_SETS + 1];
        assert!(matches!(Meshes::new(&many), Err(Error::InvalidInput(_))));
        let mut out_of_range = ok.clone();
        out_of_range.medium.indices[4] = out_of_range.medium.vertices.len() as u32;
        let mut partial = ok.clone();
        partial.full.indices.pop();
        let mut empty = ok.clone();
        empty.full = Mesh::default();
        let mut nan = ok.clone();
        nan.full.vertices[3].normal[1] = f32::NAN;
        // Finite, but its radius would overflow to infinity.
        let mut huge = ok.clone();
        huge.medium.vertices[0].position = [3e38; 3];
        for (what, bad) in [
            ("index out of range", out_of_range),
            ("partial triangle", partial),
            ("empty", empty),
            ("NaN normal", nan),
            ("past the extent", huge),
        ] {
            match Meshes::new(&[ok.clone(), bad]) {
                Err(Error::InvalidInput(m)) => assert!(m.contains("mesh set 1"), "{what}: {m}"),
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn billboard_texture_is_opaque_inside_and_clear_outside() {
        let (w, h) = (32u32, 64u32);
        let t = tree_billboard(w, h, 1);
        assert_eq!(t.len(), (w * h * 4) as usize);
        let alpha = |x: u32, y: u32| t[((y * w + x) * 4 + 3) as usize];
        assert_eq!(alpha(w / 2, h / 2), 255, "crown centre");
        assert_eq!(alpha(0, 0), 0, "top-left corner");
        assert_eq!(alpha(w / 2, h - 1), 255, "trunk");
        assert_eq!(alpha(0, h - 1), 0, "beside the trunk");
    }
}
