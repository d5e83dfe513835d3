//! Sources of messages: captured files (`replay`) in the storage-route JSON encoding
//! (`storage_json`).

pub mod parsed;
pub mod replay;
pub mod storage_json;
