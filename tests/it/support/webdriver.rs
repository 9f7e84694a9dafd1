//! A small W3C WebDriver client: Debian's `chromedriver` driving headless Chromium, spoken to in
//! JSON over plain HTTP/1.1 on loopback (one connection per command, `Connection: close`), so
//! browser tests need no crate beyond serde_json.
//!
//! Not installed (`/usr/bin/chromium`, `/usr/bin/chromedriver`: `apt-get install chromium
//! chromium-driver`) -> [`Browser::start`] returns `None` and the test skips, unless
//! `RAGPOOL_REQUIRE_BROWSER=1` (CI), where it panics instead, so a broken install cannot pass as
//! green.
//!
//! Each [`Browser`] is its own chromedriver in its own process group with a fresh profile in a
//! temp dir. On drop the session is ended (chromedriver quits Chromium), then the whole group is
//! SIGKILLed by the driver's pid: killing chromedriver alone would orphan Chromium, which stays
//! in the driver's group.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use super::http::{self, Response};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The env var that turns "not installed" from a skip into a failure.
pub const REQUIRE_ENV: &str = "RAGPOOL_REQUIRE_BROWSER";
/// A port picked by `free_port` can be taken by someone else before chromedriver binds it.
const START_ATTEMPTS: usize = 3;
/// Time for chromedriver to answer `/status` with `ready: true`.
const READY_WITHIN: Duration = Duration::from_secs(20);
/// Longest a single command may take (a new session starts Chromium; navigation waits for load).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Ending the session at drop: bounded tighter, the group is killed afterwards anyway.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The key under which WebDriver returns an element reference.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";
/// Headless Chromium with no outside network: without the background-networking flags it keeps
/// trying (and failing) to reach Google's services.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
];

/// WebDriver key codes for [`Browser::send_keys`].
pub const ENTER: char = '\u{E007}';
pub const ESCAPE: char = '\u{E00C}';
pub const TAB: char = '\u{E004}';

/// A WebDriver error: the HTTP status and the spec's `error` code and `message`.
#[derive(Debug)]
pub struct WebDriverError {
    pub status: u16,
    pub error: String,
    pub message: String,
}

impl std::fmt::Display for WebDriverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status, self.error, self.message)
    }
}

/// A reference to an element of the current page (goes stale when the page drops the node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element(String);

/// The chromedriver process; its whole process group (Chromium included) is killed on drop.
struct Driver {
    child: Child,
    /// `127.0.0.1:PORT`, where chromedriver listens.
    addr: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A headless Chromium session; ended and killed on drop.
pub struct Browser {
    session: String,
    /// Declared before `dir`: the processes die before their profile is deleted.
    driver: Driver,
    /// The Chromium profile (`--user-data-dir`) and the logs of chromedriver and Chromium.
    dir: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session emulating a device with a `width` x
    /// `height` CSS-pixel viewport, its UI language (`navigator.language`) US English.
    /// `None` when the browser is not installed and `RAGPOOL_REQUIRE_BROWSER` is not 1.
    pub fn start(width: u32, height: u32) -> Option<Browser> {
        Browser::start_in(width, height, "en-US")
    }

    /// [`Browser::start`] with another UI language, a BCP 47 tag such as `ru-RU`.
    pub fn start_in(width: u32, height: u32, language: &str) -> Option<Browser> {
        if !installed() {
            if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
                panic!(
                    "{REQUIRE_ENV}=1 but {CHROMIUM} or {CHROMEDRIVER} is missing \
                     (apt-get install chromium chromium-driver)"
                );
            }
            eprintln!("skipped: chromium/chromedriver not installed (apt-get install chromium chromium-driver)");
            return None;
        }
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match Browser::spawn(super::free_port(), width, height, language) {
                Ok(browser) => return Some(browser),
                Err(failure) => failures.push(failure),
            }
        }
        panic!("chromedriver did not start:\n{}", failures.join("\n----\n"));
    }

    fn spawn(port: u16, width: u32, height: u32, language: &str) -> Result<Browser, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let output = File::create(dir.path().join("chromium.log"))
            .map_err(|e| format!("chromium.log: {e}"))?;
        let stderr = output.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.path().join("chromedriver.log").display()
            ))
            // The UI language Chromium reports (navigator.language) must not follow the host's.
            .env("LANGUAGE", language.replace('-', "_"))
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("spawn {CHROMEDRIVER}: {e}"))?;
        let mut driver = Driver {
            child,
            addr: format!("127.0.0.1:{port}"),
        };
        let ready = super::wait_until(READY_WITHIN, || {
            matches!(driver.child.try_wait(), Ok(Some(_)))
                || request(&driver.addr, "GET", "/status", None, COMMAND_TIMEOUT)
                    .is_ok_and(|r| r.status == 200 && r.json()["value"]["ready"] == true)
        });
        if let Ok(Some(status)) = driver.child.try_wait() {
            return Err(format!(
                "port {port}: chromedriver exited ({status}); log tail:\n{}",
                tail(&dir.path().join("chromium.log"), 20)
            ));
        }
        if !ready {
            return Err(format!("port {port}: not ready within {READY_WITHIN:?}"));
        }
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
        args.push(format!("--lang={language}"));
        // Desktop Chromium will not make a window narrower than 500 px: the viewport comes
        // from device emulation instead, the window only has to be at least as large.
        args.push(format!(
            "--window-size={},{}",
            width.max(800),
            height.max(600) + 200
        ));
        args.push(format!(
            "--user-data-dir={}",
            dir.path().join("profile").display()
        ));
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": args,
                "prefs": { "intl.accept_languages": language },
                // This viewport; below 800 px a phone: touch, and the page's viewport meta tag
                // honoured.
                "mobileEmulation": { "deviceMetrics": {
                    "width": width, "height": height, "pixelRatio": 1.0,
                    "mobile": width < 800, "touch": width < 800,
                }},
            },
        }}});
        let created = call(&driver.addr, "POST", "/session", Some(&capabilities))
            .map_err(|e| format!("port {port}: new session: {e}"))?;
        let session = created["sessionId"]
            .as_str()
            .ok_or_else(|| format!("port {port}: no sessionId in {created}"))?
            .to_string();
        // From here on Browser's Drop ends the session; until here `driver` alone kills the group.
        Ok(Browser {
            session,
            driver,
            dir,
        })
    }

    /// Sends one command of this session (`path` after `/session/{id}`); returns its `value`.
    pub fn command(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, WebDriverError> {
        call(
            &self.driver.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
    }

    /// [`Browser::command`] for commands that must succeed.
    fn must(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        self.command(method, path, body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    /// Navigates and waits for the page to load.
    pub fn goto(&self, url: &str) {
        self.must("POST", "/url", Some(&json!({ "url": url })));
    }

    pub fn refresh(&self) {
        self.must("POST", "/refresh", Some(&json!({})));
    }

    /// The first element matching the CSS selector, if any.
    pub fn find(&self, css: &str) -> Option<Element> {
        self.find_from("", css)
    }

    /// The first descendant of `parent` matching the CSS selector, if any (`None` as well when
    /// `parent` went stale).
    pub fn find_in(&self, parent: &Element, css: &str) -> Option<Element> {
        self.find_from(&format!("/element/{}", parent.0), css)
    }

    pub fn find_all(&self, css: &str) -> Vec<Element> {
        self.find_all_from("", css)
    }

    pub fn find_all_in(&self, parent: &Element, css: &str) -> Vec<Element> {
        self.find_all_from(&format!("/element/{}", parent.0), css)
    }

    fn find_from(&self, scope: &str, css: &str) -> Option<Element> {
        let by = json!({ "using": "css selector", "value": css });
        match self.command("POST", &format!("{scope}/element"), Some(&by)) {
            Ok(found) => Some(element(&found)),
            Err(e) if e.error == "no such element" || e.error == "stale element reference" => None,
            Err(e) => panic!("WebDriver find {css:?}: {e}"),
        }
    }

    fn find_all_from(&self, scope: &str, css: &str) -> Vec<Element> {
        let by = json!({ "using": "css selector", "value": css });
        match self.command("POST", &format!("{scope}/elements"), Some(&by)) {
            Ok(Value::Array(found)) => found.iter().map(element).collect(),
            Ok(other) => panic!("WebDriver find all {css:?}: not an array: {other}"),
            Err(e) if e.error == "stale element reference" => Vec::new(),
            Err(e) => panic!("WebDriver find all {css:?}: {e}"),
        }
    }

    /// The element's rendered text (as `innerText`: what a reader sees).
    pub fn text(&self, element: &Element) -> String {
        let text = self.must("GET", &format!("/element/{}/text", element.0), None);
        text.as_str().unwrap_or_default().to_string()
    }

    /// The rendered text of the first element matching `css`; `None` when there is none (or
    /// it went away between finding and reading).
    pub fn text_of(&self, css: &str) -> Option<String> {
        let found = self.find(css)?;
        self.command("GET", &format!("/element/{}/text", found.0), None)
            .ok()
            .map(|text| text.as_str().unwrap_or_default().to_string())
    }

    /// An HTML attribute (`data-state`, ...); `None` when absent.
    pub fn attribute(&self, element: &Element, name: &str) -> Option<String> {
        let value = self.must(
            "GET",
            &format!("/element/{}/attribute/{name}", element.0),
            None,
        );
        value.as_str().map(str::to_string)
    }

    /// A DOM property (`placeholder`, `value`, ...).
    pub fn property(&self, element: &Element, name: &str) -> Value {
        self.must(
            "GET",
            &format!("/element/{}/property/{name}", element.0),
            None,
        )
    }

    /// Whether the element is rendered (WebDriver's "element displayed" check).
    pub fn is_displayed(&self, element: &Element) -> bool {
        self.must("GET", &format!("/element/{}/displayed", element.0), None) == true
    }

    pub fn is_enabled(&self, element: &Element) -> bool {
        self.must("GET", &format!("/element/{}/enabled", element.0), None) == true
    }

    /// A real click at the element's centre (scrolled into view first).
    pub fn click(&self, element: &Element) {
        self.must(
            "POST",
            &format!("/element/{}/click", element.0),
            Some(&json!({})),
        );
    }

    /// Types `text` into the element as key presses (see [`ENTER`] for special keys).
    pub fn send_keys(&self, element: &Element, text: &str) {
        self.must(
            "POST",
            &format!("/element/{}/value", element.0),
            Some(&json!({ "text": text })),
        );
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page; its return value.
    pub fn execute(&self, script: &str, args: &[Value]) -> Value {
        self.must(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// A PNG of the viewport.
    pub fn screenshot(&self) -> Vec<u8> {
        let encoded = self.must("GET", "/screenshot", None);
        decode_base64(encoded.as_str().unwrap_or_default())
            .unwrap_or_else(|| panic!("screenshot: not base64"))
    }

    /// The last `lines` lines of chromedriver's log and of Chromium's output.
    pub fn logs(&self, lines: usize) -> String {
        format!(
            "-- chromedriver.log --\n{}\n-- chromium --\n{}",
            tail(&self.dir.path().join("chromedriver.log"), lines),
            tail(&self.dir.path().join("chromium.log"), lines)
        )
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session: chromedriver quits Chromium (and its crash handlers) cleanly.
        let _ = request(
            &self.driver.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
            QUIT_TIMEOUT,
        );
        if std::thread::panicking() {
            eprintln!("---- browser ----\n{}\n-----------------", self.logs(40));
        }
        // `driver` drops next and kills what is left of the group.
    }
}

/// Whether the Debian packages' binaries are there.
fn installed() -> bool {
    Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists()
}

/// One WebDriver command to the driver at `addr`; its `value`, or the error it reported.
fn call(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, WebDriverError> {
    let response =
        request(addr, method, path, body, COMMAND_TIMEOUT).map_err(|e| WebDriverError {
            status: 0,
            error: "io".into(),
            message: e.to_string(),
        })?;
    let value = serde_json::from_str::<Value>(&response.body)
        .map(|mut v| v["value"].take())
        .map_err(|e| WebDriverError {
            status: response.status,
            error: "not JSON".into(),
            message: format!("{e}: {}", response.body),
        })?;
    if response.status == 200 {
        return Ok(value);
    }
    Err(WebDriverError {
        status: response.status,
        error: value["error"].as_str().unwrap_or_default().to_string(),
        message: value["message"].as_str().unwrap_or_default().to_string(),
    })
}

/// A request with a JSON body on a fresh connection. chromedriver refuses a `Host` that is not
/// localhost or an IP address, so this sends the real address (the helpers in `http` send
/// `Host: test`).
fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> io::Result<Response> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    read_framed(&mut stream)
}

/// Reads one response framed by `Content-Length`: chromedriver answers `Connection: close` but
/// keeps the socket open, so reading to EOF would wait for the timeout.
fn read_framed(stream: &mut TcpStream) -> io::Result<Response> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(head_end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|n| n.trim().parse::<usize>().ok());
            if length.is_some_and(|n| raw.len() >= head_end + 4 + n) {
                return http::parse(&raw);
            }
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return http::parse(&raw);
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

fn element(found: &Value) -> Element {
    Element(
        found[ELEMENT_KEY]
            .as_str()
            .unwrap_or_else(|| panic!("not an element reference: {found}"))
            .to_string(),
    )
}

/// Standard base64 (padding optional) to bytes; `None` on any other character.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text
        .bytes()
        .filter(|c| *c != b'=' && !c.is_ascii_whitespace())
    {
        let sextet = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(sextet);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// The width and height in a PNG's IHDR chunk.
pub fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    if png.get(..8)? != b"\x89PNG\r\n\x1a\n" || png.get(12..16)? != b"IHDR" {
        return None;
    }
    let be = |at: usize| Some(u32::from_be_bytes(png.get(at..at + 4)?.try_into().ok()?));
    Some((be(16)?, be(20)?))
}

/// Where browser tests keep screenshots after the run: `target/tmp/browser/` (cargo's
/// `CARGO_TARGET_TMPDIR`), unlike the server's temp dir, which is deleted when the test ends.
pub fn screenshot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).expect("create the screenshot dir");
    dir
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVsbG8").unwrap(), b"hello");
        assert_eq!(decode_base64("+/8A").unwrap(), [0xfb, 0xff, 0x00]);
        assert_eq!(decode_base64("a?"), None);
    }
}
