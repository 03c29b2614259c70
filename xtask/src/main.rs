use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use xtask::{build_binaries, cargo, cluster, demo, fuzz, images, interop, manifests, run, setup};

/// Warren's project tooling.
#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build needs (Debian packages, bpf-linker; with --kubernetes the local cluster).
    Setup {
        #[arg(long)]
        kubernetes: bool,
    },
    /// Build every binary (warren-agent embeds the eBPF programs).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, and run a local single-node mesh of netns pods: traffic through the agent, its view.
    Demo {
        /// Keep the mesh running until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Set up, build, and run every test (unit, eBPF/netns scenarios, local Kubernetes), then each fuzz
    /// target for 60 s (WARREN_FUZZ_SECONDS=N changes that; 0 skips).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a cargo-fuzz target (libFuzzer) from its seed corpus; a crash leaves the input in fuzz/artifacts.
    Fuzz {
        /// A target, or `all`: every target side by side, output in fuzz/target/<target>.log (as `test` does).
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(fuzz::TARGETS.into_iter().chain(["all"])))]
        target: String,
        /// How long to fuzz.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// `none` works with every toolchain; `address` needs one that ships the ASan runtime (rustup's).
        #[arg(long, default_value = "none", value_parser = ["none", "address"])]
        sanitizer: String,
        /// Extra libFuzzer options (e.g. -max_len=65536).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// HBONE wire compatibility with Istio's ztunnel, both ways, on the netns substrate (not part of `test`):
    /// a Warren agent and two ztunnels (dedicated mode, fake CA) exchange 1 MiB each way, byte-exact, with
    /// identities checked. Without both paths it says how to get them and fails.
    Interop {
        /// A ztunnel binary you built (with the `testing` feature).
        #[arg(long)]
        ztunnel: Option<std::path::PathBuf>,
        /// That ztunnel's checkout: its test root src/tls/root-cert.pem and ca-key.pem.
        #[arg(long)]
        ztunnel_src: Option<std::path::PathBuf>,
    },
    /// kind (needs a Docker engine): `up` (images, cluster), `install` (helm), `e2e` (the user's walk), `down`.
    Kind {
        #[command(subcommand)]
        action: KindAction,
    },
    /// Benchmarks (release build, real eBPF); with no suite, every one in turn, then one table of all. `l4` —
    /// direct vs the agent's plaintext and HBONE paths, each with socket acceleration off and on: one-way
    /// throughput on 1 and 8 connections, new connections, 1 KiB round trips at 1000 rps (p50–p99.9), max
    /// rps, agent CPU and RSS; `accel` — the local leg alone, socket acceleration on vs plain loopback; `l7` — 1 KiB requests at 1000 rps open loop and max rps: no mesh vs the L4
    /// HBONE path vs the L7 path (HTTP/1.1 and HTTP/2), agent CPU and RSS; telemetry on vs off; a
    /// DestinationRule using every resilience feature vs the plain L7 path (`WARREN_BENCH_L7` picks parts);
    /// `control` — initial sync and RSS at 10k services, update latency over 20 agents; `authz` — one
    /// decision against 100 AuthorizationPolicies (p99), then a new HBONE connection with 100 policies on the
    /// server vs none; `parse`. Each suite writes `target/bench/<suite>.json` (rows of path, metric, value,
    /// unit, ratio to direct) beside its markdown.
    Bench {
        #[arg(value_parser = BENCH_SUITES)]
        suite: Option<String>,
        /// `l4`: also run its HBONE path with Istio's ztunnel (this binary, built by you with the `testing`
        /// feature) in place of Warren's agents — rows `ztunnel-hbone`, and Warren's targets against it.
        #[arg(long, value_name = "PATH")]
        peer_agent: Option<std::path::PathBuf>,
        /// Extra arguments for the benchmark (e.g. a criterion filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Render deploy/daemonset.yaml and deploy/controller.yaml from the helm chart deploy/helm/warren.
    Manifests,
    /// Without Docker: release binaries, then the images warren-agent:TAG and warren-controller:TAG as
    /// tarballs in target/images/ (the binary and the libraries it links), which containerd imports
    /// (`ctr -n k8s.io images import`); with --import, into the local node's containerd.
    Images {
        #[arg(long, default_value = "dev")]
        tag: String,
        #[arg(long)]
        import: bool,
    },
    /// Local Kubernetes v1.20 (etcd, kube-apiserver, controller-manager, scheduler; --node: containerd + kubelet).
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
}

#[derive(Subcommand)]
enum KindAction {
    /// Build both images (docker), create cluster "warren", load the images.
    Up,
    /// helm install deploy/helm/warren into it.
    Install,
    /// The user's walk on it: label a namespace → enrolled, HBONE → unlabel → helm uninstall → clean.
    E2e,
    /// Delete the cluster.
    Down,
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Build (once, cached) and start; prints the kubeconfig path.
    Up {
        #[arg(long)]
        node: bool,
    },
    /// Stop everything and remove what the node left on the host.
    Down,
    /// Which components run.
    Status,
}

fn main() -> ExitCode {
    match dispatch(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Setup { kubernetes } => setup::setup(kubernetes),
        Command::Build { release } => {
            setup::setup(false)?;
            build_binaries(release)
        }
        Command::Demo { keep } => {
            setup::setup(false)?;
            build_binaries(false)?;
            // Run the demo from the freshly built xtask binary's directory so it finds the other binaries.
            demo::run(keep)
        }
        Command::Test { args } => {
            let started = std::time::Instant::now();
            let seconds = match std::env::var("WARREN_FUZZ_SECONDS") {
                Ok(s) => s.parse().map_err(|_| anyhow::anyhow!("WARREN_FUZZ_SECONDS={s:?} is not a number of seconds"))?,
                Err(_) => fuzz::SMOKE_SECONDS,
            };
            setup::setup(true)?;
            build_binaries(false)?;
            let result = run(cargo().args(["test", "--workspace"]).args(&args));
            eprintln!("xtask: tests took {:.0?} (setup and build included)", started.elapsed());
            // The fuzz smoke runs also after failed tests: one CI run shows every failure.
            let fuzzed = if seconds == 0 { Ok(()) } else { fuzz::smoke(seconds, "none", &[]) };
            eprintln!("xtask: everything took {:.0?}", started.elapsed());
            result.and(fuzzed)
        }
        Command::Interop { ztunnel, ztunnel_src } => {
            if ztunnel.is_none() || ztunnel_src.is_none() {
                return interop::run(ztunnel.as_deref(), ztunnel_src.as_deref());
            }
            setup::setup(false)?;
            build_binaries(false)?;
            interop::run(ztunnel.as_deref(), ztunnel_src.as_deref())
        }
        Command::Fuzz { target, seconds, sanitizer, args } => fuzz::fuzz(&target, seconds, &sanitizer, &args),
        Command::Bench { suite, peer_agent, args } => {
            if let Some(binary) = &peer_agent {
                anyhow::ensure!(suite.as_deref().is_none_or(|s| s == "l4"), "--peer-agent is an option of the l4 suite");
                anyhow::ensure!(
                    binary.is_file(),
                    "--peer-agent {}: no such file (a ztunnel binary built with the `testing` feature: \
                     ../shared/recipes/ztunnel/README.md in this workplace, or ztunnel's Development.md)",
                    binary.display()
                );
                // The bench runs from the workspace root; a relative path stays the user's.
                let binary = std::path::absolute(binary)?;
                // SAFETY: set before any thread is started; the bench inherits it.
                unsafe { std::env::set_var(PEER_AGENT_ENV, binary) };
            }
            setup::setup(false)?;
            build_binaries(true)?;
            let suites: Vec<&str> = match &suite {
                Some(suite) => vec![suite.as_str()],
                None => BENCH_SUITES.to_vec(),
            };
            for suite in &suites {
                bench(suite, &args)?;
            }
            if suite.is_none() {
                print_bench_tables()?;
            }
            Ok(())
        }
        Command::Manifests => manifests::write(),
        Command::Images { tag, import } => {
            setup::setup(false)?;
            build_binaries(true)?;
            for image in images::build(&xtask::workspace_root().join("target/release"), &tag)? {
                println!("{}", image.display());
                if import {
                    images::import(&image)?;
                }
            }
            Ok(())
        }
        Command::Kind { action } => {
            let script = setup::scripts_dir().join("kind.sh");
            match action {
                // The images build inside Docker (deploy/docker/), from the sources.
                KindAction::Up => kind(&script, "up"),
                KindAction::Install => kind(&script, "install"),
                KindAction::E2e => kind(&script, "e2e"),
                KindAction::Down => kind(&script, "down"),
            }
        }
        Command::Cluster { action } => match action {
            ClusterAction::Up { node } => {
                let kubeconfig = cluster::up(node)?;
                println!("export KUBECONFIG={}", kubeconfig.display());
                Ok(())
            }
            ClusterAction::Down => cluster::down(),
            ClusterAction::Status => {
                for (component, pid) in cluster::status() {
                    match pid {
                        Some(pid) => println!("{component:<24} running (pid {pid})"),
                        None => println!("{component:<24} stopped"),
                    }
                }
                println!("kubeconfig               {}", cluster::kubeconfig().display());
                Ok(())
            }
        },
    }
}

/// `kind.sh ACTION` from the workspace root (the images build inside Docker, from the sources).
fn kind(script: &std::path::Path, action: &str) -> Result<()> {
    run(std::process::Command::new("bash").arg(script).arg(action).current_dir(xtask::workspace_root()))
}

/// How `--peer-agent` reaches the l4 bench (tests/e2e/benches/l4/ztunnel.rs).
const PEER_AGENT_ENV: &str = "WARREN_BENCH_PEER_AGENT";

/// Every bench suite, in the order `cargo xtask bench` runs them.
const BENCH_SUITES: [&str; 6] = ["l4", "accel", "l7", "control", "authz", "parse"];

fn bench(suite: &str, args: &[String]) -> Result<()> {
    if suite == "authz" {
        run(cargo().args(["bench", "--package", "warren-api", "--bench", "decision", "--"]).args(args))?;
    }
    run(cargo().args(["bench", "--package", "warren-e2e", "--bench", suite, "--"]).args(args))
}

/// One table per suite that wrote `target/bench/<suite>.json`.
fn print_bench_tables() -> Result<()> {
    let dir = xtask::workspace_root().join("target").join("bench");
    println!("
xtask: every bench's figures (value, and its ratio to direct in the same run), from {}:\n", dir.display());
    for (suite, rows) in xtask::bench::read_all(&dir)? {
        println!("{}", xtask::bench::table(&suite, &rows));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench_args(args: &[&str]) -> (Option<String>, Option<std::path::PathBuf>, Vec<String>) {
        let cli = Cli::try_parse_from(["cargo xtask", "bench"].iter().chain(args)).unwrap();
        let Command::Bench { suite, peer_agent, args } = cli.command else { panic!("not bench") };
        (suite, peer_agent, args)
    }

    #[test]
    fn bench_takes_a_peer_agent_before_the_benchmarks_own_arguments() {
        let (suite, peer, args) = bench_args(&["l4", "--peer-agent", "/tmp/zt/ztunnel"]);
        assert_eq!((suite.as_deref(), peer.as_deref()), (Some("l4"), Some(std::path::Path::new("/tmp/zt/ztunnel"))));
        assert!(args.is_empty(), "{args:?}");
        let (_, peer, args) = bench_args(&["l4", "--peer-agent=/zt", "--", "--filter"]);
        assert_eq!(peer.as_deref(), Some(std::path::Path::new("/zt")));
        assert_eq!(args, ["--filter"]);
        let (suite, peer, args) = bench_args(&["l7", "x"]);
        assert_eq!((suite.as_deref(), peer, args), (Some("l7"), None, vec!["x".to_string()]));
    }

    #[test]
    fn a_peer_agent_that_is_not_there_fails_before_any_build() {
        let command = Command::Bench { suite: Some("l4".into()), peer_agent: Some("/nonexistent/ztunnel".into()), args: vec![] };
        let error = dispatch(command).unwrap_err().to_string();
        assert!(error.contains("/nonexistent/ztunnel: no such file") && error.contains("recipes/ztunnel"), "{error}");
        let command = Command::Bench { suite: Some("l7".into()), peer_agent: Some("/nonexistent/ztunnel".into()), args: vec![] };
        assert!(dispatch(command).unwrap_err().to_string().contains("option of the l4 suite"));
    }
}
