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

// Counters: [0..3) appended per list, [3] invalid instances, [4..7) overflow per list.
const COUNTER_INVALID: u32 = 3u;
const COUNTER_OVERFLOW: u32 = 4u;

// Instances per thread and per 256-thread workgroup of the subgroup variant
// (src/gpu/cull.rs dispatches to match; the atomic variant takes one instance per thread).
const CULL_PER_THREAD: u32 = 4u;
const CULL_PER_GROUP: u32 = 1024u;

// Instance sources one cull dispatch reads (the binding array at binding 0 has this many
// entries). 12 keeps the push constants at 112 bytes (the guaranteed minimum is 128) and the
// storage buffers of the stage at 15 (lavapipe allows 32).
const CULL_BATCH: u32 = 12u;

// Push constants of the cull dispatches: one dispatch per batch of up to CULL_BATCH sources.
// Each source starts at a fresh workgroup, so the source a workgroup reads is uniform across it.
struct CullPush {
    // xyz: capacity of each LOD's list (they follow one another in `lists`, each sized from
    // what was visible lately); w: non-zero to also copy each visible instance's 32-byte record
    // to `drawn` at its list slot (what the draw pass's vertex stage reads).
    caps: vec4<u32>,
    // Sources in this dispatch (1..=CULL_BATCH).
    sources: u32,
    // Workgroups per row of the 2D dispatch.
    row_groups: u32,
    pad0: u32,
    pad1: u32,
    // Per source (count, base): source k in xy of src[k / 2] when k is even, zw when odd. `base`
    // is the index the source's first instance has in the lists.
    src: array<vec4<u32>, 6>,
}

// Where LOD `lod`'s list starts in `lists` (and `drawn`).
fn list_base(caps: vec4<u32>, lod: u32) -> u32 {
    return select(0u, caps.x, lod >= 1u) + select(0u, caps.y, lod >= 2u);
}

// (count, base) of source k of this dispatch.
fn cull_src(p: CullPush, k: u32) -> vec2<u32> {
    let v = p.src[k / 2u];
    return select(v.zw, v.xy, (k & 1u) == 0u);
}

// The source workgroup `w` belongs to and the workgroup's index within that source, when each
// source covers ceil(count / per_group) workgroups in order; x == p.sources past the end.
fn cull_locate(p: CullPush, w: u32, per_group: u32) -> vec2<u32> {
    var first = 0u;
    for (var k = 0u; k < p.sources; k = k + 1u) {
        let groups = (cull_src(p, k).x + per_group - 1u) / per_group;
        if w < first + groups {
            return vec2<u32>(k, w - first);
        }
        first = first + groups;
    }
    return vec2<u32>(p.sources, 0u);
}
