//! The integration tests: one binary, one module per boundary (matklad, "Delete Cargo
//! Integration Tests").

mod alerts;
mod avro;
mod cases;
mod expired;
mod faults;
mod hardening;
mod iothub;
mod kill;
mod layers;
mod live;
mod operations;
mod policy_changes;
mod properties;
mod quiet_clock;
mod scenarios;
mod seed_files;
mod seed_service;
// Shared with the reliability suite, which uses parts the integration tests do not.
#[allow(dead_code)]
mod service;
mod support;
