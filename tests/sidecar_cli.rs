//! The sidecar's command line without privileges: help, exit codes, env, error messages.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tproxy-sidecar");

fn run(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run tproxy-sidecar");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_exits_zero_and_lists_flags_with_env_names() {
    let (code, out, _) = run(&["--help"], &[]);
    assert_eq!(code, Some(0));
    for f in [
        "--mode",
        "--annotations-file",
        "--drain-timeout",
        "TPROXY_SIDECAR_MAX_CONNECTIONS",
        "NET_RAW",
    ] {
        assert!(out.contains(f), "{f} missing from --help:\n{out}");
    }
}

#[test]
fn bad_configuration_exits_two_and_names_the_source() {
    let (code, _, err) = run(&["--bogus"], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--bogus"), "{err}");
    let (code, _, err) = run(&[], &[("TPROXY_SIDECAR_CONNECT_TIMEOUT", "soon")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("TPROXY_SIDECAR_CONNECT_TIMEOUT"), "{err}");
    let (code, _, err) = run(&["--mode", "sideways"], &[]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--mode"), "{err}");
}

#[test]
fn unreadable_annotations_exit_one_with_the_path() {
    let (code, _, err) = run(
        &[
            "--annotations-file",
            "/nonexistent/annotations",
            "--admin-port",
            "0",
        ],
        &[],
    );
    assert_eq!(code, Some(1));
    assert!(err.contains("/nonexistent/annotations"), "{err}");
}
