//! The table of figures, from one run or the median of several.

use serde_json::{Value, json};

use crate::Args;

/// One line of the table, from one run.
struct Row {
    label: &'static str,
    value: f64,
    decimals: usize,
    /// The value over a baseline of the same run, and what that baseline is.
    ratio: Option<(f64, &'static str)>,
    note: String,
}

/// A figure in µs as ms.
fn json_ms(v: &Value) -> Value {
    match v.as_f64() {
        Some(us) => serde_json::json!(us / 1e3),
        None => Value::Null,
    }
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The rows of one run's report, for the parts asked for.
fn rows(args: &Args, r: &Value) -> Vec<Row> {
    let rtt = num(&r["baseline_libp2p_rtt_us"]);
    let sled_flush = num(&r["baseline_sled_insert_flush_per_s"]);
    let row = |label, value: &Value, decimals, note: String| Row {
        label,
        value: num(value),
        decimals,
        ratio: None,
        note,
    };
    let over_rtt = |mut row: Row| {
        row.ratio = Some((row.value / rtt, "libp2p round trip"));
        row
    };
    let mut out = Vec::new();
    if args.part("ingest") {
        let (single, batched, bounded, moderate) = (
            &r["ingest_single"],
            &r["ingest_batched"],
            &r["ingest_bounded"],
            &r["ingest_moderate"],
        );
        let mut best = row(
            "ingest, durable 512 B puts/s (best)",
            &r["ingest_msgs_per_s"],
            0,
            String::new(),
        );
        best.ratio = Some((best.value / sled_flush, "sled insert+flush per item"));
        out.push(best);
        out.push(row(
            "  single-envelope puts/s",
            &single["msgs_per_s"],
            0,
            format!("batch 1, {} in flight", single["senders"]),
        ));
        out.push(row(
            "  batched puts/s",
            &batched["msgs_per_s"],
            0,
            format!("batch 16, {} in flight", batched["senders"]),
        ));
        out.push(row(
            "  batched puts/s, fewer in flight",
            &bounded["msgs_per_s"],
            0,
            format!(
                "batch 16, {} in flight: ack p50 {:.0} µs, p99 {:.0} µs",
                bounded["senders"],
                num(&bounded["ack_p50_us"]),
                num(&bounded["ack_p99_us"])
            ),
        ));
        out.push(over_rtt(row(
            "put ack p50 (µs)",
            &single["ack_p50_us"],
            0,
            String::new(),
        )));
        out.push(row(
            "put ack p99 (µs)",
            &single["ack_p99_us"],
            0,
            "at saturation (128 in flight)".into(),
        ));
        out.push(row(
            "put ack p50 at moderate load (µs)",
            &moderate["ack_p50_us"],
            0,
            format!(
                "p99 {:.0} µs; {:.0} puts/s, {} senders, 1 in flight each",
                num(&moderate["ack_p99_us"]),
                num(&moderate["msgs_per_s"]),
                moderate["senders"]
            ),
        ));
    }
    if args.part("latency") {
        out.push(over_rtt(row(
            "send→shown p50 via 3 relays only (µs)",
            &r["latency_p50_us"],
            0,
            match args.clear_stores {
                true => "stores in the clear (--clear-stores)".into(),
                false => String::new(),
            },
        )));
        out.push(row(
            "send→shown p99 (µs)",
            &r["latency_p99_us"],
            0,
            String::new(),
        ));
        out.push(row(
            "send→durable at the recipient p50 (µs)",
            &r["latency"]["durable_p50_us"],
            0,
            format!(
                "p99 {:.0} µs (what `kkachi daemon` prints)",
                num(&r["latency"]["durable_p99_us"])
            ),
        ));
        out.push(over_rtt(row(
            "send→shown p50, 1 relay, no other load (µs)",
            &r["latency_one_relay_idle_p50_us"],
            0,
            format!("p99 {:.0} µs", num(&r["latency_one_relay_idle_p99_us"])),
        )));
        out.push(over_rtt(row(
            "send→shown p50, connected directly (µs)",
            &r["latency_direct_p50_us"],
            0,
            format!(
                "p99 {:.0} µs; 3 relays as well, same load; {} of {} handed over directly",
                num(&r["latency_direct_p99_us"]),
                r["latency_direct"]["handed_over_directly"],
                r["latency_direct"]["messages"]
            ),
        )));
        out.push(row(
            "failover gap, 1 of 3 relays kill -9 (ms)",
            &r["failover_gap_ms"],
            1,
            format!("lost {}, duplicated {}", r["lost"], r["duplicated"]),
        ));
    }
    if args.part("history") {
        out.push(row(
            "`kkachi history` of a long conversation (ms)",
            &r["history"]["history_all_ms"],
            0,
            format!(
                "{} lines; --last 50: {:.0} ms",
                r["history"]["lines"],
                num(&r["history"]["history_last50_ms"])
            ),
        ));
    }
    if args.part("receive") {
        let (few, many) = (&r["receive"]["few"], &r["receive"]["many"]);
        let mut message = row(
            "receive cost per message, many contacts (µs)",
            &many["message_us"],
            0,
            format!(
                "{} contacts; {:.0} µs at 10; junk {:.0} µs at 10, {:.0} µs at {}",
                many["contacts"],
                num(&few["message_us"]),
                num(&few["junk_us"]),
                num(&many["junk_us"]),
                many["contacts"]
            ),
        );
        message.ratio = Some((
            message.value / num(&few["message_us"]),
            "the same at 10 contacts",
        ));
        out.push(message);
    }
    if args.part("reconnect") {
        out.push(row(
            "reconnect after relay restart (s)",
            &r["reconnect"]["reconnect_s"],
            2,
            format!(
                "{} of {} clients",
                r["reconnect"]["reconnected"], r["reconnect"]["clients"]
            ),
        ));
        out.push(row(
            "new connections (Noise handshakes)/s",
            &r["handshakes_per_s"],
            0,
            String::new(),
        ));
    }
    if args.part("idle") {
        out.push(row(
            "relay memory per idle connection (KiB)",
            &r["idle_conn_kib"],
            1,
            format!(
                "at {} connections, each with a session and a long poll waiting",
                r["idle"]["connections"]
            ),
        ));
    }
    if args.part("at-rest") {
        let at_rest = &r["at_rest"];
        let mut sealed = row(
            "send → shown p50, stores sealed at rest (µs)",
            &at_rest["sealed_p50_us"],
            0,
            format!(
                "1 relay, {} messages per run, alternating with the same in the clear",
                at_rest["messages"]
            ),
        );
        sealed.ratio = Some((num(&at_rest["ratio"]), "the same, stores in the clear"));
        out.push(sealed);
    }
    if args.part("backup") {
        let backup = &r["backup"];
        let mut restore = row(
            "restore a backup of 10,000 messages (ms)",
            &backup["restore_ms"],
            0,
            format!(
                "{} KiB backup, made in {:.0} ms; a new home, its database sealed",
                num(&backup["bytes"]) as u64 / 1024,
                num(&backup["create_ms"])
            ),
        );
        restore.ratio = Some((
            restore.value / num(&backup["verify_ms"]),
            "reading it through (backup verify)",
        ));
        let restore_ms = restore.value;
        out.push(restore);
        let mut link = row(
            "a new device joins the same account (ms)",
            &backup["link_ms"],
            0,
            "device link → device join over loopback, until the new home is in place".to_string(),
        );
        link.ratio = Some((link.value / restore_ms, "the restore"));
        let link_ms = link.value;
        out.push(link);
        let mut relayed = row(
            "the same through a relay (ms)",
            &backup["relay_link_ms"],
            0,
            "device link --relay-only → device join, through a relay on loopback".to_string(),
        );
        relayed.ratio = Some((relayed.value / link_ms, "the direct link"));
        out.push(relayed);
    }
    if args.part("restart") {
        let restart = &r["restart"];
        let mut ready = row(
            "relay ready, holding many envelopes (s)",
            &r["restart_ready_s"],
            2,
            format!(
                "{} envelopes of {} B, killed and started (sled replays what was written since its last start); {:.2} s on the start after",
                restart["envelopes"],
                restart["envelope_bytes"],
                num(&restart["ready_again_s"])
            ),
        );
        ready.ratio = Some((
            ready.value / num(&restart["ready_empty_s"]),
            "the same holding nothing",
        ));
        out.push(ready);
    }
    if args.part("files") {
        let files = &r["files"];
        let mut put = row(
            "file put into a relay (MB/s)",
            &r["file_put_mb_s"],
            0,
            format!(
                "a {} MiB file as {} sealed chunks, {} in flight; read back at {:.0} MB/s",
                files["file_mib"],
                files["chunks"],
                files["in_flight"],
                num(&r["file_get_mb_s"])
            ),
        );
        put.ratio = Some((
            put.value / num(&files["baseline_disk_mb_s"]),
            "the same chunks written and synced to the disk",
        ));
        out.push(put);
        let t = &files["transfer"];
        let mut e2e = row(
            "file sent and saved through 3 relays (MB/s)",
            &r["file_send_get_mb_s"],
            0,
            format!(
                "`send --file` then `get` of a {} MiB file: sealed and put twice at {:.0} MB/s, fetched and saved at {:.0} MB/s",
                t["file_mib"],
                num(&t["upload_mb_s"]),
                num(&t["download_mb_s"])
            ),
        );
        e2e.ratio = Some((
            num(&t["vs_copy"]),
            "a plain copy of the same file on the same disk",
        ));
        out.push(e2e);
        let mut fault = row(
            "file with one relay killed -9 mid-upload (s)",
            &t["one_relay_killed_s"],
            1,
            "the same size, a relay killed once it holds 30% of its share".to_string(),
        );
        fault.ratio = Some((num(&r["file_fault_ratio"]), "the same without the kill"));
        out.push(fault);
        out.push(row(
            "client peak memory moving a file (MiB)",
            &r["file_peak_rss_mib"],
            0,
            format!(
                "the larger of the sending and fetching processes, a {} MiB file",
                t["peak_rss_file_mib"]
            ),
        ));
    }
    if args.part("groups") {
        // Each tier: until every member shows a message, and the same with a relay
        // killed, each as a ratio to its baseline of the same run.
        let mut tier = |g: &Value, labels: [&'static str; 2], notes: [String; 2]| {
            let [to_all_label, killed_label] = labels;
            let [to_all_note, killed_note] = notes;
            let mut to_all = row(to_all_label, &json_ms(&g["to_all_p50_us"]), 2, to_all_note);
            to_all.ratio = Some((
                num(&g["vs_one"]),
                "a 1:1 message to one of them, alternated",
            ));
            out.push(to_all);
            let mut killed = row(
                killed_label,
                &json_ms(&g["relay_killed_p50_us"]),
                2,
                killed_note,
            );
            killed.ratio = Some((
                num(&g["relay_killed_vs_fault_free"]),
                "fault-free, same run",
            ));
            out.push(killed);
        };
        let g = &r["group"];
        tier(
            g,
            [
                "group message until every member shows it, p50 (ms)",
                "the same with one of the 3 relays killed -9, p50 (ms)",
            ],
            [
                format!(
                    "{} members, each in its own process, 3 relays; p99 {:.2} ms; the group made and joined by all in {:.0} ms; {} lost, {} duplicated",
                    g["members"],
                    num(&g["to_all_p99_us"]) / 1e3,
                    num(&g["joined_ms"]),
                    g["lost"],
                    g["duplicated"]
                ),
                "the relay killed after the fault-free messages; as many sent after".into(),
            ],
        );
        let g = &r["group_large"];
        tier(
            g,
            [
                "group with group relays: message until every member shows it, p50 (ms)",
                "the same with one of the 3 group relays killed -9, p50 (ms)",
            ],
            [
                format!(
                    "the same members, one queue on each of the 3 relays; p99 {:.2} ms; {} lost, {} duplicated",
                    num(&g["to_all_p99_us"]) / 1e3,
                    g["lost"],
                    g["duplicated"]
                ),
                "goal: at most 2× fault-free".into(),
            ],
        );
        let c = &r["group_costs"];
        let sizes = c["sizes"].as_array().cloned().unwrap_or_default();
        let at = |n: u64, k: &str| {
            sizes
                .iter()
                .find(|s| s["members"].as_u64() == Some(n))
                .map_or(0.0, |s| num(&s[k]))
        };
        let small10 = sizes
            .iter()
            .find(|s| s["members"].as_u64() == Some(10))
            .map_or(0.0, |s| num(&s["small"]["bytes"]));
        let mut cost = row(
            "bytes relays store per group message, 1,000 members (large tier)",
            &c["sizes"][2]["large_bytes"],
            0,
            format!(
                "{} writes at 10, 100 and 1,000 members alike ({:.0}, {:.0}, {:.0} bytes); small tier at 10: {:.0} bytes in 9 writes; a new key for 1,000 members: {:.0} bytes in {:.0} writes, once per epoch",
                c["relays"],
                at(10, "large_bytes"),
                at(100, "large_bytes"),
                at(1000, "large_bytes"),
                small10,
                at(1000, "epoch_bytes"),
                at(1000, "epoch_writes")
            ),
        );
        cost.ratio = Some((num(&c["large_1000_vs_10"]), "the same at 10 members"));
        out.push(cost);
    }
    out.push(row(
        "baseline: libp2p request/response RTT (µs)",
        &r["baseline_libp2p_rtt_us"],
        0,
        String::new(),
    ));
    out.push(row(
        "baseline: sled insert+flush per item (/s)",
        &r["baseline_sled_insert_flush_per_s"],
        0,
        String::new(),
    ));
    out.push(row(
        "baseline: sled insert without flush (/s)",
        &r["baseline_sled_insert_per_s"],
        0,
        String::new(),
    ));
    out
}

/// The median of `values` (NaN if there are none), the mean of the middle two for an
/// even count.
fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Prints the table: each figure of one run, or with several runs each figure's median
/// and its range (smallest–largest), its ratio the median of the runs' ratios.
pub(crate) fn print(args: &Args, reports: &[Value]) {
    let runs: Vec<Vec<Row>> = reports.iter().map(|r| rows(args, r)).collect();
    let Some(first) = runs.first() else { return };
    let several = runs.len() > 1;
    println!(
        "{:<44} {:>14}  {}",
        "figure",
        if several { "median" } else { "value" },
        if several {
            format!(
                "(range over {} runs); ratio to this machine's limits",
                runs.len()
            )
        } else {
            "ratio to this machine's limits".into()
        }
    );
    for (i, head) in first.iter().enumerate() {
        let values: Vec<f64> = runs.iter().map(|r| r[i].value).collect();
        let mid = median(&values);
        let ratio = head.ratio.map(|(_, basis)| {
            let ratios: Vec<f64> = runs
                .iter()
                .filter_map(|r| r[i].ratio.map(|x| x.0))
                .collect();
            // Near 1 a tenth hides what a goal like "within 1.1×" asks.
            let r = median(&ratios);
            if r < 2.0 {
                format!("{r:.2}x {basis}")
            } else {
                format!("{r:.1}x {basis}")
            }
        });
        // The note of the run nearest the median, except for what must be counted
        // over every run.
        let nearest = runs
            .iter()
            .min_by(|a, b| {
                (a[i].value - mid)
                    .abs()
                    .total_cmp(&(b[i].value - mid).abs())
            })
            .map_or(String::new(), |r| r[i].note.clone());
        let note = if head.label.starts_with("failover") && several {
            let sum = |key: &str| {
                reports
                    .iter()
                    .map(|r| r[key].as_u64().unwrap_or(0))
                    .sum::<u64>()
            };
            format!(
                "lost {}, duplicated {} over all runs",
                sum("lost"),
                sum("duplicated")
            )
        } else {
            nearest
        };
        let d = head.decimals;
        let range = if several {
            let finite: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
            let lo = finite.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            format!(" ({lo:.d$}–{hi:.d$})")
        } else {
            String::new()
        };
        let tail: Vec<String> = ratio
            .into_iter()
            .chain(Some(note))
            .filter(|s| !s.is_empty())
            .collect();
        println!(
            "{:<44} {:>14}{range}  {}",
            head.label,
            format!("{mid:.d$}"),
            tail.join("; ")
        );
    }
}

/// The JSON summary: one run's report as it is; for several, each top-level figure's
/// median, lost and duplicated summed, and every run's report under "runs".
pub(crate) fn summary(reports: &[Value]) -> Value {
    if let [only] = reports {
        return only.clone();
    }
    let mut out = serde_json::Map::new();
    if let Some(Value::Object(first)) = reports.first() {
        for (key, value) in first {
            let merged = match (key.as_str(), value) {
                ("lost" | "duplicated", _) => json!(
                    reports
                        .iter()
                        .map(|r| r[key].as_u64().unwrap_or(0))
                        .sum::<u64>()
                ),
                (_, Value::Number(_)) => {
                    let values: Vec<f64> = reports.iter().map(|r| num(&r[key])).collect();
                    json!(median(&values))
                }
                _ => value.clone(),
            };
            out.insert(key.clone(), merged);
        }
    }
    out.insert("runs".into(), Value::Array(reports.to_vec()));
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_and_even_counts_skip_missing_values() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn several_runs_sum_what_was_lost_and_take_medians_of_figures() {
        let runs = [
            json!({ "latency_p50_us": 900.0, "lost": 0, "duplicated": 1, "mode": "full" }),
            json!({ "latency_p50_us": 1100.0, "lost": 2, "duplicated": 0, "mode": "full" }),
            json!({ "latency_p50_us": 1000.0, "lost": 0, "duplicated": 0, "mode": "full" }),
        ];
        let s = summary(&runs);
        assert_eq!(s["latency_p50_us"], 1000.0);
        assert_eq!(
            (s["lost"].clone(), s["duplicated"].clone()),
            (json!(2), json!(1))
        );
        assert_eq!(s["runs"].as_array().map(Vec::len), Some(3));
        assert_eq!(summary(&runs[..1]), runs[0]);
    }
}
