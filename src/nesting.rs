//! Refuses YAML nested deeper than [`MAX_DEPTH`] before it reaches the parser. A file of a few
//! hundred kilobytes of `[[[[…` or ever-deeper indentation costs the YAML parser close to a
//! minute before its own recursion limit answers; the config and the registry are a handful of
//! levels deep, so a cheap linear scan can refuse such a file at once, naming the line.
//!
//! The scan follows YAML only as far as depth needs: block indentation (one level per deeper
//! indent, plus one per `- ` sequence marker opening a line's content), flow brackets outside
//! quoted scalars and comments, and block scalars (`|`, `>`), whose content is text. It can
//! over-count brackets inside unquoted scalars, which real files do not nest 64 deep.

/// The deepest nesting accepted; real configs and registries use fewer than 10 levels.
pub const MAX_DEPTH: usize = 64;

/// Where the text first went deeper than the limit (1-based line). Its message leaves the
/// position to the caller, which prefixes the file and line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooDeep {
    pub line: usize,
    pub max: usize,
}

impl std::fmt::Display for TooDeep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the YAML is nested more than {} levels deep\nhint: this file is only a few levels deep when written by hand or by the bot; check that it is the intended file",
            self.max
        )
    }
}

/// Checks `text` against `max` levels of nesting.
pub fn check(text: &str, max: usize) -> Result<(), TooDeep> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    // A quoted scalar can span lines: the quote character while inside one.
    let mut quote: Option<char> = None;
    // The indent of the line that opened a block scalar, while inside its content.
    let mut block_scalar: Option<usize> = None;
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let content = line.trim_start_matches(' ');
        let indent = line.len() - content.len();
        if let Some(opened_at) = block_scalar {
            if content.trim().is_empty() || indent > opened_at {
                continue;
            }
            block_scalar = None;
        }
        let mut depth_here = 0;
        if quote.is_none() && flow == 0 {
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            while indents.last().is_some_and(|&top| top >= indent) {
                indents.pop();
            }
            indents.push(indent);
            depth_here = indents.len() + sequence_markers(content).saturating_sub(1);
        }
        let scanned = scan_flow(content, &mut flow, &mut quote);
        if depth_here + scanned.max_flow > max {
            return Err(TooDeep { line: line_no, max });
        }
        if scanned.opens_block_scalar && flow == 0 && quote.is_none() {
            block_scalar = Some(indent);
        }
    }
    Ok(())
}

/// `- - - x` nests three sequences on one line; the markers after the first are levels that the
/// indentation does not show.
fn sequence_markers(content: &str) -> usize {
    let mut rest = content;
    let mut n = 0;
    while let Some(after) = rest
        .strip_prefix("- ")
        .or_else(|| rest.strip_prefix("? "))
        .or_else(|| (rest == "-").then_some(""))
    {
        n += 1;
        rest = after.trim_start_matches(' ');
    }
    n
}

struct Scanned {
    /// The deepest flow nesting reached on this line (carried-over depth included).
    max_flow: usize,
    /// The line ends in a block scalar indicator (`key: |`, `- >-`).
    opens_block_scalar: bool,
}

/// Follows flow brackets and quotes through one line, updating the state carried across lines.
fn scan_flow(content: &str, flow: &mut usize, quote: &mut Option<char>) -> Scanned {
    let mut max_flow = *flow;
    let mut prev = ' ';
    let mut chars = content.chars().peekable();
    // The last whitespace-separated token outside quotes and comments.
    let mut last_token = String::new();
    let mut token_done = false;
    while let Some(c) = chars.next() {
        match *quote {
            Some('"') => match c {
                '\\' => {
                    chars.next();
                }
                '"' => *quote = None,
                _ => {}
            },
            Some(_) => {
                if c == '\'' {
                    if chars.peek() == Some(&'\'') {
                        chars.next();
                    } else {
                        *quote = None;
                    }
                }
            }
            None => {
                let token_start = prev.is_whitespace() || "[{,:-?".contains(prev);
                match c {
                    '#' if prev.is_whitespace() => break,
                    '"' | '\'' if token_start => *quote = Some(c),
                    '[' | '{' => {
                        *flow += 1;
                        max_flow = max_flow.max(*flow);
                    }
                    ']' | '}' => *flow = flow.saturating_sub(1),
                    _ => {}
                }
                if c.is_whitespace() {
                    token_done = true;
                } else {
                    if token_done {
                        last_token.clear();
                        token_done = false;
                    }
                    last_token.push(c);
                }
            }
        }
        prev = c;
    }
    let opens_block_scalar = quote.is_none()
        && last_token.starts_with(['|', '>'])
        && last_token[1..]
            .chars()
            .all(|c| c == '+' || c == '-' || c.is_ascii_digit());
    Scanned {
        max_flow,
        opens_block_scalar,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_yaml_passes() {
        let text = "a:\n  b: [1, {c: d}]\n  e:\n    - f\n    - g: 'x [ y'\n      h: \"[[[\"\n# [[[[\nk: |\n  [[[[[[\n  {{{{\nl: 1 # ]]]\nm: >- # folded\n  [[[[[\n";
        assert_eq!(check(text, 4), Ok(()));
    }

    #[test]
    fn deep_indentation_is_refused_at_its_line() {
        let text: String = (0..100)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        assert_eq!(check(&text, 64), Err(TooDeep { line: 65, max: 64 }));
    }

    #[test]
    fn deep_flow_brackets_are_refused() {
        let text = format!("a: {}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(check(&text, 64), Err(TooDeep { line: 1, max: 64 }));
        // Spread over lines, too.
        let lines = format!("a:\n{}", "  [\n".repeat(100));
        assert!(check(&lines, 64).is_err());
        // Inside quotes it is text.
        let quoted = format!("a: \"{}\"", "[".repeat(100));
        assert_eq!(check(&quoted, 64), Ok(()));
    }

    #[test]
    fn sequence_markers_on_one_line_count() {
        let text = format!("{}x\n", "- ".repeat(100));
        assert!(check(&text, 64).is_err());
        assert_eq!(check("- - x\n", 2), Ok(()));
    }

    #[test]
    fn deep_text_refused_quickly_at_scale() {
        // 100k levels: the scan stops at the limit instead of walking the whole parser.
        let text: String = (0..100_000).map(|_| "- ").collect::<String>() + "x";
        assert!(check(&text, MAX_DEPTH).is_err());
    }
}
