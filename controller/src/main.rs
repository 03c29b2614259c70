//! warren-controller: Warren's control plane (Istio APIs in, per-node tables out, workload CA).
//! Today it only reports its version; the watch → compile → push loop is the controller issue's work.
use clap::{Parser, Subcommand};

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
}

fn main() {
    match Cli::parse().command {
        Command::Version => println!("warren-controller {}", env!("CARGO_PKG_VERSION")),
    }
}
