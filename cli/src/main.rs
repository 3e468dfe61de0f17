//! `understory`: the command-line face of the library.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use understory::gpu::adapter::DeviceSelector;
use understory::gpu::instance::{Instance, InstanceOptions, Validation};
use understory_cli::report::budget_report;

#[derive(Parser)]
#[command(
    name = "understory",
    version,
    about = "Budget-aware Vulkan backend for instanced vegetation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fly over a seeded procedural forest: tiles stream, LOD follows the budget, the GPU culls
    /// and draws every frame (offscreen; `--png` writes it). Ends with a summary; exits non-zero
    /// on leaks or validation messages.
    Demo {
        /// Trees in the world (millions are fine on a real GPU).
        #[arg(long, default_value_t = 100_000)]
        instances: u64,
        /// Frames to fly (one lap around the world).
        #[arg(long, default_value_t = 300)]
        frames: u64,
        /// Image size, WIDTHxHEIGHT.
        #[arg(long, default_value = "640x360")]
        size: String,
        /// Vegetation memory cap, e.g. 512MiB (default: the controller's 512 MiB).
        #[arg(long, value_name = "SIZE")]
        budget: Option<String>,
        /// Shrink the budget mid-flight (instance memory to a third of what is held, from 25%
        /// to 50% of the frames) to watch the controller work.
        #[arg(long)]
        squeeze: bool,
        /// Write the last frame as PNG; with --png-every, a pattern containing {frame}.
        #[arg(long, value_name = "PATH")]
        png: Option<std::path::PathBuf>,
        /// Write a PNG every N frames (needs {frame} in --png).
        #[arg(long, value_name = "N")]
        png_every: Option<u64>,
        /// Colour trees by LOD: full red, medium yellow, billboard blue.
        #[arg(long)]
        lod_tint: bool,
        /// Two-phase occlusion culling (on: draw last frame's visible trees, build a depth
        /// pyramid, test the rest against it).
        #[arg(long, value_enum, default_value_t = Switch::Off)]
        occlusion: Switch,
        /// Sun shadows (on: the cull pass also culls four shadow cascades, drawn into shadow
        /// maps that the camera draw looks up).
        #[arg(long, value_enum, default_value_t = Switch::Off)]
        shadows: Switch,
        /// The census (on: after each frame's draws, draw the same instances again against
        /// their depth and count those that reach the image: what no conservative culling can
        /// draw fewer of; every frame is waited for).
        #[arg(long, value_enum, default_value_t = Switch::Off)]
        census: Switch,
        /// Where the camera flies: over the canopy, or at eye height along a forest track.
        #[arg(long, value_enum, default_value_t = FlightArg::Canopy)]
        flight: FlightArg,
        /// Seed of the forest.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// No progress bar (stats lines still print).
        #[arg(long)]
        quiet: bool,
    },
    /// Print the real VRAM budget of every heap of every physical device.
    Budget {
        /// Machine-readable output (schema `understory.budget/1`, see the README). With
        /// `--watch`, one JSON document per line.
        #[arg(long)]
        json: bool,
        /// Refresh every SECS seconds (default 1) until interrupted.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "1")]
        watch: Option<f64>,
        /// Only this device: its index or a case-insensitive substring of its name.
        #[arg(long, value_name = "INDEX|NAME")]
        device: Option<String>,
        /// Stop after this many refreshes (with --watch).
        #[arg(long, hide = true)]
        iterations: Option<u64>,
    },
    /// A long session of churn, camera motion and budget changes, with the GPU cull every
    /// frame: a CSV row per frame, an SVG plot of VRAM against the budget, and leak checks.
    Soak {
        /// Frames to run.
        #[arg(long, default_value_t = 10_000)]
        frames: u64,
        /// Stop earlier after this many seconds.
        #[arg(long)]
        seconds: Option<f64>,
        /// Patches alive at any time.
        #[arg(long, default_value_t = 20_000)]
        patches: usize,
        /// Vegetation cap in MiB (a quarter of it during squeezes, which come six times a run).
        #[arg(long, default_value_t = 32)]
        cap_mib: u64,
        /// CSV output.
        #[arg(long, default_value = "soak.csv")]
        csv: std::path::PathBuf,
        /// SVG plot output.
        #[arg(long, default_value = "soak.svg")]
        svg: std::path::PathBuf,
        /// Seed of the world and the churn.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Outside pressure instead of cap squeezes: another process (this binary, started as
        /// a child) takes VRAM in steps until the driver's heapBudget leaves vegetation less
        /// than it holds, then gives it back. Needs VK_EXT_memory_budget.
        #[arg(long)]
        pressure: bool,
    },
    /// The other process of `soak --pressure`: holds device-local VRAM as its stdin asks.
    #[command(hide = true)]
    PressureChild,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("understory: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_image_size(text: &str) -> understory::Result<(u32, u32)> {
    let bad =
        || understory::Error::InvalidInput(format!("--size {text:?}: expected e.g. 1280x720"));
    let (w, h) = text.split_once(['x', 'X']).ok_or_else(bad)?;
    Ok((
        w.trim().parse().map_err(|_| bad())?,
        h.trim().parse().map_err(|_| bad())?,
    ))
}

fn run(cli: Cli) -> understory::Result<()> {
    match cli.command {
        Command::Demo {
            instances,
            frames,
            size,
            budget,
            squeeze,
            png,
            png_every,
            lod_tint,
            occlusion,
            shadows,
            census,
            flight,
            seed,
            quiet,
        } => {
            let (width, height) = parse_image_size(&size)?;
            let budget_bytes = budget
                .as_deref()
                .map(understory_cli::demo::parse_size)
                .transpose()?;
            let options = understory::gpu::context::ContextOptions {
                instance: InstanceOptions {
                    app_name: "understory demo".into(),
                    validation: Validation::IfAvailable,
                    sync_validation: false,
                    gpu_assisted: false,
                },
                ..Default::default()
            }
            .with_env()?;
            let config = understory_cli::demo::DemoConfig {
                instances,
                frames,
                width,
                height,
                seed,
                budget_bytes,
                squeeze,
                png,
                png_every,
                lod_tint,
                occlusion: occlusion == Switch::On,
                shadows: shadows == Switch::On,
                census: census == Switch::On,
                flight: match flight {
                    FlightArg::Canopy => understory_cli::demo::Flight::Canopy,
                    FlightArg::Ground => understory_cli::demo::Flight::Ground,
                },
                progress: !quiet,
                ..Default::default()
            };
            let r = understory_cli::demo::run(&options, &config)?;
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            let p = &r.peak_bytes.0;
            println!(
                "demo on {}: {} frames in {:.1} s ({:.1} frames/s), {} trees in {} patches",
                r.device,
                r.frames,
                r.seconds,
                r.frames as f64 / r.seconds,
                r.instances,
                r.patches
            );
            println!(
                "peak live memory (budget: {}): instances {:.1} MiB, atlas {:.1} MiB, cull and draw outputs {:.1} MiB, staging (host) {:.1} MiB, other {:.1} MiB; lowest quality {:.2}",
                r.budget_source,
                mib(p[0]),
                mib(p[1]),
                mib(p[2]),
                mib(p[3]),
                mib(p[4]),
                r.min_quality
            );
            println!("{}", r.budget_line());
            println!(
                "device-local heap usage peak {:.1} MiB of a {:.1} MiB budget ({}); allocation granularity {} KiB ({})",
                mib(r.peak_heap_usage),
                mib(r.heap_budget),
                r.budget_source,
                r.allocation_granularity.0 >> 10,
                if r.allocation_granularity.1 {
                    "measured"
                } else {
                    "assumed"
                }
            );
            println!(
                "device-local heap usage at start {} B, after everything was released {} B ({})",
                r.heap_usage_start_after.0, r.heap_usage_start_after.1, r.budget_source,
            );
            println!(
                "most drawn in a frame: full {}, medium {}, billboard {}; frames with list overflow {}",
                r.peak_drawn[0], r.peak_drawn[1], r.peak_drawn[2], r.overflow_frames
            );
            if r.shadows {
                let cascades: Vec<String> = r
                    .peak_drawn_cascades
                    .iter()
                    .enumerate()
                    .map(|(c, [full, medium, billboard])| {
                        format!(
                            "cascade {}: full {full}, medium {medium}, billboard {billboard}",
                            c + 1
                        )
                    })
                    .collect();
                println!(
                    "most drawn in a frame into the shadow maps: {}; frames with list overflow {}",
                    cascades.join("; "),
                    r.shadow_overflow_frames
                );
            }
            println!(
                "drawn over the flight: {} instances (occlusion {}, flight {})",
                r.drawn_total,
                if r.occlusion { "on" } else { "off" },
                match r.flight {
                    understory_cli::demo::Flight::Canopy => "canopy",
                    understory_cli::demo::Flight::Ground => "ground",
                }
            );
            if let Some(reached) = r.reached_total {
                println!(
                    "reached the image (census): {reached} instances; drawn / reached {:.2}x",
                    r.drawn_total as f64 / reached.max(1) as f64
                );
            }
            if let (Some(c), Some(d)) = (r.gpu_cull_ms, r.gpu_draw_ms) {
                let what = if r.occlusion {
                    "uploads + cull (both phases) + pyramid"
                } else {
                    "uploads + cull"
                };
                let draw = if r.shadows {
                    "shadow maps + draw"
                } else {
                    "draw"
                };
                println!("GPU time per frame (median): {what} {c:.3} ms, {draw} {d:.3} ms");
            }
            println!(
                "evictions {}, uploads {} ({} refused by the budget or a category cap, retried later), deferred frees {}",
                r.evictions, r.uploads, r.refused_uploads, r.deferred_frees
            );
            for path in &r.pngs {
                println!("wrote {}", path.display());
            }
            println!(
                "leaks {}, validation messages {}{}",
                r.leaks,
                r.validation_messages,
                if r.validation {
                    ""
                } else {
                    " (validation layer off: not counted)"
                }
            );
            if !r.passed() {
                return Err(understory::Error::Unsupported(
                    "the demo leaked or raised validation messages (see above)".into(),
                ));
            }
            Ok(())
        }
        Command::Soak {
            frames,
            seconds,
            patches,
            cap_mib,
            csv,
            svg,
            seed,
            pressure,
        } => {
            let options = understory::gpu::context::ContextOptions {
                instance: InstanceOptions {
                    app_name: "understory soak".into(),
                    ..Default::default()
                },
                ..Default::default()
            }
            .with_env()?;
            let config = understory_cli::soak::SoakConfig {
                frames,
                max_seconds: seconds,
                patches,
                cap_bytes: cap_mib << 20,
                squeeze_period_frames: (frames / 6).clamp(50, 20_000),
                csv: Some(csv.clone()),
                svg: Some(svg.clone()),
                seed,
                pressure: if pressure {
                    Some(std::env::current_exe().map_err(|e| {
                        understory::Error::InvalidInput(format!("this binary's path: {e}"))
                    })?)
                } else {
                    None
                },
                ..Default::default()
            };
            let r = understory_cli::soak::run(&options, &config)?;
            println!(
                "soak on {}: {} frames in {:.1} s ({:.0} frames/s); peak held {:.1} MiB; {} evictions, {} uploads, {} deferred frees",
                r.device,
                r.frames,
                r.seconds,
                r.frames as f64 / r.seconds,
                r.peak_held as f64 / (1u64 << 20) as f64,
                r.evictions,
                r.uploads,
                r.frees_completed
            );
            println!(
                "heap usage ({}): {} B at start, baseline {} B (after one cull pass made, run once and dropped), after {} B; live allocations after {}, leaks {}, validation messages {}, frames over budget after settling {}",
                r.budget_source,
                r.first_usage,
                r.baseline_usage,
                r.final_usage,
                r.live_allocations_after,
                r.leaks,
                r.validation_messages,
                r.over_budget_frames
            );
            println!(
                "budget: peak held {:.1} MiB, lowest budget {:.1} MiB{}; frames over budget after settling {}; blank frames {}; lowest quality {:.2}; recovery to the quality before the budget fell in {}",
                r.peak_held as f64 / (1u64 << 20) as f64,
                r.lowest_budget as f64 / (1u64 << 20) as f64,
                if pressure {
                    format!(
                        " (the other process held up to {:.1} GiB)",
                        r.pressure_peak as f64 / (1u64 << 30) as f64
                    )
                } else {
                    String::new()
                },
                r.over_budget_frames,
                r.blank_frames,
                r.min_quality,
                r.recovery_frames
                    .map_or("never (not back when the run ended)".into(), |n| format!(
                        "{n} frames"
                    ))
            );
            println!("wrote {} and {}", csv.display(), svg.display());
            if !r.passed() {
                return Err(understory::Error::Unsupported(
                    "soak checks failed (see above)".into(),
                ));
            }
            Ok(())
        }
        Command::PressureChild => {
            let options = understory::gpu::context::ContextOptions {
                instance: InstanceOptions {
                    app_name: "understory pressure child".into(),
                    validation: Validation::Off,
                    ..Default::default()
                },
                ..Default::default()
            }
            .with_env()?;
            // The child only allocates: no layer (its device is not what the soak checks).
            let options = understory::gpu::context::ContextOptions {
                instance: InstanceOptions {
                    validation: Validation::Off,
                    gpu_assisted: false,
                    ..options.instance
                },
                ..options
            };
            understory_cli::pressure::child_main(&options)
        }
        Command::Budget {
            json,
            watch,
            device,
            iterations,
        } => {
            if let Some(w) = watch {
                if !(w.is_finite() && w > 0.0) {
                    return Err(understory::Error::InvalidInput(format!(
                        "--watch {w}: expected a positive number of seconds"
                    )));
                }
            }
            let selector = device.as_deref().map(DeviceSelector::parse).transpose()?;
            let options = InstanceOptions {
                app_name: "understory budget".into(),
                validation: Validation::Off,
                sync_validation: false,
                gpu_assisted: false,
            }
            .with_env()?;
            let instance = Instance::new(&options)?;
            let mut n = 0u64;
            loop {
                let report = budget_report(&instance, selector.as_ref())?;
                let mut out = std::io::stdout().lock();
                let text = if json {
                    serde_json::to_string(&report).map_err(|e| {
                        understory::Error::InvalidInput(format!("budget report as JSON: {e}"))
                    })? + "\n"
                } else {
                    report.to_table()
                };
                if watch.is_some() && !json {
                    // Clear and home: refresh in place.
                    let _ = write!(out, "\x1b[H\x1b[2J");
                }
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
                n += 1;
                let Some(secs) = watch else { break };
                if iterations.is_some_and(|max| n >= max) {
                    break;
                }
                std::thread::sleep(Duration::from_secs_f64(secs));
            }
            let canary = instance.canary();
            if canary.total() > 0 {
                return Err(understory::Error::Unsupported(format!(
                    "{} validation message(s) while reading budgets",
                    canary.total()
                )));
            }
            Ok(())
        }
    }
}

/// `--flight`: where the demo's camera flies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum FlightArg {
    /// 26–42 m above the ground, over the canopy.
    Canopy,
    /// At eye height along a forest track.
    Ground,
}

/// An `on|off` flag value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}
