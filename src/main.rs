//! The `signalbox` binary: parses the command line and runs it (see [`signalbox::cli`]).

use clap::Parser;

/// mimalloc instead of glibc's allocator: the request path makes many small, short-lived
/// allocations freed on another thread than the one that made them, which glibc handles slowly
/// (docs/PERFORMANCE.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = signalbox::cli::Cli::parse();
    match signalbox::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", signalbox::cli::error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
