//! Registry credentials from the files podman, skopeo and docker keep them
//! in, so `podman login` / `docker login` work for podvisor too.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a credentials file: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: the entry for {registry} is not base64 of user:password")]
    Encoding { path: PathBuf, registry: String },
}

/// The credential files to look in, first match wins.
#[derive(Clone, Debug)]
pub struct AuthFiles(pub Vec<PathBuf>);

impl AuthFiles {
    /// containers-auth.json(5)'s order, then docker's config:
    /// `$REGISTRY_AUTH_FILE`, `/run/containers/$UID/auth.json`,
    /// `$XDG_CONFIG_HOME/containers/auth.json` (`~/.config/...`),
    /// `$DOCKER_CONFIG/config.json` (`~/.docker/config.json`).
    pub fn from_env() -> AuthFiles {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let home = var("HOME");
        let mut files = Vec::new();
        files.extend(var("REGISTRY_AUTH_FILE"));
        files.push(PathBuf::from(format!(
            "/run/containers/{}/auth.json",
            nix::unistd::getuid()
        )));
        if let Some(c) = var("XDG_CONFIG_HOME").or_else(|| home.as_ref().map(|h| h.join(".config")))
        {
            files.push(c.join("containers/auth.json"));
        }
        if let Some(d) = var("DOCKER_CONFIG").or_else(|| home.as_ref().map(|h| h.join(".docker"))) {
            files.push(d.join("config.json"));
        }
        AuthFiles(files)
    }

    /// The credentials for `registry` (host[:port]), anonymous if none.
    pub fn credentials_for(&self, registry: &str) -> Result<RegistryAuth, AuthError> {
        for path in &self.0 {
            let text = match std::fs::read(path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(AuthError::Read {
                        path: path.clone(),
                        source,
                    })
                }
            };
            if let Some(auth) = lookup(path, &text, registry)? {
                return Ok(auth);
            }
        }
        Ok(RegistryAuth::Anonymous)
    }
}

#[derive(Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

fn lookup(path: &Path, text: &[u8], registry: &str) -> Result<Option<RegistryAuth>, AuthError> {
    let file: AuthFile = serde_json::from_slice(text).map_err(|source| AuthError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    let wanted = canonical_host(registry);
    let Some((_, entry)) = file
        .auths
        .iter()
        .find(|(key, _)| canonical_host(key) == wanted)
    else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        return Ok(Some(RegistryAuth::Basic(u.clone(), p.clone())));
    }
    let Some(auth) = &entry.auth else {
        return Ok(None);
    };
    let bad = || AuthError::Encoding {
        path: path.to_path_buf(),
        registry: registry.to_string(),
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| bad())?;
    let decoded = String::from_utf8(decoded).map_err(|_| bad())?;
    let (user, pass) = decoded.split_once(':').ok_or_else(bad)?;
    Ok(Some(RegistryAuth::Basic(
        user.to_string(),
        pass.to_string(),
    )))
}

/// A key of `auths` as a host: without scheme and path, Docker Hub's
/// aliases made one.
fn canonical_host(key: &str) -> &str {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = key.split('/').next().unwrap_or(key);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io",
        h => h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(a: RegistryAuth) -> (String, String) {
        match a {
            RegistryAuth::Basic(u, p) => (u, p),
            _ => panic!("not basic"),
        }
    }

    #[test]
    fn first_file_with_an_entry_wins_and_hosts_are_compared_without_scheme() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("auth.json");
        let b = dir.path().join("config.json");
        // "alice:s3cret:x" (a password may hold a colon).
        std::fs::write(
            &a,
            r#"{"auths":{"127.0.0.1:5000":{"auth":"YWxpY2U6czNjcmV0Ong="}}}"#,
        )
        .unwrap();
        std::fs::write(
            &b,
            r#"{"auths":{"https://127.0.0.1:5000/v2/":{"auth":"Ym9iOnB3"},
                "https://index.docker.io/v1/":{"username":"d","password":"p"}}}"#,
        )
        .unwrap();
        let files = AuthFiles(vec![dir.path().join("missing.json"), a, b.clone()]);
        assert_eq!(
            basic(files.credentials_for("127.0.0.1:5000").unwrap()),
            ("alice".into(), "s3cret:x".into())
        );
        assert_eq!(
            basic(files.credentials_for("index.docker.io").unwrap()),
            ("d".into(), "p".into())
        );
        assert!(matches!(
            files.credentials_for("127.0.0.1:5001").unwrap(),
            RegistryAuth::Anonymous
        ));
        let only_b = AuthFiles(vec![b]);
        assert_eq!(
            basic(only_b.credentials_for("127.0.0.1:5000").unwrap()).0,
            "bob"
        );
    }

    #[test]
    fn a_broken_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("auth.json");
        std::fs::write(&a, "{not json").unwrap();
        let e = AuthFiles(vec![a.clone()]).credentials_for("x").unwrap_err();
        assert!(e.to_string().contains(&a.display().to_string()));
        std::fs::write(&a, r#"{"auths":{"x":{"auth":"%%%"}}}"#).unwrap();
        assert!(matches!(
            AuthFiles(vec![a]).credentials_for("x"),
            Err(AuthError::Encoding { .. })
        ));
    }
}
