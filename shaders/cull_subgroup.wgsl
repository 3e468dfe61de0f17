enable wgpu_binding_array;

// GPU cull, subgroup-aggregated: the same classification, then per LOD one ballot and one
// atomic per subgroup; each lane writes at the subgroup's base plus its rank among the lanes of
// the same LOD. All lanes stay in the loop (uniform control flow for the subgroup operations).

var<immediate> pc: CullPush;

// Occlusion phases and shadow cascades compiled in (build.rs's `plain` variants set it false:
// a single pass over one view, without the registers the rest would take).
const CULL_FULL: bool = true;

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

fn lanes_below(lane: u32) -> vec4<u32> {
    var m = vec4<u32>(0u);
    for (var w = 0u; w < 4u; w = w + 1u) {
        let lo = w * 32u;
        if lane >= lo + 32u {
            m[w] = 0xffffffffu;
        } else if lane > lo {
            m[w] = (1u << (lane - lo)) - 1u;
        }
    }
    return m;
}

fn bits(v: vec4<u32>) -> u32 {
    return countOneBits(v.x) + countOneBits(v.y) + countOneBits(v.z) + countOneBits(v.w);
}

var<workgroup> wg_count: array<atomic<u32>, 5>;
var<workgroup> wg_source: u32;
var<workgroup> wg_group: u32;
var<workgroup> wg_base: array<u32, 5>;
// Shadow cascades, per (cascade, LOD): instances counted, the workgroup's base in the lists, and
// slots handed out while writing.
var<workgroup> wg_casc: array<atomic<u32>, 12>;
var<workgroup> wg_casc_base: array<u32, 12>;
var<workgroup> wg_casc_fill: array<atomic<u32>, 12>;

// Two levels of aggregation: per subgroup (ballot, one shared-memory atomic per LOD), then per
// workgroup of CULL_PER_GROUP instances (one global atomic per LOD). Global atomics on the three
// list counters are what limits the plain variant when visible instances are sparse.
@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    if t < 5u {
        atomicStore(&wg_count[t], 0u);
    }
    if CULL_FULL && t < 12u {
        atomicStore(&wg_casc[t], 0u);
        atomicStore(&wg_casc_fill[t], 0u);
    }
    // The workgroup's source, shared so that the binding-array index is provably uniform
    // (workgroupUniformLoad, which also orders the resets above); past the last source the
    // workgroup appends nothing.
    if t == 0u {
        let at = cull_locate(wid.x + wid.y * pc.row_groups);
        wg_source = at.x;
        wg_group = at.y;
    }
    let source = workgroupUniformLoad(&wg_source);
    // Ordered by workgroupUniformLoad's barrier.
    let group = wg_group;
    var src = vec2<u32>(0u, 0u);
    if source < pc.sources {
        src = vec2<u32>(table[source].count, table[source].base);
    }
    let first = group * CULL_PER_GROUP + t;
    let below = lanes_below(lane);
    let leader = subgroupBroadcastFirst(lane);
    var lods: array<u32, CULL_PER_THREAD>;
    var slots: array<u32, CULL_PER_THREAD>;
    // The band each instance takes in the cascades (LOD_CULLED: none).
    var bands: array<u32, CULL_PER_THREAD>;
    for (var k = 0u; k < CULL_PER_THREAD; k = k + 1u) {
        let i = first + k * 256u;
        var lod = 5u; // past the end: takes part in the ballots, appends nothing
        var cb = LOD_CULLED;
        if i < src.x && !unseen_first(src.y + i) {
            let ps = sources[source].v[2u * i];
            let raw = classify(ps, view);
            lod = through_phase(raw, src.y + i, ps);
            cb = cascade_band(ps, raw);
            if cb < LOD_CULLED {
                // Counted per workgroup in shared memory; slots are handed out when writing.
                let r = view.camera.w * ps.w;
                for (var v = 1u; v < pc.views; v = v + 1u) {
                    if cascades.max_band[v - 1u] >= cb && in_cascade(v - 1u, ps.xyz, r) {
                        atomicAdd(&wg_casc[3u * (v - 1u) + cb], 1u);
                    }
                }
            }
        }
        bands[k] = cb;
        lods[k] = lod;
        slots[k] = 0u;
        for (var l = 0u; l < 5u; l = l + 1u) {
            let ballot = subgroupBallot(lod == l && l != LOD_CULLED);
            let total = bits(ballot);
            var base = 0u;
            if lane == leader && total > 0u {
                base = atomicAdd(&wg_count[l], total);
            }
            base = subgroupBroadcastFirst(base);
            if lod == l {
                slots[k] = base + bits(ballot & below);
            }
        }
    }
    workgroupBarrier();
    if t < 5u && t != LOD_CULLED {
        let n = atomicLoad(&wg_count[t]);
        var b = 0u;
        if n > 0u {
            b = atomicAdd(&counters[select(t, COUNTER_INVALID, t == LOD_INVALID)], n);
        }
        wg_base[t] = b;
    }
    if CULL_FULL && t >= 8u && t < 20u && (t - 8u) / 3u + 1u < pc.views {
        let n = atomicLoad(&wg_casc[t - 8u]);
        var b = 0u;
        if n > 0u {
            b = atomicAdd(&counters[((t - 8u) / 3u + 1u) * COUNTERS + (t - 8u) % 3u], n);
        }
        wg_casc_base[t - 8u] = b;
    }
    workgroupBarrier();
    for (var k = 0u; k < CULL_PER_THREAD; k = k + 1u) {
        let lod = lods[k];
        if lod < LOD_CULLED {
            let slot = wg_base[lod] + slots[k];
            if slot < pc.caps[lod] {
                let j = first + k * 256u;
                // The record is read only where records are written.
                var ps = vec4<f32>(0.0);
                var rest = vec4<f32>(0.0);
                if pc.caps.w != 0u {
                    ps = sources[source].v[2u * j];
                    rest = sources[source].v[2u * j + 1u];
                }
                put(list_base(pc.caps, 0u, lod) + slot, src.y + j, ps, rest);
            }
        }
        let cb = bands[k];
        if CULL_FULL && cb < LOD_CULLED {
            let j = first + k * 256u;
            let ps = sources[source].v[2u * j];
            var rest = vec4<f32>(0.0);
            if pc.caps.w != 0u {
                rest = sources[source].v[2u * j + 1u];
            }
            let r = view.camera.w * ps.w;
            for (var v = 1u; v < pc.views; v = v + 1u) {
                if cascades.max_band[v - 1u] >= cb && in_cascade(v - 1u, ps.xyz, r) {
                    let at = 3u * (v - 1u) + cb;
                    let slot = wg_casc_base[at] + atomicAdd(&wg_casc_fill[at], 1u);
                    if slot < pc.caps[cb] {
                        put(list_base(pc.caps, v, cb) + slot, src.y + j, ps, rest);
                    }
                }
            }
        }
    }
}
