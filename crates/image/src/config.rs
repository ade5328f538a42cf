//! The `[images]` table of podvisor's config file (`/etc/podvisor/config.toml`).

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: [images]: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

/// `[images] root = "...", insecure_registries = ["127.0.0.1:5000"],
/// timeout_secs = 30`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ImagesConfig {
    pub root: Option<PathBuf>,
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    pub timeout_secs: Option<u64>,
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    images: ImagesConfig,
}

impl ImagesConfig {
    /// The `[images]` table of the file at `path`; defaults if it is not there.
    pub fn load(path: &Path) -> Result<ImagesConfig, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(ImagesConfig::default())
            }
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        toml::from_str::<File>(&text)
            .map(|f| f.images)
            .map_err(|source| ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_table_is_read_beside_other_tables() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        std::fs::write(
            &p,
            "template = \"t\"\n[images]\nroot = \"/x\"\ninsecure_registries = [\"127.0.0.1:5000\"]\n",
        )
        .unwrap();
        let c = ImagesConfig::load(&p).unwrap();
        assert_eq!(c.root, Some(PathBuf::from("/x")));
        assert_eq!(c.insecure_registries, ["127.0.0.1:5000"]);
        assert_eq!(
            ImagesConfig::load(&dir.path().join("none")).unwrap(),
            ImagesConfig::default()
        );
        std::fs::write(&p, "[images]\nroots = 1\n").unwrap();
        assert!(ImagesConfig::load(&p).is_err());
    }
}
