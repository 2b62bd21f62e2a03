//! The accept loop when the process is out of file descriptors (EMFILE): it waits, with a
//! growing pause, instead of retrying at once forever, and serves the waiting connection
//! once descriptors are free. Alone in its own test binary: it lowers the process's
//! descriptor limit.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use std::fs::File;
use std::time::Duration;
use tokio::net::TcpListener;
use tollgate_runtime::accept::Incoming;

const EMFILE: i32 = 24;

fn open_descriptors() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

#[tokio::test(start_paused = true)]
async fn out_of_descriptors_accept_pauses_instead_of_spinning_then_serves_the_waiting_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = Incoming::new(listener);

    let saved = getrlimit(Resource::Nofile);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(open_descriptors() + 16),
            maximum: saved.maximum,
        },
    )
    .unwrap();
    let mut filler = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => filler.push(f),
            Err(e) if e.raw_os_error() == Some(EMFILE) => break,
            Err(e) => panic!("{e}"),
        }
    }
    // One descriptor for the client's socket; none left for the server's side of it.
    filler.pop();
    let client = std::net::TcpStream::connect(addr).unwrap();

    // Virtual time: a loop that retried at once would never let these 3 s pass.
    let waited = tokio::time::timeout(Duration::from_secs(3), incoming.accept()).await;
    assert!(waited.is_err(), "accepted without a free descriptor?");
    // Pauses of 10, 20, 40 … 640 ms, then 1 s: 9 attempts in 3 s.
    assert_eq!(incoming.errors(), 9);

    drop(filler);
    setrlimit(Resource::Nofile, saved).unwrap();
    let server = tokio::time::timeout(Duration::from_secs(5), incoming.accept())
        .await
        .expect("the waiting connection is served once descriptors are free");
    assert_eq!(server.peer_addr().unwrap(), client.local_addr().unwrap());
}
