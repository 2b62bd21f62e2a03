//! Accept loops that keep serving when the process runs out of file descriptors. `accept`
//! failing with EMFILE leaves the pending connection in the backlog, so retrying at once
//! fails again at once: a loop that just `continue`s spins a core and floods the log.
//! Here resource errors back off (10 ms, doubling to 1 s) and the loop resumes by itself
//! once descriptors are free; errors that concern only one connection (it was reset or
//! aborted before it was accepted) are skipped at once.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

const FIRST_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How long to wait after an accept error; reset by the next accepted connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: FIRST_BACKOFF,
        }
    }
}

impl Backoff {
    /// `None`: the error concerned one connection, accept the next one now. `Some(d)`: the
    /// process (or system) is out of a resource; wait `d` before accepting again.
    pub fn after(&mut self, error: &io::Error) -> Option<Duration> {
        if is_per_connection(error) {
            return None;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        Some(wait)
    }

    pub fn reset(&mut self) {
        self.next = FIRST_BACKOFF;
    }
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// The connections of one listener, with TCP_NODELAY set (gRPC and small HTTP replies).
/// As a [`futures_core::Stream`] it never yields an error and never ends, so tonic's
/// `serve_with_incoming_shutdown` can take it as is.
#[derive(Debug)]
pub struct Incoming {
    listener: TcpListener,
    backoff: Backoff,
    waiting: Option<Pin<Box<Sleep>>>,
    errors: u64,
}

impl Incoming {
    pub fn new(listener: TcpListener) -> Self {
        Self {
            listener,
            backoff: Backoff::default(),
            waiting: None,
            errors: 0,
        }
    }

    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept errors seen so far (for tests and logs).
    pub fn errors(&self) -> u64 {
        self.errors
    }

    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<TcpStream> {
        loop {
            if let Some(wait) = self.waiting.as_mut() {
                if wait.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.waiting = None;
            }
            match self.listener.poll_accept(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok((stream, _))) => {
                    self.backoff.reset();
                    // Without it a reply waits for Nagle; failing to set it is harmless.
                    let _ = stream.set_nodelay(true);
                    return Poll::Ready(stream);
                }
                Poll::Ready(Err(e)) => {
                    self.errors += 1;
                    if let Some(wait) = self.backoff.after(&e) {
                        tracing::warn!(error = %e, retry_ms = wait.as_millis() as u64, "accept failed; backing off");
                        self.waiting = Some(Box::pin(tokio::time::sleep(wait)));
                    }
                }
            }
        }
    }

    /// The next connection; waits through accept errors.
    pub async fn accept(&mut self) -> TcpStream {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }
}

impl futures_core::Stream for Incoming {
    type Item = io::Result<TcpStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_accept(cx).map(|s| Some(Ok(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: io::ErrorKind) -> io::Error {
        io::Error::from(kind)
    }

    #[test]
    fn out_of_descriptors_backs_off_doubling_to_one_second_and_a_success_resets_it() {
        let mut b = Backoff::default();
        let emfile = io::Error::from_raw_os_error(24); // EMFILE
        let waits: Vec<u64> = (0..9)
            .map(|_| b.after(&emfile).unwrap().as_millis() as u64)
            .collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.reset();
        assert_eq!(b.after(&emfile), Some(Duration::from_millis(10)));
    }

    #[test]
    fn an_error_of_one_connection_is_skipped_without_waiting() {
        let mut b = Backoff::default();
        for kind in [
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::Interrupted,
        ] {
            assert_eq!(b.after(&err(kind)), None, "{kind:?}");
        }
        // ENFILE (system-wide table full) and ENOBUFS wait like EMFILE.
        assert!(b.after(&io::Error::from_raw_os_error(23)).is_some());
        assert!(b.after(&io::Error::from_raw_os_error(105)).is_some());
    }

    #[tokio::test]
    async fn accepted_connections_have_nodelay_set() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Incoming::new(listener);
        let client = TcpStream::connect(addr).await.unwrap();
        let server = incoming.accept().await;
        assert_eq!(server.peer_addr().unwrap(), client.local_addr().unwrap());
        assert!(server.nodelay().unwrap());
        assert_eq!(incoming.errors(), 0);
    }
}
