//! The `signalbox-bench` binary: parses the command line and runs the benchmark (see
//! [`signalbox_bench`]).

use clap::Parser;

/// mimalloc, as in the `signalbox` binary: the load generator ran inside that binary before it
/// became its own crate, so its share of the machine's CPU stays comparable.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = signalbox_bench::Cli::parse();
    // What the store logs in this process (the verification's and the fill's connections), to
    // stderr as the signalbox CLI does; the server's own log level is SIGNALBOX_BENCH_SERVER_LOG.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match signalbox_bench::run(cli.bench, cli.json).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", signalbox::cli::error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
