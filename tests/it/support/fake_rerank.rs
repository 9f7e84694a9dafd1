//! A fake reranking server, faithful to the wire protocol of `POST /v1/rerank` (llama.cpp's
//! server, vLLM, Infinity): `{"model","query","documents":[..],"top_n"}` in,
//! `{"results":[{"index","relevance_score"}]}` out, best first. Its "model" scores a document
//! 1.0 when it contains `favour`, else 0.0, so a test knows the order it must see; `status`
//! other than 200 answers that status instead. Records the last request body.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

pub struct FakeRerank {
    port: u16,
    last: Arc<Mutex<Option<Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeRerank {
    pub fn start(favour: &str, status: u16) -> FakeRerank {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the fake reranker");
        listener.set_nonblocking(true).expect("non-blocking");
        let port = listener.local_addr().expect("address").port();
        let last = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (favour, seen, stopping) = (favour.to_string(), Arc::clone(&last), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => serve(stream, &favour, status, &seen),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeRerank {
            port,
            last,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn last_request(&self) -> Option<Value> {
        self.last.lock().unwrap().clone()
    }
}

impl Drop for FakeRerank {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request per connection (the client may keep it open; it reconnects after we close).
fn serve(stream: TcpStream, favour: &str, status: u16, last: &Mutex<Option<Value>>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let (code, answer) = match serde_json::from_slice::<Value>(&body) {
        Ok(request) if request_line.starts_with("POST /v1/rerank ") && status == 200 => {
            let documents: Vec<String> = request["documents"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .filter_map(|t| t.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            *last.lock().unwrap() = Some(request);
            let mut results: Vec<Value> = documents
                .iter()
                .enumerate()
                .map(|(index, text)| {
                    let score = if text.contains(favour) { 1.0 } else { 0.0 };
                    json!({"index": index, "relevance_score": score})
                })
                .collect();
            results.sort_by(|a, b| {
                b["relevance_score"]
                    .as_f64()
                    .partial_cmp(&a["relevance_score"].as_f64())
                    .unwrap()
            });
            (200, json!({"model": "fake-rerank", "results": results}))
        }
        Ok(request) => {
            *last.lock().unwrap() = Some(request);
            (
                status.max(400),
                json!({"error": {"message": "fake reranker failure"}}),
            )
        }
        Err(_) => (400, json!({"error": {"message": "not JSON"}})),
    };
    let text = answer.to_string();
    let mut stream = reader.into_inner();
    let _ = write!(
        stream,
        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
}
