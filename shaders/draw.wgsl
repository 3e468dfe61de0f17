// The draw pass: procedural tree meshes at full and medium detail and camera-facing billboards
// that sample the atlas, one indexed indirect draw per LOD from the cull pass's arguments.
// The vertex stage reads the visible instance's record at `pc.base + instance_index`: each LOD
// is its own draw with its list's base pushed as a constant, so firstInstance stays 0
// (drawIndirectFirstInstance is not required).
// `pc.mode` 1 draws the ground quad instead (a plain indexed draw of its own mesh).
// Two fragment stages: `fs_main`, and `fs_shadowed`, which also looks up the sun's shadow maps
// (set 1, bound only with the pipeline that uses it).

struct DrawPush {
    mode: u32,
    lod: u32,
    base: u32,
    // Non-zero for the second occlusion phase's draws: its instances follow the first phase's
    // in each list (`counters[COUNTER_FIRST + lod]` of them).
    second: u32,
    // Non-zero: the draw indexes the run 0, 1, 2, ... and each corner's index is fetched from
    // the mesh of the instance's set (`Meshes::fetch`); zero: the draw indexes its one mesh.
    fetch: u32,
}
var<immediate> pc: DrawPush;

@group(0) @binding(0) var<uniform> frame: DrawFrame;
@group(0) @binding(1) var<storage, read> drawn: array<Instance>;
// Per species: the billboard's UV rectangle in the atlas page and the mesh set.
@group(0) @binding(2) var<storage, read> species: array<SpeciesEntry>;
@group(0) @binding(3) var atlas: texture_2d<f32>;
@group(0) @binding(4) var atlas_sampler: sampler;
// The cull pass's counters (COUNTER_FIRST: where each list's second-phase entries start).
@group(0) @binding(5) var<storage, read> counters: array<u32, COUNTERS>;
// Every mesh (`Meshes`), read by the vertex stage itself: a LOD of one mesh is an ordinary
// indexed draw of it (vertex index = the vertex); a LOD of several sets indexes the run
// 0, 1, 2, ... (vertex index = the corner) and looks the index up in the instance's set's mesh.
@group(0) @binding(6) var<storage, read> mesh_vertices: array<MeshVertex>;
@group(0) @binding(7) var<storage, read> mesh_indices: array<u32>;
@group(0) @binding(8) var<storage, read> mesh_table: array<vec4<u32>>;
// The shadow maps (every cascade in a tile of one depth image), compared against with a
// LESS_OR_EQUAL sampler: 1 where the receiver is no farther from the sun than the caster.
// A set of their own, bound only with the pipeline of `fs_shadowed`.
@group(1) @binding(0) var shadow_map: texture_depth_2d;
@group(1) @binding(1) var shadow_sampler: sampler_comparison;
@group(1) @binding(2) var<uniform> shadows: ShadowFrame;

struct VertexOut {
    @builtin(position) @invariant clip: vec4<f32>,
    @location(0) color: vec3<f32>,
    @location(1) uv: vec2<f32>,
    @location(2) @interpolate(flat) textured: u32,
    // World position: the fog distance is computed per fragment (a distance interpolated
    // across the ground's huge triangles would be wrong).
    @location(3) world: vec3<f32>,
    // The share of `color` that is left in full shadow (the ambient part of the light).
    @location(4) keep: f32,
    // Unit normal, for the shadow lookup's offset.
    @location(5) normal: vec3<f32>,
}

// The light of a surface facing `n`: `sun.w` ambient, the rest direct. Returns the light and
// the share of it that is ambient (what a shadow keeps).
fn light_of(n: vec3<f32>) -> vec2<f32> {
    let direct = max(dot(n, frame.sun.xyz), 0.0) * (1.0 - frame.sun.w);
    let light = direct + frame.sun.w;
    return vec2<f32>(light, frame.sun.w / max(light, 1e-4));
}

// Colours of `--lod-tint`: full red, medium yellow, billboard blue.
fn lod_color(lod: u32) -> vec3<f32> {
    if lod == 0u {
        return vec3<f32>(0.9, 0.15, 0.1);
    }
    if lod == 1u {
        return vec3<f32>(0.95, 0.8, 0.1);
    }
    return vec3<f32>(0.15, 0.35, 0.95);
}

// The vertex of vertex index `vi`: with `pc.fetch`, corner `vi` of mesh `entry`, or `ok`
// false past its last index; else vertex `vi` itself (indices and vertices are in range:
// `Meshes::new` checked them).
struct Corner {
    ok: bool,
    pos: vec3<f32>,
    normal: vec3<f32>,
    uv: vec2<f32>,
    // rgb colour; a = how much the instance tint applies (foliage 1, bark 0).
    color: vec4<f32>,
}

fn corner_of(entry: u32, vi: u32) -> Corner {
    var c: Corner;
    var at = vi;
    if pc.fetch != 0u {
        let m = mesh_table[entry];
        c.ok = vi < m.y;
        if !c.ok {
            return c;
        }
        at = m.z + mesh_indices[m.x + vi];
    }
    c.ok = true;
    let v = mesh_vertices[at];
    c.pos = vec3<f32>(v.px, v.py, v.pz);
    c.normal = vec3<f32>(v.nx, v.ny, v.nz);
    c.uv = vec2<f32>(v.u, v.v);
    c.color = unpack4x8unorm(v.color);
    return c;
}

@vertex
fn vs_main(
    @builtin(instance_index) ii: u32,
    @builtin(vertex_index) vi: u32,
) -> VertexOut {
    return vertex(ii, vi);
}

// The census (`DrawPass::record_census`): the same vertices (the position is invariant in both
// entry points, so the census's fragments meet the depth the draws wrote exactly), each
// carrying its list slot, which the fragment writes into an R32_UINT attachment, plus one.
struct CensusOut {
    @builtin(position) @invariant clip: vec4<f32>,
    @location(1) uv: vec2<f32>,
    @location(2) @interpolate(flat) textured: u32,
    @location(3) @interpolate(flat) slot: u32,
}

@vertex
fn vs_census(
    @builtin(instance_index) ii: u32,
    @builtin(vertex_index) vi: u32,
) -> CensusOut {
    let v = vertex(ii, vi);
    var out: CensusOut;
    out.clip = v.clip;
    out.uv = v.uv;
    out.textured = v.textured;
    out.slot = slot_of(ii);
    return out;
}

// The list slot (index into the records) of instance `ii` of this draw.
fn slot_of(ii: u32) -> u32 {
    var first = 0u;
    if pc.second != 0u {
        first = counters[COUNTER_FIRST + min(pc.lod, 2u)];
    }
    return pc.base + first + ii;
}

// Early tests: only fragments that meet the stored depth run, so a discarded (clear billboard)
// texel writes nothing and a hidden one never reaches the attachment.
@fragment
@early_depth_test(force)
fn fs_census(in: CensusOut) -> @location(0) u32 {
    let texel = textureSample(atlas, atlas_sampler, in.uv);
    if in.textured == 1u && texel.a < 0.5 {
        discard;
    }
    return in.slot + 1u;
}

fn vertex(ii: u32, vi: u32) -> VertexOut {
    var out: VertexOut;
    if pc.mode == 1u {
        let k = corner_of(0u, vi);
        let pos = k.pos;
        let color = k.color;
        let g = frame.ground;
        let world = vec3<f32>(g.x + pos.x * g.z, 0.0, g.y + pos.z * g.z);
        out.clip = frame.view_proj * vec4<f32>(world, 1.0);
        let light = light_of(vec3<f32>(0.0, 1.0, 0.0));
        out.color = color.rgb * light.x;
        out.uv = vec2<f32>(0.0);
        out.textured = 0u;
        out.world = world;
        out.keep = light.y;
        out.normal = vec3<f32>(0.0, 1.0, 0.0);
        return out;
    }
    let lod = min(pc.lod, 2u);
    let inst = drawn[slot_of(ii)];
    let id = inst.species_variant & 0xffffu;
    var entry = 0u;
    if pc.fetch != 0u {
        var mesh_set = 0u;
        if id < frame.params.z {
            mesh_set = species[id].mesh.x;
        }
        entry = mesh_entry(lod, mesh_set, arrayLength(&mesh_table));
    }
    let k = corner_of(entry, vi);
    if !k.ok {
        out.clip = PAST_MESH;
        return out;
    }
    let pos = k.pos;
    let normal = k.normal;
    let uv = k.uv;
    let color = k.color;
    var world: vec3<f32>;
    var n: vec3<f32>;
    if lod == 2u {
        // Billboard: turn the quad about +Y to face the camera.
        let to_cam = frame.camera.xz - inst.position.xz;
        let len = length(to_cam);
        var dir = vec2<f32>(0.0, 1.0);
        if len > 1e-4 {
            dir = to_cam / len;
        }
        let right = vec2<f32>(dir.y, -dir.x);
        world = inst.position + vec3<f32>(right.x * pos.x, pos.y, right.y * pos.x) * inst.scale;
        n = normalize(vec3<f32>(dir.x, 0.6, dir.y));
    } else {
        let c = cos(inst.yaw);
        let s = sin(inst.yaw);
        world = inst.position + vec3<f32>(c * pos.x + s * pos.z, pos.y, c * pos.z - s * pos.x) * inst.scale;
        n = vec3<f32>(c * normal.x + s * normal.z, normal.y, c * normal.z - s * normal.x);
    }
    out.clip = frame.view_proj * vec4<f32>(world, 1.0);
    let tint = unpack4x8unorm(inst.tint).rgb;
    var base = mix(color.rgb, color.rgb * tint, color.a);
    let light = light_of(n);
    out.textured = 0u;
    out.uv = vec2<f32>(0.0);
    if lod == 2u {
        var rect = vec4<f32>(0.0, 0.0, 1.0, 1.0);
        if id < frame.params.z {
            rect = species[id].rect;
        }
        out.uv = mix(rect.xy, rect.zw, uv);
        out.textured = 1u;
        base = tint;
    }
    if (frame.params.y & 1u) != 0u {
        base = lod_color(lod);
    }
    out.color = base * light.x;
    out.world = world;
    out.keep = light.y;
    out.normal = n;
    return out;
}

// The lit colour of a fragment before fog, `shade` of its direct light reaching it.
fn shaded(in: VertexOut, texel: vec4<f32>, shade: f32) -> vec3<f32> {
    var rgb = in.color * mix(in.keep, 1.0, shade);
    if in.textured == 1u && (frame.params.y & 1u) == 0u {
        rgb = rgb * texel.rgb;
    }
    return rgb;
}

// The colours are meant as the bytes a UNORM attachment stores; an sRGB one encodes what is
// written, so there they are decoded first (flag 2, `DrawFrame::SRGB_TARGET`).
fn to_target(c: vec3<f32>) -> vec3<f32> {
    if (frame.params.y & 2u) == 0u {
        return c;
    }
    let x = clamp(c, vec3<f32>(0.0), vec3<f32>(1.0));
    let lo = x / 12.92;
    let hi = pow((x + 0.055) / 1.055, vec3<f32>(2.4));
    return select(hi, lo, x <= vec3<f32>(0.04045));
}

fn fogged(in: VertexOut, rgb: vec3<f32>) -> vec4<f32> {
    let f = clamp(distance(in.world, frame.camera.xyz) / frame.fog.w, 0.0, 1.0);
    return vec4<f32>(to_target(mix(rgb, frame.fog.rgb, f * f)), 1.0);
}

@fragment
fn fs_main(in: VertexOut) -> @location(0) vec4<f32> {
    // Sampled in uniform control flow (implicit derivatives); used by billboards only.
    let texel = textureSample(atlas, atlas_sampler, in.uv);
    if in.textured == 1u && texel.a < 0.5 {
        discard;
    }
    return fogged(in, shaded(in, texel, 1.0));
}

// How much of the sun reaches `world` (1 lit, 0 in full shadow): the first cascade whose tile
// holds the point with room for the filter is looked up with 3x3 comparison taps; beyond every
// cascade, and fading out towards `shadows.params.x` metres from the camera, it is lit.
fn sunlight(world: vec3<f32>, normal: vec3<f32>) -> f32 {
    let count = min(shadows.count.x, 4u);
    // Two and a half texels of room, in clip units: the outer taps (one texel out, and the
    // linear filter's half texel) stay inside the tile.
    let edge = 1.0 - 5.0 * shadows.params.z;
    let d = distance(world, frame.camera.xyz);
    let fade = smoothstep(0.85 * shadows.params.x, shadows.params.x, d);
    if fade >= 1.0 {
        return 1.0;
    }
    for (var c = 0u; c < count; c = c + 1u) {
        let tile = shadows.tiles[c];
        let p = shadows.view_proj[c] * vec4<f32>(world + normal * (1.5 * shadows.texel_m[c]), 1.0);
        if all(abs(p.xy) < vec2<f32>(edge)) && p.z >= 0.0 && p.z <= 1.0 {
            let uv = tile.xy + (p.xy * 0.5 + 0.5) * tile.zw;
            let texel_uv = tile.zw * shadows.params.z;
            var lit = 0.0;
            for (var y = -1; y <= 1; y = y + 1) {
                for (var x = -1; x <= 1; x = x + 1) {
                    let o = vec2<f32>(f32(x), f32(y)) * texel_uv;
                    lit = lit + textureSampleCompareLevel(shadow_map, shadow_sampler, uv + o, p.z);
                }
            }
            let shade = 1.0 - shadows.params.y * (1.0 - lit / 9.0);
            return mix(shade, 1.0, fade);
        }
    }
    return 1.0;
}

@fragment
fn fs_shadowed(in: VertexOut) -> @location(0) vec4<f32> {
    let texel = textureSample(atlas, atlas_sampler, in.uv);
    if in.textured == 1u && texel.a < 0.5 {
        discard;
    }
    var shade = 1.0;
    // A surface turned from the sun is ambient only: nothing to shadow.
    if in.keep < 0.999 {
        shade = sunlight(in.world, normalize(in.normal));
    }
    return fogged(in, shaded(in, texel, shade));
}
