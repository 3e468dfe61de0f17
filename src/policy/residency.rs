//! Residency (pure): which tiles' GPU memory to upload and which to evict this frame.

use crate::policy::controller::Decision;
use crate::policy::lod::{Lod, LodBands};

/// Residency tunables.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ResidencyConfig {
    /// A resident tile culled for more than this many frames releases its memory.
    pub release_after_culled_frames: u32,
    /// Most bytes uploaded in one frame (staging bandwidth, frame-time spikes).
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
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TileView {
    /// The tile's id.
    pub id: u64,
    /// Distance from the camera to the nearest point of the tile, metres.
    pub distance: f32,
    /// GPU bytes the tile holds (resident) or would need (not resident).
    pub bytes: u64,
    /// Whether its GPU memory is resident.
    pub resident: bool,
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
}

/// This frame's residency changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResidencyPlan {
    /// Tiles to upload, nearest first.
    pub upload: Vec<u64>,
    /// Tiles to evict, with the reason.
    pub evict: Vec<(u64, EvictReason)>,
    /// Bytes of `upload`.
    pub upload_bytes: u64,
    /// Bytes of `evict`.
    pub evict_bytes: u64,
    /// Tiles that wanted to be resident but did not fit the budget (uploads refused).
    pub refused: u32,
    /// Tiles that fit the budget but not this frame's upload limit (they come next frames).
    pub deferred: u32,
}

/// The tile's level at `quality` (tile distance = nearest point, so a tile is drawn if any part
/// of it may be).
pub fn tile_lod(bands: &LodBands, distance: f32, quality: f32) -> Lod {
    bands.select(distance, quality)
}

/// Plans evictions and uploads. Eviction for pressure takes the farthest resident tiles first
/// until `decision.evict_bytes` is covered; uploads take the nearest visible non-resident tiles
/// while they fit under `decision.upload_bytes` and the per-frame limit.
pub fn plan(
    tiles: &[TileView],
    bands: &LodBands,
    decision: &Decision,
    config: &ResidencyConfig,
) -> ResidencyPlan {
    let mut out = ResidencyPlan::default();
    let quality = decision.quality;
    let mut evicted = std::collections::HashSet::new();
    for t in tiles {
        if t.resident && t.culled_frames > config.release_after_culled_frames {
            out.evict.push((t.id, EvictReason::CulledTooLong));
            out.evict_bytes += t.bytes;
            evicted.insert(t.id);
        }
    }
    if decision.evict_bytes > out.evict_bytes {
        let mut resident: Vec<&TileView> = tiles
            .iter()
            .filter(|t| t.resident && !evicted.contains(&t.id))
            .collect();
        resident.sort_by(|a, b| b.distance.total_cmp(&a.distance));
        for t in resident {
            if out.evict_bytes >= decision.evict_bytes {
                break;
            }
            out.evict.push((t.id, EvictReason::Pressure));
            out.evict_bytes += t.bytes;
            evicted.insert(t.id);
        }
    }
    let evicting_for_pressure = out.evict.iter().any(|(_, r)| *r == EvictReason::Pressure);
    let mut wanted: Vec<&TileView> = tiles
        .iter()
        .filter(|t| !t.resident && tile_lod(bands, t.distance, quality) != Lod::Culled)
        .collect();
    wanted.sort_by(|a, b| a.distance.total_cmp(&b.distance));
    for t in wanted {
        // Never upload while evicting for pressure, never past the budget's room, and at most
        // the per-frame limit (the rest waits for later frames).
        if evicting_for_pressure || out.upload_bytes + t.bytes > decision.upload_bytes {
            out.refused += 1;
            continue;
        }
        if out.upload_bytes + t.bytes > config.max_upload_bytes_per_frame {
            out.deferred += 1;
            continue;
        }
        out.upload.push(t.id);
        out.upload_bytes += t.bytes;
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
            bytes,
            resident,
            culled_frames: 0,
        }
    }

    fn decision(evict: u64, upload: u64) -> Decision {
        Decision {
            budget: 1000,
            pressure: 0.5,
            quality: 1.0,
            evict_bytes: evict,
            upload_bytes: upload,
        }
    }

    #[test]
    fn evicts_farthest_first_until_covered() {
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
