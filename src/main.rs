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
            // Each cause once: wrappers often repeat their source's text.
            let mut text = String::new();
            for cause in e.chain().map(ToString::to_string) {
                if !text.contains(&cause) {
                    if !text.is_empty() {
                        text.push_str(": ");
                    }
                    text.push_str(&cause);
                }
            }
            eprintln!("error: {text}");
            std::process::ExitCode::FAILURE
        }
    }
}
