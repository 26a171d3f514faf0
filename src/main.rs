//! The `apnsd` command line: run, check, send, simulate.
//! Exit codes: 0 clean stop, 2 bad configuration or arguments, 1 anything else.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use apnsd::config::{Config, LogFormat};
use apnsd::job::DeviceToken;
use apnsd::logging::Logging;

#[derive(Parser)]
#[command(
    name = "apnsd",
    version,
    about = "RabbitMQ-fed Apple push notification daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground until SIGTERM/SIGINT.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate the configuration and every certificate in it (exit 2 on any problem).
    Check {
        #[arg(long)]
        config: PathBuf,
        /// Also open one gateway connection per app with its identity.
        #[arg(long)]
        connect: bool,
    },
    /// Publish an alert to the configured queue: one token (a smoke test) or
    /// a broadcast to every token in a file.
    Send {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        to: Recipients,
        #[arg(long)]
        alert: String,
        #[arg(long)]
        app: Option<String>,
    },
    /// Manage broadcast channels (iOS 18 Live Activities) with an HTTP/2 app's
    /// credentials: create prints the new id, list one id per line.
    Channels {
        action: apnsd::channels::Action,
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        app: Option<String>,
        /// create: 0 stores no message (the default), 1 the most recent one.
        #[arg(long)]
        storage_policy: Option<u8>,
        /// get, delete: the channel id (base64).
        #[arg(long)]
        channel: Option<String>,
    },
    /// Run the built-in APNs simulator (binary gateway, feedback service, HTTP/2 API).
    Simulate(Box<apnsd::simulator::SimulateArgs>),
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Recipients {
    /// One device token (hex).
    #[arg(long)]
    token: Option<String>,
    /// A file with one token per line (blank lines and `#` comments skipped).
    #[arg(long)]
    tokens_file: Option<PathBuf>,
}

/// glibc raises its mmap threshold whenever a large block is freed (up to
/// 32 MiB): after the first few, megabyte message bodies come from the heap,
/// and what they leave behind when freed stays resident. Pinning the
/// threshold at its initial 128 KiB (which also ends the adjustment) keeps
/// them mapped and returned: fan-out peak RSS 49–51 MB instead of 60–73 MB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn pin_mmap_threshold() {
    // SAFETY: mallopt only sets an allocator parameter, and no other thread
    // exists yet to be allocating meanwhile.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn pin_mmap_threshold() {}

/// Bad configuration or arguments: exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

fn main() -> ExitCode {
    pin_mmap_threshold();
    let cli = Cli::parse();
    apnsd::apns::tls::install_crypto_provider();
    let result = match cli.command {
        // The daemon's configuration decides how many threads run it.
        Command::Run { config: path } => load(&path).and_then(|config| {
            apnsd::config::ensure_descriptors(config.descriptors_needed()).map_err(Usage)?;
            runtime(config.worker_threads)?.block_on(run(&path, config))
        }),
        Command::Check { config, connect } => {
            runtime(1).and_then(|rt| rt.block_on(check(&config, connect)))
        }
        Command::Send {
            config,
            to,
            alert,
            app,
        } => runtime(1).and_then(|rt| rt.block_on(send(&config, &to, &alert, app.as_deref()))),
        Command::Channels {
            action,
            config,
            app,
            storage_policy,
            channel,
        } => apnsd::channels::Command::new(action, storage_policy, channel.as_deref())
            .map_err(|e| Usage(e.to_string()).into())
            .and_then(|command| runtime(1)?.block_on(channels(&config, app.as_deref(), &command))),
        Command::Simulate(args) => runtime(0).and_then(|rt| rt.block_on(simulate(*args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<Usage>().is_some() => {
            eprintln!("apnsd: {e:#}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("apnsd: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// One thread runs everything on it; more (0: one per core) steal work.
fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if threads > 1 {
            b.worker_threads(threads);
        }
        b
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

async fn simulate(args: apnsd::simulator::SimulateArgs) -> anyhow::Result<()> {
    Logging::init("info", LogFormat::Text);
    let shutdown = CancellationToken::new();
    apnsd::signals::install(shutdown.clone())?;
    apnsd::simulator::run_cli(args, shutdown.cancelled_owned()).await
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| Usage(e.to_string()).into())
}

async fn run(path: &Path, config: Config) -> anyhow::Result<()> {
    let logging = Logging::init(&config.log_level, config.log_format);
    let shutdown = CancellationToken::new();
    let reloads =
        apnsd::signals::install(shutdown.clone()).context("installing signal handlers")?;
    let started = apnsd::startup::start(config, shutdown)
        .await
        .map_err(|e| Usage(e.to_string()))?;
    started.serve(path, reloads, &logging).await;
    Ok(())
}

async fn check(path: &Path, connect: bool) -> anyhow::Result<()> {
    let config = load(path)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let report = apnsd::check::check(&config, now, connect).await;
    for line in &report.apps {
        println!("{line}");
    }
    if report.problems.is_empty() {
        println!("{}: ok", path.display());
        Ok(())
    } else {
        Err(Usage(report.problems.join("\n")).into())
    }
}

async fn channels(
    path: &Path,
    app: Option<&str>,
    command: &apnsd::channels::Command,
) -> anyhow::Result<()> {
    use apnsd::channels::ChannelError;
    let config = load(path)?;
    let app = config.app(app).ok_or_else(|| {
        Usage(format!(
            "--app: no app named {:?} in {}",
            app.unwrap_or_default(),
            path.display()
        ))
    })?;
    match apnsd::channels::run(app, command).await {
        Ok(output) => {
            let text = output.to_string();
            print!("{text}");
            if !text.ends_with('\n') && !text.is_empty() {
                println!();
            }
            Ok(())
        }
        Err(e @ ChannelError::Usage(_)) => Err(Usage(e.to_string()).into()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("{}: channels", app.name))),
    }
}

async fn send(path: &Path, to: &Recipients, alert: &str, app: Option<&str>) -> anyhow::Result<()> {
    let config = load(path)?;
    if let Some(app) = app {
        config
            .app(Some(app))
            .ok_or_else(|| Usage(format!("--app: no app named {app:?} in {}", path.display())))?;
    }
    let tokens = match (&to.token, &to.tokens_file) {
        (Some(token), _) => {
            vec![DeviceToken::parse(token).map_err(|e| Usage(format!("--token: {e}")))?]
        }
        (None, Some(file)) => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| Usage(format!("--tokens-file: {}: {e}", file.display())))?;
            apnsd::send::parse_tokens(&text)
                .map_err(|e| Usage(format!("--tokens-file: {}: {e}", file.display())))?
        }
        (None, None) => return Err(Usage("give --token or --tokens-file".into()).into()),
    };
    let jobs = apnsd::send::alert_jobs(&tokens, alert, app);
    let total = jobs.len();
    let terminal = std::io::stderr().is_terminal() && total > 1;
    apnsd::send::publish(&config, jobs, |done| {
        if terminal {
            eprint!("\r{done}/{total} jobs queued");
        }
    })
    .await
    .context("publishing to RabbitMQ")?;
    if terminal {
        eprintln!();
    }
    println!(
        "queued {} notification(s) in {total} job(s) on {}",
        tokens.len(),
        config.amqp.queue
    );
    Ok(())
}
