//! Keystone v3: a scoped token from a password or an application credential, reused until
//! `refresh_margin` before it expires, and endpoints from the token's service catalog.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Credentials {
    Password {
        username: String,
        password: String,
        #[serde(default = "default_domain")]
        user_domain_name: String,
        project_name: String,
        #[serde(default = "default_domain")]
        project_domain_name: String,
    },
    ApplicationCredential {
        id: String,
        secret: String,
    },
}

fn default_domain() -> String {
    "Default".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeystoneConfig {
    /// `http://keystone:5000` or `.../v3`.
    pub auth_url: String,
    pub credentials: Credentials,
    #[serde(default)]
    pub region: Option<String>,
    /// Catalog interface: public, internal or admin.
    #[serde(default = "default_interface")]
    pub interface: String,
}

fn default_interface() -> String {
    "public".into()
}

#[derive(Debug, Clone, Deserialize)]
struct CatalogEndpoint {
    interface: String,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    region_id: Option<String>,
    url: String,
}

#[derive(Debug, Clone, Deserialize)]
struct CatalogService {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    endpoints: Vec<CatalogEndpoint>,
}

#[derive(Debug, Clone)]
struct Token {
    value: String,
    expires_at: SystemTime,
    catalog: Vec<CatalogService>,
}

pub struct Keystone {
    http: reqwest::Client,
    cfg: KeystoneConfig,
    token: tokio::sync::Mutex<Option<Token>>,
    /// A token is renewed once it has less than this left.
    pub refresh_margin: Duration,
    issued: AtomicU64,
}

impl Keystone {
    pub fn new(cfg: KeystoneConfig) -> Result<Keystone> {
        if !(cfg.auth_url.starts_with("http://") || cfg.auth_url.starts_with("https://")) {
            return Err(Error::Invalid(format!(
                "Keystone auth_url {:?} is not an http(s) URL",
                cfg.auth_url
            )));
        }
        Ok(Keystone {
            http: crate::glance::http_client()?,
            cfg,
            token: tokio::sync::Mutex::new(None),
            refresh_margin: Duration::from_secs(300),
            issued: AtomicU64::new(0),
        })
    }

    /// How many tokens were requested from Keystone so far.
    pub fn tokens_issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed)
    }

    fn tokens_url(&self) -> String {
        let base = self.cfg.auth_url.trim_end_matches('/');
        let base = base.strip_suffix("/v3").unwrap_or(base);
        format!("{base}/v3/auth/tokens")
    }

    fn body(&self) -> Value {
        match &self.cfg.credentials {
            Credentials::Password {
                username,
                password,
                user_domain_name,
                project_name,
                project_domain_name,
            } => json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": username, "domain": {"name": user_domain_name}, "password": password}}},
                "scope": {"project": {"name": project_name, "domain": {"name": project_domain_name}}}
            }}),
            // An application credential carries its own scope.
            Credentials::ApplicationCredential { id, secret } => json!({"auth": {
                "identity": {"methods": ["application_credential"],
                             "application_credential": {"id": id, "secret": secret}}
            }}),
        }
    }

    async fn issue(&self) -> Result<Token> {
        let resp = self
            .http
            .post(self.tokens_url())
            .json(&self.body())
            .send()
            .await
            .map_err(|source| Error::Http {
                what: "Keystone token request".into(),
                source,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(Error::Auth(format!(
                "token request refused: HTTP {}: {}",
                status.as_u16(),
                body.chars().take(300).collect::<String>()
            )));
        }
        let value = resp
            .headers()
            .get("X-Subject-Token")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::Auth("no X-Subject-Token in Keystone's answer".into()))?
            .to_string();
        let v: Value = resp.json().await.map_err(|source| Error::Http {
            what: "Keystone token body".into(),
            source,
        })?;
        let t = v
            .get("token")
            .ok_or_else(|| Error::Auth("no token in Keystone's answer".into()))?;
        let expires = t.get("expires_at").and_then(Value::as_str).unwrap_or("");
        let expires_at = humantime::parse_rfc3339_weak(expires.trim_end_matches('Z'))
            .map_err(|e| Error::Auth(format!("expires_at {expires:?}: {e}")))?;
        let catalog: Vec<CatalogService> = match t.get("catalog") {
            Some(c) => serde_json::from_value(c.clone())
                .map_err(|e| Error::Auth(format!("service catalog: {e}")))?,
            None => Vec::new(),
        };
        self.issued.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(expires, "Keystone token issued");
        Ok(Token {
            value,
            expires_at,
            catalog,
        })
    }

    async fn current(&self) -> Result<Token> {
        let mut g = self.token.lock().await;
        if let Some(t) = g.as_ref() {
            let left = t
                .expires_at
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            if left > self.refresh_margin {
                return Ok(t.clone());
            }
        }
        let t = self.issue().await?;
        *g = Some(t.clone());
        Ok(t)
    }

    /// A valid token (reused while it has more than `refresh_margin` left).
    pub async fn token(&self) -> Result<String> {
        Ok(self.current().await?.value)
    }

    /// Forgets the token (after a 401), so the next call authenticates again.
    pub async fn invalidate(&self) {
        *self.token.lock().await = None;
    }

    /// The catalog URL of a service type for the configured interface and region.
    pub async fn endpoint(&self, service_type: &str) -> Result<String> {
        let t = self.current().await?;
        let want_region = self.cfg.region.as_deref();
        let found = t
            .catalog
            .iter()
            .filter(|s| s.kind == service_type)
            .flat_map(|s| s.endpoints.iter())
            .find(|e| {
                e.interface == self.cfg.interface
                    && want_region.is_none_or(|r| {
                        e.region_id.as_deref() == Some(r) || e.region.as_deref() == Some(r)
                    })
            });
        found.map(|e| e.url.clone()).ok_or_else(|| {
            Error::Auth(format!(
                "no {service_type} endpoint with interface {} in region {} in the catalog",
                self.cfg.interface,
                want_region.unwrap_or("(any)")
            ))
        })
    }
}
