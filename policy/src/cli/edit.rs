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
    let original = std::fs::read(&target).unwrap_or_default();
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
                        if let Err(e) = edit::atomic_write(&target, &edited) {
                            eprintln!("error: {e}");
                            break FAIL;
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
    let _ = std::fs::remove_dir_all(&scratch);
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
