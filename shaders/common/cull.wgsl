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
// entries): 24 keeps the stage at 28 storage buffers (lavapipe allows 32). The `wide` variants
// (build.rs) read CULL_WIDE where the device allows that many bindings (NVIDIA: a million), so
// one dispatch covers a thousand patch buffers.
const CULL_BATCH: u32 = 24u;
const CULL_WIDE: u32 = 1024u;

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
    pad0: u32,
    pad1: u32,
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

// Where LOD `lod`'s list starts in `lists` (and `drawn`).
fn list_base(caps: vec4<u32>, lod: u32) -> u32 {
    return select(0u, caps.x, lod >= 1u) + select(0u, caps.y, lod >= 2u);
}
