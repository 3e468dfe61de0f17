// What the camera draw knows about the sun's shadow maps (src/gpu/shadow.rs, ShadowFrame, is
// held to this layout). The cascades share one depth image, each in a square tile of it.
struct ShadowFrame {
    // World to each cascade's clip space: orthographic along the sun, x and y -1..1 over its
    // tile, depth 0 (towards the sun) .. 1.
    view_proj: array<mat4x4<f32>, 4>,
    // Each cascade's tile in the image: uv of its first texel's corner (xy) and its size (zw).
    tiles: array<vec4<f32>, 4>,
    // Metres of world per shadow texel, per cascade (how far receivers are pushed along their
    // normal before the lookup, so a surface does not shadow itself).
    texel_m: vec4<f32>,
    // x: distance from the camera where shadows have faded out, metres; y: the share of the
    // direct light a shadow takes away (1: all of it); z: one texel as a share of a tile's
    // side (tiles are square in texels); w unused.
    params: vec4<f32>,
    // x: cascades (0..=4); yzw unused.
    count: vec4<u32>,
}
