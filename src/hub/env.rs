//! The environment HF tools read, read the same way here so the cache and the login are shared
//! with `huggingface_hub`:
//!
//! - `HF_HOME` (default `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`);
//! - `HF_HUB_CACHE` (legacy `HUGGINGFACE_HUB_CACHE`; default `$HF_HOME/hub`): the model cache;
//! - `HF_ENDPOINT` (default `https://huggingface.co`): a mirror;
//! - `HF_TOKEN`, else the file `HF_TOKEN_PATH` (default `$HF_HOME/token`, what `hf auth login`
//!   writes): a bearer token for gated and private models, held as a [`SecretString`];
//! - `HF_HUB_OFFLINE` (`1`, `true`, `yes`, `on`): no network, the cache only.

use std::path::{Path, PathBuf};

use crate::sanitize::redact_url;
use crate::secret::SecretString;

/// The public Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where models are fetched from and kept, and with which credentials.
#[derive(Debug, Clone)]
pub struct HubEnv {
    /// Without a trailing `/`.
    pub endpoint: String,
    /// The `hub/` cache folder (holding `models--ORG--NAME/`).
    pub cache_dir: PathBuf,
    pub token: Option<SecretString>,
    /// The token file that was (or would be) read, for hints.
    pub token_file: PathBuf,
    pub offline: bool,
}

impl HubEnv {
    /// From the process environment.
    pub fn from_env() -> Result<Self, String> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// From any variable lookup (tests pass a map); a blank variable counts as unset.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, String> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let hf_home = match var("HF_HOME") {
            Some(dir) => PathBuf::from(dir),
            None => match var("XDG_CACHE_HOME") {
                Some(dir) => PathBuf::from(dir).join("huggingface"),
                None => PathBuf::from(var("HOME").unwrap_or_default()).join(".cache/huggingface"),
            },
        };
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map_or_else(|| hf_home.join("hub"), PathBuf::from);
        let endpoint = match var("HF_ENDPOINT") {
            Some(url) => checked_endpoint(&url)?,
            None => DEFAULT_ENDPOINT.to_string(),
        };
        let token_file = var("HF_TOKEN_PATH").map_or_else(|| hf_home.join("token"), PathBuf::from);
        let token = match var("HF_TOKEN") {
            Some(token) => Some(SecretString::new(token.trim())),
            None => read_token_file(&token_file)?,
        };
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Ok(Self {
            endpoint,
            cache_dir,
            token,
            token_file,
            offline,
        })
    }
}

/// `HF_ENDPOINT` as an http(s) base URL without a trailing `/`.
fn checked_endpoint(value: &str) -> Result<String, String> {
    let trimmed = value.trim().trim_end_matches('/');
    match url::Url::parse(trimmed) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
            Ok(trimmed.to_string())
        }
        _ => Err(format!(
            "HF_ENDPOINT={} is not an http(s) URL\nhint: set it to a Hub mirror such as https://hf-mirror.example, or unset it for {DEFAULT_ENDPOINT}",
            redact_url(value)
        )),
    }
}

/// The token `hf auth login` saved, if any. The file's content is never shown.
fn read_token_file(path: &Path) -> Result<Option<SecretString>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) if text.trim().is_empty() => Ok(None),
        Ok(text) => Ok(Some(SecretString::new(text.trim()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!(
            "cannot read the Hugging Face token file {}: {e}\nhint: fix its permissions, set HF_TOKEN instead, or point HF_TOKEN_PATH elsewhere",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> Result<HubEnv, String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        HubEnv::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_follow_huggingface_hub() {
        let env = env_of(&[("HOME", "/home/u")]).unwrap();
        assert_eq!(env.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(
            env.cache_dir,
            PathBuf::from("/home/u/.cache/huggingface/hub")
        );
        assert_eq!(
            env.token_file,
            PathBuf::from("/home/u/.cache/huggingface/token")
        );
        assert!(!env.offline);
        let env = env_of(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")]).unwrap();
        assert_eq!(env.cache_dir, PathBuf::from("/xdg/huggingface/hub"));
    }

    #[test]
    fn variables_override_and_the_token_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "hf_from_file\n").unwrap();
        let home = dir.path().to_str().unwrap();
        let env = env_of(&[
            ("HF_HOME", home),
            ("HF_ENDPOINT", "http://127.0.0.1:9/"),
            ("HF_HUB_OFFLINE", "True"),
        ])
        .unwrap();
        assert_eq!(env.endpoint, "http://127.0.0.1:9");
        assert_eq!(env.cache_dir, dir.path().join("hub"));
        assert_eq!(env.token.unwrap().expose(), "hf_from_file");
        assert!(env.offline);
        let env = env_of(&[
            ("HF_HOME", home),
            ("HF_TOKEN", "hf_from_env"),
            ("HF_HUB_CACHE", "/elsewhere"),
        ])
        .unwrap();
        assert_eq!(env.token.unwrap().expose(), "hf_from_env");
        assert_eq!(env.cache_dir, PathBuf::from("/elsewhere"));
    }

    #[test]
    fn a_bad_endpoint_is_named_without_its_credentials() {
        let err = env_of(&[("HF_ENDPOINT", "ftp://user:pw@host")]).unwrap_err();
        assert!(err.contains("HF_ENDPOINT=ftp://***@host"), "{err}");
        assert!(!err.contains("pw"), "{err}");
    }
}
