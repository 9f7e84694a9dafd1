//! OpenAI's streaming chat response (`POST /v1/chat/completions`, `"stream": true`) as
//! server-sent events: `data: {json}` events whose `choices[0].delta.content` is the next
//! piece of the answer, ending with `data: [DONE]`. Reasoning models send their thinking in
//! `delta.reasoning_content` (llama.cpp, vLLM, DeepSeek) or `delta.reasoning`; the chunk that
//! ends the answer has `choices[0].finish_reason` (`"stop"`, `"length"`, ...).
//!
//! Owns event framing (the SSE rules: `field: value` lines, `:` comments, multi-line `data`,
//! a blank line ends an event) and the chunk JSON. Errors come either as a JSON `{"error":..}`
//! event or, from llama.cpp's server, as an `error: {json}` line; both end the stream.

use super::lines::LineSplitter;
use super::{ChatEvent, DecodeError, Finish};

#[derive(Debug, Default)]
pub(crate) struct SseDecoder {
    lines: LineSplitter,
    event: PendingEvent,
}

#[derive(Debug, Default)]
struct PendingEvent {
    /// `data` lines of the event being read, joined with `\n`.
    data: String,
    /// Whether any `data` line was seen (an event with `data:` and nothing after still counts).
    has_data: bool,
    /// The `event:` field, if any.
    kind: String,
    /// `data: [DONE]` was seen; later bytes are ignored.
    done: bool,
    /// The last `finish_reason` seen, reported with `[DONE]`.
    finish: Option<String>,
}

impl SseDecoder {
    /// Decodes the events completed by `chunk`, appending them to `out`.
    pub(crate) fn feed(
        &mut self,
        chunk: &[u8],
        out: &mut Vec<ChatEvent>,
    ) -> Result<(), DecodeError> {
        let event = &mut self.event;
        self.lines.feed(chunk, &mut |line| event.line(line, out))
    }

    /// End of input. Strict SSE drops an event that no blank line ended; we dispatch it, since a
    /// server that closes right after `data: [DONE]\n` has still finished.
    pub(crate) fn finish(&mut self, out: &mut Vec<ChatEvent>) -> Result<(), DecodeError> {
        let event = &mut self.event;
        self.lines.finish(&mut |line| event.line(line, out))?;
        self.event.dispatch(out)
    }

    #[cfg(test)]
    pub(crate) fn is_done(&self) -> bool {
        self.event.done
    }
}

impl PendingEvent {
    fn line(&mut self, line: &str, out: &mut Vec<ChatEvent>) -> Result<(), DecodeError> {
        if self.done {
            return Ok(());
        }
        if line.is_empty() {
            return self.dispatch(out);
        }
        if line.starts_with(':') {
            return Ok(()); // a comment (keep-alive)
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.kind = value.to_string(),
            // llama.cpp's server reports a failure mid-stream as `error: {json}`.
            "error" => return Err(upstream_error(value)),
            _ => {} // id, retry, and unknown fields are ignored, as the SSE rules say
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<ChatEvent>) -> Result<(), DecodeError> {
        let data = std::mem::take(&mut self.data);
        let kind = std::mem::take(&mut self.kind);
        if !std::mem::take(&mut self.has_data) {
            return Ok(());
        }
        if kind == "error" {
            return Err(upstream_error(&data));
        }
        if data.trim() == "[DONE]" {
            self.done = true;
            out.push(ChatEvent::Done(Finish::from_reason(self.finish.as_deref())));
            return Ok(());
        }
        let json: serde_json::Value = serde_json::from_str(&data).map_err(|e| {
            DecodeError::Malformed(format!("an event whose data is not JSON ({e})"))
        })?;
        if json.get("error").is_some_and(|e| !e.is_null()) {
            return Err(upstream_error(&data));
        }
        let text = |pointer: &str| {
            json.pointer(pointer)
                .and_then(|c| c.as_str())
                .filter(|c| !c.is_empty())
                .map(str::to_string)
        };
        let reasoning = text("/choices/0/delta/reasoning_content")
            .or_else(|| text("/choices/0/delta/reasoning"));
        if let Some(reasoning) = reasoning {
            out.push(ChatEvent::Reasoning(reasoning));
        }
        if let Some(content) = text("/choices/0/delta/content") {
            out.push(ChatEvent::Token(content));
        }
        if let Some(reason) = text("/choices/0/finish_reason") {
            self.finish = Some(reason);
        }
        Ok(())
    }
}

fn upstream_error(data: &str) -> DecodeError {
    let message = match serde_json::from_str::<serde_json::Value>(data) {
        Ok(json) => super::json_error_message(&json),
        Err(_) => None,
    };
    DecodeError::Upstream(message.unwrap_or_else(|| data.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like llama.cpp's and OpenAI's output, with a role-only first delta, a keep-alive
    /// comment, CRLF and LF endings, and a final chunk with no choices.
    const STREAM: &str = concat!(
        ": ping\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Привет\"}}]}\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\", мир\"}}]}\n\n",
        "id: 7\r\nevent: message\r\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" [2] ✓\"}}]}\r\n\r\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"choices\":[],\"usage\":{\"total_tokens\":9}}\n\n",
        "data: [DONE]\n\n",
    );

    fn decode(chunks: &[&[u8]]) -> (Result<Vec<ChatEvent>, DecodeError>, bool) {
        super::super::decode_tests::decode::<SseDecoder>(chunks)
    }

    fn expected() -> Vec<ChatEvent> {
        vec![
            ChatEvent::Token("Привет".into()),
            ChatEvent::Token(", мир".into()),
            ChatEvent::Token(" [2] ✓".into()),
            ChatEvent::Done(Finish::Stop),
        ]
    }

    #[test]
    fn same_events_at_every_split_point() {
        super::super::decode_tests::assert_same_at_every_split::<SseDecoder>(
            STREAM.as_bytes(),
            &expected(),
            5,
        );
    }

    #[test]
    fn bare_cr_line_endings() {
        let input = "data: {\"choices\":[{\"delta\":{\"content\":\"да\"}}]}\r\rdata: [DONE]\r\r";
        let bytes = input.as_bytes();
        for i in 0..=bytes.len() {
            let (events, done) = decode(&[&bytes[..i], &bytes[i..]]);
            assert_eq!(
                events,
                Ok(vec![
                    ChatEvent::Token("да".into()),
                    ChatEvent::Done(Finish::Stop)
                ]),
                "split at {i}"
            );
            assert!(done);
        }
    }

    #[test]
    fn multi_line_data_is_joined() {
        let input =
            b"data: {\"choices\":[{\"delta\":\ndata: {\"content\":\"x\"}}]}\n\ndata: [DONE]\n\n";
        assert_eq!(
            decode(&[input]).0,
            Ok(vec![
                ChatEvent::Token("x".into()),
                ChatEvent::Done(Finish::Stop)
            ])
        );
    }

    #[test]
    fn done_without_trailing_blank_line_still_finishes() {
        let (events, done) =
            decode(&[b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\ndata: [DONE]\n"]);
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
    fn reasoning_content_and_a_length_finish() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"reasoning_content\":\"Let me think.\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"reasoning\":\" Ok.\",\"content\":null}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\"Paris\"},\"finish_reason\":null}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\" is\"},\"finish_reason\":\"length\"}]}\n\n",
            "data: [DONE]\n\n",
        );
        super::super::decode_tests::assert_same_at_every_split::<SseDecoder>(
            stream.as_bytes(),
            &[
                ChatEvent::Reasoning("Let me think.".into()),
                ChatEvent::Reasoning(" Ok.".into()),
                ChatEvent::Token("Paris".into()),
                ChatEvent::Token(" is".into()),
                ChatEvent::Done(Finish::Length),
            ],
            13,
        );
    }

    #[test]
    fn truncated_stream_is_not_done() {
        let (events, done) =
            decode(&[b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"]);
        assert_eq!(events, Ok(vec![ChatEvent::Token("a".into())]));
        assert!(!done);
    }

    #[test]
    fn error_shapes_mid_stream() {
        let token = "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n";
        let cases = [
            (
                "data: {\"error\":{\"message\":\"context full\",\"code\":500}}\n\n",
                "context full",
            ),
            (
                "error: {\"code\":500,\"message\":\"slot failed\",\"type\":\"server_error\"}\n\n",
                "slot failed",
            ),
            (
                "event: error\ndata: {\"message\":\"overloaded\"}\n\n",
                "overloaded",
            ),
        ];
        for (error, message) in cases {
            let input = format!("{token}{error}");
            let mut decoder = SseDecoder::default();
            let mut out = Vec::new();
            let err = decoder
                .feed(input.as_bytes(), &mut out)
                .expect_err("error event");
            assert_eq!(out, vec![ChatEvent::Token("a".into())]);
            assert_eq!(err, DecodeError::Upstream(message.into()));
        }
    }

    #[test]
    fn non_json_data_is_malformed() {
        let (events, _) = decode(&[b"data: <html>\n\n"]);
        assert!(matches!(events, Err(DecodeError::Malformed(_))));
    }
}
