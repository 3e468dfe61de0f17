//! The pure policy modules together, with no GPU: the budget controller, residency and the
//! retire queue's frame latency, under random budget trajectories.

use proptest::prelude::*;
use understory::policy::category::Category;
use understory::policy::controller::{BudgetController, BudgetInput, ControllerConfig};
use understory::policy::lod::LodBands;
use understory::policy::residency::{self, ResidencyConfig, TileView};
use understory::policy::retire::RetireQueue;

const MIB: u64 = 1 << 20;
const FRAMES_IN_FLIGHT: u64 = 2;

struct Sim {
    tiles: Vec<TileView>,
    controller: BudgetController,
    queue: RetireQueue<u64>,
    frame: u64,
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
                    bytes,
                    resident: false,
                    culled_frames: 0,
                })
                .collect(),
            controller: BudgetController::new(ControllerConfig::default()),
            queue: RetireQueue::new(),
            frame: 0,
        }
    }

    fn held(&self) -> u64 {
        let resident: u64 = self
            .tiles
            .iter()
            .filter(|t| t.resident)
            .map(|t| t.bytes)
            .sum();
        resident + self.queue.pending_bytes().total()
    }

    /// One frame; returns (held after the frame, the budget it was held to).
    fn frame(&mut self, heap_budget: u64) -> (u64, u64) {
        self.frame += 1;
        // The GPU runs FRAMES_IN_FLIGHT behind.
        self.queue
            .collect(self.frame.saturating_sub(FRAMES_IN_FLIGHT));
        let held = self.held();
        let pending = self.queue.pending_bytes().total();
        let d = self.controller.step(&BudgetInput {
            heap_budget,
            heap_usage: held,
            ours: held,
            held,
            pending,
        });
        let plan = residency::plan(
            &self.tiles,
            &LodBands::default(),
            &d,
            &ResidencyConfig::default(),
        );
        for (id, _) in &plan.evict {
            let t = &mut self.tiles[*id as usize];
            t.resident = false;
            self.queue
                .retire(*id, self.frame, t.bytes, Category::Instances);
        }
        for id in &plan.upload {
            self.tiles[*id as usize].resident = true;
        }
        (self.held(), d.budget)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Under any budget trajectory, once settled (frames in flight + 2 frames after the last
    /// change), held bytes are within the budget.
    #[test]
    fn held_bytes_settle_under_any_budget(
        tiles in proptest::collection::vec((0f32..600.0, 1u64..(8 * MIB)), 1..300),
        steps in proptest::collection::vec((16u64..2048, 1usize..40), 1..12),
    ) {
        let mut sim = Sim::new(tiles);
        let settle = FRAMES_IN_FLIGHT as usize + 2;
        for (budget_mib, frames) in steps {
            for f in 0..frames + settle {
                let (held, budget) = sim.frame(budget_mib * MIB);
                if f >= settle {
                    prop_assert!(held <= budget, "frame {f} after a change: held {held} > budget {budget}");
                }
            }
        }
    }
}

#[test]
fn a_shrinking_then_recovering_budget_evicts_then_refills() {
    let tiles: Vec<(f32, u64)> = (0..200).map(|i| (i as f32 * 2.0, 2 * MIB)).collect();
    let mut sim = Sim::new(tiles);
    // Plenty: 2 GiB heap -> 512 MiB cap; 200 tiles x 2 MiB = 400 MiB, visible ones upload.
    for _ in 0..60 {
        sim.frame(2048 * MIB);
    }
    let full = sim.held();
    assert!(full > 100 * MIB, "tiles became resident: {full}");
    // The heap budget shrinks to a quarter.
    for _ in 0..10 {
        sim.frame(512 * MIB / 4);
    }
    let squeezed = sim.held();
    assert!(
        squeezed <= 64 * MIB,
        "held {squeezed} within the 64 MiB vegetation budget"
    );
    let q_low = sim.controller.quality();
    assert!(q_low < 1.0);
    // Back to plenty: quality and residency recover, slowly.
    for _ in 0..2000 {
        sim.frame(2048 * MIB);
    }
    assert!(sim.controller.quality() > q_low);
    assert!(sim.held() > squeezed);
}
