//! The policy loader: each input is a policy file (YAML, or JSON, which is YAML), loaded and
//! compiled; a policy that loads is evaluated on a few twins. Any panic is a defect: a bad
//! policy must be a policy error naming the file and the problem.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinwatch::policy::{Policy, TwinView};
use twinwatch::twin::normalize;

const TWINS: &[&str] = &[
    r#"{"tags":{"env":"prod"},"properties":{"reported":{"agent":{"version":"1.2.3","enabled":true},"ports":[22,443]},"desired":{}}}"#,
    r#"{"properties":{"reported":{"$metadata":{},"a":{"b":[1,2,{"c":null}]}}}}"#,
    r#"{}"#,
];

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    let Ok(policy) = Policy::from_sources(&[("fuzz.yaml".to_string(), text)]) else {
        return;
    };
    let mut failing = Vec::new();
    for (i, twin) in TWINS.iter().enumerate() {
        let mut bytes = twin.as_bytes().to_vec();
        let Ok(tape) = simd_json::to_tape(&mut bytes) else {
            continue;
        };
        let doc = normalize(&tape.0);
        for module_id in ["", "azureiotsecurity"] {
            failing.clear();
            policy.evaluate(
                &TwinView {
                    hub_name: "hub",
                    device_id: "device",
                    module_id,
                    version: i as i64 + 1,
                    doc: &doc,
                    modules: &["azureiotsecurity"],
                },
                &mut failing,
            );
        }
    }
});
