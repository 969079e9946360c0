//! `policyctl edit`: visudo-like editing of one policy file.

use std::collections::HashMap;
use std::path::PathBuf;

use super::{print_diags, Ctx, FAIL, OK, USAGE};
use crate::{diff, edit};

fn prompt(question: &str) -> String {
    use std::io::Write;
    print!("{question} ");
    let _ = std::io::stdout().flush();
    let mut answer = String::new();
    match std::io::stdin().read_line(&mut answer) {
        Ok(0) | Err(_) => String::new(),
        Ok(_) => answer.trim().to_lowercase(),
    }
}

/// Runs `edit`.
pub fn run(cx: &Ctx, file: &str) -> u8 {
    if !crate::tree::valid_file_name(file) || !file.ends_with(crate::tree::SUFFIX) {
        eprintln!("error: bad policy file name `{file}` (use e.g. 50-local.policy)");
        return USAGE;
    }
    let roots = cx.roots(None);
    let Some(root) = roots.first() else {
        return USAGE;
    };
    let target = root.path.join(file);
    // What the file holds now (None: it does not exist); the write is refused if that
    // changes before it.
    let read_at_start = match std::fs::read(&target) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", target.display());
            return FAIL;
        }
    };
    let original = read_at_start.clone().unwrap_or_default();
    let old = match cx.load(&roots) {
        Ok((_, c)) => c.policy,
        Err(code) => return code,
    };
    let scratch = match tempfile_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: cannot create a scratch directory: {e}");
            return FAIL;
        }
    };
    let copy = scratch.join(file);
    if let Err(e) = std::fs::write(&copy, &original) {
        eprintln!("error: cannot write {}: {e}", copy.display());
        return FAIL;
    }
    let editor = std::env::var("VISUAL")
        .or_else(|_| std::env::var("EDITOR"))
        .unwrap_or_else(|_| "vi".into());
    let mut keep_scratch = false;
    let code = loop {
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{editor} \"$1\""))
            .arg("sh")
            .arg(&copy)
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!("error: editor `{editor}` failed; nothing written");
            break FAIL;
        }
        let edited = std::fs::read(&copy).unwrap_or_default();
        if edited == original {
            println!("no changes");
            break OK;
        }
        let mut ov = HashMap::new();
        ov.insert(target.clone(), edited.clone());
        match cx.load_overrides(&roots, &ov, true) {
            Err(_) => match prompt("invalid: (e)dit again / (d)iscard?").as_str() {
                "e" => continue,
                _ => {
                    println!("discarded; nothing written");
                    break FAIL;
                }
            },
            Ok((_, new)) => {
                print_diags(cx, &new.warnings);
                for c in diff::diff(&old, &new.policy) {
                    println!("{c}");
                }
                match prompt("(e)dit again / (d)iscard / (w)rite / (a)pply?").as_str() {
                    "e" => continue,
                    w @ ("w" | "a") => {
                        match edit::replace_if_unchanged(
                            &roots,
                            &target,
                            read_at_start.as_deref(),
                            &edited,
                            &copy,
                            &cx.opts,
                        ) {
                            Ok(_) => {}
                            Err(e @ edit::EditError::Changed { .. }) => {
                                eprintln!("error: {e}");
                                keep_scratch = true;
                                break FAIL;
                            }
                            Err(e) => {
                                eprintln!("error: {e}");
                                break FAIL;
                            }
                        }
                        println!("wrote {}", target.display());
                        if w == "a" {
                            break super::apply::run(cx, false, None, false, None);
                        }
                        break OK;
                    }
                    _ => {
                        println!("discarded; nothing written");
                        break OK;
                    }
                }
            }
        }
    };
    if !keep_scratch {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    code
}

fn tempfile_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let base = std::env::temp_dir();
    for i in 0..100u32 {
        let d = base.join(format!("policyctl-edit-{}-{i}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => return Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no free scratch directory name"))
}
