//! Watches the config file and applies valid changes to services and workloads.
//!
//! The file is re-read every interval and compared by content (not by mtime: editors and
//! ConfigMap updates replace files through renames and symlink swaps, and a content check
//! sees all of them). A changed file is parsed and validated exactly like at start-up; a valid
//! one has its catalog applied through [`Discovery::apply`], an invalid one is logged with
//! the error (which names the field and the fix), counted, and otherwise ignored: the running
//! config stays. Sections other than services and workloads take effect at the next restart;
//! a change to them is logged as such.

use std::{
    collections::hash_map::DefaultHasher,
    hash::{Hash, Hasher},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use serde_json::Value;
use tokio::sync::watch as tokio_watch;
use tracing::{info, warn};

use super::Discovery;
use crate::{
    config::{Config, File, Overrides},
    metrics::Metrics,
};

/// Everything the watcher needs, built once in main.
pub struct Reloader {
    pub path: PathBuf,
    pub overrides: Overrides,
    pub interval: Duration,
    pub discovery: Arc<Discovery>,
    pub metrics: Arc<Metrics>,
    /// The admin server's /config view, replaced on every applied reload.
    pub config_json: Arc<RwLock<Value>>,
    /// The effective config the proxy started with.
    pub started_with: Value,
    /// Certificates follow the declared workloads.
    pub identity: Option<Arc<crate::identity::IdentityManager>>,
}

/// The parts of the JSON view that a reload cannot change.
fn restart_only(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("services");
        o.remove("workloads");
    }
    v
}

fn digest(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

impl Reloader {
    /// Runs until `stop` turns true.
    pub async fn run(self, mut stop: tokio_watch::Receiver<bool>) {
        let mut last = std::fs::read(&self.path).ok().map(|b| digest(&b));
        let mut last_error: Option<String> = None;
        let frozen = restart_only(&self.started_with);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = stop.changed() => return,
            }
            let bytes = match std::fs::read(&self.path) {
                Ok(b) => b,
                Err(e) => {
                    let msg = format!(
                        "cannot read config file {}: {e}; the running config stays",
                        self.path.display()
                    );
                    if last_error.as_deref() != Some(&msg) {
                        warn!("config reload rejected: {msg}");
                        self.metrics.config_reload("rejected");
                        last_error = Some(msg);
                    }
                    continue;
                }
            };
            let d = digest(&bytes);
            if last == Some(d) {
                continue;
            }
            last = Some(d);
            match self.load(&bytes) {
                Ok(cfg) => {
                    last_error = None;
                    let json = cfg.to_json();
                    if restart_only(&json) != frozen {
                        warn!(
                            "config file changed outside [[service]] and [[workload]]; those changes take effect at the next restart"
                        );
                    }
                    let services = cfg.catalog.services.len();
                    if let Some(m) = &self.identity {
                        let ids = cfg
                            .catalog
                            .workloads
                            .iter()
                            .filter_map(|w| crate::identity::SpiffeId::parse(&w.identity).ok())
                            .collect();
                        // A failure keeps the old certificates; the manager retries renewals.
                        if let Err(e) = m.set_identities(ids).await {
                            warn!(error = %e, "cannot get certificates for the reloaded workloads");
                        }
                    }
                    let generation = self.discovery.apply(cfg.catalog);
                    self.metrics.config_generation.set(generation as i64);
                    self.metrics.config_reload("applied");
                    if let Ok(mut g) = self.config_json.write() {
                        *g = json;
                    }
                    info!(generation, services, "config reloaded");
                }
                Err(e) => {
                    warn!(error = %e, "config reload rejected; the running config stays");
                    self.metrics.config_reload("rejected");
                    last_error = Some(e);
                }
            }
        }
    }

    fn load(&self, bytes: &[u8]) -> Result<Config, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| {
            format!(
                "config file {} is not UTF-8 ({e}); save it as UTF-8",
                self.path.display()
            )
        })?;
        let file = File::parse(&self.path, text).map_err(|e| e.to_string())?;
        let cfg = Config::resolve(file, self.overrides.clone()).map_err(|e| e.to_string())?;
        cfg.require_interception().map_err(|e| e.to_string())?;
        Ok(cfg)
    }
}
