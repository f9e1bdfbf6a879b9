//! The microVM's configuration before it starts: what the API or the
//! config file set, validated as it was set.

use std::path::Path;

use serde::Deserialize;

use crate::vmm_config::boot_source::{BootSource, BootSourceConfig, BootSourceError};
use crate::vmm_config::machine_config::{host_memory_mib, MachineConfig, MachineConfigError};

/// The configuration of the microVM to boot.
#[derive(Debug, Default)]
pub struct VmResources {
    /// The guest image and command line (`PUT /boot-source`).
    pub boot_source: Option<BootSource>,
    /// vCPUs and memory (`PUT /machine-config`).
    pub machine_config: MachineConfig,
}

/// Why a configuration change was refused.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ResourcesError {
    /// {0}
    BootSource(#[from] BootSourceError),
    /// {0}
    MachineConfig(#[from] MachineConfigError),
    /// Cannot read this host's memory size: {0}
    HostMemory(std::io::Error),
}

impl VmResources {
    /// Sets the boot source after opening and checking the image.
    pub fn set_boot_source(&mut self, config: BootSourceConfig) -> Result<(), ResourcesError> {
        self.boot_source = Some(BootSource::new(config)?);
        Ok(())
    }

    /// Sets the machine configuration after checking it against this host.
    pub fn set_machine_config(&mut self, config: MachineConfig) -> Result<(), ResourcesError> {
        let host = host_memory_mib().map_err(ResourcesError::HostMemory)?;
        config.validate(host)?;
        self.machine_config = config;
        Ok(())
    }
}

/// The `--config-file` format: the same bodies as the API, keyed by path,
/// as Firecracker's config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmConfigFile {
    /// The body of `PUT /boot-source`.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSourceConfig,
    /// The body of `PUT /machine-config`.
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
}

/// Why a config file was refused.
#[derive(Debug, thiserror::Error, displaydoc::Display)]
pub enum ConfigFileError {
    /// Cannot read config file {path}: {source}
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Config file {path} is not valid: {source}
    Parse {
        /// The file.
        path: String,
        /// What serde_json reported.
        source: serde_json::Error,
    },
    /// Config file {path}: {source}
    Apply {
        /// The file.
        path: String,
        /// The refused setting.
        source: ResourcesError,
    },
}

impl VmResources {
    /// Builds the configuration a `--config-file` describes.
    pub fn from_config_file(path: &Path) -> Result<VmResources, ConfigFileError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: shown.clone(),
            source,
        })?;
        let file: VmmConfigFile =
            serde_json::from_str(&text).map_err(|source| ConfigFileError::Parse {
                path: shown.clone(),
                source,
            })?;
        let mut resources = VmResources::default();
        let apply = |source| ConfigFileError::Apply {
            path: shown.clone(),
            source,
        };
        if let Some(machine) = file.machine_config {
            resources.set_machine_config(machine).map_err(apply)?;
        }
        resources.set_boot_source(file.boot_source).map_err(apply)?;
        Ok(resources)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_errors_name_the_file_and_problem() {
        let dir = std::env::temp_dir().join(format!("ember-vmm-resources-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();

        let missing = dir.join("missing.json");
        let err = VmResources::from_config_file(&missing)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");

        let bad = dir.join("bad.json");
        std::fs::write(&bad, "{ not json").unwrap();
        let err = VmResources::from_config_file(&bad).unwrap_err().to_string();
        assert!(err.contains("is not valid"), "{err}");

        let unknown = dir.join("unknown.json");
        std::fs::write(
            &unknown,
            r#"{"boot-source": {"kernel_image_path": "/k"}, "drives": []}"#,
        )
        .unwrap();
        let err = VmResources::from_config_file(&unknown)
            .unwrap_err()
            .to_string();
        assert!(err.contains("drives"), "{err}");

        let zero = dir.join("zero.json");
        std::fs::write(
            &zero,
            r#"{"boot-source": {"kernel_image_path": "/k"}, "machine-config": {"vcpu_count": 0, "mem_size_mib": 128}}"#,
        )
        .unwrap();
        let err = VmResources::from_config_file(&zero)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vcpu_count must be between 1 and 32 (got 0)"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
