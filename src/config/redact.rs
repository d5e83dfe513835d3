//! How URLs and secrets show in errors, logs and `Debug` output.

/// `url` without user-info (`user:password@`), query or fragment, which may hold secrets:
/// the form that names a sink in errors and logs.
pub fn redacted_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = authority.rsplit('@').next().unwrap_or(authority);
    match scheme {
        Some(scheme) => format!("{scheme}://{host}{path}"),
        None => format!("{host}{path}"),
    }
}

/// `url` with any user-info (`user:password@`) and query or fragment (`?token=...`) replaced
/// by `<redacted>`: the form of a URL in logs, errors and `Debug` output. Scheme, host, port
/// and path stay, so the operator can still tell which endpoint is meant.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let (rest, had_query) = match rest.find(['?', '#']) {
        Some(i) => (&rest[..i], true),
        None => (rest, false),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = match authority.rsplit_once('@') {
        Some((_, host)) => format!("<redacted>@{host}"),
        None => authority.to_owned(),
    };
    let query = if had_query { "?<redacted>" } else { "" };
    match scheme {
        Some(scheme) => format!("{scheme}://{host}{path}{query}"),
        None => format!("{host}{path}{query}"),
    }
}

/// How an optional secret shows in `Debug`: whether it is set, never its value.
pub(super) fn redacted(value: &Option<String>) -> &'static str {
    if value.is_some() {
        "Some(<redacted>)"
    } else {
        "None"
    }
}

/// How an optional URL shows in `Debug`: [`redact_url`].
pub(super) fn redacted_url_opt(value: &Option<String>) -> Option<String> {
    value.as_deref().map(redact_url)
}
