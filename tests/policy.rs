//! The pure policy modules together, with no GPU: the budget controller, residency and the
//! retire queue's frame latency, under random budget trajectories with churn. What a host sees:
//! held bytes settle under the budget, quality converges without oscillating, the nearest tile
//! stays drawn while it fits, and full quality returns within 60 frames of the pressure ending.

use proptest::prelude::*;
use understory::policy::category::Category;
use understory::policy::controller::{
    BudgetController, BudgetInput, ControllerConfig, Decision, Demand,
};
use understory::policy::lod::LodBands;
use understory::policy::residency::{self, ResidencyConfig, TileView};
use understory::policy::retire::RetireQueue;

const MIB: u64 = 1 << 20;
const FRAMES_IN_FLIGHT: u64 = 2;
/// Bytes that do not follow quality (the atlas).
const FIXED: u64 = MIB;
/// Frames after a budget change before held must be under it: the GPU's latency, then the
/// frees.
const SETTLE: usize = FRAMES_IN_FLIGHT as usize + 4;

struct Sim {
    tiles: Vec<TileView>,
    controller: BudgetController,
    queue: RetireQueue<u64>,
    frame: u64,
    bands: LodBands,
}

impl Sim {
    fn new(tiles: Vec<(f32, u64)>) -> Self {
        Self {
            tiles: tiles
                .into_iter()
                .enumerate()
                .map(|(i, (distance, bytes))| TileView {
                    id: i as u64,
                    distance,
                    rank: distance,
                    bytes,
                    ..Default::default()
                })
                .collect(),
            controller: BudgetController::new(ControllerConfig::default()),
            queue: RetireQueue::new(),
            frame: 0,
            bands: LodBands::default(),
        }
    }

    fn resident(&self) -> u64 {
        self.tiles
            .iter()
            .filter(|t| t.resident)
            .map(|t| t.bytes - t.missing)
            .sum()
    }

    fn held(&self) -> u64 {
        FIXED + self.resident() + self.queue.pending_bytes().total()
    }

    /// A patch respawned into tile `i`: resident tiles need its bytes uploaded (counted first).
    fn respawn(&mut self, i: usize, bytes: u64) {
        if let Some(t) = self.tiles.get_mut(i) {
            t.bytes += bytes;
            if t.resident {
                t.missing += bytes;
            }
        }
    }

    /// One frame under a vegetation cap of `cap` bytes (a plentiful heap).
    fn frame(&mut self, cap: u64) -> Decision {
        self.frame += 1;
        // The GPU runs FRAMES_IN_FLIGHT behind.
        self.queue
            .collect(self.frame.saturating_sub(FRAMES_IN_FLIGHT));
        self.controller.set_cap(cap);
        let held = self.held();
        let input = BudgetInput {
            heap_budget: 1 << 40,
            heap_usage: held,
            ours: held,
            held,
            pending: self.queue.pending_bytes().total(),
            outputs: 0,
            resident: self.resident(),
            slack: 0,
        };
        let demand = Demand::new(self.tiles.iter().map(|t| (t.distance, t.bytes)));
        let d = self.controller.step(&input, &demand, &self.bands);
        let plan = residency::plan(&self.tiles, &self.bands, &d, &ResidencyConfig::default());
        for (id, _) in &plan.evict {
            let t = &mut self.tiles[*id as usize];
            let bytes = t.bytes - t.missing;
            t.resident = false;
            t.missing = 0;
            self.queue
                .retire(*id, self.frame, bytes, Category::Instances);
        }
        for id in &plan.upload {
            let t = &mut self.tiles[*id as usize];
            t.resident = true;
            t.missing = 0;
        }
        d
    }

    /// The nearest tile within the full draw distance (a farther one is never drawn), and
    /// whether it is resident.
    fn nearest(&self) -> (u64, bool) {
        let full = self.bands.draw_distance(1.0);
        self.tiles
            .iter()
            .filter(|t| t.distance < full)
            .min_by(|a, b| a.distance.total_cmp(&b.distance))
            .map_or((0, true), |t| (t.bytes, t.resident))
    }
}

fn world() -> impl Strategy<Value = Vec<(f32, u64)>> {
    proptest::collection::vec((0f32..500.0, (64 * 1024)..(4 * MIB)), 1..300)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Under any cap trajectory with churn, once settled, held bytes are within the budget; the
    /// nearest tile is resident whenever it fits with room to spare; quality never moves while
    /// the cap and the world stand still.
    #[test]
    fn held_bytes_settle_under_any_budget(
        tiles in world(),
        steps in proptest::collection::vec((2u64..512, 20usize..60), 1..10),
        churn in proptest::collection::vec((0usize..300, 1u64..(2 * MIB)), 0..40),
    ) {
        let mut sim = Sim::new(tiles);
        let mut churn = churn.into_iter();
        let mut last_cap = u64::MAX;
        for (cap_mib, frames) in steps {
            let cap = cap_mib * MIB;
            // Quality follows a fall at once; a rise once the budget took it (after
            // `rise_hold_frames`) and quality could go up for `hold_frames`.
            let c = ControllerConfig::default();
            let settle_up = if cap > last_cap {
                SETTLE.max((c.rise_hold_frames + c.hold_frames) as usize)
            } else {
                SETTLE
            };
            last_cap = cap;
            let mut qualities = Vec::new();
            for f in 0..frames {
                // Churn only in the first half: the second half must be still.
                if f < frames / 2 {
                    if let Some((i, bytes)) = churn.next() {
                        sim.respawn(i, bytes);
                    }
                }
                let d = sim.frame(cap);
                let held = sim.held();
                if f >= SETTLE {
                    prop_assert!(held <= d.budget, "frame {f} at cap {cap_mib} MiB: held {held} > budget {}", d.budget);
                    let (nearest, resident) = sim.nearest();
                    if f >= settle_up && FIXED + nearest * 2 <= d.budget / 2 {
                        prop_assert!(resident, "frame {f}: the nearest tile ({nearest} bytes) fits and is not resident");
                    }
                }
                if f >= frames / 2 + SETTLE {
                    qualities.push(d.quality);
                }
            }
            let changes = qualities.windows(2).filter(|w| w[0] != w[1]).count();
            prop_assert!(changes <= 1, "quality moved {changes} times with nothing changing: {qualities:?}");
        }
    }

    /// Whatever the squeeze did, quality is back at 1.00 within 60 frames of the cap returning
    /// (when everything fits at full quality), and it never passes under a squeeze what fits.
    #[test]
    fn full_quality_returns_within_60_frames(
        tiles in world(),
        squeeze_mib in 2u64..64,
        squeeze_frames in 5usize..200,
    ) {
        let mut sim = Sim::new(tiles);
        let plenty = 4096 * MIB;
        for _ in 0..30 {
            sim.frame(plenty);
        }
        for _ in 0..squeeze_frames {
            sim.frame(squeeze_mib * MIB);
        }
        let mut back = None;
        for f in 0..60 {
            if sim.frame(plenty).quality >= 1.0 {
                back = Some(f);
                break;
            }
        }
        prop_assert!(back.is_some(), "quality {} 60 frames after the squeeze", sim.controller.quality());
    }
}

#[test]
fn a_squeeze_degrades_then_recovers_quickly() {
    let tiles: Vec<(f32, u64)> = (0..200).map(|i| (i as f32 * 2.0, 2 * MIB)).collect();
    let mut sim = Sim::new(tiles);
    for _ in 0..60 {
        sim.frame(512 * MIB);
    }
    let full = sim.held();
    assert!(full > 100 * MIB, "tiles became resident: {full}");
    assert_eq!(sim.controller.quality(), 1.0);
    // The cap falls to 64 MiB: quality settles at what fits, not at the floor.
    let mut q = 0.0;
    for _ in 0..20 {
        q = sim.frame(64 * MIB).quality;
    }
    let squeezed = sim.held();
    assert!(
        squeezed <= 64 * MIB,
        "held {squeezed} within the 64 MiB budget"
    );
    assert!(
        (0.1..0.4).contains(&q),
        "quality {q}: 64 MiB holds about 27 of 200 tiles 2 m apart"
    );
    assert!(q > ControllerConfig::default().min_quality, "not the floor");
    let (_, nearest_resident) = sim.nearest();
    assert!(nearest_resident, "the nearest tile stays drawn");
    // Back to plenty: full quality within 60 frames, and the tiles come back.
    let mut frames = 0;
    while sim.frame(512 * MIB).quality < 1.0 {
        frames += 1;
        assert!(frames < 60, "recovery took more than 60 frames");
    }
    for _ in 0..30 {
        sim.frame(512 * MIB);
    }
    assert!(sim.held() > squeezed * 4);
}
