//! `ragpool status`: asks a running pool for `/status` over its own listening address and
//! renders the answer as a table for the terminal.
//!
//! The request is made with hyper's HTTP/1.1 client on a `current_thread` runtime built for
//! this one command: `ragpool status` is its own short-lived process, never the master.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::HOST;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpStream, UnixStream};

use crate::config::{BindAddr, Config};

/// For connecting and for the whole exchange, per address.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no ragpool answers at {addr}: {source} (is it running with this config?)")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} does not speak HTTP/1.1 as ragpool does: {source}")]
    Http {
        addr: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{addr} answered {status}: {body}")]
    Refused {
        addr: String,
        status: u16,
        body: String,
    },
    #[error("{addr} sent something that is not a ragpool status: {reason}")]
    Malformed { addr: String, reason: String },
    #[error("cannot start the client runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// Fetches `/status` from the first `bind` address that answers.
pub fn fetch(config: &Config) -> Result<Value, StatusError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StatusError::Runtime)?;
    runtime.block_on(async {
        let mut last = None;
        for addr in &config.bind {
            match fetch_from(addr).await {
                Ok(value) => return Ok(value),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| StatusError::Malformed {
            addr: "-".into(),
            reason: "no bind address".into(),
        }))
    })
}

/// What went wrong on one connection, before it is named after the address.
enum Failure {
    Io(std::io::Error),
    Http(hyper::Error),
}

async fn fetch_from(addr: &BindAddr) -> Result<Value, StatusError> {
    let shown = addr.to_string();
    let exchange = async {
        match addr {
            BindAddr::Tcp(sock) => {
                let stream = TcpStream::connect(reachable(*sock))
                    .await
                    .map_err(Failure::Io)?;
                get_status(stream).await
            }
            BindAddr::Unix(path) => {
                let stream = UnixStream::connect(path).await.map_err(Failure::Io)?;
                get_status(stream).await
            }
        }
    };
    let answer = match tokio::time::timeout(TIMEOUT, exchange).await {
        Ok(answer) => answer,
        Err(_) => Err(Failure::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} s", TIMEOUT.as_secs()),
        ))),
    };
    let (status, body) = answer.map_err(|failure| match failure {
        Failure::Io(source) => StatusError::Connect {
            addr: shown.clone(),
            source,
        },
        Failure::Http(source) => StatusError::Http {
            addr: shown.clone(),
            source,
        },
    })?;
    if status != 200 {
        return Err(StatusError::Refused {
            addr: shown,
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    serde_json::from_slice(&body).map_err(|e| StatusError::Malformed {
        addr: shown,
        reason: e.to_string(),
    })
}

/// `GET /status` on one connection: its status code and whole body.
async fn get_status<S>(stream: S) -> Result<(u16, Bytes), Failure>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(Failure::Http)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            log::debug!("status connection: {e}");
        }
    });
    let request = Request::get("/status")
        .header(HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .expect("a static request is valid");
    let response = sender.send_request(request).await.map_err(Failure::Http)?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(Failure::Http)?
        .to_bytes();
    Ok((status, body))
}

/// A wildcard bind is reached on the loopback address of its family.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// The status as a terminal table.
pub fn render(status: &Value) -> String {
    let mut out = String::new();
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    let _ = writeln!(
        out,
        "master {}  up {}  generation {}  requests {}",
        status["master_pid"],
        duration(num(&status["uptime_seconds"])),
        status["generation"],
        status["requests_total"]
    );
    let _ = writeln!(
        out,
        "config {}",
        status["config_path"]
            .as_str()
            .unwrap_or("(built-in defaults)")
    );
    match &status["last_reload"] {
        Value::Null => out.push_str("last reload: none\n"),
        r => {
            let _ = writeln!(
                out,
                "last reload: {}",
                if r["ok"].as_bool() == Some(true) {
                    "ok"
                } else {
                    "failed"
                }
            );
        }
    }
    let _ = writeln!(
        out,
        "\n{:>8} {:>4} {:>4} {:<9} {:>9} {:>10} {:>9} {:>6} {:>10} {:>9}",
        "PID", "SLOT", "GEN", "STATE", "AGE", "REQUESTS", "INFLIGHT", "CONNS", "HEARTBEAT", "RSS"
    );
    // serde_json's Display ignores width, so every cell is a String first.
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for w in status["workers"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:>8} {:>4} {:>4} {:<9} {:>9} {:>10} {:>9} {:>6} {:>9.1}s {:>8}M",
            text(&w["pid"]),
            text(&w["slot"]),
            text(&w["generation"]),
            text(&w["state"]),
            duration(num(&w["age_seconds"])),
            text(&w["requests"]),
            text(&w["in_flight"]),
            text(&w["connections"]),
            num(&w["last_heartbeat_seconds_ago"]),
            (num(&w["rss_bytes"]) / (1024.0 * 1024.0)).round()
        );
    }
    let llm = status["llm_backends"].as_array().into_iter().flatten();
    let embed = status["embed_backends"].as_array().into_iter().flatten();
    let mut header = false;
    for (kind, b) in llm.map(|b| ("LLM", b)).chain(embed.map(|b| ("EMBED", b))) {
        if !header {
            header = true;
            let _ = writeln!(
                out,
                "\n{:>7} {:<9} {:>9} {:>4} {:>9} {:>7} {:>7}  {}",
                "BACKEND", "STATE", "INFLIGHT", "MAX", "CALLS", "ERRORS", "EJECTED", "URL"
            );
        }
        let max = match b["max_concurrent"].as_u64() {
            Some(0) | None => "-".to_string(),
            Some(n) => n.to_string(),
        };
        let calls = match kind {
            "LLM" => &b["answers"],
            _ => &b["calls"],
        };
        let model = match b["model"].as_str() {
            Some(model) => format!(" ({model})"),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "{:>7} {:<9} {:>9} {:>4} {:>9} {:>7} {:>7}  {}{model}",
            format!("{kind} {}", text(&b["backend"])),
            text(&b["state"]),
            text(&b["in_flight"]),
            max,
            text(calls),
            text(&b["errors"]),
            text(&b["ejections"]),
            text(&b["url"]),
        );
    }
    out
}

fn duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_row_per_worker() {
        let status = serde_json::json!({
            "master_pid": 10, "uptime_seconds": 3725.0, "generation": 2, "requests_total": 5,
            "config_path": "/etc/ragpool/workers.toml", "last_reload": {"ok": true, "unix": 1.0},
            "workers": [
                {"pid": 11, "slot": 0, "generation": 2, "state": "ready", "age_seconds": 61.0, "requests": 3,
                 "in_flight": 1, "connections": 2, "last_heartbeat_seconds_ago": 0.2, "rss_bytes": 20971520},
                {"pid": 12, "slot": 1, "generation": 2, "state": "draining", "age_seconds": 5.0, "requests": 2,
                 "in_flight": 0, "connections": 0, "last_heartbeat_seconds_ago": 0.1, "rss_bytes": 10485760}
            ]
        });
        let text = render(&status);
        assert!(
            text.starts_with("master 10  up 1h02m  generation 2  requests 5"),
            "{text}"
        );
        assert!(text.contains("last reload: ok"));
        let rows: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("ready") || l.contains("draining"))
            .collect();
        assert_eq!(rows.len(), 2);
        assert!(rows[0].trim_start().starts_with("11"));
        let header = text.lines().find(|l| l.contains("PID")).unwrap();
        assert_eq!(
            rows[0].find("11"),
            Some(header.find("PID").unwrap() + 1),
            "columns line up: {text}"
        );
        assert_eq!(rows[0].len(), rows[1].len(), "{text}");
        assert!(
            rows[0].contains("1m01s") && rows[0].ends_with("20M"),
            "{}",
            rows[0]
        );
    }

    #[test]
    fn renders_a_row_per_llm_backend() {
        let status = serde_json::json!({
            "master_pid": 10, "uptime_seconds": 1.0, "generation": 1, "requests_total": 0,
            "config_path": null, "last_reload": null, "workers": [],
            "llm_backends": [
                {"backend": 0, "url": "http://a:11434", "model": "llama3.2", "max_concurrent": 4,
                 "in_flight": 3, "answers": 120, "errors": 0, "ejections": 0, "state": "closed"},
                {"backend": 1, "url": "http://b:11434", "model": "llama3.2", "max_concurrent": 0,
                 "in_flight": 0, "answers": 7, "errors": 5, "ejections": 1, "state": "open"}
            ],
            "embed_backends": [
                {"backend": 0, "url": "http://e:11434", "in_flight": 0, "calls": 42, "errors": 0,
                 "ejections": 0, "state": "closed"}
            ]
        });
        let text = render(&status);
        let header = text.lines().find(|l| l.contains("EJECTED")).expect(&text);
        assert!(
            header.contains("INFLIGHT") && header.ends_with("URL"),
            "{text}"
        );
        let open = text
            .lines()
            .find(|l| l.contains("http://b:11434"))
            .expect(&text);
        assert!(open.contains("open") && open.contains(" - "), "{open}");
        let closed = text
            .lines()
            .find(|l| l.contains("http://a:11434"))
            .expect(&text);
        assert!(
            closed.contains("closed") && closed.contains("120"),
            "{closed}"
        );
        assert_eq!(header.find("URL"), closed.find("http"), "{text}");
        let embed = text
            .lines()
            .find(|l| l.contains("http://e:11434"))
            .expect(&text);
        assert!(
            embed.trim_start().starts_with("EMBED 0") && embed.contains("42"),
            "{embed}"
        );
        assert_eq!(header.find("URL"), embed.find("http"), "{text}");
    }
}
