// After a phase's cull dispatches: indirect draw arguments clamped to each list's capacity (the
// draw never reads past a list), and what did not fit recorded as overflow. Six commands: the
// first three draw what a single pass (or the first phase) appended, the last three what the
// second phase appended after it (starting at counters[COUNTER_FIRST + lod] in each list).

struct DrawIndexedIndirect {
    index_count: u32,
    instance_count: u32,
    first_index: u32,
    vertex_offset: i32,
    first_instance: u32,
}

struct FinalizePush {
    // xyz: capacity of each LOD's list.
    caps: vec4<u32>,
    // PHASE_SINGLE, PHASE_FIRST or PHASE_SECOND.
    phase: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}
var<immediate> pc: FinalizePush;

@group(0) @binding(0) var<storage, read_write> counters: array<u32, COUNTERS>;
@group(0) @binding(1) var<storage, read_write> args: array<DrawIndexedIndirect, 6>;

@compute @workgroup_size(4)
fn main(@builtin(local_invocation_index) l: u32) {
    if l < 3u {
        let appended = counters[l];
        let kept = min(appended, pc.caps[l]);
        // Instance indices start at 0 (drawIndirectFirstInstance is not required): the draw
        // pass pushes each LOD's list base as a constant (and adds the first phase's entries
        // for the second phase's draws).
        args[l].first_instance = 0u;
        args[3u + l].first_instance = 0u;
        if pc.phase == PHASE_SECOND {
            args[3u + l].instance_count = kept - counters[COUNTER_FIRST + l];
        } else {
            args[l].instance_count = kept;
            args[3u + l].instance_count = 0u;
            counters[COUNTER_FIRST + l] = kept;
        }
        counters[COUNTER_OVERFLOW + l] = appended - kept;
    }
}
