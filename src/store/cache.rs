//! The profile cache: sled trees for customer profiles, KPIs, presence history and the offer
//! ledger.
//!
//! sled 0.34 stays here because the design card asks for it, and because everything in it is
//! either a cache of central's data (profiles) or state the agent can finish again from the log
//! (KPIs, through the journal in [`super::log`]). Nothing the agent acknowledges depends on sled
//! alone.
//!
//! Invariants:
//! - Other modules see [`Tree`], [`Batch`] and [`Value`], never sled's types.
//! - A write here is durable only after [`super::Store::flush_cache`] (or
//!   [`super::Store::flush`]): sled's own flush uses `sync_file_range` on Linux, which persists
//!   no metadata and may leave nothing after a power cut, so the durable point fsyncs sled's
//!   files and directory as well.

use std::fmt;
use std::ops::{Deref, RangeBounds};
use std::path::{Path, PathBuf};

use super::StoreError;

/// The named sled trees. Each concern owns one; no two share a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TreeName {
    /// Customer profiles and their KPIs.
    Profiles,
    /// Presence history per customer, expiring after the retention period.
    Presence,
    /// Offers shown, caps and attribution state.
    Offers,
}

impl TreeName {
    /// Every tree, for checks that must look everywhere (erasure leaves nothing).
    pub const ALL: [TreeName; 3] = [TreeName::Profiles, TreeName::Presence, TreeName::Offers];

    pub fn as_str(self) -> &'static str {
        match self {
            TreeName::Profiles => "profiles",
            TreeName::Presence => "presence",
            TreeName::Offers => "offers",
        }
    }
}

/// A value read from a tree. Derefs to bytes without copying.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Value(pub(super) sled::IVec);

impl Deref for Value {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Value {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Value({} bytes)", self.0.len())
    }
}

/// Writes applied to one tree atomically.
#[derive(Default)]
pub struct Batch {
    inner: sled::Batch,
    len: usize,
}

impl Batch {
    pub fn insert(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.inner.insert(key.as_ref(), value.as_ref());
        self.len += 1;
    }

    pub fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.inner.remove(key.as_ref());
        self.len += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One named tree.
#[derive(Clone)]
pub struct Tree {
    pub(super) inner: sled::Tree,
    pub(super) name: &'static str,
    pub(super) path: PathBuf,
}

impl fmt::Debug for Tree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tree({})", self.name)
    }
}

impl Tree {
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Value>, StoreError> {
        self.inner
            .get(key)
            .map(|v| v.map(Value))
            .map_err(|e| self.error(e))
    }

    pub fn contains(&self, key: impl AsRef<[u8]>) -> Result<bool, StoreError> {
        self.inner.contains_key(key).map_err(|e| self.error(e))
    }

    pub fn insert(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<Option<Value>, StoreError> {
        self.inner
            .insert(key.as_ref(), value.as_ref())
            .map(|v| v.map(Value))
            .map_err(|e| self.error(e))
    }

    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<Option<Value>, StoreError> {
        self.inner
            .remove(key)
            .map(|v| v.map(Value))
            .map_err(|e| self.error(e))
    }

    /// Atomically replaces the value at `key` with what `f` makes of the current one (`None`
    /// removes it); `f` may run more than once under contention. Returns the new value.
    pub fn update_and_fetch(
        &self,
        key: impl AsRef<[u8]>,
        f: impl FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
    ) -> Result<Option<Value>, StoreError> {
        self.inner
            .update_and_fetch(key, f)
            .map(|v| v.map(Value))
            .map_err(|e| self.error(e))
    }

    /// Applies all writes in `batch` atomically: after a crash, all or none are there.
    pub fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        self.inner
            .apply_batch(batch.inner)
            .map_err(|e| self.error(e))
    }

    pub fn len(&self) -> usize {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }

    pub fn first(&self) -> Result<Option<(Value, Value)>, StoreError> {
        self.inner
            .first()
            .map(|o| o.map(|(k, v)| (Value(k), Value(v))))
            .map_err(|e| self.error(e))
    }

    pub fn last(&self) -> Result<Option<(Value, Value)>, StoreError> {
        self.inner
            .last()
            .map(|o| o.map(|(k, v)| (Value(k), Value(v))))
            .map_err(|e| self.error(e))
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub fn scan_prefix(
        &self,
        prefix: impl AsRef<[u8]>,
    ) -> impl DoubleEndedIterator<Item = Result<(Value, Value), StoreError>> + '_ {
        self.inner.scan_prefix(prefix).map(move |r| {
            r.map(|(k, v)| (Value(k), Value(v)))
                .map_err(|e| self.error(e))
        })
    }

    /// Entries with keys in `range`, in key order.
    pub fn range<K, R>(
        &self,
        range: R,
    ) -> impl DoubleEndedIterator<Item = Result<(Value, Value), StoreError>> + '_
    where
        K: AsRef<[u8]>,
        R: RangeBounds<K>,
    {
        self.inner.range(range).map(move |r| {
            r.map(|(k, v)| (Value(k), Value(v)))
                .map_err(|e| self.error(e))
        })
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = Result<(Value, Value), StoreError>> + '_ {
        self.inner.iter().map(move |r| {
            r.map(|(k, v)| (Value(k), Value(v)))
                .map_err(|e| self.error(e))
        })
    }

    fn error(&self, e: sled::Error) -> StoreError {
        engine_error(&self.path, e)
    }
}

/// The sled database's files under `dir`: what a durable point fsyncs and what a damaged cache
/// moves aside. The log file and earlier quarantines are not sled's.
pub(super) fn sled_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == "conf" || name == "db" || name.starts_with("snap.") || name == "blobs" {
            out.push(entry.path());
        }
    }
    Ok(out)
}

/// Opens sled with the agent's settings.
///
/// On a thread of its own: sled's first open allocates about 26 MiB of zeroed memory it never
/// uses again (its metrics histograms, which the `no_metrics` default leaves untouched, and
/// page-cache tables). A fresh thread takes that from fresh pages, which the allocator knows
/// are zero and leaves unwritten, so they never become resident. On a thread that had already
/// freed larger blocks, mimalloc reuses those and clears them by hand: the agent then idled
/// at 45 MiB instead of 18, depending on nothing more than the length of the storage path
/// (BENCHMARKS.md).
pub(super) fn open(
    path: &Path,
    cache_bytes: u64,
    flush_every_ms: u64,
) -> Result<sled::Db, StoreError> {
    let open = || {
        sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(flush_every_ms))
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| classify_open_error(path, e))
    };
    std::thread::scope(|scope| {
        match std::thread::Builder::new()
            .name("sled-open".into())
            .spawn_scoped(scope, open)
        {
            Ok(thread) => thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            // No thread to be had: the open itself matters more than where its memory lies.
            Err(_) => open(),
        }
    })
}

/// sled writes its `conf` file once, at creation, without an fsync; a power cut soon after can
/// leave it torn, and sled then refuses the whole database. Its content follows from the
/// settings above alone, so a torn one is removed and sled writes it again. Returns whether
/// the file was torn.
pub(super) fn repair_conf(path: &Path) -> bool {
    let conf = path.join("conf");
    let Ok(bytes) = std::fs::read(&conf) else {
        return false;
    };
    // sled's layout: the serialised settings, then a CRC-32 of them (little-endian).
    let torn = bytes.len() <= 8 || {
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        crc32fast::hash(body).to_le_bytes() != crc
    };
    torn && std::fs::remove_file(&conf).is_ok()
}

fn classify_open_error(path: &Path, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(io) if is_lock_error(&io) => StoreError::Locked {
            path: path.to_path_buf(),
        },
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            StoreError::Unwritable {
                path: path.to_path_buf(),
                source: io,
            }
        }
        other => engine_error(path, other),
    }
}

fn is_lock_error(io: &std::io::Error) -> bool {
    io.kind() == std::io::ErrorKind::WouldBlock || io.to_string().contains("could not acquire lock")
}

pub(super) fn engine_error(path: &Path, e: sled::Error) -> StoreError {
    match e {
        sled::Error::Io(source) => StoreError::Io {
            path: path.to_path_buf(),
            source,
        },
        sled::Error::Corruption { at, .. } => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: match at {
                Some(at) => format!("bad data at {at:?}"),
                None => "bad data".into(),
            },
        },
        other => StoreError::Engine {
            path: path.to_path_buf(),
            detail: other.to_string(),
        },
    }
}
