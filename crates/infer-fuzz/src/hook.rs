//! A quiet panic hook: panics are expected by the thousand while fuzzing (most caught inside infer's
//! own code), so none is printed; the last one's message and location are kept for the finding.

use std::sync::Mutex;

static LAST: Mutex<String> = Mutex::new(String::new());

pub fn install() {
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let at = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column())).unwrap_or_default();
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        if let Ok(mut l) = LAST.lock() {
            *l = format!("panicked at {at} (thread {thread}): {msg}");
        }
    }));
}

/// The last panic's description.
pub fn last_panic() -> String {
    LAST.lock().map(|l| l.clone()).unwrap_or_default()
}
