//! Finds where a dotted key path (`thresholds.quality.window_days`) sits in YAML text, so errors
//! found after parsing (cross-field checks) can still point at a line and column. It follows
//! block mappings by indentation, which is how config files are written; for a path it cannot
//! follow (flow style, anchors) it returns the deepest key it found, or nothing.

/// 1-based line and column of the last key of `key_path` that could be found.
pub fn find(text: &str, key_path: &str) -> Option<(usize, usize)> {
    let keys: Vec<&str> = key_path
        .split('.')
        .filter(|k| !k.is_empty() && !k.starts_with('['))
        .collect();
    let mut found = None;
    let mut depth = 0;
    let mut parent_indent: Option<usize> = None;
    for (index, line) in text.lines().enumerate() {
        if depth == keys.len() {
            break;
        }
        let content = line.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let indent = line.len() - content.len();
        if parent_indent.is_some_and(|p| indent <= p) {
            // Left the mapping we were searching in: the key is not there.
            break;
        }
        let key = content
            .split(':')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches(|c| c == '"' || c == '\'');
        if key == keys[depth] && content.contains(':') {
            found = Some((index + 1, indent + 1));
            parent_indent = Some(indent);
            depth += 1;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::find;

    #[test]
    fn finds_nested_keys() {
        let text = "feedback:\n  source: file\nthresholds:\n  # note\n  min_new_feedback: 3\n  quality:\n    window_days: 7\n";
        assert_eq!(find(text, "thresholds.min_new_feedback"), Some((5, 3)));
        assert_eq!(find(text, "thresholds.quality.window_days"), Some((7, 5)));
        assert_eq!(find(text, "feedback"), Some((1, 1)));
        // A missing leaf reports the deepest parent found.
        assert_eq!(find(text, "thresholds.quality.nope"), Some((6, 3)));
    }
}
