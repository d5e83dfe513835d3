//! The `[eventhub]` table validated: the connection string, the partitions owned, where a
//! partition starts.

use std::fmt;

use super::raw::RawEventHub;
use super::redact::redacted_url_opt;
use super::Secret;

/// The consumer group read when `eventhub.consumer_group` is not given: every Event Hub has it.
pub const DEFAULT_CONSUMER_GROUP: &str = "$Default";

/// Which partitions an instance owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Partitions {
    All,
    List(Vec<String>),
    /// Replica `ordinal` of `replicas` owns the partitions at positions i of the hub's list
    /// with `i % replicas == ordinal`.
    Ordinal {
        replicas: u32,
        ordinal: u32,
    },
}

impl Partitions {
    /// The partitions owned, among the hub's `ids` (in the hub's order); a listed id the hub
    /// does not have is an error.
    pub fn select(&self, ids: &[String]) -> Result<Vec<String>, String> {
        match self {
            Partitions::All => Ok(ids.to_vec()),
            Partitions::List(wanted) => match wanted.iter().find(|id| !ids.contains(id)) {
                Some(missing) => Err(missing.clone()),
                None => Ok(wanted.clone()),
            },
            Partitions::Ordinal { replicas, ordinal } => Ok(ids
                .iter()
                .enumerate()
                .filter(|(i, _)| *i as u64 % u64::from(*replicas) == u64::from(*ordinal))
                .map(|(_, id)| id.clone())
                .collect()),
        }
    }
}

/// The ordinal at the end of a StatefulSet pod's host name (`twinwatch-2` → 2).
pub(super) fn ordinal_of_host(host: &str) -> Option<u32> {
    host.trim().rsplit_once('-')?.1.parse().ok()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartPosition {
    Earliest,
    Latest,
}

/// The validated Event Hub settings. `Debug` redacts the connection string and the custom
/// endpoint's user-info and query.
#[derive(Clone)]
pub struct EventHubConfig {
    pub connection_string: Secret,
    /// `EntityPath` of the connection string.
    pub entity: String,
    /// The namespace host (for logs: no secret in it).
    pub host: String,
    pub consumer_group: String,
    pub partitions: Partitions,
    pub start_position: StartPosition,
    pub custom_endpoint: Option<String>,
    pub owner_level: Option<i64>,
}

impl fmt::Debug for EventHubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventHubConfig")
            .field("connection_string", &self.connection_string)
            .field("entity", &self.entity)
            .field("host", &self.host)
            .field("consumer_group", &self.consumer_group)
            .field("partitions", &self.partitions)
            .field("start_position", &self.start_position)
            .field("custom_endpoint", &redacted_url_opt(&self.custom_endpoint))
            .field("owner_level", &self.owner_level)
            .finish()
    }
}

/// The parts of an Event Hubs connection string the service needs.
#[derive(Debug, PartialEq, Eq)]
struct ConnectionParts {
    host: String,
    port: Option<u16>,
    entity: Option<String>,
    development_emulator: bool,
    has_key: bool,
}

/// Parses `Key=Value;...` (keys case-insensitive); the error never quotes the string.
fn parse_connection_string(text: &str) -> Result<ConnectionParts, String> {
    let mut endpoint = None;
    let mut entity = None;
    let mut emulator = false;
    let mut has_key = false;
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = part.split_once('=') else {
            return Err("a part of the connection string is not Key=Value".into());
        };
        match key.trim().to_ascii_lowercase().as_str() {
            "endpoint" => endpoint = Some(value.trim().to_owned()),
            "entitypath" => entity = Some(value.trim().to_owned()),
            "usedevelopmentemulator" => emulator = value.trim().eq_ignore_ascii_case("true"),
            "sharedaccesskey" | "sharedaccesssignature" => has_key = !value.trim().is_empty(),
            _ => {}
        }
    }
    let endpoint = endpoint.ok_or("the connection string has no Endpoint")?;
    let rest = endpoint
        .strip_prefix("sb://")
        .ok_or("the connection string's Endpoint must start with sb://")?;
    let authority = rest.trim_end_matches('/');
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (
            h.to_owned(),
            Some(
                p.parse::<u16>()
                    .map_err(|_| "the Endpoint's port is not a number")?,
            ),
        ),
        None => (authority.to_owned(), None),
    };
    if host.is_empty() {
        return Err("the connection string's Endpoint has no host".into());
    }
    Ok(ConnectionParts {
        host,
        port,
        entity: entity.filter(|e| !e.is_empty()),
        development_emulator: emulator,
        has_key,
    })
}

pub(super) fn validate_eventhub(
    raw: RawEventHub,
    problems: &mut Vec<String>,
) -> Option<EventHubConfig> {
    let Some(connection_string) = raw.connection_string.filter(|s| !s.trim().is_empty()) else {
        problems.push(
            "eventhub.connection_string is required (or TWINWATCH_EVENTHUB_CONNECTION_STRING)"
                .into(),
        );
        return None;
    };
    let parts = match parse_connection_string(&connection_string) {
        Ok(parts) => parts,
        Err(e) => {
            problems.push(format!("eventhub.connection_string: {e}"));
            return None;
        }
    };
    if !parts.has_key {
        problems
            .push("eventhub.connection_string: no SharedAccessKey or SharedAccessSignature".into());
    }
    let Some(entity) = parts.entity.clone() else {
        problems.push(
            "eventhub.connection_string: no EntityPath (the Event Hub-compatible name)".into(),
        );
        return None;
    };
    let partitions = match raw.partitions {
        None => Partitions::All,
        Some(toml::Value::String(s)) if s == "all" => Partitions::All,
        Some(toml::Value::String(s)) if s == "ordinal" => match (raw.replicas, raw.ordinal) {
            (Some(replicas), Some(ordinal)) if ordinal < replicas => {
                Partitions::Ordinal { replicas, ordinal }
            }
            (Some(replicas @ 1..), Some(ordinal)) => {
                problems.push(format!(
                    "eventhub.partitions = \"ordinal\": ordinal {ordinal} is not below replicas = {replicas}"
                ));
                Partitions::All
            }
            (None | Some(0), _) => {
                problems.push(
                    "eventhub.partitions = \"ordinal\" needs eventhub.replicas (at least 1)".into(),
                );
                Partitions::All
            }
            (Some(_), None) => {
                problems.push(
                    "eventhub.partitions = \"ordinal\": no ordinal (eventhub.ordinal, TWINWATCH_REPLICA_ORDINAL, or a host name ending in -N)"
                        .into(),
                );
                Partitions::All
            }
        },
        Some(toml::Value::Array(items)) => {
            let ids: Vec<String> = items
                .iter()
                .filter_map(|v| match v {
                    toml::Value::String(s) => Some(s.clone()),
                    toml::Value::Integer(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect();
            if ids.len() != items.len() || ids.is_empty() {
                problems.push(
                    "eventhub.partitions: a non-empty list of partition ids, or \"all\"".into(),
                );
            }
            // Two receivers on one partition would race for its checkpoint (and, with an
            // owner level, displace each other for ever).
            let mut seen = std::collections::BTreeSet::new();
            let duplicates: std::collections::BTreeSet<&String> =
                ids.iter().filter(|id| !seen.insert(*id)).collect();
            if !duplicates.is_empty() {
                problems.push(format!(
                    "eventhub.partitions: {} listed more than once",
                    duplicates
                        .iter()
                        .map(|id| format!("{id:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            Partitions::List(ids)
        }
        Some(_) => {
            problems.push(
                "eventhub.partitions: a list of partition ids, \"all\" or \"ordinal\"".into(),
            );
            Partitions::All
        }
    };
    let start_position = match raw.start_position.as_deref() {
        None | Some("earliest") => StartPosition::Earliest,
        Some("latest") => StartPosition::Latest,
        Some(other) => {
            problems.push(format!(
                "eventhub.start_position: earliest or latest, not {other:?}"
            ));
            StartPosition::Earliest
        }
    };
    let custom_endpoint = match raw.custom_endpoint {
        Some(url) => {
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                problems.push("eventhub.custom_endpoint: an amqp:// or amqps:// URL".into());
            }
            Some(url)
        }
        // The official clients ignore UseDevelopmentEmulator and drop the port: the
        // application has to say where to connect (DESIGN.md, known traps).
        None if parts.development_emulator => Some(format!(
            "amqp://{}:{}",
            parts.host,
            parts.port.unwrap_or(5672)
        )),
        None => None,
    };
    Some(EventHubConfig {
        connection_string: Secret::new(connection_string),
        entity,
        host: parts.host,
        consumer_group: raw
            .consumer_group
            .unwrap_or_else(|| DEFAULT_CONSUMER_GROUP.into()),
        partitions,
        start_position,
        custom_endpoint,
        owner_level: raw.owner_level,
    })
}
