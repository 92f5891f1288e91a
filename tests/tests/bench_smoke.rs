//! The benchmark tool still runs: `kkachi-bench --quick --json` completes and reports
//! every headline figure, with nothing lost or duplicated in its failover run.
//! (Figures from a debug build on a busy test machine mean nothing; only the shape is
//! checked here. Published figures come from release builds, see the README.)

#[test]
fn bench_quick_reports_every_figure() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kkachi-bench"))
        .args(["--quick", "--json"])
        .output()
        .expect("kkachi-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("output");
    let v: serde_json::Value = serde_json::from_str(last).expect("JSON on the last line");
    for key in [
        "ingest_msgs_per_s",
        "put_ack_p50_us",
        "put_ack_p99_us",
        "put_ack_bounded_p99_us",
        "latency_p50_us",
        "latency_p99_us",
        "failover_gap_ms",
        "history_ms",
        "receive_message_us_few",
        "receive_message_us_many",
        "handshakes_per_s",
        "idle_conn_kib",
        "baseline_libp2p_rtt_us",
        "baseline_sled_insert_flush_per_s",
        "file_put_mb_s",
        "file_get_mb_s",
        "file_send_get_mb_s",
        "file_fault_ratio",
        "file_peak_rss_mib",
    ] {
        assert!(
            v[key].as_f64().is_some_and(|x| x > 0.0),
            "{key} missing or zero in {v}"
        );
    }
    assert_eq!(v["lost"], 0, "{v}");
    assert_eq!(v["duplicated"], 0, "{v}");
    assert_eq!(
        v["reconnect"]["reconnected"], v["reconnect"]["clients"],
        "{v}"
    );
    println!("{}", stdout.lines().take(17).collect::<Vec<_>>().join("\n"));
}

#[test]
fn bench_only_runs_the_parts_asked_for() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kkachi-bench"))
        .args(["--quick", "--json", "--only", "history"])
        .output()
        .expect("kkachi-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed: {stdout}");
    let v: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("output")).expect("JSON");
    assert!(v["history_ms"].as_f64().is_some_and(|x| x > 0.0), "{v}");
    assert_eq!(v["history"]["lines"], 20_000, "{v}");
    for skipped in ["ingest_msgs_per_s", "latency_p50_us", "idle_conn_kib"] {
        assert!(v[skipped].is_null(), "{skipped} should not run: {v}");
    }
    assert!(!stdout.contains("ingest, durable"), "{stdout}");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_kkachi-bench"))
        .args(["--only", "histroy"])
        .output()
        .expect("kkachi-bench runs");
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("possible values"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}
