//! The query API (`/v1/*`, JSON, read-only), served from the store beside the running
//! pipeline. Reads run on tokio's blocking pool; a twin and its violations come from one
//! RocksDB snapshot. An optional bearer token protects every route; every error is JSON with a
//! stable code:
//!
//! - `GET /v1/twins/{hub}/{device}` and `GET /v1/twins/{hub}/{device}/modules/{module}`:
//!   `{"twin": <its export line>, "violations": [<its violation lines>]}`;
//! - `GET /v1/violations?state=&rule=&severity=&hub=&limit=&cursor=`: `{"violations": [...],
//!   "next": <cursor> | null}`, in `twinwatch violations` order; `state` is `open` (the
//!   default: the violations that alerted) or `pending` (failures of rules with `for` that have
//!   not lasted long enough yet, `docs/semantics.md` §9, each line with its `deadline`), as
//!   `twinwatch violations [--pending]` prints them;
//! - `GET /v1/stats`: the service's counts, violations by severity and rule, checkpoints.

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::compliance::violation_line;
use crate::config::Secret;
use crate::model::TwinKey;
use crate::policy::Severity;
use crate::store::keys::twin_key;
use crate::store::{Store, StoreError, StoredViolation};
use crate::twin::export_value;

/// The service's live counts for `/v1/stats` (twins, tombstones, messages, outbox...).
pub type StatsFn = Arc<dyn Fn() -> Value + Send + Sync>;

/// Violations returned per page by default, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
/// Entries one `/v1/violations` request looks at, at most: a selective filter returns a
/// short page and a cursor rather than walking millions of entries at once.
const MAX_SCAN: usize = 100_000;
/// `/v1` requests served at once, at most; more wait (within the listener's request timeout).
/// Each holds a thread of the blocking pool and a RocksDB iterator, and `/metrics` and the
/// probes must keep answering while a client floods the API.
const MAX_CONCURRENT_REQUESTS: usize = 16;

#[derive(Clone)]
struct Api {
    store: Arc<Store>,
    token: Option<Arc<Secret>>,
    stats: StatsFn,
}

/// An error answer: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code, "message": self.message}}));
        if self.status == StatusCode::UNAUTHORIZED {
            (self.status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
        } else {
            (self.status, body).into_response()
        }
    }
}

/// The `/v1` routes, to merge into the service's router.
pub fn router(store: Arc<Store>, token: Option<Secret>, stats: StatsFn) -> Router {
    let api = Api {
        store,
        token: token.map(Arc::new),
        stats,
    };
    let v1 = Router::new()
        .route("/twins/{hub}/{device}", get(device_twin))
        .route("/twins/{hub}/{device}/modules/{module}", get(module_twin))
        .route("/violations", get(violations))
        .route("/stats", get(stats_handler))
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(api.clone(), authorize))
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            MAX_CONCURRENT_REQUESTS,
        ))
        .with_state(api);
    Router::new().nest("/v1", v1)
}

/// What `/v1/*` answers when the API is not served (no token on an address other than
/// loopback, see `Config::serves_api`): `403` with the reason, rather than a bare `404` that
/// would look like a wrong path.
pub fn disabled_router() -> Router {
    let refuse = || async {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "api_disabled",
            "the query API is off: it needs an API token (TWINWATCH_API_TOKEN or \
             api_token_file) when the service listens on an address other than loopback",
        )
    };
    Router::new()
        .route("/v1", get(refuse))
        .route("/v1/{*rest}", get(refuse))
}

/// Equal in time independent of where two tokens differ.
fn same_token(given: &[u8], expected: &[u8]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn authorize(
    State(api): State<Api>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = &api.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        if !given.is_some_and(|g| same_token(g, token.expose().as_bytes())) {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid bearer token is required",
            )
            .into_response();
        }
    }
    next.run(request).await
}

/// Runs a store read on the blocking pool.
async fn blocking<T: Send + 'static>(
    read: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(read)
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

async fn device_twin(
    State(api): State<Api>,
    Path((hub, device)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    twin(api, hub, device, String::new()).await
}

async fn module_twin(
    State(api): State<Api>,
    Path((hub, device, module)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    if module.is_empty() {
        return Err(ApiError::not_found("no such twin"));
    }
    twin(api, hub, device, module).await
}

async fn twin(
    api: Api,
    hub: String,
    device: String,
    module: String,
) -> Result<Json<Value>, ApiError> {
    blocking(move || {
        let key = TwinKey {
            hub: &hub,
            device_id: &device,
            module_id: &module,
        };
        let Some((record, stored)) = api.store.twin_with_violations(&twin_key(key))? else {
            return Err(ApiError::not_found("no such twin"));
        };
        let mut violations = Vec::with_capacity(stored.len());
        for v in stored {
            violations.push(violation_line(key, &v.rule_id, &v));
        }
        let twin = export_value(key, record.version, &record.doc);
        let twin = serde_json::to_value(&twin).map_err(|e| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
        Ok(Json(json!({"twin": twin, "violations": violations})))
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ViolationQuery {
    state: Option<String>,
    rule: Option<String>,
    severity: Option<String>,
    hub: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

async fn violations(
    State(api): State<Api>,
    query: Result<Query<ViolationQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = match &query.limit {
        None => DEFAULT_LIMIT,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit must be between 1 and {MAX_LIMIT}"))
            })?,
    };
    let pending = match query.state.as_deref() {
        None | Some("open") => false,
        Some("pending") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown state {other:?}: open or pending"
            )))
        }
    };
    let severity = match &query.severity {
        None => None,
        Some(name) => Some(Severity::parse(name).ok_or_else(|| {
            ApiError::bad_request(format!(
                "unknown severity {name:?}: info, low, medium, high or critical"
            ))
        })?),
    };
    let after = match &query.cursor {
        None => None,
        Some(cursor) => Some(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(cursor)
                .map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_cursor",
                        "the cursor is not one this API gave",
                    )
                })?,
        ),
    };
    // A hub is the first component of every key: its encoded form is their prefix.
    let prefix = match &query.hub {
        Some(hub) => {
            let mut key = twin_key(TwinKey {
                hub,
                device_id: "",
                module_id: "",
            });
            key.truncate(key.len() - 4);
            key
        }
        None => Vec::new(),
    };
    if after.as_ref().is_some_and(|a| !a.starts_with(&prefix)) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_cursor",
            "the cursor does not belong to this hub",
        ));
    }
    blocking(move || {
        let rule = query.rule.as_deref();
        let keep = |v: &crate::model::Violation| {
            rule.is_none_or(|r| r == &*v.rule_id) && severity.is_none_or(|s| v.severity == s)
        };
        let (page, next) = if pending {
            api.store
                .pending_violations_page(&prefix, after.as_deref(), limit, MAX_SCAN, keep)?
        } else {
            api.store
                .violations_page(&prefix, after.as_deref(), limit, MAX_SCAN, keep)?
        };
        let lines: Vec<Value> = page
            .iter()
            .map(|StoredViolation { key, violation: v }| {
                let mut line = violation_line(key.as_key(), &v.rule_id, v);
                if let Some(pending) = &v.pending {
                    line["deadline"] = json!(pending.deadline.to_string());
                }
                line
            })
            .collect();
        let next = next.map(|k| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(k));
        Ok(Json(json!({"violations": lines, "next": next})))
    })
    .await
}

async fn stats_handler(State(api): State<Api>) -> Result<Json<Value>, ApiError> {
    let live = (api.stats)();
    let store = api.store.clone();
    blocking(move || {
        // The service's live counts carry the violation counts once its engine has exported
        // them (the failing twins by rule it keeps): then no scan per request.
        let counted = live.get("violations").is_some();
        // Otherwise violations are counted by a scan: there are far fewer of them than twins.
        let mut total = 0u64;
        let mut by_severity: Map<String, Value> = Map::new();
        let mut by_rule: Map<String, Value> = Map::new();
        let scan = if counted {
            None
        } else {
            Some(store.violations()?)
        };
        for item in scan.into_iter().flatten() {
            let StoredViolation { violation: v, .. } = item?;
            total += 1;
            let bump = |map: &mut Map<String, Value>, name: &str| {
                let n = map.get(name).and_then(Value::as_u64).unwrap_or(0);
                map.insert(name.to_owned(), json!(n + 1));
            };
            bump(&mut by_severity, v.severity.as_str());
            bump(&mut by_rule, &v.rule_id);
        }
        let checkpoints: Vec<Value> = store
            .checkpoints()?
            .into_iter()
            .map(|(source, checkpoint)| {
                let mut line = json!({"source": source.to_text()});
                if let (Some(line), Ok(Value::Object(fields))) =
                    (line.as_object_mut(), serde_json::to_value(&checkpoint))
                {
                    line.extend(fields);
                }
                line
            })
            .collect();
        let mut out = json!({
            "violations": {"total": total, "bySeverity": by_severity, "byRule": by_rule},
            "checkpoints": checkpoints,
        });
        if let (Some(out), Value::Object(live)) = (out.as_object_mut(), live) {
            out.extend(live);
        }
        Ok(Json(out))
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    use super::*;
    use crate::generate::{write_json_lines, GenerateOptions};
    use crate::model::{OwnedTwinKey, SourceId};
    use crate::pipeline::{Engine, EngineOptions};
    use crate::store::StoreOptions;
    use crate::twin::Slot;

    /// A device id with what IoT Hub allows and URLs must escape.
    const ODD: &str = "odd/dev %41+é#?!(),:=@$'";

    /// A snapshot of a generated fleet (baseline policy: violations), plus the history of its
    /// first device again under the id [`ODD`].
    /// (Under the baseline without its grace periods: the fleet's minutes are shorter than
    /// most, and the paging tests want many open violations.)
    fn fleet() -> (tempfile::TempDir, Arc<Store>) {
        let policy = crate::policy::Policy::from_sources(&[(
            "baseline.yaml".into(),
            baseline_without_for(),
        )])
        .expect("the policy loads");
        fleet_with(EngineOptions {
            policy: Arc::new(policy),
            ..EngineOptions::default()
        })
    }

    /// The built-in pack's text without its `for` lines.
    fn baseline_without_for() -> String {
        include_str!("../../policies/security-twin-baseline.yaml")
            .lines()
            .filter(|line| !line.starts_with("    for:"))
            .fold(String::new(), |text, line| text + line + "\n")
    }

    /// [`fleet`] evaluated with `options` (a policy with grace periods, say).
    fn fleet_with(options: EngineOptions) -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut text = Vec::new();
        let opts = GenerateOptions {
            devices: 40,
            events: 1500,
            seed: 7,
            hub: "contoso-hub".into(),
            noise: 0.0,
        };
        write_json_lines(&opts, &mut text).expect("generate");
        let text = String::from_utf8(text).expect("utf-8");
        // The history of a device that is never deleted, under the odd id.
        let history = |id: &str| -> Vec<&str> {
            let quoted = format!("\"{id}\"");
            text.lines().filter(|l| l.contains(&quoted)).collect()
        };
        let kept = (0..opts.devices)
            .map(|i| format!("sensor-{i:06}"))
            .find(|id| {
                let lines = history(id);
                !lines.is_empty() && !lines.iter().any(|l| l.contains("deleteDeviceIdentity"))
            })
            .expect("a device that is never deleted");
        let odd: Vec<String> = history(&kept)
            .iter()
            .map(|l| l.replace(&format!("\"{kept}\""), &format!("{ODD:?}")))
            .collect();
        let store = Arc::new(Store::open(dir.path(), &StoreOptions::default()).expect("store"));
        let mut engine = Engine::new(store.clone(), options).expect("engine");
        let (source, _) = engine
            .add_source(SourceId::File("fleet.json".into()), "fleet.json".into())
            .expect("source");
        for (i, line) in text
            .lines()
            .chain(odd.iter().map(String::as_str))
            .enumerate()
        {
            engine
                .ingest_json_line(source, i as u64, 0, line.as_bytes())
                .expect("ingest");
        }
        engine.finish().expect("finish");
        (dir, store)
    }

    fn app(store: &Arc<Store>, token: Option<&str>) -> Router {
        let stats: StatsFn = Arc::new(|| json!({"twins": 7, "checkpoints": "overridden"}));
        router(store.clone(), token.map(|t| Secret::new(t.into())), stats)
    }

    async fn get_json(app: &Router, uri: &str, token: Option<&str>) -> (StatusCode, Value) {
        let mut request = Request::get(uri);
        if let Some(token) = token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let response = app
            .clone()
            .oneshot(request.body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 24)
            .await
            .expect("body");
        (status, serde_json::from_slice(&bytes).expect("JSON body"))
    }

    fn encode(segment: &str) -> String {
        segment
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    /// Every violation line, as `twinwatch violations` prints them, by twin.
    fn all_violations(store: &Store) -> Vec<(OwnedTwinKey, Value)> {
        store
            .violations()
            .expect("violations")
            .map(|item| {
                let StoredViolation { key, violation: v } = item.expect("violation");
                let line = violation_line(key.as_key(), &v.rule_id, &v);
                (key, line)
            })
            .collect()
    }

    /// Every pending violation line, as `twinwatch violations --pending` prints them.
    fn all_pending(store: &Store) -> Vec<Value> {
        store
            .pending_violations()
            .expect("pending violations")
            .map(|item| {
                let StoredViolation { key, violation: v } = item.expect("violation");
                let mut line = violation_line(key.as_key(), &v.rule_id, &v);
                let pending = v.pending.expect("a pending violation has a deadline");
                line["deadline"] = json!(pending.deadline.to_string());
                line
            })
            .collect()
    }

    fn uri_of(key: &OwnedTwinKey) -> String {
        let mut uri = format!("/v1/twins/{}/{}", encode(&key.hub), encode(&key.device_id));
        if !key.module_id.is_empty() {
            uri.push_str(&format!("/modules/{}", encode(&key.module_id)));
        }
        uri
    }

    #[tokio::test]
    async fn every_twin_is_its_export_line_with_its_violations() {
        let (_dir, store) = fleet();
        let app = app(&store, None);
        let mut by_twin: BTreeMap<OwnedTwinKey, Vec<Value>> = BTreeMap::new();
        for (key, line) in all_violations(&store) {
            by_twin.entry(key).or_default().push(line);
        }
        let mut modules = 0;
        let mut n = 0;
        for item in store.twins().expect("twins") {
            let (key, record) = item.expect("twin");
            let expected =
                serde_json::to_value(export_value(key.as_key(), record.version, &record.doc))
                    .expect("json");
            let (status, body) = get_json(&app, &uri_of(&key), None).await;
            assert_eq!(status, StatusCode::OK, "{key:?}");
            assert_eq!(body["twin"], expected, "{key:?}");
            let violations = by_twin.remove(&key).unwrap_or_default();
            assert_eq!(body["violations"], json!(violations), "{key:?}");
            modules += usize::from(!key.module_id.is_empty());
            n += 1;
        }
        assert!(n > 40 && modules > 0, "{n} twins, {modules} modules");
        assert!(by_twin.is_empty(), "violations of no twin: {by_twin:?}");
        let odd = OwnedTwinKey {
            hub: "contoso-hub".into(),
            device_id: ODD.into(),
            module_id: "".into(),
        };
        let (status, body) = get_json(&app, &uri_of(&odd), None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["twin"]["deviceId"], ODD);
    }

    #[tokio::test]
    async fn missing_and_deleted_twins_are_not_found() {
        let (_dir, store) = fleet();
        let app = app(&store, None);
        let mut deleted = None;
        store
            .for_each_slot(|key, slot| {
                if matches!(slot, Slot::Dead { .. }) {
                    deleted.get_or_insert(key);
                }
            })
            .expect("slots");
        let deleted = deleted.expect("the fleet deletes some twin");
        for uri in [
            uri_of(&deleted),
            "/v1/twins/contoso-hub/no-such-device".to_owned(),
            "/v1/twins/contoso-hub/sensor-000001/modules/no-such-module".to_owned(),
        ] {
            let (status, body) = get_json(&app, &uri, None).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{uri}");
            assert_eq!(body["error"]["code"], "not_found", "{uri}");
        }
        let (status, body) = get_json(&app, "/v1/nothing/here", None).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (StatusCode::NOT_FOUND, &json!("not_found"))
        );
    }

    /// Walks every page of `query`, returning the lines in order.
    async fn walk(app: &Router, query: &str) -> Vec<Value> {
        let mut lines = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..10_000 {
            let mut uri = format!("/v1/violations?limit=7{query}");
            if let Some(c) = &cursor {
                uri.push_str(&format!("&cursor={c}"));
            }
            let (status, body) = get_json(app, &uri, None).await;
            assert_eq!(status, StatusCode::OK, "{uri}: {body}");
            let page = body["violations"].as_array().expect("array").clone();
            assert!(page.len() <= 7);
            lines.extend(page);
            match body["next"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => return lines,
            }
        }
        panic!("no end of pages");
    }

    #[tokio::test]
    async fn pages_of_violations_are_the_whole_filtered_list_in_order() {
        let (_dir, store) = fleet();
        let app = app(&store, None);
        let all: Vec<Value> = all_violations(&store).into_iter().map(|(_, l)| l).collect();
        assert!(all.len() > 20, "only {} violations", all.len());
        assert_eq!(walk(&app, "").await, all);
        let rule = all[all.len() / 2]["ruleId"]
            .as_str()
            .expect("rule")
            .to_owned();
        let of_rule: Vec<Value> = all
            .iter()
            .filter(|l| l["ruleId"] == rule.as_str())
            .cloned()
            .collect();
        assert_eq!(
            walk(&app, &format!("&rule={}", encode(&rule))).await,
            of_rule
        );
        for severity in ["info", "low", "medium", "high", "critical"] {
            let expected: Vec<Value> = all
                .iter()
                .filter(|l| l["severity"] == severity)
                .cloned()
                .collect();
            assert_eq!(walk(&app, &format!("&severity={severity}")).await, expected);
        }
        assert_eq!(walk(&app, "&hub=contoso-hub").await, all);
        assert!(walk(&app, "&hub=contoso").await.is_empty());
        // The default page, and a limit past the end.
        let (_, body) = get_json(&app, "/v1/violations?limit=1000", None).await;
        assert_eq!(body["violations"].as_array().map(Vec::len), Some(all.len()));
        assert_eq!(body["next"], Value::Null);
    }

    /// `state=pending` pages the pending violations with their deadlines, `state=open` (and
    /// no state) the open ones; the filters apply to both.
    #[tokio::test]
    async fn violations_are_filtered_by_state_and_pending_ones_carry_their_deadline() {
        // The baseline with its own grace periods replaced by a day on high-severity rules
        // (no failure lasts that long in the fleet's minutes) and two minutes on medium ones
        // (some do).
        let text = baseline_without_for()
            .replace("    severity: high\n", "    severity: high\n    for: P1D\n")
            .replace(
                "    severity: medium\n",
                "    severity: medium\n    for: PT2M\n",
            );
        let policy = crate::policy::Policy::from_sources(&[("grace.yaml".into(), text)])
            .expect("the policy loads");
        let (_dir, store) = fleet_with(EngineOptions {
            policy: Arc::new(policy),
            ..EngineOptions::default()
        });
        let app = app(&store, None);
        let open: Vec<Value> = all_violations(&store).into_iter().map(|(_, l)| l).collect();
        let pending = all_pending(&store);
        assert!(pending.len() > 10, "only {} pending", pending.len());
        assert!(
            open.iter().any(|l| l["severity"] == "medium"),
            "no medium rule outlasted its grace period"
        );
        assert!(open.iter().all(|l| l["severity"] != "high"));
        assert_eq!(walk(&app, "").await, open);
        assert_eq!(walk(&app, "&state=open").await, open);
        assert_eq!(walk(&app, "&state=pending").await, pending);
        for severity in ["medium", "high"] {
            let expected: Vec<Value> = pending
                .iter()
                .filter(|l| l["severity"] == severity)
                .cloned()
                .collect();
            assert!(!expected.is_empty(), "no pending {severity} violation");
            assert_eq!(
                walk(&app, &format!("&state=pending&severity={severity}")).await,
                expected
            );
        }
        let rule = pending[0]["ruleId"].as_str().expect("rule").to_owned();
        let of_rule: Vec<Value> = pending
            .iter()
            .filter(|l| l["ruleId"] == rule.as_str())
            .cloned()
            .collect();
        assert_eq!(
            walk(&app, &format!("&rule={}&state=pending", encode(&rule))).await,
            of_rule
        );
        let (status, body) = get_json(&app, "/v1/violations?state=resolved", None).await;
        assert_eq!(
            (status, &body["error"]["code"]),
            (StatusCode::BAD_REQUEST, &json!("bad_request"))
        );
    }

    #[tokio::test]
    async fn bad_parameters_are_refused_with_their_code() {
        let (_dir, store) = fleet();
        let app = app(&store, None);
        for (uri, code) in [
            ("/v1/violations?limit=0", "bad_request"),
            ("/v1/violations?limit=1001", "bad_request"),
            ("/v1/violations?limit=ten", "bad_request"),
            ("/v1/violations?severity=urgent", "bad_request"),
            ("/v1/violations?colour=red", "bad_request"),
            ("/v1/violations?cursor=%%%", "invalid_cursor"),
            (
                "/v1/violations?cursor=bm90LWEta2V5&hub=other",
                "invalid_cursor",
            ),
        ] {
            let (status, body) = get_json(&app, uri, None).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
            assert_eq!(body["error"]["code"], code, "{uri}: {body}");
        }
    }

    #[tokio::test]
    async fn the_token_guards_every_route() {
        let (_dir, store) = fleet();
        let app = app(&store, Some("s3cret"));
        for uri in [
            "/v1/stats",
            "/v1/violations",
            "/v1/twins/contoso-hub/sensor-000001",
        ] {
            for token in [None, Some("wrong"), Some("s3cret-but-longer")] {
                let (status, body) = get_json(&app, uri, token).await;
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri} {token:?}");
                assert_eq!(body["error"]["code"], "unauthorized");
            }
            let (status, _) = get_json(&app, uri, Some("s3cret")).await;
            assert_eq!(status, StatusCode::OK, "{uri}");
        }
        // Merged into the service's router, the other routes stay open.
        let merged = Router::new()
            .route("/metrics", get(|| async { "m" }))
            .merge(app);
        let response = merged
            .oneshot(
                Request::get("/metrics")
                    .body(Body::empty())
                    .expect("request"),
            )
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn stats_count_the_store_and_carry_the_live_counts() {
        let (_dir, store) = fleet();
        let app = app(&store, None);
        let (status, body) = get_json(&app, "/v1/stats", None).await;
        assert_eq!(status, StatusCode::OK);
        let all = all_violations(&store);
        assert_eq!(body["violations"]["total"], json!(all.len()));
        let high = all.iter().filter(|(_, l)| l["severity"] == "high").count();
        assert_eq!(
            body["violations"]["bySeverity"]["high"]
                .as_u64()
                .unwrap_or(0),
            high as u64
        );
        let by_rule: u64 = body["violations"]["byRule"]
            .as_object()
            .expect("object")
            .values()
            .filter_map(Value::as_u64)
            .sum();
        assert_eq!(by_rule, all.len() as u64);
        // The live counts win over what the store says.
        assert_eq!(body["twins"], 7);
        assert_eq!(body["checkpoints"], "overridden");
    }

    /// Issue 23: `/v1/stats` scanned every violation per request; with the engine's counts in
    /// the live stats, those are served (and the checkpoints still come from the store).
    #[tokio::test]
    async fn stats_take_the_engines_violation_counts_when_given() {
        let (_dir, store) = fleet();
        let counts = json!({"total": 3, "bySeverity": {"high": 3}, "byRule": {"r": 3}});
        let stats: StatsFn = {
            let counts = counts.clone();
            Arc::new(move || json!({"violations": counts}))
        };
        let app = router(store.clone(), None, stats);
        let (status, body) = get_json(&app, "/v1/stats", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["violations"], counts);
        assert!(!all_violations(&store).is_empty());
        assert!(
            body["checkpoints"]
                .as_array()
                .is_some_and(|c| !c.is_empty()),
            "{body}"
        );
    }

    /// Without a token on an address other than loopback, `/v1/*` is refused with a reason.
    #[tokio::test]
    async fn the_disabled_api_says_why() {
        let app = disabled_router();
        for uri in ["/v1", "/v1/stats", "/v1/twins/hub/device"] {
            let (status, body) = get_json(&app, uri, None).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{uri}");
            assert_eq!(body["error"]["code"], "api_disabled", "{uri}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"ab", b"abc"));
        assert!(!same_token(b"", b"abc"));
    }
}
