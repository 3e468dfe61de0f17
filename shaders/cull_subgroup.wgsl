enable wgpu_binding_array;

// GPU cull, subgroup-aggregated: the same classification, then one exclusive scan per subgroup
// over each thread's counts of the three drawn LODs (packed 10 bits each) and one shared-memory
// atomic per subgroup and LOD; each instance goes at the subgroup's base plus the lanes below
// it plus its rank among the thread's own instances of that LOD. The subgroup operations run
// where all lanes of a subgroup do: past branches on constants and push constants only, or on
// subgroup-wide values (a vote, a sum: the cascades' candidates and scan). No private arrays
// (see `info` in main): a version that held four records and their LODs in arrays took scratch
// memory, which the NVIDIA driver keeps, and was slower.

// Push constants, bindings and the functions over them: shaders/cull/shared.wgsl (appended by
// build.rs).

// Bits per LOD in a packed count: a subgroup (at most 128 lanes) of at most CULL_PER_THREAD
// instances a lane counts at most 512, a workgroup at most CULL_PER_GROUP = 1024 of which a
// base (what lies before an appending subgroup) is at most 1023.
const FIELD: u32 = 10u;
const FIELD_MASK: u32 = 1023u;

// Each thread's four instances fit one byte each of a u32 (see `info` in main); a workgroup's
// counts, at most CULL_PER_GROUP, fit a field once a subgroup reserves (bases below 1024; the
// adapter check keeps subgroups at 128 lanes at most, totals at 512).
const_assert CULL_PER_THREAD == 4u;
const_assert CULL_PER_GROUP == 256u * CULL_PER_THREAD;
const_assert CULL_PER_GROUP <= 1024u;

fn field(packed: u32, lod: u32) -> u32 {
    return (packed >> (FIELD * lod)) & FIELD_MASK;
}

var<workgroup> wg_count: array<atomic<u32>, 5>;
var<workgroup> wg_source: u32;
var<workgroup> wg_group: u32;
var<workgroup> wg_base: array<u32, 5>;
// Shadow cascades, per (cascade, LOD): instances counted, the workgroup's base in the lists, and
// slots handed out while writing.
var<workgroup> wg_casc: array<atomic<u32>, 12>;
var<workgroup> wg_casc_base: array<u32, 12>;
// The second phase's hidden instances per LOD (COUNTER_HIDDEN).
var<workgroup> wg_hidden: array<atomic<u32>, 3>;

// Cascade c's (0..4, view c + 1) membership of the instance in the thread's slot k (band cb,
// sphere at p of radius r; slot k holds the thread's instance k, or in slot 0 a candidate the
// views variant gathered from another lane, see `gathered` in main): counted in `counts` (the
// band's field), with its rank among the thread's earlier slots in the same cascade and band in
// `ranks` (2 bits at 2 (4k + c)) and its membership in `members` (bit 4k + c). Called with c a
// constant, one counter word per cascade: no private array is indexed at run time.
fn tally(
    c: u32,
    k: u32,
    cb: u32,
    p: vec3<f32>,
    r: f32,
    counts: ptr<function, u32>,
    members: ptr<function, u32>,
    ranks: ptr<function, u32>,
) {
    if c + 1u < pc.views && cascades.max_band[c] >= cb && in_cascade(c, p, r) {
        let at = 4u * k + c;
        *members |= 1u << at;
        *ranks |= field(*counts, cb) << (2u * at);
        *counts += 1u << (FIELD * cb);
    }
}

// Slot k's instance's (band cb, record ps) membership in the four cascades (see `tally`); none
// where cb is LOD_CULLED (see cascade_band).
fn tally_all(
    k: u32,
    cb: u32,
    ps: vec4<f32>,
    casc0: ptr<function, u32>,
    casc1: ptr<function, u32>,
    casc2: ptr<function, u32>,
    casc3: ptr<function, u32>,
    members: ptr<function, u32>,
    ranks: ptr<function, u32>,
) {
    if cb < LOD_CULLED {
        let r = view.camera.w * ps.w;
        tally(0u, k, cb, ps.xyz, r, casc0, members, ranks);
        tally(1u, k, cb, ps.xyz, r, casc1, members, ranks);
        tally(2u, k, cb, ps.xyz, r, casc2, members, ranks);
        tally(3u, k, cb, ps.xyz, r, casc3, members, ranks);
    }
}

// Instance k of the thread, classified `lod` (band `cb` in the cascades), in the thread's
// counts: its byte of `info` (see main, with its rank among the thread's earlier instances of a
// drawn LOD), and one more in the LOD's field of `mine` if drawn, or in `invalid` if invalid.
fn place(
    k: u32,
    lod: u32,
    cb: u32,
    info: ptr<function, u32>,
    mine: ptr<function, u32>,
    invalid: ptr<function, u32>,
) {
    var rank = 0u;
    if lod < LOD_CULLED {
        rank = field(*mine, lod);
        *mine += 1u << (FIELD * lod);
    } else if lod == LOD_INVALID {
        *invalid += 1u;
    }
    *info |= (lod | (rank << 3u) | (cb << 5u)) << (8u * k);
}

// The reservation of a subgroup's runs in the cascades (`total`: per cascade, per band packed)
// in the workgroup's counts, shared out among the active lanes (`rank` among `lanes`): one
// run (cascade e / 3, band e % 3) each, so that the twelve shared-memory atomics are not one
// lane's in a row. The bases, packed as `total`, are the subgroup-wide OR of the lanes'.
fn reserve_cascades(total: vec4<u32>, rank: u32, lanes: u32) -> vec4<u32> {
    var base = vec4<u32>(0u);
    for (var e = rank; e < 12u; e = e + lanes) {
        let c = e / 3u;
        let l = e % 3u;
        let n = field(total[c], l);
        if n > 0u {
            let b = atomicAdd(&wg_casc[e], n) << (FIELD * l);
            base |= select(vec4<u32>(0u), vec4<u32>(b), vec4<u32>(c) == vec4<u32>(0u, 1u, 2u, 3u));
        }
    }
    return subgroupOr(base);
}

// Writes slot k's instance (index `gi`, record ps + rest, band cb) into cascade c's list where it
// is a member: at the workgroup's base, the subgroup's (`base`), the lanes' below (`below`) and
// its rank among the thread's slots.
fn emit_cascade(
    c: u32,
    k: u32,
    cb: u32,
    gi: u32,
    ps: vec4<f32>,
    rest: vec4<f32>,
    base: u32,
    below: u32,
    members: u32,
    ranks: u32,
) {
    let at = 4u * k + c;
    if ((members >> at) & 1u) != 0u {
        let slot = wg_casc_base[3u * c + cb] + field(base, cb) + field(below, cb)
            + ((ranks >> (2u * at)) & 3u);
        if slot < pc.caps[cb] {
            put(list_base(pc.caps, c + 1u, cb) + slot, gi, ps, rest);
        }
    }
}

// The index of the r-th (from 0) set bit of x, which has more than r.
fn nth_bit32(x: u32, r: u32) -> u32 {
    var v = x;
    var left = r;
    var at = 0u;
    for (var w = 16u; w > 0u; w = w / 2u) {
        let low = countOneBits(v & ((1u << w) - 1u));
        if left >= low {
            left -= low;
            v = v >> w;
            at += w;
        }
    }
    return at;
}

// The lanes set in a ballot.
fn ballot_count(b: vec4<u32>) -> u32 {
    let n = countOneBits(b);
    return n.x + n.y + n.z + n.w;
}

// The subgroup invocation of the r-th (from 0) lane set in a ballot that has more than r.
fn nth_lane(b: vec4<u32>, r: u32) -> u32 {
    var left = r;
    for (var i = 0u; i < 4u; i = i + 1u) {
        let n = countOneBits(b[i]);
        if left < n {
            return 32u * i + nth_bit32(b[i], left);
        }
        left -= n;
    }
    return 0u;
}

// cull_locate (shaders/cull/shared.wgsl) with the subgroup's active lanes probing the table
// together: each round cuts the sources left into one part more than there are lanes and
// probes the first source of every part but the first (1,024 sources, 32 lanes: 2 rounds of one
// read each, against 10 reads one after another; 4,096: 3 rounds; with the search skipped, 16M instances in
// 16,384 buffers of 1,024 took 18 us less on the H200). Called where the subgroup is uniform:
// `lo` and `hi` are the same in every lane. The table's first_group grows with the index, so
// the probes at most `w` are a prefix of the ranks, and table[lo].first_group <= w throughout
// (0 at the start).
fn cull_locate_subgroup(w: u32) -> vec2<u32> {
    let rank = subgroupExclusiveAdd(1u);
    let lanes = subgroupAdd(1u);
    var lo = 0u;
    var hi = pc.sources;
    while hi - lo > 1u {
        let step = (hi - lo + lanes) / (lanes + 1u);
        let probe = lo + (rank + 1u) * step;
        var below = 0u;
        if probe < hi && table[min(probe, hi - 1u)].first_group <= w {
            below = 1u;
        }
        lo = lo + subgroupAdd(below) * step;
        hi = min(lo + step, hi);
    }
    return vec2<u32>(lo, w - table[lo].first_group);
}

// Two levels of aggregation: per subgroup (a scan, one shared-memory atomic per LOD), then per
// workgroup of CULL_PER_GROUP instances (one global atomic per LOD). Global atomics on the three
// list counters are what limits the plain variant when visible instances are sparse.
@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) t: u32,
    @builtin(subgroup_invocation_id) lane: u32,
) {
    if t < 5u {
        atomicStore(&wg_count[t], 0u);
    }
    if CULL_FULL && t < 12u {
        atomicStore(&wg_casc[t], 0u);
    }
    if CULL_FULL && CULL_OCCLUSION && t < 3u {
        atomicStore(&wg_hidden[t], 0u);
    }
    // The workgroup's source, shared so that the binding-array index is provably uniform
    // (workgroupUniformLoad, which also orders the resets above); past the last source the
    // workgroup appends nothing. Among several sources, found by the subgroup of thread 0 (a
    // vote: uniform in it), all its lanes probing the table at once (cull_locate_subgroup).
    if pc.sources > 1u {
        if subgroupAny(t == 0u) {
            let at = cull_locate_subgroup(wid.x + wid.y * pc.row_groups);
            if t == 0u {
                wg_source = at.x;
                wg_group = at.y;
            }
        }
    } else if t == 0u {
        let at = cull_locate(wid.x + wid.y * pc.row_groups);
        wg_source = at.x;
        wg_group = at.y;
    }
    let source = workgroupUniformLoad(&wg_source);
    // Ordered by workgroupUniformLoad's barrier.
    let group = wg_group;
    var src = vec2<u32>(0u, 0u);
    if source < pc.sources {
        src = vec2<u32>(table[source].count, table[source].base);
    }
    let first = group * CULL_PER_GROUP + t;
    // Per instance k, byte k of `info`: its LOD (bits 0-2), how many of the thread's earlier
    // instances took the same LOD (bits 3-4) and its cascade band (bits 5-6, LOD_CULLED: none).
    // No array: a private array that is not kept in registers takes scratch memory, which the
    // NVIDIA driver keeps.
    var info = 0u;
    // The thread's instances per drawn LOD (packed) and invalid ones.
    var mine = 0u;
    var invalid = 0u;
    // The second phase's hidden instances per LOD (packed).
    var hid = 0u;
    // The same for the shadow cascades: per cascade its slots' instances per band (packed), and
    // per slot and cascade membership and rank (see `tally`).
    var casc0 = 0u;
    var casc1 = 0u;
    var casc2 = 0u;
    var casc3 = 0u;
    var cmembers = 0u;
    var cranks = 0u;
    // Where the views variant gathered its subgroup's cascade candidates (see below): bit 31,
    // and the instance the thread's first slot holds (its index in the workgroup's instances,
    // bits 0-9, and its band, bits 10-11).
    var gathered = 0u;
    if CULL_FULL && CULL_OCCLUSION {
        // One instance at a time: loading the four records first here took scratch memory on
        // the H200 (heap usage after the demo 262,144 -> 393,216 B) and made five views slower
        // (345.6 -> 378.5 us at 16M).
        for (var k = 0u; k < CULL_PER_THREAD; k = k + 1u) {
            let i = first + k * 256u;
            var lod = LOD_CULLED;
            var cb = LOD_CULLED;
            if i < src.x && !unseen_first(src.y + i) {
                let ps = sources[source].v[2u * i];
                let raw = classify(ps, view);
                let phased = through_phase(raw, src.y + i, ps);
                lod = phased.x;
                if phased.y != 0u {
                    hid += 1u << (FIELD * raw);
                }
                cb = cascade_band(ps, raw);
                tally_all(k, cb, ps, &casc0, &casc1, &casc2, &casc3, &cmembers, &cranks);
            }
            place(k, lod, cb, &info, &mine, &invalid);
        }
    } else {
        // The plain variant (one view, one pass) loads its four records before classifying
        // any: 16M in 153.3 -> 139.9-140.4 us on the H200 (1.15x the copy floor). So does the
        // views variant (camera and cascades, one pass, no phases), which then tests the
        // cascades' candidates (below; compiled out where CULL_FULL is false).
        let i0 = first;
        let i1 = first + 256u;
        let i2 = first + 512u;
        let i3 = first + 768u;
        var ps0 = vec4<f32>(0.0);
        var ps1 = vec4<f32>(0.0);
        var ps2 = vec4<f32>(0.0);
        var ps3 = vec4<f32>(0.0);
        if i0 < src.x {
            ps0 = sources[source].v[2u * i0];
        }
        if i1 < src.x {
            ps1 = sources[source].v[2u * i1];
        }
        if i2 < src.x {
            ps2 = sources[source].v[2u * i2];
        }
        if i3 < src.x {
            ps3 = sources[source].v[2u * i3];
        }
        let lod0 = select(LOD_CULLED, classify(ps0, view), i0 < src.x);
        let cb0 = select(LOD_CULLED, cascade_band(ps0, lod0), i0 < src.x);
        place(0u, lod0, cb0, &info, &mine, &invalid);
        let lod1 = select(LOD_CULLED, classify(ps1, view), i1 < src.x);
        let cb1 = select(LOD_CULLED, cascade_band(ps1, lod1), i1 < src.x);
        place(1u, lod1, cb1, &info, &mine, &invalid);
        let lod2 = select(LOD_CULLED, classify(ps2, view), i2 < src.x);
        let cb2 = select(LOD_CULLED, cascade_band(ps2, lod2), i2 < src.x);
        place(2u, lod2, cb2, &info, &mine, &invalid);
        let lod3 = select(LOD_CULLED, classify(ps3, view), i3 < src.x);
        let cb3 = select(LOD_CULLED, cascade_band(ps3, lod3), i3 < src.x);
        place(3u, lod3, cb3, &info, &mine, &invalid);
        // The cascades' candidates (instances in a band). Where the subgroup holds no more than
        // it has lanes, as in instances stored in random order (about nine of 128 at 16M in
        // the bench's forest), lane q tests the subgroup's candidate q (ordered by k, then
        // lane) in its first slot, instead of every lane testing its four with most lanes
        // idle; `gathered` keeps which instance that is. Where it holds more, as in instances
        // stored by tile, each lane tests its own four. Uniform branches: push constants and
        // subgroup-wide values; the shuffles read lanes that are active (they voted).
        if CULL_FULL && pc.views > 1u {
            let c0 = cb0 < LOD_CULLED;
            let c1 = cb1 < LOD_CULLED;
            let c2 = cb2 < LOD_CULLED;
            let c3 = cb3 < LOD_CULLED;
            let total = subgroupAdd(u32(c0) + u32(c1) + u32(c2) + u32(c3));
            if total > subgroupAdd(1u) {
                tally_all(0u, cb0, ps0, &casc0, &casc1, &casc2, &casc3, &cmembers, &cranks);
                tally_all(1u, cb1, ps1, &casc0, &casc1, &casc2, &casc3, &cmembers, &cranks);
                tally_all(2u, cb2, ps2, &casc0, &casc1, &casc2, &casc3, &cmembers, &cranks);
                tally_all(3u, cb3, ps3, &casc0, &casc1, &casc2, &casc3, &cmembers, &cranks);
            } else if total > 0u {
                let b0 = subgroupBallot(c0);
                let b1 = subgroupBallot(c1);
                let b2 = subgroupBallot(c2);
                let b3 = subgroupBallot(c3);
                let n0 = ballot_count(b0);
                let n1 = ballot_count(b1);
                let n2 = ballot_count(b2);
                let q = subgroupExclusiveAdd(1u);
                var k = 0u;
                var r = q;
                var b = b0;
                if r >= n0 {
                    r -= n0;
                    k = 1u;
                    b = b1;
                    if r >= n1 {
                        r -= n1;
                        k = 2u;
                        b = b2;
                        if r >= n2 {
                            r -= n2;
                            k = 3u;
                            b = b3;
                        }
                    }
                }
                let has = q < total;
                let holder = select(lane, nth_lane(b, r), has);
                let at = subgroupShuffle(t, holder) + 256u * k;
                let cb = (subgroupShuffle(info, holder) >> (8u * k + 5u)) & 3u;
                if has {
                    gathered = 0x80000000u | at | (cb << 10u);
                    let ps = sources[source].v[2u * (group * CULL_PER_GROUP + at)];
                    tally_all(0u, cb, ps, &casc0, &casc1, &casc2, &casc3, &cmembers, &cranks);
                }
            }
        }
    }
    // The lanes below, and the whole subgroup; the first lane reserves the subgroup's runs.
    let below = subgroupExclusiveAdd(mine);
    let total = subgroupAdd(mine);
    let leader = lane == subgroupBroadcastFirst(lane);
    var base = 0u;
    if leader {
        for (var l = 0u; l < LOD_CULLED; l = l + 1u) {
            let n = field(total, l);
            if n > 0u {
                base |= atomicAdd(&wg_count[l], n) << (FIELD * l);
            }
        }
    }
    base = subgroupBroadcastFirst(base);
    // The cascades' runs: a scan alike, four cascades a vector, and the reservations shared
    // among the lanes (reserve_cascades; push constants: a uniform branch). The
    // second phase culls no cascade (cascade_band): its counts are zero, nothing to scan; nor
    // does a subgroup none of whose instances is in a cascade (a vote, uniform in the
    // subgroup: instances stored by tile are near each other).
    var cbelow = vec4<u32>(0u);
    var cbase = vec4<u32>(0u);
    if CULL_FULL && pc.views > 1u && pc.phase != PHASE_SECOND && subgroupAny(cmembers != 0u) {
        let counts = vec4<u32>(casc0, casc1, casc2, casc3);
        cbelow = subgroupExclusiveAdd(counts);
        let ctotal = subgroupAdd(counts);
        cbase = reserve_cascades(ctotal, subgroupExclusiveAdd(1u), subgroupAdd(1u));
    }
    // Hidden instances: only counted (push constants: a uniform branch).
    if CULL_FULL && CULL_OCCLUSION && pc.phase == PHASE_SECOND {
        let htotal = subgroupAdd(hid);
        if leader {
            for (var l = 0u; l < LOD_CULLED; l = l + 1u) {
                let n = field(htotal, l);
                if n > 0u {
                    atomicAdd(&wg_hidden[l], n);
                }
            }
        }
    }
    if invalid > 0u {
        atomicAdd(&wg_count[LOD_INVALID], invalid);
    }
    workgroupBarrier();
    if t < 5u && t != LOD_CULLED {
        let n = atomicLoad(&wg_count[t]);
        var b = 0u;
        if n > 0u {
            b = atomicAdd(&counters[select(t, COUNTER_INVALID, t == LOD_INVALID)], n);
        }
        wg_base[t] = b;
    }
    if CULL_FULL && t >= 8u && t < 20u && (t - 8u) / 3u + 1u < pc.views {
        let n = atomicLoad(&wg_casc[t - 8u]);
        var b = 0u;
        if n > 0u {
            b = atomicAdd(&counters[((t - 8u) / 3u + 1u) * COUNTERS + (t - 8u) % 3u], n);
        }
        wg_casc_base[t - 8u] = b;
    }
    if CULL_FULL && CULL_OCCLUSION && pc.phase == PHASE_SECOND && t >= 32u && t < 35u {
        let n = atomicLoad(&wg_hidden[t - 32u]);
        if n > 0u {
            atomicAdd(&counters[COUNTER_HIDDEN + t - 32u], n);
        }
    }
    workgroupBarrier();
    for (var k = 0u; k < CULL_PER_THREAD; k = k + 1u) {
        let byte = info >> (8u * k);
        let lod = byte & 7u;
        let camera = lod < LOD_CULLED;
        let shadow = CULL_FULL && ((cmembers >> (4u * k)) & 15u) != 0u;
        if !camera && !shadow {
            continue;
        }
        let j = first + k * 256u;
        let gi = src.y + j;
        // The record is read only where records are written, and once for every view that
        // takes it from this slot; where slot 0's cascades take a gathered candidate, its
        // tester reads that one's record again (twice where the camera draws it too).
        let other = CULL_FULL && k == 0u && gathered != 0u;
        var ps = vec4<f32>(0.0);
        var rest = vec4<f32>(0.0);
        if pc.caps.w != 0u && (camera || !other) {
            ps = sources[source].v[2u * j];
            rest = sources[source].v[2u * j + 1u];
        }
        if camera {
            let slot = wg_base[lod] + field(base, lod) + field(below, lod) + ((byte >> 3u) & 3u);
            if slot < pc.caps[lod] {
                put(list_base(pc.caps, 0u, lod) + slot, gi, ps, rest);
            }
        }
        if shadow {
            var cb = (byte >> 5u) & 3u;
            var sgi = gi;
            var sps = ps;
            var srest = rest;
            if other {
                let sj = group * CULL_PER_GROUP + (gathered & 1023u);
                cb = (gathered >> 10u) & 3u;
                sgi = src.y + sj;
                if pc.caps.w != 0u {
                    sps = sources[source].v[2u * sj];
                    srest = sources[source].v[2u * sj + 1u];
                }
            }
            emit_cascade(0u, k, cb, sgi, sps, srest, cbase.x, cbelow.x, cmembers, cranks);
            emit_cascade(1u, k, cb, sgi, sps, srest, cbase.y, cbelow.y, cmembers, cranks);
            emit_cascade(2u, k, cb, sgi, sps, srest, cbase.z, cbelow.z, cmembers, cranks);
            emit_cascade(3u, k, cb, sgi, sps, srest, cbase.w, cbelow.w, cmembers, cranks);
        }
    }
}
