//! A short soak under validation: churn, camera motion, budget squeezes, the GPU cull every
//! frame; CSV and SVG written; nothing live or leaked afterwards.

#[path = "../../tests/common/mod.rs"]
mod common;

use understory_cli::soak::{SoakConfig, run};

#[test]
fn a_short_soak_returns_every_byte() {
    let Some(probe) = common::context("a_short_soak") else {
        return;
    };
    drop(probe);
    let dir = std::env::temp_dir().join(format!("understory-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = SoakConfig {
        frames: 300,
        patches: 3000,
        instances_per_patch: 32,
        churn_per_frame: 10,
        squeeze_period_frames: 100,
        // A quarter (8 MiB) holds the 1.4 MiB atlas page, the outputs and a 4 MiB block of
        // tiles (below that, 2 KiB patches would cost the driver's 64 KiB granularity each).
        cap_bytes: 32 << 20,
        csv: Some(dir.join("soak.csv")),
        svg: Some(dir.join("soak.svg")),
        ..Default::default()
    };
    let report = run(&common::options(), &config).expect("soak");
    eprintln!("{report:?}");
    assert_eq!(report.frames, 300);
    assert!(report.evictions > 0, "the squeezes evicted tiles");
    assert_eq!(report.live_allocations_after, 0);
    assert_eq!(report.leaks, 0);
    assert_eq!(report.validation_messages, 0);
    assert_eq!(
        report.over_budget_frames, 0,
        "held within the budget once settled"
    );
    assert!(report.passed());
    let csv = std::fs::read_to_string(dir.join("soak.csv")).unwrap();
    assert_eq!(csv.lines().count(), 301, "header + a row per frame");
    assert!(csv.starts_with("frame,ours_instances,"));
    let svg = std::fs::read_to_string(dir.join("soak.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("vegetation budget"));
    std::fs::remove_dir_all(&dir).ok();
}
