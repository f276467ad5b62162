//! Checks for single config fields that several sections share: a `*_env` value must name an
//! environment variable (never hold the secret), an http(s) URL must not carry credentials, and a
//! repository is `owner/name`. Each section's validator calls these; none of them calls a section.

use super::Invalid;

/// Checks a `*_env` key: it names the environment variable that holds a secret. A value that is
/// not a variable name, or that looks like a token, is refused without being repeated (it may
/// be the secret itself, and the error goes to a log).
pub fn env_name(key: &str, name: String, example: &str) -> Result<String, Invalid> {
    let is_name = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if is_name && !looks_like_token(&name) {
        return Ok(name);
    }
    let what = if is_name {
        "looks like a token, not the NAME of an environment variable"
    } else {
        "is not the NAME of an environment variable (letters, digits and _) and may be the token itself"
    };
    Err(Invalid::new(
        key,
        format!(
            "the value ({} characters, not shown) {what}\nhint: put the token in an environment variable (in a workflow: a secret in `env:`) and write its name here, e.g. `{}: {example}`; if a real token was written in the config, revoke it",
            name.chars().count(),
            key.rsplit('.').next().unwrap_or(key),
        ),
    ))
}

/// Token shapes: the prefixes GitHub, GitLab, Slack, OpenAI and others give their tokens, or a
/// long mix of lower-case letters and digits that no one picks as a variable name.
fn looks_like_token(name: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "ghp_",
        "gho_",
        "ghu_",
        "ghs_",
        "ghr_",
        "github_pat_",
        "glpat",
        "xox",
        "sk_",
        "sk-",
        "hf_",
    ];
    let lower = name.to_ascii_lowercase();
    let known = PREFIXES
        .iter()
        .any(|p| lower.starts_with(p) && name.len() > p.len() + 8);
    let mixed = name.len() >= 20
        && name.chars().any(|c| c.is_ascii_lowercase())
        && name.chars().any(|c| c.is_ascii_digit());
    known || mixed
}

/// Parses an http(s) URL setting. Credentials in it are refused, naming the URL with them hidden:
/// they would be printed (`config check`, errors) and sent as Basic auth instead of the token.
pub fn http_url(key: &str, text: &str, token_key: &str) -> Result<url::Url, Invalid> {
    let shown = crate::sanitize::redact_url(text);
    let url = url::Url::parse(text)
        .map_err(|e| Invalid::new(key, format!("not a URL ({shown:?}): {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Invalid::new(
            key,
            format!("expected an http(s) URL, got {shown:?}"),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Invalid::new(
            key,
            format!(
                "the URL carries credentials ({shown:?}); they would be printed and sent instead of the token\nhint: remove the `user:password@` part and put the token in the environment variable that `{token_key}` names"
            ),
        ));
    }
    Ok(url)
}

/// Splits an `owner/name` repository setting.
pub fn owner_repo<'a>(key: &str, repo: &'a str) -> Result<(&'a str, &'a str), Invalid> {
    repo.split_once('/')
        .filter(|(o, n)| !o.is_empty() && !n.is_empty() && !n.contains('/'))
        .ok_or_else(|| Invalid::new(key, format!("expected owner/name, got {repo:?}")))
}
