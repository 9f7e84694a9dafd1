//! Conversations on the page: a follow-up retrieved in the context of the question before it,
//! Stop (the fake Ollama sees its chat cancelled), Retry, the document view a source opens,
//! a conversation that survives a reload (localStorage), with "New chat" and the phone's drawer,
//! the place in line while the LLM is busy, and a vote on an answer (`POST /api/feedback`).

use std::time::Duration;

use serde_json::Value;

use super::{
    ask, ask_done, source_titles, wait_for, wait_for_state, with_fake, without_llm, BOUND, DESKTOP,
    PHONE,
};
use crate::support::fake_ollama::{FakeOllama, FakeOptions};
use crate::support::http::add_document;
use crate::support::wait_until;
use crate::support::webdriver::{Browser, ESCAPE};
use crate::support::ServerProcess;

const BACKUP_KEYS: &str =
    "# Rotating the backup keys\n\nThe backup encryption keys are rotated with \
    `ragpool-backup rotate-keys`; the old backup keys stay readable for a year. On weekends the \
    rotation of the keys is postponed to Monday.";
const WEEKEND_DUTY: &str = "# Weekend duty\n\nOn weekends one engineer is on call. Weekends start \
    on Friday evening; the weekend rota lives in the wiki, and weekend calls are paid double.";
const PRINTERS: &str = "# Printers\n\nThe printers on the second floor take badges; toner is in \
    the cupboard by the kitchen.";

#[test]
fn a_follow_up_is_understood_in_the_context_of_the_question_before_it() {
    let Some(browser) = Browser::start(DESKTOP.0, DESKTOP.1) else {
        return;
    };
    let server = ServerProcess::start(&without_llm());
    let addr = server.addr();
    add_document(&addr, "Backup keys", BACKUP_KEYS);
    add_document(&addr, "Weekend duty", WEEKEND_DUTY);
    add_document(&addr, "Printers", PRINTERS);
    browser.goto(&format!("http://{addr}/"));

    let first = ask_done(&browser, "How are the backup keys rotated?");
    assert_eq!(source_titles(&browser, &first)[0], "Backup keys");

    // Alone, "and on weekends?" is about weekend duty; after the backup question it is about
    // rotating the keys on weekends, and the page says what it searched for.
    let follow_up = ask_done(&browser, "And on weekends?");
    let titles = source_titles(&browser, &follow_up);
    eprintln!("follow-up sources: {titles:?}");
    assert_eq!(
        titles.first().map(String::as_str),
        Some("Backup keys"),
        "{titles:?}"
    );
    let searched = browser
        .find_in(&follow_up, ".standalone")
        .map(|s| browser.text(&s))
        .unwrap_or_default();
    assert!(
        searched.starts_with("Searched for: And on weekends?") && searched.contains("backup"),
        "{searched:?}"
    );
    assert_eq!(browser.find_all("#chats li").len(), 1);

    // A new chat has no history: the same words now find weekend duty.
    browser.click(&wait_for(&browser, "#new-chat"));
    assert!(wait_until(BOUND, || browser.find_all("#log .a").is_empty()));
    let alone = ask_done(&browser, "And on weekends?");
    let titles = source_titles(&browser, &alone);
    assert_eq!(
        titles.first().map(String::as_str),
        Some("Weekend duty"),
        "{titles:?}"
    );
    assert!(browser
        .find_in(&alone, ".standalone")
        .is_some_and(|s| !browser.is_displayed(&s)));
    let chats = browser.find_all("#chats li");
    assert_eq!(chats.len(), 2, "two conversations listed");
    assert_eq!(
        browser.attribute(&chats[0], "aria-current").as_deref(),
        Some("true"),
        "the newest is the current one, listed first"
    );
}

#[test]
fn stop_cancels_the_generation_upstream_and_retry_answers_again() {
    let Some(browser) = Browser::start(PHONE.0, PHONE.1) else {
        return;
    };
    let long = "Workers are reloaded one generation at a time [1]. ".repeat(8);
    let fake = FakeOllama::with(FakeOptions {
        answer: Some(long.clone()),
        tokens: 40,
        answer_duration: Duration::from_secs(20),
        ..FakeOptions::default()
    });
    let server = ServerProcess::start(&with_fake(&fake));
    let addr = server.addr();
    add_document(
        &addr,
        "Reload",
        "# Reload\n\nWorkers are reloaded one generation at a time.",
    );
    add_document(&addr, "Printers", PRINTERS);
    browser.goto(&format!("http://{addr}/"));

    let card = ask(&browser, "How are workers reloaded?");
    wait_for_state(&browser, &card, "streaming");
    let answer = browser.find_in(&card, ".answer").expect(".answer");
    assert!(wait_until(BOUND, || !browser.text(&answer).is_empty()));
    let stop = wait_for(&browser, "#stop");
    assert!(browser.is_displayed(&stop));
    browser.click(&stop);

    wait_for_state(&browser, &card, "stopped");
    assert!(
        fake.wait_until(BOUND, |c| c.chat_cancelled == 1),
        "the fake never saw its chat cancelled: {:?}",
        fake.counters()
    );
    assert_eq!(fake.counters().chat_completed, 0, "{:?}", fake.counters());
    let partial = browser.text(&answer);
    assert!(
        !partial.is_empty() && partial.len() < long.trim().len(),
        "{partial:?}"
    );
    assert_eq!(
        browser
            .find_in(&card, ".badge.stopped")
            .map(|b| browser.text(&b)),
        Some("Stopped".to_string())
    );
    assert!(browser.is_enabled(&wait_for(&browser, "#send")));
    assert!(!browser.is_displayed(&stop));

    // Retry asks again in place, and this time the answer runs to its end.
    fake.set_answer_duration(Duration::from_millis(500));
    browser.click(&browser.find_in(&card, ".actions .retry").expect("Retry"));
    let mut cards = Vec::new();
    assert!(wait_until(BOUND, || {
        cards = browser.find_all("#log .a");
        cards.len() == 1 && browser.attribute(&cards[0], "data-state").as_deref() == Some("done")
    }));
    let text = browser.text(&browser.find_in(&cards[0], ".answer").expect(".answer"));
    assert_eq!(text, long.trim());
    assert!(fake.wait_until(BOUND, |c| c.chat_completed == 1 && c.chat_started == 2));

    // Escape stops from the keyboard too (in a new chat: no follow-up rewrite to the fake).
    fake.set_answer_duration(Duration::from_secs(20));
    browser.click(&wait_for(&browser, "#new-chat"));
    let card = ask(&browser, "How are workers reloaded, once more?");
    wait_for_state(&browser, &card, "streaming");
    browser.send_keys(&wait_for(&browser, "#question"), &ESCAPE.to_string());
    wait_for_state(&browser, &card, "stopped");
    assert!(
        fake.wait_until(BOUND, |c| c.chat_cancelled == 2),
        "{:?}",
        fake.counters()
    );
    assert_eq!(fake.counters().chat_completed, 1, "{:?}", fake.counters());
    assert_eq!(fake.rewrites(), 0);

    // On a phone the conversations are behind "Chats": the first one opens from there.
    let menu = wait_for(&browser, "#menu");
    assert!(!browser.is_displayed(&wait_for(&browser, "#sidebar")));
    browser.click(&menu);
    assert_eq!(
        browser.attribute(&menu, "aria-expanded").as_deref(),
        Some("true")
    );
    let chats = browser.find_all("#chats li .open");
    assert_eq!(chats.len(), 2);
    assert!(browser.is_displayed(&chats[1]));
    browser.click(&chats[1]);
    assert!(wait_until(BOUND, || {
        browser.text_of("#log .q").as_deref() == Some("How are workers reloaded?")
    }));
    assert!(!browser.is_displayed(&wait_for(&browser, "#sidebar")));
    assert_eq!(
        browser.attribute(&menu, "aria-expanded").as_deref(),
        Some("false")
    );
}

/// A document long enough for several chunks; its third section is what the answer cites.
fn long_document() -> String {
    let filler = |topic: &str| {
        format!("The {topic} is described here at some length so that the chunker has to cut. ")
            .repeat(9)
    };
    format!(
        "# Operations\n\n## Logging\n\n{}\n\n## Metrics\n\n{}\n\n## Reloading\n\nSend SIGHUP to \
         the master: it starts a new generation of workers and retires the old one gracefully.\n",
        filler("logging"),
        filler("metrics pipeline")
    )
}

#[test]
fn a_conversation_survives_a_reload_and_its_sources_open_the_document() {
    let Some(browser) = Browser::start(DESKTOP.0, DESKTOP.1) else {
        return;
    };
    let fake = FakeOllama::with(FakeOptions {
        answer: Some(
            "Send **SIGHUP** to the master [1]:\n\n- a new generation starts\n- the old one \
             retires\n\n```sh\nragpool reload\n```"
                .into(),
        ),
        tokens: 6,
        ..FakeOptions::default()
    });
    let server = ServerProcess::start(&with_fake(&fake));
    let addr = server.addr();
    add_document(&addr, "Operations", &long_document());
    browser.goto(&format!("http://{addr}/"));

    let card = ask_done(&browser, "How do I send SIGHUP to reload the master?");
    let answer = browser.find_in(&card, ".answer").expect(".answer");
    assert_eq!(browser.find_all_in(&answer, "li").len(), 2);
    assert_eq!(
        browser
            .find_in(&answer, "pre code")
            .map(|c| browser.text(&c)),
        Some("ragpool reload".to_string())
    );

    // Every control has a name a screen reader can say; the question box has its label.
    let unnamed = browser.execute(
        "return [...document.querySelectorAll('button, textarea, a[href]')]
           .filter((e) => !(e.getAttribute('aria-label') || e.textContent.trim() || (e.labels && e.labels.length && e.labels[0].textContent.trim())))
           .map((e) => e.outerHTML.slice(0, 80));",
        &[],
    );
    assert_eq!(unnamed, serde_json::json!([]), "controls without a name");

    // A passage opens the document at that passage; Escape closes it and focus comes back.
    let passage = browser.find_in(&card, ".passage").expect("a passage");
    let n = browser.attribute(&passage, "data-n").unwrap_or_default();
    browser.click(&passage);
    let dialog = wait_for(&browser, "dialog#doc[open][data-state=ready]");
    assert_eq!(browser.text_of("#doc-title").as_deref(), Some("Operations"));
    let chunks = browser.find_all("#doc .chunk");
    assert!(chunks.len() >= 2, "several chunks: {}", chunks.len());
    let hit = browser
        .find("#doc .chunk.hit")
        .expect("the cited passage is marked");
    assert!(
        browser.text(&hit).contains("Send SIGHUP"),
        "{}",
        browser.text(&hit)
    );
    let focused = browser.execute(
        "return document.activeElement === document.querySelector('#doc .chunk.hit');",
        &[],
    );
    assert_eq!(focused, true, "focus moves to the passage");
    let whole = browser.text(&dialog);
    assert!(
        whole.contains("Logging") && whole.contains("Reloading"),
        "the whole document"
    );
    // Overlapping chunks are shown once: the filler sentence count is what the document has.
    assert_eq!(
        whole.matches("The logging is described").count(),
        9,
        "{whole}"
    );
    browser.send_keys(&hit, &ESCAPE.to_string());
    assert!(wait_until(BOUND, || browser
        .find("dialog#doc[open]")
        .is_none()));
    let back = browser.execute(
        "return document.activeElement && document.activeElement.dataset.n;",
        &[],
    );
    assert_eq!(back, Value::String(n), "focus back on the passage");

    // "Open the document" opens it from the top, nothing marked.
    browser.click(
        &browser
            .find_in(&card, ".open-doc")
            .expect("Open the document"),
    );
    wait_for(&browser, "dialog#doc[open][data-state=ready]");
    assert!(browser.find("#doc .chunk.hit").is_none());
    browser.click(&wait_for(&browser, "#doc-close"));
    assert!(wait_until(BOUND, || browser
        .find("dialog#doc[open]")
        .is_none()));

    // Copy.
    browser.click(&browser.find_in(&card, ".actions .copy").expect("Copy"));
    assert!(wait_until(BOUND, || {
        browser
            .find_in(&card, ".actions .note")
            .map(|n| browser.text(&n))
            .as_deref()
            == Some("Copied")
    }));
    // The switch re-labels the conversation too; the answer stays as it was.
    browser.click(&wait_for(&browser, "#lang"));
    let card = wait_for(&browser, "#log .a");
    assert_eq!(
        browser
            .find_in(&card, ".actions .copy")
            .map(|b| browser.text(&b)),
        Some("Копировать".to_string())
    );
    assert_eq!(
        browser
            .find_in(&card, ".sources-title")
            .map(|b| browser.text(&b)),
        Some("Источники".to_string())
    );
    assert!(browser.find_in(&card, "pre code").is_some());
    browser.click(&wait_for(&browser, "#lang"));

    fake.set_answer(Some("Yes, `ragpool reload` does the same [1]."));
    ask_done(&browser, "Is there a command for it?");

    // Reload: the same conversation, answers rendered, sources kept.
    browser.refresh();
    wait_for(&browser, "#question");
    let cards = browser.find_all("#log .a");
    assert_eq!(cards.len(), 2, "both turns are back");
    let questions: Vec<String> = browser
        .find_all("#log .q")
        .iter()
        .map(|q| browser.text(q))
        .collect();
    assert_eq!(
        questions,
        [
            "How do I send SIGHUP to reload the master?",
            "Is there a command for it?"
        ]
    );
    for card in &cards {
        assert_eq!(
            browser.attribute(card, "data-state").as_deref(),
            Some("done")
        );
        assert_eq!(source_titles(&browser, card), ["Operations"]);
    }
    let answer = browser.find_in(&cards[0], ".answer").expect(".answer");
    assert_eq!(browser.find_all_in(&answer, "li").len(), 2);
    assert!(browser.find_in(&answer, "strong").is_some());
    let chats = browser.find_all("#chats li");
    assert_eq!(chats.len(), 1);
    assert_eq!(
        browser.text(&browser.find_in(&chats[0], ".open").expect("its title")),
        "How do I send SIGHUP to reload the master?"
    );

    // A follow-up after the reload still carries the conversation to the LLM.
    fake.set_answer(Some("It works under systemd as well [1]."));
    ask_done(&browser, "And under systemd?");
    let request = fake.last_chat_request().expect("a chat request");
    let sent = request["messages"].to_string();
    assert!(
        sent.contains("How do I send SIGHUP to reload the master?")
            && sent.contains("Is there a command for it?"),
        "the earlier turns reach the LLM: {sent}"
    );
}

#[test]
fn a_question_waiting_for_the_llm_shows_its_place_in_line() {
    let Some(browser) = Browser::start(PHONE.0, PHONE.1) else {
        return;
    };
    let fake = FakeOllama::with(FakeOptions {
        answer: Some("Send HUP to the master [1].".into()),
        tokens: 4,
        answer_duration: Duration::from_secs(4),
        ..FakeOptions::default()
    });
    let config = with_fake(&fake).replace(
        "first_token_timeout = 5\n",
        "first_token_timeout = 5\nmax_concurrent = 1\n",
    );
    let server = ServerProcess::start(&config);
    let addr = server.addr();
    add_document(
        &addr,
        "Reload",
        "# Reload\n\nSend HUP to the master to reload the workers.",
    );
    browser.goto(&format!("http://{addr}/"));
    wait_for(&browser, "#question");

    // Someone else's answer holds the one place.
    let other = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            crate::support::http::post_json(
                &addr,
                "/api/ask/stream",
                &serde_json::json!({ "question": "how do I reload the workers?" }),
            )
        })
    };
    assert!(fake.wait_until(BOUND, |c| c.active_streams == 1));
    let card = ask(&browser, "How do I reload the workers?");
    wait_for_state(&browser, &card, "queued");
    assert_eq!(
        browser.find_in(&card, ".status").map(|s| browser.text(&s)),
        Some("Waiting for the language model: you are #1 in line…".to_string())
    );
    wait_for_state(&browser, &card, "done");
    assert_eq!(
        browser.text(&browser.find_in(&card, ".answer").expect(".answer")),
        "Send HUP to the master [1]."
    );
    let other = other.join().unwrap().expect("the other answer");
    assert!(other.body.contains("event: done"), "{}", other.body);
    assert_eq!(fake.counters().max_concurrent_streams, 1);
}

/// `ragpool_feedback_total{vote="..."}` from `/metrics` (0 when absent).
fn votes(addr: &str, vote: &str) -> u64 {
    let metrics = crate::support::http::get(addr, "/metrics").expect("/metrics");
    let series = format!("ragpool_feedback_total{{vote=\"{vote}\"}} ");
    metrics
        .body
        .lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_vote_on_an_answer_is_stored_by_the_server_and_kept_by_the_page() {
    let Some(browser) = Browser::start(PHONE.0, PHONE.1) else {
        return;
    };
    let fake = FakeOllama::with(FakeOptions {
        answer: Some("Send HUP to the master [1].".into()),
        tokens: 4,
        ..FakeOptions::default()
    });
    let server = ServerProcess::start(&with_fake(&fake));
    let addr = server.addr();
    add_document(
        &addr,
        "Reload",
        "# Reload\n\nSend HUP to the master to reload the workers.",
    );
    browser.goto(&format!("http://{addr}/"));

    let card = ask_done(&browser, "How do I reload the workers?");
    let document_id = browser
        .find_in(&card, ".sources > li")
        .and_then(|li| browser.attribute(&li, "data-document-id"))
        .expect("the source's document id");
    let (up, down) = (
        browser.find_in(&card, ".vote.up").expect("thumbs up"),
        browser.find_in(&card, ".vote.down").expect("thumbs down"),
    );
    assert_eq!(
        browser.attribute(&up, "aria-label").as_deref(),
        Some("Helpful")
    );
    assert_eq!(
        browser.attribute(&down, "aria-label").as_deref(),
        Some("Not helpful")
    );
    assert_eq!(
        browser.attribute(&up, "aria-pressed").as_deref(),
        Some("false")
    );
    browser.click(&up);
    assert!(
        wait_until(BOUND, || browser.attribute(&up, "aria-pressed").as_deref()
            == Some("true")),
        "not accepted: {:?}",
        browser
            .find_in(&card, ".actions .note")
            .map(|n| browser.text(&n))
    );
    assert_eq!(
        browser
            .find_in(&card, ".actions .note")
            .map(|n| browser.text(&n)),
        Some("Thanks for the feedback".to_string())
    );
    assert_eq!(votes(&addr, "up"), 1);

    // A change of mind is a second vote; the page shows the last one, after a reload too.
    browser.click(&down);
    assert!(wait_until(BOUND, || {
        browser.attribute(&down, "aria-pressed").as_deref() == Some("true")
    }));
    assert_eq!(
        browser.attribute(&up, "aria-pressed").as_deref(),
        Some("false")
    );
    assert_eq!(votes(&addr, "down"), 1);
    browser.refresh();
    let down = wait_for(&browser, "#log .a .vote.down");
    assert_eq!(
        browser.attribute(&down, "aria-pressed").as_deref(),
        Some("true")
    );

    // What the operator exports: the question, the answer's mode and its source's document.
    let export = std::process::Command::new(crate::support::BIN)
        .args(["feedback", "export", "--config"])
        .arg(server.path("workers.toml"))
        .output()
        .expect("ragpool feedback export");
    assert!(export.status.success(), "{export:?}");
    let lines: Vec<Value> = String::from_utf8_lossy(&export.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    // Both votes (their order within one second is the store's, not the page's).
    let mut given: Vec<&str> = lines.iter().filter_map(|l| l["vote"].as_str()).collect();
    given.sort_unstable();
    assert_eq!(given, ["down", "up"], "{lines:?}");
    for line in &lines {
        assert_eq!(line["question"], "How do I reload the workers?", "{line}");
        assert_eq!(line["answer"], "Send HUP to the master [1].", "{line}");
        assert_eq!(line["mode"], "generated", "{line}");
        assert_eq!(
            line["source_ids"],
            serde_json::json!([document_id]),
            "{line}"
        );
    }
}
