// What both cull shaders (cull_atomic.wgsl, cull_subgroup.wgsl) share: push constants, bindings
// and the functions over them. build.rs appends this file to each of them (and to their
// variants, whose textual replacements apply to it too) before shaders/common/.

var<immediate> pc: CullPush;

// Occlusion phases and shadow cascades compiled in (build.rs's `plain` variants set it false:
// a single pass over one view, without the registers the rest would take).
const CULL_FULL: bool = true;
// Occlusion phases compiled in (build.rs's `views` variants set it false: a single pass over the
// camera and the cascades, without the registers and the visibility bits' atomics that phases
// take, so it can load its records before classifying them).
const CULL_OCCLUSION: bool = true;

// One instance buffer as vec4s: instance i is vec4s 2i (position, scale) and 2i + 1 (the rest).
struct InstanceWords {
    v: array<vec4<f32>>,
}

// Up to CULL_BATCH instance buffers per dispatch (see CullSourceEntry).
@group(0) @binding(0) var<storage, read> sources: binding_array<InstanceWords, CULL_BATCH>;
@group(0) @binding(1) var<storage, read_write> lists: array<u32>;
// COUNTERS words per view.
@group(0) @binding(2) var<storage, read_write> counters: array<atomic<u32>>;
@group(0) @binding(3) var<uniform> view: CullView;
// Visible instances' records, laid out like `lists` (2 vec4s per slot); written when pc.caps.w.
@group(0) @binding(4) var<storage, read_write> drawn: array<vec4<f32>>;

// The dispatch's sources (see CullSourceEntry).
@group(0) @binding(5) var<storage, read> table: array<CullSourceEntry>;
// Two-phase occlusion (pc.phase != PHASE_SINGLE): the depth pyramid (read by the second phase),
// one visibility bit per instance (index as in the lists; read by both phases, written by the
// second), and the camera the pyramid's depth was drawn with.
@group(0) @binding(6) var pyramid: texture_2d<f32>;
@group(0) @binding(7) var<storage, read_write> visible: array<atomic<u32>>;
@group(0) @binding(8) var<uniform> occlusion: OcclusionView;
// The shadow cascades (views 1..pc.views).
@group(0) @binding(9) var<uniform> cascades: CascadeViews;

// Whether the first phase passes over instance `gi` without reading it: not visible last frame
// and no cascade to cull it for.
fn unseen_first(gi: u32) -> bool {
    return CULL_FULL && CULL_OCCLUSION && pc.phase == PHASE_FIRST && pc.views == 1u
        && (atomicLoad(&visible[gi >> 5u]) & (1u << (gi & 31u))) == 0u;
}

// Writes instance `gi` (its record: `ps` and `rest`) at slot `dst` of the lists (and records).
fn put(dst: u32, gi: u32, ps: vec4<f32>, rest: vec4<f32>) {
    lists[dst] = gi;
    if pc.caps.w != 0u {
        drawn[2u * dst] = ps;
        drawn[2u * dst + 1u] = rest;
    }
}

// Whether a sphere at `p` of radius `r` is inside cascade `c` (view c + 1).
fn in_cascade(c: u32, p: vec3<f32>, r: f32) -> bool {
    let b = 6u * c;
    return plane_inside(cascades.planes[b], p, r) && plane_inside(cascades.planes[b + 1u], p, r)
        && plane_inside(cascades.planes[b + 2u], p, r) && plane_inside(cascades.planes[b + 3u], p, r)
        && plane_inside(cascades.planes[b + 4u], p, r) && plane_inside(cascades.planes[b + 5u], p, r);
}

// The band instance `ps` takes in the shadow cascades, or LOD_CULLED where there are none to
// cull (one view, or the second phase) or it is invalid or beyond the bands.
fn cascade_band(ps: vec4<f32>, lod: u32) -> u32 {
    if !CULL_FULL || pc.views == 1u || pc.phase == PHASE_SECOND || lod == LOD_INVALID {
        return LOD_CULLED;
    }
    return band(ps.xyz, view);
}

// `lod` of instance `gi` (position and scale `ps`) through the phase (see phase_lod), updating
// its visibility bit in the second phase: (the level to append or LOD_CULLED / LOD_INVALID; 1
// where the second phase found it in the frustum and hidden, and neither phase appends it: it
// counts at COUNTER_HIDDEN + lod).
fn through_phase(lod: u32, gi: u32, ps: vec4<f32>) -> vec2<u32> {
    if !CULL_FULL || !CULL_OCCLUSION || pc.phase == PHASE_SINGLE {
        return vec2<u32>(lod, 0u);
    }
    let bit = 1u << (gi & 31u);
    let was = (atomicLoad(&visible[gi >> 5u]) & bit) != 0u;
    let hidden = pc.phase == PHASE_SECOND && lod < LOD_CULLED
        && occluded(ps.xyz, ps.w, occlusion, pyramid);
    let out = phase_lod(pc.phase, lod, was, hidden);
    if pc.phase == PHASE_SECOND && (out.y != 0u) != was {
        if out.y != 0u {
            atomicOr(&visible[gi >> 5u], bit);
        } else {
            atomicAnd(&visible[gi >> 5u], ~bit);
        }
    }
    return vec2<u32>(out.x, u32(hidden && !was));
}

// The source workgroup `w` reads and the workgroup's index within it: the last source whose
// first workgroup is at most `w` (a binary search over the prefix sums). Past the last
// source's workgroups (the 2D dispatch rounds up) the index is past its instances.
fn cull_locate(w: u32) -> vec2<u32> {
    var lo = 0u;
    var hi = pc.sources;
    while hi - lo > 1u {
        let mid = (lo + hi) / 2u;
        if table[mid].first_group <= w {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return vec2<u32>(lo, w - table[lo].first_group);
}
