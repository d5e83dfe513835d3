//! The reliability suite: campaigns of crashes, network faults, storage faults, sink outages
//! and hostile input around the real binary, each checking that nothing is lost, nothing is
//! applied twice, and every alert is delivered (docs/semantics.md §5). Built only with the
//! `failpoints` feature; `scripts/reliability` runs it and RELIABILITY.md has its figures.
//!
//! Each campaign appends a line of figures to the file named by `TWINWATCH_RELIABILITY_REPORT`
//! (when set), and scales with `TWINWATCH_RELIABILITY_SCALE` (`full`, the default, or `ci`).

#[allow(dead_code)]
#[path = "../it/service.rs"]
mod service;
#[allow(dead_code)]
#[path = "../it/support.rs"]
mod support;

mod crash;
mod hostile;
mod network;
mod report;
mod sinks;
mod storage;
