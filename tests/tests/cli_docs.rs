//! The README's synopsis blocks and `--help` describe the same CLI: every flag a subcommand's
//! `--help` lists is in the README's synopsis of that subcommand, and every flag the synopsis
//! shows exists. (The global `--log-level` and `--log-file` are in the README's table.)

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use tessera_tests::tessera_bin;

/// The README's synopsis entries: `tessera SUBCOMMAND [--flag …]` lines in code blocks, with
/// their indented continuation lines, keyed by subcommand (`vm`, `bench boot`, …); the lines
/// of one subcommand (`tessera vgpu …` several times) are merged.
fn readme_synopses() -> BTreeMap<String, BTreeSet<String>> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
            .expect("README.md");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut in_code = false;
    let mut current: Option<String> = None;
    for line in readme.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
            current = None;
            continue;
        }
        if !in_code {
            continue;
        }
        if let Some(rest) = line.strip_prefix("tessera ") {
            // A synopsis shows optional flags in brackets; an example does not.
            current = line.contains("[--").then(|| {
                rest.split_whitespace()
                    .take_while(|w| w.chars().all(|c| c.is_ascii_lowercase()))
                    .collect::<Vec<_>>()
                    .join(" ")
            });
        } else if !line.starts_with(' ') {
            current = None;
        }
        if let Some(key) = &current {
            out.entry(key.clone()).or_default().extend(long_flags(line));
        }
    }
    out
}

/// `--name` tokens of a line.
fn long_flags(text: &str) -> impl Iterator<Item = String> + '_ {
    text.match_indices("--").filter_map(|(i, _)| {
        let name: String = text[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        (!name.is_empty()).then(|| format!("--{name}"))
    })
}

/// The long flags `tessera ARGS --help` lists (without --help, --version and the global ones).
fn help_flags(args: &[&str]) -> BTreeSet<String> {
    let out = Command::new(tessera_bin())
        .args(args)
        .arg("--help")
        .output()
        .expect("run tessera --help");
    assert!(out.status.success(), "tessera {args:?} --help: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("-")
                .and_then(|s| s.get(3..))
                .filter(|_| l.as_bytes().get(2) == Some(&b','))
                .unwrap_or(l);
            l.starts_with("--").then(|| long_flags(l).next()).flatten()
        })
        .filter(|f| !["--help", "--version", "--log-level", "--log-file"].contains(&f.as_str()))
        .collect()
}

/// `args` and, for each subcommand its `--help` lists under "Commands:", `args` + it.
fn with_subcommands(args: &[&str]) -> Vec<Vec<String>> {
    let out = Command::new(tessera_bin())
        .args(args)
        .arg("--help")
        .output()
        .expect("run tessera --help");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let own: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let mut pages = vec![own.clone()];
    let mut in_commands = false;
    for line in text.lines() {
        if line == "Commands:" {
            in_commands = true;
        } else if in_commands && line.starts_with("  ") {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name != "help" {
                let mut page = own.clone();
                page.push(name.to_string());
                pages.push(page);
            }
        } else {
            in_commands = false;
        }
    }
    pages
}

#[test]
fn the_readme_synopsis_and_help_list_the_same_flags() {
    let readme = readme_synopses();
    // Each README entry and the `--help` pages it summarises: the subcommand's and those of
    // its own subcommands (`vgpu create`, `vgpu define`, …), found in its `--help`.
    let pages: Vec<(&str, Vec<Vec<String>>)> = [
        ("vm", &["vm"][..]),
        ("vmctl", &["vmctl"]),
        ("serve", &["serve"]),
        ("vgpu", &["vgpu"]),
        ("top", &["top"]),
        ("tls", &["tls"]),
        ("bench boot", &["bench", "boot"]),
        ("bench vgpu", &["bench", "vgpu"]),
        ("bench sched", &["bench", "sched"]),
        ("bench vms", &["bench", "vms"]),
        ("bench soak", &["bench", "soak"]),
        ("bench session", &["bench", "session"]),
        ("bench migrate", &["bench", "migrate"]),
        ("bench scatter", &["bench", "scatter"]),
    ]
    .into_iter()
    .map(|(key, args)| (key, with_subcommands(args)))
    .collect();
    // Every benchmark has an entry above (a new one must get a synopsis too).
    for bench in with_subcommands(&["bench"]).iter().skip(1) {
        let key = bench.join(" ");
        assert!(
            pages.iter().any(|(k, _)| *k == key),
            "tessera {key} is not checked against the README: add it to the list"
        );
    }
    let vgpu = &pages.iter().find(|(k, _)| *k == "vgpu").expect("vgpu").1;
    assert!(vgpu.len() >= 10, "vgpu's subcommands not found: {vgpu:?}");
    let mut wrong = Vec::new();
    for (key, helps) in &pages {
        let documented = readme.get(*key).cloned().unwrap_or_default();
        let actual: BTreeSet<String> = helps
            .iter()
            .flat_map(|a| help_flags(&a.iter().map(String::as_str).collect::<Vec<_>>()))
            .collect();
        let missing: Vec<_> = actual.difference(&documented).collect();
        let stale: Vec<_> = documented.difference(&actual).collect();
        if !missing.is_empty() || !stale.is_empty() {
            wrong.push(format!(
                "tessera {key}: not in the README {missing:?}; in the README but not in --help {stale:?}"
            ));
        }
    }
    let extra: Vec<_> = readme
        .keys()
        .filter(|k| !pages.iter().any(|(p, _)| p == k))
        .collect();
    assert!(
        extra.is_empty(),
        "README synopses of unknown subcommands: {extra:?}"
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The guest tools (static binaries, so they run on the host too) answer `--help` with their
/// usage and status 0, and refuse an unknown flag or a malformed number with status 2 and the
/// usage on stderr.
#[test]
fn the_guest_tools_take_help() {
    let tools = [
        ("build/guest-tools/release/tessera-smi", "tessera-smi"),
        ("build/guest-tools/release/tessera-run", "tessera-run"),
        ("build/libtessera/tessera-check-static", "tessera-check"),
    ];
    for (path, name) in tools {
        let Some(bin) = tessera_tests::guest_file(path) else {
            return;
        };
        let out = Command::new(&bin).arg("--help").output().expect("run");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name} --help: {out:?}");
        assert!(stdout.starts_with(&format!("usage: {name}")), "{stdout}");
        for bad in [&["--no-such-flag"][..], &["-d", "x"]] {
            let out = Command::new(&bin).args(bad).output().expect("run");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{name} {bad:?}: {stderr}");
            assert!(stderr.contains("usage:"), "{name} {bad:?}: {stderr}");
        }
    }
}
