//! The `twinwatch` binary: parse the command line, set up logging, run the command.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = twinwatch::cli::Cli::parse();
    twinwatch::telemetry::init_logging(cli.log_format);
    twinwatch::app::run(cli)
}
