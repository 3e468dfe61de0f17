// What the cull pass knows about the view, and the one classification rule it applies. The CPU
// reference (src/gpu/cull.rs, classify_cpu) performs the same operations in the same order,
// with the same fused multiply-adds, so the two agree bit for bit, on band edges and frustum
// planes included.
struct CullView {
    // Frustum planes (xyz normal pointing inside, w distance): inside when dot(n, p) + w >= -r.
    planes: array<vec4<f32>, 6>,
    // Camera position (xyz) and the bounding radius of an instance of scale 1 (w).
    camera: vec4<f32>,
    // Squared band edges at the current quality: full, medium, billboard; w unused.
    bands_sq: vec4<f32>,
}

// Levels: 0 full, 1 medium, 2 billboard, 3 culled, 4 invalid (non-finite position or scale).
const LOD_CULLED: u32 = 3u;
const LOD_INVALID: u32 = 4u;

fn finite_bits(x: f32) -> bool {
    // Bit test rather than x == x: WGSL lets compilers assume there are no NaNs.
    return (bitcast<u32>(x) & 0x7fffffffu) < 0x7f800000u;
}

// `ps` is the first 16 bytes of an Instance: position (xyz) and scale (w), read as one vec4 so
// that each thread issues a single 16-byte load (the rest of the record is not needed here).
fn plane_inside(pl: vec4<f32>, p: vec3<f32>, r: f32) -> bool {
    return fma(pl.x, p.x, fma(pl.y, p.y, fma(pl.z, p.z, pl.w))) >= -r;
}

fn classify(ps: vec4<f32>, view: CullView) -> u32 {
    let p = ps.xyz;
    if !(finite_bits(p.x) && finite_bits(p.y) && finite_bits(p.z) && finite_bits(ps.w)) {
        return LOD_INVALID;
    }
    let r = view.camera.w * ps.w;
    // Unrolled: six independent plane tests, no loop or dynamic uniform indexing.
    let inside = plane_inside(view.planes[0], p, r) && plane_inside(view.planes[1], p, r)
        && plane_inside(view.planes[2], p, r) && plane_inside(view.planes[3], p, r)
        && plane_inside(view.planes[4], p, r) && plane_inside(view.planes[5], p, r);
    if !inside {
        return LOD_CULLED;
    }
    return band(p, view);
}

// The distance band of a finite position: the level the camera's bands give it wherever it is
// (shadow cascades take it, so a shadow has the shape of the tree the camera draws).
fn band(p: vec3<f32>, view: CullView) -> u32 {
    let dx = p.x - view.camera.x;
    let dy = p.y - view.camera.y;
    let dz = p.z - view.camera.z;
    let d2 = fma(dx, dx, fma(dy, dy, dz * dz));
    if d2 < view.bands_sq.x {
        return 0u;
    }
    if d2 < view.bands_sq.y {
        return 1u;
    }
    if d2 < view.bands_sq.z {
        return 2u;
    }
    return LOD_CULLED;
}

// Counters: [0..3) appended per list, [3] invalid instances, [4..7) overflow per list, [8..11)
// entries of each list the first occlusion phase kept (where the second phase's draws start),
// [12..15) instances of each LOD in the frustum that the second phase found hidden and neither
// phase appended (so appended + hidden is what the view holds without occlusion).
const COUNTER_INVALID: u32 = 3u;
const COUNTER_OVERFLOW: u32 = 4u;
const COUNTER_FIRST: u32 = 8u;
const COUNTER_HIDDEN: u32 = 12u;
const COUNTERS: u32 = 16u;

// Phases of a dispatch (CullPush.phase): one pass over everything, or two-phase occlusion
// culling: the first draws what was visible last frame (the visibility bits), the second tests
// the rest against the depth pyramid built from the first's depth and updates the bits.
const PHASE_SINGLE: u32 = 0u;
const PHASE_FIRST: u32 = 1u;
const PHASE_SECOND: u32 = 2u;

// Views one pass culls: the camera and up to four shadow cascades.
const MAX_VIEWS: u32 = 5u;

// The shadow cascades (views 1..): six planes each, as CullView's (normals inside). An instance
// is in cascade c when its sphere is inside all six of planes[6c..6c+6).
struct CascadeViews {
    planes: array<vec4<f32>, 24>,
    // Per cascade, the coarsest band it takes (2: every drawn level; 1: no billboards).
    max_band: vec4<u32>,
}

// (Each cull shader's `in_cascade` reads its cascade's planes from the uniform: a function
// taking the whole 384-byte struct by value made lavapipe's compiler crawl.)

// Instances per thread and per 256-thread workgroup of the subgroup variant
// (src/gpu/cull.rs dispatches to match; the atomic variant takes one instance per thread).
const CULL_PER_THREAD: u32 = 4u;
const CULL_PER_GROUP: u32 = 1024u;

// Instance sources one cull dispatch reads (the binding array at binding 0 has this many
// entries): 24 keeps the stage at 28 storage buffers (lavapipe allows 32). The `wide` variants
// (build.rs) read CULL_WIDE where the device allows that many bindings (NVIDIA: a million), so
// one dispatch covers four thousand patch buffers.
const CULL_BATCH: u32 = 24u;
const CULL_WIDE: u32 = 4096u;

// Push constants of the cull dispatches: one dispatch per batch of sources.
struct CullPush {
    // xyz: capacity of each LOD's list (they follow one another in `lists`, each sized from
    // what was visible lately); w: non-zero to also copy each visible instance's 32-byte record
    // to `drawn` at its list slot (what the draw pass's vertex stage reads).
    caps: vec4<u32>,
    // Sources in this dispatch (1..=the binding array's length).
    sources: u32,
    // Workgroups per row of the 2D dispatch.
    row_groups: u32,
    // PHASE_SINGLE, PHASE_FIRST or PHASE_SECOND.
    phase: u32,
    // Views culled: 1 (the camera) .. MAX_VIEWS; views past the camera are culled by the single
    // pass or the first phase.
    views: u32,
}

// The dispatch's sources, one entry each (binding 5): x instances, y the index the source's
// first instance has in the lists, z the first workgroup of the dispatch that reads it (each
// source starts at a fresh workgroup: the prefix sum of ceil(x / workgroup instances)).
struct CullSourceEntry {
    count: u32,
    base: u32,
    first_group: u32,
    pad: u32,
}

// Where view `v`'s LOD `lod` list starts in `lists` (and `drawn`): each view has a list of
// each LOD's capacity, view after view.
fn list_base(caps: vec4<u32>, v: u32, lod: u32) -> u32 {
    return v * (caps.x + caps.y + caps.z) + select(0u, caps.x, lod >= 1u)
        + select(0u, caps.y, lod >= 2u);
}

// The second phase's occlusion test: the camera that drew the depth the pyramid was built from.
struct OcclusionView {
    // View-projection (Vulkan clip space, depth 0 near .. 1 far), column-major.
    view_proj: mat4x4<f32>,
    // x, y: the depth image's size in pixels; z: pyramid levels; w unused.
    size: vec4<u32>,
    // An instance of scale 1 lies within this distance of its vertical axis (x), and between
    // these heights above its position (y lowest, z highest); w unused.
    bounds: vec4<f32>,
}

// Texels per axis the occlusion test reads at most (up to 8 x 8 at the finest level at which
// the screen rectangle spans that many): a canopy seen from above is a sieve of crowns, and a
// coarser level's texel takes the farthest depth of every gap in it. On the H200 (4M trees,
// canopy flight, 300 frames) 2 per axis left 109.0M drawn of 132.7M, 4: 85.5M, 8: 71.0M at
// 0.03 ms more per frame, 16: 62.6M at 0.14 ms more.
const OCCLUSION_TEXELS: u32 = 8u;

// Whether an instance at `p` of scale `s` is certainly hidden: its box (occ.bounds scaled by `s`)
// lies wholly in front of the camera, and its nearest depth is beyond the farthest depth of the
// pyramid texels that cover its screen rectangle. Pyramid level L texel x covers depth pixels
// [x * 2^(L+1), (x + 1) * 2^(L+1)) and holds their largest depth (src/gpu/pyramid.rs). The CPU
// reference (src/gpu/cull.rs, occluded_cpu) performs the same operations in the same order.
fn occluded(p: vec3<f32>, s: f32, occ: OcclusionView, pyramid: texture_2d<f32>) -> bool {
    let m = occ.view_proj;
    let c = fma(m[0], vec4<f32>(p.x), fma(m[1], vec4<f32>(p.y), fma(m[2], vec4<f32>(p.z), m[3])));
    let r = occ.bounds.x * s;
    let y0 = occ.bounds.y * s;
    let y1 = occ.bounds.z * s;
    var lo = vec3<f32>(3.0e38);
    var hi = vec2<f32>(-3.0e38);
    for (var k = 0u; k < 8u; k = k + 1u) {
        let sx = select(-r, r, (k & 1u) != 0u);
        let sy = select(y0, y1, (k & 2u) != 0u);
        let sz = select(-r, r, (k & 4u) != 0u);
        let q = fma(m[0], vec4<f32>(sx), fma(m[1], vec4<f32>(sy), fma(m[2], vec4<f32>(sz), c)));
        // A corner at or behind the camera plane: the projection is not bounded.
        if !(q.w > 0.0) {
            return false;
        }
        let n = q.xyz / q.w;
        lo = min(lo, n);
        hi = max(hi, n.xy);
    }
    let size = vec2<f32>(occ.size.xy);
    let last = size - 1.0;
    // NDC -1..1 to pixels; every pixel whose centre the box can cover lies in [floor(lo), floor(hi)].
    let a = vec2<u32>(clamp(floor(fma(lo.xy, vec2<f32>(0.5), vec2<f32>(0.5)) * size), vec2<f32>(0.0), last));
    let b = vec2<u32>(clamp(floor(fma(hi, vec2<f32>(0.5), vec2<f32>(0.5)) * size), vec2<f32>(0.0), last));
    // An empty rectangle (NaN corners) hides nothing.
    if any(a > b) {
        return false;
    }
    // The finest level at which the rectangle spans at most OCCLUSION_TEXELS texels per axis.
    var level = 0u;
    while level + 1u < occ.size.z {
        let s = level + 1u;
        let span = (b >> vec2<u32>(s)) - (a >> vec2<u32>(s));
        if span.x < OCCLUSION_TEXELS && span.y < OCCLUSION_TEXELS {
            break;
        }
        level = s;
    }
    let t0 = vec2<i32>(a >> vec2<u32>(level + 1u));
    let t1 = vec2<i32>(b >> vec2<u32>(level + 1u));
    let l = i32(level);
    // Hidden only if the box's nearest depth is beyond every texel (a NaN hides nothing).
    for (var y = t0.y; y <= t1.y; y = y + 1) {
        for (var x = t0.x; x <= t1.x; x = x + 1) {
            if !(lo.z > textureLoad(pyramid, vec2<i32>(x, y), l).x) {
                return false;
            }
        }
    }
    return true;
}

// What a phase makes of an instance classified `lod`, given its visibility bit from last frame
// (`was`) and, in the second phase, whether it is occluded now: (level to append, or
// LOD_CULLED; the new bit). The first phase appends what was visible; the second appends what
// is visible now and was not drawn by the first (and counts invalid instances), and sets the
// bit to what is visible now.
fn phase_lod(phase: u32, lod: u32, was: bool, hidden: bool) -> vec2<u32> {
    if phase == PHASE_FIRST {
        return vec2<u32>(select(LOD_CULLED, lod, was && lod < LOD_CULLED), u32(was));
    }
    if lod == LOD_INVALID {
        return vec2<u32>(LOD_INVALID, 0u);
    }
    let seen = lod < LOD_CULLED && !hidden;
    return vec2<u32>(select(LOD_CULLED, lod, seen && !was), u32(seen));
}
