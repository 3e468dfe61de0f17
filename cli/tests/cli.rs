//! `understory budget` as a user runs it.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

/// The binary: cargo's build-time path, or (when the tests were copied elsewhere, as on the GPU
/// machine) the `understory` next to this test executable.
fn bin() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_understory"));
    if built.exists() {
        return built;
    }
    let exe = std::env::current_exe().expect("test executable path");
    exe.with_file_name("understory")
}

fn understory(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("UNDERSTORY_DEVICE")
        .output()
        .expect("run understory")
}

/// Whether a Vulkan device is there at all; loud skip otherwise.
fn have_vulkan(test: &str) -> bool {
    let out = understory(&["budget"]);
    if out.status.success() {
        return true;
    }
    common::skip(test, &String::from_utf8_lossy(&out.stderr));
    false
}

fn parse(stdout: &[u8]) -> serde_json::Value {
    serde_json::from_slice(stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(stdout)))
}

fn check_schema(doc: &serde_json::Value) {
    assert_eq!(doc["schema"], "understory.budget/1");
    let devices = doc["devices"].as_array().expect("devices array");
    assert!(!devices.is_empty());
    for d in devices {
        assert!(d["index"].is_u64(), "{d}");
        assert!(d["name"].is_string());
        assert!(
            ["discrete", "integrated", "virtual", "cpu", "other"]
                .contains(&d["type"].as_str().unwrap())
        );
        assert!(d["api_version"].as_str().unwrap().split('.').count() == 3);
        assert!(d["driver"].is_string());
        let ext = d["memory_budget_ext"].as_bool().expect("memory_budget_ext");
        let heaps = d["heaps"].as_array().expect("heaps");
        assert!(!heaps.is_empty());
        for h in heaps {
            for key in ["index", "size", "budget", "usage"] {
                assert!(h[key].is_u64(), "{key} in {h}");
            }
            assert!(h["device_local"].is_boolean());
            assert!(
                h.get("clamped").is_some(),
                "clamped present (null when not clamped)"
            );
            let size = h["size"].as_u64().unwrap();
            let budget = h["budget"].as_u64().unwrap();
            assert!(budget > 0 && budget <= size, "{h}");
            assert_eq!(h["source"], if ext { "ext" } else { "estimated" });
        }
    }
}

#[test]
fn json_parses_and_has_every_field() {
    if !have_vulkan("json_parses_and_has_every_field") {
        return;
    }
    let out = understory(&["budget", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_schema(&parse(&out.stdout));
}

#[test]
fn table_labels_its_source() {
    if !have_vulkan("table_labels_its_source") {
        return;
    }
    let out = understory(&["budget", "--device", "0"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("GPU 0:"), "{text}");
    assert!(text.contains("heap") && text.contains("budget") && text.contains("usage"));
    assert!(
        text.contains("VK_EXT_memory_budget") || text.contains("estimated"),
        "the source must be shown: {text}"
    );
    assert!(text.contains("MiB") || text.contains("GiB"));
}

#[test]
fn watch_refreshes_and_json_watch_is_one_document_per_line() {
    if !have_vulkan("watch_refreshes") {
        return;
    }
    let out = understory(&["budget", "--json", "--watch", "0.05", "--iterations", "3"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for l in lines {
        check_schema(&parse(l.as_bytes()));
    }
    let out = understory(&["budget", "--watch", "0.05", "--iterations", "2"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("\x1b[H\x1b[2J").count(),
        2,
        "refreshes in place"
    );
}

#[test]
fn bad_arguments_fail_with_a_message() {
    if !have_vulkan("bad_arguments_fail") {
        return;
    }
    let out = understory(&["budget", "--device", "99"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no device matches"));
    let out = understory(&["budget", "--watch", "-1"]);
    assert!(!out.status.success());
    let out = understory(&["budget", "--watch", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("positive"));
}

#[test]
fn no_driver_is_a_clear_error_not_a_panic() {
    // A loader that finds no driver manifest: what a machine without any Vulkan driver sees.
    let out = Command::new(bin())
        .args(["budget"])
        .env("VK_DRIVER_FILES", "/nonexistent/understory-no-driver.json")
        .env("VK_ICD_FILENAMES", "/nonexistent/understory-no-driver.json")
        .output()
        .expect("run understory");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("mesa-vulkan-drivers"),
        "names what to install: {err}"
    );
}

#[test]
fn demo_prints_a_summary_and_writes_the_png() {
    if !have_vulkan("demo_prints_a_summary") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("understory-cli-demo-{}", std::process::id()));
    let png = dir.join("f{frame}.png");
    let out = Command::new(bin())
        .args([
            "demo",
            "--instances",
            "5000",
            "--frames",
            "12",
            "--size",
            "160x90",
            "--quiet",
            "--png-every",
            "5",
            "--png",
        ])
        .arg(&png)
        .env("UNDERSTORY_VALIDATION", "required")
        .env_remove("UNDERSTORY_DEVICE")
        .output()
        .expect("run understory demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("12 frames"), "{stdout}");
    assert!(
        stdout.contains("leaks 0, validation messages 0"),
        "{stdout}"
    );
    // Frames 0, 5, 10 and the last (11).
    for f in [0, 5, 10, 11] {
        let p = dir.join(format!("f{f:06}.png"));
        assert!(p.exists(), "{} missing; {stdout}", p.display());
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_demo_arguments_fail_with_a_message() {
    for args in [
        &["demo", "--budget", "lots"][..],
        &["demo", "--size", "big"][..],
        &["demo", "--png-every", "3"][..],
    ] {
        let out = understory(args);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("understory: error:") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}
