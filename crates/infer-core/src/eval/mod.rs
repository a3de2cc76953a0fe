//! Evaluation on your own data: perplexity over a text file ([`perplexity`]), and JSON Lines tasks
//! ([`tasks`]): greedy generation scored by exact match / contains / regex, and multiple choice
//! scored by log-likelihood (raw and length-normalized).

mod perplexity;
mod tasks;

pub use perplexity::{perplexity, PerplexityOptions, PerplexityResult};
pub use tasks::{
    choice_loglikelihoods, load_jsonl, run_choice, run_generation, score_choice, score_generation, ChoiceItem, ChoiceLogLikelihoods,
    GenerationItem, MatchMode, Task, TaskItems, TaskResult,
};

/// Wilson score interval at 95% for `k` successes out of `n`.
pub fn wilson_95(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (z, n, p) = (1.96f64, n as f64, k as f64 / n as f64);
    let den = 1.0 + z * z / n;
    let center = (p + z * z / (2.0 * n)) / den;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / den;
    ((center - half).max(0.0), (center + half).min(1.0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn wilson_interval() {
        let (lo, hi) = super::wilson_95(8, 10);
        assert!((lo - 0.4902).abs() < 1e-3 && (hi - 0.9433).abs() < 1e-3, "{lo} {hi}");
        assert_eq!(super::wilson_95(0, 0), (0.0, 1.0));
    }
}
