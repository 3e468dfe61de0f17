// GPU cull, plain atomics: one thread per instance; frustum and distance test (classify), then
// one atomic per visible instance to append it to its LOD's list.

var<immediate> pc: CullPush;

// Instances as vec4s: instance i is vec4s 2i (position, scale) and 2i + 1 (the rest).
@group(0) @binding(0) var<storage, read> instances: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> lists: array<u32>;
@group(0) @binding(2) var<storage, read_write> counters: array<atomic<u32>, 8>;
@group(0) @binding(3) var<uniform> view: CullView;
// Visible instances' records, laid out like `lists` (2 vec4s per slot); written when pc.records.
@group(0) @binding(4) var<storage, read_write> drawn: array<vec4<f32>>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * pc.row;
    if i >= pc.count {
        return;
    }
    let lod = classify(instances[2u * i], view);
    if lod == LOD_INVALID {
        atomicAdd(&counters[COUNTER_INVALID], 1u);
        return;
    }
    if lod == LOD_CULLED {
        return;
    }
    let slot = atomicAdd(&counters[lod], 1u);
    if slot < pc.capacity {
        let at = lod * pc.capacity + slot;
        lists[at] = pc.base + i;
        if pc.records != 0u {
            drawn[2u * at] = instances[2u * i];
            drawn[2u * at + 1u] = instances[2u * i + 1u];
        }
    }
}
