//! Send → shown in a group: a message to a group until every member shows it (each
//! member a client in its own process), against a 1:1 message to one of them in the
//! same run; a membership change until every member holds it; and the same messages
//! once one of the three relays is killed. Both tiers: sealed to each member over
//! their sessions (small), or once per group relay into the group's queue (large,
//! the three relays as group relays). And what one message costs the relays at 10,
//! 100 and 1,000 members, in each tier.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use kkachi_client::engine::{GroupChange, SendEvent};
use serde_json::json;

use crate::common::{Relay, free_port, mono_us, pct};
use crate::latency::{provision, spawn_recipient, user};

/// `members` clients besides the sender, `messages` messages each way of sending; with
/// `large`, the group has the three relays as group relays.
pub(crate) async fn group_latency(
    root: &Path,
    members: usize,
    messages: usize,
    large: bool,
) -> Result<serde_json::Value> {
    let mut relays: Vec<Relay> = (0..3)
        .map(|i| Relay::start(&root.join(format!("groups-{i}-{}", mono_us())), free_port()))
        .collect::<Result<_>>()?;
    let addrs: Vec<String> = relays.iter().map(|r| r.addr.clone()).collect();
    let alice = user("alice", &addrs, false, true)?;
    let parsed: Vec<kkachi_protocol::Multiaddr> =
        addrs.iter().map(|r| r.parse()).collect::<Result<_, _>>()?;
    let mut homes = Vec::new();
    let mut peers = Vec::new();
    for i in 0..members {
        let home = tempfile::tempdir()?;
        let (store, _, card) = provision(home.path(), &format!("m{i}"), &parsed, true)?;
        store.add_card(&alice.card)?;
        store.flush().await?;
        alice.engine.add_contact(card.clone(), None).await?;
        peers.push(card.identity().peer_id());
        homes.push(home);
    }
    let mut children = Vec::new();
    let mut seen = Vec::new();
    for home in &homes {
        let (child, s) = spawn_recipient(home.path(), false).await?;
        children.push(child);
        seen.push(s);
    }
    // Sessions established with everyone, as in a group that has talked before.
    for peer in &peers {
        for _ in 0..3 {
            let mut sending = alice.engine.send(*peer, "warm-up".into()).await?;
            let delivered = async {
                while let Some(event) = sending.events.recv().await {
                    if matches!(event, SendEvent::Delivered { .. }) {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), delivered).await;
        }
    }
    let shown_by_all = |id: &[u8; 16]| seen.iter().all(|s| s.lock().shown.contains_key(id));
    let wait_all = |ids: Vec<[u8; 16]>, within: Duration| {
        let seen = &seen;
        async move {
            let deadline = Instant::now() + within;
            while Instant::now() < deadline
                && ids
                    .iter()
                    .any(|id| !seen.iter().all(|s| s.lock().shown.contains_key(id)))
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // The group: made and joined; how long until every member holds it.
    let id = alice.engine.create_group("Bench".into()).await?;
    let t = Instant::now();
    if large {
        alice
            .engine
            .change_group(id, GroupChange::Relays(parsed.clone()))
            .await?;
    }
    alice
        .engine
        .change_group(id, GroupChange::Add(peers.clone()))
        .await?;
    let warm = alice.engine.send_group(id, "warm-up".into()).await?;
    wait_all(vec![warm.id.0], Duration::from_secs(30)).await;
    let joined_ms = t.elapsed().as_secs_f64() * 1e3;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Group messages, then 1:1 messages to the first member, alternating in blocks.
    let mut group_sent = Vec::new();
    let mut one_sent = Vec::new();
    for i in 0..messages {
        let t = mono_us();
        let sent = alice.engine.send_group(id, format!("group {i}")).await?;
        group_sent.push((sent.id.0, t));
        tokio::time::sleep(Duration::from_millis(30)).await;
        let t = mono_us();
        let sending = alice.engine.send(peers[0], format!("one {i}")).await?;
        one_sent.push((sending.queued.id.0, t));
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let all_ids: Vec<[u8; 16]> = group_sent.iter().map(|(id, _)| *id).collect();
    wait_all(all_ids, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One relay killed mid-conversation: the same messages again through the two left.
    relays[0].kill9();
    let mut after_kill = Vec::new();
    for i in 0..messages {
        let t = mono_us();
        let sent = alice.engine.send_group(id, format!("after {i}")).await?;
        after_kill.push((sent.id.0, t));
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let kill_ids: Vec<[u8; 16]> = after_kill.iter().map(|(id, _)| *id).collect();
    wait_all(kill_ids, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut lost = 0;
    let mut duplicated = 0;
    let mut until_all = |sent: &[([u8; 16], u64)]| {
        let mut out = Vec::new();
        for (id, t) in sent {
            let mut last = 0u64;
            for s in &seen {
                match s.lock().shown.get(id) {
                    Some(times) => {
                        duplicated += times.len().saturating_sub(1);
                        last = last.max(times[0]);
                    }
                    None => lost += 1,
                }
            }
            if shown_by_all(id) {
                out.push(last.saturating_sub(*t));
            }
        }
        out.sort();
        out
    };
    let to_all = until_all(&group_sent);
    let killed = until_all(&after_kill);
    let mut one = Vec::new();
    for (id, t) in &one_sent {
        if let Some(at) = seen[0].lock().shown.get(id).and_then(|v| v.first()) {
            one.push(at.saturating_sub(*t));
        }
    }
    one.sort();
    for mut child in children {
        drop(child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
    let p50 = pct(&to_all, 0.5);
    let one_p50 = pct(&one, 0.5);
    Ok(json!({
        "tier": if large { "large" } else { "small" },
        "members": members + 1,
        "messages": messages,
        "to_all_p50_us": p50,
        "to_all_p99_us": pct(&to_all, 0.99),
        "one_p50_us": one_p50,
        "vs_one": p50 as f64 / (one_p50 as f64).max(1.0),
        "relay_killed_p50_us": pct(&killed, 0.5),
        "relay_killed_vs_fault_free": pct(&killed, 0.5) as f64 / (p50 as f64).max(1.0),
        "joined_ms": joined_ms,
        "lost": lost,
        "duplicated": duplicated,
    }))
}

/// What one message to a group of `n` members costs its relays, for n = 10, 100 and
/// 1,000, made with the protocol's own sealing (no network): in the large tier one
/// item per group relay (3), whatever `n`; an epoch's key records, posted in two
/// queues on each relay, are what grows with `n` (once per epoch). In the small tier
/// (up to 32 members) one sealed envelope per other member.
pub(crate) fn group_costs() -> Result<serde_json::Value> {
    use kkachi_protocol::content::MessageId;
    use kkachi_protocol::envelope::{DEFAULT_TTL_SECS, Envelope};
    use kkachi_protocol::group::large::{EpochKey, KeyRecord, Post, PostBody};
    use kkachi_protocol::group::{GroupId, Hlc, SMALL_GROUP_MAX};
    const RELAYS: usize = 3;
    let text = "The bridge on the river road is out; go round by the school.".to_string();
    let envelope_len = |payload: Vec<u8>| {
        Envelope {
            expires_at: DEFAULT_TTL_SECS,
            payload,
        }
        .encode()
        .len()
    };
    let mut rows = Vec::new();
    for n in [10usize, 100, 1000] {
        let members: Vec<kkachi_protocol::Identity> = (0..n)
            .map(|_| kkachi_protocol::Identity::generate())
            .collect();
        let group = GroupId([7; 32]);
        let key = EpochKey::generate(&mut rand::rngs::OsRng);
        let epoch = key.id(&group);
        let at = Hlc { ms: 1, count: 0 };
        let post = Post::sign(
            &members[1],
            group,
            epoch,
            1,
            MessageId([0; 16]),
            at,
            PostBody::Message {
                seconds: 0,
                text: text.clone(),
            },
        )?;
        let t = Instant::now();
        let large_bytes: usize = (0..RELAYS)
            .map(|_| envelope_len(post.seal(&key, &mut rand::rngs::OsRng)))
            .sum();
        let seal_us = t.elapsed().as_secs_f64() * 1e6;
        let keys: Vec<[u8; 32]> = members.iter().map(|m| m.x25519_public()).collect();
        let t = Instant::now();
        let parts = KeyRecord::make(&members[0], group, 1, at, &key, &keys)?;
        let epoch_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut epoch_bytes = 0;
        let mut epoch_writes = 0;
        for part in &parts {
            let post = Post::sign(
                &members[0],
                group,
                epoch,
                0,
                MessageId([0; 16]),
                at,
                PostBody::Key(Box::new(part.clone())),
            )?;
            // In the queue of the epoch it replaces and in its own, on every relay.
            for _ in 0..2 * RELAYS {
                epoch_bytes += envelope_len(post.seal(&key, &mut rand::rngs::OsRng));
                epoch_writes += 1;
            }
        }
        // The small tier: one envelope per other member, each a sealed packet of the
        // smallest size class (a text this short fits it).
        let small = (n <= SMALL_GROUP_MAX).then(|| {
            let packet = kkachi_protocol::session::SIZE_CLASSES[0];
            json!({
                "writes": n - 1,
                "bytes": (n - 1) * envelope_len(vec![0; packet]),
            })
        });
        rows.push(json!({
            "members": n,
            "large_writes": RELAYS,
            "large_bytes": large_bytes,
            "large_seal_us": seal_us,
            "epoch_writes": epoch_writes,
            "epoch_bytes": epoch_bytes,
            "epoch_make_ms": epoch_ms,
            "small": small,
        }));
    }
    let at = |i: usize, k: &str| rows[i][k].as_f64().unwrap_or(0.0);
    Ok(json!({
        "relays": RELAYS,
        "sizes": rows,
        // The large tier's cost per message at 1,000 members over its cost at 10.
        "large_1000_vs_10": at(2, "large_bytes") / at(0, "large_bytes").max(1.0),
    }))
}
