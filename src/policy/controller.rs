//! The budget controller (pure): from the heap's real numbers to the vegetation budget, and
//! the highest quality whose footprint fits it.
//!
//! The footprint is modelled, not waited for: every tile's bytes and distance are known on the
//! CPU, so the bytes that quality `q` needs are the bytes of the tiles within the draw distance
//! at `q` ([`Demand`]), plus what does not depend on it (atlas, block slack, the cache) and the
//! cull and draw outputs, which grow with what is drawn. The controller picks the highest `q`
//! whose projected footprint fits a target share of the budget (a search, not a fixed step), at
//! once when the footprint passes the high watermark, and after a short hold when it could go
//! up; inside the band between the two it holds, so a moving camera does not make quality
//! flicker. Driver out-of-memory is pressure too: the budget is held below what was held then.

use crate::policy::lod::LodBands;

/// Controller tunables.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct ControllerConfig {
    /// Vegetation never gets more than this: the one cap of everything understory holds on the
    /// GPU for vegetation (instances, atlas, cull and draw outputs).
    pub cap_bytes: u64,
    /// Share of what the heap's budget leaves after everyone else (`budget - foreign`) that
    /// vegetation may use.
    pub headroom_share: f64,
    /// Quality is chosen so that the projected footprint is at most the bytes that do not
    /// follow quality (atlas, block slack) plus this share of the rest of the budget.
    pub target: f64,
    /// Above the fixed bytes plus this share of the rest of the budget (projected or held),
    /// quality goes down at once.
    pub high_watermark: f64,
    /// Quality goes up only to a value at least this factor higher (or to 1), after
    /// `hold_frames` frames in which it could.
    pub up_step_min: f32,
    /// Lowest quality scale.
    pub min_quality: f32,
    /// Frames quality could go up before it does.
    pub hold_frames: u32,
    /// Frames a driver out-of-memory keeps the budget limited.
    pub oom_hold_frames: u32,
    /// After a driver out-of-memory the budget starts at what was held then and grows by this
    /// factor a frame (probing for what the driver can give; another refusal starts it
    /// again from what is held then).
    pub oom_regrow: f64,
    /// Quality goes up only after this many frames without a driver out-of-memory (so that
    /// refusals now and then do not make it saw up and down).
    pub oom_calm_frames: u32,
    /// The budget follows a fall at once, and a rise after it has lasted this many frames (a
    /// budget that flaps every frame does not make tiles come and go every frame).
    pub rise_hold_frames: u32,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            cap_bytes: 512 << 20,
            headroom_share: 0.5,
            target: 0.85,
            high_watermark: 0.95,
            up_step_min: 1.03,
            min_quality: 0.1,
            hold_frames: 8,
            oom_hold_frames: 240,
            oom_regrow: 1.05,
            oom_calm_frames: 30,
            rise_hold_frames: 4,
        }
    }
}

impl ControllerConfig {
    /// Whether the numbers make sense (target below the high watermark in 0..=1).
    pub fn is_valid(&self) -> bool {
        self.cap_bytes > 0
            && (0.0..=1.0).contains(&self.headroom_share)
            && 0.0 < self.target
            && self.target < self.high_watermark
            && self.high_watermark <= 1.0
            && self.up_step_min >= 1.0
            && self.up_step_min.is_finite()
            && 0.0 < self.min_quality
            && self.min_quality <= 1.0
            && self.hold_frames > 0
            && self.oom_regrow >= 1.0
            && self.oom_regrow.is_finite()
    }
}

/// One frame's numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetInput {
    /// The heap's budget (driver's or estimated).
    pub heap_budget: u64,
    /// The heap's usage (driver's or estimated).
    pub heap_usage: u64,
    /// Bytes understory holds in the heap, all categories.
    pub ours: u64,
    /// Bytes vegetation holds: blocks of the vegetation categories (retired-but-unfreed
    /// included).
    pub held: u64,
    /// Of `held`, bytes already retired and waiting for the GPU.
    pub pending: u64,
    /// Of `held`, bytes of the cull and draw outputs (they grow with what is drawn).
    pub outputs: u64,
    /// Of `held`, bytes of resident tiles' instances.
    pub resident: u64,
    /// Of `held`, bytes that go back without evicting a tile: shared blocks no allocation
    /// uses (relocation empties them) and released buffers kept for reuse (flushed before an
    /// upload is refused). Evictions do not count them, and uploads may use them.
    pub slack: u64,
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
    /// The projected footprint at `quality`.
    pub projected: u64,
    /// Bytes to evict now (farthest tiles first), beyond what is already pending: down to the
    /// high watermark.
    pub evict_bytes: u64,
    /// Of those, bytes beyond the budget itself: the nearest tile goes only if evicting
    /// everything else does not cover these (its minimum footprint does not fit).
    pub over_budget: u64,
    /// Bytes that may be uploaded this frame without passing the target.
    pub upload_bytes: u64,
    /// Bytes that may be uploaded without passing the budget itself: what the nearest tile
    /// may use when nothing nearer is resident (it stays drawn as long as its minimum
    /// footprint fits).
    pub room_bytes: u64,
    /// Whether a driver out-of-memory is holding the budget down.
    pub oom_limited: bool,
}

/// The bytes each tile would need, by distance: the footprint as a function of the draw
/// distance.
#[derive(Clone, Debug, Default)]
pub struct Demand {
    /// (distance, cumulative bytes of this and every nearer tile), sorted by distance.
    prefix: Vec<(f32, u64)>,
}

impl Demand {
    /// From each tile's distance (nearest point, metres) and bytes.
    pub fn new(tiles: impl IntoIterator<Item = (f32, u64)>) -> Self {
        let mut v: Vec<(f32, u64)> = tiles.into_iter().filter(|t| t.0.is_finite()).collect();
        v.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        let mut acc = 0u64;
        for t in &mut v {
            acc = acc.saturating_add(t.1);
            t.1 = acc;
        }
        Self { prefix: v }
    }

    /// Bytes of the tiles nearer than `distance`.
    pub fn within(&self, distance: f32) -> u64 {
        let n = self.prefix.partition_point(|t| t.0 < distance);
        if n == 0 { 0 } else { self.prefix[n - 1].1 }
    }

    /// The largest draw distance (up to `max`) at which the tiles nearer than it need at most
    /// `bytes`: the distance of the first tile that does not fit, or `max`.
    pub fn distance_for(&self, bytes: u64, max: f32) -> f32 {
        let n = self.prefix.partition_point(|t| t.1 <= bytes);
        self.prefix.get(n).map_or(max, |t| t.0.min(max))
    }

    /// Bytes of the nearest tile (what the minimum footprint needs).
    pub fn nearest(&self) -> u64 {
        self.prefix.first().map_or(0, |t| t.1)
    }
}

/// The controller's state.
#[derive(Clone, Debug)]
pub struct BudgetController {
    config: ControllerConfig,
    quality: f32,
    up_frames: u32,
    /// A driver out-of-memory: the budget is held at most this many bytes for `oom_frames`.
    oom_limit: u64,
    oom_frames: u32,
    frames_since_oom: u32,
    /// The budget in effect (0 before the first step), and frames the raw budget has been
    /// above it.
    budget: u64,
    rise_frames: u32,
}

impl BudgetController {
    /// Starts at full quality.
    pub fn new(config: ControllerConfig) -> Self {
        Self {
            config,
            quality: 1.0,
            up_frames: 0,
            oom_limit: u64::MAX,
            oom_frames: 0,
            frames_since_oom: u32::MAX,
            budget: 0,
            rise_frames: 0,
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

    /// The driver refused memory while vegetation held `held` bytes: the budget drops to that
    /// and grows back by `oom_regrow` a frame, for at most `oom_hold_frames` frames.
    pub fn out_of_memory(&mut self, held: u64) {
        self.oom_limit = self.oom_limit.min(held.max(1));
        self.oom_frames = self.config.oom_hold_frames;
        self.frames_since_oom = 0;
    }

    /// The vegetation budget for these numbers: `min(cap, share × (heap budget − foreign))`,
    /// and below a recent driver out-of-memory.
    pub fn budget_for(&self, input: &BudgetInput) -> u64 {
        self.free_budget(input).min(self.oom_limit).max(1)
    }

    /// The budget before a driver out-of-memory limits it.
    fn free_budget(&self, input: &BudgetInput) -> u64 {
        let foreign = input.heap_usage.saturating_sub(input.ours);
        let available = input.heap_budget.saturating_sub(foreign);
        let share = (available as f64 * self.config.headroom_share) as u64;
        share.min(self.config.cap_bytes).max(1)
    }

    /// The footprint projected for quality `q`: what does not depend on it, plus the tiles
    /// within the draw distance at `q` with their share of outputs.
    fn projected(&self, input: &BudgetInput, demand: &Demand, bands: &LodBands, q: f32) -> u64 {
        let (fixed, ratio) = self.model(input);
        let tiles = demand.within(bands.draw_distance(q));
        fixed.saturating_add((tiles as f64 * (1.0 + ratio)) as u64)
    }

    /// (bytes that do not follow quality, outputs per byte of resident instances).
    fn model(&self, input: &BudgetInput) -> (u64, f64) {
        let live = input.held.saturating_sub(input.pending + input.slack);
        let fixed = live.saturating_sub(input.resident + input.outputs);
        // Outputs follow what is drawn, which follows what is resident; their measured share
        // (bounded: right after start-up the lists are sized before anything is resident).
        let ratio = if input.resident > 0 {
            (input.outputs as f64 / input.resident as f64).min(1.0)
        } else {
            0.0
        };
        (fixed, ratio)
    }

    /// The highest quality in `[min_quality, 1]` whose projected footprint is at most `bytes`.
    fn quality_for(
        &self,
        input: &BudgetInput,
        demand: &Demand,
        bands: &LodBands,
        bytes: u64,
    ) -> f32 {
        let (fixed, ratio) = self.model(input);
        let for_tiles = (bytes.saturating_sub(fixed) as f64 / (1.0 + ratio)) as u64;
        let full = bands.draw_distance(1.0);
        let d = demand.distance_for(for_tiles, full);
        (d / full).clamp(self.config.min_quality, 1.0)
    }

    /// One frame: updates quality and says what to evict and upload.
    pub fn step(&mut self, input: &BudgetInput, demand: &Demand, bands: &LodBands) -> Decision {
        let c = self.config;
        let raw = self.free_budget(input);
        let free = if self.budget == 0 || raw <= self.budget {
            self.rise_frames = 0;
            raw
        } else {
            self.rise_frames += 1;
            if self.rise_frames >= c.rise_hold_frames {
                self.rise_frames = 0;
                raw
            } else {
                self.budget
            }
        };
        self.budget = free;
        let budget = free.min(self.oom_limit).max(1);
        self.frames_since_oom = self.frames_since_oom.saturating_add(1);
        // The watermarks apply to what quality moves: the bytes that do not follow it (the
        // atlas, block slack) take their share first, so a budget just above them still leaves
        // the nearest tiles their room.
        let (fixed, _) = self.model(input);
        let fixed = fixed.min(budget);
        let share = |s: f64| fixed + ((budget - fixed) as f64 * s) as u64;
        if self.oom_frames > 0 {
            self.oom_frames -= 1;
            self.oom_limit = if self.oom_frames == 0 {
                u64::MAX
            } else {
                ((self.oom_limit as f64 * c.oom_regrow) as u64).saturating_add(1)
            };
        }
        let target = share(c.target);
        let high = share(c.high_watermark);
        let fit = self.quality_for(input, demand, bands, target);
        let projected_now = self.projected(input, demand, bands, self.quality);
        if projected_now > high {
            // Down at once, to what fits the target: the margin to the high watermark keeps it
            // from coming straight back.
            self.quality = fit.min(self.quality);
            self.up_frames = 0;
        } else if self.frames_since_oom >= c.oom_calm_frames
            && (fit >= self.quality * c.up_step_min || (fit >= 1.0 && self.quality < 1.0))
        {
            self.up_frames += 1;
            if self.up_frames >= c.hold_frames {
                self.quality = fit;
                self.up_frames = 0;
            }
        } else {
            self.up_frames = 0;
        }
        // What evictions can act on: not the retired bytes (already going) nor the blocks'
        // unused bytes (relocation gives those back).
        let still_held = input.held.saturating_sub(input.pending + input.slack);
        Decision {
            budget,
            pressure: input.held as f64 / budget as f64,
            quality: self.quality,
            projected: self.projected(input, demand, bands, self.quality),
            evict_bytes: still_held.saturating_sub(high),
            over_budget: still_held.saturating_sub(budget),
            upload_bytes: target.saturating_sub(input.held.saturating_sub(input.slack)),
            room_bytes: budget.saturating_sub(input.held.saturating_sub(input.slack)),
            oom_limited: self.oom_limit != u64::MAX,
        }
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
            resident: held,
            ..Default::default()
        }
    }

    /// 400 tiles of 1 MiB, one every metre up to 400 m (the default billboard band): the
    /// footprint at quality q is about 400 q MiB.
    fn demand() -> Demand {
        Demand::new((0..400).map(|i| (i as f32, MIB)))
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
    fn demand_curve_answers_both_ways() {
        let d = Demand::new([(10.0, 5), (0.0, 3), (20.0, 7), (f32::NAN, 100)]);
        assert_eq!(d.within(0.0), 0);
        assert_eq!(d.within(0.5), 3);
        assert_eq!(d.within(10.5), 8);
        assert_eq!(d.within(1e9), 15, "NaN distances are ignored");
        assert_eq!(d.distance_for(2, 100.0), 0.0, "not even the nearest fits");
        assert_eq!(
            d.distance_for(8, 100.0),
            20.0,
            "everything before 20 m fits"
        );
        assert_eq!(d.distance_for(100, 50.0), 50.0);
        assert_eq!(d.nearest(), 3);
    }

    #[test]
    fn quality_goes_down_at_once_to_what_fits_and_up_after_a_hold() {
        let mut c = BudgetController::new(ControllerConfig::default());
        let bands = LodBands::default();
        // Budget 200 MiB (half of 400): at q = 1 the projection is 400 MiB, far over.
        let d = c.step(&input(400 * MIB, 0), &demand(), &bands);
        // Target 170 MiB: tiles nearer than 170 m, q = 170 / 400.
        assert!((d.quality - 170.0 / 400.0).abs() < 0.01, "{}", d.quality);
        assert!(d.projected <= 170 * MIB + MIB);
        // Held where it is while the projection stays between target and high.
        let q = d.quality;
        for _ in 0..50 {
            assert_eq!(
                c.step(&input(400 * MIB, 150 * MIB), &demand(), &bands)
                    .quality,
                q
            );
        }
        // Plenty of room again: the budget follows after `rise_hold_frames`, and quality is up
        // to 1 `hold_frames` frames after that could be seen.
        let cfg = ControllerConfig::default();
        let plenty = input(4000 * MIB, 150 * MIB);
        for _ in 0..cfg.rise_hold_frames - 1 + cfg.hold_frames - 1 {
            assert_eq!(c.step(&plenty, &demand(), &bands).quality, q);
        }
        assert_eq!(c.step(&plenty, &demand(), &bands).quality, 1.0);
    }

    #[test]
    fn an_out_of_memory_holds_the_budget_down_for_a_while() {
        let cfg = ControllerConfig::default();
        let mut c = BudgetController::new(cfg);
        let bands = LodBands::default();
        c.out_of_memory(100 * MIB);
        let d = c.step(&input(10_000 * MIB, 100 * MIB), &demand(), &bands);
        assert_eq!(d.budget, 100 * MIB);
        assert!(d.oom_limited && d.quality < 1.0);
        // It probes upward, 5% a frame.
        let d = c.step(&input(10_000 * MIB, 100 * MIB), &demand(), &bands);
        assert!(
            d.oom_limited && d.budget > 100 * MIB && d.budget < 106 * MIB,
            "{}",
            d.budget
        );
        // Another refusal starts again from what is held then.
        c.out_of_memory(80 * MIB);
        assert_eq!(
            c.step(&input(10_000 * MIB, 80 * MIB), &demand(), &bands)
                .budget,
            80 * MIB
        );
        for _ in 0..cfg.oom_hold_frames {
            c.step(&input(10_000 * MIB, 50 * MIB), &demand(), &bands);
        }
        let d = c.step(&input(10_000 * MIB, 50 * MIB), &demand(), &bands);
        assert_eq!(d.budget, 512 * MIB, "the limit lapsed");
        assert!(
            d.quality > 0.9,
            "quality went up once refusals stopped: {}",
            d.quality
        );
        assert!(!d.oom_limited);
    }

    #[test]
    fn a_budget_flapping_every_frame_holds_at_its_low() {
        let mut c = BudgetController::new(ControllerConfig::default());
        let bands = LodBands::default();
        let (low, high) = (input(100 * MIB, 40 * MIB), input(1000 * MIB, 40 * MIB));
        let mut budgets = Vec::new();
        let mut qualities = Vec::new();
        for f in 0..100 {
            let d = c.step(if f % 2 == 0 { &low } else { &high }, &demand(), &bands);
            budgets.push(d.budget);
            qualities.push(d.quality);
        }
        assert!(budgets.iter().all(|b| *b == 50 * MIB), "{budgets:?}");
        let changes = qualities.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(changes <= 1, "quality moved {changes} times");
    }

    #[test]
    fn driver_refusals_now_and_then_do_not_make_quality_saw() {
        let mut c = BudgetController::new(ControllerConfig::default());
        let bands = LodBands::default();
        let mut qualities = Vec::new();
        for f in 0..300 {
            if f % 20 == 0 {
                c.out_of_memory(150 * MIB);
            }
            qualities.push(
                c.step(&input(10_000 * MIB, 150 * MIB), &demand(), &bands)
                    .quality,
            );
        }
        let ups = qualities.windows(2).filter(|w| w[1] > w[0]).count();
        assert_eq!(ups, 0, "never up while refusals keep coming: {qualities:?}");
    }

    #[test]
    fn pending_bytes_are_not_evicted_twice() {
        let mut c = BudgetController::new(ControllerConfig::default());
        let d = c.step(
            &BudgetInput {
                pending: 100 * MIB,
                ..input(1000 * MIB, 500 * MIB)
            },
            &Demand::default(),
            &LodBands::default(),
        );
        // Budget 500, high 475; still held 400 < 475: nothing more to evict.
        assert_eq!(d.evict_bytes, 0);
    }

    proptest! {
        /// With constant inputs, quality changes at most twice (a step down to what fits, then
        /// at most one step up once held bytes follow), and never goes back and forth.
        #[test]
        fn no_flicker_with_constant_inputs(
            budget_mib in 1u64..4096,
            held_mib in 0u64..4096,
            frames in 1usize..400,
        ) {
            let mut c = BudgetController::new(ControllerConfig::default());
            let i = input(budget_mib * MIB, held_mib * MIB);
            let bands = LodBands::default();
            let mut changes = 0;
            let mut prev = c.quality();
            for _ in 0..frames {
                let q = c.step(&i, &demand(), &bands).quality;
                if q != prev {
                    changes += 1;
                }
                prev = q;
            }
            prop_assert!(changes <= 2, "{changes} changes");
        }
    }
}
