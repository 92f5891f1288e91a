//! Transfers under way in this process: one task per transfer at a time, and how far
//! each is, for `files` and the UI.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::store::TransferId;

/// How far a transfer under way is.
#[derive(Debug, Clone)]
pub struct LiveProgress {
    /// Chunks done (uploaded to enough relays, or fetched and checked).
    pub done: usize,
    /// Chunks in all (the manifest included when sending).
    pub total: usize,
    /// Bytes moved so far by this run.
    pub bytes: u64,
    /// When this run started.
    pub started: Instant,
    /// What it is doing, in a few words ("sealing", "uploading", "fetching").
    pub doing: &'static str,
}

impl LiveProgress {
    /// Bytes per second moved by this run.
    pub fn rate(&self) -> f64 {
        self.bytes as f64 / self.started.elapsed().as_secs_f64().max(0.001)
    }
}

/// The transfers this process is running.
#[derive(Debug, Default)]
pub struct Live {
    running: Mutex<HashMap<(bool, TransferId), LiveProgress>>,
}

/// This process's right to run one transfer: released when dropped.
#[derive(Debug)]
pub struct Claim {
    live: Arc<Live>,
    /// Whether it is a file received (else one sent).
    pub incoming: bool,
    /// The transfer.
    pub id: TransferId,
}

impl Live {
    /// Claims transfer `id` for the caller; `None` while another task runs it.
    pub fn claim(self: &Arc<Self>, incoming: bool, id: TransferId) -> Option<Claim> {
        let mut running = self.running.lock();
        if running.contains_key(&(incoming, id)) {
            return None;
        }
        running.insert(
            (incoming, id),
            LiveProgress {
                done: 0,
                total: 0,
                bytes: 0,
                started: Instant::now(),
                doing: "starting",
            },
        );
        Some(Claim {
            live: self.clone(),
            incoming,
            id,
        })
    }

    /// How many transfers run.
    pub fn count(&self) -> usize {
        self.running.lock().len()
    }

    /// Whether a task runs transfer `id`.
    pub fn busy(&self, incoming: bool, id: &TransferId) -> bool {
        self.running.lock().contains_key(&(incoming, *id))
    }

    /// How far transfer `id` is, if a task runs it.
    pub fn progress(&self, incoming: bool, id: &TransferId) -> Option<LiveProgress> {
        self.running.lock().get(&(incoming, *id)).cloned()
    }

    /// Waits until no task runs transfer `id`, then claims it.
    pub async fn claim_when_free(self: &Arc<Self>, incoming: bool, id: TransferId) -> Claim {
        loop {
            if let Some(claim) = self.claim(incoming, id) {
                return claim;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

impl Claim {
    /// Notes how far it is.
    pub fn update(&self, f: impl FnOnce(&mut LiveProgress)) {
        if let Some(p) = self.live.running.lock().get_mut(&(self.incoming, self.id)) {
            f(p);
        }
    }

    /// How far it is.
    pub fn progress(&self) -> Option<LiveProgress> {
        self.live.progress(self.incoming, &self.id)
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.live.running.lock().remove(&(self.incoming, self.id));
    }
}
