//! The server frame by frame, from a raw HTTP/2 client over real TLS: what
//! apnsd's client never does (indexing into the dynamic table, exceeding the
//! stream limit, breaking the protocol) and what only shows on the wire
//! (window updates, answers held for the client's window, GOAWAY's last id).

use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::apns::http2::frame::{self, code, setting, Frame};
use crate::apns::http2::hpack;
use crate::apns::tls;
use crate::simulator::{Faults, SimCerts, Simulator, SimulatorOptions, StreamRule};

/// Longest wait for a frame: only reached when a test fails.
const WAIT: Duration = Duration::from_secs(5);

/// A frame the server sent, owned, its header block decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Settings(Vec<(u16, u32)>),
    SettingsAck,
    Headers {
        stream: u32,
        end_stream: bool,
        fields: Vec<(String, String)>,
    },
    Data {
        stream: u32,
        end_stream: bool,
        data: Vec<u8>,
    },
    WindowUpdate {
        stream: u32,
        increment: u32,
    },
    Reset {
        stream: u32,
        code: u32,
    },
    GoAway {
        last_stream: u32,
        code: u32,
    },
    PingAck([u8; 8]),
    /// The server closed the connection.
    Closed,
}

struct Client {
    tls: TlsStream<TcpStream>,
    read: Vec<u8>,
    decoder: hpack::Decoder,
}

impl Client {
    /// Connects with the simulator's client certificate and sends the
    /// preface and `settings`.
    async fn connect(sim: &Simulator, settings: &[(u16, u32)]) -> Client {
        let tcp = TcpStream::connect(sim.http2_addr()).await.unwrap();
        let config = sim.certs().client_config().unwrap();
        let tls = TlsConnector::from(config)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut client = Client {
            tls,
            read: Vec::new(),
            decoder: hpack::Decoder::default(),
        };
        let mut out = frame::PREFACE.to_vec();
        frame::settings(&mut out, settings);
        client.send(&out).await;
        client
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tls.write_all(bytes).await.unwrap();
        self.tls.flush().await.unwrap();
    }

    async fn next(&mut self) -> Got {
        loop {
            if let Some((frame, used)) = frame::decode(&self.read, frame::MAX_FRAME_LIMIT).unwrap()
            {
                let got = own(&mut self.decoder, frame);
                self.read.drain(..used);
                return got;
            }
            let mut buf = [0u8; 16 << 10];
            let n = tokio::time::timeout(WAIT, self.tls.read(&mut buf))
                .await
                .expect("a frame from the server")
                .unwrap_or(0);
            if n == 0 {
                return Got::Closed;
            }
            self.read.extend_from_slice(&buf[..n]);
        }
    }
}

fn own(decoder: &mut hpack::Decoder, frame: Frame<'_>) -> Got {
    match frame {
        Frame::Settings { ack: true, .. } => Got::SettingsAck,
        Frame::Settings { ack: false, params } => Got::Settings(params.collect()),
        Frame::Headers {
            stream,
            end_stream,
            end_headers: true,
            block,
        } => {
            let mut fields = Vec::new();
            decoder
                .decode(block, |n, v| {
                    fields.push((
                        String::from_utf8_lossy(n).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    ))
                })
                .unwrap();
            Got::Headers {
                stream,
                end_stream,
                fields,
            }
        }
        Frame::Data {
            stream,
            end_stream,
            data,
            ..
        } => Got::Data {
            stream,
            end_stream,
            data: data.to_vec(),
        },
        Frame::WindowUpdate { stream, increment } => Got::WindowUpdate { stream, increment },
        Frame::RstStream { stream, code } => Got::Reset { stream, code },
        Frame::GoAway { last_stream, code } => Got::GoAway { last_stream, code },
        Frame::Ping { ack: true, data } => Got::PingAck(data),
        other => panic!("unexpected from the server: {other:?}"),
    }
}

impl Client {
    /// The next frame that is not part of the connection's opening (the
    /// server's SETTINGS, its connection window, the ack of ours).
    async fn next_after_opening(&mut self) -> Got {
        loop {
            match self.next().await {
                Got::Settings(_) | Got::SettingsAck | Got::WindowUpdate { stream: 0, .. } => {}
                other => return other,
            }
        }
    }
}

/// HEADERS opening `stream` for a POST to `path` with `fields` as literals.
fn headers(out: &mut Vec<u8>, stream: u32, path: &str, fields: &[(&str, &str)], end: bool) {
    let mark = frame::begin_headers(out, stream, end);
    hpack::indexed(out, hpack::index::METHOD_POST);
    hpack::indexed(out, hpack::index::SCHEME_HTTPS);
    hpack::field(out, hpack::index::PATH, path.as_bytes());
    for (name, value) in fields {
        hpack::named(out, name.as_bytes(), value.as_bytes());
    }
    frame::end_headers(out, mark, frame::DEFAULT_MAX_FRAME);
}

fn device(n: u8) -> String {
    format!("/3/device/{}", format!("{n:02x}").repeat(32))
}

const TOPIC: (&str, &str) = ("apns-topic", "com.example.app");
const PAYLOAD: &[u8] = br#"{"aps":{}}"#;

async fn start(faults: Faults) -> Simulator {
    tls::install_crypto_provider();
    let mut opts = SimulatorOptions::new(SimCerts::generate("com.example.app").unwrap());
    opts.faults = faults;
    Simulator::start(opts).await.unwrap()
}

fn status(got: &Got) -> Option<(u32, &str)> {
    match got {
        Got::Headers { stream, fields, .. } => fields
            .iter()
            .find(|(n, _)| n == ":status")
            .map(|(_, v)| (*stream, v.as_str())),
        _ => None,
    }
}

#[tokio::test]
async fn requests_are_answered_whatever_the_client_indexes() {
    let sim = start(Faults::default()).await;
    let mut client = Client::connect(&sim, &[]).await;
    let Got::Settings(params) = client.next().await else {
        panic!("SETTINGS first");
    };
    assert_eq!(params, [(setting::MAX_CONCURRENT_STREAMS, 1000)]);
    let id = "0f6a2f2c-1b9e-8c3d-9a4b-123456789abc";
    let mut out = Vec::new();
    frame::settings_ack(&mut out);
    // Stream 1 adds apns-topic to the dynamic table, as nghttp2 would...
    let mark = frame::begin_headers(&mut out, 1, false);
    hpack::indexed(&mut out, hpack::index::METHOD_POST);
    hpack::indexed(&mut out, hpack::index::SCHEME_HTTPS);
    hpack::field(&mut out, hpack::index::PATH, device(1).as_bytes());
    out.push(0x40);
    hpack::string(&mut out, TOPIC.0.as_bytes());
    hpack::string(&mut out, TOPIC.1.as_bytes());
    hpack::named(&mut out, b"apns-id", id.as_bytes());
    frame::end_headers(&mut out, mark, frame::DEFAULT_MAX_FRAME);
    frame::data(&mut out, 1, PAYLOAD, true, frame::DEFAULT_MAX_FRAME);
    // ...and stream 3 refers to it by index.
    let mark = frame::begin_headers(&mut out, 3, false);
    hpack::indexed(&mut out, hpack::index::METHOD_POST);
    hpack::field(&mut out, hpack::index::PATH, device(3).as_bytes());
    hpack::indexed(&mut out, 62);
    frame::end_headers(&mut out, mark, frame::DEFAULT_MAX_FRAME);
    frame::data(&mut out, 3, PAYLOAD, true, frame::DEFAULT_MAX_FRAME);
    headers(&mut out, 5, "/3/device/zz", &[TOPIC], false);
    frame::data(&mut out, 5, PAYLOAD, true, frame::DEFAULT_MAX_FRAME);
    frame::ping(&mut out, false, *b"pingpong");
    client.send(&out).await;

    let first = client.next_after_opening().await;
    assert_eq!(
        first,
        Got::Headers {
            stream: 1,
            end_stream: true,
            fields: vec![
                (":status".into(), "200".into()),
                ("apns-id".into(), id.into())
            ],
        }
    );
    assert_eq!(status(&client.next().await), Some((3, "200")));
    assert_eq!(status(&client.next().await), Some((5, "400")));
    assert_eq!(
        client.next().await,
        Got::Data {
            stream: 5,
            end_stream: true,
            data: br#"{"reason":"BadDeviceToken"}"#.to_vec()
        }
    );
    assert_eq!(client.next().await, Got::PingAck(*b"pingpong"));
    let accepted = sim.accepted();
    let seen: Vec<(u32, &str, &[u8])> = accepted
        .iter()
        .map(|a| {
            let meta = a.http2.as_ref().unwrap();
            (a.identifier, meta.topic.as_str(), a.payload.as_slice())
        })
        .collect();
    assert_eq!(
        seen,
        [(1, TOPIC.1, PAYLOAD), (3, TOPIC.1, PAYLOAD)],
        "{accepted:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn streams_beyond_the_limit_or_refused_by_rule_are_reset() {
    let sim = start(Faults {
        max_streams: Some(1),
        refuse_streams: vec![StreamRule::parse("0a").unwrap()],
        ..Faults::default()
    })
    .await;
    let mut client = Client::connect(&sim, &[]).await;
    let Got::Settings(params) = client.next().await else {
        panic!("SETTINGS first");
    };
    assert_eq!(params, [(setting::MAX_CONCURRENT_STREAMS, 1)]);
    let mut out = Vec::new();
    frame::settings_ack(&mut out);
    headers(&mut out, 1, &device(1), &[TOPIC], false);
    headers(&mut out, 3, &device(3), &[TOPIC], false);
    frame::data(&mut out, 1, PAYLOAD, true, frame::DEFAULT_MAX_FRAME);
    headers(&mut out, 5, &device(0x0a), &[TOPIC], false);
    client.send(&out).await;
    assert_eq!(
        client.next_after_opening().await,
        Got::Reset {
            stream: 3,
            code: code::REFUSED_STREAM
        }
    );
    assert_eq!(status(&client.next().await), Some((1, "200")));
    assert_eq!(
        client.next().await,
        Got::Reset {
            stream: 5,
            code: code::REFUSED_STREAM
        }
    );
    // Only the rule's refusals count: the limit's are the client's doing.
    assert_eq!(sim.streams_refused(), 1);
    assert_eq!(sim.accepted_count(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn bodies_get_their_window_back_and_answers_wait_for_the_clients() {
    let sim = start(Faults {
        stream_window: Some(16),
        ..Faults::default()
    })
    .await;
    // The client lets no answer body through until it says so.
    let mut client = Client::connect(&sim, &[(setting::INITIAL_WINDOW_SIZE, 0)]).await;
    let Got::Settings(params) = client.next().await else {
        panic!("SETTINGS first");
    };
    assert!(params.contains(&(setting::INITIAL_WINDOW_SIZE, 16)));
    let mut out = Vec::new();
    headers(&mut out, 1, "/3/x", &[TOPIC], false);
    frame::data(&mut out, 1, &[b' '; 16], false, frame::DEFAULT_MAX_FRAME);
    client.send(&out).await;
    assert_eq!(
        client.next_after_opening().await,
        Got::WindowUpdate {
            stream: 1,
            increment: 16
        }
    );
    let mut out = Vec::new();
    frame::data(&mut out, 1, b"{}", true, frame::DEFAULT_MAX_FRAME);
    frame::ping(&mut out, false, [1; 8]);
    client.send(&out).await;
    let head = client.next().await;
    assert_eq!(status(&head), Some((1, "404")));
    assert!(matches!(
        head,
        Got::Headers {
            end_stream: false,
            ..
        }
    ));
    // The PING is answered before any of the body: it waits for window.
    assert_eq!(client.next().await, Got::PingAck([1; 8]));
    let mut out = Vec::new();
    frame::window_update(&mut out, 1, 5);
    client.send(&out).await;
    let body = br#"{"reason":"BadPath"}"#;
    assert_eq!(
        client.next().await,
        Got::Data {
            stream: 1,
            end_stream: false,
            data: body[..5].to_vec()
        }
    );
    let mut out = Vec::new();
    frame::window_update(&mut out, 1, 100);
    client.send(&out).await;
    assert_eq!(
        client.next().await,
        Got::Data {
            stream: 1,
            end_stream: true,
            data: body[5..].to_vec()
        }
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn goaway_names_the_last_stream_taken_and_the_connection_closes_once_they_are_answered() {
    let sim = start(Faults {
        goaway_every: Some(2),
        ..Faults::default()
    })
    .await;
    let mut client = Client::connect(&sim, &[]).await;
    let mut out = Vec::new();
    for stream in [1, 3, 5] {
        headers(&mut out, stream, &device(stream as u8), &[TOPIC], false);
    }
    for stream in [1, 3, 5] {
        frame::data(&mut out, stream, PAYLOAD, true, frame::DEFAULT_MAX_FRAME);
    }
    client.send(&out).await;
    let mut got = Vec::new();
    loop {
        match client.next_after_opening().await {
            Got::Closed => break,
            other => got.push(other),
        }
    }
    let ok = |stream| Got::Headers {
        stream,
        end_stream: true,
        fields: vec![(":status".into(), "200".into())],
    };
    // The second acceptance (stream 3) calls for the GOAWAY: all three
    // streams were open by then, so all three are answered.
    assert_eq!(
        got,
        [
            ok(1),
            Got::GoAway {
                last_stream: 5,
                code: code::NO_ERROR
            },
            ok(3),
            ok(5)
        ]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_stream_opened_after_the_goaway_is_left_to_the_client() {
    let sim = start(Faults {
        goaway_every: Some(1),
        ..Faults::default()
    })
    .await;
    let mut client = Client::connect(&sim, &[]).await;
    let mut out = Vec::new();
    headers(&mut out, 1, &device(1), &[TOPIC], false);
    frame::data(&mut out, 1, PAYLOAD, true, frame::DEFAULT_MAX_FRAME);
    headers(&mut out, 3, &device(3), &[TOPIC], false);
    frame::data(&mut out, 3, PAYLOAD, true, frame::DEFAULT_MAX_FRAME);
    client.send(&out).await;
    assert_eq!(
        client.next_after_opening().await,
        Got::GoAway {
            last_stream: 1,
            code: code::NO_ERROR
        }
    );
    assert_eq!(status(&client.next().await), Some((1, "200")));
    assert_eq!(client.next().await, Got::Closed);
    assert_eq!(sim.accepted_count(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn protocol_errors_end_the_connection_with_a_goaway() {
    let sim = start(Faults::default()).await;
    let cases: [(&[u8], u32); 3] = [
        // DATA on a stream never opened.
        (
            &[0, 0, 1, frame::kind::DATA, 0, 0, 0, 0, 7, b'x'],
            code::PROTOCOL_ERROR,
        ),
        // A header block naming index 0.
        (
            &[0, 0, 1, frame::kind::HEADERS, 0x4, 0, 0, 0, 1, 0x80],
            code::COMPRESSION_ERROR,
        ),
        // A PING that is not 8 bytes.
        (
            &[0, 0, 1, frame::kind::PING, 0, 0, 0, 0, 0, 0],
            code::FRAME_SIZE_ERROR,
        ),
    ];
    for (bytes, want) in cases {
        let mut client = Client::connect(&sim, &[]).await;
        client.send(bytes).await;
        assert_eq!(
            client.next_after_opening().await,
            Got::GoAway {
                last_stream: 0,
                code: want
            },
            "{bytes:?}"
        );
        assert_eq!(client.next().await, Got::Closed);
    }
    // Not HTTP/2 at all.
    let tcp = TcpStream::connect(sim.http2_addr()).await.unwrap();
    let config = sim.certs().client_config().unwrap();
    let tls = TlsConnector::from(config)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut client = Client {
        tls,
        read: Vec::new(),
        decoder: hpack::Decoder::default(),
    };
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(matches!(
        client.next_after_opening().await,
        Got::GoAway {
            code: code::PROTOCOL_ERROR,
            ..
        }
    ));
    sim.shutdown().await;
}

#[tokio::test]
async fn answers_wait_out_the_delay_while_the_connection_answers_pings() {
    let sim = start(Faults::default()).await;
    let delay = Duration::from_millis(100);
    sim.set_delay(delay);
    let mut client = Client::connect(&sim, &[]).await;
    let mut out = Vec::new();
    headers(&mut out, 1, &device(1), &[TOPIC], false);
    frame::data(&mut out, 1, PAYLOAD, true, frame::DEFAULT_MAX_FRAME);
    frame::ping(&mut out, false, [2; 8]);
    let sent = std::time::Instant::now();
    client.send(&out).await;
    assert_eq!(client.next_after_opening().await, Got::PingAck([2; 8]));
    assert_eq!(status(&client.next().await), Some((1, "200")));
    assert!(sent.elapsed() >= delay, "{:?}", sent.elapsed());
    sim.shutdown().await;
}

#[tokio::test]
async fn answers_after_a_delay_echo_their_own_apns_id() {
    let sim = start(Faults::default()).await;
    sim.set_delay(Duration::from_millis(20));
    let mut client = Client::connect(&sim, &[]).await;
    let id = "0f6a2f2c-1b9e-8c3d-9a4b-123456789abc";
    let mut out = Vec::new();
    // Each stream is judged before the next arrives and hands its header
    // fields on to it: none of stream 1's may show in stream 3's answer.
    headers(&mut out, 1, &device(1), &[TOPIC, ("apns-id", id)], false);
    frame::data(&mut out, 1, PAYLOAD, true, frame::DEFAULT_MAX_FRAME);
    headers(&mut out, 3, &device(3), &[TOPIC], false);
    frame::data(&mut out, 3, PAYLOAD, true, frame::DEFAULT_MAX_FRAME);
    headers(
        &mut out,
        5,
        &device(5),
        &[TOPIC, ("apns-id", "nope")],
        false,
    );
    frame::data(&mut out, 5, PAYLOAD, true, frame::DEFAULT_MAX_FRAME);
    client.send(&out).await;
    let fields = |got: Got| match got {
        Got::Headers { stream, fields, .. } => (stream, fields),
        other => panic!("{other:?}"),
    };
    let field = |name: &str, value: &str| (name.to_owned(), value.to_owned());
    assert_eq!(
        fields(client.next_after_opening().await),
        (1, vec![field(":status", "200"), field("apns-id", id)])
    );
    assert_eq!(
        fields(client.next().await),
        (3, vec![field(":status", "200")])
    );
    assert_eq!(
        fields(client.next().await),
        (5, vec![field(":status", "400"), field("apns-id", "nope")])
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn streams_waiting_out_the_delay_stay_open() {
    let sim = start(Faults {
        max_streams: Some(3),
        ..Faults::default()
    })
    .await;
    sim.set_delay(Duration::from_millis(50));
    let mut client = Client::connect(&sim, &[]).await;
    let Got::Settings(_) = client.next().await else {
        panic!("SETTINGS first");
    };
    let mut out = Vec::new();
    frame::settings_ack(&mut out);
    for id in [1, 3, 5] {
        headers(&mut out, id, &device(id as u8), &[TOPIC], false);
        frame::data(&mut out, id, PAYLOAD, true, frame::DEFAULT_MAX_FRAME);
    }
    // Judged and waiting, the three still count against the limit.
    headers(&mut out, 7, &device(7), &[TOPIC], true);
    // A reset one is never answered; trailers after END_STREAM reset one.
    frame::rst_stream(&mut out, 1, code::CANCEL);
    headers(&mut out, 3, &device(3), &[TOPIC], true);
    client.send(&out).await;
    let reset = |stream, code| Got::Reset { stream, code };
    assert_eq!(
        client.next_after_opening().await,
        reset(7, code::REFUSED_STREAM)
    );
    assert_eq!(client.next().await, reset(3, code::PROTOCOL_ERROR));
    assert_eq!(status(&client.next().await), Some((5, "200")));
    // The two left the limit: a new stream is taken.
    let mut out = Vec::new();
    headers(&mut out, 9, &device(9), &[TOPIC], false);
    frame::data(&mut out, 9, PAYLOAD, true, frame::DEFAULT_MAX_FRAME);
    client.send(&out).await;
    assert_eq!(status(&client.next().await), Some((9, "200")));
    sim.shutdown().await;
}
