//! Wiring: each command's run function, from parsed arguments to an exit code.

mod audit;
mod demo;
pub mod emulator;
mod output;
pub mod replay;
pub mod run;
pub mod seed;
mod sinks;
mod summary;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

/// Exit codes (`DESIGN.md`): 0 success, 1 runtime failure, 2 bad usage, configuration or
/// policy.
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

/// Loads the policy files, or the built-in baseline when there are none; a bad policy is a
/// usage error (exit 2) listing every problem.
pub fn load_policy(files: &[std::path::PathBuf]) -> Result<crate::policy::Policy, Failure> {
    if files.is_empty() {
        return Ok(crate::policy::Policy::baseline());
    }
    crate::policy::Policy::load(files)
        .map_err(|errors| Failure::usage(anyhow::anyhow!("invalid policy:\n{errors}")))
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn runtime(error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code: EXIT_FAILURE,
            error: error.into(),
        }
    }

    pub fn usage(error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            code: EXIT_USAGE,
            error: error.into(),
        }
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Replay(args) => replay::run(args),
        Command::Run(args) => run::run(args),
        Command::Export(args) => output::export(&args.data_dir),
        Command::Deadletters(args) if args.alerts => sinks::alert_dead_letters(&args.dir.data_dir),
        Command::Deadletters(args) => output::dead_letters(&args.dir.data_dir),
        Command::Violations(args) => output::violations(&args.data_dir, args.pending),
        Command::Seed(args) => seed::run(args),
        Command::Audit(args) => audit::run(&args),
        Command::Policy(args) => match args.command {
            crate::cli::PolicyCommand::Check { files } => output::policy_check(&files),
        },
        Command::Generate(args) => output::generate(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Emulator(args) => emulator::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("twinwatch: {:#}", failure.error);
            ExitCode::from(failure.code)
        }
    }
}
