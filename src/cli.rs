//! The command line. Admin commands work on the configured database directly (no running server
//! needed) through the same [`Admin`] operations as the HTTP API; `--json` prints the API's JSON.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use crate::admin::{Admin, IntegrationUpdate, NewIntegration, Principal, SecretsUpdate};
use crate::app::Application;
use crate::config::{Config, LogFormat};
use crate::credentials::{self, Credentials};
use crate::crypto::MasterKey;
use crate::store::{DeliveryFilter, SignalFilter, Store};

/// signalbox: verified, deduplicated customer signals from Slack, Pylon and signed webhooks.
#[derive(Debug, Parser)]
#[command(name = "signalbox", version, about)]
pub struct Cli {
    /// Config file (default: ./signalbox.toml when present; env SIGNALBOX_CONFIG).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    /// Print only these fields of the JSON answer (comma-separated), tab-separated on one line;
    /// for a list, one line per item. For scripts: `WS=$(signalbox workspace create --name A --get id)`.
    #[arg(
        long,
        global = true,
        value_name = "FIELD[,FIELD…]",
        value_delimiter = ','
    )]
    pub get: Vec<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server and the workers (the main job).
    Serve(ServeArgs),
    /// Apply migrations and exit.
    Migrate,
    /// Configuration.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Workspaces.
    #[command(subcommand)]
    Workspace(WorkspaceCmd),
    /// Generic webhook keys.
    #[command(subcommand, name = "webhook-key")]
    WebhookKey(KeyCmd),
    /// Slack and Pylon integrations.
    #[command(subcommand)]
    Integration(IntegrationCmd),
    /// Workspace-scoped API tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Signals.
    #[command(subcommand)]
    Signals(SignalsCmd),
    /// Deliveries (the inbox).
    #[command(subcommand)]
    Deliveries(DeliveriesCmd),
    /// Master encryption keys.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Sign and send a sample delivery to a running server.
    #[command(subcommand)]
    Send(SendCmd),
    /// Print a shell completion script: `signalbox completions bash > /etc/bash_completion.d/signalbox`
    /// (zsh: into a directory of $fpath as `_signalbox`; fish: ~/.config/fish/completions/signalbox.fish).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the OpenAPI 3.1 document of the HTTP API (as served at /api/v1/openapi.json;
    /// docs/openapi.json is this output).
    Openapi,
}

/// `serve` flags; each wins over its environment variable and the config file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Listen address, HOST:PORT (default 127.0.0.1:8080; env SIGNALBOX_BIND).
    #[arg(long, value_name = "HOST:PORT")]
    pub bind: Option<String>,
    /// Database: sqlite://PATH or postgres://… (default sqlite://signalbox.db; env
    /// SIGNALBOX_DATABASE_URL).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
}

/// `config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the effective configuration, secrets redacted.
    Print,
    /// Print a commented signalbox.toml with every key and its default.
    Example,
}

/// `workspace …`
#[derive(Debug, Subcommand)]
pub enum WorkspaceCmd {
    /// Create a workspace.
    Create {
        /// Name.
        #[arg(long)]
        name: String,
    },
    /// List workspaces.
    List,
}

/// `webhook-key …`
#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Create a key; prints its secret once.
    Create {
        /// Workspace id.
        #[arg(long)]
        workspace: String,
        /// Label.
        #[arg(long)]
        name: Option<String>,
    },
    /// List a workspace's keys.
    List {
        /// Workspace id.
        #[arg(long)]
        workspace: String,
    },
    /// Rotate a key's secret (the previous one stays valid for the grace period).
    Rotate {
        /// Key id.
        id: String,
        /// Grace period in seconds (default SIGNALBOX_SECRET_GRACE_SECS, 24 h).
        #[arg(long)]
        grace_secs: Option<u64>,
    },
    /// Deactivate a key.
    Delete {
        /// Key id.
        id: String,
    },
}

/// `integration …`
#[derive(Debug, Subcommand)]
pub enum IntegrationCmd {
    /// Add an integration.
    #[command(subcommand)]
    Add(AddCmd),
    /// List integrations.
    List {
        /// Only this workspace.
        #[arg(long)]
        workspace: Option<String>,
    },
    /// Show one integration.
    Show {
        /// Integration id.
        id: String,
    },
    /// Change name, active flag or secrets.
    Update(UpdateArgs),
    /// Deactivate (signals are kept).
    Deactivate {
        /// Integration id.
        id: String,
    },
}

/// `integration update`
#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// Integration id.
    pub id: String,
    /// New name.
    #[arg(long)]
    pub name: Option<String>,
    /// Re-activate.
    #[arg(long, conflicts_with = "deactivate")]
    pub activate: bool,
    /// Deactivate.
    #[arg(long)]
    pub deactivate: bool,
    /// New webhook/signing secret (the previous one stays valid for the grace period).
    #[arg(long, hide_env_values = true, conflicts_with = "secret_file")]
    pub secret: Option<String>,
    /// Read the new webhook/signing secret from this file (`-`: stdin).
    #[arg(long, value_name = "PATH")]
    pub secret_file: Option<PathBuf>,
    /// Grace period of the previous secret, seconds (at most 2592000, 30 days).
    #[arg(long)]
    pub grace_secs: Option<u64>,
    /// New API/bot token (an empty value clears it).
    #[arg(long, hide_env_values = true, conflicts_with = "api_token_file")]
    pub api_token: Option<String>,
    /// Read the new API/bot token from this file (`-`: stdin).
    #[arg(long, value_name = "PATH")]
    pub api_token_file: Option<PathBuf>,
}

/// `integration add …`
#[derive(Debug, Subcommand)]
pub enum AddCmd {
    /// A Slack team (manual credentials), or `--print-install-url` for the "Add to Slack" flow.
    Slack {
        /// Workspace id.
        #[arg(long)]
        workspace: String,
        /// Print an "Add to Slack" link (valid 10 minutes, single use) instead of adding manually.
        #[arg(long)]
        print_install_url: bool,
        /// Name.
        #[arg(long, required_unless_present = "print_install_url")]
        name: Option<String>,
        /// Slack team id (T…).
        #[arg(long, required_unless_present = "print_install_url")]
        team_id: Option<String>,
        /// Signing secret of the Slack app (omit when the app-level secret is configured).
        #[arg(long, hide_env_values = true, conflicts_with = "signing_secret_file")]
        signing_secret: Option<String>,
        /// Read the signing secret from this file (`-`: stdin).
        #[arg(long, value_name = "PATH")]
        signing_secret_file: Option<PathBuf>,
        /// Bot token (xoxb-…).
        #[arg(long, hide_env_values = true, conflicts_with = "bot_token_file")]
        bot_token: Option<String>,
        /// Read the bot token from this file (`-`: stdin).
        #[arg(long, value_name = "PATH")]
        bot_token_file: Option<PathBuf>,
        /// The app's bot user id (its messages are ignored).
        #[arg(long)]
        bot_user_id: Option<String>,
        /// Only these channels (repeatable).
        #[arg(long = "channel")]
        channels: Vec<String>,
    },
    /// A Pylon account.
    Pylon {
        /// Workspace id.
        #[arg(long)]
        workspace: String,
        /// Name.
        #[arg(long)]
        name: String,
        /// Webhook secret shown by Pylon.
        #[arg(
            long,
            hide_env_values = true,
            required_unless_present = "secret_file",
            conflicts_with = "secret_file"
        )]
        secret: Option<String>,
        /// Read the webhook secret from this file (`-`: stdin).
        #[arg(long, value_name = "PATH")]
        secret_file: Option<PathBuf>,
        /// Pylon API token (enriches thin payloads).
        #[arg(long, hide_env_values = true, conflicts_with = "api_token_file")]
        api_token: Option<String>,
        /// Read the Pylon API token from this file (`-`: stdin).
        #[arg(long, value_name = "PATH")]
        api_token_file: Option<PathBuf>,
        /// Only these events (repeatable).
        #[arg(long = "event")]
        events: Vec<String>,
        /// auto (default), x-pylon-signature or timestamped.
        #[arg(long)]
        signature_scheme: Option<String>,
        /// A custom header Pylon must send (e.g. authorization); needs its value.
        #[arg(long)]
        required_header: Option<String>,
        /// Its value.
        #[arg(
            long,
            hide_env_values = true,
            requires = "required_header",
            conflicts_with = "required_header_value_file"
        )]
        required_header_value: Option<String>,
        /// Read the header value from this file (`-`: stdin).
        #[arg(long, value_name = "PATH", requires = "required_header")]
        required_header_value_file: Option<PathBuf>,
    },
}

/// `token …`
#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Mint a workspace-scoped token; prints it once.
    Create {
        /// Workspace id.
        #[arg(long)]
        workspace: String,
        /// Label.
        #[arg(long)]
        name: Option<String>,
    },
    /// List tokens.
    List {
        /// Workspace id.
        #[arg(long)]
        workspace: String,
    },
    /// Revoke a token.
    Revoke {
        /// Token id.
        id: String,
    },
}

/// `signals …`
#[derive(Debug, Subcommand)]
pub enum SignalsCmd {
    /// List signals, newest first.
    List {
        /// Workspace id.
        #[arg(long)]
        workspace: String,
        /// Only this source.
        #[arg(long, value_parser = ["slack", "pylon", "webhook"])]
        source: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One signal: text, source, metadata.
    Show {
        /// Signal id (`sig_…`).
        id: String,
    },
}

/// `deliveries …`
#[derive(Debug, Subcommand)]
pub enum DeliveriesCmd {
    /// List deliveries, newest first.
    List {
        /// Only this status.
        #[arg(long)]
        status: Option<String>,
        /// Only this workspace.
        #[arg(long)]
        workspace: Option<String>,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Show one delivery.
    Show {
        /// Delivery id.
        id: String,
    },
    /// Process a delivery again.
    Replay {
        /// Delivery id.
        id: String,
    },
}

/// `keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Print a new master key (`ID:BASE64`) to put first in SIGNALBOX_MASTER_KEYS.
    Generate {
        /// Key id (default k + current Unix time).
        #[arg(long)]
        id: Option<String>,
    },
    /// Re-encrypt every stored secret under the active key (safe to re-run, safe while serving).
    Rotate,
}

/// The secret a `send` subcommand signs with. A flag shows in process lists: prefer the
/// environment variable or `--secret-file` (which cannot be combined with either).
#[derive(Debug, Args)]
pub struct SendSecret {
    /// The secret (for Slack, `--signing-secret` says the same).
    #[arg(
        long,
        alias = "signing-secret",
        env = "SIGNALBOX_SEND_SECRET",
        hide_env_values = true,
        required_unless_present = "secret_file",
        conflicts_with = "secret_file"
    )]
    pub secret: Option<String>,
    /// Read the secret from this file (`-`: stdin).
    #[arg(long, value_name = "PATH", alias = "signing-secret-file")]
    pub secret_file: Option<PathBuf>,
}

/// `send …`: each platform's sample is built by its source (`sources::*::SendArgs`).
#[derive(Debug, Subcommand)]
pub enum SendCmd {
    /// A Standard Webhooks signed generic delivery.
    Webhook {
        #[command(flatten)]
        args: crate::sources::webhook::SendArgs,
        /// The key's secret (whsec_…).
        #[command(flatten)]
        secret: SendSecret,
        /// Server base URL (default: SIGNALBOX_PUBLIC_URL, else http://{SIGNALBOX_BIND}, i.e.
        /// http://127.0.0.1:8080).
        #[arg(long)]
        url: Option<String>,
    },
    /// A Slack Events API message.
    Slack {
        #[command(flatten)]
        args: crate::sources::slack::SendArgs,
        /// The signing secret.
        #[command(flatten)]
        secret: SendSecret,
        /// Server base URL (default: SIGNALBOX_PUBLIC_URL, else http://{SIGNALBOX_BIND}, i.e.
        /// http://127.0.0.1:8080).
        #[arg(long)]
        url: Option<String>,
    },
    /// A Pylon "Send webhook" delivery.
    Pylon {
        #[command(flatten)]
        args: crate::sources::pylon::SendArgs,
        /// The webhook secret.
        #[command(flatten)]
        secret: SendSecret,
        /// Server base URL (default: SIGNALBOX_PUBLIC_URL, else http://{SIGNALBOX_BIND}, i.e.
        /// http://127.0.0.1:8080).
        #[arg(long)]
        url: Option<String>,
    },
}

/// Sets up logging.
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,tower_http=warn"));
    // Colour only on a terminal, and never with NO_COLOR set (https://no-color.org).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Reads the secrets given as `--…-file PATH` instead of a flag (which process lists show).
#[derive(Debug, Default)]
struct SecretFiles {
    /// `-` (stdin) can feed one secret per command.
    stdin_taken: bool,
}

impl SecretFiles {
    /// The secret of `flag` (e.g. `--secret`): its value, or the contents of its `-file`
    /// without one trailing newline; an error when both are given.
    fn resolve(
        &mut self,
        flag: &str,
        value: Option<String>,
        file: Option<&Path>,
    ) -> anyhow::Result<Option<String>> {
        match (value, file) {
            (Some(_), Some(_)) => anyhow::bail!("give {flag} or {flag}-file, not both"),
            (value, None) => Ok(value),
            (None, Some(path)) => self.read(flag, path).map(Some),
        }
    }

    fn read(&mut self, flag: &str, path: &Path) -> anyhow::Result<String> {
        let text = if path == Path::new("-") {
            if std::mem::replace(&mut self.stdin_taken, true) {
                anyhow::bail!(
                    "{flag}-file -: stdin is already read for another secret of this command"
                );
            }
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
                .map_err(|e| anyhow::anyhow!("cannot read {flag}-file from stdin: {e}"))?;
            text
        } else {
            std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read {flag}-file {}: {e}", path.display()))?
        };
        let text = trim_one_newline(text);
        if text.is_empty() {
            anyhow::bail!("{flag}-file {} is empty", path.display());
        }
        Ok(text)
    }
}

/// Drops one trailing `\n` (or `\r\n`): what `echo` and editors add to a file.
fn trim_one_newline(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    s
}

/// The database an admin command works on: said on stderr, and never created (only `serve`
/// and `migrate` create one): a command run from the wrong directory would otherwise make a
/// fresh empty `signalbox.db` and `signalbox.key` there.
fn existing_database(cfg: &Config) -> anyhow::Result<()> {
    let Some(path) = cfg.sqlite_path().filter(|_| cfg.is_sqlite()) else {
        tracing::info!(
            "using database {}",
            crate::config::redact_url(cfg.database_url.expose_secret())
        );
        return Ok(());
    };
    let abs = std::path::absolute(&path).unwrap_or(path);
    if !abs.exists() {
        anyhow::bail!(
            "no database at {} (SIGNALBOX_DATABASE_URL={}; a relative path is relative to the \
             current directory). Run this command where `signalbox serve` runs, point \
             SIGNALBOX_DATABASE_URL (or --config) at the server's database, or create a new one \
             with `signalbox migrate`",
            abs.display(),
            crate::config::redact_url(cfg.database_url.expose_secret())
        );
    }
    tracing::info!("using database SQLite {}", abs.display());
    Ok(())
}

async fn admin(cfg: &Config) -> anyhow::Result<Admin> {
    existing_database(cfg)?;
    let store = Store::connect(cfg).await?;
    let (keyring, note) = credentials::load_keyring(cfg)?;
    tracing::debug!("{note}");
    credentials::check_keys(&store, &keyring).await?;
    let creds = Credentials::new(store.clone(), keyring, cfg.credential_cache_ttl);
    Ok(Admin {
        store,
        creds,
        cfg: Arc::new(cfg.clone()),
        sources: crate::sources::SOURCES,
        platforms: crate::sources::PLATFORMS,
    })
}

/// The fields `--get` asked for (set once, before any command prints).
static GET_FIELDS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// `--get a,b`: the fields of `v` (or of each of its `items`), tab-separated; an error naming
/// the fields there are when one is missing.
fn get_fields(v: &Value, fields: &[String]) -> Result<String, String> {
    let one = |o: &Value| -> Result<String, String> {
        fields
            .iter()
            .map(|f| match o.get(f) {
                Some(Value::String(s)) => Ok(s.clone()),
                Some(Value::Null) => Ok(String::new()),
                Some(other) => Ok(other.to_string()),
                None => Err(format!(
                    "--get {f}: the answer has no field {f:?}; it has: {}",
                    o.as_object()
                        .map(|m| m.keys().cloned().collect::<Vec<_>>().join(", "))
                        .unwrap_or_default()
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|vals| vals.join("\t"))
    };
    match v.get("items").and_then(Value::as_array) {
        Some(items) if fields.iter().all(|f| v.get(f).is_none()) => items
            .iter()
            .map(one)
            .collect::<Result<Vec<_>, _>>()
            .map(|lines| lines.join("\n")),
        _ => one(v),
    }
}

fn print(json_out: bool, v: &impl serde::Serialize, human: impl FnOnce(&Value) -> String) {
    let v = &serde_json::to_value(v).unwrap_or(Value::Null);
    if let Some(fields) = GET_FIELDS.get().filter(|f| !f.is_empty()) {
        match get_fields(v, fields) {
            Ok(text) => write_stdout(&text),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        }
        return;
    }
    let text = if json_out {
        serde_json::to_string_pretty(v).unwrap_or_default()
    } else {
        human(v)
    };
    write_stdout(&text);
}

/// Writes `text` and a newline to stdout. A reader that went away (`| head`, `| true`) ends the
/// command quietly with success, as other Unix tools do, instead of a panic.
fn write_stdout(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = writeln!(out, "{text}").and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: writing to stdout: {e}");
            std::process::exit(1);
        }
    }
}

fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn items(v: &Value) -> Vec<Value> {
    v.get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// What `serve` tells the operator once it listens: where, on which database, and what next.
fn startup_summary(cfg: &Config, addr: std::net::SocketAddr) {
    let database = match cfg.sqlite_path() {
        Some(p) if cfg.is_sqlite() => {
            format!("SQLite {}", std::path::absolute(&p).unwrap_or(p).display())
        }
        _ => crate::config::redact_url(cfg.database_url.expose_secret()),
    };
    let key = match cfg.effective_key_file() {
        _ if cfg.master_keys.is_some() => "from SIGNALBOX_MASTER_KEYS".to_string(),
        Some(p) => std::path::absolute(&p).unwrap_or(p).display().to_string(),
        None => "(none)".to_string(),
    };
    tracing::info!(
        "signalbox {} serving http://{addr} (public URL {}), database {database}, credential key {key}",
        env!("CARGO_PKG_VERSION"),
        cfg.public_url,
    );
    tracing::info!(
        "next: `signalbox workspace create --name Acme`, then README \"Five-minute tour\"; \
         stop with Ctrl-C (SIGTERM): in-flight deliveries are committed first"
    );
}

/// Runs the CLI.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut overrides = Vec::new();
    if let Command::Serve(a) = &cli.command {
        if let Some(b) = &a.bind {
            overrides.push(("bind", b.clone()));
        }
        if let Some(u) = &a.database_url {
            overrides.push(("database_url", u.clone()));
        }
    }
    let cfg = Config::load_with(cli.config.as_deref(), &overrides)?;
    init_tracing(cfg.log_format);
    let j = cli.json;
    let _ = GET_FIELDS.set(
        cli.get
            .iter()
            .map(|f| f.trim().to_string())
            .filter(|f| !f.is_empty())
            .collect(),
    );
    let who = Principal::Admin;
    match cli.command {
        Command::Serve(_) => {
            let app = Application::build(cfg.clone()).await?;
            startup_summary(&cfg, app.local_addr());
            app.run_until_stopped(crate::app::shutdown_signal()).await?;
        }
        Command::Migrate => {
            let store = Store::connect(&cfg).await?;
            print(j, &json!({"ok": true, "backend": store.backend()}), |_| {
                format!("migrations applied ({})", store.backend())
            });
        }
        Command::Config(ConfigCmd::Example) => {
            write_stdout(crate::config::example_toml().trim_end())
        }
        Command::Openapi => {
            let doc = crate::http::api::document().to_pretty_json()?;
            write_stdout(&doc);
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, "signalbox", &mut buf);
            write_stdout(String::from_utf8_lossy(&buf).trim_end());
        }
        Command::Config(ConfigCmd::Print) => {
            let lines = cfg.redacted_lines();
            let v: serde_json::Map<String, Value> = lines
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect();
            print(j, &Value::Object(v), |_| {
                lines
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Workspace(c) => {
            let a = admin(&cfg).await?;
            match c {
                WorkspaceCmd::Create { name } => {
                    let v = a.create_workspace(&who, &name).await?;
                    print(j, &v, |v| {
                        format!("created workspace {} ({})", s(v, "id"), s(v, "name"))
                    });
                }
                WorkspaceCmd::List => {
                    let v = a.list_workspaces(&who).await?;
                    print(j, &v, |v| {
                        items(v)
                            .iter()
                            .map(|w| format!("{}  {}", s(w, "id"), s(w, "name")))
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                }
            }
        }
        Command::WebhookKey(c) => {
            let a = admin(&cfg).await?;
            match c {
                KeyCmd::Create { workspace, name } => {
                    let v = a.create_webhook_key(&who, &workspace, name).await?;
                    print(j, &v, |v| {
                        format!(
                            "created webhook key {}\nsecret (shown once): {}\nwebhook URL: {}",
                            s(v, "id"),
                            s(v, "secret"),
                            s(v, "webhook_url")
                        )
                    });
                }
                KeyCmd::List { workspace } => {
                    let v = a.list_webhook_keys(&who, &workspace).await?;
                    print(j, &v, |v| {
                        items(v)
                            .iter()
                            .map(|k| {
                                format!(
                                    "{}  active={}  {}",
                                    s(k, "id"),
                                    s(k, "is_active"),
                                    s(k, "webhook_url")
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                }
                KeyCmd::Rotate { id, grace_secs } => {
                    let v = a.rotate_webhook_key(&who, &id, grace_secs).await?;
                    print(j, &v, |v| {
                        format!(
                            "rotated {}\nnew secret (shown once): {}\nprevious secret valid until {}",
                            s(v, "id"),
                            s(v, "secret"),
                            s(v, "previous_secret_valid_until")
                        )
                    });
                }
                KeyCmd::Delete { id } => {
                    let v = a.delete_webhook_key(&who, &id).await?;
                    print(j, &v, |_| format!("deactivated {id}"));
                }
            }
        }
        Command::Integration(c) => {
            let a = admin(&cfg).await?;
            let show = |v: &Value| {
                format!(
                    "{}  {}  {}  active={}\nwebhook URL: {}",
                    s(v, "id"),
                    s(v, "platform"),
                    s(v, "name"),
                    s(v, "is_active"),
                    s(v, "webhook_url")
                )
            };
            match c {
                IntegrationCmd::Add(AddCmd::Slack {
                    workspace,
                    print_install_url,
                    name,
                    team_id,
                    signing_secret,
                    signing_secret_file,
                    bot_token,
                    bot_token_file,
                    bot_user_id,
                    channels,
                }) => {
                    let mut files = SecretFiles::default();
                    let signing_secret = files.resolve(
                        "--signing-secret",
                        signing_secret,
                        signing_secret_file.as_deref(),
                    )?;
                    let bot_token =
                        files.resolve("--bot-token", bot_token, bot_token_file.as_deref())?;
                    if print_install_url {
                        let url =
                            crate::sources::slack::oauth::install_url(&a, &who, &workspace, None)
                                .await?;
                        print(j, &json!({"install_url": url}), |_| url.clone());
                        return Ok(());
                    }
                    let input = NewIntegration {
                        platform: "slack".into(),
                        name: name.unwrap_or_default(),
                        slack_team_id: team_id,
                        signing_secret,
                        bot_token,
                        slack_bot_user_id: bot_user_id,
                        config: Some(json!({"slack_channels": channels})),
                        ..Default::default()
                    };
                    let v = a.create_integration(&who, &workspace, input).await?;
                    print(j, &v, |v| {
                        format!(
                            "created {}\nPaste this Request URL into Slack (Event Subscriptions): {}",
                            s(v, "id"),
                            s(v, "webhook_url")
                        )
                    });
                }
                IntegrationCmd::Add(AddCmd::Pylon {
                    workspace,
                    name,
                    secret,
                    secret_file,
                    api_token,
                    api_token_file,
                    events,
                    signature_scheme,
                    required_header,
                    required_header_value,
                    required_header_value_file,
                }) => {
                    let mut files = SecretFiles::default();
                    let secret = files
                        .resolve("--secret", secret, secret_file.as_deref())?
                        .ok_or_else(|| anyhow::anyhow!("--secret or --secret-file is required"))?;
                    let api_token =
                        files.resolve("--api-token", api_token, api_token_file.as_deref())?;
                    let required_header_value = files.resolve(
                        "--required-header-value",
                        required_header_value,
                        required_header_value_file.as_deref(),
                    )?;
                    if required_header.is_some() && required_header_value.is_none() {
                        anyhow::bail!(
                            "--required-header needs --required-header-value or \
                             --required-header-value-file"
                        );
                    }
                    let mut config = json!({"pylon_events": events});
                    if let Some(sch) = signature_scheme {
                        config["signature_scheme"] = json!(sch);
                    }
                    if let Some(h) = required_header {
                        config["required_header"] = json!(h);
                    }
                    let input = NewIntegration {
                        platform: "pylon".into(),
                        name,
                        webhook_secret: Some(secret),
                        api_token,
                        required_header_value,
                        config: Some(config),
                        ..Default::default()
                    };
                    let v = a.create_integration(&who, &workspace, input).await?;
                    print(j, &v, |v| {
                        format!(
                            "created {}\nPaste this URL into Pylon (Settings → Webhooks): {}",
                            s(v, "id"),
                            s(v, "webhook_url")
                        )
                    });
                }
                IntegrationCmd::List { workspace } => {
                    let v = a.list_integrations(&who, workspace.as_deref()).await?;
                    print(j, &v, |v| {
                        items(v).iter().map(show).collect::<Vec<_>>().join("\n")
                    });
                }
                IntegrationCmd::Show { id } => {
                    let v = a.get_integration(&who, &id).await?;
                    print(j, &v, |v| {
                        serde_json::to_string_pretty(v).unwrap_or_default()
                    });
                }
                IntegrationCmd::Update(mut u) => {
                    let mut files = SecretFiles::default();
                    u.secret = files.resolve("--secret", u.secret, u.secret_file.as_deref())?;
                    u.api_token =
                        files.resolve("--api-token", u.api_token, u.api_token_file.as_deref())?;
                    let up = IntegrationUpdate {
                        name: u.name,
                        is_active: if u.activate {
                            Some(true)
                        } else if u.deactivate {
                            Some(false)
                        } else {
                            None
                        },
                        secrets: (u.secret.is_some() || u.api_token.is_some()).then_some({
                            SecretsUpdate {
                                webhook_secret: u.secret,
                                api_token: u.api_token,
                                required_header_value: None,
                                grace_period_secs: u.grace_secs,
                            }
                        }),
                        ..Default::default()
                    };
                    let v = a.update_integration(&who, &u.id, up).await?;
                    print(j, &v, show);
                }
                IntegrationCmd::Deactivate { id } => {
                    let v = a.deactivate_integration(&who, &id).await?;
                    print(j, &v, show);
                }
            }
        }
        Command::Token(c) => {
            let a = admin(&cfg).await?;
            match c {
                TokenCmd::Create { workspace, name } => {
                    let v = a.create_token(&who, &workspace, name).await?;
                    print(j, &v, |v| {
                        format!(
                            "created {}\ntoken (shown once): {}",
                            s(v, "id"),
                            s(v, "token")
                        )
                    });
                }
                TokenCmd::List { workspace } => {
                    let v = a.list_tokens(&who, &workspace).await?;
                    print(j, &v, |v| {
                        items(v)
                            .iter()
                            .map(|t| {
                                format!(
                                    "{}  {}  revoked={}",
                                    s(t, "id"),
                                    s(t, "name"),
                                    s(t, "revoked_at")
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                }
                TokenCmd::Revoke { id } => {
                    let v = a.revoke_token(&who, &id).await?;
                    print(j, &v, |_| format!("revoked {id}"));
                }
            }
        }
        Command::Signals(SignalsCmd::Show { id }) => {
            let a = admin(&cfg).await?;
            let v = a.get_signal(&who, &id).await?;
            print(j, &v, |v| {
                let meta = v
                    .get("source_metadata")
                    .map(|m| serde_json::to_string_pretty(m).unwrap_or_default())
                    .unwrap_or_default();
                format!(
                    "{}  {}  {}  {}\nworkspace {}  source_ref {}  updated {}\n\n{}\n\nmetadata:\n{meta}",
                    s(v, "id"),
                    s(v, "source"),
                    s(v, "status"),
                    s(v, "created_at"),
                    s(v, "workspace_id"),
                    s(v, "source_ref"),
                    s(v, "updated_at"),
                    s(v, "verbatim"),
                )
            });
        }
        Command::Signals(SignalsCmd::List {
            workspace,
            source,
            limit,
        }) => {
            let a = admin(&cfg).await?;
            let v = a
                .list_signals(
                    &who,
                    SignalFilter {
                        workspace_id: workspace,
                        source,
                        status: None,
                        cursor: None,
                        limit,
                    },
                )
                .await?;
            print(j, &v, |v| {
                let rows = items(v);
                if rows.is_empty() {
                    return "no signals yet".into();
                }
                rows.iter()
                    .map(|x| {
                        format!(
                            "{}  {:<7}  {}  {}",
                            s(x, "id"),
                            s(x, "source"),
                            s(x, "created_at"),
                            s(x, "verbatim").replace('\n', " ")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        Command::Deliveries(c) => {
            let a = admin(&cfg).await?;
            match c {
                DeliveriesCmd::List {
                    status,
                    workspace,
                    limit,
                } => {
                    let v = a
                        .list_deliveries(
                            &who,
                            DeliveryFilter {
                                workspace_id: workspace,
                                status,
                                limit,
                                ..Default::default()
                            },
                        )
                        .await?;
                    print(j, &v, |v| {
                        items(v)
                            .iter()
                            .map(|d| {
                                format!(
                                    "{}  {:<7}  {:<9}  attempts={}  {}",
                                    s(d, "id"),
                                    s(d, "source"),
                                    s(d, "status"),
                                    s(d, "attempts"),
                                    if s(d, "last_error") != "-" {
                                        s(d, "last_error")
                                    } else {
                                        s(d, "filter_reason")
                                    }
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                }
                DeliveriesCmd::Show { id } => {
                    let v = a.get_delivery(&who, &id).await?;
                    print(j, &v, |v| {
                        serde_json::to_string_pretty(v).unwrap_or_default()
                    });
                }
                DeliveriesCmd::Replay { id } => {
                    let v = a.replay_delivery(&who, &id).await?;
                    print(j, &v, |_| format!("{id} queued for processing again"));
                }
            }
        }
        Command::Keys(KeysCmd::Generate { id }) => {
            let id = id.unwrap_or_else(|| format!("k{}", crate::clock::now_secs()));
            let key = MasterKey::generate(&id);
            let spec = key.to_spec();
            print(j, &json!({"id": id, "key": spec.expose_secret()}), |_| {
                spec.expose_secret().to_string()
            });
        }
        Command::Keys(KeysCmd::Rotate) => {
            existing_database(&cfg)?;
            let store = Store::connect(&cfg).await?;
            let (keyring, _) = credentials::load_keyring(&cfg)?;
            let (rotated, skipped) = credentials::rotate_all(&store, &keyring).await?;
            if let crate::store::Pool::Postgres(p) = store.pool() {
                let _ = sqlx::query("SELECT pg_notify($1, '*')")
                    .bind(credentials::NOTIFY_CHANNEL)
                    .execute(p)
                    .await;
            }
            print(
                j,
                &json!({"rotated": rotated, "unchanged": skipped, "active_key": keyring.active_id()}),
                |_| {
                    format!(
                        "re-encrypted {rotated} secret(s) under key {}; {skipped} already current",
                        keyring.active_id()
                    )
                },
            );
        }
        Command::Send(c) => send(&cfg, j, c).await?,
    }
    Ok(())
}

/// The secret of a `send` command: `flag` (or `SIGNALBOX_SEND_SECRET`), or `--secret-file`.
impl SendSecret {
    /// The secret from the flag, the environment or the file.
    fn resolve(self) -> anyhow::Result<String> {
        match (self.secret, self.secret_file) {
            (Some(_), Some(_)) => {
                anyhow::bail!("give --secret (or SIGNALBOX_SEND_SECRET) or --secret-file, not both")
            }
            (Some(v), None) => Ok(v),
            (None, Some(path)) => SecretFiles::default().read("--secret", &path),
            (None, None) => {
                anyhow::bail!("--secret, --secret-file or SIGNALBOX_SEND_SECRET is required")
            }
        }
    }
}

async fn send(cfg: &Config, j: bool, c: SendCmd) -> anyhow::Result<()> {
    let http = crate::state::http_client()?;
    let now = crate::clock::now_secs();
    let (sample, url) = match c {
        SendCmd::Webhook { args, secret, url } => (args.sample(&secret.resolve()?, now)?, url),
        SendCmd::Slack { args, secret, url } => (args.sample(&secret.resolve()?, now)?, url),
        SendCmd::Pylon { args, secret, url } => (args.sample(&secret.resolve()?, now)?, url),
    };
    let base = url.unwrap_or_else(|| cfg.public_url.clone());
    let url = format!("{}{}", base.trim_end_matches('/'), sample.path);
    let (headers, body) = (sample.headers, sample.body);
    let mut req = http
        .post(&url)
        .header("content-type", "application/json")
        .body(body);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("could not reach {url}: {e}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let v: Value = serde_json::from_str(&text).unwrap_or(json!({"body": text}));
    print(
        j,
        &json!({"status": status.as_u16(), "response": v}),
        |_| format!("{} {}", status.as_u16(), text),
    );
    if !status.is_success() {
        anyhow::bail!("the server answered {status}");
    }
    Ok(())
}

/// An error and its causes on one line, each cause once (wrappers often repeat their source's
/// text), as the binaries print it.
pub fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if !text.contains(&cause) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_cli() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// Every secret-bearing flag hides its environment value in `--help` and has a sibling
    /// `…-file` flag, so no secret needs to be on the command line.
    #[test]
    fn secret_flags_hide_env_values_and_have_file_siblings() {
        use clap::CommandFactory;
        fn walk(cmd: &clap::Command, path: &str, seen: &mut usize) {
            let ids: Vec<String> = cmd
                .get_arguments()
                .map(|a| a.get_id().to_string())
                .collect();
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                let secret = ["secret", "token", "key", "header_value"]
                    .iter()
                    .any(|w| id.contains(w));
                // Not secrets: ids, paths, flags about secrets.
                let exempt = id.ends_with("_file")
                    || id.ends_with("_id")
                    || id.ends_with("_secs")
                    || id == "print_install_url";
                if secret && !exempt {
                    *seen += 1;
                    assert!(
                        arg.is_hide_env_values_set(),
                        "{path} --{id} shows its env value"
                    );
                    let sibling = if path.starts_with("signalbox send") {
                        "secret_file".to_string()
                    } else {
                        format!("{id}_file")
                    };
                    assert!(ids.contains(&sibling), "{path} --{id} has no {sibling}");
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), seen);
            }
        }
        let mut seen = 0;
        let cli = Cli::command();
        for sub in cli.get_subcommands() {
            walk(sub, &format!("signalbox {}", sub.get_name()), &mut seen);
        }
        // send webhook/slack/pylon, add slack (2), add pylon (3), update (2).
        assert!(seen >= 10, "only {seen} secret flags found");
    }

    #[test]
    fn a_secret_and_its_file_cannot_both_be_given() {
        let parse = |args: &[&str]| Cli::try_parse_from(args.iter().copied());
        let both = [
            vec![
                "signalbox",
                "send",
                "webhook",
                "--key-id",
                "whk_1",
                "--verbatim",
                "v",
            ],
            vec!["signalbox", "send", "slack", "--team", "T1", "--text", "t"],
            vec![
                "signalbox",
                "send",
                "pylon",
                "--integration-id",
                "int_1",
                "--issue-id",
                "i",
            ],
        ];
        for (base, flag) in both
            .iter()
            .zip(["--secret", "--signing-secret", "--secret"])
        {
            let mut args = base.clone();
            args.extend([flag, "s3cret-value", "--secret-file", "/tmp/x"]);
            let e = parse(&args).expect_err("conflict");
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ArgumentConflict,
                "{args:?}"
            );
        }
        for (flag, file) in [
            ("--signing-secret", "--signing-secret-file"),
            ("--bot-token", "--bot-token-file"),
        ] {
            let args = [
                "signalbox",
                "integration",
                "add",
                "slack",
                "--workspace",
                "ws_1",
                "--name",
                "n",
                "--team-id",
                "T1",
                flag,
                "s3cret-value",
                file,
                "/tmp/x",
            ];
            let e = parse(&args).expect_err("conflict");
            assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{flag}");
        }
        for (flag, file) in [
            ("--secret", "--secret-file"),
            ("--api-token", "--api-token-file"),
        ] {
            let mut args = vec![
                "signalbox",
                "integration",
                "add",
                "pylon",
                "--workspace",
                "ws_1",
                "--name",
                "n",
            ];
            if flag != "--secret" {
                args.extend(["--secret", "s3cret-value"]);
            }
            args.extend([flag, "s3cret-value", file, "/tmp/x"]);
            let e = parse(&args).expect_err("conflict");
            assert_eq!(e.kind(), clap::error::ErrorKind::ArgumentConflict, "{flag}");
        }
        // The file alone is enough for a required secret.
        let ok = parse(&[
            "signalbox",
            "integration",
            "add",
            "pylon",
            "--workspace",
            "ws_1",
            "--name",
            "n",
            "--secret-file",
            "-",
        ])
        .expect("--secret-file replaces --secret");
        match ok.command {
            Command::Integration(IntegrationCmd::Add(AddCmd::Pylon {
                secret,
                secret_file,
                ..
            })) => {
                assert_eq!(secret, None);
                assert_eq!(secret_file, Some(PathBuf::from("-")));
            }
            other => panic!("{other:?}"),
        }
        let e = parse(&[
            "signalbox",
            "integration",
            "add",
            "pylon",
            "--workspace",
            "ws_1",
            "--name",
            "n",
        ])
        .expect_err("a secret is required");
        assert_eq!(e.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn secret_files_lose_one_trailing_newline_and_name_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("secret");
        let mut files = SecretFiles::default();
        for (content, want) in [
            ("abc", "abc"),
            ("abc\n", "abc"),
            ("abc\r\n", "abc"),
            ("abc\n\n", "abc\n"),
            (" spaced \n", " spaced "),
        ] {
            std::fs::write(&file, content).expect("write");
            let got = files
                .resolve("--secret", None, Some(&file))
                .expect("readable");
            assert_eq!(got.as_deref(), Some(want), "{content:?}");
        }
        std::fs::write(&file, "\n").expect("write");
        let e = files
            .resolve("--secret", None, Some(&file))
            .expect_err("empty");
        assert!(e.to_string().contains(&file.display().to_string()), "{e}");
        let missing = dir.path().join("missing");
        let e = files
            .resolve("--bot-token", None, Some(&missing))
            .expect_err("missing");
        let msg = e.to_string();
        assert!(msg.contains("--bot-token-file"), "{msg}");
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        let e = files
            .resolve("--secret", Some("x".into()), Some(&file))
            .expect_err("both");
        assert!(e.to_string().contains("not both"), "{e}");
        assert_eq!(
            files
                .resolve("--secret", Some("flag".into()), None)
                .expect("flag"),
            Some("flag".into())
        );
        assert_eq!(files.resolve("--secret", None, None).expect("absent"), None);
        // stdin feeds one secret at most.
        files.stdin_taken = true;
        let e = files
            .resolve("--api-token", None, Some(Path::new("-")))
            .expect_err("stdin twice");
        assert!(e.to_string().contains("stdin"), "{e}");
    }
}
