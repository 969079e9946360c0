//! `policyctl bench`: evaluation cost against the number of rules.
//!
//! Builds synthetic trees of N rules in memory (providers, group and VM connect grants,
//! narrowing, denies), then times `check_connect` and `check_transfer` over a fixed,
//! pseudo-random mix of hits and misses. The peer measured in the same run is a linear scan
//! over all rules (how a first-match evaluator works): the indexed cost should stay flat
//! while the scan grows with N.

use crate::ast::{Action, Effect, Item, Line, ParsedFile, Rule, Subject};
use crate::eval::Policy;
use crate::rights::{Direction, FdCaps, FdType, Rights};
use crate::validate::{compile, ValidateOptions};
use std::collections::{BTreeSet, HashMap};
use std::hint::black_box;
use std::time::Instant;

/// Wall-clock and thread-CPU time since start. CPU time is what a check costs; wall time
/// also counts time the thread spent descheduled on a busy machine.
struct Timer {
    wall: Instant,
    cpu: u64,
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes one timespec through the valid pointer we pass.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

impl Timer {
    fn start() -> Timer {
        Timer {
            wall: Instant::now(),
            cpu: thread_cpu_ns(),
        }
    }

    /// (CPU ns, wall ns) per operation.
    fn per_op(&self, n: usize) -> (f64, f64) {
        let n = n.max(1) as f64;
        let cpu = thread_cpu_ns().saturating_sub(self.cpu) as f64;
        (cpu / n, self.wall.elapsed().as_secs_f64() * 1e9 / n)
    }
}

/// One row of the table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchRow {
    /// Rules in the synthetic tree.
    pub rules: usize,
    /// Time to validate and index the tree.
    pub compile_ms: f64,
    /// `check_connect`, thread-CPU ns per call.
    pub connect_ns: f64,
    /// `check_connect`, wall-clock ns per call.
    pub connect_wall_ns: f64,
    /// `check_transfer`, thread-CPU ns per call.
    pub transfer_ns: f64,
    /// Linear-scan connect check, thread-CPU ns per call (the peer).
    pub scan_ns: f64,
    /// Fraction of the connect queries that were allowed.
    pub allow_ratio: f64,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % (n.max(1) as u64)) as usize
    }
}

fn line(n: usize, item: Item) -> Line {
    Line {
        line: u32::try_from(n + 1).unwrap_or(u32::MAX),
        item,
        words: Vec::new(),
    }
}

fn caps(spec: &[(FdType, Rights)]) -> FdCaps {
    let mut c = FdCaps::NONE;
    for (t, r) in spec {
        c.set(*t, *r);
    }
    c
}

/// A synthetic tree of about `n` rules, and the VM and service counts.
pub fn synthetic(n: usize) -> (ParsedFile, usize, usize) {
    let services = (n / 10).max(1);
    let vms = (n / 4).max(2);
    let groups = (n / 1000).max(1);
    let mut lines = Vec::new();
    let contract = caps(&[
        (FdType::Memfd, Rights::READ | Rights::MAP),
        (FdType::Pipe, Rights::WRITE),
    ]);
    for g in 0..groups {
        let members: Vec<String> = (0..vms)
            .filter(|v| v % groups == g)
            .map(|v| format!("vm{v}"))
            .collect();
        lines.push(line(
            lines.len(),
            Item::Group {
                name: format!("g{g}"),
                members,
            },
        ));
    }
    for s in 0..services {
        let rule = Rule {
            effect: Effect::Grant,
            subject: Subject::Vm(format!("p{s}")),
            action: Action::Provide {
                service: format!("svc{s}"),
                c2s: Some(contract),
                s2c: Some(contract),
                max_fds: Some(8),
                max_conns: None,
            },
        };
        lines.push(line(lines.len(), Item::Rule(rule)));
    }
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for r in 0..n.saturating_sub(services) {
        let service = format!("svc{}", rng.below(services));
        let (effect, subject, narrow) = match r % 50 {
            0 => (
                Effect::Grant,
                Subject::Group(format!("g{}", rng.below(groups))),
                None,
            ),
            1 => (
                Effect::Deny,
                Subject::Vm(format!("vm{}", rng.below(vms))),
                None,
            ),
            2 => (
                Effect::Grant,
                Subject::Vm(format!("vm{}", rng.below(vms))),
                Some(caps(&[(FdType::Memfd, Rights::READ)])),
            ),
            _ => (
                Effect::Grant,
                Subject::Vm(format!("vm{}", rng.below(vms))),
                None,
            ),
        };
        let action = Action::Connect {
            service,
            provider: None,
            c2s: narrow,
            s2c: None,
        };
        lines.push(line(
            lines.len(),
            Item::Rule(Rule {
                effect,
                subject,
                action,
            }),
        ));
    }
    (
        ParsedFile {
            name: "bench.policy".into(),
            lines,
        },
        vms,
        services,
    )
}

/// The peer: decide a connect by scanning every rule (deny wins, any grant allows).
fn scan_connect(
    rules: &[crate::eval::RuleEntry],
    groups_of: &[String],
    vm: &str,
    service: &str,
) -> bool {
    let mut granted = false;
    for e in rules {
        let Action::Connect { service: s, .. } = &e.rule.action else {
            continue;
        };
        if s != service {
            continue;
        }
        let m = match &e.rule.subject {
            Subject::Vm(v) => v == vm,
            Subject::Group(g) => groups_of.contains(g),
            Subject::Any => true,
        };
        if m {
            if e.rule.effect == Effect::Deny {
                return false;
            }
            granted = true;
        }
    }
    granted
}

fn build(n: usize) -> (Policy, usize, usize, f64) {
    let (file, vms, services) = synthetic(n);
    let mut known: BTreeSet<String> = (0..vms).map(|v| format!("vm{v}")).collect();
    known.extend((0..services).map(|s| format!("p{s}")));
    let opts = ValidateOptions {
        known_vms: Some(known),
        ..Default::default()
    };
    let t = Instant::now();
    let compiled = compile(
        std::slice::from_ref(&file),
        &HashMap::new(),
        "sha256:bench",
        &opts,
    );
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let policy = compiled
        .map(|c| c.policy)
        .unwrap_or_else(|_| Policy::deny_all());
    (policy, vms, services, ms)
}

/// Run the benchmark for each size with `iterations` indexed checks per size.
pub fn run(sizes: &[usize], iterations: usize) -> Vec<BenchRow> {
    let mut rows = Vec::new();
    for &n in sizes {
        let (policy, vms, services, compile_ms) = build(n);
        let mut rng = Rng(42);
        // Half the queries are pairs some grant names (mostly allowed), half are random
        // (mostly denied): the same mix at every size.
        let granted: Vec<(String, String)> = policy
            .rules()
            .iter()
            .filter_map(
                |e| match (&e.rule.effect, &e.rule.subject, &e.rule.action) {
                    (Effect::Grant, Subject::Vm(v), Action::Connect { service, .. }) => {
                        Some((v.clone(), service.clone()))
                    }
                    _ => None,
                },
            )
            .collect();
        let queries: Vec<(String, String)> = (0..1024)
            .map(|i| match granted.get(rng.below(granted.len())) {
                Some(pair) if i % 2 == 0 => pair.clone(),
                _ => (
                    format!("vm{}", rng.below(vms)),
                    format!("svc{}", rng.below(services)),
                ),
            })
            .collect();
        let iters = iterations.max(1);
        let mut allowed = 0usize;
        let t = Timer::start();
        for i in 0..iters {
            let (vm, svc) = &queries[i % queries.len()];
            if black_box(policy.check_connect(black_box(vm), black_box(svc), None)).is_allowed() {
                allowed += 1;
            }
        }
        let (connect_ns, connect_wall_ns) = t.per_op(iters);
        let conn = queries
            .iter()
            .find_map(|(vm, svc)| policy.check_connect(vm, svc, None).outcome.ok());
        let transfer_ns = match conn {
            Some(conn) => {
                let reqs = [
                    (FdType::Memfd, Rights::READ | Rights::MAP, Direction::C2s),
                    (
                        FdType::Pipe,
                        Rights::WRITE | Rights::TRANSFER,
                        Direction::S2c,
                    ),
                    (FdType::Dmabuf, Rights::READ, Direction::C2s),
                    (FdType::Memfd, Rights::WRITE, Direction::S2c),
                ];
                let t = Timer::start();
                for i in 0..iters {
                    let (ty, r, d) = reqs[i % reqs.len()];
                    black_box(policy.check_transfer(black_box(&conn), d, ty, r, 1));
                }
                t.per_op(iters).0
            }
            None => f64::NAN,
        };
        // The peer: fewer iterations, since it is O(rules).
        let scan_iters = (20_000_000 / n.max(1)).clamp(10, iters);
        let t = Timer::start();
        for i in 0..scan_iters {
            let (vm, svc) = &queries[i % queries.len()];
            black_box(scan_connect(
                policy.rules(),
                policy.groups_of(vm),
                black_box(vm),
                black_box(svc),
            ));
        }
        let scan_ns = t.per_op(scan_iters).0;
        rows.push(BenchRow {
            rules: n,
            compile_ms,
            connect_ns,
            connect_wall_ns,
            transfer_ns,
            scan_ns,
            allow_ratio: allowed as f64 / iters as f64,
        });
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The indexed evaluator and the linear-scan peer agree on every synthetic query.
    #[test]
    fn indexed_and_scan_agree() {
        for n in [10, 1000] {
            let (policy, vms, services, _) = build(n);
            let mut rng = Rng(7);
            let mut allowed = 0;
            for _ in 0..500 {
                let vm = format!("vm{}", rng.below(vms));
                let svc = format!("svc{}", rng.below(services));
                let a = policy.check_connect(&vm, &svc, None).is_allowed();
                assert_eq!(
                    a,
                    scan_connect(policy.rules(), policy.groups_of(&vm), &vm, &svc),
                    "{vm} {svc}"
                );
                allowed += usize::from(a);
            }
            assert!(allowed > 0, "synthetic tree allows something at n={n}");
        }
    }
}
