//! course::dist::launch end to end, with `/bin/sh -c` as the ranks: the variables each rank sees, the
//! prefixed output, stopping the others when one fails, and two node groups on one machine.

use course::dist::launch::{free_port, launch, DistEnv, LaunchFailure, LaunchSpec, Output};
use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn captured(n: usize) -> (LaunchSpec, Arc<Mutex<Vec<String>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    (LaunchSpec { output: Output::Capture(lines.clone()), ..LaunchSpec::local(n) }, lines)
}

fn sh(spec: &LaunchSpec, script: &str) -> anyhow::Result<course::dist::launch::LaunchReport> {
    launch(spec, Path::new("/bin/sh"), &[OsString::from("-c"), OsString::from(script)])
}

fn sorted(lines: &Mutex<Vec<String>>) -> Vec<String> {
    let mut v = lines.lock().unwrap().clone();
    v.sort();
    v
}

#[test]
fn each_rank_sees_its_rank_and_one_shared_port() {
    let (mut spec, lines) = captured(3);
    spec.threads_per_proc = Some(2);
    let report =
        sh(&spec, r#"echo "$RANK $WORLD_SIZE $LOCAL_RANK $MASTER_PORT $OMP_NUM_THREADS"; echo "err $RANK" >&2"#)
            .unwrap();
    assert_eq!(
        report.statuses.iter().map(|(r, s)| (*r, s.success())).collect::<Vec<_>>(),
        [(0, true), (1, true), (2, true)]
    );
    assert!(report.first_failure.is_none());
    let lines = sorted(&lines);
    let port: u16 = lines[0].split(' ').nth(4).unwrap().parse().unwrap();
    assert_ne!(port, 0);
    let mut want: Vec<String> = (0..3)
        .map(|r| format!("[rank{r}]: {r} 3 {r} {port} 2"))
        .chain((0..3).map(|r| format!("[rank{r}]: err {r}")))
        .collect();
    want.sort();
    assert_eq!(lines, want);
}

#[test]
fn the_environment_we_set_is_the_one_dist_env_reads() {
    // The launcher hosts no store, so a torchrun around it must not make the ranks think so.
    std::env::set_var("TORCHELASTIC_USE_AGENT_STORE", "True");
    let (spec, lines) = captured(2);
    sh(&spec, "env").unwrap();
    let mut per_rank: Vec<HashMap<String, String>> = vec![HashMap::new(); 2];
    for line in lines.lock().unwrap().iter() {
        let (prefix, kv) = line.split_once("]: ").unwrap();
        let rank: usize = prefix.trim_start_matches("[rank").parse().unwrap();
        if let Some((k, v)) = kv.split_once('=') {
            per_rank[rank].insert(k.to_string(), v.to_string());
        }
    }
    let ports: Vec<&String> = per_rank.iter().map(|m| &m["MASTER_PORT"]).collect();
    assert_eq!(ports[0], ports[1]);
    for (rank, vars) in per_rank.iter().enumerate() {
        let env = DistEnv::from_vars(|k| vars.get(k).cloned()).unwrap().unwrap();
        let want = DistEnv {
            rank,
            world_size: 2,
            local_rank: rank,
            local_world_size: 2,
            master_addr: "127.0.0.1".into(),
            master_port: ports[0].parse().unwrap(),
            group_rank: 0,
            agent_store: false,
            restart_count: 0,
        };
        assert_eq!(env, want);
        assert_eq!((vars["ROLE_RANK"].as_str(), vars["GROUP_WORLD_SIZE"].as_str()), (rank.to_string().as_str(), "1"));
        assert!(vars["OMP_NUM_THREADS"].parse::<usize>().unwrap() >= 1);
    }
}

#[test]
fn a_failing_rank_stops_the_others_and_is_named() {
    let (spec, _) = captured(3);
    let t0 = Instant::now();
    let err = sh(&spec, r#"if [ "$RANK" = 1 ]; then exit 3; fi; exec sleep 30"#).unwrap_err();
    let elapsed = t0.elapsed();
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");
    assert_eq!(err.to_string(), "rank 1 exited with status 3; stopped the other 2 rank(s)");
    let failure = err.downcast_ref::<LaunchFailure>().unwrap();
    assert_eq!(failure.report.first_failure.map(|(r, s)| (r, s.code())), Some((1, Some(3))));
    let signals: Vec<_> = failure.report.statuses.iter().map(|(r, s)| (*r, s.signal())).collect();
    assert_eq!(signals, [(0, Some(15)), (1, None), (2, Some(15))]); // SIGTERM sufficed
}

#[test]
fn a_rank_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let (mut spec, _) = captured(2);
    spec.grace = Duration::from_millis(300);
    let t0 = Instant::now();
    // `trap '' TERM` is inherited through exec, so sleep ignores SIGTERM too; rank 0 waits so
    // that rank 1 has set the trap before the SIGTERM comes.
    let err = sh(&spec, r#"if [ "$RANK" = 0 ]; then sleep 0.5; exit 1; fi; trap '' TERM; exec sleep 30"#).unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    let failure = err.downcast_ref::<LaunchFailure>().unwrap();
    assert_eq!(failure.report.statuses[1].1.signal(), Some(9));
    assert!(err.to_string().starts_with("rank 0 exited with status 1"), "{err}");
}

#[test]
fn a_missing_program_is_a_clear_error() {
    let (spec, _) = captured(2);
    let program = Path::new("/nonexistent/llm-course-no-such-program");
    let err = format!("{:#}", launch(&spec, program, &[]).unwrap_err());
    assert!(err.contains("starting rank 0: /nonexistent/llm-course-no-such-program"), "{err}");
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn bad_specs_are_refused_before_anything_starts() {
    let (spec, _) = captured(2);
    let err = |s: LaunchSpec| sh(&s, "exit 0").unwrap_err().to_string();
    assert!(err(LaunchSpec { nnodes: 2, ..spec.clone() }).contains("master_port=0"));
    assert!(err(LaunchSpec { nnodes: 2, node_rank: 2, master_port: 29500, ..spec.clone() }).contains("node_rank=2"));
    assert!(err(LaunchSpec { nproc_per_node: 0, ..spec }).contains("nproc_per_node=0"));
}

#[test]
fn two_node_groups_make_one_world() {
    let port = free_port().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let nodes: Vec<_> = (0..2)
        .map(|node_rank| {
            let spec = LaunchSpec {
                nproc_per_node: 2,
                nnodes: 2,
                node_rank,
                master_port: port,
                output: Output::Capture(lines.clone()),
                ..LaunchSpec::local(2)
            };
            std::thread::spawn(move || sh(&spec, r#"echo "$RANK $WORLD_SIZE $LOCAL_RANK $GROUP_RANK $MASTER_PORT""#))
        })
        .collect();
    for node in nodes {
        node.join().unwrap().unwrap();
    }
    let want: Vec<String> = (0..4).map(|r| format!("[rank{r}]: {r} 4 {} {} {port}", r % 2, r / 2)).collect();
    assert_eq!(sorted(&lines), want);
}
