//! Who is calling the feedback service, from the credentials in the request.
//!
//! Three kinds, each read from environment variables named in the config: the read token (the
//! bot pulls with it), the write key (a chat application's backend writes and deletes with it),
//! and public widget keys (the browser widget writes with one, only from its allowed origins).
//! Only sha256 digests are kept in memory, and a presented credential is compared with every
//! known digest without stopping at the first match, so timing does not tell how much of a
//! guess was right or which kind it matched.

use sha2::{Digest, Sha256};

use crate::config::server::ServerSettings;

/// The header a widget sends its public key in (a bearer token would look like a secret).
pub const WIDGET_KEY_HEADER: &str = "x-rlhf-widget-key";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    Reader,
    Writer,
    /// The index of the widget key in `server.widget_keys`.
    Widget(usize),
}

type DigestBytes = [u8; 32];

pub struct Credentials {
    read: DigestBytes,
    write: DigestBytes,
    widgets: Vec<(DigestBytes, Vec<String>)>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("widget_keys", &self.widgets.len())
            .finish_non_exhaustive()
    }
}

fn digest(secret: &[u8]) -> DigestBytes {
    Sha256::digest(secret).into()
}

/// Equality that reads every byte whatever the first difference.
fn same(a: &DigestBytes, b: &DigestBytes) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads one credential from its variable: set, non-empty, and long enough to be a secret.
fn read_secret(
    env: &dyn Fn(&str) -> Option<String>,
    var: &str,
    key: &str,
) -> anyhow::Result<DigestBytes> {
    let value = env(var).unwrap_or_default();
    let value = value.trim();
    if value.is_empty() {
        anyhow::bail!(
            "`{key}` names the environment variable {var}, which is not set or empty\nhint: export {var}=<a random secret of at least 16 characters> before `rlhf-bot serve`"
        );
    }
    if value.len() < 16 {
        anyhow::bail!(
            "the value of {var} (`{key}`) is {} characters; a credential must have at least 16\nhint: e.g. `openssl rand -hex 32`",
            value.len()
        );
    }
    Ok(digest(value.as_bytes()))
}

impl Credentials {
    /// Reads every configured credential; a missing or short one stops `serve` at start-up.
    pub fn from_env(
        settings: &ServerSettings,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Self> {
        let read = read_secret(env, &settings.read_token_env, "server.read_token_env")?;
        let write = read_secret(env, &settings.write_key_env, "server.write_key_env")?;
        let mut widgets = Vec::new();
        for (i, key) in settings.widget_keys.iter().enumerate() {
            let d = read_secret(
                env,
                &key.key_env,
                &format!("server.widget_keys[{i}].key_env"),
            )?;
            widgets.push((d, key.origins.clone()));
        }
        let all: Vec<&DigestBytes> = [&read, &write]
            .into_iter()
            .chain(widgets.iter().map(|(d, _)| d))
            .collect();
        for (i, a) in all.iter().enumerate() {
            if all[i + 1..].iter().any(|b| same(a, b)) {
                anyhow::bail!(
                    "two of the service's credentials have the same value\nhint: the read token, the write key and each widget key must differ: a widget key is public"
                );
            }
        }
        Ok(Self {
            read,
            write,
            widgets,
        })
    }

    /// Matches a bearer token (read token or write key).
    pub fn bearer(&self, token: &str) -> Option<Caller> {
        let d = digest(token.as_bytes());
        let (is_read, is_write) = (same(&d, &self.read), same(&d, &self.write));
        match (is_read, is_write) {
            (true, _) => Some(Caller::Reader),
            (_, true) => Some(Caller::Writer),
            _ => None,
        }
    }

    /// Matches a widget key.
    pub fn widget(&self, key: &str) -> Option<Caller> {
        let d = digest(key.as_bytes());
        let mut found = None;
        for (i, (known, _)) in self.widgets.iter().enumerate() {
            if same(&d, known) && found.is_none() {
                found = Some(Caller::Widget(i));
            }
        }
        found
    }

    /// The origins a widget key may be used from.
    pub fn widget_origins(&self, index: usize) -> &[String] {
        self.widgets.get(index).map_or(&[], |(_, o)| o.as_slice())
    }

    /// Whether any widget key allows this origin (for CORS preflight answers).
    pub fn origin_known(&self, origin: &str) -> bool {
        self.widgets
            .iter()
            .any(|(_, origins)| origins.iter().any(|o| o == origin))
    }
}
