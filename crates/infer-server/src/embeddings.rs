//! `POST /v1/embeddings` (OpenAI's shape): `input` as a string, strings, token ids or lists of them;
//! `encoding_format` `float` or `base64` (little-endian f32); `dimensions` (the first N values,
//! normalized again); usage. The model's final hidden states are pooled per input (`infer serve
//! --pooling last|mean`, infer_core::embeddings) on a blocking thread, many inputs per forward pass.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::routes::json_body;
use crate::AppState;

/// Most inputs one request may embed (OpenAI's limit).
const MAX_INPUTS: usize = 2048;
/// Most tokens one request may embed in all.
const MAX_TOKENS: usize = 300_000;

/// Standard base64 of bytes (RFC 4648, with padding).
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= c.len() { A[(n >> shift & 63) as usize] as char } else { '=' });
        }
    }
    out
}

/// The inputs as texts or token-id lists.
enum Inputs {
    Texts(Vec<String>),
    Tokens(Vec<Vec<u32>>),
}

fn parse_input(v: Option<&Value>) -> Result<Inputs, ApiError> {
    let ids = |v: &Value, at: &str| -> Result<Vec<u32>, ApiError> {
        v.as_array()
            .ok_or_else(|| ApiError::invalid(at, "must be a list of token ids"))?
            .iter()
            .map(|t| {
                t.as_u64()
                    .filter(|&t| t <= u32::MAX as u64)
                    .map(|t| t as u32)
                    .ok_or_else(|| ApiError::invalid(at, "token ids are integers >= 0"))
            })
            .collect()
    };
    match v {
        Some(Value::String(s)) => Ok(Inputs::Texts(vec![s.clone()])),
        Some(Value::Array(items)) if items.is_empty() => Err(ApiError::invalid("input", "must not be empty")),
        Some(Value::Array(items)) if items.len() > MAX_INPUTS => {
            Err(ApiError::invalid("input", format!("at most {MAX_INPUTS} inputs per request")))
        }
        Some(Value::Array(items)) => match &items[0] {
            Value::String(_) => Ok(Inputs::Texts(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        s.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| ApiError::invalid(&format!("input[{i}]"), "must be a string like the others"))
                    })
                    .collect::<Result<_, _>>()?,
            )),
            Value::Number(_) => Ok(Inputs::Tokens(vec![ids(v.expect("some"), "input")?])),
            Value::Array(_) => {
                Ok(Inputs::Tokens(items.iter().enumerate().map(|(i, l)| ids(l, &format!("input[{i}]"))).collect::<Result<_, _>>()?))
            }
            _ => Err(ApiError::invalid("input", "must be a string, a list of strings, token ids or lists of token ids")),
        },
        Some(_) => Err(ApiError::invalid("input", "must be a string, a list of strings, token ids or lists of token ids")),
        None => Err(ApiError::invalid("input", "is required")),
    }
}

/// Jobs waiting for [`turn`].
static WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One embedding or rerank job at a time (a decoder's has a scratch KV cache and shares the model's
/// workspace with the engine; an encoder's uses the CPU cores); the others wait here, holding no
/// thread, up to `--max-queue` of them (then 429).
pub(crate) async fn turn(st: &AppState) -> Result<tokio::sync::SemaphorePermit<'static>, ApiError> {
    use std::sync::atomic::Ordering;
    static RUNNING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
    struct Waiting;
    impl Drop for Waiting {
        fn drop(&mut self) {
            WAITING.fetch_sub(1, Ordering::SeqCst);
        }
    }
    if WAITING.fetch_add(1, Ordering::SeqCst) >= st.cfg.max_queue.max(1) {
        WAITING.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::too_many_requests("too many embedding/rerank requests are waiting; retry shortly"));
    }
    let _waiting = Waiting;
    RUNNING.acquire().await.map_err(|e| ApiError::internal(e.to_string()))
}

pub async fn embeddings(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = json_body(body)?;
    let ready = st.resolve(body.get("model").and_then(Value::as_str)).await?;
    if matches!(&ready.embedder, crate::Embedder::Encoder(e) if e.reranks()) {
        return Err(ApiError::bad_request(
            Some("model"),
            format!("`{}` is a cross-encoder (reranker): it has no embeddings; it serves /v1/rerank", ready.model_id),
        ));
    }
    let base64_out = match body.get("encoding_format").and_then(|v| if v.is_null() { None } else { Some(v) }) {
        None => false,
        Some(v) => match v.as_str() {
            Some("float") => false,
            Some("base64") => true,
            _ => return Err(ApiError::invalid("encoding_format", "must be `float` or `base64`")),
        },
    };
    let hidden = ready.embedder.hidden_size();
    let dimensions = match body.get("dimensions").filter(|v| !v.is_null()) {
        None => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|&d| d >= 1 && d as usize <= hidden)
                .ok_or_else(|| ApiError::invalid("dimensions", format!("must be in 1..={hidden} (this model's size)")))?
                as usize,
        ),
    };
    let inputs = parse_input(body.get("input"))?;
    let _turn = turn(&st).await?;
    let r = ready.clone();
    let (vectors, tokens) = tokio::task::spawn_blocking(move || -> Result<(Vec<Vec<f32>>, usize), ApiError> {
        let ids: Vec<Vec<u32>> = match inputs {
            Inputs::Tokens(t) => t,
            Inputs::Texts(texts) => texts.iter().map(|t| r.tokenizer.encode(t, true)).collect::<Result<_, _>>()?,
        };
        let limit = match &r.embedder {
            crate::Embedder::Decoder { model, .. } => {
                r.max_context.min(model.config().max_position_embeddings).min(infer_core::embeddings::MAX_EMBED_TOKENS)
            }
            crate::Embedder::Encoder(e) => e.max_tokens(),
        };
        for (i, t) in ids.iter().enumerate() {
            if t.is_empty() {
                return Err(ApiError::invalid(&format!("input[{i}]"), "is empty"));
            }
            if t.len() > limit {
                return Err(ApiError::invalid(&format!("input[{i}]"), format!("{} tokens; at most {limit} here", t.len()))
                    .with_code("context_length_exceeded"));
            }
        }
        let tokens: usize = ids.iter().map(Vec::len).sum();
        if tokens > MAX_TOKENS {
            return Err(ApiError::invalid("input", format!("{tokens} tokens in all; at most {MAX_TOKENS} per request")));
        }
        let v = match &r.embedder {
            crate::Embedder::Decoder { model, pooling } => infer_core::embeddings::embed(model.as_ref(), &ids, *pooling, true)?,
            crate::Embedder::Encoder(e) => e.embed_ids(&ids)?,
        };
        Ok((v, tokens))
    })
    .await
    .map_err(|e| ApiError::internal(format!("an embedding worker failed: {e}")))??;
    let data: Vec<Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(i, mut v)| {
            if let Some(d) = dimensions {
                v.truncate(d);
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                if norm > 0.0 {
                    v.iter_mut().for_each(|x| *x /= norm);
                }
            }
            let embedding = if base64_out {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::from(base64(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": ready.model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc_4648() {
        for (raw, want) in
            [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")]
        {
            assert_eq!(super::base64(raw.as_bytes()), want);
        }
    }
}
