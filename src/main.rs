//! The `signalbox` binary: parses the command line and runs it (see [`signalbox::cli`]).

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = signalbox::cli::Cli::parse();
    match signalbox::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
