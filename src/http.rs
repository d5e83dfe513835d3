//! The service's HTTP listener: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive) and `/readyz` (connected to the Event Hub, every owned partition's receiver attached,
//! the pipeline running; the store was opened before the listener started).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::json;

use crate::app::ServiceState;

pub fn router(state: Arc<ServiceState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

async fn metrics(State(state): State<Arc<ServiceState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(state): State<Arc<ServiceState>>) -> impl IntoResponse {
    let mut problems = Vec::new();
    if let Some(error) = state.failed.lock().ok().and_then(|f| f.clone()) {
        problems.push(format!("the pipeline failed: {error}"));
    }
    match state.health.get() {
        None => {
            let reason = state
                .connect_error
                .lock()
                .ok()
                .and_then(|e| e.clone())
                .unwrap_or_else(|| "connecting".to_owned());
            problems.push(format!("not connected to the Event Hub: {reason}"));
        }
        Some(health) => {
            if let Some(error) = health.fatal_error() {
                problems.push(format!("cannot consume: {error}"));
            }
            for (id, partition) in &health.partitions {
                if !partition.connected.load(Ordering::Relaxed) {
                    problems.push(format!("partition {id} is not connected"));
                }
            }
        }
    }
    if problems.is_empty() {
        (StatusCode::OK, axum::Json(json!({"ready": true}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"ready": false, "problems": problems})),
        )
            .into_response()
    }
}
