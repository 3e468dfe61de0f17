//! The budget controller (pure): from the heap's real numbers to the vegetation budget, a
//! quality scale with hysteresis, how many bytes to evict, and how many may be uploaded.

/// Controller tunables.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ControllerConfig {
    /// Vegetation never gets more than this.
    pub cap_bytes: u64,
    /// Share of what the heap's budget leaves after everyone else (`budget - foreign`) that
    /// vegetation may use.
    pub headroom_share: f64,
    /// Above this pressure (held ÷ budget) quality steps down every frame.
    pub high_watermark: f64,
    /// Below this pressure for `hold_frames` frames, quality steps up.
    pub low_watermark: f64,
    /// Multiplier for a step down (fast).
    pub step_down: f32,
    /// Multiplier for a step up (slow).
    pub step_up: f32,
    /// Lowest quality scale.
    pub min_quality: f32,
    /// Frames of low pressure, and frames since the last step down, before stepping up.
    pub hold_frames: u32,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            cap_bytes: 512 << 20,
            headroom_share: 0.5,
            high_watermark: 0.90,
            low_watermark: 0.70,
            step_down: 0.8,
            step_up: 1.05,
            min_quality: 0.1,
            hold_frames: 30,
        }
    }
}

impl ControllerConfig {
    /// Whether the numbers make sense (watermarks ordered in 0..=1, steps on the right side of 1).
    pub fn is_valid(&self) -> bool {
        self.cap_bytes > 0
            && (0.0..=1.0).contains(&self.headroom_share)
            && 0.0 < self.low_watermark
            && self.low_watermark < self.high_watermark
            && self.high_watermark <= 1.0
            && 0.0 < self.step_down
            && self.step_down < 1.0
            && self.step_up > 1.0
            && 0.0 < self.min_quality
            && self.min_quality <= 1.0
            && self.hold_frames > 0
    }
}

/// One frame's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetInput {
    /// The heap's budget (driver's or estimated).
    pub heap_budget: u64,
    /// The heap's usage (driver's or estimated).
    pub heap_usage: u64,
    /// Bytes understory holds in the heap, all categories.
    pub ours: u64,
    /// Bytes vegetation holds (live, including retired-but-unfreed).
    pub held: u64,
    /// Of `held`, bytes already retired and waiting for the GPU.
    pub pending: u64,
}

/// What to do this frame.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Decision {
    /// The vegetation budget in bytes.
    pub budget: u64,
    /// Held ÷ budget.
    pub pressure: f64,
    /// LOD distance scale.
    pub quality: f32,
    /// Bytes to evict now (farthest tiles first), beyond what is already pending.
    pub evict_bytes: u64,
    /// Bytes that may be uploaded this frame without passing the high watermark.
    pub upload_bytes: u64,
}

/// Direction of the last quality change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    None,
    Down,
    Up,
}

/// The controller's state.
#[derive(Clone, Debug)]
pub struct BudgetController {
    config: ControllerConfig,
    quality: f32,
    low_frames: u32,
    frames_since_down: u32,
    last: Direction,
}

impl BudgetController {
    /// Starts at full quality.
    pub fn new(config: ControllerConfig) -> Self {
        Self {
            config,
            quality: 1.0,
            low_frames: 0,
            frames_since_down: u32::MAX,
            last: Direction::None,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// Changes the cap (the engine's own vegetation setting); takes effect at the next step.
    pub fn set_cap(&mut self, cap_bytes: u64) {
        self.config.cap_bytes = cap_bytes.max(1);
    }

    /// The current quality scale.
    pub fn quality(&self) -> f32 {
        self.quality
    }

    /// The vegetation budget for these numbers: `min(cap, share × (heap budget − foreign))`.
    pub fn budget_for(&self, input: &BudgetInput) -> u64 {
        let foreign = input.heap_usage.saturating_sub(input.ours);
        let available = input.heap_budget.saturating_sub(foreign);
        let share = (available as f64 * self.config.headroom_share) as u64;
        share.min(self.config.cap_bytes).max(1)
    }

    /// One frame: updates quality and says what to evict and upload.
    pub fn step(&mut self, input: &BudgetInput) -> Decision {
        let c = self.config;
        let budget = self.budget_for(input);
        let pressure = input.held as f64 / budget as f64;
        self.frames_since_down = self.frames_since_down.saturating_add(1);
        if pressure > c.high_watermark {
            self.low_frames = 0;
            let q = (self.quality * c.step_down).max(c.min_quality);
            if q < self.quality {
                self.quality = q;
                self.last = Direction::Down;
                self.frames_since_down = 0;
            }
        } else if pressure < c.low_watermark {
            self.low_frames = self.low_frames.saturating_add(1);
            if self.low_frames >= c.hold_frames
                && self.frames_since_down >= c.hold_frames
                && self.quality < 1.0
            {
                self.quality = (self.quality * c.step_up).min(1.0);
                self.last = Direction::Up;
                self.low_frames = 0;
            }
        } else {
            self.low_frames = 0;
        }
        let high = (budget as f64 * c.high_watermark) as u64;
        let still_held = input.held.saturating_sub(input.pending);
        Decision {
            budget,
            pressure,
            quality: self.quality,
            evict_bytes: still_held.saturating_sub(high),
            upload_bytes: high.saturating_sub(input.held),
        }
    }

    /// Whether the last change was a step down (for diagnostics).
    pub fn last_step_was_down(&self) -> bool {
        self.last == Direction::Down
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;

    fn input(budget: u64, held: u64) -> BudgetInput {
        BudgetInput {
            heap_budget: budget,
            heap_usage: held,
            ours: held,
            held,
            pending: 0,
        }
    }

    #[test]
    fn budget_is_the_smaller_of_cap_and_share_of_what_others_leave() {
        let c = BudgetController::new(ControllerConfig::default());
        assert_eq!(c.budget_for(&input(100_000 * MIB, 0)), 512 * MIB, "capped");
        assert_eq!(
            c.budget_for(&input(400 * MIB, 0)),
            200 * MIB,
            "half of what is left"
        );
        let with_foreign = BudgetInput {
            heap_usage: 300 * MIB,
            ours: 100 * MIB,
            ..input(400 * MIB, 100 * MIB)
        };
        assert_eq!(
            c.budget_for(&with_foreign),
            100 * MIB,
            "foreign 200 MiB leaves 200 MiB"
        );
        assert_eq!(c.budget_for(&input(0, 0)), 1, "never 0");
    }

    #[test]
    fn steps_down_fast_and_up_slowly() {
        let mut c = BudgetController::new(ControllerConfig::default());
        let d = c.step(&input(1000 * MIB, 480 * MIB)); // budget 500, pressure 0.96
        assert!(d.quality < 1.0);
        assert!(d.evict_bytes > 0);
        assert_eq!(d.upload_bytes, 0);
        let q = d.quality;
        let d = c.step(&input(1000 * MIB, 480 * MIB));
        assert!(
            d.quality < q,
            "keeps stepping down every frame while above high"
        );
        let low = input(1000 * MIB, 100 * MIB);
        let q = c.quality();
        for _ in 0..29 {
            assert_eq!(
                c.step(&low).quality,
                q,
                "holds while low for fewer than K frames"
            );
        }
        assert!(c.step(&low).quality > q);
        let mid = input(1000 * MIB, 400 * MIB); // pressure 0.8: between watermarks
        let q = c.quality();
        for _ in 0..100 {
            assert_eq!(
                c.step(&mid).quality,
                q,
                "no change inside the hysteresis band"
            );
        }
    }

    #[test]
    fn pending_bytes_are_not_evicted_twice() {
        let mut c = BudgetController::new(ControllerConfig::default());
        let d = c.step(&BudgetInput {
            pending: 100 * MIB,
            ..input(1000 * MIB, 500 * MIB)
        });
        // high = 450; still held 400 < 450: nothing more to evict.
        assert_eq!(d.evict_bytes, 0);
    }

    proptest! {
        /// With constant inputs, quality changes direction at most once per K frames (it only
        /// ever moves one way).
        #[test]
        fn no_flicker_with_constant_inputs(
            budget_mib in 1u64..4096,
            held_mib in 0u64..4096,
            frames in 1usize..400,
        ) {
            let cfg = ControllerConfig::default();
            let mut c = BudgetController::new(cfg);
            let i = input(budget_mib * MIB, held_mib * MIB);
            let mut changes = Vec::new();
            let mut prev = c.quality();
            let mut prev_dir = 0i8;
            for f in 0..frames {
                let q = c.step(&i).quality;
                let dir = (q > prev) as i8 - (q < prev) as i8;
                if dir != 0 && prev_dir != 0 && dir != prev_dir {
                    changes.push(f);
                }
                if dir != 0 { prev_dir = dir; }
                prev = q;
            }
            for w in changes.windows(2) {
                prop_assert!(w[1] - w[0] >= cfg.hold_frames as usize, "direction changes {changes:?}");
            }
            prop_assert!(changes.len() <= 1, "constant inputs: at most one direction: {changes:?}");
        }
    }
}
