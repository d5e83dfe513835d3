//! The integration tests: one binary, one module per boundary (matklad, "Delete Cargo
//! Integration Tests").

mod alerts;
mod avro;
mod cases;
mod faults;
mod kill;
mod live;
mod operations;
mod properties;
mod service;
mod support;
