//! Level of detail by distance (pure). The GPU cull shader applies the same rule; both use
//! [`LodBands::select`]'s half-open bands so that an instance exactly on a band edge gets the same
//! level on both sides.

use glam::Vec3;

/// The levels of detail, nearest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[repr(u32)]
pub enum Lod {
    /// Full mesh.
    Full = 0,
    /// Reduced mesh.
    Medium = 1,
    /// Camera-facing quad sampling the atlas.
    Billboard = 2,
    /// Not drawn.
    Culled = 3,
}

impl Lod {
    /// Every level, in order.
    pub const ALL: [Lod; 4] = [Lod::Full, Lod::Medium, Lod::Billboard, Lod::Culled];
}

/// Distance bands in metres at quality 1.0.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct LodBands {
    /// Full detail below this distance.
    pub full_m: f32,
    /// Medium detail below this distance.
    pub medium_m: f32,
    /// Billboards below this distance; culled at or beyond it.
    pub billboard_m: f32,
}

impl Default for LodBands {
    fn default() -> Self {
        Self {
            full_m: 50.0,
            medium_m: 150.0,
            billboard_m: 400.0,
        }
    }
}

impl LodBands {
    /// Whether the bands are finite, positive and increasing.
    pub fn is_valid(&self) -> bool {
        self.full_m.is_finite()
            && self.medium_m.is_finite()
            && self.billboard_m.is_finite()
            && 0.0 < self.full_m
            && self.full_m <= self.medium_m
            && self.medium_m <= self.billboard_m
    }

    /// The band edges scaled by `quality` (0 < quality <= a few).
    pub fn scaled(&self, quality: f32) -> [f32; 3] {
        [
            self.full_m * quality,
            self.medium_m * quality,
            self.billboard_m * quality,
        ]
    }

    /// The level for `distance` metres at `quality`. Bands are half-open: `d < full` is Full,
    /// `full <= d < medium` is Medium, and so on. Comparisons use squared distances, as the
    /// shader does; NaN distances are culled.
    pub fn select_sq(&self, distance_sq: f32, quality: f32) -> Lod {
        let [f, m, b] = self.scaled(quality);
        if distance_sq < f * f {
            Lod::Full
        } else if distance_sq < m * m {
            Lod::Medium
        } else if distance_sq < b * b {
            Lod::Billboard
        } else {
            Lod::Culled
        }
    }

    /// [`LodBands::select_sq`] for a distance.
    pub fn select(&self, distance: f32, quality: f32) -> Lod {
        self.select_sq(distance * distance, quality)
    }

    /// The farthest distance anything is drawn at `quality`.
    pub fn draw_distance(&self, quality: f32) -> f32 {
        self.billboard_m * quality
    }
}

/// Yaw (radians about +Y) that turns a quad facing +Z at `instance` towards `camera`, ignoring
/// height: billboards stay upright.
pub fn billboard_yaw(instance: Vec3, camera: Vec3) -> f32 {
    let d = camera - instance;
    if d.x == 0.0 && d.z == 0.0 {
        return 0.0;
    }
    d.x.atan2(d.z)
}

/// Scales quality with frame time: the seed's adaptive LOD. Above the target frame time the
/// scale drops in proportion; below it, it recovers slowly. Optional second input to the budget
/// controller's quality.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrameTimeQuality {
    /// Target frame time in milliseconds.
    pub target_ms: f32,
    /// The current scale, 0.25..=1.
    pub scale: f32,
}

impl FrameTimeQuality {
    /// Starts at full quality.
    pub fn new(target_ms: f32) -> Self {
        Self {
            target_ms,
            scale: 1.0,
        }
    }

    /// Feeds one frame time; returns the new scale. Non-finite or non-positive times are ignored.
    pub fn step(&mut self, frame_ms: f32) -> f32 {
        if !(frame_ms.is_finite() && frame_ms > 0.0 && self.target_ms > 0.0) {
            return self.scale;
        }
        let ratio = self.target_ms / frame_ms;
        self.scale = if ratio < 0.95 {
            (self.scale * ratio.max(0.8)).max(0.25)
        } else if ratio > 1.1 {
            (self.scale * 1.02).min(1.0)
        } else {
            self.scale
        };
        self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_are_half_open_and_scale_with_quality() {
        let b = LodBands::default();
        assert_eq!(b.select(0.0, 1.0), Lod::Full);
        assert_eq!(b.select(49.99, 1.0), Lod::Full);
        assert_eq!(
            b.select(50.0, 1.0),
            Lod::Medium,
            "edge belongs to the farther band"
        );
        assert_eq!(b.select(150.0, 1.0), Lod::Billboard);
        assert_eq!(b.select(399.9, 1.0), Lod::Billboard);
        assert_eq!(b.select(400.0, 1.0), Lod::Culled);
        assert_eq!(b.select(30.0, 0.5), Lod::Medium);
        assert_eq!(b.select(f32::NAN, 1.0), Lod::Culled);
        assert_eq!(b.select(f32::INFINITY, 1.0), Lod::Culled);
        assert!(b.is_valid());
        assert!(
            !LodBands { full_m: 200.0, ..b }.is_valid(),
            "full beyond medium"
        );
        assert!(
            !LodBands {
                full_m: f32::NAN,
                ..b
            }
            .is_valid()
        );
    }

    #[test]
    fn billboards_face_the_camera_about_y() {
        let yaw = billboard_yaw(Vec3::ZERO, Vec3::new(0.0, 10.0, 5.0));
        assert!(yaw.abs() < 1e-6, "camera on +Z: no turn (height ignored)");
        let yaw = billboard_yaw(Vec3::ZERO, Vec3::new(5.0, 0.0, 0.0));
        assert!((yaw - std::f32::consts::FRAC_PI_2).abs() < 1e-6);
        // The rotated +Z normal points at the camera.
        let (i, c) = (Vec3::new(3.0, 0.0, -2.0), Vec3::new(-7.0, 4.0, 9.0));
        let yaw = billboard_yaw(i, c);
        let normal = Vec3::new(yaw.sin(), 0.0, yaw.cos());
        let to_cam = (c - i).with_y(0.0).normalize();
        assert!(normal.dot(to_cam) > 0.9999);
        assert_eq!(billboard_yaw(Vec3::ONE, Vec3::new(1.0, 9.0, 1.0)), 0.0);
    }

    #[test]
    fn frame_time_quality_drops_fast_and_recovers_slowly() {
        let mut q = FrameTimeQuality::new(16.0);
        let down = q.step(32.0);
        assert!((0.8..1.0).contains(&down));
        for _ in 0..100 {
            q.step(40.0);
        }
        assert_eq!(q.scale, 0.25, "floor");
        let mut steps = 0;
        while q.scale < 1.0 {
            q.step(8.0);
            steps += 1;
        }
        assert!(steps > 50, "recovery is slow: {steps} frames");
        assert_eq!(q.step(f32::NAN), 1.0);
    }
}
