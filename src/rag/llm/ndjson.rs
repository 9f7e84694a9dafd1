//! Ollama's streaming chat response (`POST /api/chat`, `"stream": true`): one JSON object per
//! line, `{"message":{"content":"..."},"done":false}` ... `{"done":true,"done_reason":"stop"}`,
//! or `{"error":"..."}`. A thinking model's reasoning comes in `message.thinking` (with
//! `content: ""`); the final line may still carry text (a cut-off answer's last piece, with
//! `done_reason: "length"`).
//!
//! Owns decoding only; the socket, timeouts and the URL in errors are `generate`'s.

use super::lines::LineSplitter;
use super::{ChatEvent, DecodeError, Finish};

#[derive(Debug, Default)]
pub(crate) struct NdjsonDecoder {
    lines: LineSplitter,
    /// `"done": true` was seen; later bytes are ignored.
    done: bool,
}

impl NdjsonDecoder {
    /// Decodes the lines completed by `chunk`, appending their events to `out`.
    pub(crate) fn feed(
        &mut self,
        chunk: &[u8],
        out: &mut Vec<ChatEvent>,
    ) -> Result<(), DecodeError> {
        let done = &mut self.done;
        self.lines
            .feed(chunk, &mut |line| decode_line(line, done, out))
    }

    /// End of input: a last line without a newline still counts.
    pub(crate) fn finish(&mut self, out: &mut Vec<ChatEvent>) -> Result<(), DecodeError> {
        let done = &mut self.done;
        self.lines.finish(&mut |line| decode_line(line, done, out))
    }

    #[cfg(test)]
    pub(crate) fn is_done(&self) -> bool {
        self.done
    }
}

fn decode_line(line: &str, done: &mut bool, out: &mut Vec<ChatEvent>) -> Result<(), DecodeError> {
    if *done || line.trim().is_empty() {
        return Ok(());
    }
    let json: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| DecodeError::Malformed(format!("a stream line that is not JSON ({e})")))?;
    if json.get("error").is_some_and(|e| !e.is_null()) {
        let message = super::json_error_message(&json).unwrap_or_default();
        return Err(DecodeError::Upstream(message));
    }
    let text = |pointer: &str| {
        json.pointer(pointer)
            .and_then(|c| c.as_str())
            .filter(|c| !c.is_empty())
            .map(str::to_string)
    };
    if let Some(thinking) = text("/message/thinking") {
        out.push(ChatEvent::Reasoning(thinking));
    }
    if let Some(content) = text("/message/content") {
        out.push(ChatEvent::Token(content));
    }
    if json.get("done").and_then(|d| d.as_bool()).unwrap_or(false) {
        *done = true;
        let reason = json.get("done_reason").and_then(|r| r.as_str());
        out.push(ChatEvent::Done(Finish::from_reason(reason)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\"Привет\"},\"done\":false}\n",
        "{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\", мир\"},\"done\":false}\r\n",
        "\n",
        "{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\" [1] ✓\"},\"done\":false}\r\n",
        "{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\"\"},\"done_reason\":\"stop\",\"done\":true}\n",
    );

    fn decode(chunks: &[&[u8]]) -> (Result<Vec<ChatEvent>, DecodeError>, bool) {
        super::super::decode_tests::decode::<NdjsonDecoder>(chunks)
    }

    fn expected() -> Vec<ChatEvent> {
        vec![
            ChatEvent::Token("Привет".into()),
            ChatEvent::Token(", мир".into()),
            ChatEvent::Token(" [1] ✓".into()),
            ChatEvent::Done(Finish::Stop),
        ]
    }

    #[test]
    fn same_events_at_every_split_point() {
        super::super::decode_tests::assert_same_at_every_split::<NdjsonDecoder>(
            STREAM.as_bytes(),
            &expected(),
            7,
        );
    }

    #[test]
    fn last_line_without_newline_counts() {
        let (events, done) = decode(&[
            br#"{"message":{"content":"a"},"done":false}"#,
            b"\n{\"done\":true}",
        ]);
        assert_eq!(
            events,
            Ok(vec![
                ChatEvent::Token("a".into()),
                ChatEvent::Done(Finish::Stop)
            ])
        );
        assert!(done);
    }

    #[test]
    fn thinking_comes_apart_from_the_answer_and_a_cut_keeps_its_last_piece() {
        let stream = concat!(
            "{\"message\":{\"role\":\"assistant\",\"content\":\"\",\"thinking\":\"Hmm, \"},\"done\":false}\n",
            "{\"message\":{\"role\":\"assistant\",\"content\":\"\",\"thinking\":\"HUP.\"},\"done\":false}\n",
            "{\"message\":{\"role\":\"assistant\",\"content\":\"Send \"},\"done\":false}\n",
            "{\"message\":{\"role\":\"assistant\",\"content\":\"HUP\"},\"done\":true,\"done_reason\":\"length\"}\n",
        );
        super::super::decode_tests::assert_same_at_every_split::<NdjsonDecoder>(
            stream.as_bytes(),
            &[
                ChatEvent::Reasoning("Hmm, ".into()),
                ChatEvent::Reasoning("HUP.".into()),
                ChatEvent::Token("Send ".into()),
                ChatEvent::Token("HUP".into()),
                ChatEvent::Done(Finish::Length),
            ],
            11,
        );
    }

    #[test]
    fn error_object_mid_stream_is_upstream_error() {
        let input =
            b"{\"message\":{\"content\":\"a\"},\"done\":false}\n{\"error\":\"out of memory\"}\n";
        let mut decoder = NdjsonDecoder::default();
        let mut out = Vec::new();
        let err = decoder.feed(input, &mut out).expect_err("error line");
        assert_eq!(
            out,
            vec![ChatEvent::Token("a".into())],
            "tokens before the error are kept"
        );
        assert_eq!(err, DecodeError::Upstream("out of memory".into()));
    }

    #[test]
    fn truncated_stream_is_not_done() {
        let (events, done) = decode(&[b"{\"message\":{\"content\":\"a\"},\"done\":false}\n"]);
        assert_eq!(events, Ok(vec![ChatEvent::Token("a".into())]));
        assert!(!done);
    }

    #[test]
    fn garbage_is_malformed() {
        let (events, _) = decode(&[b"<html>502 Bad Gateway</html>\n"]);
        assert!(matches!(events, Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn bytes_after_done_are_ignored() {
        let (events, _) = decode(&[b"{\"done\":true}\nnot json\n"]);
        assert_eq!(events, Ok(vec![ChatEvent::Done(Finish::Stop)]));
    }
}
