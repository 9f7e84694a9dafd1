//! Test support shared by the NDJSON and SSE decoders' tests: feeding input in pieces and
//! checking that every way of cutting it decodes to the same events.

use super::ndjson::NdjsonDecoder;
use super::sse::SseDecoder;
use super::{ChatEvent, DecodeError};

/// The incremental decoder interface both formats share.
pub(crate) trait ChunkDecoder: Default {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<ChatEvent>) -> Result<(), DecodeError>;
    fn finish(&mut self, out: &mut Vec<ChatEvent>) -> Result<(), DecodeError>;
    fn is_done(&self) -> bool;
}

macro_rules! chunk_decoder {
    ($decoder:ty) => {
        impl ChunkDecoder for $decoder {
            fn feed(&mut self, chunk: &[u8], out: &mut Vec<ChatEvent>) -> Result<(), DecodeError> {
                <$decoder>::feed(self, chunk, out)
            }
            fn finish(&mut self, out: &mut Vec<ChatEvent>) -> Result<(), DecodeError> {
                <$decoder>::finish(self, out)
            }
            fn is_done(&self) -> bool {
                <$decoder>::is_done(self)
            }
        }
    };
}
chunk_decoder!(NdjsonDecoder);
chunk_decoder!(SseDecoder);

/// Feeds `chunks` to a fresh decoder, then finishes it: (events or the first error, done?).
pub(crate) fn decode<D: ChunkDecoder>(
    chunks: &[&[u8]],
) -> (Result<Vec<ChatEvent>, DecodeError>, bool) {
    let mut decoder = D::default();
    let mut out = Vec::new();
    for chunk in chunks {
        if let Err(e) = decoder.feed(chunk, &mut out) {
            return (Err(e), decoder.is_done());
        }
    }
    let result = decoder.finish(&mut out).map(|()| out);
    (result, decoder.is_done())
}

/// Cut `bytes` in three at every first point and every `step`-th second point, and into single
/// bytes: each way must give `expected` and end done.
pub(crate) fn assert_same_at_every_split<D: ChunkDecoder>(
    bytes: &[u8],
    expected: &[ChatEvent],
    step: usize,
) {
    for i in 0..=bytes.len() {
        for j in (i..=bytes.len()).step_by(step) {
            let (events, done) = decode::<D>(&[&bytes[..i], &bytes[i..j], &bytes[j..]]);
            assert_eq!(events.as_deref(), Ok(expected), "split at {i}, {j}");
            assert!(done);
        }
    }
    let one_byte_each: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(decode::<D>(&one_byte_each).0.as_deref(), Ok(expected));
}
