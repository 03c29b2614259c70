//! `warren-agent inspect maps` against a live agent, and its errors.
use std::process::Command;

use warren_testbed::{ECHO_PORT, Testbed, bin_path, require_privileges};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}
fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn inspect_maps_shows_enrolled_netns_and_original_destinations() {
    require_privileges!();
    let bed = Testbed::new("inspect").unwrap();
    let node = bed.add_node("node-1").unwrap();
    let client = node.add_pod("a", true).unwrap();
    let server = node.add_pod("b", false).unwrap();
    server.serve("v1").unwrap();
    let agent = node.start_agent().unwrap();
    assert!(client.send(server.socket(ECHO_PORT), 1024).unwrap().ok);

    // The enrolled pod's netns cookie, as the agent's workload view reports it.
    let workloads = agent.workloads().unwrap();
    let cookie = |pod: &warren_testbed::Pod| {
        workloads.as_array().unwrap().iter().find(|p| p["uid"] == pod.uid.as_str()).unwrap()["netns_cookie"].clone()
    };
    let client_cookie = cookie(&client).as_u64().expect("an enrolled pod has a netns cookie");
    assert!(cookie(&server).is_null(), "a pod that is not enrolled has none: {workloads:#}");

    let table = agent.inspect(&["maps"]).unwrap();
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    assert!(text.contains("ENROLLED NETWORK NAMESPACES"), "{text}");
    assert!(text.contains(&client_cookie.to_string()), "enrolled pod's netns listed:\n{text}");
    assert!(text.contains(&server.socket(ECHO_PORT).to_string()), "original destination listed:\n{text}");

    let json = agent.inspect(&["maps", "-o", "json"]).unwrap();
    assert!(json.status.success(), "{}", stderr(&json));
    let view: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let enrolled = view["enrolled_netns"].as_array().unwrap();
    assert_eq!(enrolled.len(), 1, "only the enrolled pod: {view:#}");
    assert_eq!(enrolled[0]["netns_cookie"], client_cookie);
    assert_eq!(enrolled[0]["outbound_port"], 15001);
    let destinations = view["original_destinations"].as_array().unwrap();
    assert!(destinations.iter().any(|d| d["original_dst"] == server.socket(ECHO_PORT).to_string()), "{view:#}");
    assert_eq!(view["counters"]["connect4_redirected"], 1);
}

#[test]
fn inspect_maps_without_a_running_agent_fails_with_one_line() {
    require_privileges!();
    let bed = Testbed::new("inspect-stopped").unwrap();
    let node = bed.add_node("node-1").unwrap();
    node.add_pod("a", true).unwrap();
    let agent = node.start_agent().unwrap();
    agent.stop();

    let out = agent.inspect(&["maps"]).unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("warren-agent is not running"), "{err}");

    // Never started at all: no pid file, no pinned maps.
    let out = Command::new(bin_path("warren-agent").unwrap())
        .args(["inspect", "maps", "--pin-dir", "/sys/fs/bpf/warren-no-such-dir", "--run-dir", "/nonexistent/warren"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
}

#[test]
fn inspect_maps_without_bpf_rights_fails_with_one_line() {
    require_privileges!();
    let bed = Testbed::new("inspect-unprivileged").unwrap();
    let node = bed.add_node("node-1").unwrap();
    node.add_pod("a", true).unwrap();
    let agent = node.start_agent().unwrap();

    let mut cmd = Command::new(bin_path("warren-agent").unwrap());
    cmd.args(["inspect", "maps", "--pin-dir"]).arg(&agent.pin_dir).arg("--run-dir").arg(&agent.run_dir);
    // Drop to nobody: no CAP_BPF, no access to bpffs.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(!out.status.success(), "{}", stdout(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.to_lowercase().contains("permission denied"), "{err}");
}

#[test]
fn bad_arguments_get_one_line_with_the_fix() {
    let Ok(agent) = bin_path("warren-agent") else {
        panic!("warren-agent is not built: run `cargo build --workspace --bins` first");
    };
    let run = |args: &[&str]| Command::new(&agent).args(args).output().unwrap();
    for (args, says) in [
        (&["inspect", "mapz"][..], "unrecognized subcommand 'mapz'"),
        (&["inspect", "workloads", "-o", "xml"][..], "invalid value 'xml' for '--output <OUTPUT>' [possible values: table, json, yaml]"),
        (&["inspect", "routes", "--admin-addr", "nowhere"][..], "invalid value 'nowhere' for '--admin-addr"),
        (&["inspect", "certs", "--pod", "a"][..], "--pod a: certs"),
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    // Control: help is still the full, multi-line help, on stdout, and succeeds.
    let help = run(&["inspect", "connections", "--help"]);
    assert!(help.status.success() && stdout(&help).lines().count() > 5, "{}", stdout(&help));
    assert!(stdout(&help).contains("Examples:"), "{}", stdout(&help));
}

/// Every live view takes the same --namespace / --pod scope and -o table|json|yaml.
#[test]
fn live_views_are_scoped_by_namespace_and_pod_and_print_yaml() {
    require_privileges!();
    let bed = Testbed::new("inspect-scope").unwrap();
    let node = bed.add_node("node-1").unwrap();
    let a = node.add_pod("a", true).unwrap();
    let b = node.add_pod_in("other", "b", true).unwrap();
    let server = node.add_pod("server", false).unwrap();
    server.serve("v1").unwrap();
    let agent = node.start_agent().unwrap();
    for pod in [&a, &b] {
        agent.wait_enrolled(pod, true, std::time::Duration::from_secs(5)).unwrap();
        assert!(pod.send(server.socket(ECHO_PORT), 1024).unwrap().ok);
    }
    let yaml = |args: &[&str]| -> serde_yaml::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "yaml"]);
        serde_yaml::from_str(&agent.inspect_live(&all).unwrap()).unwrap()
    };
    let pods = |v: &serde_yaml::Value| -> Vec<String> {
        v.as_sequence().unwrap().iter().filter(|p| p["enrolled"] == true).map(|p| p["pod"].as_str().unwrap().into()).collect()
    };
    assert_eq!(pods(&yaml(&["workloads"])), ["default/a", "other/b"], "control: both without a scope");
    assert_eq!(pods(&yaml(&["workloads", "--pod", "a"])), ["default/a"]);
    assert_eq!(pods(&yaml(&["workloads", "-n", "other"])), ["other/b"]);
    assert!(pods(&yaml(&["workloads", "-n", "other", "--pod", "a"])).is_empty());
    let closed = |v: serde_yaml::Value| -> Vec<String> {
        v["recently_closed"].as_sequence().unwrap().iter().map(|c| c["pod"].as_str().unwrap().into()).collect()
    };
    assert_eq!(closed(yaml(&["connections", "-n", "other"])), ["other/b"]);
    let table = agent.inspect_live(&["connections", "--pod", "a"]).unwrap();
    assert!(table.contains("default/a") && !table.contains("other/b"), "{table}");
}

#[test]
fn inspect_connections_and_workloads_show_the_agents_view() {
    require_privileges!();
    let bed = Testbed::new("inspect-live").unwrap();
    let node = bed.add_node("node-1").unwrap();
    let client = node.add_pod("a", true).unwrap();
    let server = node.add_pod("b", false).unwrap();
    server.serve("v1").unwrap();
    let _agent = node.start_agent().unwrap();
    assert!(client.send(server.socket(ECHO_PORT), 4096).unwrap().ok);

    // The CLI talks to the admin endpoint, which listens in the node's netns: run it there.
    let run = |args: &[&str]| {
        let mut cmd = Command::new(bin_path("warren-agent").unwrap());
        cmd.arg("inspect").args(args);
        node.spawn(cmd).unwrap().wait_with_output().unwrap()
    };
    let table = run(&["connections"]);
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    assert!(text.contains("DESTINATION") && text.contains(&server.socket(ECHO_PORT).to_string()), "{text}");
    assert!(text.contains("default/a") && text.contains("outbound") && text.contains("closed"), "{text}");

    let json = run(&["workloads", "-o", "json"]);
    assert!(json.status.success(), "{}", stderr(&json));
    let pods: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let enrolled: Vec<_> = pods.as_array().unwrap().iter().filter(|p| p["enrolled"] == true).map(|p| p["pod"].clone()).collect();
    assert_eq!(enrolled, vec![serde_json::json!("default/a")]);
    let table = run(&["workloads"]);
    assert!(stdout(&table).contains(&client.uid), "{}", stdout(&table));

    // No agent on the admin address: one line, non-zero.
    let out = Command::new(bin_path("warren-agent").unwrap())
        .args(["inspect", "connections", "--admin-addr", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(stderr(&out).contains("no agent answers on 127.0.0.1:1"), "{}", stderr(&out));
}

/// `warren-agent status`: healthy with every program attached and the pod enrolled; once the agent stops,
/// not healthy, saying why, exit 1.
#[test]
fn status_says_healthy_or_why_not() {
    require_privileges!();
    let bed = Testbed::new("status").unwrap();
    let node = bed.add_node("node-1").unwrap();
    let pod = node.add_pod("a", true).unwrap();
    let agent = node.start_agent().unwrap();
    agent.wait_enrolled(&pod, true, std::time::Duration::from_secs(5)).unwrap();
    let pin_dir = agent.pin_dir.display().to_string();
    let run_dir = agent.run_dir.display().to_string();
    let status = |output: &str| agent.cli(&["status", "--pin-dir", &pin_dir, "--run-dir", &run_dir, "-o", output]).unwrap();

    let out = status("json");
    let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{view:#} {}", stderr(&out));
    assert_eq!(view["healthy"], true, "{view:#}");
    assert!(view["programs"].as_array().unwrap().iter().all(|p| p["attached"] == true), "{view:#}");
    assert_eq!((view["pods_enrolled"].as_u64(), view["pods_captured"].as_u64()), (Some(1), Some(1)), "{view:#}");
    let enrolled = view["maps"].as_array().unwrap().iter().find(|m| m["name"] == "ENROLLED_NETNS").unwrap().clone();
    assert_eq!(enrolled["entries"], 1, "{view:#}");
    let table = stdout(&status("table"));
    assert!(table.starts_with("healthy\n") && table.contains("connect4, connect6, track_sockets"), "{table}");

    // Control: the same command once the agent has stopped.
    agent.stop();
    let out = status("table");
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let table = stdout(&out);
    assert!(table.starts_with("NOT HEALTHY\n") && table.contains("warren-agent is not running"), "{table}");
}

/// Every live view, `analyze` and `status` against an agent that is not running (nothing answers on the
/// admin address), and with a bad `-o`: one line each, with the fix, and a failing exit status.
#[test]
fn every_view_against_a_stopped_agent_or_with_a_bad_output_is_one_line() {
    let agent = bin_path("warren-agent").expect("warren-agent is built");
    let views = ["connections", "certs", "workloads", "services", "routes", "faults", "policies", "gateways", "graph"];
    let commands: Vec<Vec<&str>> =
        views.iter().map(|v| vec!["inspect", *v]).chain([vec!["analyze"]]).collect();
    // A port nothing listens on (the discard port of the loopback: no service here).
    let nowhere = "127.0.0.1:9";
    for command in &commands {
        let out = Command::new(&agent).args(command).args(["--admin-addr", nowhere]).output().unwrap();
        let err = stderr(&out);
        assert!(!out.status.success(), "{command:?} against no agent succeeded: {}", stdout(&out));
        assert_eq!(err.trim().lines().count(), 1, "{command:?}: one line: {err}");
        assert!(err.contains("no agent answers on 127.0.0.1:9") && err.contains("--admin-addr"), "{command:?}: {err}");
        let bad = Command::new(&agent).args(command).args(["-o", "xml"]).output().unwrap();
        let err = stderr(&bad);
        assert!(!bad.status.success() && err.trim().lines().count() == 1 && err.contains("'xml'"), "{command:?} -o xml: {err}");
    }
    // status reads the node's state too: without an agent it says so in its report and fails.
    let status = Command::new(&agent)
        .args(["status", "--admin-addr", nowhere, "--run-dir", "/nonexistent/warren", "--pin-dir", "/sys/fs/bpf/warren-no-such-dir"])
        .output()
        .unwrap();
    assert!(!status.status.success() && stdout(&status).contains("warren-agent is not running"), "{}", stdout(&status));
}
