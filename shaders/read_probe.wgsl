// Read-only yardstick for the cull benchmark: reads the first vec4 (position, scale) of every
// instance record, as the cull does, and writes only if a value is impossible (never), so the
// time is that of the reads alone. `pc.base` = vec4s between reads (2: cull pattern, 1: dense).

var<immediate> pc: ProbePush;

@group(0) @binding(0) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * pc.row;
    if i < pc.count {
        let v = src[pc.base * i];
        if v.x == -1234567.0 && v.w == -7654321.0 {
            dst[0] = v;
        }
    }
}
