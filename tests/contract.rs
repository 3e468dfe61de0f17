//! The host contract's soundness holes found in review, each as a regression test: what a
//! sequence of safe calls (or unsafe calls whose contract is honoured) must not do. Each test
//! fails on the code before its fix. Where a fix is by types, a compile-fail doctest next to
//! the type shows what no longer compiles.

mod common;

use understory::Error;

// ---- 8. atlas arithmetic ------------------------------------------------------------------

#[test]
fn atlas_padding_overflow_is_an_error_not_a_panic() {
    use understory::world::atlas::AtlasPacker;
    let r = std::panic::catch_unwind(|| AtlasPacker::new(64, 0x8000_0000).map(|_| ()));
    assert!(matches!(r, Ok(Err(Error::InvalidInput(_)))), "{r:?}");
    let r = std::panic::catch_unwind(|| {
        let mut p = AtlasPacker::new(64, 4).unwrap();
        p.allocate(u32::MAX, 1).map(|_| ())
    });
    assert!(matches!(r, Ok(Err(Error::InvalidInput(_)))), "{r:?}");
}
