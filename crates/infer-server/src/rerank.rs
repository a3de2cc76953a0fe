//! `POST /v1/rerank` (also `/rerank` and `/v1/reranking`): the Jina / Cohere shape that vLLM and
//! llama.cpp serve, for a cross-encoder (`BertForSequenceClassification` with one label,
//! infer_core::encoder). Request: `query`, `documents` (strings or `{"text": ...}`), `top_n`
//! (0 or absent: all), `return_documents` (default true: each result carries `document: {text}`, as
//! vLLM's do), `max_tokens_per_doc` (cut each document to that many tokens; the pair is cut to the
//! model's positions anyway, the document first). Answer: `results` sorted by `relevance_score`
//! (sentence-transformers' CrossEncoder score: the sigmoid of the logit unless the model
//! configures Identity), best first, each with its `index` in `documents`; `usage`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::routes::{json_body, random_id};
use crate::{AppState, Embedder};

/// Most documents one request may rerank.
pub const MAX_DOCUMENTS: usize = 1000;

/// An optional non-negative integer field (`null` = absent).
fn opt_uint(body: &Value, field: &str) -> Result<Option<usize>, ApiError> {
    match body.get(field).filter(|v| !v.is_null()) {
        None => Ok(None),
        Some(v) => {
            v.as_u64().map(|n| Some(n.min(usize::MAX as u64) as usize)).ok_or_else(|| ApiError::invalid(field, "must be an integer >= 0"))
        }
    }
}

fn parse_documents(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let items = match v {
        None | Some(Value::Null) => return Err(ApiError::invalid("documents", "is required")),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(ApiError::invalid("documents", "must be a list of strings or {\"text\": ...} objects")),
    };
    if items.is_empty() {
        return Err(ApiError::invalid("documents", "must not be empty"));
    }
    if items.len() > MAX_DOCUMENTS {
        return Err(ApiError::invalid("documents", format!("{} documents; at most {MAX_DOCUMENTS} per request", items.len())));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let field = format!("documents[{i}]");
            let text = match d {
                Value::String(s) => s,
                Value::Object(o) => match o.get("text") {
                    Some(Value::String(s)) => s,
                    _ => return Err(ApiError::invalid(&field, "an object document needs a string `text`")),
                },
                _ => return Err(ApiError::invalid(&field, "must be a string or {\"text\": ...}")),
            };
            if text.is_empty() {
                return Err(ApiError::invalid(&field, "is empty"));
            }
            Ok(text.clone())
        })
        .collect()
}

pub async fn rerank(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Result<Json<Value>, ApiError> {
    let body = json_body(body)?;
    let ready = st.resolve(body.get("model").and_then(Value::as_str)).await?;
    let encoder = match &ready.embedder {
        Embedder::Encoder(e) if e.reranks() => e.clone(),
        _ => {
            return Err(ApiError::bad_request(
                Some("model"),
                format!(
                    "`{}` cannot rerank: /v1/rerank needs a cross-encoder (a BertForSequenceClassification folder with one label)",
                    ready.model_id
                ),
            ))
        }
    };
    let query = match body.get("query") {
        None | Some(Value::Null) => return Err(ApiError::invalid("query", "is required")),
        Some(Value::String(q)) if q.is_empty() => return Err(ApiError::invalid("query", "must not be empty")),
        Some(Value::String(q)) => q.clone(),
        Some(_) => return Err(ApiError::invalid("query", "must be a string")),
    };
    let documents = parse_documents(body.get("documents"))?;
    let top_n = opt_uint(&body, "top_n")?.filter(|&n| n > 0).unwrap_or(documents.len()).min(documents.len());
    let return_documents = match body.get("return_documents").filter(|v| !v.is_null()) {
        None => true,
        Some(v) => v.as_bool().ok_or_else(|| ApiError::invalid("return_documents", "must be true or false"))?,
    };
    let max_doc_tokens = match opt_uint(&body, "max_tokens_per_doc")? {
        Some(0) => return Err(ApiError::invalid("max_tokens_per_doc", "must be at least 1")),
        n => n,
    };
    let _turn = crate::embeddings::turn(&st).await?;
    let docs = documents.clone();
    let (scores, tokens) = tokio::task::spawn_blocking(move || -> Result<(Vec<f32>, usize), ApiError> {
        let q = encoder.encode_query(&query)?;
        let pairs = docs.iter().map(|d| encoder.encode_pair(&q, d, max_doc_tokens)).collect::<Result<Vec<_>, _>>()?;
        let tokens = pairs.iter().map(|p| p.ids.len()).sum();
        let act = encoder.score_activation().ok_or_else(|| ApiError::internal("the cross-encoder lost its head"))?;
        let scores = encoder.logits(&pairs)?.into_iter().map(|l| act.apply(l)).collect();
        Ok((scores, tokens))
    })
    .await
    .map_err(|e| ApiError::internal(format!("a rerank worker failed: {e}")))??;
    let mut order: Vec<usize> = (0..scores.len()).collect();
    // Best first; equal scores keep the documents' order.
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let results: Vec<Value> = order
        .into_iter()
        .take(top_n)
        .map(|i| {
            let mut r = json!({"index": i, "relevance_score": scores[i]});
            if return_documents {
                r["document"] = json!({"text": documents[i]});
            }
            r
        })
        .collect();
    Ok(Json(json!({
        "id": random_id("rerank-"),
        "model": ready.model_id,
        "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}
