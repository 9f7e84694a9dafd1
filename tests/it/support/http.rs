//! A deliberately small HTTP/1.1 client over std sockets: tests see exactly the bytes on the wire.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// `GET path` on a fresh connection with `Connection: close`.
pub fn get(addr: &str, path: &str) -> io::Result<Response> {
    send_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// Writes `raw` on a fresh TCP connection and reads the response until the server closes.
pub fn send_raw(addr: &str, raw: &[u8]) -> io::Result<Response> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(raw)?;
    read_response(&mut stream)
}

pub fn get_unix(path: &Path, target: &str) -> io::Result<Response> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    read_response(&mut stream)
}

/// Reads to EOF and parses one response (`Connection: close` framing is enough for tests).
pub fn read_response(stream: &mut impl Read) -> io::Result<Response> {
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse(&raw)
}

/// `POST path` with a body and content type on a fresh connection; extra headers as `Name: value`.
pub fn post(
    addr: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
    headers: &[&str],
) -> io::Result<Response> {
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body);
    send_raw(addr, &raw)
}

/// Adds one document through the admin API (token "t") and expects 201 Created.
pub fn add_document(addr: &str, title: &str, text: &str) {
    let body = serde_json::json!({ "title": title, "text": text }).to_string();
    let r = post(
        addr,
        "/api/documents",
        "application/json",
        body.as_bytes(),
        &["Authorization: Bearer t"],
    )
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
}

pub fn post_json(addr: &str, path: &str, json: &serde_json::Value) -> io::Result<Response> {
    post(
        addr,
        path,
        "application/json",
        json.to_string().as_bytes(),
        &[],
    )
}

/// A JSON `POST` on a connection the test keeps: for a client that hangs up mid-answer (drop
/// the stream). Reads time out after `within`.
pub fn open_post_json(
    addr: &str,
    path: &str,
    json: &serde_json::Value,
    within: Duration,
) -> io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(within))?;
    let body = json.to_string();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    Ok(stream)
}

/// Reads `stream` until `marker` has arrived; the connection closing first is an error.
pub fn read_until(stream: &mut TcpStream, marker: &str) -> io::Result<Vec<u8>> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(marker) {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "closed before {marker:?}: {}",
                    String::from_utf8_lossy(&seen)
                ),
            ));
        }
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(seen)
}

/// `DELETE path` with extra headers.
pub fn delete(addr: &str, path: &str, headers: &[&str]) -> io::Result<Response> {
    let mut head = format!("DELETE {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    send_raw(addr, head.as_bytes())
}

/// Server-sent events of a response body: (event name, JSON data) in order.
pub fn sse_events(body: &str) -> Vec<(String, serde_json::Value)> {
    body.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut name = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_string();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (
                name,
                serde_json::from_str(&data).unwrap_or(serde_json::Value::Null),
            )
        })
        .collect()
}

/// Undoes `Transfer-Encoding: chunked`.
fn dechunk(body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

pub fn parse(raw: &[u8]) -> io::Result<Response> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what}: {:?}", String::from_utf8_lossy(raw)),
        )
    };
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of head"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("empty response"))?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = &raw[split + 4..];
    let body = if chunked {
        dechunk(body).ok_or_else(|| bad("truncated chunked body"))?
    } else {
        body.to_vec()
    };
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}
