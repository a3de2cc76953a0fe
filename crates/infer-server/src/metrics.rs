//! Prometheus metrics, served as text at `GET /metrics`.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};

/// Every metric the server exports. The unlabeled gauges are sums over the loaded models (each
/// engine adds what changed since it last reported, and takes its share back when it stops); the
/// `infer_model_*` gauges are the same figures per model (label `model`), present while the model's
/// engine runs; `infer_model_loaded` is 1 for each loaded model, 0 otherwise.
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounter,
    pub generation_tokens: IntCounter,
    pub queue_length: IntGauge,
    pub running: IntGauge,
    pub kv_blocks_used: IntGauge,
    pub kv_blocks_free: IntGauge,
    pub kv_blocks_cached: IntGauge,
    pub kv_blocks_total: IntGauge,
    pub model_queue_length: IntGaugeVec,
    pub model_running: IntGaugeVec,
    pub model_kv_blocks_used: IntGaugeVec,
    pub model_kv_blocks_free: IntGaugeVec,
    pub model_kv_blocks_cached: IntGaugeVec,
    pub model_kv_blocks_total: IntGaugeVec,
    pub model_loaded: IntGaugeVec,
    pub prefix_lookup_tokens: IntCounter,
    pub prefix_hit_tokens: IntCounter,
    pub prefix_hit_rate: prometheus::Gauge,
    pub spec_draft_tokens: IntCounter,
    pub spec_accepted_tokens: IntCounter,
    pub spec_acceptance_rate: prometheus::Gauge,
    pub preemptions: IntCounter,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let latency = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid histogram");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let ttft = latency(
            "infer_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0],
        );
        let itl = latency(
            "infer_inter_token_latency_seconds",
            "Time between two consecutive tokens of a sequence.",
            vec![0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5],
        );
        let e2e = latency(
            "infer_request_latency_seconds",
            "Time from a sequence's arrival to its last token.",
            vec![0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0],
        );
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid counter");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let per_model = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["model"]).expect("valid gauge");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let requests =
            IntCounterVec::new(Opts::new("infer_requests_total", "HTTP requests by endpoint and status."), &["endpoint", "status"])
                .expect("valid counter");
        registry.register(Box::new(requests.clone())).expect("unique metric");
        let prefix_hit_rate = prometheus::Gauge::new(
            "infer_prefix_cache_hit_rate",
            "Share of prompt tokens found in the prefix cache since start (hit tokens / looked-up tokens).",
        )
        .expect("valid gauge");
        registry.register(Box::new(prefix_hit_rate.clone())).expect("unique metric");
        let spec_acceptance_rate = prometheus::Gauge::new(
            "infer_spec_decode_acceptance_rate",
            "Speculative decoding: share of drafted tokens the model kept since start (accepted / drafted).",
        )
        .expect("valid gauge");
        registry.register(Box::new(spec_acceptance_rate.clone())).expect("unique metric");
        Self {
            requests,
            prompt_tokens: counter("infer_prompt_tokens_total", "Prompt tokens of accepted sequences."),
            generation_tokens: counter("infer_generation_tokens_total", "Tokens generated."),
            queue_length: gauge("infer_queue_length", "Sequences waiting to start."),
            running: gauge("infer_running_sequences", "Sequences being generated."),
            kv_blocks_used: gauge("infer_kv_blocks_used", "KV cache blocks held by sequences."),
            kv_blocks_free: gauge("infer_kv_blocks_free", "KV cache blocks that can be handed out (cached prefixes included)."),
            kv_blocks_cached: gauge("infer_kv_blocks_cached", "Free KV cache blocks that still hold a cached prefix."),
            kv_blocks_total: gauge("infer_kv_blocks_total", "KV cache blocks in all."),
            model_queue_length: per_model("infer_model_queue_length", "Sequences waiting to start, per model."),
            model_running: per_model("infer_model_running_sequences", "Sequences being generated, per model."),
            model_kv_blocks_used: per_model("infer_model_kv_blocks_used", "KV cache blocks held by sequences, per model."),
            model_kv_blocks_free: per_model("infer_model_kv_blocks_free", "KV cache blocks that can be handed out, per model."),
            model_kv_blocks_cached: per_model("infer_model_kv_blocks_cached", "Free KV cache blocks holding a cached prefix, per model."),
            model_kv_blocks_total: per_model("infer_model_kv_blocks_total", "KV cache blocks in all, per model."),
            model_loaded: per_model("infer_model_loaded", "1 while the model is loaded, 0 otherwise."),
            prefix_lookup_tokens: counter("infer_prefix_cache_lookup_tokens_total", "Prompt tokens looked up in the prefix cache."),
            prefix_hit_tokens: counter("infer_prefix_cache_hit_tokens_total", "Prompt tokens found in the prefix cache."),
            preemptions: counter("infer_preemptions_total", "Sequences preempted (recomputed later) because the KV cache was full."),
            prefix_hit_rate,
            spec_draft_tokens: counter("infer_spec_decode_draft_tokens_total", "Speculative decoding: drafted tokens the model checked."),
            spec_accepted_tokens: counter(
                "infer_spec_decode_accepted_tokens_total",
                "Speculative decoding: drafted tokens the model kept.",
            ),
            spec_acceptance_rate,
            ttft,
            itl,
            e2e,
            registry,
        }
    }

    /// The Prometheus text exposition of all metrics.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
