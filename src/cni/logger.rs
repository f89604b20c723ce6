//! A minimal `log` backend for the plugin: stderr or an append-only file, never stdout
//! (stdout carries only the CNI result).

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::Mutex;

struct Logger {
    file: Option<Mutex<std::fs::File>>,
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let line = format!(
            "{ts:.3} {} tproxy-cni[{}]: {}\n",
            r.level(),
            std::process::id(),
            r.args()
        );
        match &self.file {
            Some(f) => {
                if let Ok(mut f) = f.lock() {
                    let _ = f.write_all(line.as_bytes());
                }
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }
    fn flush(&self) {}
}

/// Installs the logger once; later calls only adjust the level. A log file that cannot be
/// opened falls back to stderr (logging must never make a CNI command fail).
pub fn init(level: log::LevelFilter, file: Option<&str>) {
    let file = file.and_then(|p| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
            .map(Mutex::new)
    });
    let _ = log::set_boxed_logger(Box::new(Logger { file }));
    log::set_max_level(level);
}
