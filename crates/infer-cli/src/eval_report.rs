//! `infer eval --report FILE.html`: a self-contained page (inline SVG, no scripts, no network) with a
//! bar chart of each metric with its 95% interval and one of the speed, plus the table.

use std::fmt::Write;

/// What the report shows of one row.
pub struct ReportRow<'a> {
    pub model: &'a str,
    pub metric: &'a str,
    pub value: f64,
    pub ci: (f64, f64),
    pub n: usize,
    pub tokens_per_second: f64,
    pub peak: String,
    pub load_secs: f64,
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const COLORS: [&str; 6] = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1"];

/// One bar: its label, value and optional interval.
type Bar = (String, f64, Option<(f64, f64)>);

/// Horizontal bars scaled to the largest value (or interval end).
fn bar_chart(title: &str, bars: &[Bar], unit: &str) -> String {
    let (label_w, bar_w, row_h) = (320.0, 420.0, 34.0);
    let max = bars.iter().map(|(_, v, ci)| ci.map_or(*v, |c| c.1.max(*v))).fold(0f64, f64::max).max(1e-12);
    let h = 40.0 + row_h * bars.len() as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{h}\" role=\"img\" aria-label=\"{}\">\
         <text x=\"0\" y=\"18\" font-size=\"15\" font-weight=\"bold\">{}</text>",
        label_w + bar_w + 120.0,
        esc(title),
        esc(title)
    );
    for (i, (label, v, ci)) in bars.iter().enumerate() {
        let y = 30.0 + row_h * i as f64;
        let w = (v / max * bar_w).max(1.0);
        let color = COLORS[i % COLORS.len()];
        let _ = write!(
            svg,
            "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"end\">{}</text>\
             <rect x=\"{label_w}\" y=\"{y}\" width=\"{w:.1}\" height=\"{}\" fill=\"{color}\"/>",
            label_w - 8.0,
            y + 17.0,
            esc(label),
            row_h - 10.0
        );
        if let Some((lo, hi)) = ci {
            let (x0, x1, ym) = (label_w + lo.max(0.0) / max * bar_w, label_w + hi / max * bar_w, y + (row_h - 10.0) / 2.0);
            let _ = write!(
                svg,
                "<line x1=\"{x0:.1}\" x2=\"{x1:.1}\" y1=\"{ym}\" y2=\"{ym}\" stroke=\"#222\" stroke-width=\"1.5\"/>\
                 <line x1=\"{x0:.1}\" x2=\"{x0:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"#222\"/>\
                 <line x1=\"{x1:.1}\" x2=\"{x1:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"#222\"/>",
                ym - 6.0,
                ym + 6.0,
                ym - 6.0,
                ym + 6.0
            );
        }
        let shown = if unit.is_empty() { format!("{v:.4}") } else { format!("{v:.1}{unit}") };
        let _ = write!(svg, "<text x=\"{}\" y=\"{}\" font-size=\"12\">{}</text>", label_w + bar_w + 8.0, y + 17.0, esc(&shown));
    }
    svg.push_str("</svg>");
    svg
}

/// The whole page.
pub fn html(title: &str, rows: &[ReportRow<'_>]) -> String {
    let mut metrics: Vec<&str> = Vec::new();
    for r in rows {
        if !metrics.contains(&r.metric) {
            metrics.push(r.metric);
        }
    }
    let mut body = String::new();
    for m in &metrics {
        let bars: Vec<_> = rows.iter().filter(|r| r.metric == *m).map(|r| (r.model.to_string(), r.value, Some(r.ci))).collect();
        body.push_str(&format!("<figure>{}</figure>", bar_chart(&format!("{m} (95% interval)"), &bars, "")));
    }
    let mut seen = Vec::new();
    let speed: Vec<_> = rows
        .iter()
        .filter(|r| {
            let new = !seen.contains(&r.model);
            seen.push(r.model);
            new
        })
        .map(|r| (r.model.to_string(), r.tokens_per_second, None))
        .collect();
    body.push_str(&format!("<figure>{}</figure>", bar_chart("speed", &speed, " tok/s")));
    let mut table = String::from(
        "<table><tr><th>model</th><th>metric</th><th>value</th><th>95% interval</th><th>n</th><th>tokens/s</th><th>peak memory</th><th>load time</th></tr>",
    );
    for r in rows {
        let _ = write!(
            table,
            "<tr><td>{}</td><td>{}</td><td>{:.4}</td><td>[{:.4}, {:.4}]</td><td>{}</td><td>{:.1}</td><td>{}</td><td>{:.2} s</td></tr>",
            esc(r.model),
            esc(r.metric),
            r.value,
            r.ci.0,
            r.ci.1,
            r.n,
            r.tokens_per_second,
            esc(&r.peak),
            r.load_secs
        );
    }
    table.push_str("</table>");
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{t}</title><style>\
         body{{font-family:system-ui,sans-serif;margin:2em;color:#222}}figure{{margin:1.5em 0}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}\
         td:first-child,th:first-child,td:nth-child(2){{text-align:left}}</style></head>\
         <body><h1>{t}</h1>{body}{table}<p>Made by infer eval.</p></body></html>\n",
        t = esc(title)
    )
}
