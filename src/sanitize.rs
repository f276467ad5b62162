//! Makes untrusted text safe to show on a terminal, in a log, or in the GitHub Actions log, and
//! keeps secrets out of what is shown. Markdown placement (pull requests, the step summary) is
//! [`crate::report::neutralize`]'s job; this module is about the lines themselves.
//!
//! Untrusted text is anything a feedback record, an API response or a file we did not write can
//! choose: model versions, ids, aspect names, cursors, error bodies. On a terminal it can hide or
//! rewrite what is shown (ANSI/OSC escapes, carriage returns, bidirectional overrides, invisible
//! characters). On an Actions runner every stdout/stderr line that starts with `::` is a workflow
//! command (`::error::`, `::stop-commands::`, which would switch off our own `::add-mask::`), and
//! the older `##[command]` form is recognised anywhere in a line. So:
//!
//! * [`terminal_line`] is for one value inside a line: escapes and controls removed, line breaks
//!   turned into spaces, and a value that could start a workflow command defused.
//! * [`terminal_block`] is for multi-line text we print as is (error chains, logs): the same, but
//!   line breaks are kept and every line is defused.
//! * [`error_body_excerpt`] is how an HTTP error body is shown: sanitised, on one line, with
//!   tokens and `Authorization` values redacted, at most [`ERROR_BODY_CHARS`] characters.
//! * [`redact_url`] hides the user-info part of a URL; [`json_text`] escapes the characters JSON
//!   would otherwise print raw (bidi, invisible, C1 controls) in a serialised document.
//!
//! Defusing inserts a space: `::error::x` becomes `: :error::x` and `##[error]` becomes `# #[error]`,
//! visible to a reader and no longer a command to the runner (which trims whitespace first).

use std::borrow::Cow;

/// The most characters of an error body that a message shows.
pub const ERROR_BODY_CHARS: usize = 500;

/// What replaces a secret in shown text.
const REDACTED: &str = "***";

/// Unicode bidirectional embedding, override, isolate and mark characters: they can make text
/// read differently from what it is (CVE-2021-42574, "Trojan Source").
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}'
    )
}

/// Characters that show nothing (zero-width spaces and joiners, word joiner and invisible
/// operators, the byte-order mark, the Mongolian vowel separator, interlinear annotation marks,
/// soft hyphen) and the tag block U+E0000–E007F, which can smuggle invisible ASCII.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200D}'
            | '\u{2060}'..='\u{2064}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

/// Line and paragraph separators that are not `\n` or `\r` but that some viewers break on.
fn is_unicode_break(c: char) -> bool {
    matches!(
        c,
        '\u{0085}' | '\u{2028}' | '\u{2029}' | '\u{000B}' | '\u{000C}'
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Breaks {
    /// `\n` and `\r` become spaces (tabs stay: they move the cursor but cannot hide text).
    Spaces,
    /// `\n` is kept; `\r\n` becomes `\n`; a lone `\r` (which would overwrite the line) too.
    Kept,
}

/// Neutralises one value that is printed inside a line: see the module documentation.
pub fn terminal_line(text: &str) -> Cow<'_, str> {
    scrub(text, Breaks::Spaces, false)
}

/// Neutralises multi-line text printed as is: line breaks kept, every line defused.
pub fn terminal_block(text: &str) -> Cow<'_, str> {
    scrub(text, Breaks::Kept, false)
}

/// [`terminal_block`] for the log writer: with `colours`, keeps SGR colour sequences
/// (`ESC [ 1;31 m`), which our logger writes on a terminal and which can do nothing but colour.
pub fn log_block(text: &str, colours: bool) -> Cow<'_, str> {
    scrub(text, Breaks::Kept, colours)
}

/// True when `text` needs no change, so the common case allocates nothing.
fn is_clean(text: &str, breaks: Breaks) -> bool {
    let chars_ok = text.chars().all(|c| {
        !(c.is_control() && !(c == '\n' && breaks == Breaks::Kept) && c != '\t')
            && !is_bidi_control(c)
            && !is_invisible(c)
            && !is_unicode_break(c)
    });
    chars_ok && !text.contains("##[") && text.split('\n').all(|l| !starts_command(l))
}

/// A line the runner would read as a workflow command: `::` after leading whitespace.
fn starts_command(line: &str) -> bool {
    line.trim_start().starts_with("::")
}

fn scrub(text: &str, breaks: Breaks, keep_sgr: bool) -> Cow<'_, str> {
    if is_clean(text, breaks) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1B}' => skip_escape(&mut chars, keep_sgr, &mut out),
            // 8-bit forms: CSI, and the string controls (DCS, SOS, OSC, PM, APC) up to their end.
            '\u{9B}' => {
                skip_csi(&mut chars, None);
            }
            '\u{90}' | '\u{98}' | '\u{9D}' | '\u{9E}' | '\u{9F}' => skip_string(&mut chars),
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push(if breaks == Breaks::Kept { '\n' } else { ' ' });
            }
            '\n' => out.push(if breaks == Breaks::Kept { '\n' } else { ' ' }),
            '\t' => out.push('\t'),
            c if is_unicode_break(c) => out.push(' '),
            c if c.is_control() || is_bidi_control(c) || is_invisible(c) => {}
            c => out.push(c),
        }
    }
    Cow::Owned(defuse(&out))
}

/// Consumes an escape sequence after ESC. With `keep_sgr`, a colour sequence is copied to `out`.
fn skip_escape(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    keep_sgr: bool,
    out: &mut String,
) {
    match chars.peek().copied() {
        Some('[') => {
            chars.next();
            let mut seq = String::from("\u{1B}[");
            let sgr = skip_csi(chars, Some(&mut seq));
            if keep_sgr && sgr {
                out.push_str(&seq);
            }
        }
        Some(']' | 'P' | 'X' | '^' | '_') => {
            chars.next();
            skip_string(chars);
        }
        // Two-character (and intermediate-byte) escapes such as `ESC c` (reset) or `ESC ( B`.
        Some(c) if (' '..='~').contains(&c) => {
            while let Some(&i) = chars.peek() {
                chars.next();
                if !(' '..='/').contains(&i) {
                    break;
                }
            }
        }
        _ => {}
    }
}

/// Consumes a CSI sequence's parameters and final byte; returns whether it was an SGR (colour)
/// sequence made only of digits and `;`. The bytes seen are appended to `seen` when given.
fn skip_csi(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    mut seen: Option<&mut String>,
) -> bool {
    let mut plain_params = true;
    while let Some(&c) = chars.peek() {
        if !('\u{20}'..='\u{7E}').contains(&c) {
            // Not a CSI byte: the sequence was cut; leave the character to the caller.
            return false;
        }
        chars.next();
        if let Some(s) = seen.as_deref_mut() {
            s.push(c);
        }
        if ('@'..='~').contains(&c) {
            return c == 'm' && plain_params;
        }
        if !(c.is_ascii_digit() || c == ';') {
            plain_params = false;
        }
    }
    false
}

/// Consumes a string control (OSC, DCS, …) up to BEL, ESC `\` or ST, or the end of the line.
fn skip_string(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) {
    while let Some(c) = chars.next() {
        match c {
            '\u{07}' | '\u{9C}' => return,
            '\u{1B}' => {
                if chars.peek() == Some(&'\\') {
                    chars.next();
                }
                return;
            }
            // A terminal would wait for the terminator; we give up at a line break so a stray OSC
            // cannot swallow the rest of the message.
            '\n' | '\r' => return,
            _ => {}
        }
    }
}

/// Breaks workflow commands: a `::` at a line start and `##[` anywhere.
fn defuse(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if starts_command(line) {
            let indent = line.len() - line.trim_start().len();
            out.push_str(&line[..indent]);
            out.push_str(": ");
            out.push_str(&line[indent + 1..]);
        } else {
            out.push_str(line);
        }
    }
    // Repeat until stable: `###[[` could re-form `##[` after one pass.
    while out.contains("##[") {
        out = out.replace("##[", "# #[");
    }
    out
}

/// How an HTTP error body is shown in a message: sanitised onto one line, secrets redacted (the
/// given `secrets`, e.g. the configured token, plus anything that looks like a bearer/basic
/// credential or an `Authorization` value a server echoed back), then cut to
/// [`ERROR_BODY_CHARS`] characters. Redaction comes before the cut so a cut cannot leave a
/// recognisable half of a token.
pub fn error_body_excerpt(body: &str, secrets: &[&str]) -> String {
    let line = terminal_line(body);
    let collapsed = line.split_whitespace().collect::<Vec<_>>().join(" ");
    if collapsed.is_empty() {
        return "(empty body)".to_owned();
    }
    let redacted = redact_secrets(&collapsed, secrets);
    defuse(&truncate(&redacted, ERROR_BODY_CHARS))
}

/// Replaces every occurrence of each secret, and credential-looking words after `Bearer`,
/// `Basic`, `token` or an `Authorization` key, with `***`.
pub fn redact_secrets(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_owned();
    // Longest first, so a secret that contains another is replaced whole.
    let mut secrets: Vec<&str> = secrets.iter().copied().filter(|s| !s.is_empty()).collect();
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for secret in secrets {
        out = out.replace(secret, REDACTED);
    }
    redact_credential_words(&out)
}

/// Characters a token is made of (RFC 6750 `b64token`, plus `%` for URL-encoded echoes).
fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~+/=%".contains(c)
}

/// Does this word look like a credential rather than an English word? Tokens are long and mix in
/// digits or punctuation; "bearer authentication" must stay readable.
fn looks_like_credential(word: &str) -> bool {
    // Mixed case counts past the first letter, so a capitalised word is still a word.
    let mixed_case = word.chars().skip(1).any(|c| c.is_ascii_uppercase())
        && word.chars().any(|c| c.is_ascii_lowercase());
    word.len() >= 8
        && word.chars().all(is_token_char)
        && (mixed_case
            || word
                .chars()
                .any(|c| c.is_ascii_digit() || "-._~+/=%".contains(c)))
}

/// HTTP authentication schemes: after `Authorization:` the word that follows one is the secret.
const AUTH_SCHEMES: &[&str] = &["bearer", "basic", "token", "digest", "negotiate", "ntlm"];

/// The word-level redaction behind [`redact_secrets`].
fn redact_credential_words(text: &str) -> String {
    // Split into words and separators, keeping both, so the text is rebuilt exactly.
    let mut pieces: Vec<(bool, &str)> = Vec::new();
    let mut start = 0;
    let mut in_word = false;
    for (i, c) in text.char_indices() {
        let word_char = is_token_char(c);
        if i > start && word_char != in_word {
            pieces.push((in_word, &text[start..i]));
            start = i;
        }
        in_word = word_char;
    }
    if start < text.len() {
        pieces.push((in_word, &text[start..]));
    }
    let words: Vec<usize> = (0..pieces.len()).filter(|&i| pieces[i].0).collect();
    let mut hide = vec![false; pieces.len()];
    for (n, &i) in words.iter().enumerate() {
        let word = pieces[i].1.to_ascii_lowercase();
        let next = words.get(n + 1).copied();
        let after = words.get(n + 2).copied();
        match word.as_str() {
            "bearer" | "basic" | "token" => {
                if let Some(j) = next.filter(|&j| looks_like_credential(pieces[j].1)) {
                    hide[j] = true;
                }
            }
            // `Authorization: <scheme> <value>` or `Authorization: <value>`: the value is secret
            // whatever it looks like.
            "authorization" | "proxy-authorization" | "x-api-key" => {
                if let Some(j) = next {
                    let scheme = AUTH_SCHEMES.contains(&pieces[j].1.to_ascii_lowercase().as_str());
                    match (scheme, after) {
                        (true, Some(k)) => hide[k] = true,
                        _ => hide[j] = true,
                    }
                }
            }
            _ => {}
        }
    }
    pieces
        .iter()
        .zip(hide)
        .map(|((_, piece), hide)| if hide { REDACTED } else { piece })
        .collect()
}

/// A URL (or text meant to be one) with any `user:password@` part replaced by `***@`, for
/// messages. Works on text that does not parse, so a refused URL can be named safely.
pub fn redact_url(text: &str) -> String {
    let Some(scheme_end) = text.find("://") else {
        return text.to_owned();
    };
    let authority_start = scheme_end + 3;
    let rest = &text[authority_start..];
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    match authority.rfind('@') {
        Some(at) => format!(
            "{}{REDACTED}{}",
            &text[..authority_start],
            &text[authority_start + at..]
        ),
        None => text.to_owned(),
    }
}

/// Escapes, in a serialised JSON document, the characters that serde_json writes raw but that a
/// terminal would act on or hide: DEL and C1 controls, bidi controls, invisible characters and
/// Unicode line separators. JSON allows them only inside strings, where `\uXXXX` means the same
/// character, so the document's value is unchanged.
pub fn json_text(json: &str) -> Cow<'_, str> {
    let needs = |c: char| {
        c.is_control() && !matches!(c, '\n' | '\t' | '\r')
            || is_bidi_control(c)
            || is_invisible(c)
            || is_unicode_break(c)
    };
    if !json.chars().any(needs) && !json.contains("##[") {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if needs(c) {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        } else {
            out.push(c);
        }
    }
    // The runner's legacy `##[command]` form is read anywhere in a line; `[` as `\u005b` means
    // the same inside a JSON string, the only place `#` can occur.
    Cow::Owned(out.replace("##[", "##\\u005b"))
}

/// Cuts `text` to at most `max_chars` characters, appending a marker that says how much was cut.
pub fn truncate(text: &str, max_chars: usize) -> String {
    let total = text.chars().count();
    if total <= max_chars {
        return text.to_string();
    }
    let kept: String = text.chars().take(max_chars).collect();
    format!("{kept}… [truncated: {} more characters]", total - max_chars)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_text_is_borrowed() {
        assert!(matches!(terminal_line("policy-v2 ok: 1"), Cow::Borrowed(_)));
        assert!(matches!(terminal_block("a\nb:: c"), Cow::Borrowed(_)));
    }

    #[test]
    fn ansi_csi_and_osc_escapes_are_removed() {
        assert_eq!(terminal_line("a\u{1B}[31mred\u{1B}[0m b"), "ared b");
        assert_eq!(terminal_line("x\u{1B}[2J\u{1B}[1;1Hy"), "xy");
        // OSC 8 hyperlink and a title change, ended by ST and by BEL.
        assert_eq!(
            terminal_line(
                "\u{1B}]8;;http://evil\u{1B}\\click\u{1B}]8;;\u{1B}\\ \u{1B}]0;pwned\u{07}z"
            ),
            "click z"
        );
        // 8-bit CSI and OSC.
        assert_eq!(terminal_line("a\u{9B}31mb\u{9D}0;t\u{9C}c"), "abc");
        // Two-character escapes and a trailing lone ESC.
        assert_eq!(terminal_line("a\u{1B}cb\u{1B}(Bc\u{1B}"), "abc");
    }

    #[test]
    fn c0_and_c1_controls_are_removed_and_breaks_become_spaces() {
        assert_eq!(
            terminal_line("a\u{07}b\u{08}c\u{7F}d\u{85}e\u{80}f"),
            "abcd ef"
        );
        assert_eq!(
            terminal_line("one\ntwo\r\nthree\rfour\tfive"),
            "one two three four\tfive"
        );
        assert_eq!(terminal_block("one\r\ntwo\rthree"), "one\ntwo\nthree");
    }

    #[test]
    fn bidi_overrides_and_isolates_are_removed() {
        for c in [
            '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}', '\u{2067}',
            '\u{2068}', '\u{2069}', '\u{200E}', '\u{200F}', '\u{061C}',
        ] {
            assert_eq!(terminal_line(&format!("ab{c}cd")), "abcd", "{:X}", c as u32);
        }
    }

    #[test]
    fn invisible_and_separator_characters_are_removed() {
        assert_eq!(
            terminal_line("a\u{200B}b\u{200D}c\u{2060}d\u{FEFF}e\u{E0041}f"),
            "abcdef"
        );
        assert_eq!(terminal_line("a\u{2028}b\u{2029}c"), "a b c");
    }

    #[test]
    fn workflow_commands_are_defused() {
        assert_eq!(terminal_line("::error::MV-INJ"), ": :error::MV-INJ");
        assert_eq!(
            terminal_line("  ::stop-commands::x"),
            "  : :stop-commands::x"
        );
        // A command hidden behind an invisible character or a line break.
        assert_eq!(terminal_line("\u{200B}::error::x"), ": :error::x");
        assert_eq!(terminal_line("pv\n::error::x"), "pv ::error::x");
        let block = terminal_block("ok\n::error::x\n\t::add-mask::y\n##[error]z");
        assert_eq!(block, "ok\n: :error::x\n\t: :add-mask::y\n# #[error]z");
        assert!(!terminal_line("a ###[[x").contains("##["));
        // Colons inside a line are data, not commands.
        assert_eq!(terminal_line("a::b"), "a::b");
    }

    #[test]
    fn log_block_keeps_only_colour_sequences() {
        let text =
            "\u{1B}[2m2026\u{1B}[0m \u{1B}[33mWARN\u{1B}[0m x\u{1B}]0;t\u{07}\u{1B}[2J\n::error::y";
        assert_eq!(
            log_block(text, true),
            "\u{1B}[2m2026\u{1B}[0m \u{1B}[33mWARN\u{1B}[0m x\n: :error::y"
        );
        assert_eq!(log_block(text, false), "2026 WARN x\n: :error::y");
    }

    #[test]
    fn error_bodies_are_cut_sanitised_and_redacted() {
        let body = format!(
            "\u{1B}[31mdenied\u{1B}[0m\u{202E}\n::error::INJ\nAuthorization: Bearer sekret-9f2a\nconfigured=my-token-123 {}",
            "x".repeat(2000)
        );
        let shown = error_body_excerpt(&body, &["my-token-123"]);
        assert!(
            shown.starts_with("denied ::error::INJ Authorization: Bearer *** configured=***"),
            "{shown}"
        );
        assert!(!shown.contains('\u{1B}') && !shown.contains('\u{202E}') && !shown.contains('\n'));
        assert!(
            shown.chars().count() < ERROR_BODY_CHARS + 50,
            "{}",
            shown.len()
        );
        assert!(shown.contains("[truncated: "), "{shown}");
        assert_eq!(error_body_excerpt(" \n ", &[]), "(empty body)");
        assert_eq!(error_body_excerpt("::error::x", &[]), ": :error::x");
    }

    #[test]
    fn credential_words_are_redacted_but_prose_is_not() {
        assert_eq!(
            redact_secrets(r#"{"authorization":"token ghp_abc123"}"#, &[]),
            r#"{"authorization":"token ***"}"#
        );
        assert_eq!(
            redact_secrets("Authorization: s3cr3t", &[]),
            "Authorization: ***"
        );
        assert_eq!(redact_secrets("Basic dXNlcjpwYXNz", &[]), "Basic ***");
        assert_eq!(
            redact_secrets("missing or wrong bearer token", &[]),
            "missing or wrong bearer token"
        );
        assert_eq!(redact_secrets("a tok-123 b", &["tok-123", ""]), "a *** b");
    }

    #[test]
    fn url_user_info_is_hidden() {
        assert_eq!(
            redact_url("http://user:pass@host:8/p?q=1"),
            "http://***@host:8/p?q=1"
        );
        assert_eq!(redact_url("https://tok@h/a@b"), "https://***@h/a@b");
        assert_eq!(redact_url("https://h/p"), "https://h/p");
        assert_eq!(redact_url("no url"), "no url");
        assert_eq!(redact_url("http://u:p a ss@h"), "http://***@h");
    }

    #[test]
    fn json_escapes_what_a_terminal_would_act_on() {
        let value = "a\u{202E}b\u{9B}c\u{E0041}\n##[error]x";
        let doc = serde_json::to_string(&serde_json::json!({ "v": value })).unwrap();
        let safe = json_text(&doc);
        assert_eq!(
            safe,
            r#"{"v":"a\u202eb\u009bc\udb40\udc41\n##\u005berror]x"}"#
        );
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back["v"], value);
    }
}
