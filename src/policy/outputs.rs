//! Cull output sizing (pure): each LOD list (and its records) is sized from what was visible
//! lately, not from how many instances exist, so the outputs follow the budget down and up.
//!
//! The GPU counts every instance it appends, kept or not, so one read-back frame tells the real
//! demand: a list that passes most of its room grows at once to half again that demand; one
//! whose peak over a window of frames would fill less than half of it shrinks to half again
//! that peak. Between the two it stays, so a turning camera does not reallocate every frame.
//! Under budget pressure the window is a few frames and any real saving counts: the lists
//! follow quality down at once instead of holding bytes the budget needs for tiles.

use std::collections::VecDeque;

/// Sizing tunables.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ListSizing {
    /// Fewest entries a list keeps.
    pub min: u32,
    /// Most entries a list may have (what one storage binding allows).
    pub max: u32,
    /// Room kept above the demand when a list is resized (1.5: half again).
    pub headroom: f32,
    /// A list grows when the demand passes this share of it.
    pub grow_above: f32,
    /// Frames of peaks a shrink looks at.
    pub window: usize,
    /// Frames of peaks a shrink looks at under budget pressure.
    pub pressure_window: usize,
}

impl ListSizing {
    /// Sizing between `min` and `max` entries with the default shares.
    pub fn new(min: u32, max: u32) -> Self {
        Self {
            min: min.min(max).max(1),
            max: max.max(1),
            headroom: 1.5,
            grow_above: 0.85,
            window: 120,
            pressure_window: 4,
        }
    }

    fn with_headroom(&self, demand: u32) -> u32 {
        ((demand as f64 * f64::from(self.headroom)).ceil() as u64)
            .clamp(u64::from(self.min), u64::from(self.max)) as u32
    }
}

/// The three lists' capacities and the recent demand.
#[derive(Clone, Debug)]
pub struct ListSizer {
    sizing: ListSizing,
    caps: [u32; 3],
    recent: VecDeque<[u32; 3]>,
}

impl ListSizer {
    /// Starts with `initial` entries per list (clamped to the sizing's range).
    pub fn new(sizing: ListSizing, initial: u32) -> Self {
        let c = initial.clamp(sizing.min, sizing.max);
        Self {
            sizing,
            caps: [c; 3],
            recent: VecDeque::new(),
        }
    }

    /// The capacities now.
    pub fn caps(&self) -> [u32; 3] {
        self.caps
    }

    /// The lists stayed at `caps` (a resize this sizer asked for did not take effect): the
    /// next demand is measured against them, so a resize still needed is asked for again.
    pub fn kept(&mut self, caps: [u32; 3]) {
        self.caps = caps;
    }

    /// A frame's demand: how many instances each LOD needs room for (appended, kept or not;
    /// with occlusion the hidden ones too), and whether the budget is under pressure. Returns
    /// the new capacities if any list should change.
    pub fn observe(&mut self, demand: [u32; 3], pressure: bool) -> Option<[u32; 3]> {
        let s = self.sizing;
        self.recent.push_back(demand);
        while self.recent.len() > s.window {
            self.recent.pop_front();
        }
        let mut next = self.caps;
        for l in 0..3 {
            let cap = self.caps[l];
            if demand[l] as f32 > cap as f32 * s.grow_above {
                next[l] = s.with_headroom(demand[l]).max(cap);
            } else {
                let window = if pressure {
                    s.pressure_window.clamp(1, s.window.max(1))
                } else {
                    s.window
                };
                if self.recent.len() >= window {
                    let peak = self.recent.iter().rev().take(window).map(|a| a[l]).max();
                    let want = s.with_headroom(peak.unwrap_or(0));
                    let worth = if pressure { cap - cap / 8 } else { cap / 2 };
                    if want < worth {
                        next[l] = want;
                    }
                }
            }
        }
        if next == self.caps {
            return None;
        }
        self.caps = next;
        // A resize starts a new window: the old peaks were measured against other lists.
        self.recent.clear();
        self.recent.push_back(demand);
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_at_once_past_most_of_the_room() {
        let mut s = ListSizer::new(ListSizing::new(256, 1_000_000), 1000);
        assert_eq!(
            s.observe([100, 800, 850], false),
            None,
            "850 is not past 85% of 1000"
        );
        assert_eq!(s.observe([100, 800, 4000], false), Some([1000, 1000, 6000]));
        assert_eq!(s.caps(), [1000, 1000, 6000]);
        assert_eq!(
            s.observe([5_000_000, 0, 0], false).unwrap()[0],
            1_000_000,
            "never past the max"
        );
    }

    #[test]
    fn shrinks_only_after_a_window_of_low_peaks() {
        let sizing = ListSizing {
            window: 10,
            ..ListSizing::new(256, 1_000_000)
        };
        let mut s = ListSizer::new(sizing, 100_000);
        for _ in 0..9 {
            assert_eq!(s.observe([1000, 1000, 50_000], false), None);
        }
        // The window is full: list 0 and 1 shrink to 1500, list 2 (peak 50k, 75k wanted, not
        // below half of 100k) stays.
        assert_eq!(
            s.observe([1000, 1000, 40_000], false),
            Some([1500, 1500, 100_000])
        );
        // A peak inside the next window keeps them from shrinking further.
        for _ in 0..20 {
            assert_eq!(s.observe([900, 900, 40_000], false), None);
        }
    }

    #[test]
    fn under_pressure_shrinks_within_a_few_frames() {
        let mut s = ListSizer::new(ListSizing::new(256, 1_000_000), 65_536);
        for _ in 0..3 {
            assert_eq!(s.observe([4000, 2000, 1000], true), None);
        }
        assert_eq!(
            s.observe([4000, 2000, 1000], true),
            Some([6000, 3000, 1500])
        );
        // Calm again: no more shrinking before the long window.
        for _ in 0..50 {
            assert_eq!(s.observe([1000, 1000, 1000], false), None);
        }
    }

    #[test]
    fn never_below_the_minimum() {
        let sizing = ListSizing {
            window: 2,
            ..ListSizing::new(256, 1000)
        };
        let mut s = ListSizer::new(sizing, 1000);
        s.observe([0, 0, 0], false);
        assert_eq!(s.observe([0, 0, 0], false), Some([256, 256, 256]));
        assert_eq!(ListSizer::new(sizing, 1).caps(), [256; 3]);
    }
}
