//! Bytes -> text lines, fed chunk by chunk as they come off the socket.
//!
//! Owns line framing only: a line may be split anywhere between chunks (inside a multi-byte
//! UTF-8 character, between `\r` and `\n`), so bytes are kept until a terminator arrives and
//! only complete lines are decoded as UTF-8. Terminators are `\n`, `\r\n` and a lone `\r`
//! (what server-sent events allow). Knows nothing about JSON or events.

use super::DecodeError;

/// A line longer than this is not a protocol we speak (guards memory against a broken peer).
pub(crate) const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, Default)]
pub(crate) struct LineSplitter {
    /// Bytes of the current, unterminated line.
    partial: Vec<u8>,
    /// The previous chunk ended in `\r`: a `\n` starting the next one belongs to it.
    skip_lf: bool,
}

impl LineSplitter {
    /// Calls `on_line` for every line completed by `chunk`, without its terminator.
    pub(crate) fn feed(
        &mut self,
        chunk: &[u8],
        on_line: &mut dyn FnMut(&str) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        let mut rest = chunk;
        if self.skip_lf && !rest.is_empty() {
            self.skip_lf = false;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.partial.extend_from_slice(&rest[..end]);
            let was_cr = rest[end] == b'\r';
            rest = &rest[end + 1..];
            if was_cr {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    Some(_) => {}
                    None => self.skip_lf = true,
                }
            }
            self.emit(on_line)?;
        }
        self.partial.extend_from_slice(rest);
        if self.partial.len() > MAX_LINE_BYTES {
            return Err(DecodeError::Malformed(format!(
                "a line longer than {MAX_LINE_BYTES} bytes"
            )));
        }
        Ok(())
    }

    /// At end of input: the last line, if it had no terminator.
    pub(crate) fn finish(
        &mut self,
        on_line: &mut dyn FnMut(&str) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        if self.partial.is_empty() {
            return Ok(());
        }
        self.emit(on_line)
    }

    fn emit(
        &mut self,
        on_line: &mut dyn FnMut(&str) -> Result<(), DecodeError>,
    ) -> Result<(), DecodeError> {
        let result = match std::str::from_utf8(&self.partial) {
            Ok(line) => on_line(line),
            Err(e) => Err(DecodeError::Malformed(format!(
                "a line that is not UTF-8 ({e})"
            ))),
        };
        self.partial.clear();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(chunks: &[&[u8]]) -> Vec<String> {
        let mut splitter = LineSplitter::default();
        let mut lines = Vec::new();
        for chunk in chunks {
            splitter
                .feed(chunk, &mut |l| {
                    lines.push(l.to_string());
                    Ok(())
                })
                .expect("valid input");
        }
        splitter
            .finish(&mut |l| {
                lines.push(l.to_string());
                Ok(())
            })
            .expect("valid input");
        lines
    }

    #[test]
    fn every_terminator_and_every_split_point() {
        let input = "один\r\nдва\nтри\rчетыре\r\n\r\nпять".as_bytes();
        let expected = ["один", "два", "три", "четыре", "", "пять"];
        assert_eq!(split_all(&[input]), expected);
        for i in 0..=input.len() {
            for j in i..=input.len() {
                assert_eq!(
                    split_all(&[&input[..i], &input[i..j], &input[j..]]),
                    expected,
                    "split at {i}, {j}"
                );
            }
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(split_all(&bytes), expected);
    }

    #[test]
    fn invalid_utf8_is_malformed() {
        let mut splitter = LineSplitter::default();
        let err = splitter
            .feed(b"\xff\xfe\n", &mut |_| Ok(()))
            .expect_err("not UTF-8");
        assert!(matches!(err, DecodeError::Malformed(_)));
    }

    #[test]
    fn overlong_line_is_refused() {
        let mut splitter = LineSplitter::default();
        let big = vec![b'a'; MAX_LINE_BYTES + 1];
        assert!(splitter.feed(&big, &mut |_| Ok(())).is_err());
    }
}
