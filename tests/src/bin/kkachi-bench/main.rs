//! kkachi-bench: headline performance figures, each beside a baseline measured in the
//! same run on the same machine.
//!
//! Build everything in release mode first (the relays run as separate processes, and so
//! does the receiving client of the latency runs: this binary again, with `--recipient`):
//!
//! ```sh
//! cargo build --release --workspace && target/release/kkachi-bench --runs 5
//! ```
//!
//! `--runs N` repeats the whole measurement and prints each figure's median with its
//! range; `--only latency,history` (say) runs just those parts; `--quick` is a short
//! smoke run; `--json` ends with one JSON object.

#![recursion_limit = "256"]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use serde_json::json;

mod backup;
mod baselines;
mod chunks;
mod common;
mod groups;
mod history;
mod ingest;
mod latency;
mod receive;
mod relay_load;
mod restart;
mod table;
mod transfer;

use common::us;

/// Measures kkachi against the limits of this machine.
#[derive(Debug, Parser)]
struct Args {
    /// A short run (under a minute) for smoke testing.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object on the last line of stdout (with `--runs`, each figure's
    /// median, and every run under "runs").
    #[arg(long)]
    json: bool,
    /// Repeat the whole measurement this many times; the table gives each figure's
    /// median and range.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=50))]
    runs: u32,
    /// Clients for the reconnect measurement (default 1,000; 50 with --quick).
    #[arg(long)]
    clients: Option<usize>,
    /// Envelopes the relay holds when it restarts (default 1,000,000; 20,000 with
    /// --quick). Each is 2 KiB: a million take about 6 GiB of disk.
    #[arg(long)]
    envelopes: Option<u64>,
    /// Run only these parts (comma-separated); the baselines always run. Figures of
    /// the parts left out are null in the JSON and missing from the table.
    #[arg(long, value_delimiter = ',', value_parser = ["ingest", "latency", "at-rest", "history", "backup", "receive", "reconnect", "idle", "restart", "files", "groups"])]
    only: Vec<String>,
    /// Keep the clients' stores in the clear in the latency part, as builds from before
    /// encryption at rest did: to compare the protocol with theirs in the same minutes
    /// (what sealing costs is the at-rest part's figure).
    #[arg(long)]
    clear_stores: bool,
    /// Internal: run as the recipient of the latency runs, on this client home.
    #[arg(long, hide = true)]
    recipient: Option<PathBuf>,
    /// Internal: the recipient takes deliveries through its relays only.
    #[arg(long, hide = true)]
    relays_only: bool,
    /// Internal: serve the round-trip baseline's echoes and print the address.
    #[arg(long, hide = true)]
    echo: bool,
}

impl Args {
    fn part(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    // On the runtime's workers, where the client's own tasks run (the thread blocked on
    // `main` is not one of them, and each wake-up from it is a thread hand-off).
    tokio::spawn(run(Args::parse())).await?
}

async fn run(args: Args) -> Result<()> {
    if let Some(home) = args.recipient {
        return latency::recipient(home, !args.relays_only).await;
    }
    if args.echo {
        return kkachi_tests::echo::serve(|addr| println!("listening on {addr}")).await;
    }
    eprintln!(
        "kkachi-bench ({}, {} run{}) on {} cores",
        if args.quick { "quick" } else { "full" },
        args.runs,
        if args.runs == 1 { "" } else { "s" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut reports = Vec::new();
    for run in 1..=args.runs {
        reports.push(measure(&args).await?);
        if args.runs > 1 {
            eprintln!("run {run} of {} done", args.runs);
        }
    }
    table::print(&args, &reports);
    if args.json {
        println!("{}", table::summary(&reports));
    }
    Ok(())
}

/// One run of every part asked for: the report, as JSON.
async fn measure(args: &Args) -> Result<serde_json::Value> {
    let root = tempfile::tempdir()?;
    let root = root.path();
    let q = args.quick;
    let (sled_flush, sled_noflush) = baselines::sled_baseline(if q { 500 } else { 3000 })?;
    let rtt = baselines::libp2p_rtt(if q { 200 } else { 2000 }).await?;
    eprintln!("baselines done");
    let duration = Duration::from_secs(if q { 3 } else { 15 });
    let null = serde_json::Value::Null;
    let (single, moderate, batched, bounded) = if args.part("ingest") {
        let single = ingest::ingest(root, 8, 16, 1, duration).await?;
        // The same puts at a moderate load (8 senders, one request each in flight): the
        // acknowledgement time a client sees when the relay is not saturated.
        let moderate = ingest::ingest(root, 8, 1, 1, duration).await?;
        let batched = ingest::ingest(root, 8, 8, 16, duration).await?;
        // Batches with fewer in flight (6 × 16 envelopes): the rate that comes with a
        // short acknowledgement (at saturation the acknowledgement is mostly queueing).
        let bounded = ingest::ingest(root, 6, 1, 16, duration).await?;
        eprintln!("ingest done");
        (single, moderate, batched, bounded)
    } else {
        (null.clone(), null.clone(), null.clone(), null.clone())
    };
    let (latency, failover, latency_one, latency_direct) = if args.part("latency") {
        let sealed = !args.clear_stores;
        let load = if q { 500 } else { 2000 };
        let (latency, failover) = latency::latency_and_failover(
            root,
            3,
            if q { 60 } else { 400 },
            load,
            true,
            false,
            sealed,
        )
        .await?;
        let (latency_one, _) = latency::latency_and_failover(
            root,
            1,
            if q { 30 } else { 200 },
            0,
            false,
            false,
            sealed,
        )
        .await?;
        let (latency_direct, _) = latency::latency_and_failover(
            root,
            3,
            if q { 30 } else { 200 },
            load,
            false,
            true,
            sealed,
        )
        .await?;
        eprintln!("latency and failover done");
        (latency, failover, latency_one, latency_direct)
    } else {
        (null.clone(), null.clone(), null.clone(), null.clone())
    };
    let at_rest = if args.part("at-rest") {
        let r =
            latency::at_rest_cost(root, if q { 30 } else { 200 }, if q { 1 } else { 2 }).await?;
        eprintln!("at rest done");
        r
    } else {
        null.clone()
    };
    let history = if args.part("history") {
        history::history_bench(root, if q { 20_000 } else { 100_000 })?
    } else {
        null.clone()
    };
    let backup = if args.part("backup") {
        let r = backup::backup_bench(root, 10_000)?;
        eprintln!("backup done");
        r
    } else {
        null.clone()
    };
    let receive = if args.part("receive") {
        let (n, many) = if q { (200, 200) } else { (1000, 1000) };
        let few = receive::receive_cost(root, 10, n).await?;
        let many = receive::receive_cost(root, many, n).await?;
        eprintln!("receive done");
        json!({ "few": few, "many": many })
    } else {
        null.clone()
    };
    let reconnect = if args.part("reconnect") {
        let clients = args.clients.unwrap_or(if q { 50 } else { 1000 });
        let r = relay_load::reconnect_and_handshakes(root, clients).await?;
        eprintln!("reconnect done");
        r
    } else {
        null.clone()
    };
    let idle = if args.part("idle") {
        relay_load::idle_memory(root, if q { 100 } else { 1000 }).await?
    } else {
        null.clone()
    };
    let restart = if args.part("restart") {
        let envelopes = args.envelopes.unwrap_or(if q { 20_000 } else { 1_000_000 });
        let r = restart::restart(root, envelopes).await?;
        eprintln!("restart done");
        r
    } else {
        null
    };
    let files = if args.part("files") {
        let mut f = chunks::chunks(root, if q { 8 } else { 64 }).await?;
        f["transfer"] = if q {
            transfer::transfer(root, 16, None)?
        } else {
            transfer::transfer(root, 100, Some(1024))?
        };
        eprintln!("files done");
        f
    } else {
        serde_json::Value::Null
    };
    let (group, group_large, group_costs) = if args.part("groups") {
        let (members, messages) = if q { (3, 20) } else { (7, 100) };
        let small = groups::group_latency(root, members, messages, false).await?;
        let large = groups::group_latency(root, members, messages, true).await?;
        let costs = groups::group_costs()?;
        eprintln!("groups done");
        (small, large, costs)
    } else {
        (
            serde_json::Value::Null,
            serde_json::Value::Null,
            serde_json::Value::Null,
        )
    };
    let ingest_rate = match (
        batched["msgs_per_s"].as_f64(),
        single["msgs_per_s"].as_f64(),
    ) {
        (Some(a), Some(b)) => json!(a.max(b)),
        _ => serde_json::Value::Null,
    };
    Ok(json!({
        "mode": if q { "quick" } else { "full" },
        "stores": if args.clear_stores { "clear" } else { "sealed" },
        "ingest_msgs_per_s": ingest_rate,
        "ingest_single": single,
        "ingest_moderate": moderate,
        "put_ack_moderate_p50_us": moderate["ack_p50_us"],
        "put_ack_moderate_p99_us": moderate["ack_p99_us"],
        "ingest_batched": batched,
        "ingest_bounded": bounded,
        "put_ack_bounded_p50_us": bounded["ack_p50_us"],
        "put_ack_bounded_p99_us": bounded["ack_p99_us"],
        "put_ack_p50_us": single["ack_p50_us"],
        "put_ack_p99_us": single["ack_p99_us"],
        "latency_p50_us": latency["latency_p50_us"],
        "latency_p99_us": latency["latency_p99_us"],
        "latency": latency,
        "latency_one_relay_idle_p50_us": latency_one["latency_p50_us"],
        "latency_one_relay_idle_p99_us": latency_one["latency_p99_us"],
        "latency_direct_p50_us": latency_direct["latency_p50_us"],
        "latency_direct_p99_us": latency_direct["latency_p99_us"],
        "latency_direct": latency_direct,
        "at_rest": at_rest,
        "at_rest_ratio": at_rest["ratio"],
        "history": history,
        "history_ms": history["history_all_ms"],
        "backup": backup,
        "restore_10k_ms": backup["restore_ms"],
        "receive": receive,
        "receive_message_us_few": receive["few"]["message_us"],
        "receive_message_us_many": receive["many"]["message_us"],
        "failover_gap_ms": failover["failover_gap_ms"],
        "lost": failover["lost"],
        "duplicated": failover["duplicated"],
        "reconnect": reconnect,
        "handshakes_per_s": reconnect["handshakes_per_s"],
        "idle_conn_kib": idle["idle_conn_kib"],
        "idle": idle,
        "restart": restart,
        "restart_ready_s": restart["ready_s"],
        "files": files,
        "file_put_mb_s": files["put_mb_s"],
        "file_get_mb_s": files["get_mb_s"],
        "file_send_get_mb_s": files["transfer"]["mb_s"],
        "file_fault_ratio": files["transfer"]["fault_ratio"],
        "file_peak_rss_mib": files["transfer"]["peak_rss_mib"],
        "group": group,
        "group_to_all_p50_us": group["to_all_p50_us"],
        "group_large": group_large,
        "group_large_to_all_p50_us": group_large["to_all_p50_us"],
        "group_costs": group_costs,
        "baseline_libp2p_rtt_us": us(rtt),
        "baseline_sled_insert_flush_per_s": sled_flush,
        "baseline_sled_insert_per_s": sled_noflush,
    }))
}
