//! The server under test: a `signalbox serve` child process on a fresh database (SQLite file
//! or scratch PostgreSQL database), or an already running server (`--url`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use secrecy::ExposeSecret;
use signalbox::config::redact_url;
use signalbox::crypto::MasterKey;
use signalbox::ids::new_id;
use signalbox::store::inspect;

use crate::args::BenchArgs;
use crate::{progress, random_secret};

/// Longest wait for a started server to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The signalbox executable to start: `--server`, else `signalbox` beside this executable
/// (cargo puts both binaries of the workspace in the same `target/<profile>/` directory).
pub(crate) fn server_binary(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    let path = match &args.server {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("locating the signalbox-bench executable")?
            .with_file_name(format!("signalbox{}", std::env::consts::EXE_SUFFIX)),
    };
    if !path.is_file() {
        match &args.server {
            Some(_) => bail!("--server {}: no such executable", path.display()),
            None => bail!(
                "no signalbox server executable at {}: build it with cargo build --release \
                 (cargo build for a debug signalbox-bench), or name one with --server PATH",
                path.display()
            ),
        }
    }
    Ok(path)
}

/// Where requests go.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) host: String,
    pub(crate) base: String,
    pub(crate) admin_token: String,
}

impl Target {
    pub(crate) async fn parse(url: &str, admin_token: String) -> anyhow::Result<Target> {
        let rest = url
            .trim_end_matches('/')
            .strip_prefix("http://")
            .ok_or_else(|| {
                anyhow!("--url must be http://HOST:PORT (the benchmark speaks plain HTTP/1.1)")
            })?;
        if rest.contains('/') {
            bail!("--url must be http://HOST:PORT without a path");
        }
        let hostport = if rest.contains(':') {
            rest.to_string()
        } else {
            format!("{rest}:80")
        };
        let addr = tokio::net::lookup_host(&hostport)
            .await
            .with_context(|| format!("resolving {hostport}"))?
            .next()
            .ok_or_else(|| anyhow!("{hostport} does not resolve"))?;
        Ok(Target {
            addr,
            host: rest.to_string(),
            base: format!("http://{rest}"),
            admin_token,
        })
    }
}

/// A `signalbox serve` child process on a fresh database.
pub(crate) struct Server {
    child: tokio::process::Child,
    pub(crate) pid: Option<u32>,
    pub(crate) target: Target,
    pub(crate) database_url: String,
    pub(crate) backend: &'static str,
    cleanup: Cleanup,
}

enum Cleanup {
    Files(Vec<PathBuf>),
    Dir(PathBuf),
    PgDatabase { admin_url: String, name: String },
}

impl Server {
    pub(crate) async fn start(args: &BenchArgs, scenario: &str) -> anyhow::Result<Server> {
        let (database_url, backend, cleanup) = fresh_database(args, scenario).await?;
        progress(&format!(
            "{scenario}: starting a server on a fresh {backend} database"
        ));
        let exe = server_binary(args)?;
        let token = format!("bench-{}", random_secret());
        let keys = MasterKey::generate("bench");
        let mut last_err = anyhow!("the server did not start");
        for _ in 0..3 {
            let port = free_port()?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut child = tokio::process::Command::new(&exe)
                .arg("serve")
                .env("SIGNALBOX_DATABASE_URL", &database_url)
                .env("SIGNALBOX_BIND", addr.to_string())
                .env("SIGNALBOX_PUBLIC_URL", format!("http://{addr}"))
                .env("SIGNALBOX_ADMIN_TOKEN", &token)
                .env("SIGNALBOX_MASTER_KEYS", keys.to_spec().expose_secret())
                .env(
                    "RUST_LOG",
                    std::env::var("SIGNALBOX_BENCH_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
                )
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {} serve", exe.display()))?;
            let target = Target {
                addr,
                host: addr.to_string(),
                base: format!("http://{addr}"),
                admin_token: token.clone(),
            };
            match wait_ready(&mut child, &target).await {
                Ok(()) => {
                    return Ok(Server {
                        pid: child.id(),
                        child,
                        target,
                        database_url,
                        backend,
                        cleanup,
                    });
                }
                Err(e) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    last_err = e;
                }
            }
        }
        cleanup.run(false).await;
        Err(last_err)
    }

    /// `VmHWM` of the server process, MiB.
    pub(crate) fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kib: f64 = line
            .trim_start_matches("VmHWM:")
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024.0)
    }

    pub(crate) async fn stop(mut self, keep: bool) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        self.cleanup.run(keep).await;
    }
}

impl Cleanup {
    async fn run(&self, keep: bool) {
        if keep {
            match self {
                Cleanup::Files(f) => progress(&format!("kept {}", f[0].display())),
                Cleanup::Dir(d) => progress(&format!("kept {}", d.display())),
                Cleanup::PgDatabase { name, .. } => progress(&format!("kept database {name}")),
            }
            return;
        }
        match self {
            Cleanup::Files(files) => {
                for f in files {
                    let _ = std::fs::remove_file(f);
                }
            }
            Cleanup::Dir(d) => {
                let _ = std::fs::remove_dir_all(d);
            }
            Cleanup::PgDatabase { admin_url, name } => {
                let dropped = inspect::drop_scratch_postgres_database(admin_url, name).await;
                if let Err(e) = dropped {
                    progress(&format!("could not drop database {name}: {e}"));
                }
            }
        }
    }
}

/// A fresh database for one scenario: its URL, backend name and how to remove it.
async fn fresh_database(
    args: &BenchArgs,
    scenario: &str,
) -> anyhow::Result<(String, &'static str, Cleanup)> {
    let id = new_id("x").trim_start_matches("x_").to_string();
    match args.database_url.as_deref() {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let name = format!("sbx_bench_{id}");
            inspect::create_scratch_postgres_database(url, &name)
                .await
                .with_context(|| format!("creating database {name} on {}", redact_url(url)))?;
            Ok((
                replace_pg_database(url, &name),
                "postgres",
                Cleanup::PgDatabase {
                    admin_url: url.to_string(),
                    name,
                },
            ))
        }
        Some(url) => {
            let path = url
                .strip_prefix("sqlite://")
                .or_else(|| url.strip_prefix("sqlite:"))
                .unwrap_or(url);
            let path = PathBuf::from(path.split('?').next().unwrap_or(path));
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("signalbox");
            let file = dir.join(format!("{stem}-bench-{scenario}-{id}.db"));
            let files = ["", "-wal", "-shm"]
                .iter()
                .map(|suffix| PathBuf::from(format!("{}{suffix}", file.display())))
                .collect();
            Ok((
                format!("sqlite://{}", file.display()),
                "sqlite",
                Cleanup::Files(files),
            ))
        }
        None => {
            let dir = std::env::temp_dir().join(format!("signalbox-bench-{id}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            Ok((
                format!("sqlite://{}", dir.join("signalbox.db").display()),
                "sqlite",
                Cleanup::Dir(dir),
            ))
        }
    }
}

/// `postgres://u@h:5432/db?x=y` with the database replaced by `name`.
fn replace_pg_database(url: &str, name: &str) -> String {
    let (main, query) = match url.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (url, None),
    };
    let after_scheme = main.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match main[after_scheme..].rfind('/') {
        Some(i) => &main[..after_scheme + i],
        None => main,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

async fn wait_ready(child: &mut tokio::process::Child, target: &Target) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the server exited during start-up ({status})");
        }
        if let Ok(r) = http.get(format!("{}/readyz", target.base)).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the server was not ready within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_database_is_replaced() {
        assert_eq!(
            replace_pg_database("postgres://postgres@127.0.0.1:5432/postgres", "x"),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            replace_pg_database("postgres://u:p@h/db?sslmode=disable", "x"),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            replace_pg_database("postgres://h:5432", "x"),
            "postgres://h:5432/x"
        );
    }
}
