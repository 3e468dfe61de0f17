//! Residency (pure): which tiles' GPU memory to upload and which to evict this frame.
//!
//! Tiles are ranked by what they give the picture: the nearer, the more (a tile's screen size
//! falls with its distance), and a tile behind the camera less than one in front at the same
//! distance ([`TileView::rank`]). Uploads go nearest first, each counted against the budget before
//! it happens (a patch spawned into a resident tile too); when the next one does not fit,
//! resident tiles farther than it make room, those beyond the draw distance first, farthest
//! first. Under pressure the farthest go first and the nearest stays as long as it fits alone.

use crate::policy::controller::Decision;
use crate::policy::lod::{Lod, LodBands};

/// Residency tunables.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ResidencyConfig {
    /// A resident tile culled for more than this many frames releases its memory.
    pub release_after_culled_frames: u32,
    /// Most bytes uploaded in one frame: the staging (host memory) each frame may use.
    pub max_upload_bytes_per_frame: u64,
}

impl Default for ResidencyConfig {
    fn default() -> Self {
        Self {
            release_after_culled_frames: 120,
            max_upload_bytes_per_frame: 16 << 20,
        }
    }
}

/// A tile as residency sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct TileView {
    /// The tile's id.
    pub id: u64,
    /// Distance from the camera to the nearest point of the tile, metres (what its level of
    /// detail follows).
    pub distance: f32,
    /// What residency orders tiles by, metres: the distance, larger for a tile the camera
    /// faces away from. Lower ranks are uploaded first and evicted last.
    pub rank: f32,
    /// GPU bytes the tile holds (resident) or would need (not resident).
    pub bytes: u64,
    /// Whether its GPU memory is resident.
    pub resident: bool,
    /// Bytes a resident tile still needs for patches spawned into it since its upload.
    pub missing: u64,
    /// Consecutive frames the tile has been culled.
    pub culled_frames: u32,
}

/// Why a tile is evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EvictReason {
    /// Culled for longer than the configured number of frames.
    CulledTooLong,
    /// Over budget: farthest first.
    Pressure,
    /// Making room for a nearer tile.
    Swap,
}

/// This frame's residency changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResidencyPlan {
    /// Tiles to upload (all their missing patches), nearest first.
    pub upload: Vec<u64>,
    /// Tiles to evict, with the reason.
    pub evict: Vec<(u64, EvictReason)>,
    /// Bytes of `upload`.
    pub upload_bytes: u64,
    /// Bytes of `evict`.
    pub evict_bytes: u64,
    /// Tiles that wanted to be resident but did not fit the budget this frame (room is being
    /// made, or quality will come down).
    pub refused: u32,
    /// Tiles that fit the budget but not this frame's upload limit (they come next frames).
    pub deferred: u32,
}

/// The tile's level at `quality` (tile distance = nearest point, so a tile is drawn if any part
/// of it may be).
pub fn tile_lod(bands: &LodBands, distance: f32, quality: f32) -> Lod {
    bands.select(distance, quality)
}

/// Plans evictions and uploads for this frame's decision.
pub fn plan(
    tiles: &[TileView],
    bands: &LodBands,
    decision: &Decision,
    config: &ResidencyConfig,
) -> ResidencyPlan {
    let mut out = ResidencyPlan::default();
    let quality = decision.quality;
    let drawn = |t: &TileView| tile_lod(bands, t.distance, quality) != Lod::Culled;
    let mut evicted = std::collections::HashSet::new();
    let evict = |out: &mut ResidencyPlan,
                 evicted: &mut std::collections::HashSet<u64>,
                 t: &TileView,
                 why| {
        if evicted.insert(t.id) {
            out.evict.push((t.id, why));
            out.evict_bytes += t.bytes;
        }
    };
    for t in tiles {
        if t.resident && t.culled_frames > config.release_after_culled_frames {
            evict(&mut out, &mut evicted, t, EvictReason::CulledTooLong);
        }
    }
    // Resident tiles, farthest first: those not drawn at this quality before the drawn ones.
    let mut resident: Vec<&TileView> = tiles.iter().filter(|t| t.resident).collect();
    resident.sort_by(|a, b| drawn(a).cmp(&drawn(b)).then(b.rank.total_cmp(&a.rank)));
    let nearest = tiles
        .iter()
        .filter(|t| t.resident)
        .min_by(|a, b| a.rank.total_cmp(&b.rank))
        .map(|t| t.id);
    if decision.evict_bytes > out.evict_bytes {
        for t in &resident {
            if out.evict_bytes >= decision.evict_bytes {
                break;
            }
            // The nearest stays unless, with everything else gone, held is still over the
            // budget (it is the last one here: resident tiles are sorted farthest first).
            if Some(t.id) == nearest && out.evict_bytes >= decision.over_budget {
                continue;
            }
            evict(&mut out, &mut evicted, t, EvictReason::Pressure);
        }
    }
    let pressure = out.evict.iter().any(|(_, r)| *r == EvictReason::Pressure);
    let mut wanted: Vec<&TileView> = tiles
        .iter()
        .filter(|t| drawn(t) && (!t.resident || t.missing > 0) && !evicted.contains(&t.id))
        .collect();
    wanted.sort_by(|a, b| a.rank.total_cmp(&b.rank));
    // The best-ranked tile still resident after this frame's evictions.
    let nearest_kept = tiles
        .iter()
        .filter(|t| t.resident && !evicted.contains(&t.id))
        .map(|t| t.rank)
        .fold(f32::INFINITY, f32::min);
    let mut blocked = pressure;
    for t in wanted {
        let need = if t.resident { t.missing } else { t.bytes };
        if blocked {
            out.refused += 1;
            continue;
        }
        // Nothing nearer is resident: this tile may use the budget up to the budget itself,
        // not only up to the target (the nearest tile stays drawn while its footprint fits).
        let allowance = if !t.resident && t.rank < nearest_kept && out.upload.is_empty() {
            decision.upload_bytes.max(decision.room_bytes)
        } else {
            decision.upload_bytes
        };
        if out.upload_bytes + need > allowance {
            // Room for the nearest missing tile: resident tiles farther than it go (their bytes
            // are freed once the GPU is done with them; the upload follows then).
            let short = out.upload_bytes + need - allowance;
            let mut made = 0;
            for f in &resident {
                if made >= short {
                    break;
                }
                if f.rank > t.rank && !evicted.contains(&f.id) {
                    made += f.bytes;
                    evict(&mut out, &mut evicted, f, EvictReason::Swap);
                }
            }
            // Nearest first: nothing farther jumps the queue this frame.
            blocked = true;
            out.refused += 1;
            continue;
        }
        // Over this frame's upload limit: later frames, except the first tile of a frame (one
        // larger than the limit is staged a limit's worth a frame, nearest first).
        if !out.upload.is_empty() && out.upload_bytes + need > config.max_upload_bytes_per_frame {
            out.deferred += 1;
            continue;
        }
        out.upload.push(t.id);
        out.upload_bytes += need;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tile(id: u64, distance: f32, bytes: u64, resident: bool) -> TileView {
        TileView {
            id,
            distance,
            rank: distance,
            bytes,
            resident,
            ..Default::default()
        }
    }

    fn decision(evict: u64, upload: u64) -> Decision {
        Decision {
            budget: 1000,
            pressure: 0.5,
            quality: 1.0,
            projected: 0,
            evict_bytes: evict,
            over_budget: evict.saturating_sub(50),
            room_bytes: upload,
            upload_bytes: upload,
            oom_limited: false,
        }
    }

    #[test]
    fn evicts_farthest_first_until_covered_and_keeps_the_nearest() {
        let tiles = [
            tile(1, 10.0, 100, true),
            tile(2, 300.0, 100, true),
            tile(3, 200.0, 100, true),
            tile(4, 50.0, 100, false),
        ];
        let p = plan(
            &tiles,
            &LodBands::default(),
            &decision(150, 1000),
            &Default::default(),
        );
        assert_eq!(
            p.evict,
            vec![(2, EvictReason::Pressure), (3, EvictReason::Pressure)]
        );
        assert_eq!(p.evict_bytes, 200);
        assert!(
            p.upload.is_empty(),
            "no uploads while evicting for pressure"
        );
        assert_eq!(p.refused, 1);
        // More than everything but the nearest to reach the watermark, but the budget itself
        // is covered without it: the nearest stays.
        let p = plan(
            &tiles,
            &LodBands::default(),
            &decision(250, 0),
            &Default::default(),
        );
        assert!(!p.evict.iter().any(|(id, _)| *id == 1), "{:?}", p.evict);
        // Over the budget itself even with everything else gone: the nearest goes too.
        let p = plan(
            &tiles,
            &LodBands::default(),
            &decision(251, 0),
            &Default::default(),
        );
        assert!(p.evict.iter().any(|(id, _)| *id == 1));
    }

    #[test]
    fn uploads_nearest_visible_tiles_within_the_limit() {
        let tiles = [
            tile(1, 100.0, 60, false),
            tile(2, 10.0, 60, false),
            tile(3, 500.0, 60, false), // beyond the draw distance: culled
            tile(4, 20.0, 60, false),
        ];
        let p = plan(
            &tiles,
            &LodBands::default(),
            &decision(0, 130),
            &Default::default(),
        );
        assert_eq!(p.upload, vec![2, 4]);
        assert_eq!(p.upload_bytes, 120);
        assert_eq!(p.refused, 1);
        let small_frames = ResidencyConfig {
            max_upload_bytes_per_frame: 60,
            ..Default::default()
        };
        let p = plan(
            &tiles,
            &LodBands::default(),
            &decision(0, 1000),
            &small_frames,
        );
        assert_eq!(p.upload, vec![2]);
        assert_eq!(
            (p.refused, p.deferred),
            (0, 2),
            "over the frame limit: deferred, not refused"
        );
    }

    #[test]
    fn far_resident_tiles_make_room_for_nearer_missing_ones() {
        let tiles = [
            tile(1, 5.0, 100, false), // near, missing
            tile(2, 390.0, 60, true), // far, drawn
            tile(3, 450.0, 60, true), // beyond the draw distance
            tile(4, 2.0, 50, true),   // nearer than the missing one: stays
        ];
        let p = plan(
            &tiles,
            &LodBands::default(),
            &decision(0, 10),
            &Default::default(),
        );
        assert!(p.upload.is_empty(), "it does not fit yet");
        assert_eq!(
            p.evict,
            vec![(3, EvictReason::Swap), (2, EvictReason::Swap)],
            "undrawn first, then the farthest drawn"
        );
        assert_eq!(p.refused, 1);
    }

    #[test]
    fn a_patch_spawned_into_a_resident_tile_is_counted_before_it_is_uploaded() {
        let mut t = tile(1, 5.0, 1000, true);
        t.missing = 52;
        let p = plan(
            &[t],
            &LodBands::default(),
            &decision(0, 13),
            &Default::default(),
        );
        assert!(p.upload.is_empty(), "52 bytes do not fit in 13");
        let p = plan(
            &[t],
            &LodBands::default(),
            &decision(0, 52),
            &Default::default(),
        );
        assert_eq!((p.upload, p.upload_bytes), (vec![1], 52));
    }

    #[test]
    fn tiles_in_front_come_before_tiles_behind_at_the_same_distance() {
        let mut behind = tile(1, 20.0, 60, false);
        behind.rank = 20.0 * 4.0 + 128.0;
        let front = tile(2, 20.0, 60, false);
        let p = plan(
            &[behind, front],
            &LodBands::default(),
            &decision(0, 60),
            &Default::default(),
        );
        assert_eq!(p.upload, vec![2], "the one in front first");
        // Resident behind, missing in front, no room: the one behind makes room.
        behind.resident = true;
        let p = plan(
            &[behind, front],
            &LodBands::default(),
            &decision(0, 0),
            &Default::default(),
        );
        assert_eq!(p.evict, vec![(1, EvictReason::Swap)]);
    }

    #[test]
    fn the_nearest_tile_may_use_the_budget_past_the_target() {
        let t = tile(1, 5.0, 100, false);
        let mut d = decision(0, 80);
        d.room_bytes = 120;
        let p = plan(&[t], &LodBands::default(), &d, &Default::default());
        assert_eq!(
            p.upload,
            vec![1],
            "nothing nearer is resident: up to the budget"
        );
        let near = tile(2, 1.0, 10, true);
        let p = plan(&[t, near], &LodBands::default(), &d, &Default::default());
        assert!(
            p.upload.is_empty(),
            "a nearer tile is resident: the target holds"
        );
    }

    #[test]
    fn a_tile_larger_than_the_upload_limit_still_goes_first() {
        let small_frames = ResidencyConfig {
            max_upload_bytes_per_frame: 10,
            ..Default::default()
        };
        let tiles = [tile(1, 5.0, 100, false), tile(2, 9.0, 5, false)];
        let p = plan(
            &tiles,
            &LodBands::default(),
            &decision(0, 1000),
            &small_frames,
        );
        assert_eq!((p.upload, p.deferred), (vec![1], 1));
    }

    #[test]
    fn long_culled_tiles_release_their_memory() {
        let mut t = tile(7, 900.0, 10, true);
        t.culled_frames = 121;
        let p = plan(
            &[t],
            &LodBands::default(),
            &decision(0, 0),
            &Default::default(),
        );
        assert_eq!(p.evict, vec![(7, EvictReason::CulledTooLong)]);
        t.culled_frames = 120;
        let p = plan(
            &[t],
            &LodBands::default(),
            &decision(0, 0),
            &Default::default(),
        );
        assert!(p.evict.is_empty());
    }
}
