//! The vegetation world on the CPU: the quadtree of tiles, instance records, atlas packing.

pub mod atlas;
pub mod instance;
pub mod quadtree;
