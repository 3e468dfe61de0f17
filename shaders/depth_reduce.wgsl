// One level of the depth pyramid (Hi-Z): each texel is the farthest (largest) depth of the 2×2
// texels below it, coordinates clamped to the source's size, so a pyramid texel is never nearer
// than anything it covers. Layout and CPU reference: src/gpu/pyramid.rs.

struct PyramidPush {
    // Size of the source: the depth image, or the previous level (its logical size, not the
    // power-of-two mip it lives in).
    src_size: vec2<u32>,
    // Logical size of the level written. Texels of its mip beyond it get 1.0 (far: they hide
    // nothing), so a reader that strays past the logical size stays conservative.
    dst_size: vec2<u32>,
}

var<immediate> pc: PyramidPush;

// Binding 0 is the source of either entry point (one sampled-image binding in the set layout).
@group(0) @binding(0) var depth: texture_depth_2d;
@group(0) @binding(0) var level: texture_2d<f32>;
@group(0) @binding(1) var dst: texture_storage_2d<r32float, write>;

// The 2×2 source texels under `p`: xy the first corner, zw the opposite one, clamped to `size`.
fn corners(p: vec2<u32>, size: vec2<u32>) -> vec4<i32> {
    let last = size - 1u;
    return vec4<i32>(vec2<i32>(min(2u * p, last)), vec2<i32>(min(2u * p + 1u, last)));
}

// Whether `p` is beyond the mip written (the dispatch covers whole 8×8 groups).
fn outside(p: vec2<u32>) -> bool {
    return any(p >= textureDimensions(dst));
}

@compute @workgroup_size(8, 8)
fn from_depth(@builtin(global_invocation_id) gid: vec3<u32>) {
    let p = gid.xy;
    if outside(p) {
        return;
    }
    var v = 1.0;
    if all(p < pc.dst_size) {
        // The view's own size bounds the reads, whatever the push constants say.
        let c = corners(p, min(pc.src_size, textureDimensions(depth)));
        v = max(
            max(textureLoad(depth, c.xy, 0), textureLoad(depth, c.zy, 0)),
            max(textureLoad(depth, c.xw, 0), textureLoad(depth, c.zw, 0)),
        );
    }
    textureStore(dst, vec2<i32>(p), vec4<f32>(v, 0.0, 0.0, 0.0));
}

@compute @workgroup_size(8, 8)
fn from_level(@builtin(global_invocation_id) gid: vec3<u32>) {
    let p = gid.xy;
    if outside(p) {
        return;
    }
    var v = 1.0;
    if all(p < pc.dst_size) {
        let c = corners(p, min(pc.src_size, textureDimensions(level)));
        v = max(
            max(textureLoad(level, c.xy, 0).x, textureLoad(level, c.zy, 0).x),
            max(textureLoad(level, c.xw, 0).x, textureLoad(level, c.zw, 0).x),
        );
    }
    textureStore(dst, vec2<i32>(p), vec4<f32>(v, 0.0, 0.0, 0.0));
}
