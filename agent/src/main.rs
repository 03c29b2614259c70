use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use warren_agent::{config::AgentConfig, inspect};

/// Warren's node agent: eBPF redirect of enrolled pods and the in-agent proxy.
#[derive(Parser)]
#[command(name = "warren-agent", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load the eBPF programs, enroll pods, proxy their traffic.
    Run {
        /// Agent configuration (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// Override the config's eBPF log level (off, error, warn, info, debug, trace).
        #[arg(long)]
        ebpf_log_level: Option<warren_agent::config::EbpfLogLevel>,
        /// Override the config's node name (a DaemonSet passes spec.nodeName).
        #[arg(long, env = "WARREN_NODE_NAME")]
        node_name: Option<String>,
    },
    /// Print the version.
    Version,
    /// The process of a gateway pod (a Deployment whose pods an Istio Gateway selects): it only holds the
    /// pod; the node's agent serves the Gateway's ports in the pod's network namespace. Exits on SIGTERM.
    #[command(after_help = "Example (the chart's gateway Deployment):\n  warren-agent gateway")]
    Gateway,
    /// Whether the agent on this node is healthy, and why not: programs attached, maps and their fill,
    /// the controller's push stream and config version, certificate expiry, pods failing to enroll.
    /// Exits 1 when it is not healthy.
    #[command(after_help = "Examples:\n  warren-agent status\n  warren-agent status -o json")]
    Status {
        #[arg(long, default_value = warren_agent::config::DEFAULT_ADMIN_ADDR)]
        admin_addr: std::net::SocketAddr,
        #[command(flatten)]
        node: inspect::NodeState,
    },
    /// What is wrong on this node's data plane (or --node's), from what its agent holds: pods that fail to
    /// enroll, a refused or lost push, routes to services without endpoints, gateway servers refused.
    /// Exits 1 when there are errors. (`warren-controller analyze` checks the configuration itself.)
    #[command(after_help = "Examples:\n  warren-agent analyze\n  warren-agent analyze --node worker-2 -n bookinfo -o json")]
    Analyze(inspect::ViewArgs),
    /// Show what the agent on this node holds.
    Inspect {
        #[command(subcommand)]
        what: Inspect,
    },
}

#[derive(Subcommand)]
enum Inspect {
    /// Connections the proxy carries now and the ones it closed last.
    #[command(after_help = "Examples:\n  warren-agent inspect connections\n  warren-agent inspect connections -n default --pod productpage-v1-5d9b4 -o json")]
    Connections(inspect::ViewArgs),
    /// Workload certificates the agent holds: identity, serial, validity, time to rotation, chain.
    #[command(after_help = "Example:\n  warren-agent inspect certs -n bookinfo")]
    Certs(inspect::ViewArgs),
    /// Pods on this node: enrolled or not, their netns, why enrollment failed.
    #[command(after_help = "Examples:\n  warren-agent inspect workloads\n  warren-agent inspect workloads -n default -o yaml")]
    Workloads(inspect::ViewArgs),
    /// Services the controller pushed: VIPs, ports, endpoints, subsets, the L4 route of each VIP:port.
    #[command(after_help = "Example:\n  warren-agent inspect services -n bookinfo")]
    Services(inspect::ViewArgs),
    /// Routes (VirtualServices) the controller pushed, rule by rule.
    #[command(after_help = "Example:\n  warren-agent inspect routes -o json")]
    Routes(inspect::ViewArgs),
    /// Fault injection rules (delays, aborts) the controller pushed.
    Faults(inspect::ViewArgs),
    /// The Istio Gateways this node's gateway pods serve: per pod and port, each server's hosts, TLS and
    /// credential, the VirtualServices bound to it, and why a server is refused.
    #[command(after_help = "Example:\n  warren-agent inspect gateways --namespace istio-system")]
    Gateways(inspect::ViewArgs),
    /// Per local workload, the AuthorizationPolicies that apply in evaluation order (DENY, ALLOW, AUDIT),
    /// and the plaintext connections the kernel refuses.
    #[command(after_help = "Example:\n  warren-agent inspect policies --hits --pod reviews-v1-7f9")]
    Policies {
        #[command(flatten)]
        view: inspect::ViewArgs,
        /// Also how many connections each policy allowed, denied and audited since the agent started.
        #[arg(long)]
        hits: bool,
    },
    /// The node's live workload graph from the agent's own traffic (no Prometheus needed): per source
    /// workload, its destinations with request rate, error ratio, p99 and mTLS, over the last minute.
    #[command(after_help = "Examples:\n  warren-agent inspect graph\n  warren-agent inspect graph -n bookinfo -o json")]
    Graph(inspect::ViewArgs),
    /// Per service, subset and port this node's clients send requests to (as `istioctl proxy-config
    /// endpoints`): each endpoint's locality, health (ejected, and for how long), requests in flight and
    /// failures; the connection pool's limits, what is open and what overflowed; the retry budget.
    #[command(after_help = "Examples:\n  warren-agent inspect endpoints\n  warren-agent inspect endpoints -n bookinfo -o json")]
    Endpoints(inspect::ViewArgs),
    /// The pinned eBPF maps: enrolled network namespaces, original destinations, program counters.
    Maps(inspect::NodeState),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() && e.kind() != clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!("warren-agent: {}", one_line(&e));
            return ExitCode::from(2);
        }
        Err(help_or_version) => help_or_version.exit(),
    };
    let result = match cli.command {
        Command::Run { config, ebpf_log_level, node_name } => run(config, ebpf_log_level, node_name),
        Command::Version => {
            println!("warren-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Inspect { what } => inspect_view(what).map(|text| print!("{text}")),
        Command::Gateway => hold_gateway_pod(),
        Command::Analyze(view) => match inspect::analyze::run(&view) {
            Ok((text, failed)) => {
                print!("{text}");
                return if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS };
            }
            Err(e) => Err(e),
        },
        Command::Status { admin_addr, node } => {
            let status = inspect::status::collect(&node.pin_dir, &node.run_dir, admin_addr);
            match inspect::status::render(&status, node.output) {
                Ok(text) => print!("{text}"),
                Err(e) => eprintln!("warren-agent: {e:#}"),
            }
            return if status.healthy { ExitCode::SUCCESS } else { ExitCode::FAILURE };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes, outermost first.
            eprintln!("warren-agent: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Holds a gateway pod until the kubelet stops it: the Gateway's servers are the node agent's.
fn hold_gateway_pod() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        println!("warren-agent gateway: this pod's Gateway servers are served by the warren-agent of its node");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok(())
    })
}

/// A command-line error on one line, with what would fix it (clap spreads it over several).
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with("Usage:"));
    let first = lines.next().unwrap_or("invalid arguments").trim_start_matches("error: ").to_string();
    let hints: Vec<&str> = lines.filter(|l| !l.starts_with("For more information")).collect();
    let hints = if hints.is_empty() { String::new() } else { format!(" {}", hints.join(" ")) };
    format!("{first}{hints} (warren-agent --help)")
}

fn inspect_view(what: Inspect) -> anyhow::Result<String> {
    use inspect::live::{self, ConfigView};
    match what {
        Inspect::Connections(view) => live::connections(&view),
        Inspect::Certs(view) => live::certificates(&view),
        Inspect::Workloads(view) => live::workloads(&view),
        Inspect::Services(view) => live::config(&view, ConfigView::Services),
        Inspect::Routes(view) => live::config(&view, ConfigView::Routes),
        Inspect::Faults(view) => live::config(&view, ConfigView::Faults),
        Inspect::Gateways(view) => live::config(&view, ConfigView::Gateways),
        Inspect::Policies { view, hits } => live::policies(&view, hits),
        Inspect::Graph(view) => live::graph(&view),
        Inspect::Endpoints(view) => live::endpoints(&view),
        Inspect::Maps(node) => {
            inspect::require_running_agent(&node.run_dir).and_then(|_| inspect::maps::render(&node.pin_dir, node.output))
        }
    }
}

fn run(
    config_path: PathBuf,
    ebpf_log_level: Option<warren_agent::config::EbpfLogLevel>,
    node_name: Option<String>,
) -> anyhow::Result<()> {
    let mut config = AgentConfig::load(&config_path)?;
    if let Some(level) = ebpf_log_level {
        config.ebpf_log_level = level;
    }
    if let Some(name) = node_name {
        config.node_name = name;
        config.validate()?;
    }
    init_logging();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // Worker threads (default: one per CPU). Fewer threads mean fewer cross-thread wakeups, which dominate
    // the agent's CPU at moderate request rates (docs/traffic-management.md#cost).
    if let Some(threads) = std::env::var("WARREN_WORKER_THREADS").ok().and_then(|t| t.parse().ok()) {
        runtime.worker_threads(threads);
    }
    runtime.enable_all().build()?.block_on(warren_agent::run::run(config))
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    // aya-log's records come through the `log` crate; route them into tracing.
    let _ = tracing_log::LogTracer::init();
    // The eBPF programs' records are already filtered in the kernel (config `ebpfLogLevel`), so their
    // target `warren_ebpf` passes here at every level unless WARREN_LOG says otherwise.
    let mut directives = std::env::var("WARREN_LOG").unwrap_or_else(|_| "info".into());
    if !directives.contains("warren_ebpf") {
        directives.push_str(",warren_ebpf=trace");
    }
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info,warren_ebpf=trace"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}
