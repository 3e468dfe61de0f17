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
    /// What the cull and draw passes write and read each frame: LOD lists, visible records,
    /// indirect arguments, counters, meshes, frame constants.
    Outputs,
    /// Upload staging (host memory).
    Staging,
    /// Everything else (the host's own buffers, scratch, tests).
    Other,
}

/// How many categories there are.
pub const CATEGORIES: usize = 5;

impl Category {
    /// Every category, in index order.
    pub const ALL: [Category; CATEGORIES] = [
        Category::Instances,
        Category::Atlas,
        Category::Outputs,
        Category::Staging,
        Category::Other,
    ];

    /// The categories the vegetation budget covers: everything understory holds on the GPU for
    /// vegetation (staging lives in host memory and is capped per frame instead).
    pub const VEGETATION: [Category; 3] = [Category::Instances, Category::Atlas, Category::Outputs];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Category::Instances => "instances",
            Category::Atlas => "atlas",
            Category::Outputs => "outputs",
            Category::Staging => "staging",
            Category::Other => "other",
        }
    }

    /// Whether the vegetation budget covers it.
    pub fn is_vegetation(self) -> bool {
        Category::VEGETATION.contains(&self)
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One value per [`Category`], indexable by it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerCategory<T>(pub [T; CATEGORIES]);

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
        let mut m = s.serialize_map(Some(CATEGORIES))?;
        for (c, v) in self.iter() {
            m.serialize_entry(c.name(), v)?;
        }
        m.end()
    }
}
