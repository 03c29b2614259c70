use std::path::PathBuf;

use super::*;
use crate::analyze::Level;

/// A fresh temporary directory holding `files`.
fn dir_with(test: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("warren-load-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

fn notices(state: &ClusterState, code: &str) -> Vec<String> {
    state.notices.iter().filter(|n| n.code == code).map(ToString::to_string).collect()
}

fn errors(state: &ClusterState) -> Vec<String> {
    state.notices.iter().filter(|n| n.level == Level::Error).map(ToString::to_string).collect()
}

fn vs_names(state: &ClusterState) -> Vec<String> {
    state.virtual_services.iter().map(|v| v.metadata.name.clone().unwrap_or_default()).collect()
}

fn vs(name: &str, host: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: shop}}\nspec: {{hosts: [{host}], http: [{{route: [{{destination: {{host: {host}}}}}]}}]}}\n")
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: reviews, namespace: shop}\nspec: {selector: {app: reviews}, ports: [{port: 9080}]}\n";

#[test]
fn kinds_warren_does_not_read_are_skipped_with_one_notice_per_kind() {
    let mut state = ClusterState::default();
    let text = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: a}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: b}\n---\n\
                apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt}\n---\n\
                apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: gw}\n---\n"
        .to_string()
        + SERVICE;
    state.add_yaml(&text).unwrap();
    let skipped = notices(&state, SKIPPED_KIND);
    assert_eq!(skipped.len(), 3, "{skipped:#?}");
    assert!(skipped.iter().any(|n| n.starts_with("Info [WAR0001] (ServiceAccount ") && n.contains("2 ServiceAccount objects skipped") && n.contains("default/a, default/b")), "{skipped:#?}");
    assert!(skipped.iter().any(|n| n.contains("1 Gateway (gateway.networking.k8s.io) object skipped")), "{skipped:#?}");
    // Control: the Service is read, not skipped, and Istio's Gateway kind is not confused with the other one.
    assert_eq!(state.services.len(), 1);
    assert!(state.gateways.is_empty() && errors(&state).is_empty());
}

#[test]
fn workloads_stand_in_for_their_pods_where_the_directory_has_none() {
    let deployment = |name: &str, version: &str, extra: &str| {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  {extra}selector: {{matchLabels: {{app: reviews, version: {version}}}}}\n  \
             template:\n    metadata: {{labels: {{app: reviews, version: {version}}}}}\n    spec: {{serviceAccountName: bookinfo-reviews, containers: [{{name: c}}]}}\n---\n"
        )
    };
    let real_pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: reviews-v2-abc, namespace: shop, uid: u2, labels: {app: reviews, version: v2}}\nspec: {containers: []}\n---\n";
    let text = deployment("reviews-v1", "v1", "") + &deployment("reviews-v2", "v2", "") + &deployment("reviews-v3", "v3", "replicas: 0\n  ") + real_pod + SERVICE;
    let mut state = ClusterState::default();
    state.add_yaml(&text).unwrap();
    let pods: Vec<&str> = state.pods.iter().map(|p| p.name.as_str()).collect();
    // v1: a stand-in; v2: has its real pod (control); v3: scaled to zero, none.
    assert_eq!(pods, ["reviews-v2-abc", "reviews-v1-0"]);
    let stand_in = &state.pods[1];
    assert_eq!((stand_in.namespace.as_str(), stand_in.service_account.as_str()), ("shop", "bookinfo-reviews"));
    assert_eq!(stand_in.labels.get("version").map(String::as_str), Some("v1"));
    assert!(stand_in.ips.is_empty() && stand_in.node.as_deref() == Some(""));
    assert_eq!(stand_in.uid.len(), 36);
    let mut again = ClusterState::default();
    again.add_yaml(&text).unwrap();
    assert_eq!(again.pods[1].uid, stand_in.uid, "the uid is the same on every read");
    assert_eq!(state.sources[&("Pod".into(), "shop".into(), "reviews-v1-0".into())], "<input>:1");
    let told = notices(&state, POD_TEMPLATES);
    assert!(told.len() == 1 && told[0].contains("3 Deployment objects read only for their pod templates") && told[0].contains("1 stand-in pod derived"), "{told:#?}");
    assert!(notices(&state, SKIPPED_KIND).is_empty(), "Deployments are read, not skipped");
}

#[test]
fn a_replica_set_and_its_deployment_stand_in_once() {
    let template = "  selector: {matchLabels: {app: a}}\n  template:\n    metadata: {labels: {app: a}}\n";
    let text = format!("apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: a}}\nspec:\n{template}---\napiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {{name: a-5f8}}\nspec:\n{template}");
    let mut state = ClusterState::default();
    state.add_yaml(&text).unwrap();
    assert_eq!(state.pods.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["a-5f8-0"]);
}

#[test]
fn an_api_version_istio_does_not_serve_is_an_error_and_the_object_is_skipped() {
    let text = vs("a", "reviews").replace("networking.istio.io/v1\n", "networking.istio.io/v9\n") + "---\n" + &vs("b", "reviews").replace("/v1\n", "/v1alpha3\n");
    let mut state = ClusterState::default();
    let err = state.add_yaml(&text).unwrap_err().to_string();
    assert_eq!(
        err,
        "Error [WAR0006] (VirtualService shop/a <input>:1) apiVersion: \"networking.istio.io/v9\" is not served \
         (served: networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3); skipped"
    );
    assert_eq!(vs_names(&state), ["b"], "control: v1alpha3 is served");
    let core = ClusterState::default().add_yaml("apiVersion: v2\nkind: Service\nmetadata: {name: s}\n").unwrap_err().to_string();
    assert!(core.contains("\"v2\" is not served (served: v1)"), "{core}");
    let apps = ClusterState::default().add_yaml("apiVersion: apps/v1beta1\nkind: Deployment\nmetadata: {name: d}\n").unwrap_err().to_string();
    assert!(apps.contains("(served: apps/v1)"), "{apps}");
}

#[test]
fn a_later_definition_replaces_an_earlier_one_with_a_notice_naming_both() {
    let dir = dir_with(
        "redefined",
        &[
            ("a.yaml", &(vs("reviews", "old") + "---\n" + &vs("ratings", "ratings"))),
            ("b.yaml", &format!("# the new one\n{}---\n{}", vs("reviews", "new"), vs("reviews", "other").replace("namespace: shop", "namespace: prod"))),
        ],
    );
    let state = ClusterState::from_dir(&dir).unwrap();
    let reviews: Vec<_> = state.virtual_services.iter().filter(|v| v.metadata.name.as_deref() == Some("reviews")).collect();
    // One in shop (the later definition) and, as a control, the one in another namespace.
    assert_eq!(reviews.len(), 2);
    let shop = reviews.iter().find(|v| v.metadata.namespace.as_deref() == Some("shop")).unwrap();
    assert_eq!(shop.spec.hosts, ["new"]);
    assert_eq!(vs_names(&state).iter().filter(|n| *n == "ratings").count(), 1);
    assert_eq!(
        notices(&state, REDEFINED),
        ["Info [WAR0003] (VirtualService shop/reviews b.yaml:2) defined again: the definition at b.yaml:2 replaces the one at a.yaml:1, as `kubectl apply -f` would leave it"]
    );
    assert_eq!(state.sources[&("VirtualService".into(), "shop".into(), "reviews".into())], "b.yaml:2");
    // add_yaml of an object added before replaces it too.
    let mut added = ClusterState::default();
    added.add_yaml(&vs("reviews", "old")).unwrap();
    added.add_yaml(&vs("reviews", "new")).unwrap();
    assert_eq!(added.virtual_services.len(), 1);
    assert_eq!(added.virtual_services[0].spec.hosts, ["new"]);
    assert_eq!(notices(&added, REDEFINED).len(), 1);
}

#[test]
fn an_object_that_does_not_parse_is_reported_with_its_field_and_the_rest_applies() {
    let bad = vs("bad", "reviews").replace("destination: {host: reviews}}", "destination: {host: reviews}, weight: heavy}");
    let dir = dir_with("bad-object", &[("a.yaml", &format!("{SERVICE}---\n{bad}---\n{}", vs("good", "reviews")))]);
    let state = ClusterState::from_dir(&dir).unwrap();
    assert_eq!(vs_names(&state), ["good"]);
    assert_eq!(state.services.len(), 1);
    assert_eq!(
        errors(&state),
        ["Error [IST0106] (VirtualService shop/bad a.yaml:6) spec.http[0].route[0].weight: invalid type: string \"heavy\", expected i64"]
    );
    // A Pod without a uid is no use to the agent: an error naming the field. A finished pod is just left out.
    let mut pods = ClusterState::default();
    let err = pods
        .add_yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: q, uid: u}\nstatus: {phase: Succeeded}\n")
        .unwrap_err();
    assert!(err.to_string().contains("(Pod default/p <input>:1) metadata.uid: required"), "{err}");
    assert!(pods.pods.is_empty());
}

#[test]
fn a_file_that_is_not_yaml_is_reported_and_the_other_files_apply() {
    let dir = dir_with(
        "not-yaml",
        &[
            ("a.yaml", &vs("a", "reviews")),
            ("b.yaml", "# notes\nkey: [unclosed\n"),
            ("c.yaml", "just some text\n"),
            ("d.yaml", &format!("{}---\nmetadata: {{name: x}}\n", vs("d", "reviews"))),
            ("e.yml", &vs("e", "reviews")),
            ("f.txt", "not read: not a .yaml file"),
        ],
    );
    std::fs::write(dir.join("g.yaml"), b"\xff\xfe binary").unwrap();
    // Not files: a directory and a FIFO (which would block a reader) are passed over; a dangling link is not.
    std::fs::create_dir(dir.join("sub.yaml")).unwrap();
    assert!(std::process::Command::new("mkfifo").arg(dir.join("pipe.yaml")).status().unwrap().success());
    std::os::unix::fs::symlink(dir.join("gone"), dir.join("h.yaml")).unwrap();
    let state = ClusterState::from_dir(&dir).unwrap();
    assert_eq!(vs_names(&state), ["a", "d", "e"]);
    let found = errors(&state);
    assert_eq!(found.len(), 5, "{found:#?}");
    assert!(found[0].starts_with("Error [WAR0004] (b.yaml:3) not valid YAML: did not find expected ',' or ']' at line 3"), "{found:#?}");
    assert!(found[1].contains("c.yaml:1) a string, not a Kubernetes object"), "{found:#?}");
    assert!(found[2].contains("d.yaml:6) not a Kubernetes object: `kind` is missing"), "{found:#?}");
    assert!(found[3].contains("g.yaml) not UTF-8 text"), "{found:#?}");
    assert!(found[4].starts_with("Error [WAR0004] (h.yaml) cannot open: No such file"), "{found:#?}");
}

#[test]
fn limits_reject_deep_nesting_and_large_files_and_objects() {
    let deep = format!("{}\n---\n{}1{}\n", vs("a", "reviews"), "{\"a\": ".repeat(100_000), "}".repeat(100_000));
    let big_value = "x".repeat(MAX_OBJECT_BYTES);
    let big = vs("big", "reviews").replace("metadata: {", &format!("metadata: {{annotations: {{a: {big_value}}}, "));
    let fits = vs("fits", "reviews").replace("metadata: {", &format!("metadata: {{annotations: {{a: {}}}, ", &big_value[..1000]));
    let dir = dir_with("limits", &[("deep.yaml", &deep), ("objects.yaml", &format!("{big}---\n{fits}"))]);
    std::fs::write(dir.join("huge.yaml"), vec![b'#'; MAX_FILE_BYTES as usize + 1]).unwrap();
    let state = ClusterState::from_dir(&dir).unwrap();
    assert_eq!(vs_names(&state), ["a", "fits"], "what is within the limits applies");
    let found = notices(&state, LIMIT_EXCEEDED);
    assert_eq!(found.len(), 3, "{found:#?}");
    assert_eq!(found[0], "Error [WAR0005] (deep.yaml:7) collections nested deeper than 64 levels; the document is skipped");
    assert!(found[1].starts_with("Error [WAR0005] (huge.yaml) 8388609 bytes; files are read up to 8388608 bytes"), "{found:#?}");
    assert!(found[2].starts_with("Error [WAR0005] (VirtualService shop/big objects.yaml:1) 1573") && found[2].contains("objects are read up to 1572864 bytes"), "{found:#?}");
    // Block nesting past the limit is refused while reading the document, with the same limit named.
    let mut block = ClusterState::default();
    let err = block.add_yaml(&format!("a:\n{}1\n", "- ".repeat(100_000))).unwrap_err();
    assert!(err.to_string().contains("[WAR0005] (<input>:2) collections nested deeper than 64 levels; the document is skipped"), "{err}");
}

#[test]
fn a_panic_while_reading_is_an_error_for_that_file() {
    let read = guarded("x.yaml", || panic!("boom"));
    assert_eq!(read.notices.len(), 1);
    assert_eq!(read.notices[0].to_string(), "Error [WAR0004] (x.yaml) reading it panicked (boom): a bug in Warren; its objects are skipped");
    assert_eq!(read.failed, [None]);
    // Control: no panic, the read as it was.
    assert_eq!(guarded("x.yaml", || read_text("x.yaml", &vs("a", "r"))).objects.len(), 1);
}

#[test]
fn a_re_read_keeps_the_last_good_version_of_what_became_unreadable() {
    let dir = dir_with("last-good", &[("a.yaml", &format!("{}---\n{}", vs("a", "one"), vs("b", "one"))), ("c.yaml", &vs("c", "one"))]);
    let mut files = Directory::new(&dir);
    files.refresh().unwrap();
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).unwrap();
    };
    // b's weight is now a string: b's previous version stays, a's edit applies.
    let bad_b = vs("b", "two").replace("{host: two}}", "{host: two}, weight: x}");
    write("a.yaml", &format!("{}---\n{bad_b}", vs("a", "two")));
    assert!(files.refresh().unwrap());
    let state = files.state();
    let hosts = |state: &ClusterState| state.virtual_services.iter().map(|v| (v.metadata.name.clone().unwrap(), v.spec.hosts[0].clone())).collect::<Vec<_>>();
    assert_eq!(hosts(&state), [("a".into(), "two".into()), ("b".into(), "one".into()), ("c".into(), "one".into())]);
    assert_eq!(errors(&state).len(), 1);
    assert_eq!(
        notices(&state, KEPT_PREVIOUS),
        ["Warning [WAR0007] (VirtualService shop/b a.yaml:6) could not be read this time; the version read before (a.yaml:6) stays in force"]
    );
    // Now the whole file is broken: everything it held before stays.
    write("a.yaml", "a: [\n");
    files.refresh().unwrap();
    assert_eq!(hosts(&files.state()), [("a".into(), "two".into()), ("b".into(), "one".into()), ("c".into(), "one".into())]);
    // Fixed, with b removed: b goes.
    write("a.yaml", &vs("a", "three"));
    files.refresh().unwrap();
    let state = files.state();
    assert_eq!(hosts(&state), [("a".into(), "three".into()), ("c".into(), "one".into())]);
    assert!(state.notices.is_empty(), "{:#?}", state.notices);
}

#[test]
fn on_first_read_a_bad_object_is_skipped_and_nothing_is_kept() {
    let bad = vs("b", "one").replace("{host: one}}", "{host: one}, weight: x}");
    let dir = dir_with("first-read", &[("a.yaml", &format!("{}---\n{bad}", vs("a", "one")))]);
    let mut files = Directory::new(&dir);
    files.refresh().unwrap();
    let state = files.state();
    assert_eq!(vs_names(&state), ["a"]);
    assert_eq!(errors(&state).len(), 1);
    assert!(notices(&state, KEPT_PREVIOUS).is_empty());
}

#[test]
fn only_changed_files_are_read_again_and_removed_files_drop_their_objects() {
    let dir = dir_with("changed", &[("a.yaml", &vs("a", "one")), ("b.yaml", &vs("b", "one")), ("c.yaml", &vs("c", "one"))]);
    let mut files = Directory::new(&dir);
    assert!(files.refresh().unwrap());
    assert_eq!(files.reads(), 3);
    assert!(!files.refresh().unwrap(), "nothing changed");
    assert_eq!(files.reads(), 3);
    std::fs::write(dir.join("b.yaml"), vs("b", "two-longer")).unwrap();
    assert!(files.refresh().unwrap());
    assert_eq!(files.reads(), 4, "only b.yaml was read again");
    std::fs::remove_file(dir.join("c.yaml")).unwrap();
    assert!(files.refresh().unwrap());
    assert_eq!(files.reads(), 4);
    let state = files.state();
    assert_eq!(vs_names(&state), ["a", "b"]);
    assert_eq!(state.virtual_services[1].spec.hosts, ["two-longer"]);
    // A missing directory is the one thing that fails.
    assert!(Directory::new(dir.join("nope")).refresh().is_err());
}

#[test]
fn lists_are_read_item_by_item() {
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n- {}\n- {{apiVersion: v1, kind: ConfigMap, metadata: {{name: c}}}}\n",
        "{apiVersion: networking.istio.io/v1, kind: VirtualService, metadata: {name: a}, spec: {hosts: [r]}}"
    );
    let mut state = ClusterState::default();
    state.add_yaml(&list).unwrap();
    assert_eq!(vs_names(&state), ["a"]);
    assert_eq!(notices(&state, SKIPPED_KIND).len(), 1);
}

#[test]
fn serde_yaml_line_numbers_are_moved_to_the_files() {
    assert_eq!(shift_lines("x at line 3 column 1, while parsing a block at line 1 column 1", 10), "x at line 13 column 1, while parsing a block at line 11 column 1");
    assert_eq!(shift_lines("no lines here", 10), "no lines here");
    assert_eq!(shift_lines("line x", 1), "line x");
}

/// The bookinfo app (Services, ServiceAccounts, Deployments) with Istio's networking samples, as one
/// directory: it reads cleanly, the Deployments stand in for pods the subsets select, and the samples'
/// several definitions of `reviews` leave one.
#[test]
fn the_bookinfo_samples_read_as_one_directory() {
    let dir = crate::bookinfo_samples().expect("conformance data (../shared/conformance/istio-bookinfo, or $WARREN_CONFORMANCE_DIR)");
    assert!(dir.join("bookinfo.yaml").is_file(), "{} has no bookinfo.yaml", dir.display());
    let state = ClusterState::from_dir(&dir).unwrap();
    assert_eq!(errors(&state), Vec::<String>::new());
    let mut services: Vec<_> = state.services.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
    services.sort();
    assert_eq!(services, ["details", "productpage", "ratings", "reviews"]);
    let mut pods: Vec<_> = state.pods.iter().map(|p| p.name.as_str()).collect();
    pods.sort();
    assert_eq!(pods, ["details-v1-0", "productpage-v1-0", "ratings-v1-0", "reviews-v1-0", "reviews-v2-0", "reviews-v3-0"]);
    assert!(state.pods.iter().all(|p| p.namespace == "default" && p.service_account.starts_with("bookinfo-")));
    assert_eq!(vs_names(&state).iter().filter(|n| *n == "reviews").count(), 1);
    assert_eq!(state.destination_rules.iter().filter(|d| d.metadata.name.as_deref() == Some("reviews")).count(), 1);
    // Every subset of reviews selects a pod of the reviews Service.
    let reviews = state.destination_rules.iter().find(|d| d.spec.host == "reviews").unwrap();
    for subset in &reviews.spec.subsets {
        let selected = state.pods.iter().any(|p| p.labels.get("app").map(String::as_str) == Some("reviews") && subset.labels.iter().all(|(k, v)| p.labels.get(k) == Some(v)));
        assert!(selected, "subset {} selects no pod", subset.name);
    }
    assert_eq!(notices(&state, SKIPPED_KIND).len(), 1, "ServiceAccounts");
    assert!(!notices(&state, REDEFINED).is_empty());
    // bookinfo.yaml's Services have no clusterIP: the directory gives each one, as the API server would.
    let compiled = crate::compile::compile(&state);
    for name in services {
        let resource = compiled.resources.get(&format!("service/default/{name}")).map(|r| r.as_ref());
        let Some(crate::tables::Resource::Service(service)) = resource else { panic!("{name}") };
        assert_eq!(service.vips.len(), 1, "{name}: {:?}", service.vips);
        assert!(service.vips[0].to_string().starts_with("10.96."), "{name}: {:?}", service.vips);
    }
}

