//! `apnsd check`: what an operator wants to know before starting (or after
//! editing) a configuration, one line per app and one line per problem.

use std::time::Duration;

use crate::apns::http2::{self, jwt::Signer};
use crate::apns::tls::{self, CertInfo};
use crate::apns::Protocol;
use crate::config::{AppConfig, Config, Environment};
use crate::targets;

/// A certificate this close to its end is reported, so it is renewed in time.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);

/// What `check` found: a summary line per usable app, and every problem.
#[derive(Debug, Default)]
pub struct Report {
    pub apps: Vec<String>,
    pub problems: Vec<String>,
}

/// Loads every identity and judges it against the app's configuration at `now`
/// (unix seconds). With `connect`, also opens a gateway connection per app.
pub async fn check(config: &Config, now: i64, connect: bool) -> Report {
    let mut report = Report::default();
    for app in &config.apps {
        if let (Some(key_file), Some(key_id), Some(team_id)) =
            (&app.key_file, &app.key_id, &app.team_id)
        {
            match Signer::from_p8_file(key_file, key_id, team_id) {
                Ok(_) => report.apps.push(format!(
                    "{}: topic {}, HTTP/2 token auth (key {key_id}, team {team_id})",
                    app.name,
                    app.topic.as_deref().unwrap_or("(none)")
                )),
                Err(e) => report.problems.push(format!("{}: {e}", app.name)),
            }
            continue;
        }
        let Some(cert) = &app.certificate else {
            report.apps.push(format!(
                "{}: built-in simulator identity (generated at start)",
                app.name
            ));
            continue;
        };
        match tls::load_identity(cert, app.password.as_deref(), app.key.as_deref()) {
            Ok(identity) => {
                report.apps.push(summary(app, &identity.info));
                report
                    .problems
                    .extend(judge(app, &identity.info, now).map(|p| format!("{}: {p}", app.name)));
            }
            Err(e) => report.problems.push(format!("{}: {e}", app.name)),
        }
    }
    if connect && report.problems.is_empty() {
        for app in &config.apps {
            if app.protocol == Protocol::Http2 && !app.uses_builtin_simulator() {
                match probe_http2(app).await {
                    Ok(line) => report.apps.push(line),
                    Err(problem) => report.problems.push(problem),
                }
            } else if let Err(e) = targets::probe_gateway(app).await {
                report.problems.push(e.to_string());
            }
        }
    }
    report
}

/// One line on an HTTP/2 app's connection: what was proven, or the problem.
async fn probe_http2(app: &AppConfig) -> Result<String, String> {
    let target = targets::http2_target(app, None).map_err(|e| e.to_string())?;
    let addr = &target.endpoint.addr;
    let via = target
        .endpoint
        .proxy
        .as_ref()
        .map(|p| format!(" via {p}"))
        .unwrap_or_default();
    http2::probe(&target, app.connect_timeout)
        .await
        .map(|proven| format!("{}: {addr}{via}: {proven}", app.name))
        .map_err(|e| format!("{}: {addr}{via}: {e}", app.name))
}

fn summary(app: &AppConfig, info: &CertInfo) -> String {
    let envs = match (info.sandbox, info.production) {
        (true, true) => "sandbox+production",
        (true, false) => "sandbox",
        (false, true) => "production",
        (false, false) => "unmarked",
    };
    format!(
        "{}: topic {}, certificate for {envs}, expires {}",
        app.name,
        app.topic
            .as_deref()
            .or(info.topic.as_deref())
            .unwrap_or("(none)"),
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_secs(info.not_after.max(0) as u64)
        ),
    )
}

/// Problems with a loaded certificate: expiry, and Apple's environment marks
/// (a certificate marked for neither environment is taken to fit both).
fn judge(app: &AppConfig, info: &CertInfo, now: i64) -> impl Iterator<Item = String> {
    let path = app
        .certificate
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let expiry = if info.is_expired(now) {
        Some(format!("certificate {path} has expired"))
    } else if info.expires_within(now, EXPIRY_WARNING.as_secs() as i64) {
        let days = (info.not_after - now) / 86_400;
        Some(format!(
            "certificate {path} expires in {days} days: renew it"
        ))
    } else {
        None
    };
    let fits = match app.environment {
        Environment::Sandbox => info.sandbox || !info.production,
        Environment::Production => info.production || !info.sandbox,
        Environment::Simulator => true,
    };
    let environment = (!fits).then(|| {
        format!(
            "certificate {path} is not for the {} environment (Apple's OID 1.2.840.113635.100.6.3.{} is missing)",
            app.environment.name(),
            if app.environment == Environment::Sandbox { 1 } else { 2 },
        )
    });
    expiry.into_iter().chain(environment)
}
