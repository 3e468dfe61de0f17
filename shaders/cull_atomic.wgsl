enable wgpu_binding_array;

// GPU cull, plain atomics: one thread per instance; frustum and distance test (classify), then
// one atomic per visible instance to append it to its LOD's list. One dispatch covers up to
// CULL_BATCH instance buffers (see CullSourceEntry).

var<immediate> pc: CullPush;

// Occlusion phases and shadow cascades compiled in (build.rs's `plain` variants set it false:
// a single pass over one view, without the registers the rest would take).
const CULL_FULL: bool = true;

// One instance buffer as vec4s: instance i is vec4s 2i (position, scale) and 2i + 1 (the rest).
struct InstanceWords {
    v: array<vec4<f32>>,
}

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
    return CULL_FULL && pc.phase == PHASE_FIRST && pc.views == 1u
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
// its visibility bit in the second phase.
fn through_phase(lod: u32, gi: u32, ps: vec4<f32>) -> u32 {
    if !CULL_FULL || pc.phase == PHASE_SINGLE {
        return lod;
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
    return out.x;
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

// The workgroup's source, shared so that the binding-array index is provably uniform
// (workgroupUniformLoad): no NonUniform decoration, no descriptor-indexing feature needed.
var<workgroup> wg_source: u32;
var<workgroup> wg_group: u32;
var<workgroup> wg_src: vec2<u32>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    if t == 0u {
        let at = cull_locate(wid.x + wid.y * pc.row_groups);
        let entry = table[at.x];
        wg_source = at.x;
        wg_group = at.y;
        wg_src = vec2<u32>(entry.count, entry.base);
    }
    let source = workgroupUniformLoad(&wg_source);
    // Ordered by workgroupUniformLoad's barrier: one global read per workgroup, before it.
    let group = wg_group;
    if source >= pc.sources {
        return;
    }
    let src = wg_src;
    let i = group * 256u + t;
    if i >= src.x {
        return;
    }
    if unseen_first(src.y + i) {
        return;
    }
    let gi = src.y + i;
    let ps = sources[source].v[2u * i];
    let raw = classify(ps, view);
    let lod = through_phase(raw, gi, ps);
    if lod == LOD_INVALID {
        atomicAdd(&counters[COUNTER_INVALID], 1u);
        return;
    }
    // The rest of the record, read only where records are written (and once for every view).
    var rest = vec4<f32>(0.0);
    if pc.caps.w != 0u {
        rest = sources[source].v[2u * i + 1u];
    }
    if lod < LOD_CULLED {
        let slot = atomicAdd(&counters[lod], 1u);
        if slot < pc.caps[lod] {
            put(list_base(pc.caps, 0u, lod) + slot, gi, ps, rest);
        }
    }
    let b = cascade_band(ps, raw);
    if b < LOD_CULLED {
        let r = view.camera.w * ps.w;
        for (var v = 1u; v < pc.views; v = v + 1u) {
            if cascades.max_band[v - 1u] >= b && in_cascade(v - 1u, ps.xyz, r) {
                let slot = atomicAdd(&counters[v * COUNTERS + b], 1u);
                if slot < pc.caps[b] {
                    put(list_base(pc.caps, v, b) + slot, gi, ps, rest);
                }
            }
        }
    }
}
