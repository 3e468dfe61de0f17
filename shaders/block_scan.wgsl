// Exclusive prefix sum of u32 within blocks of 256, plus each block's total.
// The first step of a device-wide scan (compaction offsets): a second pass over `block_sums`
// and an add pass make it global.

struct Params {
    count: u32,
}

var<immediate> params: Params;

@group(0) @binding(0) var<storage, read> input: array<u32>;
@group(0) @binding(1) var<storage, read_write> output: array<u32>;
@group(0) @binding(2) var<storage, read_write> block_sums: array<u32>;

const BLOCK: u32 = 256u;
var<workgroup> tile: array<u32, BLOCK>;

@compute @workgroup_size(256)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let i = gid.x;
    var v = 0u;
    if i < params.count {
        v = input[i];
    }
    tile[lid] = v;
    workgroupBarrier();
    // Hillis-Steele: log2(256) = 8 steps; barriers stay in uniform control flow.
    for (var offset = 1u; offset < BLOCK; offset = offset << 1u) {
        var add = 0u;
        if lid >= offset {
            add = tile[lid - offset];
        }
        workgroupBarrier();
        tile[lid] = tile[lid] + add;
        workgroupBarrier();
    }
    if i < params.count {
        output[i] = tile[lid] - v;
    }
    if lid == BLOCK - 1u {
        block_sums[wid.x] = tile[lid];
    }
}
