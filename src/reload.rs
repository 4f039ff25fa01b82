//! Reloading the configuration file on change (`settings.reload: true`) and on `SIGHUP`.
//!
//! The folder is watched, not the file, because editors replace files rather than write them in
//! place; events for the file are debounced. Every path goes through [`AppState::reload`]: a valid
//! file is swapped in atomically, an invalid one changes nothing and its errors are logged.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use crate::config::ConfigErrors;
use crate::state::{AppState, ReloadSummary};

/// Quiet time after the last change before the file is read.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Reloads, logs the outcome and counts it; `why` says what triggered it. Every reload path (the
/// admin endpoint, the file watcher, `SIGHUP`) goes through here.
pub async fn reload_and_log(state: &AppState, why: &str) -> Result<ReloadSummary, ConfigErrors> {
    let result = state.reload().await;
    state.metrics.reload(result.is_ok());
    match &result {
        Ok(s) => {
            tracing::info!(
                trigger = why,
                providers = s.providers,
                routes = s.routes,
                added = ?s.added,
                removed = ?s.removed,
                "configuration reloaded"
            );
            for w in &s.warnings {
                tracing::warn!("config: {w}");
            }
        }
        Err(errors) => {
            tracing::error!(trigger = why, errors = %errors, "configuration reload refused; the running configuration is unchanged")
        }
    }
    result
}

/// Watches the configuration file's folder. The returned watcher must be kept alive.
pub fn watch(state: Arc<AppState>, path: PathBuf) -> Result<notify::RecommendedWatcher, String> {
    let file_name = path
        .file_name()
        .map(|n| n.to_owned())
        .ok_or("the configuration path has no file name")?;
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event {
            if e.paths
                .iter()
                .any(|p| p.file_name() == Some(file_name.as_os_str()))
            {
                let _ = tx.send(());
            }
        }
    })
    .map_err(|e| format!("cannot watch the configuration file: {e}"))?;
    watcher
        .watch(&folder, RecursiveMode::NonRecursive)
        .map_err(|e| format!("cannot watch {}: {e}", folder.display()))?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: wait until the file has been quiet for a moment.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
            let _ = reload_and_log(&state, "file change").await;
        }
    });
    Ok(watcher)
}

/// Reloads on every `SIGHUP`.
#[cfg(unix)]
pub fn on_sighup(state: Arc<AppState>) {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    let _ = reload_and_log(&state, "SIGHUP").await;
                }
            });
        }
        Err(e) => tracing::warn!("cannot listen for SIGHUP: {e}"),
    }
}
