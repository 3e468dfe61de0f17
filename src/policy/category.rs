//! What understory's GPU memory is for. Caps, priorities and statistics are kept per category.

use std::ops::{Index, IndexMut};

/// What an allocation is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    /// Per-instance records of vegetation patches.
    Instances,
    /// Billboard texture atlas pages.
    Atlas,
    /// Upload staging.
    Staging,
    /// Everything else (cull outputs, scratch, tests).
    Other,
}

impl Category {
    /// Every category, in index order.
    pub const ALL: [Category; 4] = [
        Category::Instances,
        Category::Atlas,
        Category::Staging,
        Category::Other,
    ];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Category::Instances => "instances",
            Category::Atlas => "atlas",
            Category::Staging => "staging",
            Category::Other => "other",
        }
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One value per [`Category`], indexable by it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerCategory<T>(pub [T; 4]);

impl<T> PerCategory<T> {
    /// `(category, value)` pairs in index order.
    pub fn iter(&self) -> impl Iterator<Item = (Category, &T)> {
        Category::ALL.into_iter().zip(self.0.iter())
    }
}

impl PerCategory<u64> {
    /// Sum over categories.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

impl<T> Index<Category> for PerCategory<T> {
    type Output = T;
    fn index(&self, c: Category) -> &T {
        &self.0[c as usize]
    }
}

impl<T> IndexMut<Category> for PerCategory<T> {
    fn index_mut(&mut self, c: Category) -> &mut T {
        &mut self.0[c as usize]
    }
}

impl<T: serde::Serialize> serde::Serialize for PerCategory<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(4))?;
        for (c, v) in self.iter() {
            m.serialize_entry(c.name(), v)?;
        }
        m.end()
    }
}
