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
    // x: unused; y: flags (1 = tint by LOD, 2 = sRGB target: decode before writing);
    // z: species in the table; w unused.
    params: vec4<u32>,
}

// One mesh vertex (src/gpu/draw.rs, Vertex, is held to this layout): 36 bytes.
struct MeshVertex {
    px: f32,
    py: f32,
    pz: f32,
    nx: f32,
    ny: f32,
    nz: f32,
    u: f32,
    v: f32,
    // RGBA8, R in the low byte; alpha is how much the instance tint applies.
    color: u32,
}

// A species as the draw and shadow passes see it (src/gpu/draw.rs, SpeciesEntry).
struct SpeciesEntry {
    // The billboard's UV rectangle in the atlas page (min u, min v, max u, max v).
    rect: vec4<f32>,
    // x: the species' mesh set; yzw unused.
    mesh: vec4<u32>,
}

// Where a mesh lies in the mesh buffers (`Meshes::table`): first index, index count, vertex
// offset. Entry 0 is the ground, 1 the billboard, then full and medium of each set.
fn mesh_entry(lod: u32, mesh_set: u32, entries: u32) -> u32 {
    if lod >= 2u {
        return 1u;
    }
    let sets = (entries - 2u) / 2u;
    return 2u + 2u * min(mesh_set, sets - 1u) + lod;
}

// Far outside the clip volume (z > w in both depth conventions): the vertex of a corner past
// its mesh's last index, so that the triangle it belongs to, all of whose corners are, is
// dropped.
const PAST_MESH: vec4<f32> = vec4<f32>(0.0, 0.0, 2.0, 1.0);
