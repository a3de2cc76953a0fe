//! Stop strings for streamed text: text that might be the start of a stop string is held back until
//! it is known not to be one, so a stop string is never half-emitted.

/// Tracks streamed text against a set of stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What [`StopMatcher::push`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that is safe to emit now.
    pub emit: String,
    /// A stop string was found: generation must end (the stop string and anything after it are dropped).
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, held: String::new() }
    }

    /// Adds newly decoded text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome { emit: text.to_string(), stopped: false };
        }
        self.held.push_str(text);
        // The earliest complete stop string wins.
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let emit = self.held[..at].to_string();
            self.held.clear();
            return StopOutcome { emit, stopped: true };
        }
        // Hold back the longest tail that could still grow into a stop string.
        let mut keep_from = self.held.len();
        for (i, _) in self.held.char_indices().rev() {
            let tail = &self.held[i..];
            if tail.len() >= self.max_stop_len() {
                break;
            }
            if self.stops.iter().any(|s| s.starts_with(tail)) {
                keep_from = i;
            }
        }
        let emit = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        StopOutcome { emit, stopped: false }
    }

    /// The held-back text, at the end of generation for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn max_stop_len(&self) -> usize {
        self.stops.iter().map(String::len).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let o = m.push(p);
            out.push(o.emit);
            if o.stopped {
                return (out, true, String::new());
            }
        }
        let rest = m.flush();
        (out, false, rest)
    }

    #[test]
    fn stop_split_across_pieces_is_never_emitted() {
        let (out, stopped, _) = run(&["</end>"], &["Hello </", "en", "d> more"]);
        assert_eq!(out, vec!["Hello ", "", ""]);
        assert!(stopped);
    }

    #[test]
    fn false_alarm_is_released() {
        let (out, stopped, rest) = run(&["</end>"], &["a </e", "x", "b"]);
        assert_eq!(out.concat(), "a </exb");
        assert!(!stopped);
        assert_eq!(rest, "");
        let (out, _, rest) = run(&["STOP"], &["abc ST"]);
        assert_eq!((out.concat().as_str(), rest.as_str()), ("abc ", "ST"));
    }

    #[test]
    fn earliest_of_several_stops_and_multibyte() {
        let (out, stopped, _) = run(&["ü!", "b"], &["aü", "!b"]);
        assert_eq!(out.concat(), "a");
        assert!(stopped);
    }
}
