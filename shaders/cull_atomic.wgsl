enable wgpu_binding_array;

// GPU cull, plain atomics: one thread per instance; frustum and distance test (classify), then
// one atomic per visible instance to append it to its LOD's list. One dispatch covers up to
// CULL_BATCH instance buffers (see CullSourceEntry).

// Push constants, bindings and the functions over them: shaders/cull/shared.wgsl (appended by
// build.rs).

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
    let phased = through_phase(raw, gi, ps);
    let lod = phased.x;
    if phased.y != 0u {
        atomicAdd(&counters[COUNTER_HIDDEN + raw], 1u);
    }
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
