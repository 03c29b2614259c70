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
    /// Show what the agent on this node holds.
    Inspect {
        #[command(subcommand)]
        what: Inspect,
    },
}

#[derive(Subcommand)]
enum Inspect {
    /// Connections the proxy carries now and the ones it closed last.
    Connections {
        /// The agent's admin endpoint.
        #[arg(long, default_value = warren_agent::config::DEFAULT_ADMIN_ADDR)]
        admin_addr: std::net::SocketAddr,
        #[arg(short, long, value_enum, default_value = "table")]
        output: inspect::Output,
    },
    /// Workload certificates the agent holds: identity, serial, validity, time to rotation, chain.
    Certs {
        #[arg(long, default_value = warren_agent::config::DEFAULT_ADMIN_ADDR)]
        admin_addr: std::net::SocketAddr,
        #[arg(short, long, value_enum, default_value = "table")]
        output: inspect::Output,
    },
    /// Pods on this node: enrolled or not, their cgroup, why enrollment failed.
    Workloads {
        #[arg(long, default_value = warren_agent::config::DEFAULT_ADMIN_ADDR)]
        admin_addr: std::net::SocketAddr,
        #[arg(short, long, value_enum, default_value = "table")]
        output: inspect::Output,
    },
    /// Services the controller pushed: VIPs, ports, endpoints, subsets, the L4 route of each VIP:port.
    Services {
        #[arg(long, default_value = warren_agent::config::DEFAULT_ADMIN_ADDR)]
        admin_addr: std::net::SocketAddr,
        #[arg(short, long, value_enum, default_value = "table")]
        output: inspect::Output,
    },
    /// Routes (VirtualServices) the controller pushed, rule by rule.
    Routes {
        #[arg(long, default_value = warren_agent::config::DEFAULT_ADMIN_ADDR)]
        admin_addr: std::net::SocketAddr,
        #[arg(short, long, value_enum, default_value = "table")]
        output: inspect::Output,
    },
    /// Fault injection rules (delays, aborts) the controller pushed.
    Faults {
        #[arg(long, default_value = warren_agent::config::DEFAULT_ADMIN_ADDR)]
        admin_addr: std::net::SocketAddr,
        #[arg(short, long, value_enum, default_value = "table")]
        output: inspect::Output,
    },
    /// Per local workload, the AuthorizationPolicies that apply in evaluation order (DENY, ALLOW, AUDIT),
    /// and the plaintext connections the kernel refuses.
    Policies {
        #[arg(long, default_value = warren_agent::config::DEFAULT_ADMIN_ADDR)]
        admin_addr: std::net::SocketAddr,
        /// Also how many connections each policy allowed, denied and audited since the agent started.
        #[arg(long)]
        hits: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: inspect::Output,
    },
    /// The pinned eBPF maps: enrolled cgroups, original destinations, program counters.
    Maps {
        /// bpffs directory the agent pinned its maps in.
        #[arg(long, default_value = warren_maps::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// The agent's runtime directory (holds agent.pid).
        #[arg(long, default_value = warren_agent::config::DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: inspect::Output,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config, ebpf_log_level, node_name } => run(config, ebpf_log_level, node_name),
        Command::Inspect { what: Inspect::Connections { admin_addr, output } } => {
            inspect::live::connections(admin_addr, output).map(|text| print!("{text}"))
        }
        Command::Inspect { what: Inspect::Certs { admin_addr, output } } => {
            inspect::live::certificates(admin_addr, output).map(|text| print!("{text}"))
        }
        Command::Inspect { what: Inspect::Workloads { admin_addr, output } } => {
            inspect::live::workloads(admin_addr, output).map(|text| print!("{text}"))
        }
        Command::Inspect { what: Inspect::Services { admin_addr, output } } => {
            inspect::live::config(admin_addr, inspect::live::ConfigView::Services, output).map(|text| print!("{text}"))
        }
        Command::Inspect { what: Inspect::Routes { admin_addr, output } } => {
            inspect::live::config(admin_addr, inspect::live::ConfigView::Routes, output).map(|text| print!("{text}"))
        }
        Command::Inspect { what: Inspect::Faults { admin_addr, output } } => {
            inspect::live::config(admin_addr, inspect::live::ConfigView::Faults, output).map(|text| print!("{text}"))
        }
        Command::Inspect { what: Inspect::Policies { admin_addr, hits, output } } => {
            inspect::live::policies(admin_addr, hits, output).map(|text| print!("{text}"))
        }
        Command::Inspect { what: Inspect::Maps { pin_dir, run_dir, output } } => {
            inspect::require_running_agent(&run_dir)
                .and_then(|_| inspect::maps::render(&pin_dir, output))
                .map(|text| print!("{text}"))
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
