// The shadow casters: the cull pass's lists of one cascade view drawn depth-only into that
// cascade's tile of the shadow map, one indexed indirect draw per LOD (as shaders/draw.wgsl:
// the list's base is pushed, firstInstance stays 0). Full and medium meshes turn by the
// instance's yaw as in the camera draw; billboards turn to face the sun (so their shadow has
// the tree's outline, not a sliver) and are cut out by the atlas's alpha.

struct ShadowPush {
    // World to the cascade's clip space.
    view_proj: mat4x4<f32>,
    // Horizontal unit direction towards the sun (xy = world xz); zw unused.
    facing: vec4<f32>,
    lod: u32,
    // Where this LOD's list of this view starts in the records.
    base: u32,
    // Species in the table.
    species_count: u32,
    // Non-zero: the draw indexes the run and each corner's index is fetched, as in
    // shaders/draw.wgsl (`Meshes::fetch`).
    fetch: u32,
}
var<immediate> pc: ShadowPush;

@group(0) @binding(0) var<storage, read> drawn: array<Instance>;
// Per species: the billboard's UV rectangle in the atlas page and the mesh set.
@group(0) @binding(1) var<storage, read> species: array<SpeciesEntry>;
@group(0) @binding(2) var atlas: texture_2d<f32>;
@group(0) @binding(3) var atlas_sampler: sampler;
// Every mesh, fetched per corner as in shaders/draw.wgsl.
@group(0) @binding(4) var<storage, read> mesh_vertices: array<MeshVertex>;
@group(0) @binding(5) var<storage, read> mesh_indices: array<u32>;
@group(0) @binding(6) var<storage, read> mesh_table: array<vec4<u32>>;

struct VertexOut {
    @builtin(position) clip: vec4<f32>,
    @location(0) uv: vec2<f32>,
    @location(1) @interpolate(flat) textured: u32,
}

@vertex
fn vs_main(
    @builtin(instance_index) ii: u32,
    @builtin(vertex_index) vi: u32,
) -> VertexOut {
    var out: VertexOut;
    let lod = min(pc.lod, 2u);
    let inst = drawn[pc.base + ii];
    let id = inst.species_variant & 0xffffu;
    var at = vi;
    if pc.fetch != 0u {
        var mesh_set = 0u;
        if id < pc.species_count {
            mesh_set = species[id].mesh.x;
        }
        let m = mesh_table[mesh_entry(lod, mesh_set, arrayLength(&mesh_table))];
        if vi >= m.y {
            out.clip = PAST_MESH;
            out.uv = vec2<f32>(0.0);
            out.textured = 0u;
            return out;
        }
        at = m.z + mesh_indices[m.x + vi];
    }
    let v = mesh_vertices[at];
    let pos = vec3<f32>(v.px, v.py, v.pz);
    let uv = vec2<f32>(v.u, v.v);
    var world: vec3<f32>;
    out.uv = vec2<f32>(0.0);
    out.textured = 0u;
    if lod == 2u {
        let dir = pc.facing.xy;
        let right = vec2<f32>(dir.y, -dir.x);
        world = inst.position + vec3<f32>(right.x * pos.x, pos.y, right.y * pos.x) * inst.scale;
        var rect = vec4<f32>(0.0, 0.0, 1.0, 1.0);
        if id < pc.species_count {
            rect = species[id].rect;
        }
        out.uv = mix(rect.xy, rect.zw, uv);
        out.textured = 1u;
    } else {
        let c = cos(inst.yaw);
        let s = sin(inst.yaw);
        world = inst.position + vec3<f32>(c * pos.x + s * pos.z, pos.y, c * pos.z - s * pos.x) * inst.scale;
    }
    out.clip = pc.view_proj * vec4<f32>(world, 1.0);
    return out;
}

@fragment
fn fs_main(in: VertexOut) {
    // Mip 0 with an explicit level: no derivatives needed, and a cut-out needs no filtering.
    let alpha = textureSampleLevel(atlas, atlas_sampler, in.uv, 0.0).a;
    if in.textured == 1u && alpha < 0.5 {
        discard;
    }
}
