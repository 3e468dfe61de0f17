//! The GPU cull pass: one thread per instance tests the frustum and the distance bands, appends
//! visible instances to per-LOD lists and produces `VkDrawIndexedIndirectCommand`s, all recorded
//! into the caller's command buffer. [`classify_cpu`] is the CPU reference of the same rule.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ash::vk;
use glam::{Mat4, Vec3, Vec4};

use crate::error::{Error, Result};
use crate::gpu::adapter::DeviceFeatures;
use crate::gpu::compute::{
    DescriptorArena, compute_pipeline, image_barrier, lock, memory_barrier, pipeline_layout,
    retire_pipeline_objects, set_layout, set_layout_supported, set_layout_with_counts, whole,
    write_set,
};
use crate::gpu::context::{Context, Frame, FrameTag, Shared};
use crate::gpu::memory::{Buffer, BufferDesc, Image, ImageDesc, MemoryLocation, RawObject};
use crate::gpu::pyramid::{DepthPyramid, PYRAMID_LAYOUT};
use crate::gpu::shaders;
use crate::policy::category::Category;
use crate::policy::lod::{Lod, LodBands};
use crate::policy::outputs::{ListSizer, ListSizing};
use crate::world::instance::Instance;

/// Threads per cull workgroup.
const GROUP: u32 = 256;
/// Words after the lists that the pass never writes (tests check them).
pub const LIST_GUARD_WORDS: u64 = 64;
/// Level code for invalid (non-finite) instances.
pub const LOD_INVALID: u32 = 4;

/// How visible instances are appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compaction {
    /// One atomic per visible instance.
    Atomic,
    /// One scan per subgroup (each thread's four instances counted per LOD), one
    /// shared-memory atomic per subgroup and LOD, and one global atomic per workgroup (1024
    /// instances) and LOD.
    Subgroup,
}

impl Compaction {
    /// Instances one workgroup covers (`CULL_PER_GROUP` in `shaders/common/cull.wgsl`).
    fn per_group(self) -> u32 {
        match self {
            Compaction::Atomic => GROUP,
            Compaction::Subgroup => 1024,
        }
    }
}

/// The view the pass culls against; the exact values both the GPU and [`classify_cpu`] use.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CullView {
    /// Frustum planes, normals pointing inside: inside when `dot(n, p) + w >= -radius`.
    pub planes: [[f32; 4]; 6],
    /// Camera position (xyz) and the bounding radius of an instance of scale 1 (w).
    pub camera: [f32; 4],
    /// Squared band edges at the current quality (full, medium, billboard, unused).
    pub bands_sq: [f32; 4],
}

const _: () = assert!(size_of::<CullView>() == shaders::layout::CULLVIEW_SIZE);
const _: () =
    assert!(std::mem::offset_of!(CullView, camera) == shaders::layout::CULLVIEW_OFFSET_CAMERA);
const _: () =
    assert!(std::mem::offset_of!(CullView, bands_sq) == shaders::layout::CULLVIEW_OFFSET_BANDS_SQ);

impl CullView {
    /// From a view-projection matrix (Vulkan clip space, depth 0..1; reversed or infinite
    /// depth works too: an infinite far plane culls nothing, the LOD bands end the view), the
    /// camera, the instance radius at scale 1, and the LOD bands at `quality`.
    pub fn new(
        view_proj: Mat4,
        camera: Vec3,
        radius_m: f32,
        bands: &LodBands,
        quality: f32,
    ) -> Result<Self> {
        Self::from_planes(frustum_planes(view_proj), camera, radius_m, bands, quality)
    }

    /// From explicit planes (normals pointing inside, need not be unit length).
    pub fn from_planes(
        planes: [[f32; 4]; 6],
        camera: Vec3,
        radius_m: f32,
        bands: &LodBands,
        quality: f32,
    ) -> Result<Self> {
        let finite = planes.iter().flatten().all(|v| v.is_finite());
        if !(finite && camera.is_finite() && radius_m >= 0.0 && radius_m.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "cull view: planes {planes:?}, camera {camera}, radius {radius_m}"
            )));
        }
        if !(bands.is_valid() && quality > 0.0 && quality.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "bands {bands:?} at quality {quality}"
            )));
        }
        let [f, m, b] = bands.scaled(quality);
        Ok(Self {
            planes,
            camera: [camera.x, camera.y, camera.z, radius_m],
            bands_sq: [f * f, m * m, b * b, 0.0],
        })
    }
}

/// The six clip planes of a view-projection (Vulkan clip space, depth 0..1), unit normals
/// pointing inside. A plane without a normal that everything is inside of (`0 ≤ w`, the far
/// plane of an infinite projection, reversed or not) becomes `[0, 0, 0, 1]`; one that nothing
/// is inside of stays non-finite (and [`CullView::new`] refuses it).
fn frustum_planes(view_proj: Mat4) -> [[f32; 4]; 6] {
    [
        view_proj.row(3) + view_proj.row(0),
        view_proj.row(3) - view_proj.row(0),
        view_proj.row(3) + view_proj.row(1),
        view_proj.row(3) - view_proj.row(1),
        view_proj.row(2),
        view_proj.row(3) - view_proj.row(2),
    ]
    .map(|p: Vec4| {
        let len = p.truncate().length();
        if len == 0.0 && p.w > 0.0 {
            [0.0, 0.0, 0.0, 1.0]
        } else {
            (p / len).to_array()
        }
    })
}

/// The CPU reference of `classify` in `shaders/common/cull.wgsl`: the same operations in the
/// same order, with the same fused multiply-adds. 0 full, 1 medium, 2 billboard, 3 culled,
/// 4 invalid.
pub fn classify_cpu(inst: &Instance, view: &CullView) -> u32 {
    let p = inst.position;
    let finite = |x: f32| (x.to_bits() & 0x7fff_ffff) < 0x7f80_0000;
    if !(finite(p[0]) && finite(p[1]) && finite(p[2]) && finite(inst.scale)) {
        return LOD_INVALID;
    }
    let r = view.camera[3] * inst.scale;
    if !inside_cpu(&view.planes, p, r) {
        return Lod::Culled as u32;
    }
    band_cpu(p, view)
}

/// Whether a sphere at `p` of radius `r` is inside all six planes (as the shaders'
/// `plane_inside`, a NaN distance outside).
fn inside_cpu(planes: &[[f32; 4]; 6], p: [f32; 3], r: f32) -> bool {
    planes.iter().all(|pl| {
        let d = pl[0].mul_add(p[0], pl[1].mul_add(p[1], pl[2].mul_add(p[2], pl[3])));
        d.partial_cmp(&-r)
            .is_some_and(|o| o != std::cmp::Ordering::Less)
    })
}

/// The distance band of a finite position (`band` in `shaders/common/cull.wgsl`).
fn band_cpu(p: [f32; 3], view: &CullView) -> u32 {
    let dx = p[0] - view.camera[0];
    let dy = p[1] - view.camera[1];
    let dz = p[2] - view.camera[2];
    let d2 = dx.mul_add(dx, dy.mul_add(dy, dz * dz));
    if d2 < view.bands_sq[0] {
        0
    } else if d2 < view.bands_sq[1] {
        1
    } else if d2 < view.bands_sq[2] {
        2
    } else {
        Lod::Culled as u32
    }
}

/// Pyramid texels per axis the occlusion test reads at most: it tests a box's screen
/// rectangle at the finest pyramid level at which the rectangle spans at most this many (up to
/// 8 × 8 reads; a [`DepthPyramid`] ends at 1 × 1, so such a
/// level always exists).
pub const OCCLUSION_TEXELS: u32 = 8;
const _: () = assert!(shaders::layout::OCCLUSION_TEXELS == OCCLUSION_TEXELS as usize);

/// The CPU reference of `occluded` in `shaders/common/cull.wgsl` (the second occlusion phase's
/// test), with the same operations in the same order: whether an instance at `position` of
/// scale `scale` (its box: `bounds` scaled) is certainly hidden behind the depth seen through
/// `view_proj` (Vulkan clip space, depth 0 near .. 1 far), given the depth image's size and the
/// pyramid's levels as (width, height, texels row-major), the layout
/// [`pyramid_cpu`](crate::gpu::pyramid::pyramid_cpu) makes: its nearest depth is beyond every
/// texel covering its screen rectangle at the finest level where that is at most
/// [`OCCLUSION_TEXELS`] per axis. Not hidden when the box reaches the camera plane.
pub fn occluded_cpu(
    position: Vec3,
    scale: f32,
    bounds: &InstanceBounds,
    view_proj: &Mat4,
    depth_size: [u32; 2],
    pyramid: &[(u32, u32, Vec<f32>)],
) -> bool {
    // A depth image of no pixels hides nothing (the GPU's pyramids are never that small).
    if !view_proj.is_finite() || depth_size.contains(&0) {
        return false;
    }
    let m = view_proj.to_cols_array_2d();
    let fma4 = |a: [f32; 4], s: f32, b: [f32; 4]| -> [f32; 4] {
        std::array::from_fn(|i| a[i].mul_add(s, b[i]))
    };
    let c = fma4(
        m[0],
        position.x,
        fma4(m[1], position.y, fma4(m[2], position.z, m[3])),
    );
    let r = bounds.radius * scale;
    let (y0, y1) = (bounds.y_min * scale, bounds.y_max * scale);
    let mut lo = [3.0e38f32; 3];
    let mut hi = [-3.0e38f32; 2];
    for k in 0..8u32 {
        let side = |bit: u32, lo: f32, hi: f32| if k & bit != 0 { hi } else { lo };
        let q = fma4(
            m[0],
            side(1, -r, r),
            fma4(m[1], side(2, y0, y1), fma4(m[2], side(4, -r, r), c)),
        );
        if q[3].is_nan() || q[3] <= 0.0 {
            return false;
        }
        for i in 0..3 {
            let n = q[i] / q[3];
            lo[i] = lo[i].min(n);
            if i < 2 {
                hi[i] = hi[i].max(n);
            }
        }
    }
    let pixel = |v: f32, axis: usize| -> u32 {
        let size = depth_size[axis] as f32;
        (v.mul_add(0.5, 0.5) * size).floor().clamp(0.0, size - 1.0) as u32
    };
    let (a, b) = (
        [pixel(lo[0], 0), pixel(lo[1], 1)],
        [pixel(hi[0], 0), pixel(hi[1], 1)],
    );
    // An empty rectangle (NaN corners) hides nothing.
    if a[0] > b[0] || a[1] > b[1] {
        return false;
    }
    let levels = pyramid.len() as u32;
    let mut level = 0u32;
    while level + 1 < levels {
        let s = level + 1;
        // Wrapping, as the shader's u32 arithmetic.
        if (b[0] >> s).wrapping_sub(a[0] >> s) < OCCLUSION_TEXELS
            && (b[1] >> s).wrapping_sub(a[1] >> s) < OCCLUSION_TEXELS
        {
            break;
        }
        level = s;
    }
    let Some((w, h, texels)) = pyramid.get(level as usize) else {
        return false;
    };
    let at = |x: u32, y: u32| -> f32 {
        if x >= *w || y >= *h {
            return f32::INFINITY;
        }
        // A level shorter than its size says hides nothing there (never a panic).
        texels
            .get((u64::from(y) * u64::from(*w) + u64::from(x)) as usize)
            .copied()
            .unwrap_or(f32::INFINITY)
    };
    let (t0, t1) = (
        [a[0] >> (level + 1), a[1] >> (level + 1)],
        [b[0] >> (level + 1), b[1] >> (level + 1)],
    );
    // Hidden only if the nearest depth is beyond every texel (a NaN hides nothing).
    (t0[1]..=t1[1]).all(|y| (t0[0]..=t1[0]).all(|x| lo[2] > at(x, y)))
}

/// The CPU reference of `phase_lod` in `shaders/common/cull.wgsl`: what an occlusion phase
/// (`second` false: the first) makes of an instance classified `lod` ([`classify_cpu`]) whose
/// visibility bit was `was`, and which is `hidden` ([`occluded_cpu`], second phase only):
/// (level it is appended to, 3 for none, or [`LOD_INVALID`] to count it (second phase); its
/// new visibility bit). The first phase reads only instances whose bit is set.
pub fn phase_lod_cpu(second: bool, lod: u32, was: bool, hidden: bool) -> (u32, bool) {
    let culled = Lod::Culled as u32;
    if !second {
        return (if was && lod < culled { lod } else { culled }, was);
    }
    if lod == LOD_INVALID {
        return (LOD_INVALID, false);
    }
    let seen = lod < culled && !hidden;
    (if seen && !was { lod } else { culled }, seen)
}

/// What the CPU reference expects of one pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CullExpectation {
    /// Indices (base + local) per drawn LOD, sorted.
    pub lists: [Vec<u32>; 3],
    /// Invalid instances.
    pub invalid: u32,
}

/// Runs the reference over sources given as (instances, base).
pub fn cull_cpu(sources: &[(&[Instance], u32)], view: &CullView) -> CullExpectation {
    let mut e = CullExpectation::default();
    for (instances, base) in sources {
        for (i, inst) in instances.iter().enumerate() {
            match classify_cpu(inst, view) {
                // Wrapping, as the shader's u32 index (`base` + instance).
                l @ 0..=2 => e.lists[l as usize].push(base.wrapping_add(i as u32)),
                LOD_INVALID => e.invalid += 1,
                _ => {}
            }
        }
    }
    for l in &mut e.lists {
        l.sort_unstable();
    }
    e
}

/// The CPU reference of a pass of several views: the camera's expectation ([`cull_cpu`]), then
/// each cascade's: every valid instance inside the cascade's planes (the cull radius's sphere),
/// in the list of the band the camera's distance gives it, up to the cascade's
/// [`CascadeView::max_lod`] ([`CullPass::set_cascades`]).
pub fn cull_views_cpu(
    sources: &[(&[Instance], u32)],
    view: &CullView,
    cascades: &[CascadeView],
) -> Vec<CullExpectation> {
    let mut out = vec![cull_cpu(sources, view)];
    for c in cascades {
        let mut e = CullExpectation::default();
        for (instances, base) in sources {
            for (i, inst) in instances.iter().enumerate() {
                if classify_cpu(inst, view) == LOD_INVALID {
                    continue;
                }
                let b = band_cpu(inst.position, view);
                let max = (c.max_lod as u32).min(Lod::Billboard as u32);
                if b <= max && inside_cpu(&c.planes, inst.position, view.camera[3] * inst.scale) {
                    e.lists[b as usize].push(base.wrapping_add(i as u32));
                }
            }
        }
        for l in &mut e.lists {
            l.sort_unstable();
        }
        out.push(e);
    }
    out
}

/// One buffer of instances to cull.
#[derive(Clone, Copy, Debug)]
pub struct CullSource<'a> {
    /// Instances, tightly packed from offset 0.
    pub buffer: &'a Buffer,
    /// How many.
    pub count: u32,
    /// Index of its first instance in the lists.
    pub base: u32,
}

/// `VkDrawIndexedIndirectCommand`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DrawIndexedIndirect {
    /// Indices per instance (the LOD's mesh).
    pub index_count: u32,
    /// Visible instances (clamped to the list's capacity).
    pub instance_count: u32,
    /// First index of the LOD's mesh.
    pub first_index: u32,
    /// Vertex offset of the LOD's mesh.
    pub vertex_offset: i32,
    /// Always 0, so `drawIndirectFirstInstance` is not needed: the draw pass pushes each LOD's
    /// list base ([`CullPass::list_bases`]) as a constant.
    pub first_instance: u32,
}

/// Instance sources one cull dispatch reads (`CULL_BATCH` in `shaders/common/cull.wgsl`) on
/// devices with at least 28 storage-buffer bindings per stage: the binding array at binding 0
/// has this many entries. Devices with fewer (the guaranteed minimum is 4), or without
/// `shaderStorageBufferArrayDynamicIndexing`, get a variant that reads one source per
/// dispatch ([`CullPass::sources_per_dispatch`]).
pub const SOURCES_PER_DISPATCH: usize = 24;

/// Instance sources one cull dispatch reads where the device allows that many storage-buffer
/// bindings per stage and per set (plus 5; NVIDIA allows about a million): one dispatch for
/// four thousand patch buffers (`CULL_WIDE` in `shaders/common/cull.wgsl`). On an H200, 16M
/// instances in 16,384 buffers cull in 1.25× one buffer (4 dispatches) against 1.32–1.34× with
/// 1,024 a dispatch (16). An earlier 4,096 left heapUsage 64 KiB above a soak's start; the soak
/// now reads its baseline after a cull pass was made and dropped (the driver's memory for the
/// pipelines), and ends at it with 4,096 too.
pub const WIDE_SOURCES_PER_DISPATCH: usize = 4096;

/// Storage buffers of the cull stage besides the sources: lists, counters, records, the
/// source table, the visibility bits.
const OTHER_STORAGE_BUFFERS: u32 = 5;
/// Uniform buffers of the cull stage (the view, the occlusion view, the cascades) and sampled
/// images (the depth pyramid).
const UNIFORM_BUFFERS: u32 = 3;
const SAMPLED_IMAGES: u32 = 1;

/// One entry of the per-dispatch source table (`CullSourceEntry` in
/// `shaders/common/cull.wgsl`): instances, list base, first workgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct SourceEntry {
    count: u32,
    base: u32,
    first_group: u32,
    pad: u32,
}
const _: () = assert!(size_of::<SourceEntry>() == shaders::layout::CULLSOURCEENTRY_SIZE);
// The shaders' arrays are the layouts' (VUID-VkComputePipelineCreateInfo-layout-07991).
const _: () = assert!(shaders::layout::CULL_WIDE == WIDE_SOURCES_PER_DISPATCH);
const _: () = assert!(shaders::layout::CULL_BATCH == SOURCES_PER_DISPATCH);
// A dispatch's table is one vkCmdUpdateBuffer (VUID-vkCmdUpdateBuffer-dataSize-00037).
const _: () = assert!(WIDE_SOURCES_PER_DISPATCH * size_of::<SourceEntry>() <= 65536);

/// Dispatches whose source tables the table buffer holds at once when the pass is made: 4, at
/// most 64 KiB (one table with the wide array). A frame with more batches grows it (to the next
/// power of two, at most [`max_table_batches`]); more batches than it holds, or a growth the
/// budget refuses, are recorded in rounds, the table rewritten between them behind barriers
/// (16M instances in 16,384 buffers cost 1.65x one buffer on an H200 in 4 rounds of 4 × 1,024
/// sources, 1.33x in one).
fn table_batches(batch: usize) -> usize {
    tables_within(64 << 10, 4, batch)
}

/// The most dispatches' tables the table buffer grows to hold: at most 1 MiB, at most 64
/// (65,536 instance buffers in one round with the wide array).
fn max_table_batches(batch: usize) -> usize {
    tables_within(1 << 20, 64, batch)
}

/// Tables of `batch` sources that fit `bytes`, at least 1 and at most `most`.
fn tables_within(bytes: u64, most: usize, batch: usize) -> usize {
    ((bytes / table_stride(batch)) as usize).clamp(1, most)
}

/// The table buffer: `tables` dispatches' tables of `batch` sources (device-local, written by
/// `vkCmdUpdateBuffer`, counted with the pass's outputs).
fn table_buffer(shared: &Arc<Shared>, batch: usize, tables: usize) -> Result<Buffer> {
    shared.create_buffer(&BufferDesc {
        name: "cull source tables",
        size: tables as u64 * table_stride(batch),
        usage: vk::BufferUsageFlags::STORAGE_BUFFER
            | vk::BufferUsageFlags::TRANSFER_DST
            | vk::BufferUsageFlags::TRANSFER_SRC,
        location: MemoryLocation::GpuOnly,
        category: Category::Outputs,
    })
}

/// Bytes between two dispatches' tables in the table buffer: a batch of entries rounded up to
/// 256 (the largest `minStorageBufferOffsetAlignment` the spec allows).
const fn table_stride(batch: usize) -> u64 {
    ((batch * size_of::<SourceEntry>()) as u64).div_ceil(256) * 256
}

/// The cull dispatches' push constants (`CullPush` in `shaders/common/cull.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct CullPush {
    /// Capacity of each LOD's list; w: non-zero to write records.
    caps: [u32; 4],
    sources: u32,
    row_groups: u32,
    phase: u32,
    views: u32,
}

/// The finalize dispatch's push constants (`FinalizePush` in `shaders/cull_finalize.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct FinalizePush {
    caps: [u32; 4],
    phase: u32,
    views: u32,
    pad: [u32; 2],
}

/// What a dispatch does (`PHASE_*` in `shaders/common/cull.wgsl`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Single = 0,
    First = 1,
    Second = 2,
}

/// The second phase's camera (`OcclusionView` in `shaders/common/cull.wgsl`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Occlusion {
    view_proj: [[f32; 4]; 4],
    /// Depth width, height, pyramid levels, unused.
    size: [u32; 4],
    /// [`InstanceBounds`]: radius about the vertical axis, lowest and highest y, unused.
    bounds: [f32; 4],
}

/// Where an instance of scale 1 lies around its position, for the occlusion test: within
/// `radius` of its vertical axis (whatever its yaw) and between `y_min` and `y_max` above its
/// position. A box this tight hides more than the cull radius's sphere; it must still hold
/// every vertex of every LOD, or a partly visible instance may be dropped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InstanceBounds {
    /// Farthest distance of a vertex from the vertical axis through the position.
    pub radius: f32,
    /// Lowest vertex height above the position.
    pub y_min: f32,
    /// Highest vertex height above the position.
    pub y_max: f32,
}

impl InstanceBounds {
    /// The box around a sphere of `radius` centred on the position (what the frustum test uses).
    pub fn sphere(radius: f32) -> Self {
        Self {
            radius,
            y_min: -radius,
            y_max: radius,
        }
    }

    fn check(&self) -> Result<()> {
        let finite = self.radius.is_finite() && self.y_min.is_finite() && self.y_max.is_finite();
        if !(finite && self.radius >= 0.0 && self.y_min <= self.y_max) {
            return Err(Error::InvalidInput(format!("instance bounds {self:?}")));
        }
        Ok(())
    }
}
const _: () = assert!(size_of::<Occlusion>() == shaders::layout::OCCLUSIONVIEW_SIZE);

/// A frame's dispatches: each batch's source bindings (padded to the array's length) and
/// table, and the end of the highest source (the visibility bits it needs).
#[derive(Default)]
struct Batches {
    buffers: Vec<Vec<vk::DescriptorBufferInfo>>,
    tables: Vec<(Vec<SourceEntry>, u32)>,
    end: u64,
}

/// A single-level colour range of an image.
fn color_range(levels: u32) -> vk::ImageSubresourceRange {
    vk::ImageSubresourceRange {
        aspect_mask: vk::ImageAspectFlags::COLOR,
        base_mip_level: 0,
        level_count: levels,
        base_array_layer: 0,
        layer_count: 1,
    }
}

const PUSH_BYTES: u32 = size_of::<CullPush>() as u32;
const _: () = assert!(PUSH_BYTES as usize == shaders::layout::CULLPUSH_SIZE);
const _: () = assert!(PUSH_BYTES <= 128, "the guaranteed push-constant space");

/// Counter words per view: appended per list (0..3), invalid (3), overflow per list (4..7), the
/// entries of each list the first occlusion phase kept (8..11; where the second phase's
/// start), and per LOD the instances in the frustum and the LOD's band that the second phase
/// found hidden and that were not visible last frame, so neither phase appended them
/// (12..15; the camera's only). Appended + hidden is what a single pass without occlusion
/// appends. Words 7, 11 and 15 are unused.
pub const COUNTERS: usize = 16;
/// Index of the first phase's kept entries of LOD 0 in the counters.
pub const COUNTER_FIRST: usize = 8;
/// Index of LOD 0's hidden instances in the counters: in the frustum and band, hidden by the
/// second occlusion phase's test, not visible last frame (instances the first phase drew are
/// in the appended counts even when hidden now).
pub const COUNTER_HIDDEN: usize = 12;
const _: () = assert!(shaders::layout::COUNTERS == COUNTERS);

/// Views one pass culls: the camera (view 0) and up to four shadow cascades
/// ([`CullDesc::views`], [`CullPass::set_cascades`]).
pub const MAX_VIEWS: u32 = 5;
const _: () = assert!(shaders::layout::MAX_VIEWS == MAX_VIEWS as usize);

/// A shadow cascade's clip volume: an orthographic view-projection's six planes (normals
/// inside), as [`CullView::planes`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CascadeView {
    /// Planes, normals pointing inside: inside when `dot(n, p) + w >= -radius`.
    pub planes: [[f32; 4]; 6],
    /// The coarsest level the cascade takes: instances the camera's bands put farther
    /// (coarser) are not appended to its lists. `Lod::Billboard` (the default of
    /// [`CascadeView::new`]) takes every drawn level; `Lod::Medium` leaves out billboards
    /// (the far trees, many and a few texels each in a far cascade).
    pub max_lod: Lod,
}

impl CascadeView {
    /// From a cascade's view-projection matrix (Vulkan clip space, depth 0..1): the volume it
    /// renders. Pull its near plane back toward the light to catch casters outside the view.
    pub fn new(view_proj: Mat4) -> Result<Self> {
        let planes = frustum_planes(view_proj);
        if !planes.iter().flatten().all(|v| v.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "cascade view-projection {view_proj} has degenerate planes"
            )));
        }
        Ok(Self {
            planes,
            max_lod: Lod::Billboard,
        })
    }

    /// This cascade taking levels up to `max_lod` ([`CascadeView::max_lod`]).
    pub fn with_max_lod(self, max_lod: Lod) -> Self {
        Self { max_lod, ..self }
    }
}

/// A plane nothing is inside: what views without a cascade get, so their lists stay empty.
const EMPTY_PLANE: [f32; 4] = [0.0, 0.0, 0.0, -f32::MAX];

/// The cascades' planes as the shaders read them (`CascadeViews`).
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
struct CascadePlanes {
    planes: [[f32; 4]; 6 * (MAX_VIEWS as usize - 1)],
    /// Per cascade, the coarsest band it takes (`CascadeViews.max_band`).
    max_band: [u32; MAX_VIEWS as usize - 1],
}
const _: () = assert!(size_of::<CascadePlanes>() == shaders::layout::CASCADEVIEWS_SIZE);

/// Fewest entries an adaptive list keeps.
const MIN_LIST: u32 = 256;
/// Entries each adaptive list starts with, before the first counts are read back (a frame or
/// two; what overflows until then is counted, and the lists grow at once to the demand).
const INITIAL_LIST: u32 = 4096;

/// Everything a [`CullPass`] is built from.
#[derive(Clone, Copy, Debug)]
pub struct CullDesc {
    /// How visible instances are appended.
    pub compaction: Compaction,
    /// Most entries per LOD list. With `adaptive`, each list starts smaller and follows what
    /// was in the views lately (the GPU's counts, read back a frame or two later; with
    /// occlusion, the hidden instances count too, so a vista opening at once fits): the lists
    /// and records then cost what the budget lets be visible, not what exists.
    pub capacity: u32,
    /// Size the lists from what the views held lately (`true`, the default of
    /// [`CullPass::new`]; see `capacity`), or keep `capacity` entries per list.
    pub adaptive: bool,
    /// Each LOD's index count, first index and vertex offset.
    pub meshes: [DrawIndexedIndirect; 3],
    /// Also copy each visible instance's record to [`CullPass::records`].
    pub records: bool,
    /// At most this many instance buffers per dispatch: the widest of
    /// [`WIDE_SOURCES_PER_DISPATCH`] (the default of [`CullPass::new`]),
    /// [`SOURCES_PER_DISPATCH`] and 1 (one plain binding, no descriptor array) that is at most
    /// this and that the device allows.
    pub max_sources_per_dispatch: usize,
    /// Views culled in one read of each instance: 1 (the camera; the default of
    /// [`CullPass::new`]) to [`MAX_VIEWS`] (the camera and shadow cascades,
    /// [`CullPass::set_cascades`]). Each view has lists (and records) of the same capacities.
    pub views: u32,
}

/// The pass and its output buffers. Dropping it retires everything at the last frame that
/// recorded it.
pub struct CullPass {
    shared: Arc<Shared>,
    last_use: AtomicU64,
    batch: usize,
    compaction: Compaction,
    capacity: u32,
    /// What the arguments are written with (and were, by the last record).
    meshes: [DrawIndexedIndirect; 3],
    /// [`CullPass::set_meshes`], taken by the next record that writes the arguments.
    next_meshes: Option<[DrawIndexedIndirect; 3]>,
    set_layout: vk::DescriptorSetLayout,
    layout: vk::PipelineLayout,
    /// Occlusion phases and cascades compiled in (made at the first phase recorded).
    pipeline: vk::Pipeline,
    /// A single pass over one view (the `plain` variant).
    plain: vk::Pipeline,
    /// A single pass over the camera and cascades (the `views` variant; made at its first use).
    views_pipeline: vk::Pipeline,
    fin_set_layout: vk::DescriptorSetLayout,
    fin_layout: vk::PipelineLayout,
    fin_pipeline: vk::Pipeline,
    /// Entries of each LOD's list now.
    caps: [u32; 3],
    /// With adaptive sizing: follows the read-back counts.
    sizer: Option<ListSizer>,
    /// Host copies of the counters: (buffer, frame that wrote it, consumed).
    readbacks: Vec<(Buffer, u64, bool)>,
    /// Times the lists were resized, and times a resize was refused by the budget.
    resizes: u64,
    refused_resizes: u64,
    /// The lists, records and capacities in effect before this record's resizes, until the
    /// record can no longer fail (then they retire): a record that fails after resizing puts
    /// them back, so the draws of a frame whose cull failed read the lists, records and
    /// capacities that the last recorded cull's arguments were written against.
    before_resize: Option<Lists>,
    /// Resizes of the record under way (counted in `resizes` once it can no longer fail).
    pending_resizes: u64,
    sets: Mutex<DescriptorArena>,
    fin_sets: Mutex<DescriptorArena>,
    lists: Option<Buffer>,
    counters: Option<Buffer>,
    args: Option<Buffer>,
    view: Option<Buffer>,
    records: Option<Buffer>,
    with_records: bool,
    /// The dispatches' source tables ([`table_stride`] bytes each, `table_batches` of them).
    table: Option<Buffer>,
    /// Tables `table` holds: [`table_batches`] up to [`max_table_batches`].
    table_batches: usize,
    /// Growths of `table` the budget (or the driver) refused: those frames record in rounds.
    refused_table_growths: u64,
    /// The second phase's camera (`OcclusionView`).
    occlusion: Option<Buffer>,
    /// One bit per index (`base` + instance): visible in the last second phase.
    visible: Option<Buffer>,
    /// The visibility bits are new: the next first phase clears them.
    clear_visible: bool,
    /// Bound where no pyramid is (a single pass, the first phase); never read.
    placeholder: Option<Image>,
    placeholder_view: vk::ImageView,
    /// This frame's first phase: its frame and dispatches, for the second.
    first: Option<(FrameTag, Batches)>,
    /// The frame that recorded the visibility bits' clear (cleared again if it was dropped).
    cleared_in: Option<FrameTag>,
    /// Views culled (1..=MAX_VIEWS) and the cascades' planes (views 1..).
    views: u32,
    cascades: CascadePlanes,
    cascade_buf: Option<Buffer>,
}

/// The cull shaders' variants (build.rs): one view in one pass, several views in one pass, and
/// with the occlusion phases (and cascades) compiled in.
#[derive(Clone, Copy)]
enum Variant {
    Plain,
    Views,
    Full,
}

/// The SPIR-V of `variant` for this compaction and source-array width.
fn cull_spirv(compaction: Compaction, batch: usize, variant: Variant) -> &'static [u8] {
    use shaders::*;
    // (one source, WIDE_SOURCES_PER_DISPATCH, SOURCES_PER_DISPATCH)
    let [single, wide, batched] = match (compaction, variant) {
        (Compaction::Atomic, Variant::Plain) => [
            CULL_ATOMIC_SINGLE_PLAIN,
            CULL_ATOMIC_WIDE_PLAIN,
            CULL_ATOMIC_PLAIN,
        ],
        (Compaction::Subgroup, Variant::Plain) => [
            CULL_SUBGROUP_SINGLE_PLAIN,
            CULL_SUBGROUP_WIDE_PLAIN,
            CULL_SUBGROUP_PLAIN,
        ],
        (Compaction::Atomic, Variant::Views) => [
            CULL_ATOMIC_SINGLE_VIEWS,
            CULL_ATOMIC_WIDE_VIEWS,
            CULL_ATOMIC_VIEWS,
        ],
        (Compaction::Subgroup, Variant::Views) => [
            CULL_SUBGROUP_SINGLE_VIEWS,
            CULL_SUBGROUP_WIDE_VIEWS,
            CULL_SUBGROUP_VIEWS,
        ],
        (Compaction::Atomic, Variant::Full) => [CULL_ATOMIC_SINGLE, CULL_ATOMIC_WIDE, CULL_ATOMIC],
        (Compaction::Subgroup, Variant::Full) => {
            [CULL_SUBGROUP_SINGLE, CULL_SUBGROUP_WIDE, CULL_SUBGROUP]
        }
    };
    match batch {
        1 => single,
        WIDE_SOURCES_PER_DISPATCH => wide,
        _ => batched,
    }
}

/// A pass's lists, records and their capacities, as one resize replaces them.
struct Lists {
    lists: Option<Buffer>,
    records: Option<Buffer>,
    caps: [u32; 3],
}

impl CullPass {
    /// Builds the pass with lists of at most `capacity` entries per LOD, sized from what is
    /// visible ([`CullDesc::adaptive`]). `meshes` gives each LOD's index count, first index and
    /// vertex offset (instance fields are filled by the pass).
    /// Needs a compute queue; the subgroup variant needs subgroup vote, ballot, arithmetic and
    /// shuffle in compute shaders.
    pub fn new(
        ctx: &Context,
        compaction: Compaction,
        capacity: u32,
        meshes: [DrawIndexedIndirect; 3],
    ) -> Result<Self> {
        Self::build_pass(
            ctx,
            &CullDesc {
                compaction,
                capacity,
                meshes,
                records: false,
                adaptive: true,
                max_sources_per_dispatch: WIDE_SOURCES_PER_DISPATCH,
                views: 1,
            },
        )
    }

    /// As [`CullPass::new`], and the pass also copies every visible instance's record to
    /// [`CullPass::records`] at its list slot, so a vertex stage reads `records[slot]`
    /// directly whatever buffer the instance lives in (what [`crate::gpu::draw::DrawPass`]
    /// draws from). Costs 36 bytes per list entry (category `Outputs`, in the vegetation
    /// budget) and 32 bytes written per visible instance.
    pub fn with_records(
        ctx: &Context,
        compaction: Compaction,
        capacity: u32,
        meshes: [DrawIndexedIndirect; 3],
    ) -> Result<Self> {
        Self::build_pass(
            ctx,
            &CullDesc {
                compaction,
                capacity,
                meshes,
                records: true,
                adaptive: true,
                max_sources_per_dispatch: WIDE_SOURCES_PER_DISPATCH,
                views: 1,
            },
        )
    }

    /// Builds the pass from a full description.
    pub fn from_desc(ctx: &Context, desc: &CullDesc) -> Result<Self> {
        Self::build_pass(ctx, desc)
    }

    /// The largest capacity whose lists and records fit one storage binding
    /// (`maxStorageBufferRange`) on this context's device, for one view.
    pub fn max_capacity(ctx: &Context, with_records: bool) -> u32 {
        Self::max_capacity_of(ctx, with_records, 1)
    }

    /// As [`CullPass::max_capacity`], for a pass of `views` views (each has its lists).
    pub fn max_capacity_of(ctx: &Context, with_records: bool, views: u32) -> u32 {
        let range = u64::from(ctx.adapter().limits.max_storage_buffer_range);
        let views = u64::from(views.max(1));
        let per_slot = if with_records {
            3 * views * size_of::<Instance>() as u64
        } else {
            3 * views * 4
        };
        let by_lists = range / 4 / 3 / views;
        let by_records = range / per_slot;
        (by_lists.min(by_records).saturating_sub(LIST_GUARD_WORDS)).min(u64::from(u32::MAX / 6))
            as u32
    }

    fn build_pass(ctx: &Context, desc: &CullDesc) -> Result<Self> {
        let CullDesc {
            compaction,
            capacity,
            meshes,
            records: with_records,
            adaptive,
            max_sources_per_dispatch,
            views,
        } = *desc;
        if !(1..=MAX_VIEWS).contains(&views) {
            return Err(Error::InvalidInput(format!(
                "{views} views: a pass culls 1..={MAX_VIEWS}"
            )));
        }
        if max_sources_per_dispatch == 0 {
            return Err(Error::InvalidInput(
                "max_sources_per_dispatch 0 (at least 1)".into(),
            ));
        }
        let shared = ctx.shared();
        shared.require(
            "the cull pass",
            &DeviceFeatures::default(),
            vk::QueueFlags::COMPUTE,
        )?;
        let max = Self::max_capacity_of(ctx, with_records, views);
        if capacity == 0 || capacity > max {
            return Err(Error::InvalidInput(format!(
                "cull list capacity {capacity}: 1..={max} on this device with {views} view(s) (lists{} of 3 × capacity per view fit maxStorageBufferRange, {} bytes)",
                if with_records { " and records" } else { "" },
                ctx.adapter().limits.max_storage_buffer_range
            )));
        }
        if compaction == Compaction::Subgroup
            && !ctx.adapter().subgroup_ballot_arithmetic_in_compute
        {
            return Err(Error::Unsupported(
                "subgroup compaction needs subgroup vote, ballot, arithmetic and shuffle in compute shaders"
                    .into(),
            ));
        }
        let limits = ctx.adapter().limits;
        // A binding array of `n` sources: n + 5 storage buffers in the stage and the set, and
        // the uniform buffers and the sampled image besides (VUID-VkPipelineLayoutCreateInfo-descriptorType-03022,
        // -03036, -03016).
        let fits = |n: usize| {
            let storage = n as u32 + OTHER_STORAGE_BUFFERS;
            max_sources_per_dispatch >= n
                && ctx.features().storage_buffer_array_dynamic_indexing
                && limits.max_per_stage_storage_buffers >= storage
                && limits.max_descriptor_set_storage_buffers >= storage
                && limits.max_per_stage_resources >= storage + UNIFORM_BUFFERS + SAMPLED_IMAGES
        };
        let batch = [WIDE_SOURCES_PER_DISPATCH, SOURCES_PER_DISPATCH]
            .into_iter()
            .find(|n| fits(*n) && set_layout_supported(ctx.device(), &Self::bindings(*n)))
            .unwrap_or(1);
        let mut this = Self {
            shared: shared.clone(),
            last_use: AtomicU64::new(0),
            batch,
            compaction,
            capacity,
            meshes,
            next_meshes: None,
            caps: [0; 3],
            sizer: None,
            readbacks: Vec::new(),
            resizes: 0,
            refused_resizes: 0,
            before_resize: None,
            pending_resizes: 0,
            set_layout: vk::DescriptorSetLayout::null(),
            layout: vk::PipelineLayout::null(),
            pipeline: vk::Pipeline::null(),
            plain: vk::Pipeline::null(),
            views_pipeline: vk::Pipeline::null(),
            fin_set_layout: vk::DescriptorSetLayout::null(),
            fin_layout: vk::PipelineLayout::null(),
            fin_pipeline: vk::Pipeline::null(),
            sets: Mutex::new(DescriptorArena::new(
                &[
                    (
                        vk::DescriptorType::STORAGE_BUFFER,
                        batch as u32 + OTHER_STORAGE_BUFFERS,
                    ),
                    (vk::DescriptorType::UNIFORM_BUFFER, UNIFORM_BUFFERS),
                    (vk::DescriptorType::SAMPLED_IMAGE, SAMPLED_IMAGES),
                ],
                // 64 sets a pool, 16 of the 4,096-wide array.
                (65_536 / batch as u32).clamp(4, 64),
            )),
            fin_sets: Mutex::new(DescriptorArena::new(
                &[(vk::DescriptorType::STORAGE_BUFFER, 2)],
                8,
            )),
            lists: None,
            counters: None,
            args: None,
            view: None,
            records: None,
            with_records,
            table: None,
            table_batches: table_batches(batch),
            refused_table_growths: 0,
            occlusion: None,
            visible: None,
            clear_visible: false,
            placeholder: None,
            placeholder_view: vk::ImageView::null(),
            first: None,
            cleared_in: None,
            views,
            cascades: CascadePlanes {
                planes: [EMPTY_PLANE; 6 * (MAX_VIEWS as usize - 1)],
                max_band: [0; MAX_VIEWS as usize - 1],
            },
            cascade_buf: None,
        };
        let initial = if adaptive {
            let sizer = ListSizer::new(ListSizing::new(MIN_LIST, capacity), INITIAL_LIST);
            let caps = sizer.caps();
            this.sizer = Some(sizer);
            caps
        } else {
            [capacity; 3]
        };
        // On error, Drop retires whatever was built (nothing was recorded with it).
        this.build(ctx)?;
        this.resize(initial)?;
        this.before_resize = None;
        Ok(this)
    }

    /// The cull set's bindings with `batch` sources: sources, lists, counters, view, records,
    /// source table, depth pyramid, visibility bits, occlusion view, cascades.
    fn bindings(batch: usize) -> [(vk::DescriptorType, u32); 10] {
        use vk::DescriptorType as T;
        [
            (T::STORAGE_BUFFER, batch as u32),
            (T::STORAGE_BUFFER, 1),
            (T::STORAGE_BUFFER, 1),
            (T::UNIFORM_BUFFER, 1),
            (T::STORAGE_BUFFER, 1),
            (T::STORAGE_BUFFER, 1),
            (T::SAMPLED_IMAGE, 1),
            (T::STORAGE_BUFFER, 1),
            (T::UNIFORM_BUFFER, 1),
            (T::UNIFORM_BUFFER, 1),
        ]
    }

    fn build(&mut self, ctx: &Context) -> Result<()> {
        use vk::DescriptorType as T;
        let d = ctx.device();
        self.set_layout = set_layout_with_counts(d, &Self::bindings(self.batch))?;
        self.layout = pipeline_layout(d, self.set_layout, PUSH_BYTES)?;
        let spirv = cull_spirv(self.compaction, self.batch, Variant::Plain);
        self.plain = compute_pipeline(d, spirv, c"main", self.layout)?;
        self.fin_set_layout = set_layout(d, &[T::STORAGE_BUFFER, T::STORAGE_BUFFER])?;
        self.fin_layout =
            pipeline_layout(d, self.fin_set_layout, size_of::<FinalizePush>() as u32)?;
        self.fin_pipeline = compute_pipeline(d, shaders::CULL_FINALIZE, c"main", self.fin_layout)?;
        let buffer = |name, size, usage| {
            ctx.create_buffer(&BufferDesc {
                name,
                size,
                usage: usage
                    | vk::BufferUsageFlags::TRANSFER_DST
                    | vk::BufferUsageFlags::TRANSFER_SRC,
                location: MemoryLocation::GpuOnly,
                category: Category::Outputs,
            })
        };
        let views = u64::from(self.views);
        self.counters = Some(buffer(
            "cull counters",
            COUNTERS as u64 * 4 * views,
            vk::BufferUsageFlags::STORAGE_BUFFER,
        )?);
        self.args = Some(buffer(
            "cull indirect args",
            size_of::<[DrawIndexedIndirect; 6]>() as u64 * views,
            vk::BufferUsageFlags::STORAGE_BUFFER | vk::BufferUsageFlags::INDIRECT_BUFFER,
        )?);
        self.view = Some(buffer(
            "cull view",
            size_of::<CullView>() as u64,
            vk::BufferUsageFlags::UNIFORM_BUFFER,
        )?);
        self.table = Some(table_buffer(ctx.shared(), self.batch, self.table_batches)?);
        self.occlusion = Some(buffer(
            "cull occlusion view",
            size_of::<Occlusion>() as u64,
            vk::BufferUsageFlags::UNIFORM_BUFFER,
        )?);
        self.cascade_buf = Some(buffer(
            "cull cascades",
            size_of::<CascadePlanes>() as u64,
            vk::BufferUsageFlags::UNIFORM_BUFFER,
        )?);
        let placeholder = ctx.create_image(&ImageDesc {
            name: "cull pyramid placeholder",
            extent: vk::Extent2D {
                width: 1,
                height: 1,
            },
            format: vk::Format::R32_SFLOAT,
            mip_levels: 1,
            usage: vk::ImageUsageFlags::SAMPLED,
            category: Category::Outputs,
        })?;
        let info = vk::ImageViewCreateInfo::default()
            .image(placeholder.raw())
            .view_type(vk::ImageViewType::TYPE_2D)
            .format(vk::Format::R32_SFLOAT)
            .subresource_range(color_range(1));
        self.placeholder = Some(placeholder);
        // SAFETY: a live 2D single-layer R32_SFLOAT image with SAMPLED usage
        // (VUID-VkImageViewCreateInfo-image-04441; R32_SFLOAT sampling is a mandatory format
        // feature), the range its one level (VUID-VkImageViewCreateInfo-subresourceRange-01718).
        self.placeholder_view = unsafe { d.create_image_view(&info, None) }
            .map_err(crate::error::vk_err("vkCreateImageView"))?;
        Ok(())
    }

    /// The pipeline of `variant` (`Views` or `Full`; `Plain` is made with the pass), made at
    /// its first use (each pipeline made keeps driver memory: see the README's heap readings).
    fn lazy_pipeline(&mut self, variant: Variant) -> Result<vk::Pipeline> {
        let made = match variant {
            Variant::Views => self.views_pipeline,
            Variant::Plain | Variant::Full => self.pipeline,
        };
        if made != vk::Pipeline::null() {
            return Ok(made);
        }
        let spirv = cull_spirv(self.compaction, self.batch, variant);
        let p = compute_pipeline(&self.shared.device, spirv, c"main", self.layout)?;
        match variant {
            Variant::Views => self.views_pipeline = p,
            Variant::Plain | Variant::Full => self.pipeline = p,
        }
        Ok(p)
    }

    /// New lists (and records) for these capacities; the old ones retire at their last use,
    /// or, for the first resize of a record, once the record can no longer fail
    /// ([`CullPass::commit_resizes`]; [`CullPass::undo_resizes_on_error`] puts them back). On
    /// an error (the budget refuses them) nothing changes.
    fn resize(&mut self, caps: [u32; 3]) -> Result<()> {
        let entries = caps.iter().map(|c| u64::from(*c)).sum::<u64>() * u64::from(self.views);
        let buffer = |name, size| {
            self.shared.create_buffer(&BufferDesc {
                name,
                size,
                usage: vk::BufferUsageFlags::STORAGE_BUFFER
                    | vk::BufferUsageFlags::TRANSFER_DST
                    | vk::BufferUsageFlags::TRANSFER_SRC,
                location: MemoryLocation::GpuOnly,
                category: Category::Outputs,
            })
        };
        let lists = buffer("cull lists", (entries + LIST_GUARD_WORDS) * 4)?;
        let records = if self.with_records {
            Some(buffer(
                "cull records",
                entries * size_of::<Instance>() as u64,
            )?)
        } else {
            None
        };
        let old = Lists {
            lists: self.lists.replace(lists),
            records: std::mem::replace(&mut self.records, records),
            caps: std::mem::replace(&mut self.caps, caps),
        };
        // A later resize of the same record drops the lists of the one before it: never
        // bound (this record has recorded nothing yet), they retire at once.
        self.before_resize.get_or_insert(old);
        Ok(())
    }

    /// The record can no longer fail: its resizes stand, and the lists they replaced retire at
    /// their last use.
    fn commit_resizes(&mut self) {
        self.before_resize = None;
        self.resizes += std::mem::take(&mut self.pending_resizes);
    }

    /// `r`, after undoing the record's resizes if it failed: the lists, records and capacities
    /// before them come back (the new ones, bound by no command, retire), and the sizer
    /// measures against them again.
    fn undo_resizes_on_error<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.pending_resizes = 0;
            if let Some(old) = self.before_resize.take() {
                self.lists = old.lists;
                self.records = old.records;
                self.caps = old.caps;
                if let Some(sizer) = self.sizer.as_mut() {
                    sizer.kept(old.caps);
                }
            }
        }
        r
    }

    /// Reads the counters of frames the GPU has completed and lets the sizer resize the lists.
    fn follow_demand(&mut self) -> Result<()> {
        if self.sizer.is_none() {
            return Ok(());
        }
        let completed = self.shared.clock.completed()?;
        let mut demands = Vec::new();
        for (buf, frame, consumed) in &mut self.readbacks {
            if !*consumed && *frame <= completed {
                let words = COUNTERS * self.views as usize;
                let bytes = buf.mapped()?;
                let c: &[u32] = bytemuck::cast_slice(&bytes[..words * 4]);
                // Every view's lists have the same capacities: the largest demand sizes them.
                // With occlusion the demand is what the frustum holds (appended + hidden), not
                // what was drawn: a vista opening at once reveals the hidden ones, and lists
                // sized from the drawn ones overflowed then (29 of 3,000 frames at eye height
                // on the H200, against 1 without occlusion).
                let mut demand = [0u32; 3];
                for view in c.chunks(COUNTERS) {
                    for (l, d) in demand.iter_mut().enumerate() {
                        *d = (*d).max(view[l].saturating_add(view[COUNTER_HIDDEN + l]));
                    }
                }
                demands.push((*frame, demand));
                *consumed = true;
            }
        }
        demands.sort_unstable_by_key(|d| d.0);
        // Over the vegetation budget: the lists follow quality down within a few frames.
        let m = &self.shared.memory;
        let pressure = m.vegetation_reserved() > m.vegetation_limit();
        for (_, demand) in demands {
            let next = self
                .sizer
                .as_mut()
                .and_then(|s| s.observe(demand, pressure));
            if let Some(caps) = next {
                match self.resize(caps) {
                    Ok(()) => self.pending_resizes += 1,
                    Err(Error::OverBudget { .. } | Error::OutOfDeviceMemory { .. }) => {
                        // The budget (or the driver) has no room: keep the lists; overflow
                        // is counted, and the controller lowers quality. The sizer measures
                        // the next demand against the lists kept, so a resize still needed
                        // is asked for again once there is room.
                        self.refused_resizes += 1;
                        if let Some(sizer) = self.sizer.as_mut() {
                            sizer.kept(self.caps);
                        }
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// A host-visible buffer for this frame's counters: one whose frame was read, or a new one.
    fn readback_slot(&mut self) -> Result<usize> {
        if let Some(i) = self.readbacks.iter().position(|r| r.2) {
            return Ok(i);
        }
        let buf = self.shared.create_buffer(&BufferDesc {
            name: "cull counters readback",
            size: COUNTERS as u64 * 4 * u64::from(self.views),
            usage: vk::BufferUsageFlags::TRANSFER_DST,
            location: MemoryLocation::GpuToCpu,
            category: Category::Staging,
        })?;
        self.readbacks.push((buf, 0, true));
        Ok(self.readbacks.len() - 1)
    }

    /// Instance sources one dispatch reads on this device: at most the pass's
    /// [`CullDesc::max_sources_per_dispatch`] ([`WIDE_SOURCES_PER_DISPATCH`] for
    /// [`CullPass::new`]), then [`SOURCES_PER_DISPATCH`] where the device has too few
    /// storage-buffer bindings for the wide array, or 1 where its limits or features do not
    /// allow an array at all.
    pub fn sources_per_dispatch(&self) -> usize {
        self.batch
    }

    /// Most entries of any LOD list ([`CullDesc::capacity`]).
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Entries of each LOD's list now (with adaptive sizing they follow what the views held:
    /// appended, plus with occlusion the hidden instances).
    pub fn capacities(&self) -> [u32; 3] {
        self.caps
    }

    /// Where each LOD's list of the camera (view 0) starts in [`CullPass::lists`] and
    /// [`CullPass::records`].
    pub fn list_bases(&self) -> [u32; 3] {
        self.view_list_bases(0)
    }

    /// Where each LOD's list of view `view` starts (each view's three lists follow the
    /// previous view's; views past [`CullPass::views`] start past the lists).
    pub fn view_list_bases(&self, view: u32) -> [u32; 3] {
        let per_view: u32 = self.caps.iter().sum();
        let at = view.min(self.views).saturating_mul(per_view);
        [at, at + self.caps[0], at + self.caps[0] + self.caps[1]]
    }

    /// Draw `meshes` from the next [`CullPass::record`] (or [`CullPass::record_first`]) on:
    /// for a draw pass rebuilt with other mesh sets
    /// ([`DrawPass::lod_meshes`](crate::gpu::draw::DrawPass::lod_meshes)). Until that record,
    /// [`CullPass::meshes`] stays what the arguments were written with.
    pub fn set_meshes(&mut self, meshes: [DrawIndexedIndirect; 3]) {
        self.next_meshes = Some(meshes);
    }

    /// Each LOD's index count, first index and vertex offset ([`CullDesc::meshes`]): what the
    /// indirect commands draw. Draw passes refuse a cull pass whose meshes are not theirs.
    pub fn meshes(&self) -> [DrawIndexedIndirect; 3] {
        self.meshes
    }

    /// Views this pass culls ([`CullDesc::views`]).
    pub fn views(&self) -> u32 {
        self.views
    }

    /// The shadow cascades the next [`CullPass::record`] or [`CullPass::record_first`] culls
    /// as views 1..: at most `views() - 1` of them (fewer leave the remaining views' lists
    /// empty). An instance goes to cascade `c`'s list of the LOD the camera's distance bands
    /// give it (wherever the camera looks) when its sphere is inside the cascade's planes.
    /// [`Error::InvalidInput`] for more cascades than the pass has views for; nothing changes
    /// then.
    pub fn set_cascades(&mut self, cascades: &[CascadeView]) -> Result<()> {
        if cascades.len() >= self.views as usize {
            return Err(Error::InvalidInput(format!(
                "{} cascades for a pass of {} views (at most {})",
                cascades.len(),
                self.views,
                self.views - 1
            )));
        }
        if let Some(c) = cascades
            .iter()
            .find(|c| !c.planes.iter().flatten().all(|v| v.is_finite()))
        {
            return Err(Error::InvalidInput(format!(
                "cascade planes {:?} are not finite",
                c.planes
            )));
        }
        for (k, planes) in self.cascades.planes.chunks_mut(6).enumerate() {
            match cascades.get(k) {
                Some(c) => {
                    planes.copy_from_slice(&c.planes);
                    // Culled takes what Billboard takes: every drawn level.
                    self.cascades.max_band[k] = (c.max_lod as u32).min(Lod::Billboard as u32);
                }
                None => {
                    planes.fill(EMPTY_PLANE);
                    self.cascades.max_band[k] = 0;
                }
            }
        }
        Ok(())
    }

    /// Times the lists were resized (by records that were recorded: a record that fails keeps
    /// the lists it found), and times the budget (or the driver) refused a resize. A refused
    /// resize that is still needed is asked for again at the next frame's counts, and each
    /// refusal is counted.
    pub fn resizes(&self) -> (u64, u64) {
        (self.resizes, self.refused_resizes)
    }

    /// Dispatches whose source tables the pass holds at once (a frame with more records its
    /// dispatches in rounds, with barriers between them), and the recorded phases in which the
    /// budget (or the driver) refused to grow that room (each such phase asks again, and each
    /// refusal is also counted by the memory system). A phase that needs more grows it, up to
    /// 1 MiB of tables (64 tables; 16 with the 4,096-wide array).
    pub fn source_tables(&self) -> (usize, u64) {
        (self.table_batches, self.refused_table_growths)
    }

    /// The compaction variant.
    pub fn compaction(&self) -> Compaction {
        self.compaction
    }

    fn get(b: &Option<Buffer>) -> Result<&Buffer> {
        b.as_ref()
            .ok_or_else(|| Error::InvalidInput("cull pass was destroyed".into()))
    }

    fn get_image(b: &Option<Image>) -> Result<&Image> {
        b.as_ref()
            .ok_or_else(|| Error::InvalidInput("cull pass was destroyed".into()))
    }

    /// The lists: per view ([`CullPass::views`]), each LOD's [`CullPass::capacities`] u32 in
    /// turn (view `v`'s LOD `l` at `view_list_bases(v)[l]`), then, after every view's,
    /// [`LIST_GUARD_WORDS`]. Replaced when the lists are resized (the old one retires).
    pub fn lists(&self) -> Result<&Buffer> {
        Self::get(&self.lists)
    }

    /// The counters: [`COUNTERS`] u32 per view, view `v`'s from `COUNTERS * v`.
    pub fn counters(&self) -> Result<&Buffer> {
        Self::get(&self.counters)
    }

    /// The visible instances' records, [`Instance`]s laid out like the lists (passes built with
    /// [`CullPass::with_records`]; an error otherwise).
    pub fn records(&self) -> Result<&Buffer> {
        self.records
            .as_ref()
            .ok_or_else(|| Error::InvalidInput("cull pass built without records".into()))
    }

    /// Six `VkDrawIndexedIndirectCommand`s per view (view `v`'s from `6 * v`): one per drawn
    /// LOD (full, medium, billboard) for what [`CullPass::record`] or
    /// [`CullPass::record_first`] appended, then one per LOD for what
    /// [`CullPass::record_second`] appended after it (0 instances after a single pass, and
    /// always for cascades).
    pub fn args(&self) -> Result<&Buffer> {
        Self::get(&self.args)
    }

    /// Records the whole pass for `frame`: reset (fill + update), one dispatch per
    /// [`CullPass::sources_per_dispatch`] sources (each source starts at a fresh workgroup),
    /// finalize, and the barrier that makes lists and arguments visible to indirect draws,
    /// vertex, fragment and compute shaders and transfers. Zero sources or zero instances
    /// record a valid, empty pass. Marks the pass and every source used by `frame`.
    ///
    /// Every source must be of this context, hold `count` instances, have `STORAGE_BUFFER`
    /// usage and fit `maxStorageBufferRange` (its size is bound, [`Buffer::size`]):
    /// [`Error::InvalidInput`] (or [`Error::Lifecycle`] for another context's buffer)
    /// otherwise. A source or output buffer with a live
    /// [`Mapped`](crate::gpu::memory::Mapped) view is [`Error::Lifecycle`]. A pass of several
    /// views makes its shader's pipeline at its first record (as the phases do theirs): the
    /// driver's error then. Nothing is recorded on error.
    ///
    /// # Safety
    /// `cmd` must be a command buffer of this context's device, recording, outside a render
    /// pass, on a queue family with compute, and recorded for `frame` (submitted as its
    /// submission, or before it on the same queue). The sources' instance data must have been
    /// written by the host before the submission, or by commands recorded earlier in
    /// submission order: transfers or shader writes of the stages the queue has (the pass's
    /// first barrier makes those visible to its reads).
    pub unsafe fn record(
        &mut self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        sources: &[CullSource<'_>],
        view: &CullView,
    ) -> Result<()> {
        frame.check(&self.shared, "CullPass::record")?;
        self.first = None;
        let r = self.begin(frame, sources).and_then(|batches| {
            // SAFETY: the caller's promises are this function's.
            unsafe { self.record_phase(frame, cmd, Phase::Single, &batches, Some(view), None) }
        });
        self.undo_resizes_on_error(r)
    }

    /// The first phase of two-phase occlusion culling: as [`CullPass::record`], but appends
    /// only the instances that were visible in the last frame's second phase (their
    /// visibility bits), classified against `view`. Draw them
    /// ([`DrawPass::record_phase`](crate::gpu::draw::DrawPass::record_phase) with
    /// [`DrawPhase::First`](crate::gpu::draw::DrawPhase::First)), build a
    /// [`DepthPyramid`] from that depth, then record [`CullPass::record_second`] in the same
    /// frame.
    ///
    /// The visibility bits are indexed like the lists (`base` + instance): keep the sources'
    /// bases stable from frame to frame (as `Vegetation::cull_sources` does while the resident
    /// set does not change). Where they move, or in the first frame, the first phase draws
    /// the wrong instances or none, and the second draws whatever is visible and was not drawn:
    /// the picture is the same, only the split between the phases differs. The bits cost one
    /// bit per index up to the highest `base + count`, in a buffer of a power of two bytes (at
    /// most `maxStorageBufferRange`) that grows and does not shrink (category `Outputs`). When the budget refuses them this
    /// returns [`Error::OverBudget`], and when they would pass `maxStorageBufferRange`
    /// [`Error::InvalidInput`] (number the sources from 0); nothing is recorded then (cull with
    /// [`CullPass::record`] instead). A frame dropped after its first phase leaves nothing for
    /// a later frame's [`CullPass::record_second`].
    ///
    /// # Safety
    /// As [`CullPass::record`].
    pub unsafe fn record_first(
        &mut self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        sources: &[CullSource<'_>],
        view: &CullView,
    ) -> Result<()> {
        frame.check(&self.shared, "CullPass::record_first")?;
        self.first = None;
        let r = self.begin(frame, sources).and_then(|batches| {
            self.ensure_visibility(&batches)?;
            // SAFETY: the caller's promises are this function's.
            unsafe { self.record_phase(frame, cmd, Phase::First, &batches, Some(view), None)? };
            Ok(batches)
        });
        let batches = self.undo_resizes_on_error(r)?;
        self.first = Some((frame.tag(), batches));
        Ok(())
    }

    /// The second phase: culls the sources of this frame's [`CullPass::record_first`] again
    /// (same view and bands), tests what is in the frustum and was not drawn by the first phase
    /// against `pyramid` (built from the depth the first phase's draws produced, seen through
    /// `view_proj`: Vulkan clip space, depth 0 near .. 1 far, the matrix that drew it; each
    /// instance's box is `bounds` scaled by its scale:
    /// [`DrawPass::bounds`](crate::gpu::draw::DrawPass::bounds) for its meshes, or
    /// [`InstanceBounds::sphere`] of the cull radius), and
    /// appends what is not certainly hidden after the first phase's entries of each list (the
    /// last three commands of [`CullPass::args`]). Updates every instance's visibility bit to
    /// what is visible now, for the next frame's first phase. The test is conservative: an
    /// instance is dropped only when its box lies wholly in front
    /// of the camera and its nearest depth is beyond the farthest depth the pyramid holds over
    /// the box's screen rectangle ([`occluded_cpu`] is the CPU reference).
    ///
    /// [`Error::Lifecycle`] if this frame recorded no first phase (or `record` after it), or
    /// for a pyramid of another context; [`Error::InvalidInput`] for a non-finite `view_proj`
    /// or bounds that are not finite, have a negative radius or `y_min > y_max`.
    /// Nothing is recorded on error.
    ///
    /// # Safety
    /// As [`CullPass::record`], and: this frame's [`CullPass::record_first`] was recorded
    /// before it in submission order (in the same command buffer or an earlier one of the
    /// frame); `pyramid` was recorded
    /// ([`DepthPyramid::record`]) for this frame after the first phase's draws and before this,
    /// in submission order, from the depth those draws wrote.
    pub unsafe fn record_second(
        &mut self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        pyramid: &DepthPyramid,
        view_proj: Mat4,
        bounds: &InstanceBounds,
    ) -> Result<()> {
        frame.check(&self.shared, "CullPass::record_second")?;
        if !pyramid.image().belongs_to(&self.shared) {
            return Err(Error::Lifecycle(
                "CullPass::record_second: the pyramid is of another context".into(),
            ));
        }
        if !view_proj.is_finite() {
            return Err(Error::InvalidInput(format!(
                "CullPass::record_second: view_proj {view_proj} is not finite"
            )));
        }
        bounds.check()?;
        let Some((tag, batches)) = self.first.take_if(|(t, _)| t.is(frame)) else {
            return Err(Error::Lifecycle(
                "CullPass::record_second without CullPass::record_first in this frame".into(),
            ));
        };
        let depth = pyramid.depth_extent();
        let occlusion = Occlusion {
            view_proj: view_proj.to_cols_array_2d(),
            size: [depth.width, depth.height, pyramid.levels(), 0],
            bounds: [bounds.radius, bounds.y_min, bounds.y_max, 0.0],
        };
        // SAFETY: the caller's promises are this function's.
        let r = unsafe {
            self.record_phase(
                frame,
                cmd,
                Phase::Second,
                &batches,
                None,
                Some((pyramid, &occlusion)),
            )
        };
        if r.is_err() {
            self.first = Some((tag, batches));
        }
        r
    }

    /// Checks and marks the sources, follows the demand, and lays out the dispatches.
    fn begin(&mut self, frame: &Frame, sources: &[CullSource<'_>]) -> Result<Batches> {
        // Sources first: a refusal changes nothing and leaves nothing recorded.
        let range = u64::from(self.shared.adapter.limits.max_storage_buffer_range);
        for s in sources {
            if !s.buffer.belongs_to(&self.shared) {
                return Err(Error::Lifecycle(format!(
                    "cull source {:?} is of another context",
                    s.buffer.name()
                )));
            }
            if s.base.checked_add(s.count).is_none() {
                return Err(Error::InvalidInput(format!(
                    "cull source {:?}: base {} + count {} passes u32::MAX",
                    s.buffer.name(),
                    s.base,
                    s.count
                )));
            }
            let bytes = u64::from(s.count) * size_of::<Instance>() as u64;
            if s.buffer.size() < bytes {
                return Err(Error::InvalidInput(format!(
                    "cull source {:?} of {} bytes holds fewer than {} instances",
                    s.buffer.name(),
                    s.buffer.size(),
                    s.count
                )));
            }
            // VUID-VkWriteDescriptorSet-descriptorType-00331: a storage descriptor needs a
            // STORAGE_BUFFER buffer.
            if !s
                .buffer
                .usage()
                .contains(vk::BufferUsageFlags::STORAGE_BUFFER)
            {
                return Err(Error::InvalidInput(format!(
                    "cull source {:?} (usage {:?}) is bound as a storage buffer but lacks STORAGE_BUFFER usage",
                    s.buffer.name(),
                    s.buffer.usage()
                )));
            }
            // VUID-VkWriteDescriptorSet-descriptorType-00333: the range (the buffer's
            // requested size, `whole`) fits maxStorageBufferRange.
            if s.buffer.size() > range {
                return Err(Error::InvalidInput(format!(
                    "cull source {:?} of {} bytes is larger than maxStorageBufferRange ({range})",
                    s.buffer.name(),
                    s.buffer.size()
                )));
            }
        }
        // Marked before anything is recorded: a source with a live `Mapped` view refuses
        // (those marked before it only wait for this frame).
        for s in sources {
            s.buffer.mark_used(frame.value())?;
        }
        // Resizes first (the lists of this frame are the new ones).
        self.follow_demand()?;
        let live: Vec<&CullSource<'_>> = sources.iter().filter(|s| s.count > 0).collect();
        // Each source starts at a fresh workgroup, so a workgroup never straddles two buffers:
        // the table gives each its first workgroup (the shader finds a workgroup's source by a
        // binary search over them).
        let per_group = self.compaction.per_group();
        let mut out = Batches::default();
        for batch in live.chunks(self.batch) {
            let mut groups = 0u32;
            let entries = batch
                .iter()
                .map(|s| {
                    let e = SourceEntry {
                        count: s.count,
                        base: s.base,
                        first_group: groups,
                        pad: 0,
                    };
                    groups += s.count.div_ceil(per_group);
                    e
                })
                .collect();
            // Every entry of the binding array must be valid: unused ones repeat the first.
            out.buffers.push(
                (0..self.batch)
                    .map(|j| whole(batch.get(j).unwrap_or(&batch[0]).buffer)[0])
                    .collect(),
            );
            out.tables.push((entries, groups));
            out.end = out.end.max(
                batch
                    .iter()
                    .map(|s| u64::from(s.base) + u64::from(s.count))
                    .max()
                    .unwrap_or(0),
            );
        }
        Ok(out)
    }

    /// Visibility bits for every index the batches use: a larger buffer when needed (the old
    /// one retires; the new one is cleared by the next first phase).
    fn ensure_visibility(&mut self, batches: &Batches) -> Result<()> {
        // A frame that recorded the clear and was dropped never cleared them.
        if self.cleared_in.as_ref().is_some_and(FrameTag::dropped) {
            self.clear_visible = true;
            self.cleared_in = None;
        }
        let range = u64::from(self.shared.adapter.limits.max_storage_buffer_range);
        let needed = batches.end.div_ceil(32).max(1) * 4;
        if needed > range {
            return Err(Error::InvalidInput(format!(
                "visibility bits for indices up to {} take {needed} bytes, more than maxStorageBufferRange ({range}): number the sources from 0",
                batches.end
            )));
        }
        let bytes = needed.next_power_of_two().min(range);
        if self.visible.as_ref().is_some_and(|v| v.size() >= needed) {
            return Ok(());
        }
        self.visible = Some(self.shared.create_buffer(&BufferDesc {
            name: "cull visibility bits",
            size: bytes,
            usage: vk::BufferUsageFlags::STORAGE_BUFFER | vk::BufferUsageFlags::TRANSFER_DST,
            location: MemoryLocation::GpuOnly,
            category: Category::Outputs,
        })?);
        self.clear_visible = true;
        Ok(())
    }

    /// A table buffer for `batches` dispatches' tables at once, so they are recorded without
    /// rounds: a larger one when needed (the old one retires once its frames complete). Over
    /// the budget (or out of device memory) the old one stays and the frame records in rounds.
    fn ensure_tables(&mut self, batches: usize) -> Result<()> {
        let want = batches
            .next_power_of_two()
            .min(max_table_batches(self.batch));
        if want <= self.table_batches {
            return Ok(());
        }
        match table_buffer(&self.shared, self.batch, want) {
            Ok(b) => {
                self.table = Some(b);
                self.table_batches = want;
                Ok(())
            }
            Err(Error::OverBudget { .. } | Error::OutOfDeviceMemory { .. }) => {
                self.refused_table_growths += 1;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Records one phase over `batches` (see [`CullPass::record`]).
    ///
    /// # Safety
    /// As [`CullPass::record`]; for [`Phase::Second`], as [`CullPass::record_second`].
    unsafe fn record_phase(
        &mut self,
        frame: &Frame,
        cmd: vk::CommandBuffer,
        phase: Phase,
        batches: &Batches,
        view: Option<&CullView>,
        occlusion: Option<(&DepthPyramid, &Occlusion)>,
    ) -> Result<()> {
        // Before anything is marked or recorded: a growth refused by the budget records in
        // rounds instead.
        self.ensure_tables(batches.tables.len())?;
        let value = frame.value();
        let stride = table_stride(self.batch);
        let rounds = self.table_batches;
        let pipeline = match (phase, self.views) {
            (Phase::Single, 1) => self.plain,
            (Phase::Single, _) => self.lazy_pipeline(Variant::Views)?,
            _ => self.lazy_pipeline(Variant::Full)?,
        };
        let rb = if phase == Phase::First {
            None
        } else {
            let rb = self.readback_slot()?;
            self.readbacks[rb].0.touch(value);
            Some(rb)
        };
        let readback = rb.map(|rb| self.readbacks[rb].0.raw());
        let (lists, counters, args, view_buf, occ_buf, table, casc_buf) = (
            self.lists()?,
            self.counters()?,
            self.args()?,
            Self::get(&self.view)?,
            Self::get(&self.occlusion)?,
            Self::get(&self.table)?,
            Self::get(&self.cascade_buf)?,
        );
        // Without two phases the visibility binding still needs a buffer; the shader never
        // touches it then.
        let visible = self.visible.as_ref().filter(|_| phase != Phase::Single);
        for b in [lists, counters, args, view_buf, occ_buf, table, casc_buf]
            .into_iter()
            .chain(self.records.as_ref())
            .chain(visible)
        {
            b.mark_used(value)?;
        }
        let placeholder = Self::get_image(&self.placeholder)?;
        let pyramid_view = match occlusion {
            Some((p, _)) => {
                // The image and the view the set binds live until `frame` completes, even if
                // the pyramid is dropped (or was last recorded in another frame).
                p.used_by(value);
                p.view()
            }
            None => {
                placeholder.touch(value);
                self.placeholder_view
            }
        };
        // Sets next: a failure leaves nothing recorded.
        let sets = {
            let mut arena = lock(&self.sets);
            batches
                .tables
                .iter()
                .map(|_| arena.allocate(&self.shared, value, self.set_layout))
                .collect::<Result<Vec<_>>>()?
        };
        let fin_set = lock(&self.fin_sets).allocate(&self.shared, value, self.fin_set_layout)?;
        // Nothing fails past here (the resizes are committed at the end).
        // This record writes the arguments (all but the second phase): with `set_meshes`'
        // meshes, which `meshes` reports from its end on (a draw recorded after it in its
        // frame checks them against its own). A record refused above leaves both as they were.
        let written = match self.next_meshes {
            Some(m) if occlusion.is_none() => m,
            _ => self.meshes,
        };
        self.last_use.fetch_max(value, Ordering::AcqRel);
        let d = &self.shared.device;
        let mut all_reads = vk::AccessFlags::SHADER_READ
            | vk::AccessFlags::SHADER_WRITE
            | vk::AccessFlags::UNIFORM_READ
            | vk::AccessFlags::TRANSFER_READ;
        let mut users = vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER;
        if self.shared.queue_flags.contains(vk::QueueFlags::GRAPHICS) {
            // Indirect reads only with the stage that does them
            // (VUID-vkCmdPipelineBarrier-srcAccessMask-02815, dstAccessMask-02816).
            all_reads |= vk::AccessFlags::INDIRECT_COMMAND_READ;
            // Only stages the queue has may be named (VUID-vkCmdPipelineBarrier-srcStageMask-06461).
            users |= vk::PipelineStageFlags::DRAW_INDIRECT
                | vk::PipelineStageFlags::VERTEX_SHADER
                | vk::PipelineStageFlags::FRAGMENT_SHADER;
        }
        let caps = [
            self.caps[0],
            self.caps[1],
            self.caps[2],
            u32::from(self.records.is_some()),
        ];
        let mut meshes = vec![written; 2 * self.views as usize];
        for m in meshes.iter_mut().flatten() {
            m.instance_count = 0;
            m.first_instance = 0;
        }
        let barrier = |src_access, dst_access| {
            [vk::MemoryBarrier::default()
                .src_access_mask(src_access)
                .dst_access_mask(dst_access)]
        };
        let (lists_i, counters_i, args_i, view_i, occ_i, casc_i) = (
            whole(lists),
            whole(counters),
            whole(args),
            whole(view_buf),
            whole(occ_buf),
            whole(casc_buf),
        );
        // Without records the binding still needs a buffer; the shader never touches it then.
        let records_i = whole(self.records.as_ref().unwrap_or(lists));
        let visible_i = whole(visible.unwrap_or(counters));
        let pyramid_i = [vk::DescriptorImageInfo::default()
            .image_view(pyramid_view)
            .image_layout(PYRAMID_LAYOUT)];
        let clear_visible = phase == Phase::First && self.clear_visible;
        // SAFETY (whole body): cmd is recording outside a render pass (caller); every buffer is
        // live and large enough (created here, or checked by `begin`) and marked used by
        // `frame`, so none is freed before the frame completes, and none has a live host view
        // (the marks were refused otherwise); every storage binding is a STORAGE_BUFFER buffer
        // (VUID-VkWriteDescriptorSet-descriptorType-00331) within maxStorageBufferRange
        // (-00333): the sources checked by `begin`, the lists and records sized under it; the
        // sampled image is the placeholder (made GENERAL below) or the pyramid, GENERAL after
        // its record (caller), both marked used (VUID-vkCmdDispatch-imageLayout-00344); each
        // dispatch binds a fresh set (from the arena, not used by any pending command) whose
        // every binding, each array element included, is written first
        // (VUID-vkCmdDispatch-None-02697); the barriers order the reset before the dispatches,
        // the dispatches before finalize, and finalize before every consumer, including the
        // previous frame's (or the first phase's) readers before this phase's writes
        // (write-after-read).
        unsafe {
            // One barrier before the resets (each barrier drains the queue: on an H200 the
            // fixed cost of a pass was most of a 1M-instance cull). Without a pyramid the
            // placeholder is made GENERAL from UNDEFINED in it, after the previous use's
            // reads (compute is among `users`): its contents are never read.
            let placeholder_barrier = [image_barrier(
                placeholder.raw(),
                color_range(1),
                (vk::ImageLayout::UNDEFINED, vk::AccessFlags::empty()),
                (PYRAMID_LAYOUT, vk::AccessFlags::SHADER_READ),
            )];
            d.cmd_pipeline_barrier(
                cmd,
                users,
                vk::PipelineStageFlags::TRANSFER | vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::DependencyFlags::empty(),
                // Transfer writes among the sources: a host's own copies into a source,
                // recorded before the pass, are visible to its reads.
                &barrier(
                    all_reads | vk::AccessFlags::TRANSFER_WRITE,
                    vk::AccessFlags::TRANSFER_WRITE
                        | vk::AccessFlags::SHADER_READ
                        | vk::AccessFlags::SHADER_WRITE,
                ),
                &[],
                if occlusion.is_none() {
                    &placeholder_barrier
                } else {
                    &[]
                },
            );
            if let Some((_, occ)) = occlusion {
                d.cmd_update_buffer(cmd, occ_buf.raw(), 0, bytemuck::bytes_of(occ));
            } else {
                d.cmd_fill_buffer(cmd, counters.raw(), 0, vk::WHOLE_SIZE, 0);
                d.cmd_update_buffer(cmd, args.raw(), 0, bytemuck::cast_slice(&meshes));
            }
            if let Some(view) = view {
                d.cmd_update_buffer(cmd, view_buf.raw(), 0, bytemuck::bytes_of(view));
                if self.views > 1 {
                    d.cmd_update_buffer(cmd, casc_buf.raw(), 0, bytemuck::bytes_of(&self.cascades));
                }
            }
            if let (true, Some(v)) = (clear_visible, visible) {
                d.cmd_fill_buffer(cmd, v.raw(), 0, vk::WHOLE_SIZE, 0);
            }
            // The first round of source tables (see below) with the resets, under one barrier.
            write_tables(
                d,
                cmd,
                table.raw(),
                stride,
                &batches.tables[..rounds.min(batches.tables.len())],
            );
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::TRANSFER,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::DependencyFlags::empty(),
                &barrier(
                    vk::AccessFlags::TRANSFER_WRITE,
                    vk::AccessFlags::SHADER_READ
                        | vk::AccessFlags::SHADER_WRITE
                        | vk::AccessFlags::UNIFORM_READ,
                ),
                &[],
                &[],
            );
            d.cmd_bind_pipeline(cmd, vk::PipelineBindPoint::COMPUTE, pipeline);
            let max_x = self.shared.adapter.limits.max_compute_work_group_count[0].min(65_535);
            let compute_write = (
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::AccessFlags::SHADER_WRITE,
            );
            let compute_rw = (
                vk::PipelineStageFlags::COMPUTE_SHADER,
                vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE,
            );
            for (k, ((inst_i, set), (entries, groups))) in batches
                .buffers
                .iter()
                .zip(&sets)
                .zip(&batches.tables)
                .enumerate()
            {
                let slot = k % rounds;
                if slot == 0 && k > 0 {
                    // A further round of tables (the first was written with the resets):
                    // written after the previous round's dispatches read theirs, before this
                    // round's read them.
                    memory_barrier(
                        d,
                        cmd,
                        compute_rw,
                        (
                            vk::PipelineStageFlags::TRANSFER,
                            vk::AccessFlags::TRANSFER_WRITE,
                        ),
                    );
                    let end = (k + rounds).min(batches.tables.len());
                    write_tables(d, cmd, table.raw(), stride, &batches.tables[k..end]);
                    memory_barrier(
                        d,
                        cmd,
                        (
                            vk::PipelineStageFlags::TRANSFER,
                            vk::AccessFlags::TRANSFER_WRITE,
                        ),
                        (
                            vk::PipelineStageFlags::COMPUTE_SHADER,
                            vk::AccessFlags::SHADER_READ,
                        ),
                    );
                }
                // No barrier between the dispatches of one pass: they append to the same lists
                // through atomics on the counters (device-scope, coherent across dispatches as
                // across workgroups), each entry and record at its own slot, and the
                // visibility bits by atomicOr/atomicAnd of each instance's own bit; nothing a
                // dispatch writes is read before the barrier after the last one. (A barrier
                // here cost 4M instances in 4,096 buffers 1.36-1.39x of one buffer on an H200,
                // 1.10-1.17x without.)
                write_set(
                    d,
                    *set,
                    &[
                        (0, vk::DescriptorType::STORAGE_BUFFER, inst_i),
                        (1, vk::DescriptorType::STORAGE_BUFFER, &lists_i),
                        (2, vk::DescriptorType::STORAGE_BUFFER, &counters_i),
                        (3, vk::DescriptorType::UNIFORM_BUFFER, &view_i),
                        (4, vk::DescriptorType::STORAGE_BUFFER, &records_i),
                        (
                            5,
                            vk::DescriptorType::STORAGE_BUFFER,
                            &[vk::DescriptorBufferInfo {
                                buffer: table.raw(),
                                offset: slot as u64 * stride,
                                range: std::mem::size_of_val(entries.as_slice()) as u64,
                            }],
                        ),
                        (7, vk::DescriptorType::STORAGE_BUFFER, &visible_i),
                        (8, vk::DescriptorType::UNIFORM_BUFFER, &occ_i),
                        (9, vk::DescriptorType::UNIFORM_BUFFER, &casc_i),
                    ],
                );
                d.update_descriptor_sets(
                    &[vk::WriteDescriptorSet::default()
                        .dst_set(*set)
                        .dst_binding(6)
                        .descriptor_type(vk::DescriptorType::SAMPLED_IMAGE)
                        .image_info(&pyramid_i)],
                    &[],
                );
                d.cmd_bind_descriptor_sets(
                    cmd,
                    vk::PipelineBindPoint::COMPUTE,
                    self.layout,
                    0,
                    &[*set],
                    &[],
                );
                let gx = (*groups).min(max_x);
                let gy = groups.div_ceil(gx);
                let pc = CullPush {
                    caps,
                    sources: entries.len() as u32,
                    row_groups: gx,
                    phase: phase as u32,
                    views: self.views,
                };
                d.cmd_push_constants(
                    cmd,
                    self.layout,
                    vk::ShaderStageFlags::COMPUTE,
                    0,
                    bytemuck::bytes_of(&pc),
                );
                d.cmd_dispatch(cmd, gx, gy, 1);
            }
            memory_barrier(d, cmd, compute_write, compute_rw);
            d.cmd_bind_pipeline(cmd, vk::PipelineBindPoint::COMPUTE, self.fin_pipeline);
            write_set(
                d,
                fin_set,
                &[
                    (0, vk::DescriptorType::STORAGE_BUFFER, &counters_i),
                    (1, vk::DescriptorType::STORAGE_BUFFER, &args_i),
                ],
            );
            d.cmd_bind_descriptor_sets(
                cmd,
                vk::PipelineBindPoint::COMPUTE,
                self.fin_layout,
                0,
                &[fin_set],
                &[],
            );
            let fin = FinalizePush {
                caps,
                phase: phase as u32,
                views: self.views,
                pad: [0; 2],
            };
            d.cmd_push_constants(
                cmd,
                self.fin_layout,
                vk::ShaderStageFlags::COMPUTE,
                0,
                bytemuck::bytes_of(&fin),
            );
            d.cmd_dispatch(cmd, self.views, 1, 1);
            d.cmd_pipeline_barrier(
                cmd,
                vk::PipelineStageFlags::COMPUTE_SHADER,
                users,
                vk::DependencyFlags::empty(),
                &barrier(vk::AccessFlags::SHADER_WRITE, all_reads),
                &[],
                &[],
            );
            if let Some(readback) = readback {
                // This frame's counts, for sizing the lists once the frame completes.
                d.cmd_copy_buffer(
                    cmd,
                    counters.raw(),
                    readback,
                    &[vk::BufferCopy {
                        src_offset: 0,
                        dst_offset: 0,
                        size: COUNTERS as u64 * 4 * u64::from(self.views),
                    }],
                );
                d.cmd_pipeline_barrier(
                    cmd,
                    vk::PipelineStageFlags::TRANSFER,
                    vk::PipelineStageFlags::HOST,
                    vk::DependencyFlags::empty(),
                    &barrier(vk::AccessFlags::TRANSFER_WRITE, vk::AccessFlags::HOST_READ),
                    &[],
                    &[],
                );
            }
        }
        if clear_visible {
            self.clear_visible = false;
            self.cleared_in = Some(frame.tag());
        }
        if let Some(rb) = rb {
            self.readbacks[rb].1 = value;
            self.readbacks[rb].2 = false;
        }
        if occlusion.is_none() {
            self.meshes = written;
            self.next_meshes = None;
        }
        self.commit_resizes();
        Ok(())
    }
}

/// Writes the source tables of dispatches, the first of `tables` at slot 0 of `table`
/// (`stride` bytes a slot).
///
/// # Safety
/// `cmd` is recording outside a render pass; `table` is live, marked used by the frame `cmd`
/// records, and holds `tables.len()` slots of `stride` bytes, each at least as large as any
/// table (checked where the batches are made); nothing reads or writes it between the barriers
/// around this call.
unsafe fn write_tables(
    d: &ash::Device,
    cmd: vk::CommandBuffer,
    table: vk::Buffer,
    stride: u64,
    tables: &[(Vec<SourceEntry>, u32)],
) {
    for (j, (entries, _)) in tables.iter().enumerate() {
        // SAFETY: as the function's contract; at most 4096 entries of 16 bytes: within
        // vkCmdUpdateBuffer's 65536 (VUID-vkCmdUpdateBuffer-dataSize-00037), a multiple of 4
        // (-00036), at a multiple of 4 within the buffer (-00032, -00033).
        unsafe {
            d.cmd_update_buffer(cmd, table, j as u64 * stride, bytemuck::cast_slice(entries))
        };
    }
}

impl std::fmt::Debug for CullPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CullPass")
            .field("compaction", &self.compaction)
            .field("capacity", &self.capacity)
            .field("capacities", &self.caps)
            .field("records", &self.with_records)
            .field("sources_per_dispatch", &self.batch)
            .field("views", &self.views)
            .field("last_use", &self.last_use.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drop for CullPass {
    fn drop(&mut self) {
        lock(&self.sets).retire(&self.shared);
        lock(&self.fin_sets).retire(&self.shared);
        let last = *self.last_use.get_mut();
        self.shared
            .retire_object(RawObject::Pipeline(std::mem::take(&mut self.plain)), last);
        self.shared.retire_object(
            RawObject::Pipeline(std::mem::take(&mut self.views_pipeline)),
            last,
        );
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
            &mut self.fin_pipeline,
            &mut self.fin_layout,
            &mut self.fin_set_layout,
        );
        self.shared.retire_object(
            RawObject::ImageView(std::mem::take(&mut self.placeholder_view)),
            last,
        );
        // The buffers retire themselves at their own last use when dropped with the pass.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(x: f32, y: f32, z: f32) -> Instance {
        Instance::at(Vec3::new(x, y, z))
    }

    fn box_view() -> CullView {
        // x, y, z in [-100, 100]; exact small integers so every test value is exact.
        let planes = [
            [1.0, 0.0, 0.0, 100.0],
            [-1.0, 0.0, 0.0, 100.0],
            [0.0, 1.0, 0.0, 100.0],
            [0.0, -1.0, 0.0, 100.0],
            [0.0, 0.0, 1.0, 100.0],
            [0.0, 0.0, -1.0, 100.0],
        ];
        CullView::from_planes(planes, Vec3::ZERO, 1.0, &LodBands::default(), 1.0).unwrap()
    }

    /// The occlusion test reads the finest level at which the box's rectangle spans at most
    /// OCCLUSION_TEXELS texels: a gap in the occluder beside the rectangle does not make it
    /// visible (a test of 2 texels per axis reads 8-pixel texels here, one holding the gap);
    /// a gap under the rectangle does.
    #[test]
    fn a_gap_beside_the_rectangle_hides_nothing_under_it() {
        // One world unit is one pixel of a 64 × 64 depth image; depth = -z / 100.
        let view_proj = Mat4::orthographic_rh(0.0, 64.0, 0.0, 64.0, 0.0, 100.0);
        let bounds = InstanceBounds {
            radius: 3.5,
            y_min: 0.0,
            y_max: 7.0,
        };
        // Pixels x 14..=21, y 20..=27; depth 0.465 and farther.
        let at = Vec3::new(18.0, 20.0, -50.0);
        let hidden = |gap: Option<(usize, usize)>| {
            let mut depth = vec![0.2f32; 64 * 64];
            if let Some((x, y)) = gap {
                depth[y * 64 + x] = 1.0;
            }
            let pyramid = crate::gpu::pyramid::pyramid_cpu(&depth, 64, 64);
            occluded_cpu(at, 1.0, &bounds, &view_proj, [64, 64], &pyramid)
        };
        assert!(hidden(None), "behind a wall");
        assert!(hidden(Some((9, 22))), "a gap 5 pixels beside the rectangle");
        assert!(
            !hidden(Some((21, 27))),
            "a gap under the rectangle's corner"
        );
        assert!(!hidden(Some((14, 20))), "a gap under the other corner");
        // In front of the wall: never hidden.
        let near = Vec3::new(18.0, 20.0, -10.0);
        let pyramid = crate::gpu::pyramid::pyramid_cpu(&[0.2f32; 64 * 64], 64, 64);
        assert!(!occluded_cpu(
            near,
            1.0,
            &bounds,
            &view_proj,
            [64, 64],
            &pyramid
        ));
    }

    #[test]
    fn cpu_references_take_any_input_without_a_panic() {
        let bounds = InstanceBounds {
            radius: 0.1,
            y_min: 0.0,
            y_max: 0.1,
        };
        let level = [(1, 1, vec![0.0])];
        let p = Vec3::new(0.0, 0.0, 0.5);
        for size in [[0, 8], [8, 0], [0, 0]] {
            assert!(
                !occluded_cpu(p, 1.0, &bounds, &Mat4::IDENTITY, size, &level),
                "{size:?}: a depth image of no pixels hides nothing"
            );
        }
        assert!(occluded_cpu(
            p,
            1.0,
            &bounds,
            &Mat4::IDENTITY,
            [1, 1],
            &level
        ));
        // Indices past u32::MAX wrap, as the shader's u32 `base + instance` does.
        let view = box_view();
        let three = [inst(0.0, 0.0, 0.0); 3];
        let e = cull_cpu(&[(&three, u32::MAX - 1)], &view);
        let lod = classify_cpu(&three[0], &view) as usize;
        assert_eq!(e.lists[lod], vec![0, u32::MAX - 1, u32::MAX]);
        // A cascade holding them: its lists wrap too.
        let everything = CascadeView {
            planes: [[0.0, 0.0, 0.0, 1.0]; 6],
            max_lod: Lod::Billboard,
        };
        let views = cull_views_cpu(&[(&three, u32::MAX)], &view, &[everything]);
        assert_eq!(views[0].lists[lod], vec![0, 1, u32::MAX]);
        let band = band_cpu(three[0].position, &view) as usize;
        assert_eq!(views[1].lists[band], vec![0, 1, u32::MAX]);
    }

    #[test]
    fn reversed_and_infinite_projections_cull_like_the_finite_one() {
        // Bevy's convention: reversed, infinite depth (y flipped into Vulkan's clip space).
        let eye = Vec3::new(0.0, 10.0, 0.0);
        let look = Mat4::look_at_rh(eye, Vec3::new(0.0, 10.0, 100.0), Vec3::Y);
        let flip = Mat4::from_scale(Vec3::new(1.0, -1.0, 1.0));
        let infinite = flip * Mat4::perspective_infinite_reverse_rh(1.0, 1.5, 0.5) * look;
        let finite = flip * Mat4::perspective_rh(1.0, 1.5, 0.5, 5000.0) * look;
        let bands = LodBands::default();
        let a = CullView::new(infinite, eye, 2.0, &bands, 1.0).expect("infinite reversed");
        let b = CullView::new(finite, eye, 2.0, &bands, 1.0).expect("finite");
        assert_eq!(
            a.planes[4],
            [0.0, 0.0, 0.0, 1.0],
            "the infinite far plane culls nothing"
        );
        for p in [
            (0.0, 0.0, 50.0),
            (0.0, 0.0, -50.0),
            (80.0, 0.0, 60.0),
            (20.0, 0.0, 60.0),
            (0.0, 0.0, 0.2),
            (0.0, 0.0, 400.0),
        ] {
            let i = inst(p.0, p.1, p.2);
            assert_eq!(classify_cpu(&i, &a), classify_cpu(&i, &b), "{p:?}");
        }
        assert!(CullView::new(Mat4::ZERO, eye, 2.0, &bands, 1.0).is_err());
    }

    #[test]
    fn band_edges_and_planes_follow_the_half_open_rule() {
        let v = box_view();
        assert_eq!(classify_cpu(&inst(0.0, 0.0, 49.0), &v), 0);
        assert_eq!(
            classify_cpu(&inst(0.0, 0.0, 50.0), &v),
            1,
            "on the full edge: medium"
        );
        assert_eq!(classify_cpu(&inst(0.0, 0.0, -99.0), &v), 1);
        assert_eq!(
            classify_cpu(&inst(-101.0, 0.0, 0.0), &v),
            1,
            "d == -r: inside (a medium at 101 m)"
        );
        assert_eq!(
            classify_cpu(&inst(-101.5, 0.0, 0.0), &v),
            3,
            "beyond the radius: culled"
        );
        assert_eq!(classify_cpu(&inst(f32::NAN, 0.0, 0.0), &v), LOD_INVALID);
        assert_eq!(
            classify_cpu(
                &Instance {
                    scale: f32::INFINITY,
                    ..inst(0.0, 0.0, 0.0)
                },
                &v
            ),
            LOD_INVALID
        );
    }

    #[test]
    fn perspective_planes_contain_what_the_camera_sees() {
        let eye = Vec3::new(0.0, 10.0, 0.0);
        let view = Mat4::look_at_rh(eye, Vec3::new(0.0, 10.0, -1.0), Vec3::Y);
        let proj = Mat4::perspective_rh(60f32.to_radians(), 16.0 / 9.0, 0.5, 1000.0);
        let v = CullView::new(proj * view, eye, 1.0, &LodBands::default(), 1.0).unwrap();
        assert_eq!(
            classify_cpu(&inst(0.0, 10.0, -20.0), &v),
            0,
            "in front, near"
        );
        assert_eq!(
            classify_cpu(&inst(0.0, 10.0, -300.0), &v),
            2,
            "in front, far"
        );
        assert_eq!(classify_cpu(&inst(0.0, 10.0, 20.0), &v), 3, "behind");
        assert_eq!(
            classify_cpu(&inst(500.0, 10.0, -20.0), &v),
            3,
            "far to the side"
        );
        assert!(CullView::new(proj * view, Vec3::NAN, 1.0, &LodBands::default(), 1.0).is_err());
    }
}
