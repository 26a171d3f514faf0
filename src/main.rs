//! The `apnsd` command line: run, check, send, simulate.
//! Exit codes: 0 clean stop, 2 bad configuration or arguments, 1 anything else.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use apnsd::apns::tls;
use apnsd::config::{Config, Environment, LogFormat};
use apnsd::daemon::Daemon;

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
    /// Validate the configuration and every certificate in it.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Publish one job to the configured queue (a smoke test).
    Send {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        token: String,
        #[arg(long)]
        alert: String,
        #[arg(long)]
        app: Option<String>,
    },
    /// Run the built-in APNs simulator (binary gateway and feedback service).
    Simulate(apnsd::simulator::SimulateArgs),
}

/// Bad configuration or arguments: exit 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

fn main() -> ExitCode {
    let cli = Cli::parse();
    apnsd::apns::tls::install_crypto_provider();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("apnsd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
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

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => run(&config).await,
        Command::Check { config } => check(&config),
        Command::Send {
            config,
            token,
            alert,
            app,
        } => send(&config, &token, &alert, app.as_deref()).await,
        Command::Simulate(args) => {
            init_logging("info", LogFormat::Text);
            let shutdown = CancellationToken::new();
            apnsd::shutdown::install(shutdown.clone())?;
            apnsd::simulator::run_cli(args, shutdown.cancelled_owned()).await
        }
    }
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| Usage(e.to_string()).into())
}

async fn run(path: &Path) -> anyhow::Result<()> {
    let config = load(path)?;
    init_logging(&config.log_level, config.log_format);
    let shutdown = CancellationToken::new();
    let _reloads =
        apnsd::shutdown::install(shutdown.clone()).context("installing signal handlers")?;
    let daemon = Daemon::start(config, shutdown)
        .await
        .map_err(|e| Usage(e.to_string()))?;
    daemon.wait().await;
    Ok(())
}

fn check(path: &Path) -> anyhow::Result<()> {
    let config = load(path)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut problems = Vec::new();
    for app in &config.apps {
        let Some(cert) = &app.certificate else {
            println!(
                "{}: built-in simulator identity (generated at start)",
                app.name
            );
            continue;
        };
        let identity = match tls::load_identity(cert, app.password.as_deref(), app.key.as_deref()) {
            Ok(identity) => identity,
            Err(e) => {
                problems.push(format!("{}: {e}", app.name));
                continue;
            }
        };
        let info = &identity.info;
        let envs = match (info.sandbox, info.production) {
            (true, true) => "sandbox+production",
            (true, false) => "sandbox",
            (false, true) => "production",
            (false, false) => "unmarked",
        };
        println!(
            "{}: topic {}, certificate for {envs}, expires {}",
            app.name,
            app.topic
                .as_deref()
                .or(info.topic.as_deref())
                .unwrap_or("(none)"),
            apnsd::results::rfc3339(
                UNIX_EPOCH + std::time::Duration::from_secs(info.not_after.max(0) as u64)
            ),
        );
        if info.not_after <= now {
            problems.push(format!(
                "{}: certificate {} has expired",
                app.name,
                cert.display()
            ));
        }
        let env_ok = match app.environment {
            Environment::Sandbox => info.sandbox || !info.production,
            Environment::Production => info.production || !info.sandbox,
            Environment::Simulator => true,
        };
        if !env_ok {
            problems.push(format!(
                "{}: certificate {} is not for the {:?} environment",
                app.name,
                cert.display(),
                app.environment
            ));
        }
    }
    if problems.is_empty() {
        println!("{}: ok", path.display());
        Ok(())
    } else {
        Err(Usage(problems.join("\n")).into())
    }
}

async fn send(path: &Path, token: &str, alert: &str, app: Option<&str>) -> anyhow::Result<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::BasicProperties;

    let config = load(path)?;
    apnsd::job::DeviceToken::parse(token).map_err(|e| Usage(format!("--token: {e}")))?;
    if let Some(app) = app {
        config
            .app(Some(app))
            .ok_or_else(|| Usage(format!("--app: no app named {app:?} in {}", path.display())))?;
    }
    let mut job = serde_json::json!({
        "token": token,
        "payload": {"aps": {"alert": alert}},
    });
    if let Some(app) = app {
        job["app"] = app.into();
    }
    let conn = apnsd::amqp::connect(&config.amqp.uri, "apnsd-send")
        .await
        .context("connecting to RabbitMQ")?;
    let ch = conn.create_channel().await?;
    let topology = apnsd::amqp::Topology {
        queue: config.amqp.queue.clone(),
        queue_type: config.amqp.queue_type.clone(),
        results_exchange: config.amqp.results_exchange.clone(),
    };
    apnsd::amqp::declare_queue(&ch, &topology).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let confirm = ch
        .basic_publish(
            "".into(),
            config.amqp.queue.as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&job)?,
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into()),
        )
        .await?
        .await?;
    anyhow::ensure!(confirm.is_ack(), "RabbitMQ refused the job");
    println!("queued on {}", config.amqp.queue);
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}

fn init_logging(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::new(level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
