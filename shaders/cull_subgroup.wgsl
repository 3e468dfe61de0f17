// GPU cull, subgroup-aggregated: the same classification, then per LOD one ballot and one
// atomic per subgroup; each lane writes at the subgroup's base plus its rank among the lanes of
// the same LOD. All lanes stay in the loop (uniform control flow for the subgroup operations).

var<immediate> pc: CullPush;

// Instances as vec4s: instance i is vec4s 2i (position, scale) and 2i + 1 (the rest).
@group(0) @binding(0) var<storage, read> instances: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> lists: array<u32>;
@group(0) @binding(2) var<storage, read_write> counters: array<atomic<u32>, 8>;
@group(0) @binding(3) var<uniform> view: CullView;

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

@compute @workgroup_size(256)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    let i = gid.x + gid.y * pc.row;
    var lod = 5u; // past the end: takes part in the ballots, appends nothing
    if i < pc.count {
        lod = classify(instances[2u * i], view);
    }
    // Most instances of a large world are culled: one ballot skips the per-LOD work for
    // subgroups with nothing to append (the ballot is the same for every lane).
    if bits(subgroupBallot(lod < LOD_CULLED || lod == LOD_INVALID)) == 0u {
        return;
    }
    let below = lanes_below(lane);
    let leader = subgroupBroadcastFirst(lane);
    for (var l = 0u; l < 5u; l = l + 1u) {
        let ballot = subgroupBallot(lod == l);
        let total = bits(ballot);
        var base = 0u;
        if lane == leader && total > 0u && l != LOD_CULLED {
            let counter = select(l, COUNTER_INVALID, l == LOD_INVALID);
            base = atomicAdd(&counters[counter], total);
        }
        base = subgroupBroadcastFirst(base);
        if lod == l && l < LOD_CULLED {
            let slot = base + bits(ballot & below);
            if slot < pc.capacity {
                lists[l * pc.capacity + slot] = pc.base + i;
            }
        }
    }
}
