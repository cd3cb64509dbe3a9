//! The command line as an operator meets it: the real binary, in a directory of its own.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::free_port;

fn signalbox(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_signalbox"));
    cmd.current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("SIGNALBOX_") || k == "RUST_LOG" || k == "NO_COLOR" {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn run(dir: &Path, args: &[&str]) -> Output {
    signalbox(dir).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Starts `serve` with `args`, waits for `/readyz`, returns the child (stderr to `log`).
fn serve(dir: &Path, port: u16, args: &[&str], log: &Path) -> Child {
    let mut child = signalbox(dir)
        .arg("serve")
        .args(args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return child;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "serve exited ({st}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "serve did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(mut child: Child) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
}

#[test]
fn admin_commands_refuse_to_create_a_database_where_there_is_none() {
    let dir = tempfile::tempdir().unwrap();
    let out = run(dir.path(), &["workspace", "list"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    let abs = dir.path().canonicalize().unwrap().join("signalbox.db");
    assert!(
        err.contains(&abs.display().to_string())
            || err.contains(&dir.path().join("signalbox.db").display().to_string()),
        "names the database it looked for: {err}"
    );
    assert!(err.contains("signalbox migrate"), "{err}");
    assert!(
        !dir.path().join("signalbox.db").exists(),
        "a database was created"
    );
    assert!(
        !dir.path().join("signalbox.key").exists(),
        "a key file was created"
    );
    // `migrate` creates one on purpose; then the command works and says which database it used.
    assert!(run(dir.path(), &["migrate"]).status.success());
    let out = run(dir.path(), &["workspace", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("using database SQLite"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn serve_takes_flags_says_where_it_runs_and_the_cli_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let db = dir.path().join("data.db");
    let log = dir.path().join("serve.log");
    let bind = format!("localhost:{port}");
    let url = format!("sqlite://{}", db.display());
    // Flags win over the environment.
    let child = serve(
        dir.path(),
        port,
        &["--bind", &bind, "--database-url", &url],
        &log,
    );
    let startup = std::fs::read_to_string(&log).unwrap();
    let said = |s: &str| {
        let t = std::fs::read_to_string(&log).unwrap();
        assert!(t.contains(s), "serve's log should say {s:?}:\n{t}");
    };
    said(&format!("public URL http://localhost:{port}"));
    said(&format!("database SQLite {}", db.display()));
    said(&dir.path().join("signalbox.key").display().to_string());
    said("next: `signalbox workspace create");
    assert!(
        !startup.contains('\u{1b}'),
        "no colour when stderr is not a terminal"
    );

    let env_db = |cmd: &mut Command| {
        cmd.env("SIGNALBOX_DATABASE_URL", &url)
            .env("SIGNALBOX_KEY_FILE", dir.path().join("signalbox.key"))
            .env("SIGNALBOX_PUBLIC_URL", format!("http://127.0.0.1:{port}"));
    };
    let cli = |args: &[&str]| {
        let mut c = signalbox(dir.path());
        env_db(&mut c);
        let out = c.args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    let ws = cli(&["workspace", "create", "--name", "Acme", "--get", "id"]);
    assert!(ws.starts_with("ws_"), "{ws}");
    // `--get` names the fields there are when one is missing.
    let mut c = signalbox(dir.path());
    env_db(&mut c);
    let out = c
        .args(["workspace", "list", "--get", "nosuch"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("id, name"),
        "{}",
        text(&out.stderr)
    );

    // `send pylon --title` becomes the signal's text; `signals show` prints it.
    let int = cli(&[
        "integration",
        "add",
        "pylon",
        "--workspace",
        &ws,
        "--name",
        "Support",
        "--secret",
        "pylon-test-secret-123",
        "--get",
        "id",
    ]);
    cli(&[
        "send",
        "pylon",
        "--integration-id",
        &int,
        "--secret",
        "pylon-test-secret-123",
        "--issue-id",
        "iss_1",
        "--title",
        "Printer on fire",
    ]);
    let started = Instant::now();
    let id = loop {
        let id = cli(&["signals", "list", "--workspace", &ws, "--get", "id"]);
        if !id.is_empty() {
            break id;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "no signal");
        std::thread::sleep(Duration::from_millis(100));
    };
    let shown = cli(&["signals", "show", &id]);
    assert!(shown.contains("Printer on fire"), "{shown}");
    assert!(shown.contains("pylon"), "{shown}");
    stop(child);
}

#[test]
fn a_wrong_postgres_port_says_where_and_why_once() {
    let dir = tempfile::tempdir().unwrap();
    let keys = text(&run(dir.path(), &["keys", "generate"]).stdout);
    let out = signalbox(dir.path())
        .arg("serve")
        .env(
            "SIGNALBOX_DATABASE_URL",
            "postgres://postgres@127.0.0.1:1/signalbox",
        )
        .env("SIGNALBOX_MASTER_KEYS", keys.trim())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(err.to_lowercase().contains("refused"), "{err}");
    assert_eq!(err.matches("refused").count(), 1, "the cause once: {err}");
    assert!(err.contains("is PostgreSQL running"), "{err}");
}

#[test]
fn completions_and_the_example_config() {
    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let out = run(dir.path(), &["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = text(&out.stdout);
        assert!(
            script.contains("signalbox") && script.contains("webhook-key"),
            "{shell}"
        );
    }
    let out = run(dir.path(), &["config", "example"]);
    assert!(out.status.success());
    let example = text(&out.stdout);
    std::fs::write(dir.path().join("signalbox.toml"), &example).unwrap();
    // The printed file is a valid configuration: `config print` loads it.
    let out = run(dir.path(), &["config", "print"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("SIGNALBOX_BIND=127.0.0.1:8080"),
        "{}",
        text(&out.stdout)
    );
    // Every send command says what --url defaults to.
    for send in ["webhook", "slack", "pylon"] {
        let help = text(&run(dir.path(), &["send", send, "--help"]).stdout);
        assert!(
            help.contains("http://127.0.0.1:8080"),
            "send {send} --help:\n{help}"
        );
    }
}
