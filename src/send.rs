//! `apnsd send`: publishes jobs to the configured queue the way an
//! application server would, with publisher confirms, for smoke tests and
//! broadcasts.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation, PublisherConfirm};

use crate::amqp::{self, Topology};
use crate::config::Config;
use crate::token::{DeviceToken, TokenError};

/// Tokens per job of a broadcast: large enough that the broker carries few
/// messages, small enough that one job settles quickly.
pub const TOKENS_PER_JOB: usize = 1000;

/// Confirms awaited at once while publishing a broadcast.
const IN_FLIGHT: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("line {line}: {source}")]
    Token { line: usize, source: TokenError },
    #[error("no tokens to send")]
    Empty,
    #[error("RabbitMQ: {0}")]
    Broker(#[from] lapin::Error),
    #[error("RabbitMQ refused a job")]
    Refused,
}

/// Parses a tokens file: one token per line; blank lines and `#` comments
/// are skipped. Every token is checked before anything is sent.
pub fn parse_tokens(text: &str) -> Result<Vec<DeviceToken>, SendError> {
    let tokens = text
        .lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .map(|(line, t)| DeviceToken::parse(t).map_err(|source| SendError::Token { line, source }))
        .collect::<Result<Vec<_>, _>>()?;
    if tokens.is_empty() {
        return Err(SendError::Empty);
    }
    Ok(tokens)
}

/// The jobs for an alert to `tokens`: one job per [`TOKENS_PER_JOB`] tokens.
pub fn alert_jobs(tokens: &[DeviceToken], alert: &str, app: Option<&str>) -> Vec<Vec<u8>> {
    tokens
        .chunks(TOKENS_PER_JOB)
        .map(|chunk| {
            let mut job = serde_json::json!({
                "payload": {"aps": {"alert": alert}},
            });
            job["tokens"] = chunk.iter().map(ToString::to_string).collect();
            if let Some(app) = app {
                job["app"] = app.into();
            }
            job.to_string().into_bytes()
        })
        .collect()
}

/// Publishes `jobs` persistently to the jobs queue (declaring it), waiting
/// for every confirm; `progress` hears how many jobs are confirmed so far.
pub async fn publish(
    config: &Config,
    jobs: Vec<Vec<u8>>,
    mut progress: impl FnMut(usize),
) -> Result<(), SendError> {
    let conn = amqp::connect_any(&config.amqp.uri, "apnsd-send").await?;
    let ch = conn.create_channel().await?;
    amqp::declare_queue(&ch, &Topology::from(&config.amqp)).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let mut pending: std::collections::VecDeque<PublisherConfirm> = Default::default();
    let mut confirmed = 0;
    for body in &jobs {
        if pending.len() >= IN_FLIGHT {
            if let Some(c) = pending.pop_front() {
                expect_ack(c.await?)?;
                confirmed += 1;
                progress(confirmed);
            }
        }
        let confirm = ch
            .basic_publish(
                "".into(),
                config.amqp.queue.as_str().into(),
                BasicPublishOptions::default(),
                body,
                props.clone(),
            )
            .await?;
        pending.push_back(confirm);
    }
    for c in pending {
        expect_ack(c.await?)?;
        confirmed += 1;
        progress(confirmed);
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}

fn expect_ack(c: Confirmation) -> Result<(), SendError> {
    if c.is_ack() {
        Ok(())
    } else {
        Err(SendError::Refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1b14a89b65361301e7ded0f8de35ec1f322c37698b9fe712252a2cba42207d90";

    #[test]
    fn tokens_files_skip_blanks_and_comments_and_name_bad_lines() {
        let text = format!("# devices\n{A}\n\n<{}>\n", A.to_uppercase());
        assert_eq!(parse_tokens(&text).unwrap().len(), 2);
        let err = parse_tokens(&format!("{A}\nnot-a-token\n")).unwrap_err();
        assert!(err.to_string().starts_with("line 2: "), "{err}");
        assert!(matches!(parse_tokens("# none\n"), Err(SendError::Empty)));
    }

    #[test]
    fn broadcasts_are_split_into_fan_out_jobs() {
        let tokens = vec![DeviceToken::parse(A).unwrap(); TOKENS_PER_JOB + 1];
        let jobs = alert_jobs(&tokens, "hi", Some("example"));
        assert_eq!(jobs.len(), 2);
        let first: serde_json::Value = serde_json::from_slice(&jobs[0]).unwrap();
        assert_eq!(first["tokens"].as_array().unwrap().len(), TOKENS_PER_JOB);
        assert_eq!(first["tokens"][0], A);
        assert_eq!(first["app"], "example");
        assert_eq!(first["payload"]["aps"]["alert"], "hi");
        let second: serde_json::Value = serde_json::from_slice(&jobs[1]).unwrap();
        assert_eq!(second["tokens"].as_array().unwrap().len(), 1);
    }
}
