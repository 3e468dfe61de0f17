// What the draw pass knows about the frame (src/gpu/draw.rs, DrawFrame, is held to this layout).
struct DrawFrame {
    view_proj: mat4x4<f32>,
    // Camera position (xyz); w unused.
    camera: vec4<f32>,
    // Unit direction towards the sun (xyz) and the ambient term (w).
    sun: vec4<f32>,
    // Sky and fog colour (rgb) and the distance at which fog is complete (w), metres.
    fog: vec4<f32>,
    // Ground rectangle: lowest x, lowest z, side (metres); w unused.
    ground: vec4<f32>,
    // x: entries per LOD list (the cull pass's capacity); y: flags (1 = tint by LOD);
    // z: species in the table; w unused.
    params: vec4<u32>,
}
