//! Secrets (API tokens) as a type that cannot be printed by accident: `Debug` and `Display` show
//! `***`, and the only way to the value is the explicit [`SecretString::expose`].

use anyhow::{Result, bail};

#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Reads the secret from the environment variable the config names; a missing or empty
    /// variable is an error that names the variable (never its value).
    pub fn from_env(var: &str, what: &str) -> Result<Self> {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(Self(v.trim().to_string())),
            Ok(_) => bail!(
                "the {what} token variable {var} is set but empty\nhint: export {var}=<token>"
            ),
            Err(_) => bail!(
                "the {what} token variable {var} is not set\nhint: export {var}=<token>, or change `token_env` in the config"
            ),
        }
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::fmt::Display for SecretString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}
