//! `twinwatch audit`: a dry run of a policy change (`docs/semantics.md` §8), read-only.

use std::io::{self, Write};
use std::process::ExitCode;

use super::Failure;
use crate::cli::{AuditArgs, AuditFormat};
use crate::pipeline::{plan_audit, AuditPlan};

pub fn run(args: &AuditArgs) -> Result<ExitCode, Failure> {
    let policy = super::load_policy(&args.policies)?;
    let store = super::output::open(&args.data_dir)?;
    let plan = plan_audit(&store, &policy).map_err(Failure::runtime)?;
    let mut out = io::stdout().lock();
    let result = match args.format {
        AuditFormat::Json => serde_json::to_writer_pretty(&mut out, &plan)
            .map_err(io::Error::other)
            .and_then(|()| writeln!(out)),
        AuditFormat::Table => write_table(&mut out, &plan),
    };
    match result {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(Failure::runtime(e)),
    }
}

fn write_table(out: &mut impl Write, plan: &AuditPlan) -> io::Result<()> {
    let width = plan
        .rules
        .iter()
        .map(|r| r.rule_id.len() + if r.in_policy { 0 } else { 10 })
        .max()
        .unwrap_or(4)
        .max(4);
    writeln!(
        out,
        "{:width$}  {:8}  {:>10}  {:>10}  {:>8}  {:>10}",
        "rule", "severity", "failing", "after", "to open", "to resolve"
    )?;
    let (mut open, mut resolve) = (0, 0);
    for rule in &plan.rules {
        let name = if rule.in_policy {
            rule.rule_id.clone()
        } else {
            format!("{} (removed)", rule.rule_id)
        };
        writeln!(
            out,
            "{name:width$}  {:8}  {:>10}  {:>10}  {:>8}  {:>10}",
            rule.severity, rule.failing_now, rule.failing_after, rule.to_open, rule.to_resolve
        )?;
        open += rule.to_open;
        resolve += rule.to_resolve;
    }
    let changed = plan.current_fingerprint.as_deref() != Some(plan.new_fingerprint.as_str());
    writeln!(
        out,
        "\n{} twins; a re-audit would open {open} and resolve {resolve} violations{}",
        plan.twins,
        if changed {
            ""
        } else {
            " (this is the snapshot's policy: nothing would be re-audited)"
        }
    )
}
