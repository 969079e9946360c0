//! The kernel command line (`/proc/cmdline`) and the `bulkhead.*` options init reads from it.
//!
//! Options with a dot never reach init's argv or environment (the kernel treats them as
//! module parameters), so init reads `/proc/cmdline` once proc is mounted. Splitting follows
//! the kernel's `next_arg()`: whitespace separates parameters except inside double quotes,
//! the quotes themselves are dropped, and a lone `--` ends the kernel's parameters (what
//! follows is argv for init and is ignored here).

use std::path::PathBuf;

use log::LevelFilter;

/// One `key` or `key=value` parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// The name, before the first `=`.
    pub key: String,
    /// The value after the first `=`, if there was one.
    pub value: Option<String>,
}

/// Splits a kernel command line into parameters, stopping at a lone `--`.
pub fn parse(cmdline: &str) -> Vec<Param> {
    let mut params = Vec::new();
    let mut token = String::new();
    let mut have_token = false;
    let mut in_quote = false;
    for c in cmdline.chars() {
        if c == '"' {
            in_quote = !in_quote;
            have_token = true;
            continue;
        }
        if c.is_whitespace() && !in_quote {
            if have_token {
                if token == "--" {
                    return params;
                }
                params.push(split_param(&token));
                token.clear();
                have_token = false;
            }
            continue;
        }
        token.push(c);
        have_token = true;
    }
    if have_token && token != "--" {
        params.push(split_param(&token));
    }
    params
}

fn split_param(token: &str) -> Param {
    match token.split_once('=') {
        Some((key, value)) => Param {
            key: key.to_string(),
            value: Some(value.to_string()),
        },
        None => Param {
            key: token.to_string(),
            value: None,
        },
    }
}

/// What init takes from the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootOptions {
    /// `bulkhead.test_panic=1`: panic on purpose right after setup (tests the panic hook).
    pub test_panic: bool,
    /// `bulkhead.test_hang=setup`: fault injection for tests; the setup child (module
    /// loading, device binding) hangs instead of working, as a wedged driver would.
    pub test_hang_setup: bool,
    /// `bulkhead.loglevel=debug|info|warn`.
    pub loglevel: Option<LevelFilter>,
    /// `bulkhead.system=/path/to/system.toml`: read this instead of the default.
    pub system: Option<PathBuf>,
    /// Problems found while reading the options, to be logged once logging works.
    pub warnings: Vec<String>,
}

/// The prefix of every option init reads.
pub const PREFIX: &str = "bulkhead.";

impl BootOptions {
    /// Extracts the `bulkhead.*` options; anything unknown or malformed becomes a warning.
    /// The last occurrence of an option wins, as with the kernel's own parameters.
    pub fn from_params(params: &[Param]) -> BootOptions {
        let mut opts = BootOptions::default();
        for p in params {
            let Some(name) = p.key.strip_prefix(PREFIX) else {
                continue;
            };
            let value = p.value.as_deref();
            match name {
                "test_panic" => match value {
                    Some("1") | Some("yes") | Some("true") | None => opts.test_panic = true,
                    Some("0") | Some("no") | Some("false") => opts.test_panic = false,
                    Some(other) => opts
                        .warnings
                        .push(format!("bulkhead.test_panic={other}: expected 1 or 0")),
                },
                "test_hang" => match value {
                    Some("setup") => opts.test_hang_setup = true,
                    _ => opts.warnings.push(format!(
                        "bulkhead.test_hang={}: expected setup",
                        value.unwrap_or("")
                    )),
                },
                "loglevel" => match value.map(str::to_ascii_lowercase).as_deref() {
                    Some("debug") => opts.loglevel = Some(LevelFilter::Debug),
                    Some("info") => opts.loglevel = Some(LevelFilter::Info),
                    Some("warn") | Some("warning") => opts.loglevel = Some(LevelFilter::Warn),
                    Some("error") => opts.loglevel = Some(LevelFilter::Error),
                    _ => opts.warnings.push(format!(
                        "bulkhead.loglevel={}: expected debug, info or warn",
                        value.unwrap_or("")
                    )),
                },
                "system" => match value {
                    Some(path) if path.starts_with('/') => {
                        opts.system = Some(PathBuf::from(path));
                    }
                    _ => opts.warnings.push(format!(
                        "bulkhead.system={}: expected an absolute path",
                        value.unwrap_or("")
                    )),
                },
                other => opts
                    .warnings
                    .push(format!("unknown option {PREFIX}{other} ignored")),
            }
        }
        opts
    }

    /// Parses a whole command line.
    pub fn from_cmdline(cmdline: &str) -> BootOptions {
        Self::from_params(&parse(cmdline))
    }
}

/// `/proc/cmdline` (at most 64 KiB), or an empty string if it cannot be read.
pub fn read_proc_cmdline() -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Ok(f) = std::fs::File::open("/proc/cmdline") {
        let _ = f.take(64 * 1024).read_to_string(&mut s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(cmdline: &str) -> Vec<(String, Option<String>)> {
        parse(cmdline)
            .into_iter()
            .map(|p| (p.key, p.value))
            .collect()
    }

    #[test]
    fn plain_and_valued_params() {
        assert_eq!(
            keys("console=ttyS0 quiet  panic=-1\n"),
            vec![
                ("console".into(), Some("ttyS0".into())),
                ("quiet".into(), None),
                ("panic".into(), Some("-1".into())),
            ]
        );
    }

    #[test]
    fn quotes_group_and_are_dropped() {
        assert_eq!(
            keys(r#"a="x y  z" "b=1 2" c"#),
            vec![
                ("a".into(), Some("x y  z".into())),
                ("b".into(), Some("1 2".into())),
                ("c".into(), None),
            ]
        );
        // An unterminated quote runs to the end of the line, like the kernel.
        assert_eq!(keys(r#"a="x y"#), vec![("a".into(), Some("x y".into()))]);
    }

    #[test]
    fn double_dash_ends_kernel_params() {
        assert_eq!(
            keys("a=1 -- bulkhead.test_panic=1 init-arg"),
            vec![("a".into(), Some("1".into()))]
        );
        assert_eq!(keys("a=1 --"), vec![("a".into(), Some("1".into()))]);
        // Only a lone `--` counts.
        assert_eq!(
            keys("--x a"),
            vec![("--x".into(), None), ("a".into(), None)]
        );
    }

    #[test]
    fn value_keeps_later_equals_signs() {
        assert_eq!(keys("k=a=b"), vec![("k".into(), Some("a=b".into()))]);
    }

    #[test]
    fn bulkhead_options() {
        let o = BootOptions::from_cmdline(
            "console=ttyS0 bulkhead.test_panic=1 bulkhead.loglevel=debug \
             bulkhead.system=\"/etc/x y.toml\" systemd.unit=foo bulkhead.test_hang=setup",
        );
        assert!(o.test_panic);
        assert!(o.test_hang_setup);
        assert_eq!(o.loglevel, Some(LevelFilter::Debug));
        assert_eq!(o.system, Some(PathBuf::from("/etc/x y.toml")));
        assert!(o.warnings.is_empty(), "{:?}", o.warnings);
    }

    #[test]
    fn dotted_keys_need_the_exact_prefix() {
        let o = BootOptions::from_cmdline("xbulkhead.test_panic=1 bulkhead_test_panic=1");
        assert!(!o.test_panic);
        assert!(o.warnings.is_empty());
    }

    #[test]
    fn bad_options_become_warnings() {
        let o = BootOptions::from_cmdline(
            "bulkhead.loglevel=loud bulkhead.system=relative bulkhead.nope=1 bulkhead.test_panic=maybe",
        );
        assert_eq!(
            o,
            BootOptions {
                warnings: o.warnings.clone(),
                ..Default::default()
            }
        );
        assert_eq!(o.warnings.len(), 4);
    }

    #[test]
    fn options_after_double_dash_ignored_and_last_wins() {
        let o = BootOptions::from_cmdline(
            "bulkhead.loglevel=warn bulkhead.loglevel=info -- bulkhead.test_panic=1",
        );
        assert_eq!(o.loglevel, Some(LevelFilter::Info));
        assert!(!o.test_panic);
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_without_panicking(text in ".{0,200}") {
            let _ = BootOptions::from_cmdline(&text);
        }

        #[test]
        fn simple_params_round_trip(
            params in proptest::collection::vec(("[a-z_.]{1,12}", proptest::option::of("[a-zA-Z0-9/ ,]{0,12}")), 0..8)
        ) {
            let line: Vec<String> = params
                .iter()
                .map(|(k, v)| match v {
                    Some(v) => format!("{k}=\"{v}\""),
                    None => k.clone(),
                })
                .collect();
            let parsed = keys(&line.join(" "));
            let expected: Vec<(String, Option<String>)> = params.clone();
            proptest::prop_assert_eq!(parsed, expected);
        }
    }
}
