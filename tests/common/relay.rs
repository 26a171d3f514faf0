//! A TCP relay between the daemon and RabbitMQ that a test can cut, to play a
//! network failure or a broker that drops its connections.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Relay {
    pub addr: SocketAddr,
    /// Cancelled by `cut`: ends every connection relayed so far.
    current: Arc<Mutex<CancellationToken>>,
    task: JoinHandle<()>,
}

impl Relay {
    /// Relays every connection made to `addr` (a free port) to `upstream`.
    pub async fn start(upstream: &str) -> Relay {
        Self::start_at("127.0.0.1:0", upstream).await
    }

    /// Relays from `listen` to `upstream`.
    pub async fn start_at(listen: &str, upstream: &str) -> Relay {
        let listener = TcpListener::bind(listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let current = Arc::new(Mutex::new(CancellationToken::new()));
        let upstream = upstream.to_owned();
        let shared = current.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let cut = shared.lock().unwrap().clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        Relay {
            addr,
            current,
            task,
        }
    }

    /// An AMQP URI that goes through the relay.
    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    /// Closes every connection relayed so far; new ones are relayed again.
    pub fn cut(&self) {
        let mut current = self.current.lock().unwrap();
        current.cancel();
        *current = CancellationToken::new();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.current.lock().unwrap().cancel();
    }
}
