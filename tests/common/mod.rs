//! Helpers shared by the test crates that run the `signalbox` binary (tests/cli.rs,
//! tests/crash.rs, tests/readme.rs); the in-process harness is tests/api/helpers.rs.

#![allow(dead_code, clippy::unwrap_used)]

/// A TCP port that was free a moment ago (for a child process to bind).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
