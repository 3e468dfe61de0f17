enable wgpu_binding_array;

// GPU cull, plain atomics: one thread per instance; frustum and distance test (classify), then
// one atomic per visible instance to append it to its LOD's list. One dispatch covers up to
// CULL_BATCH instance buffers (see CullPush).

var<immediate> pc: CullPush;

// One instance buffer as vec4s: instance i is vec4s 2i (position, scale) and 2i + 1 (the rest).
struct InstanceWords {
    v: array<vec4<f32>>,
}

@group(0) @binding(0) var<storage, read> sources: binding_array<InstanceWords, CULL_BATCH>;
@group(0) @binding(1) var<storage, read_write> lists: array<u32>;
@group(0) @binding(2) var<storage, read_write> counters: array<atomic<u32>, 8>;
@group(0) @binding(3) var<uniform> view: CullView;
// Visible instances' records, laid out like `lists` (2 vec4s per slot); written when pc.caps.w.
@group(0) @binding(4) var<storage, read_write> drawn: array<vec4<f32>>;

// The workgroup's source, shared so that the binding-array index is provably uniform
// (workgroupUniformLoad): no NonUniform decoration, no descriptor-indexing feature needed.
var<workgroup> wg_source: u32;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
) {
    let at = cull_locate(pc, wid.x + wid.y * pc.row_groups, 256u);
    if t == 0u {
        wg_source = at.x;
    }
    let source = workgroupUniformLoad(&wg_source);
    if source >= pc.sources {
        return;
    }
    let src = cull_src(pc, source);
    let i = at.y * 256u + t;
    if i >= src.x {
        return;
    }
    let lod = classify(sources[source].v[2u * i], view);
    if lod == LOD_INVALID {
        atomicAdd(&counters[COUNTER_INVALID], 1u);
        return;
    }
    if lod == LOD_CULLED {
        return;
    }
    let slot = atomicAdd(&counters[lod], 1u);
    if slot < pc.caps[lod] {
        let dst = list_base(pc.caps, lod) + slot;
        lists[dst] = src.y + i;
        if pc.caps.w != 0u {
            drawn[2u * dst] = sources[source].v[2u * i];
            drawn[2u * dst + 1u] = sources[source].v[2u * i + 1u];
        }
    }
}
