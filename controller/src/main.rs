//! warren-controller: Warren's control plane. It watches Istio's APIs and the cluster (or reads a
//! directory of YAML), validates and compiles them into per-node tables, pushes those to every agent
//! (`push`), writes validation results back (`status`), and is the mesh's certificate authority (`ca`).
mod ca;
mod graph;
mod metrics;
mod pipeline;
mod push;
mod sources;
mod status;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use kube::{Client, Config, config::{KubeConfigOptions, Kubeconfig}};
use warren_config::{analyze, cluster::ClusterState};
use warren_identity::{CertificateAuthority, Identity};

#[derive(Parser)]
#[command(name = "warren-controller", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the version.
    Version,
    /// Run the controller: watch, validate, compile, push; and the CA service (Kubernetes mode).
    Run(RunArgs),
    /// Report configuration problems, as `istioctl analyze` does; exits 1 when there are errors.
    Analyze(Input),
}

/// Where the configuration comes from.
#[derive(clap::Args)]
struct Input {
    /// Kubeconfig (default: in-cluster, else $KUBECONFIG).
    #[arg(long, conflicts_with = "config_dir")]
    kubeconfig: Option<PathBuf>,
    /// Read Kubernetes and Istio objects from the YAML files in this directory instead of an API server
    /// (the embedded default; re-read when a file changes).
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// How often --config-dir is checked for changes.
    #[arg(long, default_value_t = 200)]
    config_poll_ms: u64,
    /// Istio's meshConfig.rootNamespace: AuthorizationPolicies here apply to every namespace.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    input: Input,
    /// The controller's namespace (holds Secret warren-ca and ConfigMap warren-root-cert).
    #[arg(long, default_value = "warren-system")]
    namespace: String,
    #[arg(long, default_value = warren_identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Where agents request certificates (Kubernetes mode).
    #[arg(long, default_value = "0.0.0.0:15012")]
    ca_listen: SocketAddr,
    /// Where agents hold their push streams.
    #[arg(long, default_value = "0.0.0.0:15010")]
    push_listen: SocketAddr,
    /// Prometheus' scrape endpoint (/metrics, /stats/prometheus) and /ready, as istiod's 15014.
    #[arg(long, default_value = "0.0.0.0:15014")]
    monitoring_addr: SocketAddr,
    /// The ServiceAccount (in --namespace) agents run as; only its tokens may request certificates.
    #[arg(long, default_value = "warren-agent")]
    agent_service_account: String,
    /// A root you supply instead of the generated one (PEM; with --ca-key; required with --config-dir).
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    #[arg(long, default_value_t = 24 * 3600)]
    certificate_lifetime_seconds: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Version => {
            println!("warren-controller {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Run(args) => {
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let filter = tracing_subscriber::EnvFilter::try_from_env("WARREN_LOG").unwrap_or_else(|_| "info".into());
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
            tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|rt| rt.block_on(run(args)))
        }
        Command::Analyze(input) => {
            match tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|rt| rt.block_on(run_analyze(input))) {
                Ok(true) => Ok(()),
                Ok(false) => return ExitCode::FAILURE,
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-controller: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).with_context(|| format!("--kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await.context("no Kubernetes configuration (in-cluster or $KUBECONFIG; or use --config-dir)")?,
    };
    Ok(Client::try_from(config)?)
}

/// Prints every finding; `Ok(false)` when one is an error.
async fn run_analyze(input: Input) -> Result<bool> {
    let mut state: ClusterState = match &input.config_dir {
        Some(dir) => ClusterState::from_dir(dir)?,
        None => ClusterState::from_kubernetes(client(input.kubeconfig.as_ref()).await?).await?,
    };
    state.root_namespace = Some(input.root_namespace.clone());
    let findings = analyze::analyze(&state);
    if findings.is_empty() {
        println!("\u{2714} No validation issues found.");
    }
    for finding in &findings {
        println!("{finding}");
    }
    Ok(!findings.iter().any(|f| f.level == analyze::Level::Error))
}

async fn run(args: RunArgs) -> Result<()> {
    // First, so the metrics of the start (the first compile, a slow initial sync) can be scraped, and a
    // port already taken fails the start before anything else does.
    let metrics = Arc::new(metrics::Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let monitoring = metrics::bind(args.monitoring_addr).await?;
    let flows = Arc::new(graph::FlowStore::default());
    tokio::spawn(metrics::serve(monitoring, metrics.clone(), ready.clone(), flows.clone()));
    let read = |path: &PathBuf, flag: &str| std::fs::read_to_string(path).with_context(|| format!("{flag} {}", path.display()));
    let supplied = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => Some((read(cert, "--ca-cert")?, read(key, "--ca-key")?)),
        _ => None,
    };
    let (verdicts_tx, verdicts_rx) = tokio::sync::watch::channel(Vec::new());
    let (authority, states) = match &args.input.config_dir {
        Some(dir) => {
            let Some((cert_pem, key_pem)) = supplied else { bail!("--config-dir: needs --ca-cert and --ca-key (the mesh's root)") };
            let authority = CertificateAuthority::from_pem(&args.trust_domain, &cert_pem, &key_pem).context("--ca-cert/--ca-key")?;
            (authority, sources::directory(dir.clone(), Duration::from_millis(args.input.config_poll_ms))?)
        }
        None => {
            let client = client(args.input.kubeconfig.as_ref()).await?;
            let source = match supplied {
                Some((cert_pem, key_pem)) => ca::RootSource::Supplied { cert_pem, key_pem },
                None => ca::RootSource::Secret,
            };
            let authority = ca::load(&client, &args.namespace, &args.trust_domain, source).await?;
            // The CA service gets its own copy of the root.
            let ca_copy = CertificateAuthority::from_pem(&args.trust_domain, authority.root_pem(), &authority.key_pem())?;
            let status_client = client.clone();
            let service = Arc::new(ca::server::CaService {
                ca: ca_copy,
                authorizer: ca::authorize::Authorizer {
                    client,
                    agent_namespace: args.namespace.clone(),
                    agent_service_account: args.agent_service_account.clone(),
                    trust_domain: args.trust_domain.clone(),
                },
                lifetime: Duration::from_secs(args.certificate_lifetime_seconds),
                metrics: metrics.clone(),
            });
            let listener =
                tokio::net::TcpListener::bind(args.ca_listen).await.with_context(|| format!("--ca-listen {}", args.ca_listen))?;
            let identity = ca::server::controller_identity(&args.trust_domain, &args.namespace);
            tokio::spawn(async move {
                if let Err(e) = ca::server::serve(listener, service, identity).await {
                    tracing::error!("CA service: {e:#}");
                }
            });
            let states = sources::kubernetes(status_client.clone()).await?;
            tokio::spawn(status::run(status_client, verdicts_rx));
            (authority, states)
        }
    };
    let snapshots = pipeline::run(states, verdicts_tx, Some(args.input.root_namespace.clone()), metrics.clone());

    let identity = ca::server::controller_identity(&args.trust_domain, &args.namespace);
    let serving = authority.issue(&identity, Duration::from_secs(365 * 24 * 3600), std::time::SystemTime::now())?;
    let bundle = warren_identity::tls::TrustBundle::from_pem(&args.trust_domain, authority.root_pem())?;
    let tls = warren_identity::tls::server_config(&serving, serving.key_pem.as_deref().expect("generated key"), &bundle)?;
    let listener =
        tokio::net::TcpListener::bind(args.push_listen).await.with_context(|| format!("--push-listen {}", args.push_listen))?;
    let service = Arc::new(push::PushService {
        snapshots,
        agent_identity: Identity::new(&args.trust_domain, &args.namespace, &args.agent_service_account),
        agents: Arc::default(),
        metrics,
        flows,
    });
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    push::serve(listener, Arc::new(tls), service).await
}
