//! Shared access signatures: the `Authorization` header of every request to the hub.
//!
//! `SharedAccessSignature sr=<url-encoded host>&sig=<url-encoded base64 HMAC-SHA256>&se=<expiry>&skn=<policy>`,
//! where the HMAC, keyed with the policy's decoded key, is over `<url-encoded host>\n<expiry>`
//! (reference `iothub-query.md`). The emulator checks tokens with [`verify`], so both ends of
//! the tests share one definition of the signature; Microsoft's Python client, which signs
//! with its own code, is what keeps that definition honest.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What `urllib.parse.quote(text, safe="")` leaves alone: letters, digits and `-_.~`. The
/// same set as Microsoft's clients, so a token reads the same whoever made it.
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes a URL component.
pub fn url_encode(text: &str) -> String {
    utf8_percent_encode(text, COMPONENT).to_string()
}

fn mac(key: &[u8], resource: &str, expiry: u64) -> HmacSha256 {
    // HMAC takes keys of any length: `new_from_slice` cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(resource.as_bytes());
    mac.update(b"\n");
    mac.update(expiry.to_string().as_bytes());
    mac
}

/// The `Authorization` header value for `host_name`, signed with `key` of policy
/// `key_name`, valid until `expiry` (seconds since the Unix epoch).
pub fn token(host_name: &str, key_name: &str, key: &[u8], expiry: u64) -> String {
    let resource = url_encode(host_name);
    let signature = base64::engine::general_purpose::STANDARD
        .encode(mac(key, &resource, expiry).finalize().into_bytes());
    format!(
        "SharedAccessSignature sr={resource}&sig={}&se={expiry}&skn={}",
        url_encode(&signature),
        url_encode(key_name)
    )
}

/// Why [`verify`] refused a token (the emulator answers 401 with it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization` header, or not a `SharedAccessSignature`.
    Missing,
    /// A field is missing or malformed.
    Malformed(&'static str),
    /// Signed for another host.
    WrongResource,
    /// Another policy's name.
    UnknownPolicy,
    /// Past its expiry.
    Expired,
    /// The signature does not match the key.
    BadSignature,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Missing => f.write_str("no shared access signature"),
            Refusal::Malformed(what) => write!(f, "malformed shared access signature: {what}"),
            Refusal::WrongResource => f.write_str("the token was signed for another resource"),
            Refusal::UnknownPolicy => f.write_str("unknown shared access policy"),
            Refusal::Expired => f.write_str("the token has expired"),
            Refusal::BadSignature => f.write_str("the signature does not match"),
        }
    }
}

/// Checks an `Authorization` header value as the hub would: a token for `host_name` (compared
/// case-insensitively, encoded or not), of policy `key_name`, unexpired at `now` (seconds since
/// the epoch), whose signature is the HMAC of its own `sr` and `se` under `key`.
pub fn verify(
    header: Option<&str>,
    host_name: &str,
    key_name: &str,
    key: &[u8],
    now: u64,
) -> Result<(), Refusal> {
    let fields = header
        .and_then(|h| h.trim().strip_prefix("SharedAccessSignature "))
        .ok_or(Refusal::Missing)?;
    let (mut resource, mut signature, mut expiry, mut policy) = (None, None, None, None);
    for field in fields.split('&') {
        let Some((name, value)) = field.split_once('=') else {
            return Err(Refusal::Malformed("a field without a value"));
        };
        match name {
            "sr" => resource = Some(value),
            "sig" => signature = Some(value),
            "se" => expiry = Some(value),
            "skn" => policy = Some(value),
            _ => {}
        }
    }
    let resource = resource.ok_or(Refusal::Malformed("no sr"))?;
    let signature = signature.ok_or(Refusal::Malformed("no sig"))?;
    let expiry_text = expiry.ok_or(Refusal::Malformed("no se"))?;
    let expiry: u64 = expiry_text
        .parse()
        .map_err(|_| Refusal::Malformed("se is not a number"))?;
    let decoded = |text: &str| percent_decode_str(text).decode_utf8_lossy().into_owned();
    if !decoded(resource).eq_ignore_ascii_case(host_name) {
        return Err(Refusal::WrongResource);
    }
    if policy.map(decoded).as_deref() != Some(key_name) {
        return Err(Refusal::UnknownPolicy);
    }
    if expiry <= now {
        return Err(Refusal::Expired);
    }
    let signature = base64::engine::general_purpose::STANDARD
        .decode(decoded(signature).as_bytes())
        .map_err(|_| Refusal::Malformed("sig is not base64"))?;
    // The message is `sr` exactly as sent, as the service computes it.
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(resource.as_bytes());
    mac.update(b"\n");
    mac.update(expiry_text.as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| Refusal::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens made by `azure-iot-hub` 2.7.0's own `SasToken` (key `c2VjcmV0`, "secret";
    /// expiry 1700000000): ours is the same string, and its token (whose `sig` keeps `/`
    /// unencoded, as Python's `quote` does by default) verifies.
    #[test]
    fn signs_and_verifies_as_microsofts_client() {
        assert_eq!(
            token(
                "contoso-hub.azure-devices.net",
                "registryRead",
                b"secret",
                1_700_000_000
            ),
            "SharedAccessSignature sr=contoso-hub.azure-devices.net\
             &sig=VFEPFDKb4Ad4ESBuhbVqIhDjaRGsLq8dKMVTFwGPL64%3D&se=1700000000&skn=registryRead"
        );
        let python = "SharedAccessSignature sr=localhost%3A8443\
                      &sig=EiIHLrtrEgrBg3LZAOHxyCnxnybCiI/9VqOgFO5T6bg%3D&se=1700000000&skn=registryRead";
        assert_eq!(
            verify(
                Some(python),
                "localhost:8443",
                "registryRead",
                b"secret",
                1_699_999_999
            ),
            Ok(())
        );
        assert_eq!(
            verify(
                Some(python),
                "localhost:8443",
                "registryRead",
                b"secreT",
                1_699_999_999
            ),
            Err(Refusal::BadSignature)
        );
    }

    #[test]
    fn encodes_as_pythons_quote_with_nothing_safe() {
        assert_eq!(url_encode("localhost:8443"), "localhost%3A8443");
        assert_eq!(url_encode("a+b/c=="), "a%2Bb%2Fc%3D%3D");
        assert_eq!(url_encode("A-z_0.9~"), "A-z_0.9~");
    }

    #[test]
    fn verify_accepts_its_own_tokens_and_refuses_every_fault() {
        let host = "contoso-hub.azure-devices.net";
        let good = token(host, "registryRead", b"key", 2000);
        assert_eq!(
            verify(Some(&good), host, "registryRead", b"key", 1000),
            Ok(())
        );
        assert_eq!(
            verify(
                Some(&good),
                "CONTOSO-HUB.azure-devices.net",
                "registryRead",
                b"key",
                1000
            ),
            Ok(())
        );
        assert_eq!(
            verify(Some(&good), host, "registryRead", b"other", 1000),
            Err(Refusal::BadSignature)
        );
        assert_eq!(
            verify(Some(&good), host, "registryRead", b"key", 2000),
            Err(Refusal::Expired)
        );
        assert_eq!(
            verify(
                Some(&good),
                "other.azure-devices.net",
                "registryRead",
                b"key",
                1000
            ),
            Err(Refusal::WrongResource)
        );
        assert_eq!(
            verify(Some(&good), host, "iothubowner", b"key", 1000),
            Err(Refusal::UnknownPolicy)
        );
        assert_eq!(
            verify(None, host, "registryRead", b"key", 1000),
            Err(Refusal::Missing)
        );
        assert_eq!(
            verify(Some("Bearer x"), host, "registryRead", b"key", 1000),
            Err(Refusal::Missing)
        );
        let tampered = good.replace("se=2000", "se=3000");
        assert_eq!(
            verify(Some(&tampered), host, "registryRead", b"key", 1000),
            Err(Refusal::BadSignature)
        );
    }
}
