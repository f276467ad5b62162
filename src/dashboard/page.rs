//! The dashboard as one self-contained HTML page: styles, the page script (`dashboard.js`) and
//! the data inline, nothing from a CDN, so the same bytes work served live by `rlhf-bot serve`
//! and as a static GitHub Pages site.

use super::data::DashboardData;

const SCRIPT: &str = include_str!("dashboard.js");

const STYLE: &str = r#"
:root { color-scheme: light dark; font-family: system-ui, sans-serif; line-height: 1.4; }
body { margin: 0 auto; max-width: 1200px; padding: 1rem 1.5rem 3rem; }
header { display: flex; flex-wrap: wrap; gap: 1rem; align-items: baseline; }
header h1 { margin: 0; font-size: 1.5rem; }
#meta { display: flex; gap: 1rem; align-items: baseline; flex-wrap: wrap; opacity: .9; }
h2 { margin-top: 2rem; font-size: 1.15rem; border-bottom: 1px solid color-mix(in srgb, currentColor 25%, transparent); }
table { border-collapse: collapse; width: 100%; font-size: .9rem; }
th, td { text-align: left; padding: .3rem .5rem; border-bottom: 1px solid color-mix(in srgb, currentColor 15%, transparent); vertical-align: top; overflow-wrap: anywhere; }
.badge { border-radius: .6rem; padding: 0 .5rem; font-size: .8rem; border: 1px solid currentColor; white-space: nowrap; }
.badge.production { color: #16a34a; } .badge.previous { color: #2563eb; }
.badge.candidate { color: #ca8a04; } .badge.rejected { opacity: .6; }
.chart { width: 100%; max-width: 560px; height: auto; }
.chart .axis line { stroke: currentColor; stroke-opacity: .5; }
.chart .axis text { fill: currentColor; font-size: 11px; }
.legend { list-style: none; display: flex; flex-wrap: wrap; gap: .8rem; padding: 0; font-size: .85rem; }
.swatch { display: inline-block; width: .8rem; height: .8rem; margin-right: .3rem; border-radius: .2rem; }
.controls { display: flex; gap: .5rem; align-items: center; margin: .5rem 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 1rem; }
figure { margin: 0; }
td:first-child { white-space: nowrap; }
#notes { font-size: .85rem; opacity: .8; }
button, select { font: inherit; }
"#;

/// The page for `data`.
pub fn render(data: &DashboardData) -> String {
    format!(
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>rlhf-bot dashboard</title>
<style>{STYLE}</style>
</head>
<body>
<header><h1>rlhf-bot dashboard</h1><div id="meta"></div></header>
<ul id="notes"></ul>
<main id="main"></main>
<script id="rlhf-data" type="application/json">{}</script>
<script>{SCRIPT}</script>
</body>
</html>
"#,
        script_safe_json(data)
    )
}

/// JSON that cannot end the `<script>` element it sits in: `<`, `>` and `&` are written as
/// `\u003c`-style escapes, which JSON allows anywhere in a string (and they occur nowhere else).
pub fn script_safe_json<T: serde::Serialize>(value: &T) -> String {
    let json = serde_json::to_string(value).unwrap_or_else(|_| "null".into());
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_cannot_leave_the_data_element() {
        let hostile = serde_json::json!({"v": "</script><script>alert(1)</script>&amp;\u{2028}"});
        let out = script_safe_json(&hostile);
        assert!(
            !out.contains('<') && !out.contains('>') && !out.contains('&'),
            "{out}"
        );
        let back: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(back, hostile);
    }
}
