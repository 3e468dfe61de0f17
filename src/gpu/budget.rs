//! Per-heap VRAM budgets: the driver's numbers from `VK_EXT_memory_budget` where it exists, an
//! honest, labelled estimate where it does not.
//!
//! The raw numbers come from a [`BudgetSource`] (a trait, so tests inject budgets that shrink and
//! grow on cue); [`resolve`] turns them into [`HeapBudget`]s (pure: clamping, estimating).

use ash::vk;

use crate::error::Result;
use crate::gpu::adapter::HeapInfo;

/// Without `VK_EXT_memory_budget` we assume this share of a heap may be used by one process.
pub const ESTIMATED_BUDGET_PERCENT: u64 = 80;

/// Where a heap's budget and usage came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// `VK_EXT_memory_budget`: the driver's `heapBudget` / `heapUsage`.
    Ext,
    /// No extension: budget = 80% of size, usage = bytes understory holds.
    Estimated,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Ext => "ext",
            Source::Estimated => "estimated",
        })
    }
}

/// Why a driver budget was replaced by the labelled estimate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Clamp {
    /// The driver reported a budget of 0.
    Zero,
    /// The driver reported a budget larger than the heap.
    OverSize,
}

/// The driver's numbers for one heap, as reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DriverNumbers {
    /// `heapBudget`.
    pub budget: u64,
    /// `heapUsage`.
    pub usage: u64,
}

/// One heap as a [`BudgetSource`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawHeap {
    /// Size and flags.
    pub info: HeapInfo,
    /// The driver's budget and usage, `None` without `VK_EXT_memory_budget`.
    pub driver: Option<DriverNumbers>,
}

/// One heap's budget, resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HeapBudget {
    /// Heap index.
    pub index: u32,
    /// Heap size in bytes.
    pub size: u64,
    /// `VK_MEMORY_HEAP_DEVICE_LOCAL_BIT`.
    pub device_local: bool,
    /// Bytes this process may use, clamped to `1..=size`.
    pub budget: u64,
    /// Bytes this process uses (driver's view with the extension; ours without).
    pub usage: u64,
    /// Where `budget` and `usage` came from.
    pub source: Source,
    /// Set when the driver's budget was unusable (0, or more than the heap) and replaced by
    /// the estimate ([`estimated_budget`], the same as without the extension).
    pub clamped: Option<Clamp>,
    /// Set when the driver's usage was impossible (more than the heap) and replaced by the
    /// bytes understory holds in the heap (the estimate's usage; foreign usage is then
    /// unknown and counts as 0).
    pub usage_estimated: bool,
    /// Bytes other users of the device hold in the heap as the budget source declared them
    /// ([`BudgetSource::declared_foreign`]), included in `usage`. Only heaps the driver gives
    /// no usage for take them (with `VK_EXT_memory_budget` the driver counts every user); 0
    /// otherwise.
    pub declared_foreign: u64,
}

impl HeapBudget {
    /// Bytes left under the budget (0 when over it).
    pub fn headroom(&self) -> u64 {
        self.budget.saturating_sub(self.usage)
    }
}

/// Something that reports raw per-heap numbers: the driver, or a test's script.
pub trait BudgetSource: Send {
    /// Reads the heaps now. Called once a frame; must be cheap.
    fn query(&mut self) -> Result<Vec<RawHeap>>;

    /// Told, right before each [`BudgetSource::query`], the bytes understory holds per heap
    /// now. A real driver counts them itself; a simulated one (a test playing another
    /// process's pressure) adds them to its `heapUsage` the same way. The default ignores
    /// them.
    fn observe_ours(&mut self, ours: &[u64]) {
        let _ = ours;
    }

    /// Bytes other users of the device (e.g. a host's own allocator) hold per heap, as the
    /// source knows them, read right after [`BudgetSource::query`]. Heaps without driver
    /// numbers count them as usage on top of understory's own bytes
    /// ([`HeapBudget::declared_foreign`]); heaps with driver numbers ignore them (the driver
    /// already counts every user). The default declares nothing.
    fn declared_foreign(&mut self) -> Option<Vec<u64>> {
        None
    }
}

/// Pure: raw numbers plus the bytes we hold per heap (`ours`, missing entries count as 0) into
/// budgets. A driver budget of 0 or above the heap size falls back to the estimate (80% of
/// the heap, never more optimistic than the estimate a driver without the extension gets); a
/// driver usage above the heap size falls back to `ours`. Both are labelled.
pub fn resolve(raw: &[RawHeap], ours: &[u64]) -> Vec<HeapBudget> {
    raw.iter()
        .enumerate()
        .map(|(i, h)| {
            let size = h.info.size;
            let ours = ours.get(i).copied().unwrap_or(0);
            let (budget, usage, source, clamped, usage_estimated) = match h.driver {
                Some(d) => {
                    let (budget, clamped) = if d.budget == 0 {
                        (estimated_budget(size), Some(Clamp::Zero))
                    } else if d.budget > size {
                        (estimated_budget(size), Some(Clamp::OverSize))
                    } else {
                        (d.budget, None)
                    };
                    let (usage, usage_estimated) = if d.usage > size {
                        (ours, true)
                    } else {
                        (d.usage, false)
                    };
                    (budget, usage, Source::Ext, clamped, usage_estimated)
                }
                None => (estimated_budget(size), ours, Source::Estimated, None, false),
            };
            HeapBudget {
                index: i as u32,
                size,
                device_local: h.info.device_local,
                budget,
                usage,
                source,
                clamped,
                usage_estimated,
                declared_foreign: 0,
            }
        })
        .collect()
}

/// 80% of the heap, never 0 for a non-empty heap.
pub fn estimated_budget(size: u64) -> u64 {
    ((size as u128 * ESTIMATED_BUDGET_PERCENT as u128 / 100) as u64).max(size.min(1))
}

/// The heaps of one device, refreshed once a frame. Logs each kind of clamp once per heap.
pub struct HeapBudgets {
    source: Box<dyn BudgetSource>,
    logged: Vec<[bool; 3]>,
    last: Vec<HeapBudget>,
}

impl HeapBudgets {
    /// Wraps a source; nothing is read until [`HeapBudgets::refresh`].
    pub fn new(source: Box<dyn BudgetSource>) -> Self {
        Self {
            source,
            logged: Vec::new(),
            last: Vec::new(),
        }
    }

    /// Reads the source and resolves. `ours[i]` is what understory holds in heap `i`.
    pub fn refresh(&mut self, ours: &[u64]) -> Result<&[HeapBudget]> {
        self.source.observe_ours(ours);
        let raw = self.source.query()?;
        let mut heaps = resolve(&raw, ours);
        if let Some(foreign) = self.source.declared_foreign() {
            for (h, r) in heaps.iter_mut().zip(&raw) {
                let f = foreign.get(h.index as usize).copied().unwrap_or(0);
                if r.driver.is_none() && f > 0 {
                    h.declared_foreign = f;
                    h.usage = h.usage.saturating_add(f);
                }
            }
        }
        if self.logged.len() < heaps.len() {
            self.logged.resize(heaps.len(), [false; 3]);
        }
        for (h, r) in heaps.iter().zip(&raw) {
            if let Some(clamp) = h.clamped {
                let slot = &mut self.logged[h.index as usize][clamp as usize];
                if !*slot {
                    *slot = true;
                    log::warn!(
                        "heap {}: driver reported budget {} bytes for a heap of {} bytes ({:?}); using the estimate, {} bytes",
                        h.index,
                        r.driver.map_or(0, |d| d.budget),
                        h.size,
                        clamp,
                        h.budget
                    );
                }
            }
            if h.usage_estimated {
                let slot = &mut self.logged[h.index as usize][2];
                if !*slot {
                    *slot = true;
                    log::warn!(
                        "heap {}: driver reported usage {} bytes for a heap of {} bytes; using understory's own bytes, {}",
                        h.index,
                        r.driver.map_or(0, |d| d.usage),
                        h.size,
                        h.usage
                    );
                }
            }
        }
        self.last = heaps;
        Ok(&self.last)
    }

    /// The result of the last refresh (empty before the first).
    pub fn last(&self) -> &[HeapBudget] {
        &self.last
    }

    /// How many clamp warnings have been logged so far (each kind, budget 0, budget over the
    /// size and usage over the size, once per heap).
    pub fn clamp_warnings_logged(&self) -> usize {
        self.logged.iter().flatten().filter(|b| **b).count()
    }
}

/// Reads the driver through `vkGetPhysicalDeviceMemoryProperties2`, chaining
/// `VkPhysicalDeviceMemoryBudgetPropertiesEXT` when the device supports `VK_EXT_memory_budget`.
pub struct DriverBudget {
    instance: ash::Instance,
    physical_device: vk::PhysicalDevice,
    has_ext: bool,
    /// Keeps whatever owns `instance` alive (a context's shared state), if anything.
    _keep: Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>,
}

impl DriverBudget {
    /// A source for one physical device.
    ///
    /// # Safety
    /// `physical_device` must belong to `instance` (Vulkan >= 1.1), which must outlive this
    /// source; `has_ext` must be true only if the device supports `VK_EXT_memory_budget`.
    pub unsafe fn new(
        instance: ash::Instance,
        physical_device: vk::PhysicalDevice,
        has_ext: bool,
    ) -> Self {
        Self {
            instance,
            physical_device,
            has_ext,
            _keep: None,
        }
    }

    /// The same source, holding `owner` (what keeps the instance alive) for as long as it
    /// lives.
    pub(crate) fn keeping(
        mut self,
        owner: std::sync::Arc<dyn std::any::Any + Send + Sync>,
    ) -> Self {
        self._keep = Some(owner);
        self
    }
}

impl BudgetSource for DriverBudget {
    fn query(&mut self) -> Result<Vec<RawHeap>> {
        let mut budget = vk::PhysicalDeviceMemoryBudgetPropertiesEXT::default();
        let mut props = vk::PhysicalDeviceMemoryProperties2::default();
        if self.has_ext {
            props = props.push_next(&mut budget);
        }
        // SAFETY: the physical device belongs to the live instance (constructor contract); the
        // budget struct is chained only when the device supports VK_EXT_memory_budget, whose
        // physical-device-level query needs no enabled device (VUID-VkPhysicalDeviceMemoryProperties2-pNext).
        unsafe {
            self.instance
                .get_physical_device_memory_properties2(self.physical_device, &mut props)
        };
        let mem = props.memory_properties;
        let count = (mem.memory_heap_count as usize).min(vk::MAX_MEMORY_HEAPS);
        let has_ext = self.has_ext;
        Ok((0..count)
            .map(|i| RawHeap {
                info: HeapInfo {
                    size: mem.memory_heaps[i].size,
                    device_local: mem.memory_heaps[i]
                        .flags
                        .contains(vk::MemoryHeapFlags::DEVICE_LOCAL),
                },
                driver: has_ext.then(|| DriverNumbers {
                    budget: budget.heap_budget[i],
                    usage: budget.heap_usage[i],
                }),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn heap(size: u64, driver: Option<(u64, u64)>) -> RawHeap {
        RawHeap {
            info: HeapInfo {
                size,
                device_local: true,
            },
            driver: driver.map(|(budget, usage)| DriverNumbers { budget, usage }),
        }
    }

    struct Script(Vec<Vec<RawHeap>>);
    impl BudgetSource for Script {
        fn query(&mut self) -> Result<Vec<RawHeap>> {
            Ok(if self.0.len() > 1 {
                self.0.remove(0)
            } else {
                self.0[0].clone()
            })
        }
    }

    struct Declaring(Vec<RawHeap>, Vec<u64>);
    impl BudgetSource for Declaring {
        fn query(&mut self) -> Result<Vec<RawHeap>> {
            Ok(self.0.clone())
        }
        fn declared_foreign(&mut self) -> Option<Vec<u64>> {
            Some(self.1.clone())
        }
    }

    #[test]
    fn declared_foreign_counts_only_where_the_driver_has_no_usage() {
        // Heap 0 without the extension takes the declared bytes on top of ours; heap 1 with it
        // keeps the driver's usage (which already counts every user); a missing entry is 0.
        let mut b = HeapBudgets::new(Box::new(Declaring(
            vec![
                heap(8 * GIB, None),
                heap(8 * GIB, Some((6 * GIB, GIB))),
                heap(GIB, None),
            ],
            vec![300, 500],
        )));
        let r = b.refresh(&[1000, 2000, 7]).unwrap();
        assert_eq!((r[0].usage, r[0].declared_foreign), (1300, 300));
        assert_eq!(r[0].source, Source::Estimated);
        assert_eq!((r[1].usage, r[1].declared_foreign), (GIB, 0));
        assert_eq!((r[2].usage, r[2].declared_foreign), (7, 0));
    }

    #[test]
    fn ext_numbers_pass_through() {
        let b = resolve(&[heap(8 * GIB, Some((6 * GIB, GIB)))], &[123]);
        assert_eq!(b[0].budget, 6 * GIB);
        assert_eq!(b[0].usage, GIB, "with the extension usage is the driver's");
        assert_eq!(b[0].source, Source::Ext);
        assert_eq!(b[0].clamped, None);
        assert_eq!(b[0].headroom(), 5 * GIB);
    }

    #[test]
    fn zero_and_oversized_budgets_fall_back_to_the_estimate() {
        let b = resolve(
            &[
                heap(4 * GIB, Some((0, 10))),
                heap(4 * GIB, Some((u64::MAX, 10))),
            ],
            &[],
        );
        let estimate = estimated_budget(4 * GIB);
        assert_eq!((b[0].budget, b[0].clamped), (estimate, Some(Clamp::Zero)));
        assert_eq!(
            (b[1].budget, b[1].clamped),
            (estimate, Some(Clamp::OverSize))
        );
        assert_eq!(b[0].usage, 10, "a good usage stays");
        let exact = resolve(&[heap(4 * GIB, Some((4 * GIB, 0)))], &[]);
        assert_eq!(exact[0].clamped, None, "budget == size is legal");
    }

    #[test]
    fn impossible_usage_falls_back_to_ours() {
        let b = resolve(&[heap(4 * GIB, Some((3 * GIB, u64::MAX)))], &[5 << 20]);
        assert_eq!(b[0].usage, 5 << 20);
        assert!(b[0].usage_estimated);
        assert_eq!(b[0].budget, 3 * GIB, "the budget is still the driver's");
        let fine = resolve(&[heap(4 * GIB, Some((3 * GIB, 4 * GIB)))], &[0]);
        assert!(!fine[0].usage_estimated, "usage == size is possible");
    }

    #[test]
    fn estimate_is_eighty_percent_and_usage_is_ours() {
        let b = resolve(&[heap(2 * GIB, None), heap(10, None)], &[7 << 20]);
        assert_eq!(b[0].budget, 2 * GIB * 8 / 10);
        assert_eq!(b[0].usage, 7 << 20);
        assert_eq!(b[0].source, Source::Estimated);
        assert_eq!(b[1].budget, 8);
        assert_eq!(b[1].usage, 0, "missing `ours` entries count as 0");
        assert_eq!(estimated_budget(1), 1, "never 0 for a non-empty heap");
        assert_eq!(estimated_budget(0), 0);
        assert_eq!(
            estimated_budget(u64::MAX),
            (u64::MAX as u128 * 8 / 10) as u64
        );
    }

    #[test]
    fn clamps_are_logged_once_per_heap_and_kind() {
        let bad = vec![heap(GIB, Some((0, 0))), heap(GIB, Some((2 * GIB, 0)))];
        let good = vec![heap(GIB, Some((GIB / 2, 0))), heap(GIB, Some((GIB / 2, 0)))];
        let mut hb = HeapBudgets::new(Box::new(Script(vec![bad.clone(), bad.clone(), good, bad])));
        hb.refresh(&[]).unwrap();
        assert_eq!(hb.clamp_warnings_logged(), 2);
        hb.refresh(&[]).unwrap();
        hb.refresh(&[]).unwrap();
        assert_eq!(hb.last()[0].clamped, None);
        hb.refresh(&[]).unwrap();
        assert_eq!(
            hb.clamp_warnings_logged(),
            2,
            "logged once, not every frame"
        );
        assert_eq!(hb.last()[1].clamped, Some(Clamp::OverSize));
    }

    #[test]
    fn injected_budgets_shrink_and_grow_on_cue() {
        let frames = [4, 3, 1, 1, 2, 4]
            .iter()
            .map(|g| vec![heap(4 * GIB, Some((g * GIB, GIB / 2)))])
            .collect();
        let mut hb = HeapBudgets::new(Box::new(Script(frames)));
        let seen: Vec<u64> = (0..6)
            .map(|_| hb.refresh(&[]).unwrap()[0].budget / GIB)
            .collect();
        assert_eq!(seen, vec![4, 3, 1, 1, 2, 4]);
    }
}
