//! Request limits and slow or greedy clients: each gets its 4xx (or is cut off), never a crash.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::config;
use crate::support::http::{self, send_raw};
use crate::support::ServerProcess;

fn limited() -> ServerProcess {
    ServerProcess::start(&config(
        1,
        "limit_request_line = 200\nlimit_request_fields = 8\nlimit_request_field_size = 300\nmax_body_size = 64\nheader_timeout = 1\n",
    ))
}

#[test]
fn each_request_limit_gets_its_status() {
    let server = limited();
    let addr = server.addr();

    let long_line = format!(
        "GET /{} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        "a".repeat(300)
    );
    assert_eq!(send_raw(&addr, long_line.as_bytes()).unwrap().status, 414);

    let mut many = String::from("GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for i in 0..20 {
        many.push_str(&format!("X-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(send_raw(&addr, many.as_bytes()).unwrap().status, 431);

    let big_field = format!(
        "GET /health HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "b".repeat(400)
    );
    assert_eq!(send_raw(&addr, big_field.as_bytes()).unwrap().status, 431);

    let big_body =
        "POST /health HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\nConnection: close\r\n\r\n";
    let response = send_raw(&addr, big_body.as_bytes()).unwrap();
    assert_eq!(response.status, 413);
    assert!(response.json()["error"]
        .as_str()
        .unwrap()
        .contains("limit is 64"));

    assert_eq!(
        send_raw(&addr, b"NOT HTTP AT ALL\r\n\r\n").unwrap().status,
        400
    );

    // The worker survived all of that.
    assert_eq!(http::get(&addr, "/health").unwrap().status, 200);
    assert_eq!(server.workers().len(), 1);
    assert_eq!(server.count_in_log("died"), 0, "{}", server.logs());
}

#[test]
fn unknown_routes_get_a_json_404() {
    let server = ServerProcess::start(&config(1, ""));
    let response = http::get(&server.addr(), "/no/such/page").unwrap();
    assert_eq!(response.status, 404);
    assert_eq!(response.json()["error"], "not found");
}

#[test]
fn a_client_that_never_finishes_its_head_is_cut_off() {
    let server = limited();
    let mut stream = TcpStream::connect(server.addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    // The server closes (possibly after a 408); read returns instead of hanging for 10 s.
    let _ = stream.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "cut off after {waited:?}");
    assert!(
        waited >= Duration::from_millis(500),
        "cut off too early: {waited:?}"
    );
}
