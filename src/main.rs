//! The `signalbox` binary: parses the command line and runs it (see [`signalbox::cli`]).

use clap::Parser;

/// mimalloc instead of glibc's allocator: under load a third of the request threads' time went
/// to glibc `malloc`/`free` (many small, short-lived allocations freed on another thread than
/// the one that made them; docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
