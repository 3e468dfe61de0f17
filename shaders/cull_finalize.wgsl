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
    // Views: one workgroup each.
    views: u32,
    pad1: u32,
    pad2: u32,
}
var<immediate> pc: FinalizePush;

// COUNTERS words and six commands per view.
@group(0) @binding(0) var<storage, read_write> counters: array<u32>;
@group(0) @binding(1) var<storage, read_write> args: array<DrawIndexedIndirect>;

// One workgroup per view (a cascade's second-phase commands stay at 0: the second phase adds
// nothing to its lists).
@compute @workgroup_size(4)
fn main(@builtin(local_invocation_index) t: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    if t < 3u {
        let c = wid.x * COUNTERS;
        let a = wid.x * 6u;
        let l = t;
        let appended = counters[c + l];
        let kept = min(appended, pc.caps[l]);
        // Instance indices start at 0 (drawIndirectFirstInstance is not required): the draw
        // pass pushes each LOD's list base as a constant (and adds the first phase's entries
        // for the second phase's draws).
        args[a + l].first_instance = 0u;
        args[a + 3u + l].first_instance = 0u;
        if pc.phase == PHASE_SECOND {
            // Saturating: the first phase's count is never above what the lists kept.
            args[a + 3u + l].instance_count = kept - min(kept, counters[c + COUNTER_FIRST + l]);
        } else {
            args[a + l].instance_count = kept;
            args[a + 3u + l].instance_count = 0u;
            counters[c + COUNTER_FIRST + l] = kept;
        }
        counters[c + COUNTER_OVERFLOW + l] = appended - kept;
    }
}
