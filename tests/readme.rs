//! The README's five-minute tour, run as written: the `sh` block under "Five-minute tour" in
//! bash, in an empty directory, with the binary cargo built for this test on the `PATH`. Two
//! substitutions, both because a test cannot own the machine: the `cargo build` line is left
//! out (cargo already built the binary), and the default address `127.0.0.1:8080` becomes a
//! free port (`SIGNALBOX_BIND` / `SIGNALBOX_PUBLIC_URL` are set to it, as a user would).

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::free_port;

/// The first ```sh block after the heading `heading`.
fn sh_block_after(readme: &str, heading: &str) -> String {
    let at = readme
        .find(heading)
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let rest = &readme[at..];
    let start = rest.find("```sh\n").expect("a ```sh block") + "```sh\n".len();
    let len = rest[start..].find("```").expect("the block's end");
    rest[start..start + len].to_string()
}

#[test]
fn the_five_minute_tour_works_as_written() {
    if Command::new("curl").arg("--version").output().is_err() {
        assert!(
            std::env::var("CI").is_err(),
            "the tour needs curl (.ci/run installs it)"
        );
        eprintln!("SKIPPED: the README tour needs curl");
        return;
    }
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let block = sh_block_after(&readme, "## Five-minute tour");
    assert!(
        block.contains("127.0.0.1:8080"),
        "the tour waits on the default address:\n{block}"
    );
    let port = free_port();
    let script: String = block
        .lines()
        .filter(|l| !l.trim_start().starts_with("cargo build"))
        .map(|l| l.replace("127.0.0.1:8080", &format!("127.0.0.1:{port}")) + "\n")
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_signalbox")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", &script])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("SIGNALBOX_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.env("PATH", path)
        .env("SIGNALBOX_BIND", format!("127.0.0.1:{port}"))
        .env("SIGNALBOX_PUBLIC_URL", format!("http://127.0.0.1:{port}"));
    let mut child = cmd.spawn().unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = Command::new("pkill")
                .args(["-f", &format!("127.0.0.1:{port}")])
                .status();
            panic!("the tour did not finish within 90 s:\n{script}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let log = std::fs::read_to_string(dir.path().join("signalbox.log")).unwrap_or_default();
    assert!(
        status.success(),
        "the tour failed ({status}).\nscript:\n{script}\nstdout:\n{out}\nstderr:\n{err}\nserver log:\n{log}"
    );
    // The signal is listed, and the server's log went to its file, not between the answers.
    assert!(
        out.contains("Export to CSV times out"),
        "the signal is not listed:\n{out}\nstderr:\n{err}"
    );
    assert!(
        !out.contains(" INFO "),
        "server log in the tour's output:\n{out}"
    );
    assert!(!log.is_empty(), "the server wrote no log to signalbox.log");
    // The database is where the tour ran.
    assert!(dir.path().join("signalbox.db").exists());
}
