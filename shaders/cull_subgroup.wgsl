enable wgpu_binding_array;

// GPU cull, subgroup-aggregated: the same classification, then one exclusive scan per subgroup
// over each thread's counts of the three drawn LODs (packed 10 bits each) and one shared-memory
// atomic per subgroup and LOD; each instance goes at the subgroup's base plus the lanes below
// it plus its rank among the thread's own instances of that LOD. All lanes stay in the uniform
// control flow the subgroup operations need. No private arrays (see `info` in main): a version
// that held four records and their LODs in arrays took scratch memory, which the NVIDIA driver
// keeps, and was slower.

// Push constants, bindings and the functions over them: shaders/cull/shared.wgsl (appended by
// build.rs).

// Bits per LOD in a packed count: a subgroup (at most 128 lanes) of at most CULL_PER_THREAD
// instances a lane counts at most 512, a workgroup at most CULL_PER_GROUP = 1024 of which a
// base (what lies before an appending subgroup) is at most 1023.
const FIELD: u32 = 10u;
const FIELD_MASK: u32 = 1023u;

// Each thread's instances fit one byte each of a u32 (see `info` in main).
const_assert CULL_PER_THREAD <= 4u;

fn field(packed: u32, lod: u32) -> u32 {
    return (packed >> (FIELD * lod)) & FIELD_MASK;
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

// Two levels of aggregation: per subgroup (a scan, one shared-memory atomic per LOD), then per
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
    // Per instance k, byte k of `info`: its LOD (bits 0..3), how many of the thread's earlier
    // instances took the same LOD (3..5) and its cascade band (5..7, LOD_CULLED: none). No array:
    // the loops below are unrolled and their loads issued together, and a private array that
    // is not kept in registers takes scratch memory, which the NVIDIA driver keeps.
    var info = 0u;
    // The thread's instances per drawn LOD (packed) and invalid ones.
    var mine = 0u;
    var invalid = 0u;
    for (var k = 0u; k < CULL_PER_THREAD; k = k + 1u) {
        let i = first + k * 256u;
        var lod = LOD_CULLED;
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
        var rank = 0u;
        if lod < LOD_CULLED {
            rank = field(mine, lod);
            mine += 1u << (FIELD * lod);
        } else if lod == LOD_INVALID {
            invalid += 1u;
        }
        info |= (lod | (rank << 3u) | (cb << 5u)) << (8u * k);
    }
    // The lanes below, and the whole subgroup; the first lane reserves the subgroup's runs.
    let below = subgroupExclusiveAdd(mine);
    let total = subgroupAdd(mine);
    var base = 0u;
    if lane == subgroupBroadcastFirst(lane) {
        for (var l = 0u; l < LOD_CULLED; l = l + 1u) {
            let n = field(total, l);
            if n > 0u {
                base |= atomicAdd(&wg_count[l], n) << (FIELD * l);
            }
        }
    }
    base = subgroupBroadcastFirst(base);
    if invalid > 0u {
        atomicAdd(&wg_count[LOD_INVALID], invalid);
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
        let byte = info >> (8u * k);
        let lod = byte & 7u;
        if lod < LOD_CULLED {
            let slot = wg_base[lod] + field(base, lod) + field(below, lod) + ((byte >> 3u) & 3u);
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
        let cb = (byte >> 5u) & 3u;
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
