// After the cull dispatches: indirect draw arguments clamped to each list's capacity (the draw
// never reads past a list), and what did not fit recorded as overflow.

struct DrawIndexedIndirect {
    index_count: u32,
    instance_count: u32,
    first_index: u32,
    vertex_offset: i32,
    first_instance: u32,
}

// xyz: capacity of each LOD's list.
var<immediate> caps: vec4<u32>;

@group(0) @binding(0) var<storage, read_write> counters: array<u32, 8>;
@group(0) @binding(1) var<storage, read_write> args: array<DrawIndexedIndirect, 3>;

@compute @workgroup_size(4)
fn main(@builtin(local_invocation_index) l: u32) {
    if l < 3u {
        let appended = counters[l];
        let kept = min(appended, caps[l]);
        args[l].instance_count = kept;
        // Instance indices start at 0 (drawIndirectFirstInstance is not required): the draw
        // pass pushes each LOD's list base as a constant.
        args[l].first_instance = 0u;
        counters[COUNTER_OVERFLOW + l] = appended - kept;
    }
}
