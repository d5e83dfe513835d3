//! Sources of messages: captured files (`replay`) in the storage-route JSON encoding
//! (`storage_json`) or Avro containers (`avro`).

pub mod avro;
pub mod avro_fast;
pub mod documents;
#[cfg(feature = "service")]
pub mod eventhub;
#[cfg(feature = "service")]
pub mod hub;
pub mod parsed;
pub mod replay;
pub mod storage_json;
