//! Server configuration: defaults, then a TOML file, then `CAPDB_*` environment variables, then
//! command-line flags; each later source overrides the earlier ones. Everything is typed and
//! validated before the server binds a socket, and every error names the setting and the source.
//!
//! The commented reference file is `config/capdb.toml` in the repository.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use capdb_types::limits;
use clap::Args;
use serde::Deserialize;

/// Resolved, validated configuration of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Where the node keeps its data (the redb file lives here).
    pub data_dir: PathBuf,
    /// Redis protocol listener.
    pub resp_addr: SocketAddr,
    /// HTTP/JSON API, health and metrics listener.
    pub http_addr: SocketAddr,
    /// When set, RESP clients must AUTH and HTTP clients must send `Authorization: Bearer`.
    pub password: Option<String>,
    pub limits: Limits,
    /// How long shutdown waits for in-flight requests before closing connections anyway.
    pub shutdown_grace_ms: u64,
}

/// Bounds on what clients may send. See `capdb_types::limits` for the reasoning behind each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub value_bytes_max: usize,
    pub frame_bytes_max: usize,
    pub pipeline_depth_max: usize,
    pub connections_max: usize,
    pub http_body_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            value_bytes_max: limits::VALUE_BYTES_MAX_DEFAULT,
            frame_bytes_max: limits::FRAME_BYTES_MAX_DEFAULT,
            pipeline_depth_max: limits::PIPELINE_DEPTH_MAX_DEFAULT,
            connections_max: limits::CONNECTIONS_MAX_DEFAULT,
            http_body_bytes_max: limits::HTTP_BODY_BYTES_MAX_DEFAULT,
        }
    }
}

pub const DEFAULT_RESP_ADDR: &str = "127.0.0.1:6380";
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_DATA_DIR: &str = "capdb-data";
pub const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 10_000;

/// The configuration file's shape. Unknown keys are errors (a typo must not be ignored).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    resp_addr: Option<String>,
    http_addr: Option<String>,
    password: Option<String>,
    shutdown_grace_ms: Option<u64>,
    limits: Option<FileLimits>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    value_bytes_max: Option<usize>,
    frame_bytes_max: Option<usize>,
    pipeline_depth_max: Option<usize>,
    connections_max: Option<usize>,
    http_body_bytes_max: Option<usize>,
}

/// Flags of `capdb server`. Each also reads a `CAPDB_*` environment variable; a flag given on
/// the command line wins over the variable, and both win over the file.
#[derive(Debug, Clone, Default, Args)]
pub struct ServerArgs {
    /// TOML configuration file.
    #[arg(long, env = "CAPDB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for this node's data [default: ./capdb-data].
    #[arg(long, env = "CAPDB_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Redis protocol listen address [default: 127.0.0.1:6380].
    #[arg(long, env = "CAPDB_RESP_ADDR", value_name = "HOST:PORT")]
    pub resp_addr: Option<String>,
    /// HTTP API listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "CAPDB_HTTP_ADDR", value_name = "HOST:PORT")]
    pub http_addr: Option<String>,
    /// Require this password (RESP AUTH, HTTP bearer token).
    #[arg(
        long,
        env = "CAPDB_PASSWORD",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// Largest value in bytes [default: 8388608].
    #[arg(long, env = "CAPDB_VALUE_BYTES_MAX", value_name = "BYTES")]
    pub value_bytes_max: Option<usize>,
    /// Largest RESP command frame in bytes [default: 16777216].
    #[arg(long, env = "CAPDB_FRAME_BYTES_MAX", value_name = "BYTES")]
    pub frame_bytes_max: Option<usize>,
    /// Commands run per read before replies are flushed [default: 1024].
    #[arg(long, env = "CAPDB_PIPELINE_DEPTH_MAX", value_name = "N")]
    pub pipeline_depth_max: Option<usize>,
    /// Simultaneous client connections [default: 10000].
    #[arg(long, env = "CAPDB_CONNECTIONS_MAX", value_name = "N")]
    pub connections_max: Option<usize>,
    /// Largest HTTP request body in bytes [default: value limit + 64 KiB].
    #[arg(long, env = "CAPDB_HTTP_BODY_BYTES_MAX", value_name = "BYTES")]
    pub http_body_bytes_max: Option<usize>,
    /// Milliseconds shutdown waits for in-flight requests [default: 10000].
    #[arg(long, env = "CAPDB_SHUTDOWN_GRACE_MS", value_name = "MS")]
    pub shutdown_grace_ms: Option<u64>,
}

/// A configuration error: which setting, from where, and why.
#[derive(Debug, thiserror::Error)]
#[error("configuration error: {0}")]
pub struct ConfigError(pub String);

fn parse_addr(value: &str, setting: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        ConfigError(format!(
            "{setting} = '{value}' is not a HOST:PORT socket address (example: 127.0.0.1:6380)"
        ))
    })
}

impl Config {
    /// Resolves the configuration from `args` (flags and environment, already merged by clap)
    /// over the optional file over the defaults, and validates it.
    pub fn resolve(args: &ServerArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let fl = file.limits.unwrap_or_default();
        let d = Limits::default();
        let value_bytes_max = args
            .value_bytes_max
            .or(fl.value_bytes_max)
            .unwrap_or(d.value_bytes_max);
        let limits = Limits {
            value_bytes_max,
            frame_bytes_max: args.frame_bytes_max.or(fl.frame_bytes_max).unwrap_or(
                d.frame_bytes_max
                    .max(value_bytes_max + limits::KEY_BYTES_MAX + 1024),
            ),
            pipeline_depth_max: args
                .pipeline_depth_max
                .or(fl.pipeline_depth_max)
                .unwrap_or(d.pipeline_depth_max),
            connections_max: args
                .connections_max
                .or(fl.connections_max)
                .unwrap_or(d.connections_max),
            http_body_bytes_max: args
                .http_body_bytes_max
                .or(fl.http_body_bytes_max)
                .unwrap_or(value_bytes_max + 64 * 1024),
        };
        let resp_addr = args
            .resp_addr
            .clone()
            .or(file.resp_addr)
            .unwrap_or_else(|| DEFAULT_RESP_ADDR.into());
        let http_addr = args
            .http_addr
            .clone()
            .or(file.http_addr)
            .unwrap_or_else(|| DEFAULT_HTTP_ADDR.into());
        let config = Config {
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            resp_addr: parse_addr(&resp_addr, "resp_addr")?,
            http_addr: parse_addr(&http_addr, "http_addr")?,
            password: args
                .password
                .clone()
                .or(file.password)
                .filter(|p| !p.is_empty()),
            limits,
            shutdown_grace_ms: args
                .shutdown_grace_ms
                .or(file.shutdown_grace_ms)
                .unwrap_or(DEFAULT_SHUTDOWN_GRACE_MS),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        if self.resp_addr == self.http_addr {
            return Err(ConfigError(format!(
                "resp_addr and http_addr are both {}; they need different ports",
                self.resp_addr
            )));
        }
        if l.value_bytes_max == 0 || l.value_bytes_max > 512 * 1024 * 1024 {
            return Err(ConfigError(
                "limits.value_bytes_max must be between 1 and 536870912 (512 MiB)".into(),
            ));
        }
        if l.frame_bytes_max < l.value_bytes_max + limits::KEY_BYTES_MAX {
            return Err(ConfigError(format!(
                "limits.frame_bytes_max ({}) must be at least value_bytes_max + {} (key limit) = {}, \
                 or the largest allowed SET could not be sent",
                l.frame_bytes_max,
                limits::KEY_BYTES_MAX,
                l.value_bytes_max + limits::KEY_BYTES_MAX
            )));
        }
        if l.http_body_bytes_max < l.value_bytes_max {
            return Err(ConfigError(format!(
                "limits.http_body_bytes_max ({}) must be at least value_bytes_max ({})",
                l.http_body_bytes_max, l.value_bytes_max
            )));
        }
        if !(1..=1_000_000).contains(&l.pipeline_depth_max) {
            return Err(ConfigError(
                "limits.pipeline_depth_max must be 1 to 1000000".into(),
            ));
        }
        if !(1..=1_000_000).contains(&l.connections_max) {
            return Err(ConfigError(
                "limits.connections_max must be 1 to 1000000".into(),
            ));
        }
        if self.shutdown_grace_ms > 600_000 {
            return Err(ConfigError(
                "shutdown_grace_ms must be at most 600000 (10 minutes)".into(),
            ));
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    toml::from_str(&text)
        .map_err(|e| ConfigError(format!("config file {}: {}", path.display(), e.message())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let p = dir.0.join("c.toml");
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    /// A tiny self-cleaning temp dir (avoids a dev-dependency for two tests).
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let p = std::env::temp_dir().join(format!(
                    "capdb-cfg-{}-{}",
                    std::process::id(),
                    fastrand()
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        fn fastrand() -> u64 {
            use std::hash::{BuildHasher, RandomState};
            RandomState::new().hash_one(std::time::Instant::now())
        }
    }

    #[test]
    fn precedence_is_flags_over_file_over_defaults() {
        let (_d, p) = write(
            "resp_addr = \"127.0.0.1:7001\"\nhttp_addr = \"127.0.0.1:7002\"\n[limits]\nconnections_max = 5\n",
        );
        let args = ServerArgs {
            config: Some(p),
            http_addr: Some("127.0.0.1:9000".into()),
            ..Default::default()
        };
        let c = Config::resolve(&args).unwrap();
        assert_eq!(c.resp_addr.port(), 7001);
        assert_eq!(c.http_addr.port(), 9000);
        assert_eq!(c.limits.connections_max, 5);
        assert_eq!(c.limits.value_bytes_max, limits::VALUE_BYTES_MAX_DEFAULT);
    }

    #[test]
    fn bad_files_and_values_are_named() {
        let (_d, p) = write("resp_adr = \"x\"\n");
        let e = Config::resolve(&ServerArgs {
            config: Some(p),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("unknown field `resp_adr`"), "{e}");
        let e = Config::resolve(&ServerArgs {
            resp_addr: Some("nope".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("resp_addr = 'nope'"), "{e}");
        let e = Config::resolve(&ServerArgs {
            value_bytes_max: Some(1000),
            frame_bytes_max: Some(10),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("frame_bytes_max"), "{e}");
    }
}
