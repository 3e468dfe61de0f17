// The draw pass: procedural tree meshes at full and medium detail and camera-facing billboards
// that sample the atlas, one indexed indirect draw per LOD from the cull pass's arguments.
// The vertex stage reads the visible instance's record at `pc.base + instance_index`: each LOD
// is its own draw with its list's base pushed as a constant, so firstInstance stays 0
// (drawIndirectFirstInstance is not required).
// `pc.mode` 1 draws the ground quad instead (a plain indexed draw of its own mesh).

struct DrawPush {
    mode: u32,
    lod: u32,
    base: u32,
    // Non-zero for the second occlusion phase's draws: its instances follow the first phase's
    // in each list (`counters[COUNTER_FIRST + lod]` of them).
    second: u32,
}
var<immediate> pc: DrawPush;

@group(0) @binding(0) var<uniform> frame: DrawFrame;
@group(0) @binding(1) var<storage, read> drawn: array<Instance>;
// Per species: the billboard's UV rectangle in the atlas page (min u, min v, max u, max v).
@group(0) @binding(2) var<storage, read> species: array<vec4<f32>>;
@group(0) @binding(3) var atlas: texture_2d<f32>;
@group(0) @binding(4) var atlas_sampler: sampler;
// The cull pass's counters (COUNTER_FIRST: where each list's second-phase entries start).
@group(0) @binding(5) var<storage, read> counters: array<u32, COUNTERS>;

struct VertexOut {
    @builtin(position) clip: vec4<f32>,
    @location(0) color: vec3<f32>,
    @location(1) uv: vec2<f32>,
    @location(2) @interpolate(flat) textured: u32,
    // World position: the fog distance is computed per fragment (a distance interpolated
    // across the ground's huge triangles would be wrong).
    @location(3) world: vec3<f32>,
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

@vertex
fn vs_main(
    @builtin(instance_index) ii: u32,
    @location(0) pos: vec3<f32>,
    @location(1) normal: vec3<f32>,
    @location(2) uv: vec2<f32>,
    // rgb colour; a = how much the instance tint applies (foliage 1, bark 0).
    @location(3) color: vec4<f32>,
) -> VertexOut {
    var out: VertexOut;
    if pc.mode == 1u {
        let g = frame.ground;
        let world = vec3<f32>(g.x + pos.x * g.z, 0.0, g.y + pos.z * g.z);
        out.clip = frame.view_proj * vec4<f32>(world, 1.0);
        let light = max(frame.sun.y, 0.0) * (1.0 - frame.sun.w) + frame.sun.w;
        out.color = color.rgb * light;
        out.uv = vec2<f32>(0.0);
        out.textured = 0u;
        out.world = world;
        return out;
    }
    let lod = min(pc.lod, 2u);
    var first = 0u;
    if pc.second != 0u {
        first = counters[COUNTER_FIRST + lod];
    }
    let inst = drawn[pc.base + first + ii];
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
    let light = max(dot(n, frame.sun.xyz), 0.0) * (1.0 - frame.sun.w) + frame.sun.w;
    out.textured = 0u;
    out.uv = vec2<f32>(0.0);
    if lod == 2u {
        let id = inst.species_variant & 0xffffu;
        var rect = vec4<f32>(0.0, 0.0, 1.0, 1.0);
        if id < frame.params.z {
            rect = species[id];
        }
        out.uv = mix(rect.xy, rect.zw, uv);
        out.textured = 1u;
        base = tint;
    }
    if (frame.params.y & 1u) != 0u {
        base = lod_color(lod);
    }
    out.color = base * light;
    out.world = world;
    return out;
}

@fragment
fn fs_main(in: VertexOut) -> @location(0) vec4<f32> {
    // Sampled in uniform control flow (implicit derivatives); used by billboards only.
    let texel = textureSample(atlas, atlas_sampler, in.uv);
    var rgb = in.color;
    if in.textured == 1u {
        if texel.a < 0.5 {
            discard;
        }
        if (frame.params.y & 1u) == 0u {
            rgb = rgb * texel.rgb;
        }
    }
    let f = clamp(distance(in.world, frame.camera.xyz) / frame.fog.w, 0.0, 1.0);
    return vec4<f32>(mix(rgb, frame.fog.rgb, f * f), 1.0);
}
