//! What the page renders and what it refuses to: the Markdown renderer's output for the shapes
//! LLM answers take, hostile documents and answers (`<img onerror>`, `<script>`, `javascript:`
//! links) that must reach the DOM as text only, and the Content-Security-Policy hash that lets
//! the page's one script run and nothing else.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::{ask_done, wait_for, with_fake, without_llm, DESKTOP};
use crate::support::fake_ollama::{FakeOllama, FakeOptions};
use crate::support::http::add_document;
use crate::support::wait_until;
use crate::support::webdriver::Browser;
use crate::support::ServerProcess;

const PAGE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/index.html");

/// Markdown in, the HTML the renderer builds out (`innerHTML`, so exactly the DOM it made).
const CASES: &[(&str, &str)] = &[
    ("# Title\n\ntext", "<h3>Title</h3><p>text</p>"),
    ("### Deep ###", "<h5>Deep</h5>"),
    (
        "Steps:\n1. one\n2. two\n   - nested `code`\n3. three",
        "<p>Steps:</p><ol><li>one</li><li>two<ul><li>nested <code>code</code></li></ul></li><li>three</li></ol>",
    ),
    ("3. third\n4. fourth", "<ol start=\"3\"><li>third</li><li>fourth</li></ol>"),
    (
        "- a\n\n- b",
        "<ul><li><p>a</p></li><li><p>b</p></li></ul>",
    ),
    (
        "```rust\nfn main() {}\n<b>x</b>\n```",
        "<pre data-lang=\"rust\"><code class=\"language-rust\">fn main() {}\n&lt;b&gt;x&lt;/b&gt;</code></pre>",
    ),
    ("```\nnever closed", "<pre><code>never closed</code></pre>"),
    ("**bold** and *em* and ~~gone~~", "<p><strong>bold</strong> and <em>em</em> and <del>gone</del></p>"),
    ("snake_case_name and 2 * 3 * 4", "<p>snake_case_name and 2 * 3 * 4</p>"),
    ("line one\nline two", "<p>line one<br>line two</p>"),
    ("> quoted\n> more", "<blockquote><p>quoted<br>more</p></blockquote>"),
    ("a\n\n---\n\nb", "<p>a</p><hr><p>b</p>"),
    (
        "| key | value |\n|:--|--:|\n| `a` | 1 |",
        "<div class=\"table\"><table><thead><tr><th style=\"text-align: left;\">key</th><th style=\"text-align: right;\">value</th></tr></thead><tbody><tr><td style=\"text-align: left;\"><code>a</code></td><td style=\"text-align: right;\">1</td></tr></tbody></table></div>",
    ),
    (
        "see [the docs](https://example.org/a_(b)) or <https://example.org/c>",
        "<p>see <a href=\"https://example.org/a_(b)\" target=\"_blank\" rel=\"noopener noreferrer nofollow\">the docs</a> or <a href=\"https://example.org/c\" target=\"_blank\" rel=\"noopener noreferrer nofollow\">https://example.org/c</a></p>",
    ),
    (
        "bare https://example.org/x. end",
        "<p>bare <a href=\"https://example.org/x\" target=\"_blank\" rel=\"noopener noreferrer nofollow\">https://example.org/x</a>. end</p>",
    ),
    ("\\*not em\\* and \\`tick\\`", "<p>*not em* and `tick`</p>"),
    (
        "<img src=x onerror=alert(1)> & <b>b</b>",
        "<p>&lt;img src=x onerror=alert(1)&gt; &amp; &lt;b&gt;b&lt;/b&gt;</p>",
    ),
    (
        "[x](javascript:alert(1)) [y]( JaVaScRiPt:alert(1)) [z](data:text/html,hi) [w](java\tscript:alert(1))",
        "<p><span class=\"unsafe-link\">x</span> <span class=\"unsafe-link\">y</span> <span class=\"unsafe-link\">z</span> <span class=\"unsafe-link\">w</span></p>",
    ),
    (
        "![pixel](https://example.org/p.png) ![x](javascript:alert(1))",
        "<p><a href=\"https://example.org/p.png\" target=\"_blank\" rel=\"noopener noreferrer nofollow\">pixel</a> <span class=\"unsafe-link\">x</span></p>",
    ),
    ("cite [2] and [10]", "<p>cite <b>2</b> and [10]</p>"),
];

#[test]
fn the_markdown_renderer_builds_the_expected_nodes() {
    let Some(browser) = Browser::start(DESKTOP.0, DESKTOP.1) else {
        return;
    };
    let server = ServerProcess::start(&without_llm());
    browser.goto(&format!("http://{}/", server.addr()));
    wait_for(&browser, "#question");
    let inputs: Vec<&str> = CASES.iter().map(|(md, _)| *md).collect();
    // Citations go through the caller's hook: here source 2 exists and 10 does not.
    let rendered = browser.execute(
        "const cite = (n) => { if (n !== 2) return null; const b = document.createElement('b'); b.textContent = n; return b; };
         return arguments[0].map((md) => {
           const div = document.createElement('div');
           div.appendChild(window.ragpool.Markdown.render(md, { cite }));
           return div.innerHTML;
         });",
        &[json!(inputs)],
    );
    let mut failures = Vec::new();
    for ((md, expected), got) in CASES.iter().zip(rendered.as_array().expect("an array")) {
        if got.as_str() != Some(*expected) {
            failures.push(format!("{md:?}\n  expected {expected}\n  got      {got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Markup a document or an answer could carry; every `window.__pwned` write is a failure.
const HOSTILE: &str = "Read the guide <img src=x onerror=\"window.__pwned='img'\"> now.\n\n\
    <script>window.__pwned='script'</script>\n\n\
    [click me](javascript:window.__pwned='link') and [again]( JaVaScRiPt:window.__pwned='case')\n\n\
    <a href=\"javascript:window.__pwned='anchor'\">anchor</a> <svg onload=\"window.__pwned='svg'\"></svg>\n\n\
    <iframe src=\"javascript:window.__pwned='iframe'\"></iframe>\n\n\
    ![x](javascript:window.__pwned='image') [data](data:text/html,<script>parent.__pwned=1</script>)\n\n\
    `<img src=x onerror=\"window.__pwned='code'\">` and [a safe one](https://example.org/guide).";

/// What must hold of the whole document: nothing ran, no element but the page's own came from
/// the markup, no handler attribute anywhere, every link http(s), no CSP violation reported.
fn assert_nothing_ran(browser: &Browser, when: &str) {
    let report = browser.execute(
        "const all = [...document.querySelectorAll('*')];
         return {
           pwned: window.__pwned === undefined ? null : String(window.__pwned),
           foreign: all.filter((e) => ['IMG','IFRAME','OBJECT','EMBED','svg','path'].includes(e.tagName)
             && !(e.closest('button.vote > svg.icon'))).length,
           icons: [...document.querySelectorAll('svg')].every((svg) => svg.matches('button.vote > svg.icon')
             && svg.children.length === 1 && svg.firstElementChild.getAttributeNames().join() === 'd'),
           scripts: document.scripts.length,
           handlers: all.flatMap((e) => [...e.attributes].filter((a) => a.name.startsWith('on')).map((a) => e.tagName + ' ' + a.name)),
           links: [...document.querySelectorAll('[href]')].map((a) => a.getAttribute('href')).filter((h) => !/^(https?:|#)/i.test(h) && !(h.startsWith('data:,') )),
           violations: window.__violations || [],
         };",
        &[],
    );
    eprintln!("{when}: {report}");
    assert_eq!(report["pwned"], Value::Null, "{when}: {report}");
    assert_eq!(report["foreign"], 0, "{when}: {report}");
    assert_eq!(
        report["icons"], true,
        "{when}: only the page's own thumbs: {report}"
    );
    assert_eq!(
        report["scripts"], 1,
        "{when}: only the page's own script: {report}"
    );
    assert_eq!(report["handlers"], json!([]), "{when}: {report}");
    assert_eq!(report["links"], json!([]), "{when}: {report}");
    assert_eq!(report["violations"], json!([]), "{when}: {report}");
}

#[test]
fn markup_in_documents_and_answers_is_shown_as_text_and_never_runs() {
    let Some(browser) = Browser::start(DESKTOP.0, DESKTOP.1) else {
        return;
    };
    let fake = FakeOllama::with(FakeOptions {
        answer: Some(format!("{HOSTILE} [1]")),
        tokens: 12,
        ..FakeOptions::default()
    });
    let server = ServerProcess::start(&with_fake(&fake));
    let addr = server.addr();
    let title = "<img src=x onerror=\"window.__pwned='title'\">Guide";
    add_document(&addr, title, &format!("# Guide\n\n{HOSTILE}"));
    browser.goto(&format!("http://{addr}/"));
    wait_for(&browser, "#question");
    // Anything the policy blocks would be reported here.
    browser.execute(
        "window.__violations = [];
         document.addEventListener('securitypolicyviolation', (e) => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));",
        &[],
    );

    let card = ask_done(&browser, "What does the guide say?");
    let answer = browser.find_in(&card, ".answer").expect(".answer");
    let text = browser.text(&answer);
    assert!(
        text.contains("<img src=x onerror=\"window.__pwned='img'\">")
            && text.contains("<script>window.__pwned='script'</script>"),
        "the markup is shown as the text it is: {text:?}"
    );
    assert!(text.contains("click me") && !text.contains("javascript:window.__pwned='link'"));
    let links: Vec<String> = browser
        .find_all_in(&answer, "a")
        .iter()
        .filter_map(|a| browser.attribute(a, "href"))
        .collect();
    assert_eq!(
        links,
        ["https://example.org/guide"],
        "only the safe link is a link"
    );
    assert_eq!(
        browser
            .find_in(&card, ".sources .title")
            .map(|t| browser.text(&t)),
        Some(title.to_string()),
        "the title is text"
    );
    // Clicking what would have been links does nothing.
    for span in browser.find_all_in(&answer, ".unsafe-link") {
        browser.click(&span);
    }
    assert_nothing_ran(&browser, "after the answer");

    // The document view renders the document's Markdown under the same rules.
    browser.click(
        &browser
            .find_in(&card, ".open-doc")
            .expect("Open the document"),
    );
    let dialog = wait_for(&browser, "dialog#doc[open][data-state=ready]");
    assert_eq!(browser.text_of("#doc-title").as_deref(), Some(title));
    assert!(browser
        .text(&dialog)
        .contains("<script>window.__pwned='script'</script>"));
    assert_nothing_ran(&browser, "in the document view");
    // And a moment later (an onerror would fire once the image failed to load).
    assert!(!wait_until(std::time::Duration::from_millis(500), || {
        browser.execute("return window.__pwned !== undefined;", &[]) == true
    }));
}

/// The base64 (standard, padded) of `bytes`.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The page's policy allows exactly its one inline script, by hash: an edited script needs a
/// new hash (`RAGPOOL_BLESS=1 cargo test --test it csp` writes it), or the page would not run.
#[test]
fn the_csp_names_the_hash_of_the_page_s_script() {
    let page = std::fs::read_to_string(PAGE).expect("assets/index.html");
    assert_eq!(page.matches("<script>").count(), 1, "one inline script");
    let start = page.find("<script>").unwrap() + "<script>".len();
    let end = page.find("</script>").expect("</script>");
    let hash = base64(&Sha256::digest(page[start..end].as_bytes()));
    let expected = format!("script-src 'sha256-{hash}'");
    let at = page.find("script-src 'sha256-").expect("a script-src hash");
    let stated_end = at + page[at..].find("='").map_or(0, |i| i + 2);
    let stated = &page[at..stated_end];
    if stated != expected && std::env::var("RAGPOOL_BLESS").as_deref() == Ok("1") {
        std::fs::write(PAGE, page.replacen(stated, &expected, 1)).expect("write the page");
        return;
    }
    assert_eq!(
        stated, expected,
        "run RAGPOOL_BLESS=1 cargo test --test it csp"
    );
    assert!(page.contains("default-src 'none'"));
    assert!(
        !page.contains("script-src 'unsafe-inline'"),
        "no inline scripts but this one"
    );
    assert_eq!(base64(b"hello"), "aGVsbG8=");
}
