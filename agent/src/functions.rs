//! Functions and their versions, stored under `<state>/functions/<name>/`:
//! each version in `v<N>/` (the module, its files, its configuration, its
//! template snapshot), and `current` naming the version invocations run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::snapshots::SnapshotFiles;

/// A function's settings (the `config` part of a deploy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionConfig {
    /// Linear-memory limit, MiB (default: what the VM leaves).
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Time limit per invocation, ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Instances (VMs) at most.
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
    /// How long an idle instance is kept, s.
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u64,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Arguments after `argv[0]`.
    #[serde(default)]
    pub args: Vec<String>,
    /// Async events waiting or running at most (more get a 429).
    #[serde(default = "default_max_queued")]
    pub max_queued: u64,
    /// Retries of a failed async event (0–10).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// The first retry's backoff ceiling, ms; doubled per retry, full jitter.
    #[serde(default = "default_retry_base_ms")]
    pub retry_base_ms: u64,
    /// An async event older than this is not attempted again, s (60–21600).
    #[serde(default = "default_max_event_age_s")]
    pub max_event_age_s: u64,
    /// How long a succeeded async event's result is kept, s.
    #[serde(default = "default_result_retention_s")]
    pub result_retention_s: u64,
    /// The function invoked (async) with the record of each event that
    /// finally failed.
    #[serde(default)]
    pub on_failure: Option<String>,
    /// The function invoked (async) with each detected error and control
    /// action (rate-limited).
    #[serde(default)]
    pub on_error: Option<String>,
    /// Whether failed synchronous invocations are journaled too.
    #[serde(default)]
    pub journal_sync_failures: bool,
    /// Whether emberd may restore instances ahead of predicted arrivals
    /// and keep idle ones as the host's pre-warm policy says (`auto`), or
    /// keeps each for `keep_alive_s` only (`off`).
    #[serde(default)]
    pub prewarm: Prewarm,
}

/// A function's pre-warm setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Prewarm {
    /// The host's policy decides.
    #[default]
    Auto,
    /// A fixed keep-alive, nothing ahead.
    Off,
}

fn default_max_queued() -> u64 {
    10_000
}
fn default_max_retries() -> u32 {
    2
}
fn default_retry_base_ms() -> u64 {
    1000
}
fn default_max_event_age_s() -> u64 {
    21_600
}
fn default_result_retention_s() -> u64 {
    3600
}

fn default_timeout_ms() -> u64 {
    3000
}
fn default_max_concurrency() -> u32 {
    10
}
fn default_keep_alive_s() -> u64 {
    600
}

impl Default for FunctionConfig {
    fn default() -> Self {
        FunctionConfig {
            memory_mib: None,
            timeout_ms: default_timeout_ms(),
            max_concurrency: default_max_concurrency(),
            keep_alive_s: default_keep_alive_s(),
            env: BTreeMap::new(),
            args: Vec::new(),
            max_queued: default_max_queued(),
            max_retries: default_max_retries(),
            retry_base_ms: default_retry_base_ms(),
            max_event_age_s: default_max_event_age_s(),
            result_retention_s: default_result_retention_s(),
            on_failure: None,
            on_error: None,
            journal_sync_failures: false,
            prewarm: Prewarm::Auto,
        }
    }
}

impl FunctionConfig {
    /// Checks the settings' ranges; the message names the one that is off.
    pub fn check(&self) -> Result<(), String> {
        let range = |name: &str, value: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&value) {
                Ok(())
            } else {
                Err(format!(
                    "{name} must be between {lo} and {hi} (got {value})"
                ))
            }
        };
        range("timeout_ms", self.timeout_ms, 1, 900_000)?;
        range("max_concurrency", self.max_concurrency.into(), 1, 10_000)?;
        range("max_queued", self.max_queued, 1, 1_000_000)?;
        range("max_retries", self.max_retries.into(), 0, 10)?;
        range("retry_base_ms", self.retry_base_ms, 1, 3_600_000)?;
        range("max_event_age_s", self.max_event_age_s, 60, 21_600)?;
        range("result_retention_s", self.result_retention_s, 0, 604_800)?;
        for (what, target) in [
            ("on_failure", &self.on_failure),
            ("on_error", &self.on_error),
        ] {
            if let Some(target) = target {
                check_name(target).map_err(|e| format!("{what}: {e}"))?;
            }
        }
        Ok(())
    }
}

/// One version of a function, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionVersion {
    /// The function's name.
    pub name: String,
    /// Its version (1, 2, ...).
    pub version: u64,
    /// Its settings.
    pub config: FunctionConfig,
    /// The bundled files' names (in `/var/task`).
    pub files: Vec<String>,
    /// The module's size, bytes.
    pub module_bytes: u64,
    /// The module's SHA-256.
    pub module_sha256: String,
    /// Seconds since the Unix epoch when deployed.
    pub deployed_at: u64,
    /// A random id of this deploy: version numbers start over after a
    /// function is deleted, this never repeats. (A string in JSON: 64 bits
    /// do not survive a JavaScript number.)
    #[serde(default, with = "uid_text")]
    pub uid: u64,
}

/// Why a function cannot be stored or found.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    /// Bad name.
    #[error("function name {0:?} is not valid: 1 to 64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit")]
    BadName(String),
    /// Bad file name.
    #[error(
        "file name {0:?} is not valid: a plain name of 1 to 255 bytes (no '/', not '.' or '..')"
    )]
    BadFileName(String),
    /// Not found.
    #[error("no function named {0:?}")]
    NotFound(String),
    /// The store failed.
    #[error("{what}: {source}")]
    Io {
        /// What.
        what: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Checks a function name.
pub fn check_name(name: &str) -> Result<(), FunctionError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(FunctionError::BadName(name.into()))
    }
}

/// Checks a bundled file's name.
pub fn check_file_name(name: &str) -> Result<(), FunctionError> {
    if name.is_empty()
        || name.len() > 255
        || name.contains(['/', '\0'])
        || name == "."
        || name == ".."
    {
        return Err(FunctionError::BadFileName(name.into()));
    }
    Ok(())
}

/// The store of functions under `<state>/functions`.
#[derive(Debug, Clone)]
pub struct FunctionStore {
    root: PathBuf,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FunctionError {
    let what = what.into();
    move |source| FunctionError::Io { what, source }
}

impl FunctionStore {
    /// The store at `root` (created if need be).
    pub fn open(root: PathBuf) -> Result<FunctionStore, FunctionError> {
        std::fs::create_dir_all(&root).map_err(io(format!("cannot create {}", root.display())))?;
        Ok(FunctionStore { root })
    }

    fn function_dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// The directory of a version.
    pub fn version_dir(&self, name: &str, version: u64) -> PathBuf {
        self.function_dir(name).join(format!("v{version}"))
    }

    /// The module of a version.
    pub fn module_path(&self, name: &str, version: u64) -> PathBuf {
        self.version_dir(name, version).join("module.wasm")
    }

    /// A bundled file of a version.
    pub fn file_path(&self, name: &str, version: u64, file: &str) -> PathBuf {
        self.version_dir(name, version).join("files").join(file)
    }

    /// The template snapshot of a version.
    pub fn template(&self, name: &str, version: u64) -> SnapshotFiles {
        SnapshotFiles::in_dir(&self.version_dir(name, version), "template")
    }

    /// Stores a new version (not yet current): the next number after the
    /// highest stored.
    pub fn add_version(
        &self,
        name: &str,
        config: FunctionConfig,
        module: &[u8],
        files: &[(String, Vec<u8>)],
    ) -> Result<FunctionVersion, FunctionError> {
        check_name(name)?;
        for (file, _) in files {
            check_file_name(file)?;
        }
        let dir = self.function_dir(name);
        std::fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
        let version = self.versions(name).into_iter().max().unwrap_or(0) + 1;
        let vdir = self.version_dir(name, version);
        std::fs::create_dir_all(vdir.join("files"))
            .map_err(io(format!("cannot create {}", vdir.display())))?;
        std::fs::write(self.module_path(name, version), module)
            .map_err(io("cannot store the module"))?;
        for (file, bytes) in files {
            std::fs::write(self.file_path(name, version, file), bytes)
                .map_err(io(format!("cannot store file {file}")))?;
        }
        use sha2::Digest;
        let meta = FunctionVersion {
            name: name.into(),
            version,
            config,
            files: files.iter().map(|(n, _)| n.clone()).collect(),
            module_bytes: module.len() as u64,
            module_sha256: sha2::Sha256::digest(module)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            deployed_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            uid: random_u64(),
        };
        write_json(&vdir.join("version.json"), &meta)?;
        Ok(meta)
    }

    /// Makes `version` the one invocations run.
    pub fn set_current(&self, name: &str, version: u64) -> Result<(), FunctionError> {
        let path = self.function_dir(name).join("current");
        write_synced(&path, version.to_string().as_bytes()).map_err(io("cannot write current"))
    }

    /// The current version of `name`.
    pub fn current(&self, name: &str) -> Result<FunctionVersion, FunctionError> {
        check_name(name).map_err(|_| FunctionError::NotFound(name.into()))?;
        let text = std::fs::read_to_string(self.function_dir(name).join("current"))
            .map_err(|_| FunctionError::NotFound(name.into()))?;
        let version: u64 = text
            .trim()
            .parse()
            .map_err(|_| FunctionError::NotFound(name.into()))?;
        self.version(name, version)
    }

    /// A stored version.
    pub fn version(&self, name: &str, version: u64) -> Result<FunctionVersion, FunctionError> {
        let path = self.version_dir(name, version).join("version.json");
        let text = std::fs::read(&path).map_err(|_| FunctionError::NotFound(name.into()))?;
        serde_json::from_slice(&text).map_err(|e| FunctionError::Io {
            what: format!("{} is corrupt", path.display()),
            source: std::io::Error::other(e),
        })
    }

    /// The stored version numbers of `name`.
    pub fn versions(&self, name: &str) -> Vec<u64> {
        let Ok(entries) = std::fs::read_dir(self.function_dir(name)) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_prefix('v')?.parse().ok())
            .collect()
    }

    /// Every function with a current version.
    pub fn list(&self) -> Vec<FunctionVersion> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out: Vec<FunctionVersion> = entries
            .flatten()
            .filter_map(|e| self.current(e.file_name().to_str()?).ok())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Removes a function and all its versions.
    pub fn delete(&self, name: &str) -> Result<(), FunctionError> {
        self.current(name)?;
        let dir = self.function_dir(name);
        std::fs::remove_dir_all(&dir).map_err(io(format!("cannot remove {}", dir.display())))
    }

    /// Removes what interrupted deploys left: versions that are not
    /// current, functions without a current version, temporary files.
    /// Returns how many directories went.
    pub fn clean(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            // Decided from `current` alone: a version.json that cannot be
            // read must not cost a function its current version.
            let current = match std::fs::read_to_string(entry.path().join("current")) {
                Ok(text) => match text.trim().parse::<u64>() {
                    Ok(n) => n,
                    Err(_) => continue,
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // Never deployed to the end.
                    let _ = std::fs::remove_dir_all(entry.path());
                    removed += 1;
                    continue;
                }
                Err(_) => continue,
            };
            for version in self.versions(&name) {
                if version != current {
                    let _ = std::fs::remove_dir_all(self.version_dir(&name, version));
                    removed += 1;
                }
            }
            let _ = std::fs::remove_file(entry.path().join("current.tmp"));
        }
        removed
    }

    /// Removes a version that never became current (a failed deploy).
    pub fn discard(&self, name: &str, version: u64) {
        let _ = std::fs::remove_dir_all(self.version_dir(name, version));
        if self.versions(name).is_empty() {
            let _ = std::fs::remove_dir_all(self.function_dir(name));
        }
    }
}

/// A u64 as hex text in JSON.
mod uid_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(uid: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{uid:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        u64::from_str_radix(&text, 16).map_err(serde::de::Error::custom)
    }
}

/// 64 random bits (from time and pid if the kernel has no entropy to give).
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if ember_vmm::persist::getrandom_into(&mut bytes).is_err() {
        // Unique enough for telling deploys apart: time and pid.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return now ^ u64::from(std::process::id()).rotate_left(32);
    }
    u64::from_le_bytes(bytes)
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), FunctionError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| FunctionError::Io {
        what: "cannot encode".into(),
        source: std::io::Error::other(e),
    })?;
    write_synced(path, &bytes).map_err(io(format!("cannot write {}", path.display())))
}

/// Writes `bytes` beside `path`, syncs, renames into place.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("echo").is_ok());
        assert!(check_name("a-b_9").is_ok());
        for bad in ["", "-x", "Echo", "a/b", "a.b", &"x".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_file_name("data.txt").is_ok());
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn versions_are_stored_and_survive_a_new_store() {
        let root = std::env::temp_dir().join(format!("ember-fnstore-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let store = FunctionStore::open(root.clone()).unwrap();
        let v1 = store
            .add_version(
                "echo",
                FunctionConfig::default(),
                b"\0asm",
                &[("a.txt".into(), b"hi".to_vec())],
            )
            .unwrap();
        assert_eq!(v1.version, 1);
        assert!(store.current("echo").is_err(), "not current before set");
        store.set_current("echo", 1).unwrap();
        let v2 = store
            .add_version("echo", FunctionConfig::default(), b"\0asm2", &[])
            .unwrap();
        assert_eq!(v2.version, 2);
        store.set_current("echo", 2).unwrap();
        let again = FunctionStore::open(root.clone()).unwrap();
        assert_eq!(again.current("echo").unwrap(), v2);
        assert_eq!(again.list().len(), 1);
        again.delete("echo").unwrap();
        assert!(again.current("echo").is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
