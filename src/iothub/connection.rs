//! The IoT Hub connection string: `HostName=...;SharedAccessKeyName=...;SharedAccessKey=...`.
//!
//! The key is decoded once, here, and never leaves this module in readable form: `Debug` and
//! `Display` show `<redacted>` in its place, and no error message quotes it.

use std::fmt;

use base64::Engine as _;

use super::IotHubError;

/// A parsed IoT Hub (service) connection string: the hub's host name, the shared access
/// policy's name and its key.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionString {
    host_name: String,
    key_name: String,
    /// The base64-decoded key: what the signature's HMAC is keyed with.
    key: Vec<u8>,
}

impl ConnectionString {
    /// Parses `HostName=<host>;SharedAccessKeyName=<policy>;SharedAccessKey=<base64 key>`.
    /// Part names are matched case-insensitively, parts may come in any order, and parts other
    /// than these three (say `GatewayHostName`) are ignored. A device connection string
    /// (`DeviceId=...`) is refused: a seed pass needs a hub-level policy with registry read.
    ///
    /// # Errors
    ///
    /// [`IotHubError::BadConnectionString`] naming what is missing or malformed; the message
    /// never contains the key.
    pub fn parse(text: &str) -> Result<ConnectionString, IotHubError> {
        let bad = |reason: String| IotHubError::BadConnectionString { reason };
        let mut host_name = None;
        let mut key_name = None;
        let mut key = None;
        for part in text.trim().split(';') {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let Some((name, value)) = part.split_once('=') else {
                // Never echo the part: it could be a mangled key.
                return Err(bad("a part is not of the form Name=value".into()));
            };
            let value = value.trim();
            match name.trim().to_ascii_lowercase().as_str() {
                "hostname" => host_name = Some(value.to_string()),
                "sharedaccesskeyname" => key_name = Some(value.to_string()),
                "sharedaccesskey" => key = Some(value.to_string()),
                "deviceid" | "moduleid" => {
                    return Err(bad(
                        "this is a device connection string; a seed pass needs the hub's \
                         (a shared access policy with registry read)"
                            .into(),
                    ))
                }
                _ => {}
            }
        }
        let host_name = host_name
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("HostName is missing".into()))?;
        if host_name.contains(['/', '?', '#', '@', ' ']) {
            return Err(bad(format!(
                "HostName must be a host name such as <hub>.azure-devices.net, not {host_name:?}"
            )));
        }
        let key_name = key_name
            .filter(|k| !k.is_empty())
            .ok_or_else(|| bad("SharedAccessKeyName is missing".into()))?;
        let key = key
            .filter(|k| !k.is_empty())
            .ok_or_else(|| bad("SharedAccessKey is missing".into()))?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(key.as_bytes())
            .map_err(|_| bad("SharedAccessKey is not base64".into()))?;
        if key.is_empty() {
            return Err(bad("SharedAccessKey is empty".into()));
        }
        Ok(ConnectionString {
            host_name,
            key_name,
            key,
        })
    }

    /// Builds one from its parts (the emulator prints what it makes so).
    pub fn new(host_name: impl Into<String>, key_name: impl Into<String>, key: Vec<u8>) -> Self {
        ConnectionString {
            host_name: host_name.into(),
            key_name: key_name.into(),
            key,
        }
    }

    /// `HostName` as given, say `contoso-hub.azure-devices.net`.
    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    /// The hub's name as IoT Hub's notifications carry it in `hubName`: the first label of
    /// `HostName` (without a port, should one be given).
    pub fn hub_name(&self) -> &str {
        let host = self.host_name.split(':').next().unwrap_or(&self.host_name);
        host.split('.').next().unwrap_or(host)
    }

    /// The shared access policy's name (`SharedAccessKeyName`).
    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    /// The decoded key. Only the signature code and the emulator need it.
    // Used by the signatures, which only the `service` feature builds.
    #[cfg_attr(not(feature = "service"), allow(dead_code))]
    pub(crate) fn key(&self) -> &[u8] {
        &self.key
    }

    /// The whole connection string, key included: what a client is given. Never log it.
    pub fn to_secret_string(&self) -> String {
        format!(
            "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
            self.host_name,
            self.key_name,
            base64::engine::general_purpose::STANDARD.encode(&self.key)
        )
    }
}

impl fmt::Display for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "HostName={};SharedAccessKeyName={};SharedAccessKey=<redacted>",
            self.host_name, self.key_name
        )
    }
}

impl fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionString")
            .field("host_name", &self.host_name)
            .field("key_name", &self.key_name)
            .field("key", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0LWtleS1ieXRlcw==";

    #[test]
    fn parses_the_three_parts_in_any_order_and_case() {
        let conn = ConnectionString::parse(&format!(
            "sharedaccesskey={KEY}; HostName=contoso-hub.azure-devices.net;SharedAccessKeyName=registryRead;"
        ))
        .expect("parses");
        assert_eq!(conn.host_name(), "contoso-hub.azure-devices.net");
        assert_eq!(conn.hub_name(), "contoso-hub");
        assert_eq!(conn.key_name(), "registryRead");
        assert_eq!(conn.key(), b"secret-key-bytes");
        assert_eq!(
            ConnectionString::parse(&conn.to_secret_string()).expect("round trip"),
            conn
        );
    }

    #[test]
    fn the_hub_name_is_the_first_label_without_a_port() {
        let conn = ConnectionString::new("localhost:8443", "p", vec![1]);
        assert_eq!(conn.hub_name(), "localhost");
    }

    #[test]
    fn debug_and_display_never_show_the_key() {
        let conn = ConnectionString::parse(&format!(
            "HostName=h.azure-devices.net;SharedAccessKeyName=p;SharedAccessKey={KEY}"
        ))
        .expect("parses");
        for shown in [format!("{conn}"), format!("{conn:?}"), format!("{conn:#?}")] {
            assert!(!shown.contains(KEY), "{shown}");
            assert!(!shown.contains("secret-key"), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
        }
    }

    #[test]
    fn errors_name_what_is_wrong_and_never_the_key() {
        let cases = [
            (
                format!("SharedAccessKeyName=p;SharedAccessKey={KEY}"),
                "HostName is missing",
            ),
            (
                format!("HostName=h;SharedAccessKey={KEY}"),
                "SharedAccessKeyName is missing",
            ),
            (
                "HostName=h;SharedAccessKeyName=p".to_string(),
                "SharedAccessKey is missing",
            ),
            (
                "HostName=h;SharedAccessKeyName=p;SharedAccessKey=not base64!".to_string(),
                "not base64",
            ),
            (
                format!("HostName=h;DeviceId=d;SharedAccessKey={KEY}"),
                "device connection string",
            ),
            (
                format!("HostName=https://h/;SharedAccessKeyName=p;SharedAccessKey={KEY}"),
                "host name",
            ),
            (
                "HostName=h;SharedAccessKeyName=p;sharedaccesskey".to_string(),
                "not of the form",
            ),
            (KEY.to_string(), "HostName is missing"),
        ];
        for (text, expected) in cases {
            let error = ConnectionString::parse(&text).expect_err(&text);
            let message = error.to_string();
            assert!(message.contains(expected), "{text}: {message}");
            assert!(!message.contains(KEY), "{message}");
            assert_eq!(error.kind(), "bad_connection_string");
            assert!(!error.is_retryable());
        }
    }
}
