//! Makes untrusted text (prompts, model answers, anything from the feedback API) safe to place in
//! a GitHub pull request or Markdown file.
//!
//! Model output is attacker-influenced: a user can ask the assistant to print `@org/team`, an
//! `<img>` tag pointing at a tracker, or a ``` line that closes our code fence and injects
//! Markdown. On GitHub that would ping people, load remote content in reviewers' browsers, or
//! forge parts of the report. Two placements exist and each has one function:
//!
//! * [`inline`] for prose and table cells: HTML and Markdown punctuation escaped (no tags, links or
//!   images), `@mentions` and `#123` references broken with a zero-width joiner so they neither
//!   notify nor cross-reference, newlines turned into `<br>`, length capped.
//! * [`fenced`] for blocks: a code fence longer than any backtick run inside, so nothing can close
//!   it; inside a fence GitHub renders no HTML, mentions, references or images, so the text stays
//!   verbatim (a reviewer can copy a prompt exactly).
//!
//! Both strip control and bidirectional-override characters (which can make a reviewer read
//! something other than what is there) and truncate long text with a visible marker.
//! [`truncate_markdown`] cuts a whole document to a size limit without leaving a fence open.

use crate::sanitize::truncate;

/// U+200D ZERO WIDTH JOINER: invisible, and not a word character, so `@\u{200D}team` is no mention.
const ZWJ: char = '\u{200D}';

/// Characters dropped from untrusted text: C0/C1 controls (except tab and newline), and the Unicode
/// bidirectional controls (one list, in [`crate::sanitize`]).
fn is_dropped(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t') || crate::sanitize::is_bidi_control(c)
}

/// Normalises line endings and removes dropped characters.
pub fn clean(text: &str) -> String {
    text.replace("\r\n", "\n")
        .chars()
        .filter(|&c| c != '\r' && !is_dropped(c))
        .collect()
}

/// Escapes untrusted text for a sentence or a Markdown table cell.
pub fn inline(text: &str, max_chars: usize) -> String {
    let text = truncate(clean(text).trim(), max_chars);
    let mut out = String::with_capacity(text.len() + text.len() / 8);
    let mut prev: Option<char> = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let next = chars.peek().copied();
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\n' => out.push_str("<br>"),
            '\t' => out.push(' '),
            // Markdown punctuation that could start emphasis, code, links, images, tables or
            // strike-through. Escaping `[` and `]` alone already rules out links and images.
            '\\' | '`' | '*' | '_' | '[' | ']' | '|' | '~' | '!' | '$' => {
                out.push('\\');
                out.push(c);
            }
            '@' | '#' => {
                out.push(c);
                // A mention needs `@` then a name character; a reference needs `#` then a digit.
                // Only break them when they could form one (GitHub also requires a non-word
                // character before, but breaking a few e-mail-like strings is harmless).
                let starts_ref = match c {
                    '@' => next.is_some_and(|n| n.is_ascii_alphanumeric()),
                    _ => next.is_some_and(|n| n.is_ascii_digit()),
                };
                if starts_ref && !prev.is_some_and(|p| p.is_ascii_alphanumeric() && c == '#') {
                    out.push(ZWJ);
                }
            }
            _ => out.push(c),
        }
        prev = Some(c);
    }
    out
}

/// Wraps untrusted text in a code fence that the text cannot close. `info` is the fence's info
/// string (e.g. `text`); it is ours, not the untrusted input's.
pub fn fenced(text: &str, max_chars: usize, info: &str) -> String {
    let text = truncate(&clean(text), max_chars);
    let longest = longest_run(&text, '`');
    let fence = "`".repeat(longest.max(2) + 1);
    let body = text.trim_end_matches('\n');
    format!("{fence}{info}\n{body}\n{fence}")
}

/// Length of the longest run of `c` in `text`.
fn longest_run(text: &str, c: char) -> usize {
    let (mut best, mut run) = (0, 0);
    for ch in text.chars() {
        if ch == c {
            run += 1;
            best = best.max(run);
        } else {
            run = 0;
        }
    }
    best
}

/// Text that is safe inside a code span in a table: ids, hashes, model names. Falls back to
/// [`inline`] escaping when the text holds anything outside a conservative alphabet.
pub fn code(text: &str) -> String {
    let safe = !text.is_empty()
        && text.chars().count() <= 200
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.+/:=,".contains(c));
    if safe {
        format!("`{text}`")
    } else {
        inline(text, 200)
    }
}

/// Cuts a Markdown document to at most `limit` bytes (GitHub counts characters; bytes are never
/// fewer, so a byte limit is safe) at the end of the last whole block that fits (else at a line
/// boundary, closing a code fence left open), closes open `<details>` and appends `notice`. Returns the document unchanged when it fits.
pub fn truncate_markdown(md: &str, limit: usize, notice: &str) -> String {
    if md.len() <= limit {
        return md.to_string();
    }
    // Besides an open fence, a cut can leave `<details>` blocks open, which would fold the notice
    // out of sight. Only our templates write `<details>` lines (untrusted text is escaped or
    // fenced), so counting them outside fences is reliable.
    const CLOSE_DETAILS: &str = "\n</details>\n";
    let mut out = String::new();
    let mut open: Option<(char, usize)> = None;
    let mut details = 0usize;
    // The last blank line outside any fence: cutting there ends on a whole block (a table, a
    // code block), not on half of one.
    let mut block_end: Option<(usize, usize)> = None;
    let mut cut = false;
    for line in md.split_inclusive('\n') {
        let next_open = fence_transition(open, line);
        let mut next_details = details;
        if open.is_none() && next_open.is_none() {
            match line.trim() {
                "<details>" => next_details += 1,
                "</details>" => next_details = next_details.saturating_sub(1),
                _ => {}
            }
        }
        // What closing the cut would need, whether we stop before or after this line.
        let closing = open
            .map_or(0, |(_, n)| n + 1)
            .max(next_open.map_or(0, |(_, n)| n + 1))
            + details.max(next_details) * CLOSE_DETAILS.len();
        let need = out.len() + line.len() + closing + notice.len() + 4;
        if need > limit {
            cut = true;
            break;
        }
        out.push_str(line);
        open = next_open;
        details = next_details;
        if open.is_none() && line.trim().is_empty() {
            block_end = Some((out.len(), details));
        }
    }
    // Roll back only when that loses little; one huge block is better cut than dropped.
    if cut
        && let Some((len, d)) = block_end
        && len + limit / 4 >= out.len()
    {
        out.truncate(len);
        open = None;
        details = d;
    }
    if !out.ends_with('\n') && !out.is_empty() {
        out.push('\n');
    }
    if let Some((c, n)) = open {
        out.push_str(&c.to_string().repeat(n));
        out.push('\n');
    }
    for _ in 0..details {
        out.push_str(CLOSE_DETAILS);
    }
    out.push('\n');
    out.push_str(notice);
    if out.len() > limit {
        // Only when the notice itself does not fit: cut it at a character boundary.
        let mut end = limit;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
    }
    out
}

/// CommonMark fence rules, enough for our output: a fence line is up to 3 spaces of indent then
/// 3+ backticks or tildes; it closes an open fence of the same character and at least the same
/// length when nothing but spaces follow.
fn fence_transition(open: Option<(char, usize)>, line: &str) -> Option<(char, usize)> {
    let line = line.trim_end_matches(['\n', '\r']);
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return open;
    }
    let rest = &line[indent..];
    let Some(c) = rest.chars().next().filter(|c| *c == '`' || *c == '~') else {
        return open;
    };
    let n = rest.chars().take_while(|&x| x == c).count();
    if n < 3 {
        return open;
    }
    let after = &rest[n..];
    match open {
        Some((oc, on)) => {
            if oc == c && n >= on && after.trim().is_empty() {
                None
            } else {
                open
            }
        }
        None => {
            // A backtick fence's info string may not contain backticks.
            if c == '`' && after.contains('`') {
                None
            } else {
                Some((c, n))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_and_references_are_broken() {
        let s = inline(
            "hi @octocat and @org/team, see #12; mail a@b.c; issue#3",
            1000,
        );
        assert!(!s.contains("@octocat"));
        assert!(s.contains("@\u{200D}octocat"));
        assert!(s.contains("@\u{200D}org/team"));
        assert!(s.contains("#\u{200D}12"));
        assert!(s.contains("issue#3"), "{s}");
    }

    #[test]
    fn html_and_images_are_escaped() {
        let s = inline(
            "<img src=x onerror=alert(1)> ![t](http://e/x.png) a|b",
            1000,
        );
        assert!(!s.contains('<'), "{s}");
        assert!(s.contains("&lt;img src=x onerror=alert(1)&gt;"));
        assert!(s.contains("\\!\\[t\\](http://e/x.png)"));
        assert!(s.contains("a\\|b"));
    }

    #[test]
    fn fence_outlasts_any_backtick_run() {
        let f = fenced("x\n```\n````` y", 1000, "text");
        assert!(f.starts_with("``````text\n"));
        assert!(f.ends_with("\n``````"));
        let plain = fenced("no ticks", 1000, "");
        assert!(plain.starts_with("```\n"));
    }

    #[test]
    fn controls_and_bidi_are_dropped() {
        assert_eq!(clean("a\u{202E}b\u{0007}c\r\nd"), "abc\nd");
    }

    #[test]
    fn truncation_says_how_much() {
        assert_eq!(
            truncate("abcdef", 4),
            "abcd… [truncated: 2 more characters]"
        );
        assert_eq!(truncate("abc", 4), "abc");
    }

    #[test]
    fn markdown_cut_closes_open_fence() {
        let md = format!("# T\n\n````text\n{}\n````\ntail\n", "line\n".repeat(100));
        let cut = truncate_markdown(&md, 200, "CUT");
        assert!(cut.len() <= 200, "{}", cut.len());
        assert!(cut.ends_with("CUT"));
        assert!(cut.contains("\n````\n\nCUT"), "{cut}");
        assert_eq!(truncate_markdown("short", 200, "CUT"), "short");
    }

    #[test]
    fn markdown_cut_prefers_a_block_boundary() {
        let block = "```text\nsome prompt\n```\n\n| a | b |\n|---|---|\n| x | y |\n\n";
        let md = format!("# T\n\n{}", block.repeat(20));
        let cut = truncate_markdown(&md, 300, "CUT");
        assert!(cut.len() <= 300, "{}", cut.len());
        assert!(cut.ends_with("| x | y |\n\n\nCUT"), "{cut}");
    }

    #[test]
    fn markdown_cut_closes_open_details() {
        let md = format!(
            "a\n<details>\n<summary>s</summary>\n\n{}</details>\n",
            "row\n".repeat(100)
        );
        let cut = truncate_markdown(&md, 120, "CUT");
        assert!(cut.len() <= 120, "{}", cut.len());
        assert!(cut.ends_with("</details>\n\nCUT"), "{cut}");
    }
}
