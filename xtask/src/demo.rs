//! `cargo xtask demo`: a local single-node mesh of netns pods on the embedded default, traffic through the
//! agent, and the agent's view of it. No cluster needed.
use std::time::Duration;

use anyhow::{Context, Result, bail};
use warren_testbed::{AgentOptions, ECHO_PORT, Testbed};

pub fn run(keep: bool) -> Result<()> {
    if let Err(reason) = warren_testbed::check_privileges() {
        bail!("the demo needs root, BPF, cgroup2 and network namespaces: {reason}");
    }
    let bed = Testbed::new("demo")?;
    let node = bed.add_node("node-1")?;
    let productpage = node.add_pod("productpage", true)?;
    let reviews = node.add_pod("reviews", true)?;
    let legacy = node.add_pod("legacy", false)?;
    println!("Warren demo — node {} ({}), pods as network namespaces + cgroups:", node.name, node.ip);
    for pod in node.pods() {
        println!("  {:<12} {:<12} {:<18} {}", pod.name, pod.ip, pod.ip6, if node.is_enrolled(&pod) { "enrolled" } else { "not enrolled" });
    }
    reviews.serve("v1")?;
    // The default pin and run directories, so `warren-agent inspect maps` works from another shell.
    let agent = node.start_agent_with(AgentOptions {
        pin_dir: Some(warren_maps_default_pin_dir()),
        run_dir: Some("/run/warren".into()),
        // Opt-in (see docs/architecture.md); on here to show its counters.
        socket_acceleration: true,
        ..AgentOptions::default()
    })?;
    println!("\nwarren-agent is running (maps pinned at {})\n", agent.pin_dir.display());

    let dst = reviews.socket(ECHO_PORT);
    let through = productpage.send(dst, 1 << 20)?;
    println!(
        "productpage → {dst}: {} of 1 MiB echoed back, {} (client's peer: {})",
        through.received,
        if through.ok { "byte-exact" } else { "MISMATCH" },
        through.peer.as_deref().unwrap_or("?")
    );
    let direct = legacy.send(dst, 1 << 20)?;
    println!(
        "legacy      → {dst}: {} of 1 MiB echoed back, {} (client's peer: {})",
        direct.received,
        if direct.ok { "byte-exact" } else { "MISMATCH" },
        direct.peer.as_deref().unwrap_or("?")
    );
    let dst6 = reviews.socket6(ECHO_PORT);
    let over_v6 = productpage.send(dst6, 1 << 20)?;
    println!(
        "productpage → {dst6}: {} of 1 MiB echoed back, {} (client's peer: {})",
        over_v6.received,
        if over_v6.ok { "byte-exact" } else { "MISMATCH" },
        over_v6.peer.as_deref().unwrap_or("?")
    );
    println!("(productpage is enrolled: its connects go to the agent on loopback; reviews is enrolled: the agent");
    println!(" captures connections to it with sk_lookup; legacy is not enrolled: only the inbound end is meshed.)");

    std::thread::sleep(Duration::from_millis(200)); // let the eBPF log lines arrive
    println!("\n== the agent's connections (/connections)");
    let connections = agent.connections()?;
    for c in connections["recently_closed"].as_array().into_iter().flatten() {
        println!(
            "  {:<8} {:<20} client={:<24} destination={:<26} sent={}B received={}B",
            c["direction"].as_str().unwrap_or(""),
            c["pod"].as_str().unwrap_or(""),
            c["client"].as_str().unwrap_or(""),
            c["original_dst"].as_str().unwrap_or(""),
            c["sent_bytes"],
            c["received_bytes"]
        );
    }
    println!("\n== warren-agent inspect workloads");
    print!("{}", agent.inspect_live(&["workloads"])?);
    println!("\n== the agent's metrics (/metrics, warren_*)");
    for line in agent.get("/metrics")?.lines().filter(|l| l.starts_with("warren_") && !l.ends_with(" 0")) {
        println!("  {line}");
    }
    println!("\n== eBPF log lines in the agent's log");
    for line in agent.log().lines().filter(|l| l.contains("warren_ebpf")) {
        println!("  {line}");
    }
    println!("\n== warren-agent inspect maps");
    let inspect = agent.inspect(&["maps"])?;
    print!("{}", String::from_utf8_lossy(&inspect.stdout));
    if !inspect.status.success() {
        bail!("inspect maps failed: {}", String::from_utf8_lossy(&inspect.stderr));
    }
    if !(through.ok && direct.ok && over_v6.ok) {
        bail!("traffic was not byte-exact");
    }
    if keep {
        println!("\nThe mesh keeps running; try `warren-agent inspect maps` in another shell. Ctrl-C to tear down.");
        wait_for_interrupt().context("waiting for Ctrl-C")?;
    }
    println!("\nTearing down (the pods, the node and the agent's pinned maps).");
    drop(agent);
    let _ = std::fs::remove_dir_all(warren_maps_default_pin_dir());
    Ok(())
}

fn warren_maps_default_pin_dir() -> std::path::PathBuf {
    "/sys/fs/bpf/warren".into()
}

fn wait_for_interrupt() -> Result<()> {
    // Block SIGINT/SIGTERM and wait for one, so the testbed's Drop still runs afterwards.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let mut sig = 0;
        libc::sigwait(&set, &mut sig);
    }
    Ok(())
}
