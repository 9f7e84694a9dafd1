//! Tests of loading and chunking, on real files in temporary folders.

use std::fs;
use std::path::{Path, PathBuf};

use super::*;
use crate::config::RagConfig;

fn rag_config(chunk_size: usize, chunk_overlap: usize) -> RagConfig {
    RagConfig {
        chunk_size,
        chunk_overlap,
        top_k: 5,
        max_question_chars: 2000,
        max_history_turns: 20,
        max_history_chars: 16_000,
        rewrite_timeout: std::time::Duration::from_secs(5),
        docs_dir: PathBuf::from("docs"),
        ingest_docs_on_first_run: false,
        extract_timeout: std::time::Duration::from_secs(60),
        extract_cpu: std::time::Duration::from_secs(30),
        extract_memory: 1 << 30,
        extract_max_text: 16 << 20,
    }
}

// The parsers in this process: a unit-test binary has no `ragpool extract` to run (the
// sandboxed path is tested end to end in tests/it/hostile_docs.rs).
fn load_file(path: &Path) -> Result<LoadedDocument, IngestError> {
    Extractor::in_process().load_file(path)
}

fn load_bytes(
    name: &str,
    bytes: &[u8],
    content_type: Option<&str>,
) -> Result<LoadedDocument, IngestError> {
    Extractor::in_process().load_bytes(name, bytes, content_type)
}

fn load_path(path: &Path) -> Result<Vec<Result<LoadedDocument, IngestError>>, IngestError> {
    Extractor::in_process().load_path(path)
}

fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(&path, contents).unwrap();
    path
}

/// A one-page PDF whose text layer shows `lines` in Helvetica, with `/Title` in its info
/// dictionary when given. Offsets in the cross-reference table are computed, so it is valid.
fn tiny_pdf(lines: &[&str], title: Option<&str>) -> Vec<u8> {
    let mut content = String::from("BT /F1 18 Tf 72 720 Td 22 TL\n");
    for line in lines {
        content.push_str(&format!("({line}) Tj T*\n"));
    }
    content.push_str("ET\n");
    let info = match title {
        Some(t) => format!("<< /Title ({t}) /Producer (ragpool tests) >>"),
        None => "<< /Producer (ragpool tests) >>".to_string(),
    };
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R \
         /Resources << /Font << /F1 5 0 R >> >> >>"
            .to_string(),
        format!(
            "<< /Length {} >>\nstream\n{content}endstream",
            content.len()
        ),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"
            .to_string(),
        info,
    ];
    let mut pdf = b"%PDF-1.4\n%\xE2\xE3\xCF\xD3\n".to_vec();
    let mut offsets = Vec::new();
    for (i, body) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend_from_slice(format!("{} 0 obj\n{body}\nendobj\n", i + 1).as_bytes());
    }
    let xref = pdf.len();
    let mut table = format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1);
    for offset in offsets {
        table.push_str(&format!("{offset:010} 00000 n \n"));
    }
    table.push_str(&format!(
        "trailer\n<< /Size {} /Root 1 0 R /Info 6 0 R >>\nstartxref\n{xref}\n%%EOF\n",
        objects.len() + 1
    ));
    pdf.extend_from_slice(table.as_bytes());
    pdf
}

fn sources(results: &[Result<LoadedDocument, IngestError>], root: &Path) -> Vec<String> {
    let root = format!("{}/", root.display());
    results
        .iter()
        .map(|r| match r {
            Ok(doc) => doc.source.replacen(&root, "", 1),
            Err(e) => format!("error: {}", e.to_string().replacen(&root, "", 1)),
        })
        .collect()
}

// ----- formats ---------------------------------------------------------------------------------

#[test]
fn markdown_file_title_is_first_heading_and_line_endings_are_normalised() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "signals.md",
        "\u{FEFF}Intro line\r\n\r\n```sh\r\n# not a heading\r\n```\r\n# Signals  ##\r\nSend HUP.\rDone.\r\n",
    );
    let doc = load_file(&path).unwrap();
    assert_eq!(doc.format, Format::Markdown);
    assert_eq!(doc.title, "Signals");
    assert_eq!(doc.source, path.to_string_lossy());
    assert_eq!(
        doc.text,
        "Intro line\n\n```sh\n# not a heading\n```\n# Signals  ##\nSend HUP.\nDone.\n"
    );
}

#[test]
fn markdown_without_heading_is_titled_by_its_file_stem() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "Tuning.MARKDOWN",
        "## Only a subheading\n\ntext\n",
    );
    let doc = load_file(&path).unwrap();
    assert_eq!(doc.format, Format::Markdown);
    assert_eq!(doc.title, "Tuning");
}

#[test]
fn russian_text_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let text = "Как перезагрузить воркеры?\n\nОтправьте сигнал HUP мастеру: `kill -HUP <pid>`.\nЁлка, щётка, «кавычки» — тире.\n";
    let path = write(dir.path(), "заметки.txt", text);
    let doc = load_file(&path).unwrap();
    assert_eq!(doc.format, Format::Text);
    assert_eq!(doc.text, text);
    assert_eq!(doc.title, "заметки");

    let md = write(dir.path(), "сигналы.md", format!("# Сигналы\n\n{text}"));
    assert_eq!(load_file(&md).unwrap().title, "Сигналы");

    let html = write(
        dir.path(),
        "страница.html",
        "<html><head><meta charset=utf-8><title>Перезагрузка</title></head>\
         <body><p>Как перезагрузить воркеры?</p></body></html>",
    );
    let doc = load_file(&html).unwrap();
    assert_eq!(doc.title, "Перезагрузка");
    assert_eq!(doc.text, "Как перезагрузить воркеры?");

    let doc = from_text("Воркеры", text).unwrap();
    assert_eq!((doc.source.as_str(), doc.text.as_str()), ("Воркеры", text));
}

#[test]
fn html_is_text_without_scripts_styles_or_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "guide.HTM",
        "<!doctype html><html><head><title>Ops &amp; Signals</title>\
         <style>p { color: red }</style><script>var secret = 1;</script></head>\
         <body><h1>Reloading</h1><p>Send <b>HUP</b> to the <a href=\"/m\">master</a>.</p>\
         <script>alert('x')</script><ul><li>TERM</li><li>INT</li></ul></body></html>",
    );
    let doc = load_file(&path).unwrap();
    assert_eq!(doc.format, Format::Html);
    assert_eq!(doc.title, "Ops & Signals");
    assert!(doc.text.contains("Reloading"), "{:?}", doc.text);
    assert!(
        doc.text.contains("Send HUP to the master."),
        "{:?}",
        doc.text
    );
    assert!(doc.text.contains("TERM\nINT"), "{:?}", doc.text);
    for noise in ["color", "secret", "alert", "Ops &"] {
        assert!(!doc.text.contains(noise), "{noise} in {:?}", doc.text);
    }
}

#[test]
fn html_without_title_uses_first_h1() {
    let doc = load_bytes(
        "page.html",
        b"<body><H1 class=\"x\">Tuning <em>workers</em></H1><p>One per core.</p></body>",
        None,
    )
    .unwrap();
    assert_eq!(doc.title, "Tuning workers");
}

#[test]
fn pdf_text_layer_and_title_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = tiny_pdf(
        &["Reload the workers with HUP.", "Stop them with TERM."],
        Some("Operator Manual"),
    );
    let path = write(dir.path(), "manual.pdf", &bytes);
    let doc = load_file(&path).unwrap();
    assert_eq!(doc.format, Format::Pdf);
    assert_eq!(doc.title, "Operator Manual");
    assert!(
        doc.text.contains("Reload the workers with HUP."),
        "{:?}",
        doc.text
    );
    assert!(doc.text.contains("Stop them with TERM."), "{:?}", doc.text);

    let untitled = load_bytes("report.pdf", &tiny_pdf(&["Some text."], None), None).unwrap();
    assert_eq!(untitled.title, "report");
    assert_eq!(untitled.source, "report.pdf");
}

#[test]
fn pdf_without_text_layer_says_to_run_ocr() {
    let err = load_bytes("scan.pdf", &tiny_pdf(&[], None), None).unwrap_err();
    assert!(matches!(err, IngestError::NoTextLayer { .. }), "{err}");
    let message = err.to_string();
    assert!(message.starts_with("scan.pdf: "), "{message}");
    assert!(message.contains("OCR"), "{message}");
}

#[test]
fn broken_pdf_is_an_error_not_a_panic() {
    for bytes in [
        b"%PDF-1.4\nthis is not a PDF at all".to_vec(),
        tiny_pdf(&["x"], None)[..200].to_vec(),
    ] {
        let err = load_bytes("broken.pdf", &bytes, Some("application/pdf")).unwrap_err();
        assert!(
            matches!(
                err,
                IngestError::Malformed {
                    format: Format::Pdf,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().starts_with("broken.pdf: "), "{err}");
    }
}

// ----- errors ----------------------------------------------------------------------------------

#[test]
fn unsupported_type_names_the_file_and_lists_supported_ones() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "report.docx", "PK");
    let err = load_file(&path).unwrap_err();
    assert!(matches!(err, IngestError::Unsupported { .. }));
    let message = err.to_string();
    assert!(message.contains("report.docx"), "{message}");
    assert!(message.contains("extension .docx"), "{message}");
    for supported in [".md", ".markdown", ".txt", ".html", ".htm", ".pdf"] {
        assert!(message.contains(supported), "{supported}: {message}");
    }

    let err = load_bytes("blob", b"x", Some("application/octet-stream")).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("no extension, content type application/octet-stream"),
        "{message}"
    );
}

#[test]
fn legacy_encodings_are_refused_with_the_offset() {
    // "Привет" in Windows-1251, after three ASCII bytes.
    let bytes = b"ok \xCF\xF0\xE8\xE2\xE5\xF2";
    let err = load_bytes("old.txt", bytes, None).unwrap_err();
    assert!(
        matches!(err, IngestError::NotUtf8 { offset: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("save it as UTF-8"), "{err}");
}

#[test]
fn utf16_with_a_byte_order_mark_is_decoded() {
    let mut bytes = vec![0xFF, 0xFE];
    for unit in "# Заметки\r\nтекст".encode_utf16() {
        bytes.extend_from_slice(&unit.to_le_bytes());
    }
    let doc = load_bytes("notes.md", &bytes, None).unwrap();
    assert_eq!(doc.title, "Заметки");
    assert_eq!(doc.text, "# Заметки\nтекст");
}

#[test]
fn empty_documents_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "blank.md", " \n\t\n");
    assert!(matches!(load_file(&path), Err(IngestError::Empty { .. })));
    let err = load_bytes("blank.html", b"<html><script>x()</script></html>", None).unwrap_err();
    assert!(matches!(err, IngestError::Empty { .. }), "{err}");
    assert!(matches!(
        from_text("t", "  "),
        Err(IngestError::Empty { .. })
    ));
}

#[test]
fn too_large_files_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.txt");
    // Sparse: no disk used, and ingest must not read it anyway.
    let file = fs::File::create(&path).unwrap();
    file.set_len(MAX_DOCUMENT_BYTES + 1).unwrap();
    let err = load_file(&path).unwrap_err();
    assert!(matches!(err, IngestError::TooLarge { .. }), "{err}");
    assert!(err.to_string().contains("huge.txt is too large"), "{err}");
}

#[test]
fn uploads_take_the_format_from_the_name_then_the_content_type() {
    let doc = load_bytes("notes.md", b"# Notes\n\ntext", Some("text/plain")).unwrap();
    assert_eq!(
        (doc.format, doc.title.as_str()),
        (Format::Markdown, "Notes")
    );
    let doc = load_bytes("page", b"<p>hi</p>", Some("Text/HTML; charset=utf-8")).unwrap();
    assert_eq!((doc.format, doc.source.as_str()), (Format::Html, "page"));
    let doc = load_bytes("C:\\Users\\me\\readme.txt", b"hello", None).unwrap();
    assert_eq!((doc.format, doc.title.as_str()), (Format::Text, "readme"));
    let doc = load_bytes("", b"# From the heading\n\nbody", Some("text/markdown")).unwrap();
    assert_eq!(doc.source, "From the heading");
}

#[test]
fn json_uploads_are_markdown_known_by_their_title() {
    let doc = from_text("  Reload\n guide ", "Send HUP.\r\n").unwrap();
    assert_eq!(doc.format, Format::Markdown);
    assert_eq!(
        (doc.source.as_str(), doc.title.as_str()),
        ("Reload guide", "Reload guide")
    );
    assert_eq!(doc.text, "Send HUP.\n");
    assert_eq!(from_text("", "# Heading\n\ntext").unwrap().title, "Heading");
    assert!(matches!(
        from_text(" ", "no heading"),
        Err(IngestError::NoTitle)
    ));
}

// ----- folder walks ----------------------------------------------------------------------------

#[test]
fn folder_walk_is_sorted_skips_hidden_and_unsupported_and_reports_per_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(root, "b.md", "# B\n\nbee");
    write(root, "a.txt", "ay");
    write(root, "en/signals.md", "# Signals\n\nHUP");
    write(root, "en/config.md", "# Config\n\nkeys");
    write(root, "ru/empty.md", "\n");
    write(root, "ru/broken.pdf", "%PDF-1.4 nope");
    write(root, "c.html", "<title>C</title><p>see</p>");
    write(root, ".hidden.md", "# Hidden");
    write(root, ".git/HEAD.md", "# Git");
    write(root, "picture.png", [0x89, b'P', b'N', b'G']);
    write(root, "README", "no extension");
    std::os::unix::fs::symlink(root, root.join("loop")).unwrap();

    let results = load_path(root).unwrap();
    let got = sources(&results, root);
    assert_eq!(got.len(), 7, "{got:#?}");
    assert_eq!(
        &got[..5],
        ["a.txt", "b.md", "c.html", "en/config.md", "en/signals.md"]
    );
    assert!(
        got[5].starts_with("error: ru/broken.pdf: cannot extract text"),
        "{got:#?}"
    );
    assert!(
        got[6].starts_with("error: ru/empty.md is empty"),
        "{got:#?}"
    );
    // Deterministic: the same walk gives the same order.
    assert_eq!(sources(&load_path(root).unwrap(), root), got);
}

#[test]
fn folder_walk_sources_join_the_path_as_given() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "docs/en/a.md", "# A\n\ntext");
    let given = dir.path().join("docs");
    let results = load_path(&given).unwrap();
    let doc = results[0].as_ref().unwrap();
    assert_eq!(doc.source, format!("{}/en/a.md", given.display()));
}

#[test]
fn load_path_on_one_file_or_a_missing_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "one.docx", "x");
    let results = load_path(&file).unwrap();
    assert!(matches!(
        results[..],
        [Err(IngestError::Unsupported { .. })]
    ));
    let missing = dir.path().join("nope");
    let err = load_path(&missing).unwrap_err();
    assert!(matches!(err, IngestError::Unreadable { .. }), "{err}");
    assert!(err.to_string().contains("nope"), "{err}");
}

// ----- chunks ----------------------------------------------------------------------------------

fn text_doc(text: &str) -> LoadedDocument {
    LoadedDocument {
        source: "t".into(),
        title: "t".into(),
        text: text.into(),
        format: Format::Text,
    }
}

/// The longest suffix of `a` (on a char boundary) that is also a prefix of `b`, in chars.
fn shared(a: &str, b: &str) -> usize {
    a.char_indices()
        .map(|(i, _)| &a[i..])
        .find(|suffix| b.starts_with(suffix))
        .map_or(0, |s| s.chars().count())
}

#[test]
fn text_chunks_respect_the_size_and_overlap() {
    let text: String = (0..300).map(|i| format!("word{i:04} ")).collect();
    let chunks = chunk(&text_doc(&text), &rag_config(100, 30));
    assert!(chunks.len() > 10, "{chunks:#?}");
    for c in &chunks {
        assert!(c.chars().count() <= 100, "{c:?}");
        assert_eq!(c, c.trim());
    }
    for pair in chunks.windows(2) {
        let overlap = shared(&pair[0], &pair[1]);
        assert!(overlap > 0 && overlap <= 30, "{overlap}: {pair:?}");
    }
    assert!(chunks[0].starts_with("word0000") && chunks.last().unwrap().ends_with("word0299"));

    let no_overlap = chunk(&text_doc(&text), &rag_config(100, 0));
    for pair in no_overlap.windows(2) {
        assert_eq!(shared(&pair[0], &pair[1]), 0, "{pair:?}");
    }
}

#[test]
fn russian_chunks_are_sized_in_characters() {
    let text = "Мастер перезапускает воркер, который упал. ".repeat(40);
    let chunks = chunk(&text_doc(&text), &rag_config(200, 40));
    let longest = chunks.iter().map(|c| c.chars().count()).max().unwrap();
    // Counting bytes (two per Cyrillic letter) would give chunks of at most ~100 characters.
    assert!((150..=200).contains(&longest), "{longest}");
    for c in &chunks {
        assert!(c.starts_with("Мастер") && c.ends_with("упал."), "{c:?}");
    }
}

#[test]
fn markdown_chunks_keep_short_sections_whole() {
    let section = |n: usize, topic: &str| {
        format!(
            "## {topic}\n\n{}\n\n",
            format!("Paragraph {n} explains {topic} in a few plain sentences. ").repeat(4)
        )
    };
    let sections: Vec<String> = ["Reload", "Stop", "Scale", "Logs", "Timeouts", "Sockets"]
        .iter()
        .enumerate()
        .map(|(n, topic)| section(n, topic))
        .collect();
    let text = format!(
        "# Signals\n\nWhat each signal does.\n\n{}",
        sections.concat()
    );
    let doc = from_text("Signals", &text).unwrap();
    let chunks = chunk(&doc, &rag_config(800, 100));
    assert!(chunks.len() >= 2, "{chunks:#?}");
    for c in &chunks {
        assert!(c.chars().count() <= 800, "{c:?}");
    }
    for s in &sections {
        let s = s.trim();
        assert!(
            chunks.iter().any(|c| c.contains(s)),
            "section cut: {s:?}\n{chunks:#?}"
        );
    }
}

#[test]
fn markdown_long_sections_repeat_their_heading() {
    let body: String = (0..40)
        .map(|i| format!("Step {i}: send TTIN to add one worker.\n\n"))
        .collect();
    let text = format!("# Tuning\n\nShort intro.\n\n## Scaling up\n\n{body}## After\n\nDone.\n");
    let doc = from_text("Tuning", &text).unwrap();
    let chunks = chunk(&doc, &rag_config(300, 50));
    assert_eq!(chunks[0], "# Tuning\n\nShort intro.");
    let scaling: Vec<&String> = chunks.iter().filter(|c| c.contains("Step ")).collect();
    assert!(scaling.len() > 2, "{chunks:#?}");
    for c in &scaling {
        assert!(c.starts_with("## Scaling up\n\nStep "), "{c:?}");
        assert!(c.chars().count() <= 300, "{c:?}");
    }
    for i in 0..40 {
        let step = format!("Step {i}: ");
        assert!(scaling.iter().any(|c| c.contains(&step)), "{step} lost");
    }
    assert_eq!(chunks.last().unwrap(), "## After\n\nDone.");
}

#[test]
fn the_title_heading_is_not_repeated_in_every_chunk() {
    let body: String = (0..40)
        .map(|i| format!("Step {i}: send TTIN to add one worker.\n\n"))
        .collect();
    let doc = from_text("Tuning", &format!("# Tuning\n\n{body}")).unwrap();
    let chunks = chunk(&doc, &rag_config(300, 50));
    assert!(chunks.len() > 2, "{chunks:#?}");
    assert!(chunks[0].starts_with("# Tuning\n\nStep 0:"), "{chunks:#?}");
    let titled = chunks.iter().filter(|c| c.contains("Tuning")).count();
    assert_eq!(titled, 1, "the title once, in the first chunk: {chunks:#?}");
    for i in 0..40 {
        let step = format!("Step {i}: ");
        assert!(chunks.iter().any(|c| c.contains(&step)), "{step} lost");
    }
}

#[test]
fn chunks_are_trimmed_and_never_empty() {
    let doc = text_doc("\n\n   first paragraph   \n\n\n\n   second paragraph\n\n   ");
    assert_eq!(
        chunk(&doc, &rag_config(100, 10)),
        ["first paragraph   \n\n\n\n   second paragraph"]
    );
    let chunks = chunk(&doc, &rag_config(20, 5));
    assert_eq!(chunks, ["first paragraph", "second paragraph"]);
}

#[test]
fn markdown_chunks_never_exceed_the_size() {
    let long_heading = format!("## {}", "very long heading words ".repeat(4));
    let code = "```sh\n# a comment, not a heading\nkill -HUP $(cat /run/ragpool.pid)\n```\n\n";
    let body = "A sentence that goes on for a while. ".repeat(12);
    let text = format!("# Doc\n\n{code}{long_heading}\n\n{body}\n\n## Next\n\n{code}{body}");
    let doc = from_text("Doc", &text).unwrap();
    let chunks = chunk(&doc, &rag_config(150, 20));
    for c in &chunks {
        assert!(
            c.chars().count() <= 150,
            "{} chars: {c:?}",
            c.chars().count()
        );
    }
    assert!(
        chunks[0].starts_with("# Doc\n\n```sh\n# a comment"),
        "{chunks:#?}"
    );
    assert!(
        chunks.iter().any(|c| c.starts_with("## very long heading")),
        "{chunks:#?}"
    );
    assert!(
        chunks
            .iter()
            .filter(|c| c.starts_with("## Next\n\n"))
            .count()
            > 2,
        "{chunks:#?}"
    );
}

#[test]
fn text_without_whitespace_is_cut_into_full_chunks_covering_it() {
    // 800 KB with nothing to split on: the case that was quadratic. Every chunk is full-sized
    // (the windows cut at characters), nothing is lost, and consecutive chunks overlap.
    let text = "a".repeat(800_000);
    let chunks = chunk(&text_doc(&text), &rag_config(800, 100));
    assert!(chunks.iter().all(|c| c.chars().count() <= 800));
    let covered: usize = chunks.iter().map(|c| c.len()).sum();
    assert!(covered >= text.len(), "{covered}");
    // Overlap costs at most chunk_overlap per chunk.
    assert!(chunks.len() <= 800_000 / 700 + 2, "{}", chunks.len());
}

#[test]
fn long_prose_chunks_keep_their_overlap_across_windows() {
    let text: String = (0..5000).map(|i| format!("word{i:05} ")).collect();
    let chunks = chunk(&text_doc(&text), &rag_config(100, 30));
    for pair in chunks.windows(2) {
        let overlap = shared(&pair[0], &pair[1]);
        assert!(overlap > 0 && overlap <= 30, "{overlap}: {pair:?}");
    }
    assert!(chunks.last().unwrap().ends_with("word04999"));
}

#[test]
fn deeply_nested_html_is_flattened_and_keeps_its_text() {
    let html = format!(
        "<html><body>{}deep text{}<p>after</p></body></html>",
        "<div>".repeat(100_000),
        "</div>".repeat(100_000)
    );
    let flat = extract::flatten_html(&html, extract::MAX_HTML_DEPTH);
    assert_eq!(flat.matches("<div>").count(), extract::MAX_HTML_DEPTH - 2);
    assert_eq!(
        flat.matches("<div>").count(),
        flat.matches("</div>").count()
    );
    let doc = load_bytes("deep.html", html.as_bytes(), None).unwrap();
    assert!(
        doc.text.contains("deep text") && doc.text.contains("after"),
        "{}",
        doc.text
    );
}

#[test]
fn ordinary_html_is_not_touched_by_the_depth_cap() {
    let html = "<html><head><title>T</title><script>if (a < b) { x('<div>') }</script></head>\
                <body><ul><li>one<li>two</ul><p>a<p>b<p>c<br><img src=x><div class=\"a>b\">d</div>\
                <!-- <div> --></body></html>";
    assert!(matches!(
        extract::flatten_html(html, 4),
        std::borrow::Cow::Borrowed(_)
    ));
    // A thousand unclosed paragraphs are siblings, not a thousand levels.
    let paragraphs = format!("<body>{}</body>", "<p>para".repeat(1000));
    assert!(matches!(
        extract::flatten_html(&paragraphs, 16),
        std::borrow::Cow::Borrowed(_)
    ));
}

#[test]
fn pdf_text_past_the_cap_is_refused_naming_the_limit() {
    let lines: Vec<String> = (0..50)
        .map(|i| format!("Line {i} of a long report."))
        .collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    let extractor = Extractor::InProcess { max_text: 200 };
    let err = extractor
        .load_bytes("long.pdf", &tiny_pdf(&lines, None), None)
        .unwrap_err();
    assert!(
        matches!(err, IngestError::TextTooLarge { limit: 200, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("extract_max_text"), "{err}");
    let err = extractor
        .load_bytes("long.txt", "x".repeat(201).as_bytes(), None)
        .unwrap_err();
    assert!(matches!(err, IngestError::TextTooLarge { .. }), "{err:?}");
}
