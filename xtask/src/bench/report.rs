//! Turning samples into the terminal table, results.json, results.csv, SVG plots and
//! summary.md. Every figure comes from the samples of this run; nothing is typed in.

use std::{
    collections::BTreeMap, fmt::Write as _, fs, path::Path, process::Command, time::SystemTime,
};

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde_json::{Value, json};

use super::{RssTrace, Sample, group};

/// One aggregated figure: the median of its repetitions, with min and max.
#[derive(Clone, Debug)]
pub struct Row {
    pub scenario: String,
    pub workload: String,
    pub metric: String,
    pub unit: &'static str,
    pub values: Vec<f64>,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// median / direct's median for the same workload and metric, measured in this run.
    pub ratio: Option<f64>,
}

pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn rows(samples: &[Sample]) -> Vec<Row> {
    let grouped = group(samples);
    let mut direct: BTreeMap<(String, String), f64> = BTreeMap::new();
    for ((_, w, m, sc), (_, vals)) in &grouped {
        if sc == "direct" {
            direct.insert((w.clone(), m.clone()), median(vals));
        }
    }
    grouped
        .into_iter()
        .map(|((_, workload, metric, scenario), (unit, values))| {
            let med = median(&values);
            let ratio = direct
                .get(&(workload.clone(), metric.clone()))
                .filter(|d| **d != 0.0 && d.is_finite())
                .map(|d| med / d);
            Row {
                min: values.iter().copied().fold(f64::INFINITY, f64::min),
                max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                median: med,
                scenario,
                workload,
                metric,
                unit,
                values,
                ratio,
            }
        })
        .collect()
}

const SCENARIO_ORDER: [&str; 8] = [
    "direct",
    "iptables",
    "ebpf",
    "ebpf+sockmap",
    "ebpf+kernel",
    "ebpf+naive",
    "haproxy",
    "nginx",
];

/// Workload and metric of the kernel's count of connection directions that switched to the
/// kernel-only path over a scenario's runs (recorded for the proxy scenarios with the
/// short-circuit on; `bench::validate` checks it against each scenario's --kernel-path).
pub const KERNEL_PATH_WORKLOAD: &str = "kernel-only path";
pub const KERNEL_PATH_SWITCHES: &str = "switches";

/// Sizes of the short-circuit comparison (issue 9): latency from the pinned ping-pong runs,
/// throughput from the one-connection stream runs.
const SHORT_CIRCUIT_SIZES: [(u64, &str); 5] = [
    (64, "64B"),
    (1024, "1KiB"),
    (16384, "16KiB"),
    (65536, "64KiB"),
    (1 << 20, "1MiB"),
];

/// Sizes of the kernel-only path vs direct TCP comparison: every pinned ping-pong size.
const KERNEL_VS_DIRECT_SIZES: [(u64, &str); 6] = [
    (1, "1B"),
    (64, "64B"),
    (1024, "1KiB"),
    (16384, "16KiB"),
    (65536, "64KiB"),
    (1 << 20, "1MiB"),
];

/// The first line of the kernel-only path vs direct table (`bench::validate` looks for it).
pub const KERNEL_VS_DIRECT_TITLE: &str = "kernel-only path vs direct TCP (no proxy)";

/// p50 of the sk_msg redirect between two processes over plain TCP between them, no proxy,
/// measured on this kernel (../shared/notes/sockmap-measured.md, 14 B and 1 KiB): the limit
/// the kernel-only path can approach, shown next to its measured ratio, never asserted.
const KERNEL_LIMIT_P50: f64 = 0.58;

/// The scenarios whose policy the short-circuit table compares.
const PLAIN: &str = "ebpf";
const ADAPTIVE: &str = "ebpf+sockmap";
const KERNEL: &str = "ebpf+kernel";
const NAIVE: &str = "ebpf+naive";

/// The short-circuit table: at each size, plain TCP through the proxy (`ebpf`), the naive
/// per-hop redirect (`ebpf+naive`), the adaptive per-hop policy (`ebpf+sockmap`) and the
/// kernel-only path (`ebpf+kernel`), as medians and as speed-ups over plain TCP (latency: TCP
/// p50 / its p50; throughput: its rate / TCP's; above 1 is faster), then for the adaptive
/// policy and the kernel-only path each the sizes where it is slower than plain TCP, the
/// kernel's count of kernel-only path switches per scenario, and the kernel-only path against
/// TCP without a proxy ([`kernel_vs_direct`]). A size is left out only if plain TCP has no
/// figure; a missing adaptive or kernel-only figure shows as "-"; either makes the table say
/// it is incomplete. A naive run that failed shows as "fails".
pub fn short_circuit(samples: &[Sample]) -> String {
    let rows = rows(samples);
    let median = |scenario: &str, workload: &str, metric: &str| {
        rows.iter()
            .find(|r| r.scenario == scenario && r.workload == workload && r.metric == metric)
            .map(|r| r.median)
            .filter(|v| v.is_finite() && *v > 0.0)
    };
    let mut out = String::from(
        "\nshort-circuit: plain TCP through the proxy vs naive per-hop redirect vs adaptive per-hop policy vs kernel-only path\n",
    );
    let _ = writeln!(
        out,
        "{:<7} {:>12} {:>18} {:>18} {:>18} {:>14} {:>18} {:>18} {:>18}",
        "size",
        "TCP p50 us",
        "naive p50",
        "adaptive p50",
        "kernel p50",
        "TCP Gbit/s",
        "naive Gbit/s",
        "adaptive Gbit/s",
        "kernel Gbit/s"
    );
    let mut adaptive = Verdict::default();
    let mut kernel = Verdict::default();
    let mut complete = true;
    // A figure with its speed-up over plain TCP, or `absent`: the naive policy may fail
    // outright (ENOMEM once the machine's TCP memory is full), and the table says so
    // instead of leaving the size out.
    let cell = |speedup: Option<f64>, v: Option<f64>, absent: &str| match (v, speedup) {
        (Some(v), Some(x)) => format!("{} (x{x:.2})", fmt(v)),
        _ => absent.to_string(),
    };
    for (bytes, name) in SHORT_CIRCUIT_SIZES {
        let lat = format!("pingpong {bytes}B pinned");
        let thr = format!("stream {name} x1");
        let (Some(tl), Some(tt)) = (
            median(PLAIN, &lat, "p50_us"),
            median(PLAIN, &thr, "gbit_per_s"),
        ) else {
            complete = false;
            adaptive.missing.push(format!("{name} plain TCP"));
            kernel.missing.push(format!("{name} plain TCP"));
            continue;
        };
        let faster_lat = |v: Option<f64>| v.map(|v| tl / v);
        let faster_thr = |v: Option<f64>| v.map(|v| v / tt);
        let [nl, al, kl] = [NAIVE, ADAPTIVE, KERNEL].map(|sc| median(sc, &lat, "p50_us"));
        let [nt, at, kt] = [NAIVE, ADAPTIVE, KERNEL].map(|sc| median(sc, &thr, "gbit_per_s"));
        let _ = writeln!(
            out,
            "{name:<7} {:>12} {:>18} {:>18} {:>18} {:>14} {:>18} {:>18} {:>18}",
            fmt(tl),
            cell(faster_lat(nl), nl, "fails"),
            cell(faster_lat(al), al, "-"),
            cell(faster_lat(kl), kl, "-"),
            fmt(tt),
            cell(faster_thr(nt), nt, "fails"),
            cell(faster_thr(at), at, "-"),
            cell(faster_thr(kt), kt, "-"),
        );
        adaptive.note(name, "latency", faster_lat(al));
        adaptive.note(name, "throughput", faster_thr(at));
        kernel.note(name, "latency", faster_lat(kl));
        kernel.note(name, "throughput", faster_thr(kt));
        complete &= [al, at, kl, kt].iter().all(Option::is_some);
    }
    if !complete {
        out.push_str("(some sizes are missing: a scenario did not produce them)\n");
    }
    out.push_str("(medians; xN = speed-up over plain TCP through the proxy in the same run, above 1 is faster)\n");
    out.push_str(&placements(&rows, &mut adaptive, &mut kernel));
    adaptive.write(&mut out, "adaptive per-hop policy");
    kernel.write(&mut out, "kernel-only path");
    out.push_str(&kernel_path_switches(&rows));
    out.push_str(&kernel_vs_direct(&rows));
    out
}

/// Every stream workload (size and connection count) of the short-circuit scenarios against
/// plain TCP through the proxy: the median of the per-repetition ratios, each repetition's
/// pair measured seconds apart (`Bench::interleaved_streams`), with plain TCP's median
/// Gbit/s; and where the adaptive policy is slower.
pub fn streams_vs_plain(samples: &[Sample]) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut values: BTreeMap<(&str, &str), Vec<f64>> = BTreeMap::new();
    for s in samples {
        if s.metric != "gbit_per_s" || !s.workload.starts_with("stream ") {
            continue;
        }
        if !order.contains(&s.workload.as_str()) {
            order.push(&s.workload);
        }
        values
            .entry((s.scenario.as_str(), s.workload.as_str()))
            .or_default()
            .push(s.value);
    }
    let mut out = String::from(
        "\nstreams vs plain TCP through the proxy (median of per-repetition ratios, interleaved runs; lowest-highest repetition in brackets)\n",
    );
    let _ = writeln!(
        out,
        "{:<22} {:>11} {:>18} {:>18} {:>18}",
        "workload", "TCP Gbit/s", "adaptive", "kernel", "naive"
    );
    // Per policy (adaptive, kernel-only path): where it is slower, and whether it was measured.
    let mut slower: [Vec<String>; 2] = Default::default();
    let mut measured = [false; 2];
    for w in order {
        let Some(plain) = values.get(&(PLAIN, w)) else {
            continue;
        };
        let ratio = |sc: &str| {
            let v = values.get(&(sc, w))?;
            let r: Vec<f64> = plain
                .iter()
                .zip(v)
                .filter(|(p, _)| **p > 0.0)
                .map(|(p, x)| x / p)
                .collect();
            let m = median(&r);
            let (lo, hi) = r
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                    (lo.min(*x), hi.max(*x))
                });
            m.is_finite().then_some((m, lo, hi))
        };
        let [a, k, n] = [ADAPTIVE, KERNEL, NAIVE].map(ratio);
        // One repetition has no spread to show.
        let cell = |r: Option<(f64, f64, f64)>| match r {
            None => "-".to_string(),
            Some((m, lo, hi)) if hi > lo => format!("x{m:.2} ({lo:.2}-{hi:.2})"),
            Some((m, _, _)) => format!("x{m:.2}"),
        };
        let _ = writeln!(
            out,
            "{w:<22} {:>11} {:>18} {:>18} {:>18}",
            fmt(median(plain)),
            cell(a),
            cell(k),
            cell(n)
        );
        let [a, k] = [a, k].map(|r| r.map(|(m, _, _)| m));
        for (i, r) in [a, k].into_iter().enumerate() {
            measured[i] |= r.is_some();
            if let Some(r) = r.filter(|r| *r < 1.0) {
                slower[i].push(format!("{} x{r:.2}", w.trim_start_matches("stream ")));
            }
        }
    }
    for (i, policy) in ["adaptive per-hop policy", "kernel-only path"]
        .into_iter()
        .enumerate()
    {
        if !measured[i] {
            continue;
        }
        if slower[i].is_empty() {
            let _ = writeln!(out, "{policy} >= plain TCP on every stream");
        } else {
            let _ = writeln!(
                out,
                "{policy} SLOWER than plain TCP at: {}",
                slower[i].join(", ")
            );
        }
    }
    out
}

/// Where one policy of the short-circuit table is slower than plain TCP, and where it has
/// no figure.
#[derive(Default)]
struct Verdict {
    slower: Vec<String>,
    missing: Vec<String>,
}

impl Verdict {
    /// `speedup` over plain TCP at `size` for `what` (latency or throughput), if measured.
    fn note(&mut self, size: &str, what: &str, speedup: Option<f64>) {
        match speedup {
            Some(x) if x < 1.0 => self.slower.push(format!("{size} {what} x{x:.2}")),
            Some(_) => {}
            None => self.missing.push(format!("{size} {what}")),
        }
    }

    /// One line: `who` is >= plain TCP at every size, or where it is slower; never "every
    /// size" when a size has no figure.
    fn write(&self, out: &mut String, who: &str) {
        let missing = if self.missing.is_empty() {
            String::new()
        } else {
            format!("; no figure for {}", self.missing.join(", "))
        };
        if !self.slower.is_empty() {
            let _ = writeln!(
                out,
                "{who} SLOWER than plain TCP at: {}{missing}",
                self.slower.join(", ")
            );
        } else if self.missing.is_empty() {
            let _ = writeln!(out, "{who} >= plain TCP at every size");
        } else {
            let _ = writeln!(out, "{who} >= plain TCP where measured{missing}");
        }
    }
}

/// Placements of the request/response comparison, as ping-pong workload labels (the bench's
/// `latency` runs) with what each means.
const PLACEMENTS: [(&str, &str); 3] = [
    ("pinned", "client, server and proxy on CPU 0"),
    ("split", "client on CPU 1, server and proxy on CPU 0"),
    ("unpinned", "the scheduler's choice, per scenario"),
];

/// Request/response p50 at 1 B and 1 KiB in each placement, plain TCP through the proxy
/// against the short-circuit policies. The split placement (a fixed cross-CPU wake-up for
/// every path) also counts in the policies' verdicts where plain TCP has a figure for it;
/// pinned latency counts in the size table already. Unpinned is shown, not judged: each
/// scenario's processes settle where the scheduler puts them, and a path that settles with
/// more wake-ups crossing CPUs pays about 4 µs for each on this VM, whatever the path.
fn placements(rows: &[Row], adaptive: &mut Verdict, kernel: &mut Verdict) -> String {
    let median = |scenario: &str, workload: &str| {
        rows.iter()
            .find(|r| r.scenario == scenario && r.workload == workload && r.metric == "p50_us")
            .map(|r| r.median)
            .filter(|v| v.is_finite() && *v > 0.0)
    };
    let mut out = String::new();
    for (placement, what) in PLACEMENTS {
        for (bytes, name) in [(1u64, "1B"), (1024, "1KiB")] {
            let w = format!("pingpong {bytes}B {placement}");
            let Some(tcp) = median(PLAIN, &w) else {
                continue;
            };
            if out.is_empty() {
                out.push_str(
                    "request/response p50 by placement (us; xN = speed-up over plain TCP through the proxy)\n",
                );
                let _ = writeln!(
                    out,
                    "{:<16} {:>10} {:>18} {:>18} {:>18}  placement",
                    "workload", "TCP", "naive", "adaptive", "kernel"
                );
            }
            let [n, a, k] = [NAIVE, ADAPTIVE, KERNEL].map(|sc| median(sc, &w));
            let cell = |v: Option<f64>| match v {
                Some(v) => format!("{} (x{:.2})", fmt(v), tcp / v),
                None => "-".to_string(),
            };
            let _ = writeln!(
                out,
                "{:<16} {:>10} {:>18} {:>18} {:>18}  {what}",
                format!("{placement} {name}"),
                fmt(tcp),
                cell(n),
                cell(a),
                cell(k)
            );
            if placement == "split" {
                let what = format!("latency {placement}");
                adaptive.note(name, &what, a.map(|v| tcp / v));
                kernel.note(name, &what, k.map(|v| tcp / v));
            }
        }
    }
    out
}

/// The kernel's count of directions that switched to the kernel-only path in each
/// short-circuit scenario, with a warning when a scenario did not take the path its name
/// says (the per-hop ones run with --kernel-path off).
fn kernel_path_switches(rows: &[Row]) -> String {
    let count = |sc: &str| {
        rows.iter()
            .find(|r| {
                r.scenario == sc
                    && r.workload == KERNEL_PATH_WORKLOAD
                    && r.metric == KERNEL_PATH_SWITCHES
            })
            .map(|r| r.median)
            .filter(|v| v.is_finite())
    };
    let shown: Vec<String> = [ADAPTIVE, KERNEL, NAIVE]
        .iter()
        .map(|sc| match count(sc) {
            Some(n) => format!("{sc} {n:.0}"),
            None => format!("{sc} not counted"),
        })
        .collect();
    let mut out = format!(
        "kernel-only path switches (connection directions, counted by the kernel): {}\n",
        shown.join(", ")
    );
    if count(KERNEL) == Some(0.0) {
        let _ = writeln!(
            out,
            "WARNING: the kernel-only path never engaged in {KERNEL}: its figures are those of the per-hop short-circuit"
        );
    }
    for sc in [ADAPTIVE, NAIVE] {
        if count(sc).is_some_and(|n| n > 0.0) {
            let _ = writeln!(
                out,
                "WARNING: {sc} used the kernel-only path although it runs with --kernel-path off: its figures are not per-hop only"
            );
        }
    }
    out
}

/// The kernel-only path (`ebpf+kernel`) against TCP without a proxy (`direct`): p50 of the
/// pinned ping-pong at each size and kernel/direct (lower is better), next to the limit the
/// kernel redirect reached without any proxy on this kernel. Reported, not asserted.
fn kernel_vs_direct(rows: &[Row]) -> String {
    let p50 = |scenario: &str, bytes: u64| {
        let workload = format!("pingpong {bytes}B pinned");
        rows.iter()
            .find(|r| r.scenario == scenario && r.workload == workload && r.metric == "p50_us")
            .map(|r| r.median)
            .filter(|v| v.is_finite() && *v > 0.0)
    };
    let mut out = format!(
        "\n{KERNEL_VS_DIRECT_TITLE}: pinned ping-pong p50; the kernel limit of the sk_msg redirect, measured without a proxy, is x{KERNEL_LIMIT_P50:.2} of plain TCP at p50 (../shared/notes/sockmap-measured.md)\n"
    );
    let _ = writeln!(
        out,
        "{:<7} {:>14} {:>14} {:>14}",
        "size", "direct p50 us", "kernel p50 us", "kernel/direct"
    );
    let mut complete = true;
    for (bytes, name) in KERNEL_VS_DIRECT_SIZES {
        let (direct, kernel) = (p50("direct", bytes), p50(KERNEL, bytes));
        let show = |v: Option<f64>| v.map_or_else(|| "-".to_string(), fmt);
        let ratio = match (direct, kernel) {
            (Some(d), Some(k)) => format!("x{:.2}", k / d),
            _ => {
                complete = false;
                "-".to_string()
            }
        };
        let _ = writeln!(
            out,
            "{name:<7} {:>14} {:>14} {ratio:>14}",
            show(direct),
            show(kernel)
        );
    }
    if !complete {
        out.push_str("(some sizes are missing: a scenario did not produce them)\n");
    }
    let _ = writeln!(
        out,
        "(medians; kernel/direct = kernel-only path p50 / direct TCP p50 in the same run, lower is better, below 1 is faster than TCP without a proxy; the kernel limit is x{KERNEL_LIMIT_P50:.2})"
    );
    out
}

/// The terminal table: one line per (workload, metric), one column per scenario,
/// "median (×ratio to direct)".
pub fn table(samples: &[Sample]) -> String {
    let rows = rows(samples);
    let mut lines: BTreeMap<(usize, String, String), BTreeMap<String, String>> = BTreeMap::new();
    let mut order: Vec<(String, String)> = Vec::new();
    let mut errors = Vec::new();
    let failed: Vec<(&str, &str)> = rows
        .iter()
        .filter(|r| r.metric == "errors" && r.max > 0.0)
        .map(|r| (r.scenario.as_str(), r.workload.as_str()))
        .collect();
    for r in &rows {
        if r.metric == "errors" {
            if r.max > 0.0 {
                errors.push(format!(
                    "ERRORS: {} / {}: {} (max of reps)",
                    r.scenario, r.workload, r.max
                ));
            }
            continue;
        }
        let key = (r.workload.clone(), format!("{} [{}]", r.metric, r.unit));
        let idx = order.iter().position(|k| *k == key).unwrap_or_else(|| {
            order.push(key.clone());
            order.len() - 1
        });
        // A figure from a run that also counted errors is flagged: the connections that
        // failed are not in it (see the ERRORS lines).
        let flag = if failed.contains(&(r.scenario.as_str(), r.workload.as_str())) {
            "!"
        } else {
            ""
        };
        let cell = match r.ratio {
            Some(x) if r.scenario != "direct" => format!("{}{flag} (x{x:.2})", fmt(r.median)),
            _ => format!("{}{flag}", fmt(r.median)),
        };
        lines
            .entry((idx, key.0, key.1))
            .or_default()
            .insert(r.scenario.clone(), cell);
    }
    let mut out = String::new();
    let _ = write!(out, "\n{:<24} {:<24}", "workload", "metric");
    for sc in SCENARIO_ORDER {
        let _ = write!(out, " {sc:>20}");
    }
    out.push('\n');
    for ((_, w, m), cells) in lines {
        let _ = write!(out, "{w:<24} {m:<24}");
        for sc in SCENARIO_ORDER {
            let _ = write!(
                out,
                " {:>20}",
                cells.get(sc).map(String::as_str).unwrap_or("-")
            );
        }
        out.push('\n');
    }
    out.push_str("(medians; xN = ratio to direct measured in the same run; ! = errors in that run, see below)\n");
    for e in errors {
        let _ = writeln!(out, "{e}");
    }
    out
}

fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub fn timestamp(_now: SystemTime) -> String {
    Command::new("date")
        .args(["-u", "+%Y%m%d-%H%M%S"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "run".into())
}

/// Kernel, CPUs and the versions of everything measured.
pub fn machine_info(proxy: &Path, congestion: &str, cpu_sharing: &str) -> Value {
    let run = |cmd: &str, args: &[&str]| -> String {
        Command::new(cmd)
            .args(args)
            .output()
            .map(|o| {
                let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                s.push_str(&String::from_utf8_lossy(&o.stderr));
                s.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_default()
    };
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_default();
    json!({
        "kernel": run("uname", &["-r"]),
        "cpus": run("nproc", &[]),
        "cpu_model": cpu,
        "tcp_congestion_control": congestion,
        "cpu_sharing": cpu_sharing,
        "rustc": run("rustc", &["--version"]),
        "proxy": run(&proxy.display().to_string(), &["--version"]),
        "haproxy": run("haproxy", &["-v"]),
        "nginx": run("nginx", &["-v"]),
        "wrk": run("wrk", &["-v"]),
        "h2load": run("h2load", &["--version"]),
    })
}

/// Writes results.json, results.csv, the SVG plots and summary.md into `dir`.
pub struct Run<'a> {
    pub stamp: &'a str,
    pub samples: &'a [Sample],
    pub traces: &'a [RssTrace],
    pub machine: &'a Value,
    pub quick: bool,
    pub reps: usize,
}

pub fn write_all(dir: &Path, run: &Run<'_>) -> Result<()> {
    let Run {
        stamp,
        samples,
        traces,
        machine,
        quick,
        reps,
    } = *run;
    let rows = rows(samples);
    let results: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "scenario": r.scenario, "workload": r.workload, "metric": r.metric, "unit": r.unit,
                "values": r.values, "median": nan_null(r.median), "min": nan_null(r.min), "max": nan_null(r.max),
                "ratio_vs_direct": r.ratio.map(nan_null),
            })
        })
        .collect();
    let traces_json: Vec<Value> = traces
        .iter()
        .map(|t| json!({"scenario": t.scenario, "seconds_rss_mib": t.points}))
        .collect();
    let doc = json!({
        "date": stamp,
        "quick": quick,
        "repetitions": reps,
        "machine": machine,
        "results": results,
        "rss_traces": traces_json,
    });
    fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;

    let mut csv =
        String::from("scenario,workload,metric,unit,median,min,max,ratio_vs_direct,repetitions\n");
    for r in &rows {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{}",
            r.scenario,
            r.workload,
            r.metric,
            r.unit,
            r.median,
            r.min,
            r.max,
            r.ratio.map(|x| x.to_string()).unwrap_or_default(),
            r.values.len()
        );
    }
    fs::write(dir.join("results.csv"), csv)?;

    plot_latency(&dir.join("latency.svg"), &rows).context("latency plot")?;
    plot_throughput(&dir.join("throughput.svg"), &rows).context("throughput plot")?;
    plot_rss(&dir.join("rss.svg"), traces).context("rss plot")?;

    let mut md = String::new();
    let _ = writeln!(md, "# Bench {stamp}\n");
    let _ = writeln!(
        md,
        "Machine: kernel {}, {} CPUs ({}), TCP congestion control {}, CPU sharing {}; {}; {}; {}; {}; {}.\n",
        machine["kernel"].as_str().unwrap_or("?"),
        machine["cpus"].as_str().unwrap_or("?"),
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["tcp_congestion_control"].as_str().unwrap_or("?"),
        machine["cpu_sharing"].as_str().unwrap_or("?"),
        machine["rustc"].as_str().unwrap_or("?"),
        machine["haproxy"].as_str().unwrap_or("?"),
        machine["nginx"].as_str().unwrap_or("?"),
        machine["wrk"].as_str().unwrap_or("?"),
        machine["h2load"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        md,
        "Method: {reps} repetition(s) per figure, medians shown with ratios to `direct` measured in the same run{}. Latency \"pinned\": client, server and proxy on CPU 0; \"split\": the client on CPU 1, server and proxy on CPU 0; \"unpinned\": scheduler's choice. Load generators run in the client pod and share the 2 CPUs with the proxy. Streams of {} are interleaved: for each size, every repetition runs each of them once (the proxy restarted for it), in an order rotated per repetition, so their ratios compare scenarios seconds apart rather than the machine's drift.\n",
        if quick {
            " (--quick: tiny counts, numbers are not meaningful)"
        } else {
            ""
        },
        super::SCENARIOS
            .iter()
            .filter(|s| s.interleaved && samples.iter().any(|x| x.scenario == s.name))
            .map(|s| s.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    md.push_str("```\n");
    md.push_str(&table(samples));
    md.push_str(&short_circuit(samples));
    md.push_str(&streams_vs_plain(samples));
    md.push_str("```\n\nPlots: latency.svg, throughput.svg, rss.svg. Raw data: results.json, results.csv.\n");
    md.push_str(&details(&rows));
    fs::write(dir.join("summary.md"), md)?;
    Ok(())
}

/// Every figure as median [min, max] over its repetitions, one table per workload.
fn details(rows: &[Row]) -> String {
    let mut out = String::from("\n## Details: median [min, max] over the repetitions\n");
    let mut keys: Vec<(&str, &str, &str)> = Vec::new();
    for r in rows {
        let k = (r.workload.as_str(), r.metric.as_str(), r.unit);
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let _ = write!(out, "\n| workload | metric |");
    for sc in SCENARIO_ORDER {
        let _ = write!(out, " {sc} |");
    }
    out.push_str("\n|---|---|");
    out.push_str(&"---|".repeat(SCENARIO_ORDER.len()));
    out.push('\n');
    for (w, m, unit) in keys {
        let _ = write!(out, "| {w} | {m} [{unit}] |");
        for sc in SCENARIO_ORDER {
            match rows
                .iter()
                .find(|r| r.scenario == sc && r.workload == w && r.metric == m)
            {
                Some(r) => {
                    let _ = write!(out, " {} [{}, {}] |", fmt(r.median), fmt(r.min), fmt(r.max));
                }
                None => out.push_str(" - |"),
            }
        }
        out.push('\n');
    }
    out
}

fn nan_null(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

fn colour(i: usize) -> RGBColor {
    // One colour per scenario of SCENARIO_ORDER.
    const C: [RGBColor; 8] = [
        RGBColor(0, 0, 0),
        RGBColor(214, 39, 40),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(23, 190, 207),
        RGBColor(148, 103, 189),
        RGBColor(255, 127, 14),
        RGBColor(140, 86, 75),
    ];
    C[i % C.len()]
}

/// Medians of one metric across categories (x positions 0, 1, ...), one series per scenario.
fn series_by_category(
    rows: &[Row],
    categories: &[(&str, &str)],
) -> Vec<(&'static str, Vec<(f64, f64)>)> {
    SCENARIO_ORDER
        .iter()
        .map(|sc| {
            let pts = categories
                .iter()
                .enumerate()
                .filter_map(|(i, (workload, metric))| {
                    rows.iter()
                        .find(|r| {
                            r.scenario == *sc && r.workload == *workload && r.metric == *metric
                        })
                        .filter(|r| r.median.is_finite())
                        .map(|r| (i as f64, r.median))
                })
                .collect();
            (*sc, pts)
        })
        .collect()
}

/// A line chart over categorical x positions, one line per scenario.
fn category_chart(
    path: &Path,
    caption: &str,
    y_desc: &str,
    x_labels: &[&str],
    series: Vec<(&str, Vec<(f64, f64)>)>,
) -> Result<()> {
    let ymax = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(0.1, f64::max)
        * 1.1;
    let xmax = x_labels.len() as f64 - 0.8;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.2f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_labels(x_labels.len())
        .x_label_formatter(&|x| {
            x_labels
                .get(x.round() as usize)
                .copied()
                .unwrap_or("")
                .to_string()
        })
        .y_desc(y_desc)
        .draw()?;
    for (i, (name, pts)) in series.into_iter().enumerate() {
        let c = colour(i);
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn plot_latency(path: &Path, rows: &[Row]) -> Result<()> {
    let w = "pingpong 1B pinned";
    let cats = [(w, "p50_us"), (w, "p90_us"), (w, "p99_us"), (w, "p999_us")];
    category_chart(
        path,
        "1-byte ping-pong latency, pinned (µs, median of reps)",
        "µs",
        &["p50", "p90", "p99", "p99.9"],
        series_by_category(rows, &cats),
    )
}

fn plot_throughput(path: &Path, rows: &[Row]) -> Result<()> {
    let labels = ["64B", "1KiB", "16KiB", "64KiB", "1MiB"];
    let workloads: Vec<String> = labels.iter().map(|s| format!("stream {s} x1")).collect();
    let cats: Vec<(&str, &str)> = workloads
        .iter()
        .map(|w| (w.as_str(), "gbit_per_s"))
        .collect();
    category_chart(
        path,
        "Stream throughput by write size, 1 connection (Gbit/s)",
        "Gbit/s",
        &labels,
        series_by_category(rows, &cats),
    )
}

fn plot_rss(path: &Path, traces: &[RssTrace]) -> Result<()> {
    let xmax = traces
        .iter()
        .flat_map(|t| t.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let ymax = traces
        .iter()
        .flat_map(|t| t.points.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "RSS of the proxy under test over its unpinned run (MiB)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("MiB")
        .draw()?;
    for t in traces.iter().filter(|t| !t.points.is_empty()) {
        let i = SCENARIO_ORDER
            .iter()
            .position(|s| *s == t.scenario)
            .unwrap_or(0);
        let c = colour(i);
        chart
            .draw_series(LineSeries::new(t.points.clone(), c.stroke_width(2)))?
            .label(t.scenario.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

// === load generator output ===

/// wrk --latency: (requests/s, p50 ms, p99 ms, requests).
pub fn parse_wrk(text: &str) -> Option<(f64, f64, f64, f64)> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let pct = |p: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .and_then(|v| duration_ms(v.trim()))
    };
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())?;
    Some((rps, pct("50%")?, pct("99%")?, requests))
}

fn duration_ms(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|x| x * scale)
}

/// h2load: (requests/s, requests done, requests failed). h2load's `errored` and `timeout`
/// are subsets of `failed` (which also counts non-2xx/3xx statuses), so only `failed` counts.
pub fn parse_h2load(text: &str) -> Option<(f64, f64, f64)> {
    let fin = text.lines().find(|l| l.starts_with("finished in"))?;
    let rps = fin
        .split(',')
        .nth(1)?
        .trim()
        .strip_suffix("req/s")?
        .trim()
        .parse()
        .ok()?;
    let req = text.lines().find(|l| l.starts_with("requests:"))?;
    let field = |name: &str| -> Option<f64> {
        req.split(',').find_map(|p| {
            let p = p.trim().trim_start_matches("requests:").trim();
            p.strip_suffix(name).and_then(|n| n.trim().parse().ok())
        })
    };
    Some((rps, field("done")?, field("failed")?))
}

/// h2load --log-file: one request a line, tab-separated: start (µs since epoch), status,
/// duration (µs). Returns (p50 µs, p99 µs, requests, requests without a 2xx status).
pub fn parse_h2load_log(text: &str) -> Option<(f64, f64, f64, f64)> {
    let mut durations = Vec::new();
    let mut bad = 0u64;
    for line in text.lines() {
        let mut f = line.split('\t');
        let (_, status, dur) = (f.next(), f.next()?, f.next()?);
        let status: u16 = status.trim().parse().ok()?;
        if !(200..300).contains(&status) {
            bad += 1;
        }
        durations.push(dur.trim().parse::<f64>().ok()?);
    }
    if durations.is_empty() {
        return None;
    }
    durations.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        durations[((p * durations.len() as f64).ceil() as usize).clamp(1, durations.len()) - 1]
    };
    Some((rank(0.50), rank(0.99), durations.len() as f64, bad as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_nan() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
    }

    #[test]
    fn parses_wrk() {
        let text = "Running 1s test @ http://10.77.2.2:8080/\n  2 threads and 10 connections\n  Latency Distribution\n     50%  110.00us\n     75%  200.00us\n     90%  300.00us\n     99%    1.23ms\n  12345 requests in 1.00s, 1.23MB read\nRequests/sec:  12345.67\nTransfer/sec:      1.23MB\n";
        let (rps, p50, p99, n) = parse_wrk(text).unwrap_or_default();
        assert_eq!(rps, 12345.67);
        assert!((p50 - 0.11).abs() < 1e-9 && (p99 - 1.23).abs() < 1e-9);
        assert_eq!(n, 12345.0);
        assert!(parse_wrk("garbage").is_none());
    }

    #[test]
    fn parses_h2load() {
        let text = "starting benchmark...\nfinished in 1.23s, 8130.08 req/s, 1.23MB/s\nrequests: 10000 total, 10000 started, 9990 done, 9980 succeeded, 10 failed, 2 errored, 1 timeout\n";
        assert_eq!(parse_h2load(text), Some((8130.08, 9990.0, 10.0)));
        assert_eq!(parse_h2load("nothing"), None);
    }

    #[test]
    fn parses_h2load_log() {
        let mut text = String::new();
        for i in 1..=100 {
            text.push_str(&format!(
                "1700000000{i:06}\t{}\t{}\n",
                if i == 7 { 502 } else { 200 },
                i * 10
            ));
        }
        assert_eq!(parse_h2load_log(&text), Some((500.0, 990.0, 100.0, 1.0)));
        assert_eq!(parse_h2load_log(""), None);
        assert_eq!(parse_h2load_log("x\ty\tz\n"), None);
    }

    #[test]
    fn ratios_are_against_direct_of_the_same_run() {
        let s = |scenario: &str, v: f64| Sample {
            scenario: scenario.into(),
            workload: "w".into(),
            metric: "m".into(),
            unit: "us",
            value: v,
        };
        let rows = rows(&[
            s("direct", 10.0),
            s("direct", 12.0),
            s("direct", 11.0),
            s("ebpf", 22.0),
        ]);
        let e = rows.iter().find(|r| r.scenario == "ebpf").map(|r| r.ratio);
        assert_eq!(e, Some(Some(2.0)));
        let table = table(&[s("direct", 10.0), s("ebpf", 5.0)]);
        assert!(table.contains("(x0.50)"), "{table}");
        let d = details(&super::rows(&[
            s("direct", 10.0),
            s("direct", 14.0),
            s("direct", 12.0),
        ]));
        assert!(d.contains("| w | m [us] | 12.00 [10.00, 14.00] |"), "{d}");
    }

    #[test]
    fn plots_render_every_scenario() -> Result<()> {
        let mut samples = Vec::new();
        for (k, sc) in SCENARIO_ORDER.iter().enumerate() {
            for m in ["p50_us", "p90_us", "p99_us", "p999_us"] {
                samples.push(Sample {
                    scenario: (*sc).into(),
                    workload: "pingpong 1B pinned".into(),
                    metric: m.into(),
                    unit: "us",
                    value: 10.0 + k as f64,
                });
            }
            samples.push(Sample {
                scenario: (*sc).into(),
                workload: "stream 64KiB x1".into(),
                metric: "gbit_per_s".into(),
                unit: "Gbit/s",
                value: 5.0 + k as f64,
            });
        }
        let rows = rows(&samples);
        let dir = std::env::temp_dir().join(format!("bench-plot-test-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        plot_latency(&dir.join("l.svg"), &rows)?;
        plot_throughput(&dir.join("t.svg"), &rows)?;
        for f in ["l.svg", "t.svg"] {
            let svg = fs::read_to_string(dir.join(f))?;
            for sc in SCENARIO_ORDER {
                assert!(svg.contains(sc), "{f} lacks {sc}");
            }
        }
        let _ = fs::remove_dir_all(&dir);
        Ok(())
    }

    fn sample(scenario: &str, workload: String, metric: &str, v: f64) -> Sample {
        Sample {
            scenario: scenario.into(),
            workload,
            metric: metric.into(),
            unit: "x",
            value: v,
        }
    }

    /// Every figure the short-circuit tables read: plain TCP 40 us / 8 Gbit/s, adaptive
    /// 20 us / 10 Gbit/s (6 at 64 KiB), kernel-only 10 us / 24 Gbit/s (4 at 16 KiB), naive
    /// 25 us / 16 Gbit/s (failed at 1 MiB), direct 20 us; the kernel path switched 12
    /// directions in ebpf+kernel and none in the per-hop scenarios.
    fn short_circuit_samples() -> Vec<Sample> {
        let s = sample;
        let mut samples = Vec::new();
        for (bytes, name) in SHORT_CIRCUIT_SIZES {
            let lat = format!("pingpong {bytes}B pinned");
            let thr = format!("stream {name} x1");
            samples.push(s("ebpf", lat.clone(), "p50_us", 40.0));
            samples.push(s("ebpf+sockmap", lat.clone(), "p50_us", 20.0));
            samples.push(s("ebpf", thr.clone(), "gbit_per_s", 8.0));
            // 64 KiB: the adaptive policy slower than TCP; the naive one failed at 1 MiB.
            let adaptive = if bytes == 65536 { 6.0 } else { 10.0 };
            samples.push(s("ebpf+sockmap", thr.clone(), "gbit_per_s", adaptive));
            // 16 KiB: the kernel-only path slower than TCP.
            let kernel = if bytes == 16384 { 4.0 } else { 24.0 };
            samples.push(s("ebpf+kernel", thr.clone(), "gbit_per_s", kernel));
            if bytes != 1 << 20 {
                samples.push(s("ebpf+naive", lat, "p50_us", 25.0));
                samples.push(s("ebpf+naive", thr, "gbit_per_s", 16.0));
            }
        }
        for (bytes, _) in KERNEL_VS_DIRECT_SIZES {
            let lat = format!("pingpong {bytes}B pinned");
            samples.push(s("ebpf+kernel", lat.clone(), "p50_us", 10.0));
            samples.push(s("direct", lat, "p50_us", 20.0));
        }
        for (sc, n) in [
            ("ebpf+sockmap", 0.0),
            ("ebpf+kernel", 12.0),
            ("ebpf+naive", 0.0),
        ] {
            samples.push(s(sc, KERNEL_PATH_WORKLOAD.into(), KERNEL_PATH_SWITCHES, n));
        }
        samples
    }

    /// The line of `table` that starts with `first` (a size), split into its cells.
    fn line_of(table: &str, first: &str) -> String {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(first))
            .unwrap_or_default()
            .to_string()
    }

    #[test]
    fn streams_compare_each_repetition_with_its_own_plain_tcp_run() {
        // Plain TCP drifts from 10 to 4 Gbit/s over the repetitions; adaptive runs at 1.1x
        // of each paired run, so the ratio of medians (8/10 at 16 KiB) would call it slower
        // where the pairs say it is faster. At 1 MiB it is slower in every pair.
        let mut v = Vec::new();
        for (plain, adaptive) in [(10.0, 11.0), (4.0, 4.4), (9.0, 9.9)] {
            v.push(sample(
                PLAIN,
                "stream 16KiB x10".into(),
                "gbit_per_s",
                plain,
            ));
            v.push(sample(
                ADAPTIVE,
                "stream 16KiB x10".into(),
                "gbit_per_s",
                adaptive,
            ));
        }
        for (plain, adaptive) in [(5.0, 4.0), (6.0, 5.4)] {
            v.push(sample(
                PLAIN,
                "stream 1MiB x100".into(),
                "gbit_per_s",
                plain,
            ));
            v.push(sample(
                ADAPTIVE,
                "stream 1MiB x100".into(),
                "gbit_per_s",
                adaptive,
            ));
        }
        v.push(sample(PLAIN, "stream 1MiB x100".into(), "errors", 0.0));
        let t = streams_vs_plain(&v);
        let line = |w: &str| t.lines().find(|l| l.starts_with(w)).unwrap_or_default();
        assert!(line("stream 16KiB x10 ").contains("9.00"), "{t}");
        assert!(line("stream 16KiB x10 ").contains("x1.10"), "{t}");
        assert!(
            line("stream 1MiB x100 ").contains("x0.85 (0.80-0.90)"),
            "{t}"
        );
        assert!(
            t.contains("adaptive per-hop policy SLOWER than plain TCP at: 1MiB x100 x0.85"),
            "{t}"
        );
        assert!(!t.contains("16KiB x10 x"), "{t}");
        // No verdict on a policy that was not measured.
        assert!(!t.contains("kernel-only path"), "{t}");
    }

    #[test]
    fn short_circuit_table_compares_with_plain_tcp_and_says_where_slower() {
        let samples = short_circuit_samples();
        let t = short_circuit(&samples);
        assert!(
            t.contains("adaptive p50") && t.contains("kernel Gbit/s"),
            "{t}"
        );
        // 1 KiB: naive, adaptive, kernel-only latency, then naive, adaptive, kernel-only
        // throughput, each with its speed-up over plain TCP.
        let kib = line_of(&t, "1KiB");
        for cell in [
            "25.00 (x1.60)",
            "20.00 (x2.00)",
            "10.00 (x4.00)",
            "16.00 (x2.00)",
            "10.00 (x1.25)",
            "24.00 (x3.00)",
        ] {
            assert!(kib.contains(cell), "{cell} not in {kib}\n{t}");
        }
        assert!(line_of(&t, "1MiB").contains("fails"), "{t}");
        assert!(!t.contains("missing"), "{t}");
        assert!(!t.contains("no figure"), "{t}");
        // One verdict per policy, each about its own columns.
        assert!(
            t.contains(
                "adaptive per-hop policy SLOWER than plain TCP at: 64KiB throughput x0.75\n"
            ),
            "{t}"
        );
        assert!(
            t.contains("kernel-only path SLOWER than plain TCP at: 16KiB throughput x0.50\n"),
            "{t}"
        );
        assert!(
            t.contains("switches (connection directions, counted by the kernel): ebpf+sockmap 0, ebpf+kernel 12, ebpf+naive 0"),
            "{t}"
        );
        assert!(!t.contains("WARNING"), "{t}");

        // Without the adaptive figures for a size, the row shows "-" there and the table
        // says it is incomplete; without plain TCP, the size is left out.
        let without: Vec<Sample> = samples
            .iter()
            .filter(|s| !(s.scenario == "ebpf+sockmap" && s.workload.starts_with("pingpong 64B")))
            .cloned()
            .collect();
        let t = short_circuit(&without);
        assert!(t.contains("some sizes are missing"), "{t}");
        assert!(line_of(&t, "64B").contains("      - "), "{t}");
        assert!(
            t.contains("adaptive per-hop policy SLOWER than plain TCP at: 64KiB throughput x0.75; no figure for 64B latency\n"),
            "{t}"
        );
        let t = short_circuit(&samples[4..]);
        let per_hop = &t[..t.find(KERNEL_VS_DIRECT_TITLE).unwrap_or(t.len())];
        assert!(line_of(per_hop, "64B").is_empty(), "{t}");
        assert!(t.contains("some sizes are missing"), "{t}");
        assert!(t.contains("; no figure for 64B plain TCP\n"), "{t}");
    }

    #[test]
    fn short_circuit_table_compares_placements_and_judges_the_split_one() {
        let mut samples = short_circuit_samples();
        let t = short_circuit(&samples);
        // Only pinned figures: the pinned rows, no split verdict.
        assert!(line_of(&t, "pinned").contains("40.00"), "{t}");
        assert!(line_of(&t, "split").is_empty(), "{t}");
        assert!(!t.contains("latency split"), "{t}");

        let s = sample;
        // Unpinned, the adaptive policy settled where it is slower than plain TCP.
        for (sc, one, kib, unpinned) in [
            ("ebpf", 36.0, 38.0, 28.0),
            ("ebpf+sockmap", 30.0, 40.0, 37.0),
            ("ebpf+kernel", 18.0, 19.0, 16.0),
        ] {
            samples.push(s(sc, "pingpong 1B split".into(), "p50_us", one));
            samples.push(s(sc, "pingpong 1024B split".into(), "p50_us", kib));
            samples.push(s(sc, "pingpong 1B unpinned".into(), "p50_us", unpinned));
        }
        let t = short_circuit(&samples);
        let split = line_of(&t, "split");
        for cell in ["36.00", "30.00 (x1.20)", "18.00 (x2.00)", "client on CPU 1"] {
            assert!(split.contains(cell), "{cell} not in {split}\n{t}");
        }
        // The naive policy has no split figure: "-", not a missing-figure verdict.
        assert!(split.contains(" - "), "{t}");
        assert!(line_of(&t, "unpinned").contains("37.00 (x0.76)"), "{t}");
        assert!(!t.contains("unpinned 1KiB"), "{t}");
        assert!(
            t.contains("adaptive per-hop policy SLOWER than plain TCP at: 64KiB throughput x0.75, 1KiB latency split x0.95\n"),
            "{t}"
        );
        // Unpinned is shown, never judged.
        assert!(!t.contains("latency unpinned"), "{t}");
    }

    #[test]
    fn short_circuit_table_shows_a_missing_kernel_path_figure() {
        let mut samples = short_circuit_samples();
        // The kernel-only path lost its 64 KiB stream and 16 KiB (its only slower size).
        samples.retain(|s| {
            !(s.scenario == "ebpf+kernel"
                && (s.workload == "stream 64KiB x1" || s.workload == "stream 16KiB x1"))
        });
        let t = short_circuit(&samples);
        let row = line_of(&t, "64KiB");
        assert!(row.trim_end().ends_with(" -"), "{row}\n{t}");
        assert!(row.contains("6.00 (x0.75)"), "adaptive still shown: {row}");
        assert!(t.contains("(some sizes are missing"), "{t}");
        // Never "every size" when a size has no figure; the adaptive verdict is unchanged.
        assert!(
            t.contains("kernel-only path >= plain TCP where measured; no figure for 16KiB throughput, 64KiB throughput\n"),
            "{t}"
        );
        assert!(
            t.contains(
                "adaptive per-hop policy SLOWER than plain TCP at: 64KiB throughput x0.75\n"
            ),
            "{t}"
        );
        // With every figure the kernel-only path at least as fast as TCP everywhere.
        let mut samples = short_circuit_samples();
        for s in &mut samples {
            if s.scenario == "ebpf+kernel" && s.metric == "gbit_per_s" {
                s.value = 24.0;
            }
        }
        let t = short_circuit(&samples);
        assert!(
            t.contains("kernel-only path >= plain TCP at every size\n"),
            "{t}"
        );
    }

    #[test]
    fn kernel_path_vs_direct_shows_the_ratio_and_the_kernel_limit() {
        let samples = short_circuit_samples();
        let t = short_circuit(&samples);
        let table = &t[t.find(KERNEL_VS_DIRECT_TITLE).unwrap_or(0)..];
        assert!(table.starts_with(KERNEL_VS_DIRECT_TITLE), "{t}");
        assert!(table.contains("x0.58 of plain TCP at p50"), "{table}");
        assert!(table.contains("kernel/direct"), "{table}");
        for (_, name) in KERNEL_VS_DIRECT_SIZES {
            let row = line_of(table, name);
            assert_eq!(
                row.split_whitespace().collect::<Vec<_>>(),
                [name, "20.00", "10.00", "x0.50"],
                "{table}"
            );
        }
        assert!(!table.contains("missing"), "{table}");

        // direct lost its 1 KiB ping-pong: that size shows "-" and the table says so.
        let without: Vec<Sample> = samples
            .into_iter()
            .filter(|s| !(s.scenario == "direct" && s.workload == "pingpong 1024B pinned"))
            .collect();
        let t = short_circuit(&without);
        let table = &t[t.find(KERNEL_VS_DIRECT_TITLE).unwrap_or(0)..];
        assert_eq!(
            line_of(table, "1KiB")
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["1KiB", "-", "10.00", "-"],
            "{table}"
        );
        assert!(table.contains("(some sizes are missing"), "{table}");
    }

    #[test]
    fn kernel_path_switches_warn_when_a_scenario_took_the_wrong_path() {
        let mut samples = short_circuit_samples();
        for s in &mut samples {
            if s.metric == KERNEL_PATH_SWITCHES {
                s.value = if s.scenario == "ebpf+kernel" {
                    0.0
                } else {
                    3.0
                };
            }
        }
        let t = short_circuit(&samples);
        assert!(
            t.contains("WARNING: the kernel-only path never engaged in ebpf+kernel"),
            "{t}"
        );
        assert!(
            t.contains("WARNING: ebpf+sockmap used the kernel-only path"),
            "{t}"
        );
        assert!(
            t.contains("WARNING: ebpf+naive used the kernel-only path"),
            "{t}"
        );
        samples.retain(|s| s.metric != KERNEL_PATH_SWITCHES);
        let t = short_circuit(&samples);
        assert!(t.contains("ebpf+kernel not counted"), "{t}");
    }

    /// The report's names and sizes are those the bench runs: a renamed scenario or a
    /// dropped ping-pong size would otherwise only show as "-" in a real run.
    #[test]
    fn report_names_and_sizes_match_the_bench() {
        let mut ran: Vec<&str> = super::super::SCENARIOS.iter().map(|s| s.name).collect();
        let mut shown = SCENARIO_ORDER.to_vec();
        ran.sort_unstable();
        shown.sort_unstable();
        assert_eq!(ran, shown);
        for sc in [PLAIN, ADAPTIVE, KERNEL, NAIVE] {
            assert!(SCENARIO_ORDER.contains(&sc), "{sc}");
        }
        for (bytes, name) in SHORT_CIRCUIT_SIZES.iter().chain(&KERNEL_VS_DIRECT_SIZES) {
            assert!(
                super::super::PINNED_PINGPONG_SIZES.contains(bytes),
                "{name}"
            );
            assert_eq!(super::super::human(*bytes), *name);
        }
        for (bytes, _) in SHORT_CIRCUIT_SIZES {
            assert!(super::super::quick().stream_sizes.contains(&bytes));
            assert!(super::super::full().stream_sizes.contains(&bytes));
        }
    }
}
