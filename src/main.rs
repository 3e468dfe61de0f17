//! `understory`: the command-line face of the library.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use understory::gpu::adapter::DeviceSelector;
use understory::gpu::instance::{Instance, InstanceOptions, Validation};
use understory::report::budget_report;

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

fn run(cli: Cli) -> understory::Result<()> {
    match cli.command {
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
            }
            .with_env()?;
            let instance = Instance::new(&options)?;
            let mut n = 0u64;
            loop {
                let report = budget_report(&instance, selector.as_ref())?;
                let mut out = std::io::stdout().lock();
                let text = if json {
                    serde_json::to_string(&report).expect("report serializes") + "\n"
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
