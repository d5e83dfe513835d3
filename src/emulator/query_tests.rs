//! The twin query emulator against Microsoft's official Python service client
//! (`azure-iot-hub` from PyPI, `IoTHubRegistryManager.query_iot_hub`), over HTTPS with the
//! emulator's generated certificate trusted through `REQUESTS_CA_BUNDLE`.

use std::path::Path;

use serde_json::Value as Json;

use super::query::{QueryEmulator, QueryEmulatorConfig, QueryFault, TwinDocuments};
use super::tests::{python_venv, run_check};
use crate::generate::GenerateOptions;

/// What the check script prints of a twin, reduced to what the emulator must carry over
/// unchanged.
fn essentials(twin: &Json) -> Json {
    serde_json::json!({
        "deviceId": twin["deviceId"],
        "moduleId": twin.get("moduleId").cloned().unwrap_or(Json::Null),
        "etag": twin["etag"],
        "version": twin["version"],
        "tags": twin["tags"],
        "properties": twin["properties"],
        "status": twin["status"],
        "connectionState": twin["connectionState"],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_reads_every_twin_page_by_page() {
    const PAGE: usize = 25;
    // azure-iot-hub 2.7 imports `six` without declaring it.
    let python = python_venv(
        "iothub-venv",
        "azure.iot.hub",
        &["azure-iot-hub==2.*", "six"],
    )
    .await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/iothub_query_check.py");
    assert!(script.exists(), "{} is missing", script.display());

    let fleet = GenerateOptions {
        devices: 70,
        events: 4000,
        seed: 21,
        hub: "fleet-hub".into(),
        noise: 0.0,
    };
    let twins = TwinDocuments::generated(&fleet, fleet.events);
    let mut expected_devices = Vec::new();
    let mut expected_modules = Vec::new();
    crate::generate::documents::twin_documents(&fleet, None, |json, is_module| {
        let value: Json = serde_json::from_slice(json).expect("json");
        if is_module {
            expected_modules.push(essentials(&value));
        } else {
            expected_devices.push(essentials(&value));
        }
    });
    assert!(expected_devices.len() > PAGE * 2 && expected_modules.len() > PAGE);

    let emulator = QueryEmulator::start(
        QueryEmulatorConfig::new("fleet-hub", Some(([127, 0, 0, 1], 0).into()), None),
        twins,
    )
    .await
    .expect("emulator starts");
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, emulator.ca_certificate_pem()).expect("ca");
    // The second device page is throttled once.
    emulator.inject_after(
        1,
        QueryFault::Throttle {
            retry_after_secs: 1,
        },
        1,
    );

    let seen = run_check(
        tokio::process::Command::new(&python)
            .arg(&script)
            .arg(emulator.connection_string().to_secret_string())
            .arg(emulator.https_addr().expect("https").to_string())
            .arg(PAGE.to_string())
            .env("REQUESTS_CA_BUNDLE", &ca),
    )
    .await;

    for (name, expected) in [
        ("devices", &expected_devices),
        ("modules", &expected_modules),
    ] {
        let seen = &seen[name];
        let twins: Vec<Json> = seen["twins"]
            .as_array()
            .expect("twins")
            .iter()
            .map(essentials)
            .collect();
        assert_eq!(&twins, expected, "{name}: every twin, in order, as served");
        let pages: Vec<usize> = seen["pages"]
            .as_array()
            .expect("pages")
            .iter()
            .map(|n| n.as_u64().expect("count") as usize)
            .collect();
        let full = expected.len() / PAGE;
        let mut expected_pages = vec![PAGE; full];
        if expected.len() % PAGE != 0 {
            expected_pages.push(expected.len() % PAGE);
        }
        assert_eq!(pages, expected_pages, "{name}: page by page");
    }
    assert_eq!(seen["devices"]["throttled"], serde_json::json!([1.0]));
    assert_eq!(seen["modules"]["throttled"], serde_json::json!([]));
    assert_eq!(emulator.refused(), 0);
    let pages = seen["devices"]["pages"].as_array().map_or(0, Vec::len)
        + seen["modules"]["pages"].as_array().map_or(0, Vec::len);
    assert_eq!(
        emulator.queries(),
        pages as u64 + 1,
        "every page once, plus the 429"
    );
    emulator.shutdown().await;
}
