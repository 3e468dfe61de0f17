//! An implicit quadtree over a square world. Nodes are addressed by (level, x, y), so a node's id
//! is stable for as long as the world exists; leaves are the tiles that hold patches.

use glam::{Vec2, Vec3};

use crate::error::{Error, Result};

/// A node: level 0 is the root; level `depth` are the leaf tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct NodeId {
    /// Depth below the root.
    pub level: u8,
    /// Column at that level.
    pub x: u32,
    /// Row at that level (along world Z).
    pub y: u32,
}

impl NodeId {
    /// Packs into one integer (for maps and GPU tables).
    pub fn packed(self) -> u64 {
        (u64::from(self.level) << 56) | (u64::from(self.x) << 28) | u64::from(self.y)
    }

    /// The inverse of [`NodeId::packed`].
    pub fn from_packed(p: u64) -> NodeId {
        NodeId {
            level: (p >> 56) as u8,
            x: ((p >> 28) & 0x0fff_ffff) as u32,
            y: (p & 0x0fff_ffff) as u32,
        }
    }

    /// The parent node (the root is its own parent).
    pub fn parent(self) -> NodeId {
        if self.level == 0 {
            return self;
        }
        NodeId {
            level: self.level - 1,
            x: self.x / 2,
            y: self.y / 2,
        }
    }
}

/// The world's square area and its subdivision.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Quadtree {
    /// Lowest corner (x, z) of the world, metres.
    pub origin: Vec2,
    /// Side of the world, metres.
    pub size_m: f32,
    /// Levels below the root; leaves are `size_m / 2^depth` across.
    pub depth: u8,
}

impl Quadtree {
    /// A world `size_m` across from `origin`, with leaves at most `leaf_m` across.
    pub fn new(origin: Vec2, size_m: f32, leaf_m: f32) -> Result<Self> {
        if !(origin.is_finite() && size_m.is_finite() && leaf_m.is_finite())
            || size_m <= 0.0
            || leaf_m <= 0.0
            || leaf_m > size_m
        {
            return Err(Error::InvalidInput(format!(
                "world {size_m} m with {leaf_m} m tiles at {origin}"
            )));
        }
        let depth = (size_m / leaf_m).log2().ceil().max(0.0) as u32;
        if depth > 20 {
            return Err(Error::InvalidInput(format!(
                "{size_m} m / {leaf_m} m tiles is too deep ({depth} levels, at most 20)"
            )));
        }
        Ok(Self {
            origin,
            size_m,
            depth: depth as u8,
        })
    }

    /// Leaves per side.
    pub fn leaves_per_side(&self) -> u32 {
        1 << self.depth
    }

    /// Side of a leaf tile, metres.
    pub fn leaf_m(&self) -> f32 {
        self.size_m / self.leaves_per_side() as f32
    }

    /// The leaf tile containing world point `p` (x, z), or `None` outside the world.
    pub fn leaf_at(&self, p: Vec3) -> Option<NodeId> {
        let local = (Vec2::new(p.x, p.z) - self.origin) / self.leaf_m();
        let n = self.leaves_per_side() as f32;
        if !(local.x >= 0.0 && local.y >= 0.0 && local.x < n && local.y < n) {
            return None;
        }
        Some(NodeId {
            level: self.depth,
            x: local.x as u32,
            y: local.y as u32,
        })
    }

    /// A node's (min, max) corners in x, z.
    pub fn bounds(&self, node: NodeId) -> (Vec2, Vec2) {
        let side = self.size_m / (1u32 << node.level) as f32;
        let min = self.origin + Vec2::new(node.x as f32, node.y as f32) * side;
        (min, min + Vec2::splat(side))
    }

    /// Horizontal distance from `p` to the nearest point of the node (0 inside).
    pub fn distance(&self, node: NodeId, p: Vec3) -> f32 {
        let (min, max) = self.bounds(node);
        let q = Vec2::new(p.x, p.z);
        let d = (min - q).max(q - max).max(Vec2::ZERO);
        d.length()
    }

    /// Calls `visit` for every leaf within `radius` of `p` among those `occupied` says hold
    /// something, descending from the root and skipping empty or distant subtrees.
    pub fn leaves_within(
        &self,
        p: Vec3,
        radius: f32,
        occupied: &dyn Fn(NodeId) -> bool,
        visit: &mut dyn FnMut(NodeId, f32),
    ) {
        let mut stack = vec![NodeId {
            level: 0,
            x: 0,
            y: 0,
        }];
        while let Some(node) = stack.pop() {
            if !occupied(node) {
                continue;
            }
            let d = self.distance(node, p);
            if d > radius {
                continue;
            }
            if node.level == self.depth {
                visit(node, d);
                continue;
            }
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                stack.push(NodeId {
                    level: node.level + 1,
                    x: node.x * 2 + dx,
                    y: node.y * 2 + dy,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_are_stable_and_cover_the_world() {
        let q = Quadtree::new(Vec2::new(-2048.0, -2048.0), 4096.0, 32.0).unwrap();
        assert_eq!(q.depth, 7);
        assert_eq!(q.leaf_m(), 32.0);
        let a = q.leaf_at(Vec3::new(-2048.0, 5.0, -2048.0)).unwrap();
        assert_eq!((a.x, a.y), (0, 0));
        let b = q.leaf_at(Vec3::new(2047.9, 0.0, 0.5)).unwrap();
        assert_eq!((b.x, b.y), (127, 64));
        assert_eq!(
            q.leaf_at(Vec3::new(2048.0, 0.0, 0.0)),
            None,
            "max edge is outside"
        );
        assert_eq!(q.leaf_at(Vec3::new(f32::NAN, 0.0, 0.0)), None);
        assert_eq!(b.parent().level, 6);
        assert_ne!(a.packed(), b.packed());
        assert_eq!(NodeId::from_packed(b.packed()), b);
        let (min, max) = q.bounds(b);
        assert_eq!(max - min, Vec2::splat(32.0));
    }

    #[test]
    fn rejects_bad_worlds() {
        assert!(Quadtree::new(Vec2::ZERO, 0.0, 1.0).is_err());
        assert!(Quadtree::new(Vec2::ZERO, 10.0, 20.0).is_err());
        assert!(Quadtree::new(Vec2::ZERO, f32::INFINITY, 1.0).is_err());
        assert!(Quadtree::new(Vec2::ZERO, 1e9, 1e-3).is_err());
    }

    #[test]
    fn traversal_finds_exactly_the_occupied_leaves_in_range() {
        let q = Quadtree::new(Vec2::ZERO, 1024.0, 16.0).unwrap();
        let occupied_leaves: std::collections::HashSet<NodeId> = (0..64)
            .map(|i| {
                q.leaf_at(Vec3::new(i as f32 * 16.0 + 1.0, 0.0, 300.0))
                    .unwrap()
            })
            .collect();
        let mut ancestors = std::collections::HashSet::new();
        for l in &occupied_leaves {
            let mut n = *l;
            loop {
                ancestors.insert(n);
                if n.level == 0 {
                    break;
                }
                n = n.parent();
            }
        }
        let p = Vec3::new(500.0, 0.0, 300.0);
        let mut found = vec![];
        q.leaves_within(p, 100.0, &|n| ancestors.contains(&n), &mut |n, d| {
            found.push((n, d))
        });
        let brute: Vec<NodeId> = occupied_leaves
            .iter()
            .copied()
            .filter(|l| q.distance(*l, p) <= 100.0)
            .collect();
        assert_eq!(found.len(), brute.len());
        assert!(found.iter().all(|(n, d)| brute.contains(n) && *d <= 100.0));
    }
}
