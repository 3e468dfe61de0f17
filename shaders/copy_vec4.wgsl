// Streaming copy, 16 bytes per thread: the bandwidth yardstick for the cull benchmark (it reads
// and writes the same number of bytes; vkCmdCopyBuffer is much slower on some GPUs).

var<immediate> pc: ProbePush;

@group(0) @binding(0) var<storage, read> src: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<u32>>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * pc.row;
    if i < pc.count {
        dst[i] = src[i];
    }
}
