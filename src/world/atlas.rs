//! Atlas packing on the CPU: billboard textures share square pages, packed with etagere.
//! Freeing a region returns its space; a page with no regions left is reported so its image can
//! be retired.

use etagere::{AllocId, AtlasAllocator, size2};

use crate::error::{Error, Result};

/// Where a texture lives in the atlas.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct AtlasRegion {
    /// Page index.
    pub page: u32,
    /// Texel rectangle of the texture itself (padding excluded): x, y, width, height.
    pub rect: [u32; 4],
    /// UV of the rectangle's min corner.
    pub uv_min: [f32; 2],
    /// UV of the rectangle's max corner.
    pub uv_max: [f32; 2],
    #[serde(skip)]
    id: AllocId,
}

struct Page {
    packer: AtlasAllocator,
    regions: u32,
}

/// The packer for all pages.
pub struct AtlasPacker {
    page_px: u32,
    padding_px: u32,
    pages: Vec<Option<Page>>,
}

/// What an allocation did to the pages.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Placed {
    /// The region.
    pub region: AtlasRegion,
    /// Whether a new page was opened for it (its image must be created).
    pub new_page: bool,
}

impl AtlasPacker {
    /// Pages of `page_px`² texels; every region gets `padding_px` of border so that mips and
    /// filtering do not bleed between neighbours. [`Error::InvalidInput`] unless
    /// `1 <= page_px <= 16384` and `2 * padding_px < page_px`.
    pub fn new(page_px: u32, padding_px: u32) -> Result<Self> {
        let both_sides = padding_px.checked_mul(2);
        if page_px == 0 || page_px > 16384 || both_sides.is_none_or(|p| p >= page_px) {
            return Err(Error::InvalidInput(format!(
                "atlas page {page_px} px with {padding_px} px padding"
            )));
        }
        Ok(Self {
            page_px,
            padding_px,
            pages: Vec::new(),
        })
    }

    /// Page side in texels.
    pub fn page_px(&self) -> u32 {
        self.page_px
    }

    /// Pages open now.
    pub fn live_pages(&self) -> usize {
        self.pages.iter().flatten().count()
    }

    /// Places a `width`×`height` texture, opening a page if none has room. A texture larger
    /// than a page (with padding) is an error.
    pub fn allocate(&mut self, width: u32, height: u32) -> Result<Placed> {
        let pad = self.padding_px;
        // `new` keeps 2 * pad below page_px; saturating all the same.
        let both_sides = pad.saturating_mul(2);
        let (w, h) = (
            width.saturating_add(both_sides),
            height.saturating_add(both_sides),
        );
        if width == 0 || height == 0 || w > self.page_px || h > self.page_px {
            return Err(Error::InvalidInput(format!(
                "atlas region {width}x{height} (+{pad} px padding) does not fit a {0}x{0} page",
                self.page_px
            )));
        }
        let want = size2(w as i32, h as i32);
        for (i, page) in self.pages.iter_mut().enumerate() {
            if let Some(p) = page {
                if let Some(a) = p.packer.allocate(want) {
                    p.regions += 1;
                    return Ok(Placed {
                        region: self.region(i as u32, a, width, height),
                        new_page: false,
                    });
                }
            }
        }
        let side = self.page_px as i32;
        let mut page = Page {
            packer: AtlasAllocator::new(size2(side, side)),
            regions: 1,
        };
        let a = page
            .packer
            .allocate(want)
            .ok_or_else(|| Error::InvalidInput("region does not fit an empty page".into()))?;
        let index = match self.pages.iter().position(Option::is_none) {
            Some(i) => {
                self.pages[i] = Some(page);
                i
            }
            None => {
                self.pages.push(Some(page));
                self.pages.len() - 1
            }
        };
        Ok(Placed {
            region: self.region(index as u32, a, width, height),
            new_page: true,
        })
    }

    fn region(&self, page: u32, a: etagere::Allocation, width: u32, height: u32) -> AtlasRegion {
        let x = a.rectangle.min.x as u32 + self.padding_px;
        let y = a.rectangle.min.y as u32 + self.padding_px;
        let s = self.page_px as f32;
        AtlasRegion {
            page,
            rect: [x, y, width, height],
            uv_min: [x as f32 / s, y as f32 / s],
            uv_max: [(x + width) as f32 / s, (y + height) as f32 / s],
            id: a.id,
        }
    }

    /// Returns a region's space. Returns `Some(page)` when that page is now empty (and closed).
    pub fn free(&mut self, region: &AtlasRegion) -> Result<Option<u32>> {
        let page = self
            .pages
            .get_mut(region.page as usize)
            .and_then(Option::as_mut)
            .ok_or_else(|| {
                Error::InvalidInput(format!("atlas page {} is not open", region.page))
            })?;
        page.packer.deallocate(region.id);
        page.regions -= 1;
        if page.regions == 0 {
            self.pages[region.page as usize] = None;
            return Ok(Some(region.page));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_frees_and_closes_empty_pages() {
        let mut p = AtlasPacker::new(256, 2).unwrap();
        let a = p.allocate(100, 100).unwrap();
        assert!(a.new_page);
        assert_eq!(a.region.page, 0);
        let b = p.allocate(100, 100).unwrap();
        assert!(!b.new_page);
        let c = p.allocate(250, 250).unwrap();
        assert!(c.new_page, "no room on page 0");
        assert_eq!(c.region.page, 1);
        let [x, y, w, h] = a.region.rect;
        assert!(x >= 2 && y >= 2 && (w, h) == (100, 100));
        assert!((a.region.uv_max[0] - (x + 100) as f32 / 256.0).abs() < 1e-6);
        assert_eq!(p.free(&a.region).unwrap(), None);
        assert_eq!(p.free(&b.region).unwrap(), Some(0), "page 0 emptied");
        assert_eq!(p.live_pages(), 1);
        let d = p.allocate(10, 10).unwrap();
        assert!(
            d.new_page && d.region.page == 0,
            "the closed slot is reused"
        );
    }

    #[test]
    fn too_large_or_empty_regions_are_errors() {
        let mut p = AtlasPacker::new(256, 2).unwrap();
        assert!(matches!(p.allocate(253, 10), Err(Error::InvalidInput(_))));
        assert!(matches!(p.allocate(0, 10), Err(Error::InvalidInput(_))));
        assert!(p.allocate(252, 252).is_ok());
        assert!(AtlasPacker::new(4, 2).is_err());
    }

    #[test]
    fn huge_padding_or_regions_are_errors_not_overflows() {
        assert!(matches!(
            AtlasPacker::new(64, 0x8000_0000),
            Err(Error::InvalidInput(_))
        ));
        assert!(matches!(
            AtlasPacker::new(16384, u32::MAX),
            Err(Error::InvalidInput(_))
        ));
        let mut p = AtlasPacker::new(64, 4).unwrap();
        assert!(matches!(
            p.allocate(u32::MAX, 1),
            Err(Error::InvalidInput(_))
        ));
        assert!(matches!(
            p.allocate(u32::MAX, u32::MAX),
            Err(Error::InvalidInput(_))
        ));
    }
}
