//! The shared launchers do what the suites rely on: unique temp dirs that go away, and a
//! Redis that stops, restarts on the same port and obeys signals.

use std::time::Duration;
use tollgate_test_support::process::{free_port, temp_dir, TempDir};
use tollgate_test_support::redis::{redis_command, Redis};

#[test]
fn temp_dirs_are_distinct_per_call_and_a_temp_dir_is_removed_on_drop() {
    let a = temp_dir("support");
    let b = temp_dir("support");
    assert_ne!(a, b);
    assert!(a.is_dir() && b.is_dir());
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);

    let t = TempDir::new("support");
    let p = t.path().to_path_buf();
    std::fs::write(p.join("f"), "x").unwrap();
    drop(t);
    assert!(!p.exists());
}

#[test]
fn a_free_port_can_be_bound() {
    let port = free_port();
    assert_ne!(port, 0);
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
}

#[test]
fn redis_stops_restarts_on_the_same_port_and_is_gone_after_drop() {
    let mut redis = Redis::start().unwrap_or_else(|e| panic!("{e}"));
    let port = redis.port;
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    assert!(redis_command(port, "SET k v").unwrap().starts_with("+OK"));

    redis.stop_server();
    assert!(redis_command(port, "PING").is_err());
    redis.restart().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(redis.port, port);
    // No persistence: a restart is an empty server.
    assert_eq!(redis_command(port, "GET k").unwrap(), "$-1\r\n");

    // Stopped (SIGSTOP), it accepts but does not answer; continued, it answers again.
    redis.signal("-STOP").unwrap_or_else(|e| panic!("{e}"));
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    std::io::Write::write_all(&mut s, b"PING\r\n").unwrap();
    let mut buf = [0u8; 16];
    assert!(std::io::Read::read(&mut s, &mut buf).is_err());
    redis.signal("-CONT").unwrap_or_else(|e| panic!("{e}"));
    assert!(redis_command(port, "PING").unwrap().starts_with("+PONG"));

    drop(redis);
    assert!(redis_command(port, "PING").is_err());
}
