//! The chat page (assets/index.html) in a real browser: headless Chromium driven over WebDriver
//! (tests/it/support/webdriver.rs) against the real binary, at a desktop (1280x900) and a phone
//! (390x844) viewport. Skipped when Chromium is not installed, unless `RAGPOOL_REQUIRE_BROWSER=1`
//! (CI).
//!
//! Every wait is a bounded poll on what the page shows; the fake Ollama's pace (tokens spread
//! over seconds) is what makes streaming observable, never a sleep in the test.
//!
//! # Layout
//! - this file: the helpers, streaming, the extractive answer in Russian;
//! - `conversation`: follow-ups in context, Stop, Retry, reload, the document view, feedback;
//! - `safety`: the Markdown renderer, hostile documents and answers, the CSP hash;
//! - `screenshots`: the README's pictures (`RAGPOOL_BLESS=1` writes docs/screenshots/).

mod conversation;
mod safety;
mod screenshots;

use std::time::Duration;

use crate::support::fake_ollama::{FakeOllama, FakeOptions};
use crate::support::http::add_document;
use crate::support::wait_until;
use crate::support::webdriver::{png_size, screenshot_dir, Browser, Element, ENTER};
use crate::support::ServerProcess;

const BOUND: Duration = Duration::from_secs(30);
/// The CSS-pixel viewport of a current iPhone (the page's narrow layout is below 520 px).
const PHONE: (u32, u32) = (390, 844);
/// A laptop's browser window.
const DESKTOP: (u32, u32) = (1280, 900);
const ANSWER: &str = "Send HUP to the master [1].";

/// workers.toml for app tests (as in rag.rs): loopback, data under the test dir, the tables.
fn app_config(tables: &str) -> String {
    format!(
        "workers = 1\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\nadmin_token = \"t\"\n[store]\npath = \"{{dir}}/data\"\n{tables}\n"
    )
}

/// The `[llm]` and `[rag]` tables for answers from `fake`.
fn with_fake(fake: &FakeOllama) -> String {
    app_config(&format!(
        "[llm]\nprovider = \"ollama\"\nurl = \"{}\"\nmodel = \"llama3.2\"\nfirst_token_timeout = 5\n[rag]\ningest_docs_on_first_run = false\n",
        fake.url()
    ))
}

/// No LLM: extractive answers, and follow-ups rewritten by the deterministic fallback.
fn without_llm() -> String {
    app_config("[llm]\nprovider = \"none\"\n[rag]\ningest_docs_on_first_run = false\n")
}

/// Waits for the first element matching `css`.
fn wait_for(browser: &Browser, css: &str) -> Element {
    let mut found = None;
    assert!(
        wait_until(BOUND, || {
            found = browser.find(css);
            found.is_some()
        }),
        "no {css} within {BOUND:?}"
    );
    found.unwrap()
}

/// Waits until the answer card's `data-state` is `state`; fails at once if it ends (`done`,
/// `error`, `stopped`) in another state.
fn wait_for_state(browser: &Browser, card: &Element, state: &str) {
    let mut seen = None;
    wait_until(BOUND, || {
        seen = browser.attribute(card, "data-state");
        matches!(seen.as_deref(), Some(s) if s == state || s == "done" || s == "error" || s == "stopped")
    });
    assert_eq!(
        seen.as_deref(),
        Some(state),
        "the answer card; its text: {:?}",
        browser.text(card)
    );
}

/// Types `question` and Enter into the question box; the new answer card.
fn ask(browser: &Browser, question: &str) -> Element {
    let before = browser.find_all("#log .a").len();
    let input = wait_for(browser, "#question");
    browser.send_keys(&input, &format!("{question}{ENTER}"));
    let mut cards = Vec::new();
    assert!(
        wait_until(BOUND, || {
            cards = browser.find_all("#log .a");
            cards.len() > before
        }),
        "no new answer card for {question:?}"
    );
    cards.pop().unwrap()
}

/// [`ask`], then waits for the answer to end as `done`.
fn ask_done(browser: &Browser, question: &str) -> Element {
    let card = ask(browser, question);
    wait_for_state(browser, &card, "done");
    card
}

/// The titles of an answer's source groups (one per document), in order.
fn source_titles(browser: &Browser, card: &Element) -> Vec<String> {
    browser
        .find_all_in(card, ".sources > li .title")
        .iter()
        .map(|t| browser.text(t))
        .collect()
}

/// Checks the page fits the viewport's width, then saves a PNG of the viewport to
/// target/tmp/browser/{name}.png (kept after the run, for a human to look at); the PNG.
fn screenshot(browser: &Browser, size: (u32, u32), name: &str) -> Vec<u8> {
    let layout = browser.execute(
        "return { width: innerWidth, height: innerHeight, scroll: document.documentElement.scrollWidth,
                  send: document.getElementById('send').getBoundingClientRect().right };",
        &[],
    );
    assert_eq!(layout["width"], size.0, "{layout}");
    assert_eq!(layout["height"], size.1, "{layout}");
    assert!(
        layout["scroll"].as_f64() <= layout["width"].as_f64()
            && layout["send"].as_f64() <= layout["width"].as_f64(),
        "the page is wider than the viewport: {layout}"
    );
    let png = browser.screenshot();
    assert_eq!(png_size(&png), Some(size), "screenshot size");
    let path = screenshot_dir().join(format!("{name}.png"));
    std::fs::write(&path, &png).unwrap();
    eprintln!("screenshot: {}", path.display());
    png
}

#[test]
fn the_chat_page_streams_an_answer_token_by_token_then_lists_its_sources() {
    let Some(browser) = Browser::start(PHONE.0, PHONE.1) else {
        return;
    };
    let fake = FakeOllama::with(FakeOptions {
        answer: Some(ANSWER.into()),
        tokens: 8,
        answer_duration: Duration::from_secs(2),
        ..FakeOptions::default()
    });
    let server = ServerProcess::start(&with_fake(&fake));
    let addr = server.addr();
    add_document(
        &addr,
        "Reload",
        "# Reload\n\nSend HUP to the master to reload the workers without downtime.",
    );

    browser.goto(&format!("http://{addr}/"));
    let question = wait_for(&browser, "#question");
    assert_eq!(browser.property(&question, "placeholder"), "Your question…");
    let send = wait_for(&browser, "#send");
    assert_eq!(browser.text(&send), "Ask");
    browser.send_keys(&question, "How do I reload the workers?");
    browser.click(&send);

    let card = wait_for(&browser, "#log .a");
    assert_eq!(
        browser.text_of("#log .q").as_deref(),
        Some("How do I reload the workers?")
    );
    wait_for_state(&browser, &card, "streaming");
    assert_eq!(
        browser.find_in(&card, ".status").map(|s| browser.text(&s)),
        Some("Writing the answer…".to_string())
    );
    assert!(
        !browser.is_enabled(&send),
        "Ask is disabled while answering"
    );
    assert_eq!(browser.property(&question, "value"), "");
    let stop = wait_for(&browser, "#stop");
    assert!(
        browser.is_displayed(&stop),
        "Stop is offered while answering"
    );
    assert_eq!(browser.text(&stop), "Stop");

    // The answer grows while the card streams: at least two different partial texts. Screen
    // readers hear it through its live region once it is no longer busy.
    let answer = browser.find_in(&card, ".answer").expect(".answer");
    assert_eq!(
        browser.attribute(&answer, "aria-live").as_deref(),
        Some("polite")
    );
    assert_eq!(
        browser.attribute(&answer, "aria-busy").as_deref(),
        Some("true")
    );
    let mut partials: Vec<String> = Vec::new();
    let mut state = None;
    assert!(
        wait_until(BOUND, || {
            state = browser.attribute(&card, "data-state");
            let text = browser.text(&answer);
            if state.as_deref() == Some("streaming")
                && !text.is_empty()
                && text.len() < ANSWER.len()
                && partials.last() != Some(&text)
            {
                partials.push(text);
            }
            state.as_deref() == Some("done")
        }),
        "card still {state:?} after {BOUND:?}; partials {partials:?}"
    );
    eprintln!("partial answers seen while streaming: {partials:?}");
    assert!(
        partials.len() >= 2,
        "the answer arrived at once, not as a stream: {partials:?}"
    );
    for pair in partials.windows(2) {
        assert!(pair[0].len() < pair[1].len(), "{partials:?}");
    }
    for partial in &partials {
        assert!(ANSWER.starts_with(partial.as_str()), "{partials:?}");
    }
    assert_eq!(browser.text(&answer), ANSWER);
    assert!(browser.find_in(&card, ".status").is_none());
    assert!(browser.find_in(&card, ".badge").is_none(), "not extractive");

    // Sources render once the stream has ended (just after `done`): one document, one passage.
    let source = wait_for(&browser, "#log .a .sources > li");
    assert_eq!(
        browser.find_in(&source, ".head").map(|t| browser.text(&t)),
        Some("[1] Reload".to_string())
    );
    let snippet = browser
        .find_in(&source, ".passage .snippet")
        .map(|s| browser.text(&s))
        .unwrap_or_default();
    assert!(snippet.contains("Send HUP to the master"), "{snippet:?}");
    assert_eq!(browser.find_all("#log .a .sources > li").len(), 1);
    assert_eq!(browser.find_all("#log .a .passage").len(), 1);
    // The answer's [1] is a button that opens that source.
    let cite = browser
        .find_in(&answer, "button.cite")
        .expect("[1] as a button");
    assert_eq!(browser.text(&cite), "[1]");
    assert_eq!(
        browser.attribute(&cite, "aria-label").as_deref(),
        Some("Source 1")
    );
    assert!(wait_until(BOUND, || browser.is_enabled(&send)));
    assert!(!browser.is_displayed(&stop), "Stop is gone once answered");
    assert_eq!(
        browser.attribute(&answer, "aria-busy").as_deref(),
        Some("false")
    );
    // One generation, run to its end (counted just after the fake's last write).
    assert!(
        fake.wait_until(BOUND, |c| c.chat_started == 1 && c.chat_completed == 1),
        "{:?}",
        fake.counters()
    );
    screenshot(&browser, PHONE, "streamed-answer-en");
}

#[test]
fn the_russian_page_shows_an_extractive_answer_with_a_badge_and_matched_words_in_bold() {
    let Some(browser) = Browser::start(PHONE.0, PHONE.1) else {
        return;
    };
    let server = ServerProcess::start(&without_llm());
    let addr = server.addr();
    add_document(
        &addr,
        "Резервное копирование",
        "# Резервное копирование\n\nРезервные копии базы создаются каждую ночь скриптом backup.sh.",
    );

    browser.goto(&format!("http://{addr}/"));
    let toggle = wait_for(&browser, "#lang");
    assert_eq!(browser.text(&toggle), "RU", "the page starts in English");
    browser.click(&toggle);
    let russian = |browser: &Browser| {
        assert_eq!(browser.text_of("#lang").as_deref(), Some("EN"));
        assert_eq!(browser.text_of("#send").as_deref(), Some("Спросить"));
        assert_eq!(
            browser.text_of("#hint").as_deref(),
            Some(
                "Задайте вопрос по документам организации. Ответы ссылаются на источники; \
                 уточняйте в том же чате."
            )
        );
        let question = browser.find("#question").expect("#question");
        assert_eq!(browser.property(&question, "placeholder"), "Ваш вопрос…");
        assert_eq!(
            browser.execute("return document.documentElement.lang;", &[]),
            "ru"
        );
    };
    russian(&browser);
    // The choice is kept (localStorage) across a reload.
    browser.refresh();
    wait_for(&browser, "#question");
    russian(&browser);

    // Enter in the question box submits.
    let question = wait_for(&browser, "#question");
    browser.send_keys(&question, &format!("как создать резервную копию?{ENTER}"));
    let card = wait_for(&browser, "#log .a");
    wait_for_state(&browser, &card, "done");

    assert_eq!(
        browser.find_in(&card, ".badge").map(|b| browser.text(&b)),
        Some("Фрагменты (без языковой модели)".to_string())
    );
    let answer = browser.find_in(&card, ".answer").expect(".answer");
    let text = browser.text(&answer);
    assert!(text.starts_with("Языковая модель не настроена"), "{text:?}");
    assert!(
        !text.contains("**"),
        "markers rendered, not shown: {text:?}"
    );
    let bold: Vec<String> = browser
        .find_all_in(&answer, "strong")
        .iter()
        .map(|b| browser.text(b).to_lowercase())
        .collect();
    eprintln!("extractive answer {text:?}, bold {bold:?}");
    assert!(
        bold.iter().any(|w| w.starts_with("резервн")) && bold.iter().any(|w| w.starts_with("копи")),
        "matched words in bold: {bold:?} in {text:?}"
    );
    assert!(
        bold.iter()
            .all(|w| w.starts_with("резервн") || w.starts_with("копи") || w.starts_with("созда")),
        "only matched words in bold: {bold:?}"
    );

    let source = wait_for(&browser, "#log .a .sources > li");
    assert_eq!(
        browser.find_in(&source, ".head").map(|t| browser.text(&t)),
        Some("[1] Резервное копирование".to_string())
    );
    assert!(browser.text(&card).contains("Источники"));
    screenshot(&browser, PHONE, "extractive-answer-ru");
}
