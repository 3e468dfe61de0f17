//! `understory demo` under (synchronization) validation: the forest is culled and drawn on the
//! GPU, the PNG shows sky, ground and trees, `--lod-tint` shows all three bands, sun shadows
//! darken the ground and nothing else, a squeeze makes the controller give memory back, and
//! nothing leaks.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::Duration;

use understory_cli::demo::{DemoConfig, DemoReport, Flight, run};

fn config(dir: &Path, name: &str) -> DemoConfig {
    DemoConfig {
        instances: 30_000,
        frames: 40,
        width: 320,
        height: 180,
        png: Some(dir.join(name)),
        progress: false,
        stats_interval: Duration::ZERO,
        ..Default::default()
    }
}

fn temp_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("understory-demo-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// RGBA8 pixels and width of a PNG.
fn read_png(path: &Path) -> (Vec<[u8; 4]>, usize) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgba);
    let px = buf[..info.buffer_size()]
        .chunks_exact(4)
        .map(|c| [c[0], c[1], c[2], c[3]])
        .collect();
    (px, info.width as usize)
}

fn check_clean(r: &DemoReport) {
    assert_eq!(r.leaks, 0, "leaks");
    assert_eq!(r.validation_messages, 0, "validation messages");
    assert!(r.validation, "validation was on");
    assert!(r.passed());
    assert_eq!(r.blank_frames, 0, "{}", r.budget_line());
    assert_eq!(r.over_budget_frames, 0, "{}", r.budget_line());
}

fn share(px: &[[u8; 4]], f: impl Fn(&[u8; 4]) -> bool) -> f64 {
    px.iter().filter(|p| f(p)).count() as f64 / px.len() as f64
}

#[test]
fn the_demo_draws_a_forest_and_returns_every_byte() {
    let Some(probe) = common::context("the_demo_draws_a_forest") else {
        return;
    };
    drop(probe);
    let dir = temp_dir("forest");
    let r = run(&common::options(), &config(&dir, "forest.png")).expect("demo");
    eprintln!("{r:?}");
    check_clean(&r);
    assert_eq!(r.frames, 40);
    assert!(r.uploads > 0 && r.patches > 0);
    assert!(
        r.peak_drawn.iter().all(|&n| n > 0),
        "the GPU drew every LOD: {:?}",
        r.peak_drawn
    );
    assert_eq!(r.overflow_frames, 0);
    assert_eq!(r.pngs.len(), 1);
    let (px, w) = read_png(&r.pngs[0]);
    assert_eq!(w, 320);
    let h = px.len() / w;
    let (top, bottom) = px.split_at(w * h / 4);
    let sky = |p: &[u8; 4]| p[2] > p[1] && p[1] > p[0] && p[2] > 180;
    let green = |p: &[u8; 4]| p[1] > p[0] && p[1] > p[2];
    assert!(share(top, sky) > 0.9, "the top quarter is sky");
    let bottom = &bottom[bottom.len() / 2..];
    assert!(share(bottom, green) > 0.9, "the bottom is trees and ground");
    // Trees are lit: the bottom has a spread of greens, not one flat colour.
    let mut greens: Vec<u8> = bottom.iter().filter(|p| green(p)).map(|p| p[1]).collect();
    greens.sort_unstable();
    greens.dedup();
    assert!(greens.len() > 20, "{} shades of green", greens.len());
    // Everything given back before shutdown: understory's own count (the estimate) is where it
    // started; the driver's (VK_EXT_memory_budget) may keep one-time memory, and is printed.
    let (start, after) = r.heap_usage_start_after;
    eprintln!(
        "heap usage ({}): start {start} B, after {after} B",
        r.budget_source
    );
    if r.budget_source == understory::gpu::budget::Source::Estimated {
        assert_eq!(after, start, "every byte back before shutdown");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Two-phase occlusion culling draws fewer trees and the same picture: every 5th frame of each
/// flight (over the canopy, and at eye height along the track) rendered with occlusion on and
/// off differs on at most 0.1% of the pixels. The census (`--census on`) agrees: the trees
/// that reach the image are the same number within 0.1%, and fewer than either run drew.
#[test]
fn occlusion_draws_fewer_trees_and_the_same_image() {
    let Some(probe) = common::context("occlusion_same_image") else {
        return;
    };
    drop(probe);
    let dir = temp_dir("occlusion");
    for flight in [Flight::Canopy, Flight::Ground] {
        let fly = |occlusion: bool, name: &str| {
            let r = run(
                &common::options(),
                &DemoConfig {
                    occlusion,
                    flight,
                    census: true,
                    frames: 30,
                    png_every: Some(5),
                    ..config(&dir, &format!("{flight:?}-{name}-{{frame}}.png"))
                },
            )
            .expect("demo");
            check_clean(&r);
            assert_eq!(r.overflow_frames, 0);
            assert_eq!(r.flight, flight);
            r
        };
        let off = fly(false, "off");
        let on = fly(true, "on");
        eprintln!(
            "{flight:?}: drawn over the flight: {} without occlusion, {} with",
            off.drawn_total, on.drawn_total
        );
        assert!(on.drawn_total < off.drawn_total, "occlusion hides trees");
        let (r_off, r_on) = (off.reached_total.unwrap(), on.reached_total.unwrap());
        eprintln!("{flight:?}: reached the image: {r_off} without occlusion, {r_on} with");
        assert!(r_off > 0 && r_off < off.drawn_total && r_on < on.drawn_total);
        assert!(
            r_off.abs_diff(r_on) as f64 <= 0.001 * r_off as f64,
            "the census differs: {r_off} vs {r_on}"
        );
        assert_eq!(on.pngs.len(), off.pngs.len());
        for (a, b) in off.pngs.iter().zip(&on.pngs) {
            let ((pa, _), (pb, _)) = (read_png(a), read_png(b));
            let differ = pa.iter().zip(&pb).filter(|(x, y)| x != y).count();
            let share = differ as f64 / pa.len() as f64;
            eprintln!(
                "{}: {differ} pixels differ ({:.4}%)",
                b.display(),
                share * 100.0
            );
            assert!(
                share <= 0.001,
                "{}: {:.4}% of the pixels differ",
                b.display(),
                share * 100.0
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Sun shadows: the same flight with shadows off and on. The camera's lists do not change,
/// every cascade drew casters, the sky is the same to the bit, nothing gets brighter, and the
/// ground between the trees is clearly darker. With occlusion culling too (cascades culled by
/// the first phase), the picture is the same.
#[test]
fn shadows_darken_the_ground_and_leave_the_sky_alone() {
    let Some(probe) = common::context("shadows_darken_the_ground") else {
        return;
    };
    drop(probe);
    let dir = temp_dir("shadows");
    let flight = |shadows: bool, occlusion: bool, name: &str| {
        let r = run(
            &common::options(),
            &DemoConfig {
                shadows,
                occlusion,
                shadow_map_px: 512,
                frames: 12,
                ..config(&dir, name)
            },
        )
        .expect("demo");
        eprintln!("shadows {shadows}: {r:?}");
        check_clean(&r);
        assert_eq!(r.overflow_frames, 0);
        r
    };
    let off = flight(false, false, "off.png");
    let on = flight(true, false, "on.png");
    let occluded = flight(true, true, "occluded.png");
    assert!(off.peak_drawn_cascades.is_empty());
    assert_eq!(
        on.peak_drawn, off.peak_drawn,
        "the camera's lists are the same"
    );
    assert_eq!(on.peak_drawn_cascades.len(), 4);
    for (c, drawn) in on.peak_drawn_cascades.iter().enumerate() {
        assert!(drawn.iter().sum::<u32>() > 0, "cascade {c} drew casters");
    }
    let ((po, w), (pn, _)) = (read_png(&off.pngs[0]), read_png(&on.pngs[0]));
    assert_eq!(po.len(), pn.len());
    let sky = |p: &[u8; 4]| p[2] > p[1] && p[1] > p[0] && p[2] > 180;
    let sky_px: Vec<usize> = (0..po.len()).filter(|&i| sky(&po[i])).collect();
    assert!(sky_px.len() > po.len() / 5, "{} sky pixels", sky_px.len());
    assert!(
        sky_px.iter().all(|&i| po[i] == pn[i]),
        "the sky is the same with shadows"
    );
    let luma =
        |p: &[u8; 4]| 0.3 * f64::from(p[0]) + 0.59 * f64::from(p[1]) + 0.11 * f64::from(p[2]);
    let brighter = (0..po.len())
        .filter(|&i| luma(&pn[i]) > luma(&po[i]) + 1.0)
        .count();
    assert!(
        brighter * 1000 <= po.len(),
        "{brighter} pixels are brighter with shadows"
    );
    // Ground pixels of the unshadowed image, in the lower half and not far in the fog: the
    // lit ground colour (74, 92, 48 at the sun's light, 0.90) faded towards the fog colour.
    let lit = [74.0 * 0.8997, 92.0 * 0.8997, 48.0 * 0.8997];
    let fog = [0.62 * 255.0, 0.74 * 255.0, 0.86 * 255.0];
    let ground = |p: &[u8; 4]| {
        let t = (f64::from(p[2]) - lit[2]) / (fog[2] - lit[2]);
        (0.0..0.5).contains(&t)
            && (0..2).all(|k| (f64::from(p[k]) - (lit[k] + (fog[k] - lit[k]) * t)).abs() < 4.0)
    };
    let ground_px: Vec<usize> = (po.len() / 2..po.len())
        .filter(|&i| ground(&po[i]))
        .collect();
    let mean = |px: &[[u8; 4]]| {
        ground_px.iter().map(|&i| luma(&px[i])).sum::<f64>() / ground_px.len().max(1) as f64
    };
    let shaded = ground_px
        .iter()
        .filter(|&&i| luma(&pn[i]) < luma(&po[i]) - 8.0)
        .count();
    eprintln!(
        "{} ground pixels of {} ({w} wide): mean luminance {:.1} without shadows, {:.1} with; {shaded} in shadow",
        ground_px.len(),
        po.len(),
        mean(&po),
        mean(&pn)
    );
    assert!(ground_px.len() > po.len() / 50, "ground is visible");
    assert!(
        shaded * 10 >= ground_px.len(),
        "at least a tenth of the ground is in shadow"
    );
    assert!(mean(&pn) < 0.93 * mean(&po), "the ground is darker");
    let (pc, _) = read_png(&occluded.pngs[0]);
    let differ = pn.iter().zip(&pc).filter(|(a, b)| a != b).count();
    eprintln!("with occlusion culling: {differ} pixels differ");
    assert!(
        differ * 1000 <= pn.len(),
        "{differ} pixels differ with occlusion"
    );
    assert_eq!(occluded.peak_drawn_cascades, on.peak_drawn_cascades);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn lod_tint_shows_all_three_bands() {
    let Some(probe) = common::context("lod_tint_shows_all_three_bands") else {
        return;
    };
    drop(probe);
    let dir = temp_dir("tint");
    let r = run(
        &common::options(),
        &DemoConfig {
            lod_tint: true,
            ..config(&dir, "tint.png")
        },
    )
    .expect("demo");
    check_clean(&r);
    let (px, _) = read_png(&r.pngs[0]);
    let red = share(&px, |p| p[0] > 110 && p[1] < 60 && p[2] < 60);
    let yellow = share(&px, |p| p[0] > 110 && p[1] > 90 && p[2] < 60);
    let blue = share(&px, |p| p[2] > 110 && p[0] < 60 && p[1] < 110);
    eprintln!("red {red:.3} yellow {yellow:.3} blue {blue:.3}");
    assert!(red > 0.01, "full detail (red)");
    assert!(yellow > 0.01, "medium (yellow)");
    assert!(blue > 0.001, "billboards (blue)");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_squeeze_makes_the_controller_give_memory_back() {
    let Some(probe) = common::context("a_squeeze_makes_the_controller") else {
        return;
    };
    drop(probe);
    let dir = temp_dir("squeeze");
    let r = run(
        &common::options(),
        &DemoConfig {
            frames: 120,
            squeeze: true,
            png: None,
            ..config(&dir, "unused.png")
        },
    )
    .expect("demo");
    eprintln!("{r:?}");
    check_clean(&r);
    eprintln!("{}", r.budget_line());
    assert!(r.min_quality < 1.0, "quality dropped: {}", r.min_quality);
    assert!(r.evictions > 0, "tiles were evicted");
    // Degrade, never blank: held inside the budget once settled, trees on screen every frame,
    // full quality soon after the cap comes back.
    assert_eq!(r.over_budget_frames, 0, "{}", r.budget_line());
    assert_eq!(r.blank_frames, 0, "{}", r.budget_line());
    let recovery = r.recovery_frames.expect("quality back at 1.00");
    assert!(recovery <= 60, "{}", r.budget_line());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_demo_input_is_a_typed_error() {
    let dir = temp_dir("bad");
    let base = config(&dir, "x.png");
    for bad in [
        DemoConfig {
            instances: 0,
            ..base.clone()
        },
        DemoConfig {
            width: 0,
            ..base.clone()
        },
        DemoConfig {
            png_every: Some(5),
            ..base.clone()
        },
        DemoConfig {
            instances: understory_cli::demo::MAX_INSTANCES + 1,
            ..base.clone()
        },
    ] {
        match run(&common::options(), &bad) {
            Err(understory::Error::InvalidInput(_)) => {}
            other => panic!("expected InvalidInput, got {other:?}"),
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The draw pass samples one atlas page: a species on another page is a typed error from
/// `prepare`, not a wrong texture.
#[test]
fn a_species_on_another_atlas_page_is_refused() {
    use ash::vk;
    use understory::gpu::cull::{Compaction, CullPass};
    use understory::gpu::draw::{DrawFrame, DrawPass};
    use understory::vegetation::{SpeciesDesc, Vegetation, VegetationConfig};
    let Some(ctx) = common::context("a_species_on_another_atlas_page") else {
        return;
    };
    if !ctx.features().dynamic_rendering {
        common::skip("a_species_on_another_atlas_page", "no dynamic rendering");
        common::finish(ctx, "atlas page");
        return;
    }
    let mut veg = Vegetation::new(
        &ctx,
        VegetationConfig {
            atlas_page_px: 64,
            ..Default::default()
        },
    )
    .unwrap();
    let texels = understory::gpu::draw::tree_billboard(32, 48, 1);
    for name in ["a", "b"] {
        veg.register_species(&SpeciesDesc {
            name,
            width: 32,
            height: 48,
            rgba8: &texels,
        })
        .unwrap();
    }
    let regions = veg.species_regions();
    assert_eq!(
        regions[1].map(|r| r.page),
        Some(1),
        "the second species needs page 1"
    );
    let draw = DrawPass::new(
        &ctx,
        vk::Format::R8G8B8A8_UNORM,
        vk::Format::D32_SFLOAT,
        veg.atlas_page(0).unwrap(),
        0,
    )
    .unwrap();
    let cull = CullPass::with_records(&ctx, Compaction::Atomic, 64, draw.lod_meshes()).unwrap();
    let constants = DrawFrame::new(
        glam::Mat4::IDENTITY,
        glam::Vec3::ZERO,
        100.0,
        [0.0; 3],
        false,
    );
    ctx.submit_and_wait(|frame, cmd| {
        // SAFETY: cmd is recording for `frame`, outside any rendering scope.
        let both = unsafe { draw.prepare(frame, cmd, &cull, &constants, &regions) };
        assert!(
            matches!(both, Err(understory::Error::Unsupported(_))),
            "{both:?}"
        );
        // SAFETY: as above.
        unsafe { draw.prepare(frame, cmd, &cull, &constants, &regions[..1]) }
    })
    .unwrap();
    drop((draw, cull, veg));
    common::finish(ctx, "atlas page");
}
