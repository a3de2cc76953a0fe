//! Tokenizers: `tokenizer.json` through the `tokenizers` crate, or built from GGUF metadata with the
//! pre-tokenizer that `tokenizer.ggml.pre` names (matching llama.cpp's token ids), plus an
//! incremental detokenizer that never splits a multi-byte character while streaming.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::config::GgufMeta;
use crate::error::{Error, Result};

/// A text tokenizer with the model's special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).finish()
    }
}

fn tk_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let bad = |e: &dyn std::fmt::Display| Error::bad_file(path, format!("not a valid tokenizer.json: {e}"));
        // `tokenizers` panics on a JSON syntax error inside `decoder` (0.23: `expect("Helper")`):
        // the syntax is checked first.
        serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|e| bad(&e))?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| bad(&e))?;
        Ok(Self { inner })
    }

    /// Wraps an already-built `tokenizers::Tokenizer`.
    pub fn from_tokenizers(inner: tokenizers::Tokenizer) -> Self {
        Self { inner }
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text. Special tokens written in the text (`<|im_start|>`) are always recognized;
    /// `add_special_tokens` adds what the tokenizer adds around a text (usually BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, add_special_tokens).map_err(tk_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, leaving out special tokens when `skip_special` is set.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tk_err)
    }

    /// The id of a token's exact string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The string of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Builds the tokenizer described by GGUF metadata (`tokenizer.ggml.*`).
    pub fn from_gguf(md: &GgufMeta<'_>) -> Result<Self> {
        let path = md.path;
        let bad = |msg: String| Error::bad_file(path, msg);
        let model = md.string_opt("tokenizer.ggml.model")?.ok_or_else(|| bad("GGUF has no tokenizer (metadata key `tokenizer.ggml.model` is missing); load the original HF folder with its tokenizer.json instead".into()))?;
        let tokens =
            md.string_array("tokenizer.ggml.tokens")?.ok_or_else(|| bad("GGUF metadata key `tokenizer.ggml.tokens` is missing".into()))?;
        let types = md.i32_array("tokenizer.ggml.token_type")?.unwrap_or_else(|| vec![1; tokens.len()]);
        if types.len() != tokens.len() {
            return Err(bad(format!("tokenizer.ggml.token_type has {} entries for {} tokens", types.len(), tokens.len())));
        }
        let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let mut tk = match model.as_str() {
            "gpt2" => {
                let merges = md
                    .string_array("tokenizer.ggml.merges")?
                    .ok_or_else(|| bad("GGUF metadata key `tokenizer.ggml.merges` is missing".into()))?;
                let merges = merges
                    .iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| bad(format!("malformed BPE merge `{m}`")))
                    })
                    .collect::<Result<Vec<_>>>()?;
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
                    .ignore_merges(false)
                    .build()
                    .map_err(tk_err)?;
                let mut tk = tokenizers::Tokenizer::new(bpe);
                let pre = md.string_opt("tokenizer.ggml.pre")?.unwrap_or_else(|| "default".into());
                let mut seq: Vec<PreTokenizerWrapper> = Vec::new();
                for re in pre_tokenizer_regexes(&pre) {
                    let split = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false).map_err(tk_err)?;
                    seq.push(split.into());
                }
                seq.push(ByteLevel::new(false, false, false).into());
                tk.with_pre_tokenizer(Some(PreSequence::new(seq)));
                tk.with_decoder(Some(ByteLevel::new(false, false, false)));
                tk
            }
            "llama" => {
                let scores = md.f32_array("tokenizer.ggml.scores")?.unwrap_or_else(|| vec![0.0; tokens.len()]);
                let unk = md.u32_opt("tokenizer.ggml.unknown_token_id")?.unwrap_or(0) as usize;
                let merges = spm_merges(&tokens, &scores, &types);
                let bpe = BPE::builder()
                    .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
                    .unk_token(tokens.get(unk).cloned().unwrap_or_else(|| "<unk>".into()))
                    .byte_fallback(true)
                    .fuse_unk(true)
                    .build()
                    .map_err(tk_err)?;
                let mut tk = tokenizers::Tokenizer::new(bpe);
                let prefix = md.bool_opt("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                let mut norm: Vec<NormalizerWrapper> = Vec::new();
                if prefix {
                    norm.push(Prepend::new("▁".into()).into());
                }
                norm.push(Replace::new(" ", "▁").map_err(tk_err)?.into());
                tk.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norm))).map_err(tk_err)?;
                let mut dec: Vec<DecoderWrapper> =
                    vec![Replace::new("▁", " ").map_err(tk_err)?.into(), ByteFallback::new().into(), Fuse::new().into()];
                if prefix {
                    dec.push(Strip::new(' ', 1, 0).into());
                }
                tk.with_decoder(Some(DecoderSequence::new(dec)));
                tk
            }
            "bert" => {
                // llama.cpp's converter writes WordPiece pieces in SentencePiece's form: a word-initial
                // piece gets "▁", a continuation loses its "##"; control tokens stay as they are.
                let pieces = wordpiece_pieces(&tokens, &types);
                let unk = md.u32_opt("tokenizer.ggml.unknown_token_id")?.unwrap_or(100) as usize;
                let unk = pieces.get(unk).cloned().ok_or_else(|| bad(format!("unknown_token_id {unk} is out of the vocabulary")))?;
                let vocab: HashMap<String, u32> = pieces.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
                let wp = tokenizers::models::wordpiece::WordPiece::builder()
                    .vocab(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>())
                    .unk_token(unk)
                    .continuing_subword_prefix("##".into())
                    .max_input_chars_per_word(100)
                    .build()
                    .map_err(tk_err)?;
                let mut tk = tokenizers::Tokenizer::new(wp);
                // llama.cpp: lowercase unless the key says otherwise; accents stripped as lowercase says
                // unless their own key is present.
                let lower = md.bool_opt("tokenizer.ggml.normalizer.lowercase")?.unwrap_or(true);
                let strip = md.bool_opt("tokenizer.ggml.normalizer.strip_accents")?.unwrap_or(lower);
                tk.with_normalizer(Some(tokenizers::normalizers::BertNormalizer::new(true, true, Some(strip), lower))).map_err(tk_err)?;
                tk.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::bert::BertPreTokenizer));
                tk.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
                tk
            }
            "t5" => {
                // llama.cpp's UGM: SentencePiece Unigram over the pieces and their scores, the
                // model's precompiled normalization map, runs of spaces as one, "▁" for spaces and
                // in front of the text.
                let scores = md.f32_array("tokenizer.ggml.scores")?.unwrap_or_else(|| vec![0.0; tokens.len()]);
                if scores.len() != tokens.len() {
                    return Err(bad(format!("tokenizer.ggml.scores has {} entries for {} tokens", scores.len(), tokens.len())));
                }
                let unk = md.u32_opt("tokenizer.ggml.unknown_token_id")?.map(|u| u as usize).filter(|&u| u < tokens.len());
                let vocab: Vec<(String, f64)> = tokens.iter().cloned().zip(scores.iter().map(|&x| x as f64)).collect();
                let uni = tokenizers::models::unigram::Unigram::from(vocab, unk, false).map_err(tk_err)?;
                let mut tk = tokenizers::Tokenizer::new(uni);
                let mut norm: Vec<NormalizerWrapper> = Vec::new();
                if let Some(map) = md.i32_array("tokenizer.ggml.precompiled_charsmap")?.filter(|m| !m.is_empty()) {
                    let bytes: Vec<u8> = map.iter().map(|&b| b as u8).collect();
                    let pre = tokenizers::normalizers::Precompiled::from(&bytes)
                        .map_err(|e| bad(format!("tokenizer.ggml.precompiled_charsmap is not a valid map: {e}")))?;
                    norm.push(pre.into());
                }
                tk.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norm))).map_err(tk_err)?;
                use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
                let prefix = md.bool_opt("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                let scheme = if prefix { PrependScheme::Always } else { PrependScheme::Never };
                if md.bool_opt("tokenizer.ggml.remove_extra_whitespaces")?.unwrap_or(true) {
                    // Leading and trailing spaces dropped, runs as one "▁", one before each word.
                    let ws = tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
                    tk.with_pre_tokenizer(Some(PreSequence::new(vec![ws.into(), Metaspace::new('▁', scheme, true).into()])));
                } else {
                    tk.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)));
                }
                tk.with_decoder(Some(tokenizers::decoders::metaspace::Metaspace::new('▁', scheme, true)));
                tk
            }
            other => {
                return Err(bad(format!(
                    "tokenizer model `{other}` is not supported (supported: gpt2 BPE, llama SentencePiece, bert WordPiece, t5 Unigram)"
                )))
            }
        };
        let tokens = if model == "bert" { wordpiece_pieces(&tokens, &types) } else { tokens };
        // Control (3) and user-defined (4) tokens are matched whole in the text, as llama.cpp does
        // (and, for its UGM vocabularies, the unknown token (2) too).
        let unknown_too = model == "t5";
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == 3 || **t == 4 || (unknown_too && **t == 2))
            .map(|(s, t)| AddedToken::from(s.clone(), *t != 4).normalized(false))
            .collect();
        tk.add_special_tokens(added).map_err(tk_err)?;
        let add_bos = md.bool_opt("tokenizer.ggml.add_bos_token")?.unwrap_or(model == "llama");
        if model == "bert" {
            // `[CLS] A [SEP]` and `[CLS] A [SEP] B [SEP]` (types 0 then 1), whatever the add_* keys say,
            // as llama.cpp does for WordPiece: the class token is written as the BOS, the separator
            // under llama.cpp's spelling `seperator_token_id`.
            let id = |key: &str, default: u32| -> Result<(String, u32)> {
                let i = md.u32_opt(key)?.unwrap_or(default);
                Ok((tokens.get(i as usize).cloned().ok_or_else(|| bad(format!("{key} {i} is out of the vocabulary")))?, i))
            };
            let cls = id("tokenizer.ggml.bos_token_id", 101)?;
            let sep = match md.u32_opt("tokenizer.ggml.seperator_token_id")? {
                Some(_) => id("tokenizer.ggml.seperator_token_id", 102)?,
                None => id("tokenizer.ggml.eos_token_id", 102)?,
            };
            let (c, p) = (&cls.0, &sep.0);
            let post = TemplateProcessing::builder()
                .try_single(format!("{c} $A {p}"))
                .and_then(|b| b.try_pair(format!("{c} $A {p} $B:1 {p}:1")))
                .map_err(tk_err)?
                .special_tokens(if cls.0 == sep.0 { vec![cls] } else { vec![cls, sep] })
                .build()
                .map_err(tk_err)?;
            tk.with_post_processor(Some(post));
        } else if let (true, Some(bos)) = (add_bos, md.u32_opt("tokenizer.ggml.bos_token_id")?) {
            let bos_str = tokens.get(bos as usize).cloned().ok_or_else(|| bad(format!("bos_token_id {bos} is out of the vocabulary")))?;
            let post = TemplateProcessing::builder()
                .try_single(format!("{bos_str} $A"))
                .and_then(|b| b.try_pair(format!("{bos_str} $A {bos_str} $B")))
                .map_err(tk_err)?
                .special_tokens(vec![(bos_str, bos)])
                .build()
                .map_err(tk_err)?;
            tk.with_post_processor(Some(post));
        }
        Ok(Self { inner: tk })
    }
}

/// WordPiece pieces back from the form llama.cpp's converter writes them in (`tokenizer.ggml.model`
/// `bert`): control tokens (type 3) as they are, "▁word" → "word" (word-initial), any other "piece" →
/// "##piece" (a continuation).
fn wordpiece_pieces(tokens: &[String], types: &[i32]) -> Vec<String> {
    tokens
        .iter()
        .zip(types)
        .map(|(t, &ty)| match t.strip_prefix('▁') {
            _ if ty == 3 => t.clone(),
            Some(word) => word.to_string(),
            None => format!("##{t}"),
        })
        .collect()
}

/// The pre-tokenizer regexes llama.cpp uses for a `tokenizer.ggml.pre` value.
fn pre_tokenizer_regexes(pre: &str) -> Vec<&'static str> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => vec![
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        "qwen2" | "deepseek-r1-qwen" | "megrez" => vec![
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        ],
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => vec![r"\p{N}", GPT2],
        _ => vec![GPT2],
    }
}

/// Longest SentencePiece token that merges are derived for (bytes).
const MAX_MERGED_TOKEN_LEN: usize = 256;

/// Merges for a SentencePiece vocabulary: every pair of tokens whose concatenation is a token,
/// ranked by that token's score (highest first), as llama.cpp's SPM tokenizer merges.
fn spm_merges(tokens: &[String], scores: &[f32], types: &[i32]) -> Vec<(String, String)> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut ranked: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        // Each split of a token is looked up (quadratic in its length): a hostile vocabulary with
        // one huge token would hang the load. Real pieces are far shorter.
        if types.get(id).copied().unwrap_or(1) != 1 || tok.len() > MAX_MERGED_TOKEN_LEN {
            continue;
        }
        for (split, _) in tok.char_indices().skip(1) {
            let (l, r) = tok.split_at(split);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                ranked.push((scores.get(id).copied().unwrap_or(0.0), id, li, ri));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    ranked.into_iter().map(|(_, _, l, r)| (tokens[l].clone(), tokens[r].clone())).collect()
}

/// Most tokens the decoder waits on for a character (a UTF-8 character spans at most 4 byte tokens).
const MAX_PENDING_TOKENS: usize = 16;

/// Turns a stream of token ids into text pieces that never end inside a multi-byte character.
#[derive(Debug, Clone, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let new = match full.get(prefix.len()..) {
                Some(s) if full.starts_with(&prefix) => s.to_string(),
                _ => full.chars().skip(prefix.chars().count()).collect(),
            };
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(new))
        } else if self.ids.len() - self.read_offset > MAX_PENDING_TOKENS {
            // Tokens without text (special tokens) or bytes that never form a character: stop
            // decoding them again at every token (quadratic), emitting what they hold.
            let new = full.get(prefix.len()..).unwrap_or("").to_string();
            self.prefix_offset = self.ids.len();
            self.read_offset = self.ids.len();
            Ok((!new.is_empty()).then_some(new))
        } else {
            Ok(None)
        }
    }

    /// Tokens pushed whose text has not come out yet.
    pub fn pending_tokens(&self) -> usize {
        self.ids.len() - self.read_offset
    }

    /// Whatever text is still held back (an incomplete character at the very end).
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<Option<String>> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).filter(|s| !s.is_empty()).map(str::to_string))
    }
}
