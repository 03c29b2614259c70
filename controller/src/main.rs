//! warren-controller: Warren's control plane. Today: the mesh's certificate authority (see `ca`); the
//! watch → compile → push of Istio's APIs joins it (`run` will serve both).
mod ca;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use kube::{Client, Config, config::{KubeConfigOptions, Kubeconfig}};

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
    /// Run the controller (today: the CA service).
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kubeconfig (default: in-cluster, else $KUBECONFIG).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The controller's namespace (holds Secret warren-ca and ConfigMap warren-root-cert).
    #[arg(long, default_value = "warren-system")]
    namespace: String,
    #[arg(long, default_value = warren_identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Where agents request certificates.
    #[arg(long, default_value = "0.0.0.0:15012")]
    ca_listen: SocketAddr,
    /// The ServiceAccount (in --namespace) agents run as; only its tokens may request certificates.
    #[arg(long, default_value = "warren-agent")]
    agent_service_account: String,
    /// A root you supply instead of the generated one (PEM; with --ca-key).
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-controller: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).with_context(|| format!("--kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default()).await?
        }
        None => Config::infer().await.context("no Kubernetes configuration (in-cluster or $KUBECONFIG)")?,
    };
    let client = Client::try_from(config)?;
    let source = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => ca::RootSource::Supplied {
            cert_pem: std::fs::read_to_string(cert).with_context(|| format!("--ca-cert {}", cert.display()))?,
            key_pem: std::fs::read_to_string(key).with_context(|| format!("--ca-key {}", key.display()))?,
        },
        _ => ca::RootSource::Secret,
    };
    let authority = ca::load(&client, &args.namespace, &args.trust_domain, source).await?;
    let service = Arc::new(ca::server::CaService {
        ca: authority,
        authorizer: ca::authorize::Authorizer {
            client,
            agent_namespace: args.namespace.clone(),
            agent_service_account: args.agent_service_account,
            trust_domain: args.trust_domain.clone(),
        },
        lifetime: Duration::from_secs(args.certificate_lifetime_seconds),
    });
    let listener = tokio::net::TcpListener::bind(args.ca_listen).await.with_context(|| format!("--ca-listen {}", args.ca_listen))?;
    let identity = ca::server::controller_identity(&args.trust_domain, &args.namespace);
    ca::server::serve(listener, service, identity).await
}
