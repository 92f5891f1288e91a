//! Files through a relay: a file sealed into chunks (SPEC §13), put into a queue and read
//! back whole, beside writing and syncing the same chunks straight to the same disk.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use kkachi_protocol::file::{self, ChunkId, FileKey};
use kkachi_protocol::{ClientToRelay, PutOutcome, QueueKind, ReadKey, RelayToClient, WriteKey};
use kkachi_relay::client::MailboxClient;
use libp2p::identity::Keypair;
use serde_json::json;

use crate::common::{Relay, free_port, now_s};

/// Requests under way at once, as a client uploading or downloading would keep.
const IN_FLIGHT: usize = 8;

/// Puts a file of `mib` MiB into a relay as chunks and reads it back; MB/s both ways,
/// and the disk's own rate for the same chunks written and synced one by one.
pub(crate) async fn chunks(root: &Path, mib: usize) -> Result<serde_json::Value> {
    let size = (mib << 20) as u64;
    let key = FileKey([7; 32]);
    let count = file::chunk_count(size);
    let plain: Vec<u8> = (0..size as usize).map(|i| (i * 31 % 251) as u8).collect();
    let sealed: Vec<(ChunkId, Vec<u8>)> = (0..count)
        .map(|i| {
            let part =
                &plain[i * file::CHUNK_BYTES..((i + 1) * file::CHUNK_BYTES).min(plain.len())];
            let c = file::seal_chunk(&key, i, count, part, size);
            (ChunkId::of(&c), c)
        })
        .collect();
    let sealed = Arc::new(sealed);

    // Baseline: each chunk written to a file of its own and synced, on the same disk.
    let disk = root.join("chunks-baseline");
    std::fs::create_dir_all(&disk)?;
    let started = Instant::now();
    for (id, c) in sealed.iter() {
        let mut f = std::fs::File::create(disk.join(id.to_hex()))?;
        f.write_all(c)?;
        f.sync_all()?;
    }
    let baseline_s = started.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&disk)?;

    let relay = Relay::start(&root.join("chunks-relay"), free_port())?;
    let client = MailboxClient::connect(Keypair::generate_ed25519(), relay.addr.parse()?).await?;
    let read = ReadKey(rand::random());
    let write = WriteKey(rand::random());
    match client
        .grant(&read, QueueKind::Inbox, vec![write.id()])
        .await?
    {
        RelayToClient::Granted { .. } => {}
        other => bail!("the relay did not open a queue: {other:?}"),
    }
    let expires_at = now_s() + 3600;
    let started = Instant::now();
    let puts = futures::stream::iter(0..count)
        .map(|i| {
            let (client, sealed) = (client.clone(), sealed.clone());
            async move {
                let (id, data) = &sealed[i];
                let put = ClientToRelay::PutChunk {
                    write,
                    expires_at,
                    id: *id,
                    data: data.clone(),
                };
                match client.request(put).await? {
                    RelayToClient::Stored { outcomes, .. }
                        if matches!(outcomes.as_slice(), [PutOutcome::Stored]) =>
                    {
                        Ok(())
                    }
                    other => bail!("chunk {i} was not stored: {other:?}"),
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<Result<()>>>()
        .await;
    puts.into_iter().collect::<Result<()>>()?;
    let put_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let gets = futures::stream::iter(0..count)
        .map(|i| {
            let (client, sealed, read) = (client.clone(), sealed.clone(), read.clone());
            async move {
                let id = sealed[i].0;
                match client
                    .request(ClientToRelay::GetChunk { key: read, id })
                    .await?
                {
                    RelayToClient::Chunk { data } => Ok((i, data)),
                    other => bail!("chunk {i} was not served: {other:?}"),
                }
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect::<Vec<Result<(usize, Vec<u8>)>>>()
        .await;
    let mut back = vec![Vec::new(); count];
    for got in gets {
        let (i, data) = got?;
        back[i] = file::open_chunk(&key, &sealed[i].0, i, size, &data)
            .with_context(|| format!("chunk {i} does not open"))?;
    }
    let get_s = started.elapsed().as_secs_f64();
    if back.concat() != plain {
        bail!("the file read back is not the file put");
    }
    let mb = size as f64 / 1e6;
    Ok(json!({
        "file_mib": mib,
        "chunks": count,
        "put_mb_s": mb / put_s,
        "get_mb_s": mb / get_s,
        "baseline_disk_mb_s": mb / baseline_s,
        "in_flight": IN_FLIGHT,
    }))
}
