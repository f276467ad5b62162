//! The `server:` section: validated into [`ServerSettings`], what `rlhf-bot serve` runs on.
//! Credentials are never in the file: it names the environment variables that hold them, and
//! `serve` reads them at start-up (docs/feedback-service.md).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;

use super::Invalid;
use super::fields::env_name;
use super::raw::RawServer;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATABASE: &str = ".rlhf/feedback-service.sqlite3";
pub const DEFAULT_READ_TOKEN_ENV: &str = "RLHF_READ_TOKEN";
pub const DEFAULT_WRITE_KEY_ENV: &str = "RLHF_WRITE_KEY";
/// A batch of 1000 records is what one `pull` page holds; larger batches only make one request
/// hold the writer longer.
pub const DEFAULT_MAX_BATCH: usize = 1000;
/// 1000 records with long conversations fit in a few MB; anything far larger is refused unread.
pub const DEFAULT_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;
pub const DEFAULT_WIDGET_REQUESTS_PER_MINUTE: u32 = 120;

#[derive(Debug, Clone, Serialize)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub database: DatabaseLocation,
    pub read_token_env: String,
    pub write_key_env: String,
    pub widget_keys: Vec<WidgetKeySettings>,
    pub max_batch: usize,
    pub max_body_bytes: usize,
    pub widget_requests_per_minute: u32,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", content = "location", rename_all = "lowercase")]
pub enum DatabaseLocation {
    Sqlite(PathBuf),
    Postgres {
        url: PostgresUrl,
        /// The variable `serve` reads the password from at start-up (it replaces one in the URL).
        password_env: Option<String>,
    },
}

/// A `postgres://` or `postgresql://` URL that parsed as a connection string. It may hold a
/// password, so `Debug`, `Display` and `Serialize` show it with the password replaced by `***`;
/// only [`PostgresUrl::expose`] gives the real text (to the driver).
#[derive(Clone)]
pub struct PostgresUrl {
    url: String,
    redacted: String,
}

impl PostgresUrl {
    pub fn parse(url: &str) -> Result<Self, String> {
        let redacted = redact_password(url);
        url.parse::<tokio_postgres::Config>().map_err(|e| {
            format!(
                "{redacted} is not a PostgreSQL connection URL: {e}\nhint: e.g. `postgres://rlhf:PASSWORD@127.0.0.1:5432/feedback` (`?sslmode=require` for TLS)"
            )
        })?;
        Ok(Self {
            url: url.to_string(),
            redacted,
        })
    }

    pub fn expose(&self) -> &str {
        &self.url
    }

    /// The URL with its password (if any) replaced by `***`: what logs and errors show.
    pub fn redacted(&self) -> &str {
        &self.redacted
    }
}

/// `url` with the password of its user-info replaced by `***`; a text that does not parse as
/// a URL is replaced as a whole (it might hold a password in a form we do not recognise).
fn redact_password(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            // Key-value options such as `?password=…` are dropped from what is shown.
            if parsed.query().is_some_and(|q| q.contains("password")) {
                parsed.set_query(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "the PostgreSQL URL (not shown: it may hold a password)".to_string(),
    }
}

impl std::fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl std::fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl Serialize for PostgresUrl {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WidgetKeySettings {
    pub key_env: String,
    /// `scheme://host[:port]`, compared exactly with the browser's `Origin` header.
    pub origins: Vec<String>,
}

pub fn validate_server(mut raw: RawServer) -> Result<ServerSettings, Invalid> {
    let listen_text = raw.listen.unwrap_or_else(|| DEFAULT_LISTEN.into());
    let listen = listen_text.parse::<SocketAddr>().map_err(|_| {
        Invalid::new(
            "server.listen",
            format!(
                "expected host:port with an IP address, got {listen_text:?}\nhint: e.g. `127.0.0.1:8080`, or `0.0.0.0:8080` behind a reverse proxy"
            ),
        )
    })?;
    let database = match raw.database {
        None => DatabaseLocation::Sqlite(PathBuf::from(DEFAULT_DATABASE)),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            DatabaseLocation::Postgres {
                url: PostgresUrl::parse(&url).map_err(|m| Invalid::new("server.database", m))?,
                password_env: raw
                    .database_password_env
                    .take()
                    .map(|name| {
                        env_name(
                            "server.database_password_env",
                            name,
                            "RLHF_DATABASE_PASSWORD",
                        )
                    })
                    .transpose()?,
            }
        }
        Some(path) if path.trim().is_empty() => {
            return Err(Invalid::new(
                "server.database",
                "is empty\nhint: a SQLite file path, e.g. `.rlhf/feedback-service.sqlite3`, or a `postgres://` URL",
            ));
        }
        Some(path) => DatabaseLocation::Sqlite(PathBuf::from(path)),
    };
    if raw.database_password_env.is_some() {
        return Err(Invalid::new(
            "server.database_password_env",
            "is only for a PostgreSQL database, and `server.database` is a SQLite file\nhint: remove the key, or set `server.database` to a `postgres://` URL",
        ));
    }
    let read_token_env = env_name(
        "server.read_token_env",
        raw.read_token_env
            .unwrap_or_else(|| DEFAULT_READ_TOKEN_ENV.into()),
        DEFAULT_READ_TOKEN_ENV,
    )?;
    let write_key_env = env_name(
        "server.write_key_env",
        raw.write_key_env
            .unwrap_or_else(|| DEFAULT_WRITE_KEY_ENV.into()),
        DEFAULT_WRITE_KEY_ENV,
    )?;
    let mut widget_keys = Vec::new();
    for (i, key) in raw.widget_keys.into_iter().enumerate() {
        let path = format!("server.widget_keys[{i}]");
        let key_env = env_name(&format!("{path}.key_env"), key.key_env, "RLHF_WIDGET_KEY")?;
        if key.origins.is_empty() {
            return Err(Invalid::new(
                &format!("{path}.origins"),
                "lists no origin, so no page could use the key\nhint: e.g. `origins: [https://chat.example.com]`",
            ));
        }
        let mut origins = Vec::new();
        for (j, origin) in key.origins.into_iter().enumerate() {
            origins.push(
                normalise_origin(&origin)
                    .map_err(|m| Invalid::new(&format!("{path}.origins[{j}]"), m))?,
            );
        }
        widget_keys.push(WidgetKeySettings { key_env, origins });
    }
    Ok(ServerSettings {
        listen,
        database,
        read_token_env,
        write_key_env,
        widget_keys,
        max_batch: raw.max_batch.map_or(DEFAULT_MAX_BATCH, |v| v.0 as usize),
        max_body_bytes: raw
            .max_body_bytes
            .map_or(DEFAULT_MAX_BODY_BYTES, |v| v.0 as usize),
        widget_requests_per_minute: raw
            .widget_requests_per_minute
            .map_or(DEFAULT_WIDGET_REQUESTS_PER_MINUTE, |v| {
                u32::try_from(v.0).unwrap_or(u32::MAX)
            }),
    })
}

/// An origin as browsers send it: `scheme://host[:port]`, no path, no trailing slash.
fn normalise_origin(text: &str) -> Result<String, String> {
    let url = url::Url::parse(text).map_err(|e| {
        format!("{text:?} is not an origin ({e})\nhint: e.g. `https://chat.example.com`")
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "{text:?} is not an http(s) origin\nhint: e.g. `https://chat.example.com`"
        ));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{text:?} has a path; an origin is only scheme://host[:port]\nhint: e.g. `https://chat.example.com`"
        ));
    }
    Ok(url.origin().ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::PostgresUrl;

    #[test]
    fn a_postgres_url_never_shows_its_password() {
        let url = PostgresUrl::parse("postgres://rlhf:hunter2-secret@db:5432/feedback").unwrap();
        assert_eq!(url.redacted(), "postgres://rlhf:***@db:5432/feedback");
        assert_eq!(format!("{url} {url:?}").matches("hunter2").count(), 0);
        assert_eq!(
            serde_json::to_string(&url).unwrap(),
            "\"postgres://rlhf:***@db:5432/feedback\""
        );
        let in_query =
            PostgresUrl::parse("postgres://db/feedback?password=hunter2-secret").unwrap();
        assert!(
            !in_query.redacted().contains("hunter2"),
            "{}",
            in_query.redacted()
        );
        let refused =
            PostgresUrl::parse("postgres://rlhf:hunter2-secret@db/feedback?sslmode=maybe")
                .unwrap_err();
        assert!(!refused.contains("hunter2"), "{refused}");
        assert!(refused.contains("rlhf:***@db"), "{refused}");
    }
}
