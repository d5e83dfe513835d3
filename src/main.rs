//! The `twinwatch` binary: parse the command line, set up logging, run the command.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // With the `failpoints` feature, `FAILPOINTS` arms crash spots (the reliability suite).
    #[cfg(feature = "failpoints")]
    let _failpoints = twinwatch::failpoint::setup();
    let cli = twinwatch::cli::Cli::parse();
    twinwatch::telemetry::init_logging(cli.log_format);
    twinwatch::app::run(cli)
}
