//! tokenizer: text ↔ token ids for generation.
//!
//! [`Tokenizer`] is a closed set of tokenizers:
//! - `Bytes`, the built-in byte-level tokenizer used by the tiny examples (any vocabulary of at least
//!   256 tokens): a token id is a byte value. Encoding never fails and only produces ids below 256.
//!   Decoding turns ids back into bytes and the bytes into text lossily: an invalid or incomplete UTF-8
//!   sequence becomes `U+FFFD` (`�`), and so does every id ≥ 256 (the byte tokenizer has no such token;
//!   a model with a larger vocabulary may still produce one, and it is shown rather than hidden).
//! - `HuggingFace`, a Hugging Face `tokenizer.json` (BPE, WordPiece, WordLevel or Unigram model) loaded
//!   with the `tokenizers` crate. Encoding adds no special tokens (a prompt is expected to carry its own
//!   template); decoding keeps special tokens, so `decode(encode(text)) == text` for texts the
//!   tokenizer's normaliser leaves unchanged. Ids the tokenizer does not know are skipped, as the
//!   `tokenizers` crate does.
//!
//! [`StreamDecoder`] decodes ids one at a time as a model generates them and returns only text that is
//! complete: the concatenation of everything it returns (including [`StreamDecoder::finish`]) equals
//! [`Tokenizer::decode`] of all the ids. For `Bytes` it holds back the bytes of an incomplete UTF-8
//! sequence; for `HuggingFace` it decodes a short window of the recent ids and holds back text that
//! ends in `�` (a token that is only part of a character, as byte-level BPE produces).
//!
//! Loading errors are clear ([`TokenizerError`]): a missing or unreadable file, a file that is not
//! JSON, a model type the `tokenizers` crate does not support, or JSON it rejects.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// The vocabulary size of the byte tokenizer.
pub const BYTE_VOCAB: usize = 256;

/// The model types a Hugging Face `tokenizer.json` may name.
const HF_MODELS: [&str; 4] = ["BPE", "WordPiece", "WordLevel", "Unigram"];

/// A tokenizer: the built-in byte tokenizer or a Hugging Face one.
#[derive(Clone, Debug)]
pub enum Tokenizer {
    /// Byte-level: token id = byte value.
    Bytes,
    /// A Hugging Face `tokenizer.json` (boxed: it is much larger than the other variant).
    HuggingFace(Box<tokenizers::Tokenizer>),
}

/// Why a tokenizer could not be loaded, or could not encode or decode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerError {
    /// The file is missing or cannot be read.
    Io { source: String, message: String },
    /// The file is not valid JSON.
    InvalidJson { source: String, message: String },
    /// The JSON names a tokenizer model this runtime cannot load.
    UnsupportedModel { source: String, model: String },
    /// The JSON is not a tokenizer the `tokenizers` crate accepts.
    Invalid { source: String, message: String },
    /// Encoding failed.
    Encode(String),
    /// Decoding failed.
    Decode(String),
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerError::Io { source, message } => write!(f, "cannot read tokenizer `{source}`: {message}"),
            TokenizerError::InvalidJson { source, message } => {
                write!(f, "tokenizer `{source}` is not valid JSON: {message}")
            }
            TokenizerError::UnsupportedModel { source, model } => {
                write!(f, "tokenizer `{source}` has an unsupported model {model}; supported: {}", HF_MODELS.join(", "))
            }
            TokenizerError::Invalid { source, message } => {
                write!(f, "tokenizer `{source}` is not a valid Hugging Face tokenizer.json: {message}")
            }
            TokenizerError::Encode(message) => write!(f, "cannot encode text: {message}"),
            TokenizerError::Decode(message) => write!(f, "cannot decode tokens: {message}"),
        }
    }
}

impl std::error::Error for TokenizerError {}

impl Tokenizer {
    /// The built-in byte tokenizer.
    pub fn bytes() -> Tokenizer {
        Tokenizer::Bytes
    }

    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer, TokenizerError> {
        let path = path.as_ref();
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| TokenizerError::Io {
            message: match e.kind() {
                std::io::ErrorKind::NotFound => "no such file".to_string(),
                _ => e.to_string(),
            },
            source: source.clone(),
        })?;
        Tokenizer::parse(&text, source)
    }

    /// Parses the text of a Hugging Face `tokenizer.json`.
    pub fn from_json(json: &str) -> Result<Tokenizer, TokenizerError> {
        Tokenizer::parse(json, "<json>".to_string())
    }

    fn parse(text: &str, source: String) -> Result<Tokenizer, TokenizerError> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| TokenizerError::InvalidJson { source: source.clone(), message: e.to_string() })?;
        let Some(model) = value.get("model") else {
            return Err(TokenizerError::Invalid { source, message: "no `model` object".to_string() });
        };
        // `tokenizers` guesses the model type when `type` is absent; a named type must be a known one.
        if let Some(kind) = model.get("type")
            && !kind.as_str().is_some_and(|k| HF_MODELS.contains(&k))
        {
            return Err(TokenizerError::UnsupportedModel { source, model: kind.to_string() });
        }
        let tokenizer = tokenizers::Tokenizer::from_str(text)
            .map_err(|e| TokenizerError::Invalid { source, message: e.to_string() })?;
        Ok(Tokenizer::HuggingFace(Box::new(tokenizer)))
    }

    /// The token ids of `text`, without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::HuggingFace(t) => {
                t.encode(text, false).map(|e| e.get_ids().to_vec()).map_err(|e| TokenizerError::Encode(e.to_string()))
            }
        }
    }

    /// The text of `ids` (see the module doc for ids the tokenizer does not know).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match self {
            Tokenizer::Bytes => Ok(String::from_utf8_lossy(&ids_to_bytes(ids)).into_owned()),
            Tokenizer::HuggingFace(t) => t.decode(ids, false).map_err(|e| TokenizerError::Decode(e.to_string())),
        }
    }

    /// The number of token ids (for Hugging Face, including added tokens).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => BYTE_VOCAB,
            Tokenizer::HuggingFace(t) => t.get_vocab_size(true),
        }
    }

    /// The id of a token given by its text (e.g. a stop token such as `<|im_end|>`). For the byte
    /// tokenizer, a text of exactly one byte.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match self {
            Tokenizer::Bytes => match token.as_bytes() {
                [b] => Some(u32::from(*b)),
                _ => None,
            },
            Tokenizer::HuggingFace(t) => t.token_to_id(token),
        }
    }

    /// A streaming decoder over this tokenizer.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder::new(self)
    }
}

/// The UTF-8 encoding of `U+FFFD`, which stands for an id ≥ 256 in the byte tokenizer.
const REPLACEMENT: &[u8] = "\u{FFFD}".as_bytes();

fn ids_to_bytes(ids: &[u32]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(ids.len());
    for &id in ids {
        push_id(&mut bytes, id);
    }
    bytes
}

fn push_id(bytes: &mut Vec<u8>, id: u32) {
    match u8::try_from(id) {
        Ok(b) => bytes.push(b),
        Err(_) => bytes.extend_from_slice(REPLACEMENT),
    }
}

/// Decodes ids one at a time and returns the text that is complete so far.
///
/// Every call to [`StreamDecoder::step`] returns the new text (possibly empty); [`StreamDecoder::finish`]
/// returns what was held back. Together they equal [`Tokenizer::decode`] of all the ids.
#[derive(Clone, Debug)]
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    /// Bytes: the bytes not yet returned (an incomplete UTF-8 sequence).
    pending: Vec<u8>,
    /// HuggingFace: the recent ids; `ids[..read]` have been returned, `ids[..prefix]` are context no
    /// longer needed to decode the rest.
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> StreamDecoder<'a> {
        StreamDecoder { tokenizer, pending: Vec::new(), ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// Takes the next id and returns the text it completes (empty while a character is incomplete).
    pub fn step(&mut self, id: u32) -> Result<String, TokenizerError> {
        match self.tokenizer {
            Tokenizer::Bytes => {
                push_id(&mut self.pending, id);
                Ok(self.drain_bytes(false))
            }
            Tokenizer::HuggingFace(_) => {
                self.ids.push(id);
                self.drain_hf(false)
            }
        }
    }

    /// Returns the text still held back (an incomplete character becomes `�`) and ends the stream.
    pub fn finish(mut self) -> Result<String, TokenizerError> {
        match self.tokenizer {
            Tokenizer::Bytes => Ok(self.drain_bytes(true)),
            Tokenizer::HuggingFace(_) => self.drain_hf(true),
        }
    }

    /// The complete characters at the front of `pending`; invalid sequences become `�`, as in
    /// `String::from_utf8_lossy`. An incomplete sequence at the end is kept unless `all`.
    fn drain_bytes(&mut self, all: bool) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, tail) = rest.split_at(e.valid_up_to());
                    // The first `valid_up_to` bytes are valid UTF-8, so this never falls back.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            rest = &tail[n..];
                        }
                        None => {
                            rest = tail;
                            break;
                        }
                    }
                }
            }
        }
        if all && !rest.is_empty() {
            out.push('\u{FFFD}');
            rest = &[];
        }
        let keep = rest.len();
        self.pending.drain(..self.pending.len() - keep);
        out
    }

    /// Decodes `ids[prefix..read]` (text already returned) and `ids[prefix..]`, and returns the new
    /// suffix unless it ends in `�` (a partial character) and `all` is false. Decoding from `prefix`
    /// rather than from the start keeps each step short and keeps decoders that treat the first
    /// token specially (e.g. stripping a leading space) consistent between the two.
    fn drain_hf(&mut self, all: bool) -> Result<String, TokenizerError> {
        let Tokenizer::HuggingFace(t) = self.tokenizer else { unreachable!("drain_hf on the byte tokenizer") };
        let decode = |ids: &[u32]| t.decode(ids, false).map_err(|e| TokenizerError::Decode(e.to_string()));
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        let done = decode(&self.ids[self.prefix..self.read])?;
        let text = decode(&self.ids[self.prefix..])?;
        if !all && (text.len() <= done.len() || text.ends_with('\u{FFFD}')) {
            return Ok(String::new());
        }
        // A decoder normally only appends; should the already returned text change, return the part
        // after what the two texts share (what was printed cannot be taken back).
        let common = if text.starts_with(&done) {
            done.len()
        } else {
            let mut n = 0;
            for ((i, a), b) in text.char_indices().zip(done.chars()) {
                if a != b {
                    break;
                }
                n = i + a.len_utf8();
            }
            n
        };
        let new = text.get(common..).unwrap_or_default().to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        // Only `ids[prefix..]` is needed from now on.
        self.ids.drain(..self.prefix);
        self.read -= self.prefix;
        self.prefix = 0;
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn golden_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/goldens/qwen3-tied")
    }

    fn stream(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
        let mut d = t.stream_decoder();
        let mut out: Vec<String> = ids.iter().map(|&id| d.step(id).unwrap()).collect();
        out.push(d.finish().unwrap());
        out
    }

    #[test]
    fn bytes_round_trip_ascii() {
        let t = Tokenizer::bytes();
        let text = "Hello, world! 123";
        let ids = t.encode(text).unwrap();
        assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
        assert_eq!(t.decode(&ids).unwrap(), text);
        assert_eq!(t.vocab_size(), 256);
        let pieces = stream(&t, &ids);
        assert_eq!(pieces.concat(), text);
        assert!(pieces[..ids.len()].iter().all(|p| p.len() == 1));
    }

    #[test]
    fn bytes_round_trip_multibyte_streams_whole_characters() {
        let t = Tokenizer::bytes();
        let text = "héllo € 𝄞 日本";
        let ids = t.encode(text).unwrap();
        assert_eq!(ids.len(), text.len());
        assert_eq!(t.decode(&ids).unwrap(), text);
        let pieces = stream(&t, &ids);
        assert_eq!(pieces.concat(), text);
        // Every returned piece is a run of whole characters; the pieces are exactly the characters.
        let nonempty: Vec<&str> = pieces.iter().map(String::as_str).filter(|p| !p.is_empty()).collect();
        let chars: Vec<String> = text.chars().map(String::from).collect();
        assert_eq!(nonempty, chars);
        // "€" is three bytes: nothing comes out until the third.
        let euro = t.encode("€").unwrap();
        let mut d = t.stream_decoder();
        assert_eq!(d.step(euro[0]).unwrap(), "");
        assert_eq!(d.step(euro[1]).unwrap(), "");
        assert_eq!(d.step(euro[2]).unwrap(), "€");
        assert_eq!(d.finish().unwrap(), "");
    }

    #[test]
    fn bytes_invalid_input_is_lossy_and_streaming_matches_decode() {
        let t = Tokenizer::bytes();
        // An id ≥ 256 is shown as U+FFFD.
        assert_eq!(t.decode(&[104, 300, 105]).unwrap(), "h\u{FFFD}i");
        // An incomplete sequence cut by an id ≥ 256, a stray continuation byte, a truncated tail.
        let cases: [&[u32]; 5] = [
            &[0xE2, 0x82, 300, 0x41],
            &[0x80, 0x41],
            &[0x41, 0xF0, 0x9D],
            &[0xC3],
            &[0xFF, 0xE2, 0x82, 0xAC, 0xC3, 0xA9],
        ];
        for ids in cases {
            assert_eq!(stream(&t, ids).concat(), t.decode(ids).unwrap(), "{ids:?}");
        }
        // A deterministic pseudo-random sweep over byte strings biased towards UTF-8 lead/continuation bytes.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..2000 {
            let len = (x % 12) as usize;
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    [0x41, 0x80, 0xA9, 0xBF, 0xC3, 0xE2, 0xF0, 0x9D, 0xFF, 0x82, 0xAC, 300][(x % 12) as usize]
                })
                .collect();
            let expected = String::from_utf8_lossy(&ids_to_bytes(&ids)).into_owned();
            assert_eq!(t.decode(&ids).unwrap(), expected);
            assert_eq!(stream(&t, &ids).concat(), expected, "{ids:?}");
        }
    }

    #[test]
    fn bytes_token_id() {
        let t = Tokenizer::bytes();
        assert_eq!(t.token_id("\n"), Some(10));
        assert_eq!(t.token_id("ab"), None);
        assert_eq!(t.token_id(""), None);
        assert_eq!(t.token_id("é"), None);
    }

    #[test]
    fn hf_golden_encodes_and_decodes() {
        let dir = golden_dir();
        let t = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let inputs: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("inputs.json")).unwrap()).unwrap();
        let texts = inputs["texts"].as_array().unwrap();
        let sequences = inputs["sequences"].as_array().unwrap();
        assert_eq!(texts.len(), sequences.len());
        assert!(!texts.is_empty());
        for (text, seq) in texts.iter().zip(sequences) {
            let text = text.as_str().unwrap();
            let expected: Vec<u32> = seq.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let ids = t.encode(text).unwrap();
            assert_eq!(ids, expected, "{text}");
            assert_eq!(t.decode(&ids).unwrap(), text);
            assert_eq!(stream(&t, &ids).concat(), text);
        }
        assert_eq!(t.vocab_size(), 128);
        assert_eq!(t.token_id("<unk>"), Some(0));
        assert_eq!(t.token_id("water"), Some(88));
        assert_eq!(t.token_id("no-such-token"), None);
    }

    /// A GPT-2 style byte-level BPE tokenizer with one token per byte and no merges: multi-byte
    /// characters take several tokens, each of which alone decodes to a partial character.
    fn byte_level_bpe() -> Tokenizer {
        let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~')).collect();
        printable.extend(0xA1..=0xAC);
        printable.extend(0xAE..=0xFF);
        let mut vocab = serde_json::Map::new();
        let mut extra = 0;
        for b in 0u32..256 {
            let c = if printable.contains(&b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            vocab.insert(char::from_u32(c).unwrap().to_string(), serde_json::json!(b));
        }
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                      "vocab": vocab, "merges": []}
        });
        Tokenizer::from_json(&json.to_string()).unwrap()
    }

    #[test]
    fn hf_streaming_holds_partial_characters() {
        let t = byte_level_bpe();
        assert_eq!(t.vocab_size(), 256);
        let text = "héllo € 𝄞 日本!";
        let ids = t.encode(text).unwrap();
        assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
        assert_eq!(t.decode(&ids).unwrap(), text);
        let pieces = stream(&t, &ids);
        assert_eq!(pieces.concat(), text);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        let nonempty: Vec<&str> = pieces.iter().map(String::as_str).filter(|p| !p.is_empty()).collect();
        let chars: Vec<String> = text.chars().map(String::from).collect();
        assert_eq!(nonempty, chars);
        // A stream cut inside a character flushes it as U+FFFD.
        let mut d = t.stream_decoder();
        assert_eq!(d.step(0xE2).unwrap(), "");
        assert_eq!(d.step(0x82).unwrap(), "");
        assert_eq!(d.finish().unwrap(), "\u{FFFD}");
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Tokenizer::from_file("/no/such/dir/tokenizer.json").unwrap_err();
        assert!(matches!(err, TokenizerError::Io { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("/no/such/dir/tokenizer.json") && msg.contains("no such file"), "{msg}");
    }

    #[test]
    fn garbage_is_an_error() {
        let dir = std::env::temp_dir().join(format!("flashc-tok-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, "{ this is not json").unwrap();
        let err = Tokenizer::from_file(&path).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(err, TokenizerError::InvalidJson { .. }), "{err:?}");
        assert!(err.to_string().contains("not valid JSON"), "{err}");

        let err = Tokenizer::from_json(r#"{"model": {"type": "Magic", "vocab": {}}}"#).unwrap_err();
        assert!(matches!(&err, TokenizerError::UnsupportedModel { model, .. } if model == "\"Magic\""), "{err:?}");
        assert!(err.to_string().contains("WordPiece"), "{err}");

        let err = Tokenizer::from_json(r#"{"version": "1.0"}"#).unwrap_err();
        assert!(matches!(err, TokenizerError::Invalid { .. }), "{err:?}");

        let err = Tokenizer::from_json(r#"{"model": {"type": "WordLevel", "vocab": 3}}"#).unwrap_err();
        assert!(matches!(err, TokenizerError::Invalid { .. }), "{err:?}");
        assert!(err.to_string().contains("not a valid Hugging Face tokenizer.json"), "{err}");
    }
}
