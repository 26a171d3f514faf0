//! One HTTP/2 socket's bytes, for either end (apnsd's connections and the
//! simulator's server): frames are appended to `write` and leave in as few
//! TLS writes as the socket takes; what arrives collects in `read` until whole
//! frames can be parsed. Polled from the one task that owns the connection,
//! so reading and writing need no split of the TLS stream.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Room kept free in `read` before each read, and what is added when short.
const READ_ROOM: usize = 16 << 10;
const READ_GROW: usize = 64 << 10;
/// Left unparsed (part of a frame), at most this is copied back to the
/// buffer's start before the next read.
const READ_REWIND: usize = 4 << 10;

pub struct Wire<IO> {
    pub io: IO,
    /// Received bytes not yet parsed into frames.
    pub read: BytesMut,
    /// Frames to send; the first `written` bytes have left.
    pub write: Vec<u8>,
    written: usize,
    needs_flush: bool,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Wire<IO> {
    pub fn new(io: IO) -> Self {
        Wire {
            io,
            read: BytesMut::with_capacity(READ_GROW),
            write: Vec::with_capacity(READ_GROW),
            written: 0,
            needs_flush: false,
        }
    }

    /// Bytes queued and not yet handed to the socket.
    pub fn unwritten(&self) -> usize {
        self.write.len() - self.written
    }

    /// Whether everything queued has been written and flushed.
    pub fn is_flushed(&self) -> bool {
        self.write.is_empty() && !self.needs_flush
    }

    /// Writes what is queued and flushes it, as far as the socket takes it
    /// now; true if anything was written.
    pub fn poll_write(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let mut progress = false;
        while self.written < self.write.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.write[self.written..]) {
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.written += n;
                    self.needs_flush = true;
                    progress = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => return Ok(progress),
            }
        }
        self.write.clear();
        self.written = 0;
        if self.needs_flush {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.needs_flush = false,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        Ok(progress)
    }

    /// Writes out what is queued (a GOAWAY, the last answers) and closes the
    /// TLS session, giving up after `within`.
    pub async fn close(&mut self, within: Duration) {
        let _ = tokio::time::timeout(within, async {
            let written = poll_fn(|cx| match self.poll_write(cx) {
                Ok(_) if !self.is_flushed() => Poll::Pending,
                done => Poll::Ready(done),
            })
            .await;
            if written.is_ok() {
                let _ = self.io.shutdown().await;
            }
        })
        .await;
    }

    /// After [`close`](Self::close): reads and drops what the peer still
    /// sends until it closes too, giving up after `within`. A socket closed
    /// with unread data is reset by the kernel, which throws away what this
    /// end wrote and the peer has not read yet: a server's last answers,
    /// after a GOAWAY that the client's next requests crossed.
    pub async fn linger(&mut self, within: Duration) {
        let _ = tokio::time::timeout(within, async {
            loop {
                self.read.clear();
                match poll_fn(|cx| self.poll_read(cx)).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }

    /// Reads what has arrived onto `read`: the count (0 at the end of the
    /// stream), or `Pending` with nothing new.
    pub fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.len() <= READ_REWIND {
            // Back to the start of the buffer (copying the start of a frame
            // left unparsed): reads that marched on through it touched a
            // fresh 64 KiB per connection, cold in the cache at dozens of
            // connections, to hold the few kilobytes of one read.
            let _ = self.read.try_reclaim(READ_GROW - READ_REWIND);
        }
        if self.read.capacity() - self.read.len() < READ_ROOM {
            self.read.reserve(READ_GROW);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Buf;
    use tokio::io::AsyncWriteExt;

    use super::*;

    async fn read(wire: &mut Wire<tokio::io::DuplexStream>) -> usize {
        poll_fn(|cx| wire.poll_read(cx)).await.unwrap()
    }

    #[tokio::test]
    async fn reads_go_back_to_the_start_of_the_buffer_once_it_is_parsed() {
        let (ours, mut peer) = tokio::io::duplex(1 << 20);
        let mut wire = Wire::new(ours);
        peer.write_all(&[1; 10_000]).await.unwrap();
        let mut got = 0;
        while got < 10_000 {
            got += read(&mut wire).await;
        }
        // All but the start of a frame parsed: the rest moves to the front.
        wire.read.advance(9_990);
        assert!(wire.read.capacity() < READ_GROW);
        peer.write_all(&[2; 10]).await.unwrap();
        assert_eq!(read(&mut wire).await, 10);
        assert!(
            wire.read.capacity() >= READ_GROW,
            "{}",
            wire.read.capacity()
        );
        assert_eq!(&wire.read[..], [[1; 10], [2; 10]].concat());
    }

    #[tokio::test]
    async fn a_long_unparsed_tail_stays_where_it_is() {
        let (ours, mut peer) = tokio::io::duplex(1 << 20);
        let mut wire = Wire::new(ours);
        let data: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        peer.write_all(&data).await.unwrap();
        let mut got = 0;
        while got < data.len() {
            got += read(&mut wire).await;
        }
        wire.read.advance(10_000);
        peer.write_all(&[9; 10]).await.unwrap();
        assert_eq!(read(&mut wire).await, 10);
        assert_eq!(wire.read.len(), 10_010);
        assert_eq!(&wire.read[..10_000], &data[10_000..]);
    }
}
