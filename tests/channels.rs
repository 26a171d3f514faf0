//! `apnsd channels create|list|get|delete` against the simulator's channel
//! management API over real TLS: token and certificate auth, an unknown
//! channel, a refused key, and the app's proxy (a real tinyproxy).

mod common;

use std::path::Path;

use common::reach::*;

/// Runs `apnsd channels ACTION --config FILE --app APP` with `more` options.
async fn channels(config: &Path, action: &str, app: &str, more: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "channels".to_owned(),
        action.to_owned(),
        "--config".to_owned(),
        config.display().to_string(),
        "--app".to_owned(),
        app.to_owned(),
    ];
    args.extend(more.iter().map(|s| s.to_string()));
    apnsd(args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_are_created_listed_read_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sim = simulator(d).await;
    let config = d.join("apnsd.toml");
    let apps = [
        http2_app("token", d, &sim, &token_auth(d, "SIMKEY0001")),
        http2_app("cert", d, &sim, ""),
    ]
    .concat();
    std::fs::write(&config, apps).unwrap();

    let (code, out, err) = channels(&config, "create", "token", &["--storage-policy", "1"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let first = out.trim().to_owned();
    assert!(
        !first.is_empty() && !first.contains(char::is_whitespace),
        "{out}"
    );
    // Certificate auth reaches the same app's channels (same bundle id).
    let (code, out, err) = channels(&config, "create", "cert", &[]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let second = out.trim().to_owned();

    let (code, out, _) = channels(&config, "list", "token", &[]).await;
    assert_eq!(code, 0);
    let mut listed: Vec<_> = out.lines().map(str::to_owned).collect();
    listed.sort();
    let mut want = vec![first.clone(), second.clone()];
    want.sort();
    assert_eq!(listed, want);

    let (code, out, _) = channels(&config, "get", "cert", &["--channel", &first]).await;
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("{first} message-storage-policy=1"));

    let (code, out, _) = channels(&config, "delete", "token", &["--channel", &first]).await;
    assert_eq!((code, out.trim()), (0, format!("deleted {first}").as_str()));

    // An unknown channel gets Apple's error.
    let (code, out, err) = channels(&config, "get", "token", &["--channel", &first]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("400 ChannelNotRegistered"), "{err}");
    let (_, out, _) = channels(&config, "list", "token", &[]).await;
    assert_eq!(out.trim(), second);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_and_refused_keys_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sim = simulator(d).await;
    let config = d.join("apnsd.toml");
    let apps = [
        http2_app("wrongkey", d, &sim, &token_auth(d, "WRONGKEY01")),
        http2_app("token", d, &sim, &token_auth(d, "SIMKEY0001")),
    ]
    .concat();
    std::fs::write(&config, apps).unwrap();
    let (code, _, err) = channels(&config, "list", "wrongkey", &[]).await;
    assert_eq!(code, 1);
    assert!(err.contains("403 InvalidProviderToken"), "{err}");
    for (action, more, says) in [
        ("get", &[][..], "--channel ID is required"),
        (
            "create",
            &["--storage-policy", "2"][..],
            "--storage-policy is 0",
        ),
        (
            "delete",
            &["--channel", "not base64!"][..],
            "is not a base64 channel id",
        ),
    ] {
        let (code, _, err) = channels(&config, action, "token", more).await;
        assert_eq!(code, 2, "{action}: {err}");
        assert!(err.contains(says), "{err}");
    }
    let (code, _, err) = channels(&config, "list", "nosuchapp", &[]).await;
    assert_eq!(code, 2, "{err}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_management_goes_through_the_apps_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let sim = simulator(d).await;
    let port = sim.http2_addr().port();
    let proxy = Tinyproxy::start(d, "channels", &[port], Some(("apnsd", "pw"))).await;
    let config = d.join("apnsd.toml");
    let app = http2_app(
        "token",
        d,
        &sim,
        &format!(
            "{}proxy = \"{}\"\n",
            token_auth(d, "SIMKEY0001"),
            proxy.uri("apnsd:pw@")
        ),
    );
    std::fs::write(&config, app).unwrap();
    let (code, out, err) = channels(&config, "create", "token", &[]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(proxy.tunnels_to(port), 1);
    sim.shutdown().await;
}
