//! The crash report: a panic is a bug in fuselora, never the user's fault, so instead of a bare
//! backtrace it prints what a maintainer needs — the version, the command line, where it broke —
//! and where to send it. The line `panicked at FILE:LINE` is kept so tests can detect any panic.

use std::fmt::Write;

/// What [`install`] prints for a panic `message` at `location` in the run of `args`.
pub fn report(version: &str, args: &[String], location: &str, message: &str) -> String {
    let mut r = String::new();
    let _ = writeln!(
        r,
        "\nfuselora {version} crashed: this is a bug in fuselora, not in your input."
    );
    let _ = writeln!(r, "  panicked at {location}: {message}");
    let _ = writeln!(r, "  command: {}", args.join(" "));
    let _ = writeln!(
        r,
        "Please report it in fuselora's issue tracker with this message and the command's inputs \
         (or a small case that reproduces it); run again with RUST_BACKTRACE=1 to add a backtrace."
    );
    r
}

/// Replaces the default panic message with [`report`] (keeping the backtrace when
/// `RUST_BACKTRACE` asks for one).
pub fn install(version: &'static str) {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let location = info.location().map_or("an unknown place".to_string(), |l| {
            format!("{}:{}", l.file(), l.line())
        });
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        let args: Vec<String> = std::env::args().collect();
        eprint!("{}", report(version, &args, &location, &message));
        if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
            default_hook(info);
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_the_version_the_command_the_place_and_where_to_report() {
        let r = report(
            "0.3.0",
            &[
                "fuselora".into(),
                "train".into(),
                "--config".into(),
                "run.toml".into(),
            ],
            "trainer/src/x.rs:7",
            "attempt to divide by zero",
        );
        assert!(r.contains("fuselora 0.3.0 crashed"), "{r}");
        assert!(
            r.contains("panicked at trainer/src/x.rs:7: attempt to divide by zero"),
            "{r}"
        );
        assert!(
            r.contains("command: fuselora train --config run.toml"),
            "{r}"
        );
        assert!(
            r.contains("issue tracker") && r.contains("RUST_BACKTRACE=1"),
            "{r}"
        );
    }
}
