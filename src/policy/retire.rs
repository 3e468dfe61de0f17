//! Retire ordering (pure): released resources wait, keyed by the timeline value of the last
//! submission that used them, until the GPU has passed that value.
//!
//! Ordered by value, so [`RetireQueue::collect`] costs O(freed + log n), not O(live).

use std::collections::BTreeMap;

use crate::policy::category::{Category, PerCategory};

/// One waiting resource and what it holds.
#[derive(Debug)]
pub struct Retired<T> {
    /// The resource (a GPU object, or a test's token).
    pub resource: T,
    /// Timeline value of the last submission that used it.
    pub last_used: u64,
    /// Bytes it holds.
    pub bytes: u64,
    /// Its category.
    pub category: Category,
}

/// Resources waiting for the GPU, ordered by timeline value.
#[derive(Debug)]
pub struct RetireQueue<T> {
    by_value: BTreeMap<u64, Vec<Retired<T>>>,
    pending_bytes: PerCategory<u64>,
    pending_count: PerCategory<u64>,
    freed_total: u64,
}

impl<T> Default for RetireQueue<T> {
    fn default() -> Self {
        Self {
            by_value: BTreeMap::new(),
            pending_bytes: PerCategory::default(),
            pending_count: PerCategory::default(),
            freed_total: 0,
        }
    }
}

impl<T> RetireQueue<T> {
    /// An empty queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `resource` until the GPU completes `last_used`.
    pub fn retire(&mut self, resource: T, last_used: u64, bytes: u64, category: Category) {
        self.pending_bytes[category] += bytes;
        self.pending_count[category] += 1;
        self.by_value.entry(last_used).or_default().push(Retired {
            resource,
            last_used,
            bytes,
            category,
        });
    }

    /// Removes and returns everything whose value is at or below `completed`, oldest first.
    pub fn collect(&mut self, completed: u64) -> Vec<Retired<T>> {
        let mut out = Vec::new();
        while let Some(entry) = self.by_value.first_entry() {
            if *entry.key() > completed {
                break;
            }
            out.extend(entry.remove());
        }
        self.account_freed(&out);
        out
    }

    /// Removes and returns everything (shutdown, after waiting for the GPU).
    pub fn drain(&mut self) -> Vec<Retired<T>> {
        let out: Vec<_> = std::mem::take(&mut self.by_value)
            .into_values()
            .flatten()
            .collect();
        self.account_freed(&out);
        out
    }

    fn account_freed(&mut self, out: &[Retired<T>]) {
        for r in out {
            self.pending_bytes[r.category] -= r.bytes;
            self.pending_count[r.category] -= 1;
        }
        self.freed_total += out.len() as u64;
    }

    /// Bytes waiting, per category.
    pub fn pending_bytes(&self) -> PerCategory<u64> {
        self.pending_bytes
    }

    /// Resources waiting, per category.
    pub fn pending_count(&self) -> PerCategory<u64> {
        self.pending_count
    }

    /// Resources waiting, in all.
    pub fn len(&self) -> usize {
        self.pending_count.iter().map(|(_, n)| *n as usize).sum()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.by_value.is_empty()
    }

    /// The smallest value anything waits for.
    pub fn oldest(&self) -> Option<u64> {
        self.by_value.keys().next().copied()
    }

    /// Resources handed out by `collect`/`drain` since creation.
    pub fn freed_total(&self) -> u64 {
        self.freed_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frees_in_value_order_and_only_when_completed() {
        let mut q = RetireQueue::new();
        q.retire("c", 3, 30, Category::Atlas);
        q.retire("a", 1, 10, Category::Instances);
        q.retire("b", 2, 20, Category::Instances);
        q.retire("b2", 2, 5, Category::Staging);
        assert_eq!(q.pending_bytes()[Category::Instances], 30);
        assert!(q.collect(0).is_empty());
        let got: Vec<_> = q.collect(2).into_iter().map(|r| r.resource).collect();
        assert_eq!(got, vec!["a", "b", "b2"]);
        assert_eq!(q.pending_bytes()[Category::Instances], 0);
        assert_eq!(q.pending_bytes()[Category::Atlas], 30);
        assert_eq!(q.oldest(), Some(3));
        assert_eq!(q.drain().len(), 1);
        assert!(q.is_empty());
        assert_eq!(q.freed_total(), 4);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Retire { bytes: u64, cat: usize, ahead: u64 },
        Submit,
        Complete(u64),
        Collect,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u64..1 << 20, 0usize..4, 0u64..3).prop_map(|(bytes, cat, ahead)| Op::Retire { bytes, cat, ahead }),
            2 => Just(Op::Submit),
            2 => (0u64..3).prop_map(Op::Complete),
            3 => Just(Op::Collect),
        ]
    }

    proptest! {
        /// Against a model: nothing is handed out before its value completes, everything is
        /// handed out once it has, and the byte counts equal the model's at every step.
        #[test]
        fn matches_a_simple_model(ops in proptest::collection::vec(op(), 1..200)) {
            let mut q = RetireQueue::new();
            // Model: (id, value, bytes, category) of everything pending.
            let mut model: Vec<(u64, u64, u64, Category)> = Vec::new();
            let (mut submitted, mut completed, mut next_id) = (0u64, 0u64, 0u64);
            for op in ops {
                match op {
                    Op::Retire { bytes, cat, ahead } => {
                        let value = submitted.saturating_sub(ahead);
                        let c = Category::ALL[cat];
                        q.retire(next_id, value, bytes, c);
                        model.push((next_id, value, bytes, c));
                        next_id += 1;
                    }
                    Op::Submit => submitted += 1,
                    Op::Complete(n) => completed = (completed + n).min(submitted),
                    Op::Collect => {
                        let freed = q.collect(completed);
                        for r in &freed {
                            prop_assert!(r.last_used <= completed, "freed {} before its value", r.resource);
                        }
                        let mut ids: Vec<u64> = freed.iter().map(|r| r.resource).collect();
                        ids.sort();
                        let mut want: Vec<u64> = model.iter().filter(|m| m.1 <= completed).map(|m| m.0).collect();
                        want.sort();
                        prop_assert_eq!(ids, want, "everything completed is freed");
                        model.retain(|m| m.1 > completed);
                    }
                }
                for c in Category::ALL {
                    let bytes: u64 = model.iter().filter(|m| m.3 == c).map(|m| m.2).sum();
                    prop_assert_eq!(q.pending_bytes()[c], bytes);
                    let n = model.iter().filter(|m| m.3 == c).count() as u64;
                    prop_assert_eq!(q.pending_count()[c], n);
                }
                prop_assert_eq!(q.len(), model.len());
            }
        }
    }
}
