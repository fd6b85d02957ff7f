//! The `[api]` section of `etc/kiln.toml` and the token file of `auth = "tokens"`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use kiln_core::attrs::{DEFAULT_PROJECT, QuotaLimits, validate_id};
use kiln_core::{Error, Result};
use serde::Deserialize;

/// Cinder's port: where `kiln serve` listens without `--listen` or `listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8776";

/// How callers are identified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Cinder's `noauth`: the token names `user:project` (cinderclient's form); no token or
    /// `notused` means the default project. Every caller is an admin, as in Cinder's
    /// noauth. Refused on any address but loopback.
    #[default]
    NoAuth,
    /// Tokens from `token_file`; an unknown token gets 401.
    Tokens,
}

/// The `[api]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `ADDR:PORT` to listen on (default [`DEFAULT_LISTEN`]); `--listen` overrides it.
    pub listen: Option<String>,
    /// `noauth` (default) or `tokens`.
    #[serde(default)]
    pub auth: AuthMode,
    /// The token file for `auth = "tokens"` (TOML, see `etc/kiln-tokens.toml`).
    pub token_file: Option<PathBuf>,
    /// The project of callers that name none (noauth) and of objects made by the CLI.
    /// Always [`DEFAULT_PROJECT`]: the store counts unowned objects for it.
    #[serde(skip)]
    pub default_project: DefaultProject,
    /// Per-project limits (every project gets the same); absent = unlimited.
    #[serde(default)]
    pub quotas: QuotaLimits,
}

/// The default project's name (a newtype so the config cannot set it).
#[derive(Debug, Clone)]
pub struct DefaultProject(pub String);

impl Default for DefaultProject {
    fn default() -> Self {
        DefaultProject(DEFAULT_PROJECT.to_string())
    }
}

impl ApiConfig {
    /// Parses the `[api]` table (absent: the defaults, `noauth` on loopback).
    pub fn from_table(table: Option<&toml::Table>) -> Result<ApiConfig> {
        match table {
            None => Ok(ApiConfig::default()),
            Some(t) => t
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| Error::config(format!("[api]: {}", e.message()))),
        }
    }

    /// The address to listen on: `flag`, else `listen`, else [`DEFAULT_LISTEN`]; refused
    /// when it does not parse, or when `noauth` would listen on a non-loopback address.
    pub fn listen_addr(&self, flag: Option<&str>) -> Result<SocketAddr> {
        let text = flag.or(self.listen.as_deref()).unwrap_or(DEFAULT_LISTEN);
        let addr: SocketAddr = text
            .parse()
            .map_err(|_| Error::invalid("listen address", format!("{text:?} is not ADDR:PORT")))?;
        if self.auth == AuthMode::NoAuth && !addr.ip().is_loopback() {
            return Err(Error::config(format!(
                "refusing to serve without authentication on {addr}: noauth listens on a \
                 loopback address only; set [api] auth = \"tokens\" to listen elsewhere"
            )));
        }
        Ok(addr)
    }

    /// Loads the token file (`tokens` mode); `noauth` has none.
    pub fn load_tokens(&self, base: &Path) -> Result<Tokens> {
        match self.auth {
            AuthMode::NoAuth => Ok(Tokens::default()),
            AuthMode::Tokens => {
                let path = self
                    .token_file
                    .as_ref()
                    .ok_or_else(|| Error::config("[api] auth = \"tokens\" needs token_file"))?;
                let path = if path.is_relative() {
                    base.join(path)
                } else {
                    path.clone()
                };
                Tokens::load(&path)
            }
        }
    }
}

/// Who a token identifies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user.
    pub user: Option<String>,
    /// The project the token is scoped to.
    pub project: String,
    /// Whether the caller may act as an admin (reset states, `all_tenants`).
    pub admin: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    token: String,
    user: String,
    project: String,
    #[serde(default)]
    roles: Vec<String>,
}

/// The tokens of `auth = "tokens"`, by token.
#[derive(Debug, Clone, Default)]
pub struct Tokens(HashMap<String, Identity>);

/// Shortest token accepted: a token file is a list of secrets.
const MIN_TOKEN_LEN: usize = 16;

impl Tokens {
    /// Reads a token file: `[[tokens]]` tables with `token`, `user`, `project` and
    /// `roles` (`admin` makes the holder an admin). Duplicate or short tokens, and bad
    /// user or project ids, are refused.
    pub fn load(path: &Path) -> Result<Tokens> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::config(format!("cannot read {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| Error::config(format!("{}: {e}", path.display())))
    }

    /// Parses a token file's text.
    pub fn parse(text: &str) -> Result<Tokens> {
        let file: TokenFile =
            toml::from_str(text).map_err(|e| Error::config(e.message().to_string()))?;
        let mut map = HashMap::new();
        for t in file.tokens {
            if t.token.len() < MIN_TOKEN_LEN || t.token.chars().any(|c| c.is_control()) {
                return Err(Error::config(format!(
                    "the token of user {:?} is shorter than {MIN_TOKEN_LEN} characters",
                    t.user
                )));
            }
            validate_id("user id", &t.user)?;
            validate_id("project id", &t.project)?;
            let id = Identity {
                user: Some(t.user),
                project: t.project,
                admin: t.roles.iter().any(|r| r == "admin"),
            };
            if map.insert(t.token, id).is_some() {
                return Err(Error::config("a token is listed twice"));
            }
        }
        Ok(Tokens(map))
    }

    /// Who `token` identifies.
    pub fn get(&self, token: &str) -> Option<&Identity> {
        self.0.get(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noauth_refuses_non_loopback_addresses() {
        let cfg = ApiConfig::default();
        assert_eq!(
            cfg.listen_addr(None).ok(),
            DEFAULT_LISTEN.parse::<SocketAddr>().ok()
        );
        assert!(cfg.listen_addr(Some("[::1]:9000")).is_ok());
        let e = cfg.listen_addr(Some("0.0.0.0:8776")).unwrap_err();
        assert!(e.to_string().contains("loopback"), "{e}");
        assert!(cfg.listen_addr(Some("localhost")).is_err());
        let tokens = ApiConfig {
            auth: AuthMode::Tokens,
            ..ApiConfig::default()
        };
        assert!(tokens.listen_addr(Some("0.0.0.0:8776")).is_ok());
    }

    #[test]
    fn api_table_is_parsed_strictly() {
        let t: toml::Table =
            toml::from_str("auth = \"tokens\"\ntoken_file = \"t.toml\"\n[quotas]\nvolumes = 3\n")
                .unwrap_or_default();
        let cfg = ApiConfig::from_table(Some(&t)).unwrap();
        assert_eq!(cfg.auth, AuthMode::Tokens);
        assert_eq!(cfg.quotas.volumes, Some(3));
        assert_eq!(cfg.quotas.gigabytes, None);
        let bad: toml::Table = toml::from_str("auth = \"none\"").unwrap_or_default();
        assert!(ApiConfig::from_table(Some(&bad)).is_err());
        let bad: toml::Table = toml::from_str("listn = \"x\"").unwrap_or_default();
        assert!(ApiConfig::from_table(Some(&bad)).is_err());
    }

    #[test]
    fn token_files_are_checked() {
        let ok = Tokens::parse(
            "[[tokens]]\ntoken = \"0123456789abcdef\"\nuser = \"alice\"\nproject = \"pa\"\nroles = [\"admin\"]\n",
        )
        .unwrap();
        let alice = ok.get("0123456789abcdef").unwrap();
        assert!(alice.admin);
        assert_eq!(alice.project, "pa");
        assert!(ok.get("0123456789abcdeX").is_none());
        for bad in [
            "[[tokens]]\ntoken = \"short\"\nuser = \"a\"\nproject = \"p\"\n",
            "[[tokens]]\ntoken = \"0123456789abcdef\"\nuser = \"a/b\"\nproject = \"p\"\n",
            "[[tokens]]\ntoken = \"0123456789abcdef\"\nuser = \"a\"\nproject = \"p\"\n[[tokens]]\ntoken = \"0123456789abcdef\"\nuser = \"b\"\nproject = \"q\"\n",
            "[[tokens]]\ntoken = \"0123456789abcdef\"\nuser = \"a\"\n",
        ] {
            assert!(Tokens::parse(bad).is_err(), "{bad}");
        }
    }
}
