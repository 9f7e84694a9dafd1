//! The README's pictures of the page: an answer with a heading, a list and a code block, its
//! sources grouped per document, at the desktop and the phone size, in English and in Russian
//! (each chosen by the browser's language, not the switch). Saved under target/tmp/browser/;
//! with `RAGPOOL_BLESS=1` also written to docs/screenshots/, which the README shows.

use std::path::PathBuf;

use super::{ask_done, screenshot, source_titles, wait_for, with_fake, DESKTOP, PHONE};
use crate::support::fake_ollama::{FakeOllama, FakeOptions};
use crate::support::http::add_document;
use crate::support::webdriver::Browser;
use crate::support::ServerProcess;

const ANSWER_EN: &str = "### Reloading without downtime\n\nSend the master **SIGHUP** [1]: it \
    starts a new generation of workers and retires the old one once its requests are done [2].\n\n\
    1. Edit `workers.toml`.\n2. Check it: `ragpool check`.\n3. Reload:\n\n\
    ```sh\nragpool reload            # or: kill -HUP $(cat ragpool.pid)\nsystemctl reload ragpool  # under systemd\n```\n\n\
    - New workers read the new configuration [1].\n- A bad file keeps the old workers running [3].";
const ANSWER_RU: &str = "### Перезагрузка без простоя\n\nПошлите мастеру **SIGHUP** [1]: он \
    запускает новое поколение воркеров, а старое завершает, когда те ответят на запросы [2].\n\n\
    1. Исправьте `workers.toml`.\n2. Проверьте: `ragpool check`.\n3. Перезагрузите:\n\n\
    ```sh\nragpool reload            # или: kill -HUP $(cat ragpool.pid)\nsystemctl reload ragpool  # под systemd\n```\n\n\
    - Новые воркеры читают новую конфигурацию [1].\n- Ошибочный файл оставляет старых воркеров [3].";

const DOCS: &[(&str, &str)] = &[
    ("Reloading the workers", "# Reloading the workers\n\nSend SIGHUP to the master to reload the workers: a new generation starts with the new configuration.\n\n## Graceful\n\nThe old generation is retired once its requests are done; reload keeps serving."),
    ("Configuration checks", "# Configuration checks\n\nA reload with a bad workers.toml keeps the old workers running; `ragpool check` reports the error first."),
    ("Перезагрузка воркеров", "# Перезагрузка воркеров\n\nЧтобы перезагрузить воркеров, пошлите мастеру SIGHUP: новое поколение воркеров читает новую конфигурацию.\n\n## Без простоя\n\nСтарое поколение воркеров завершается, когда ответит на свои запросы."),
    ("Проверка конфигурации", "# Проверка конфигурации\n\nПерезагрузка с ошибочным workers.toml оставляет старых воркеров; `ragpool check` сообщает об ошибке заранее."),
];

#[test]
fn screenshots_of_the_page_at_both_sizes_in_both_languages() {
    let fake = FakeOllama::with(FakeOptions {
        tokens: 24,
        ..FakeOptions::default()
    });
    let server = ServerProcess::start(&with_fake(&fake));
    let addr = server.addr();
    for (title, text) in DOCS {
        add_document(&addr, title, text);
    }
    let bless = std::env::var("RAGPOOL_BLESS").as_deref() == Ok("1");
    let shots = [
        ("desktop-en", DESKTOP, "en-US"),
        ("phone-en", PHONE, "en-US"),
        ("desktop-ru", DESKTOP, "ru-RU"),
        ("phone-ru", PHONE, "ru-RU"),
    ];
    for (name, size, language) in shots {
        let Some(browser) = Browser::start_in(size.0, size.1, language) else {
            return;
        };
        browser.goto(&format!("http://{addr}/"));
        let russian = language.starts_with("ru");
        let send = wait_for(&browser, "#send");
        assert_eq!(
            browser.text(&send),
            if russian { "Спросить" } else { "Ask" },
            "the UI follows navigator.language"
        );
        // An earlier conversation, so the list has something in it.
        fake.set_answer(Some(if russian { "Да [1]." } else { "Yes [1]." }));
        ask_done(
            &browser,
            if russian {
                "Что такое SIGHUP?"
            } else {
                "What is SIGHUP?"
            },
        );
        browser.click(&wait_for(&browser, "#new-chat"));
        fake.set_answer(Some(if russian { ANSWER_RU } else { ANSWER_EN }));
        let card = ask_done(
            &browser,
            if russian {
                "Как перезагрузить воркеров без простоя?"
            } else {
                "How do I reload the workers without downtime?"
            },
        );
        let answer = browser.find_in(&card, ".answer").expect(".answer");
        assert!(browser.find_in(&answer, "h5").is_some(), "a heading");
        assert_eq!(browser.find_all_in(&answer, "ol > li").len(), 3, "a list");
        assert!(
            browser.find_in(&answer, "pre code").is_some(),
            "a code block"
        );
        assert!(
            browser.find_all_in(&answer, "button.cite").len() >= 3,
            "citations"
        );
        let titles = source_titles(&browser, &card);
        assert!(!titles.is_empty(), "sources");
        // The question at the top, the answer and its sources below it.
        browser.execute(
            "const turn = document.querySelector('#log .turn:last-child');
             window.scrollTo(0, turn.getBoundingClientRect().top + scrollY - 64);",
            &[],
        );
        let png = screenshot(&browser, size, &format!("page-{name}"));
        if bless {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/screenshots");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
        }
    }
}
