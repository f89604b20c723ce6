//! Real third-party peers the tests drive (HAProxy, curl): the rule for a missing tool, and an
//! HAProxy runner that waits until its frontends listen.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// True when `tool` runs (`tool VERSION_FLAG`); else the test skips with a message (false),
/// or, under `CI`, where a skipped test would hide a failure, panics.
pub fn have_tool(tool: &str, version_flag: &str) -> bool {
    let ok = Command::new(tool)
        .arg(version_flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("{tool} is missing and CI is set (scripts/setup.sh installs it)");
        }
        eprintln!("SKIP: {tool} is not installed");
    }
    ok
}

/// An address on `host` with a port nothing listens on right now (for a frontend to bind).
pub fn free_port(host: &str) -> SocketAddr {
    TcpListener::bind(format!("{host}:0"))
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("free port on {host}: {e}"))
}

/// HAProxy (`haproxy -db`), killed on drop.
pub struct Haproxy {
    child: Child,
    /// Holds the config and stderr files for as long as HAProxy runs.
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts HAProxy in netns `ns` (`None`: the test's own) with a `global`/`defaults` head
    /// (`defaults` adds lines to the defaults section, e.g. `"  mode tcp\n"`) followed by
    /// `sections`, and waits until every address in `listen` listens. Readiness is asked of the
    /// kernel (`ss`), not probed by connecting: a probe would itself be relayed to a backend.
    pub fn start(ns: Option<&str>, defaults: &str, sections: &str, listen: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let cfg_path = dir.path().join("haproxy.cfg");
        let cfg = format!(
            "global\n  maxconn 4000\ndefaults\n  timeout connect 5s\n  timeout client 30s\n  \
             timeout server 30s\n{defaults}{sections}"
        );
        std::fs::write(&cfg_path, cfg).expect("haproxy cfg");
        let err = dir.path().join("stderr");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "haproxy"]);
                c
            }
            None => Command::new("haproxy"),
        };
        let mut child = cmd
            .arg("-db")
            .arg("-f")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).expect("stderr"))
            .spawn()
            .expect("spawn haproxy");
        let ss = match ns {
            Some(ns) => format!("ip netns exec {ns} ss -Hltn"),
            None => "ss -Hltn".to_string(),
        };
        let t = Instant::now();
        let stderr = || std::fs::read_to_string(&err).unwrap_or_default();
        for addr in listen {
            while !super::sh(&ss).contains(&format!("{addr} ")) {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!("haproxy exited ({st}): {}", stderr());
                }
                if t.elapsed() > Duration::from_secs(10) {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("haproxy does not listen on {addr}: {}", stderr());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Haproxy { child, _dir: dir }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
