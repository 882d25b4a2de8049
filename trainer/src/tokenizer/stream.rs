//! Incremental detokenization for streaming generation. One token can be part of a character
//! (byte-level BPE splits "Ü" into two tokens) and decoders look at neighbours (SentencePiece's
//! leading "▁" becomes a space only after the first word), so text is produced by decoding a
//! short window of recent ids and emitting what it adds beyond the previous window, and only once
//! it no longer ends in an incomplete UTF-8 sequence (decoded as U+FFFD). This is the algorithm of
//! the tokenizers crate's `DecodeStream`, which does the work.

use anyhow::{anyhow, Result};
use tokenizers::{
    DecodeStream, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
    PreTokenizerWrapper,
};

type InnerStream<'a> = DecodeStream<
    'a,
    ModelWrapper,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// Turns ids into text as they arrive; made by [`super::Tokenizer::stream_decoder`].
pub struct StreamDecoder<'a> {
    inner: InnerStream<'a>,
}

impl<'a> StreamDecoder<'a> {
    pub(super) fn new(inner: InnerStream<'a>) -> Self {
        Self { inner }
    }

    /// Feeds one id; returns the text it completes, or `None` while a character is still partial.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.inner
            .step(id)
            .map_err(|err| anyhow!("cannot decode token id {id} while streaming: {err}"))
    }
}
