//! `policyctl bench`: the evaluator's cost against a linear-scan peer.

use super::{print_json, Ctx, OK};
use crate::bench;

/// Runs `bench`.
pub fn run(cx: &Ctx, sizes: &[usize], iterations: usize) -> u8 {
    if cfg!(debug_assertions) {
        eprintln!("note: debug build; use `cargo run --release -p bulkhead-policy --bin policyctl -- bench` for real numbers");
    }
    let rows = bench::run(sizes, iterations);
    if cx.json {
        print_json(&rows);
    } else {
        println!(
            "{:>8} {:>11} {:>11} {:>13} {:>12} {:>12} {:>14} {:>13} {:>13} {:>6}",
            "rules",
            "compile_ms",
            "connect_ns",
            "connects/s",
            "connect_wall",
            "transfer_ns",
            "transfers/s",
            "scan_ns",
            "scan/indexed",
            "allow"
        );
        for r in &rows {
            println!(
                "{:>8} {:>11.1} {:>11.1} {:>13.0} {:>12.1} {:>12.1} {:>14.0} {:>13.1} {:>12.1}x {:>5.0}%",
                r.rules,
                r.compile_ms,
                r.connect_ns,
                1e9 / r.connect_ns,
                r.connect_wall_ns,
                r.transfer_ns,
                1e9 / r.transfer_ns,
                r.scan_ns,
                r.scan_ns / r.connect_ns,
                r.allow_ratio * 100.0
            );
        }
        println!("(ns = thread CPU time per check; connect_wall = wall clock, inflated on a busy machine; scan = linear-scan peer)");
    }
    let mut line = String::from("BENCH policy");
    for r in &rows {
        line.push_str(&format!(" ns_per_check_{}={:.1}", r.rules, r.connect_ns));
    }
    for r in &rows {
        line.push_str(&format!(" transfer_ns_{}={:.1}", r.rules, r.transfer_ns));
    }
    if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
        line.push_str(&format!(
            " flat_ratio={:.2} scan_ratio_{}={:.1}",
            last.connect_ns / first.connect_ns,
            last.rules,
            last.scan_ns / last.connect_ns
        ));
    }
    println!("{line}");
    OK
}
