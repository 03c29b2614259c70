//! YAML → ClusterState (Kubernetes and Istio types) → validate, analyze, compile: whatever a user or the API
//! server hands the controller must never panic it. Calls only the public entry points.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_config::{analyze, cluster::ClusterState, compile, validate};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut state = ClusterState::default();
    // A stream that fails part-way keeps the objects read before the failure: fuzz those too.
    let _ = state.add_yaml(text);
    for vs in &state.virtual_services {
        let _ = validate::virtual_service(&vs.spec);
    }
    for dr in &state.destination_rules {
        let _ = validate::destination_rule(&dr.spec);
    }
    for ap in &state.authorization_policies {
        let _ = validate::authorization_policy(&ap.spec);
    }
    let _ = analyze::analyze(&state);
    let _ = compile::compile(&state);
});
