//! Durable state: the only module that touches sled.
//!
//! Everything the agent keeps lives in one sled database under `storage.path`, split into named
//! trees ([`TreeName`]). Other modules see [`Store`], [`Tree`], [`Batch`] and [`Value`], never
//! sled's own types, so that swapping the engine (for example to redb) touches this file alone.
//!
//! Invariants:
//! - A database carries a schema version in the `meta` tree. Opening refuses a newer version and
//!   a database with data but no version, with an error that says what to do.
//! - Flush policy: sled's background flush runs every [`BACKGROUND_FLUSH_MS`] for data that
//!   nobody has been promised. Anything the agent acknowledges to a register or counts as
//!   received goes through [`Store::flush`] first, which returns only once the log is fsynced.
//!   Callers batch many records into one flush (group commit); they never acknowledge before it.
//! - Opening never panics: an unwritable path, a database held by another running agent and
//!   corruption each get their own error.

use std::fmt;
use std::ops::{Deref, RangeBounds};
use std::path::{Path, PathBuf};

/// Current on-disk schema. Bump it with a migration in [`Store::open`].
pub const SCHEMA_VERSION: u32 = 1;

/// How often sled flushes on its own, for data nobody has been promised yet.
pub const BACKGROUND_FLUSH_MS: u64 = 500;

const SCHEMA_KEY: &[u8] = b"schema_version";

/// The named trees. Each concern owns one; no two share a tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TreeName {
    /// Schema version and small agent-wide facts.
    Meta,
    /// Events bound for central, until central acknowledges them.
    Outbox,
    /// Rejected input with its raw bytes and the reason.
    DeadLetter,
    /// Customer profiles and their KPIs.
    Profiles,
    /// Presence history per customer, expiring after the retention period.
    Presence,
    /// Offers shown, caps and attribution state.
    Offers,
}

impl TreeName {
    /// Every tree, for checks that must look everywhere (erasure leaves nothing).
    pub const ALL: [TreeName; 6] = [
        TreeName::Meta,
        TreeName::Outbox,
        TreeName::DeadLetter,
        TreeName::Profiles,
        TreeName::Presence,
        TreeName::Offers,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TreeName::Meta => "meta",
            TreeName::Outbox => "outbox",
            TreeName::DeadLetter => "deadletter",
            TreeName::Profiles => "profiles",
            TreeName::Presence => "presence",
            TreeName::Offers => "offers",
        }
    }
}

/// Why the store could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "storage path {path} is not writable: {source}; check storage.path and the owner of the directory"
    )]
    Unwritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the store at {path} is locked by another process; is another storelink agent running with the same storage.path?"
    )]
    Locked { path: PathBuf },
    #[error(
        "the store at {path} has schema version {found}, newer than this storelink supports ({supported}); upgrade storelink or point storage.path elsewhere"
    )]
    NewerSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error(
        "the store at {path} holds data but no readable schema version; it was not written by storelink. Move it away or point storage.path elsewhere"
    )]
    UnknownSchema { path: PathBuf },
    #[error("the store at {path} is corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("storage I/O failed at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("storage failure at {path}: {detail}")]
    Engine { path: PathBuf, detail: String },
}

impl StoreError {
    /// The engine could not read what is on disk: a case for quarantine, not for a person.
    fn is_unreadable(&self) -> bool {
        match self {
            StoreError::Corrupt { .. } => true,
            StoreError::Io { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ),
            StoreError::Engine { .. } => true,
            _ => false,
        }
    }
}

/// A store that could not be read and was moved aside.
#[derive(Debug, Clone)]
pub struct Quarantined {
    pub moved_to: PathBuf,
    pub reason: String,
}

/// Moves the unreadable store at `path` aside: the directory is renamed next to itself, or,
/// when it cannot be (a mount point), its contents go into a subdirectory of it.
fn quarantine(path: &Path, now: jiff::Timestamp) -> Result<PathBuf, StoreError> {
    let stamp = now.strftime("%Y%m%dT%H%M%SZ").to_string();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "store".into());
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let sibling = path.with_file_name(format!("{name}.corrupt-{stamp}"));
    if std::fs::rename(path, &sibling).is_ok() {
        return Ok(sibling);
    }
    let inside = path.join(format!("corrupt-{stamp}"));
    std::fs::create_dir_all(&inside).map_err(io)?;
    for entry in std::fs::read_dir(path).map_err(io)? {
        let entry = entry.map_err(io)?;
        if entry.path() == inside || entry.file_name().to_string_lossy().starts_with("corrupt-") {
            continue;
        }
        std::fs::rename(entry.path(), inside.join(entry.file_name())).map_err(io)?;
    }
    Ok(inside)
}

/// Options that tune the engine, not the data.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub cache_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 4 * 1024 * 1024,
        }
    }
}

/// An open database. Cheap to clone; clones share the database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    path: PathBuf,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens or creates the store at `path`, checking the schema version.
    pub fn open(path: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        probe_writable(path)?;
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(options.cache_bytes)
            .flush_every_ms(Some(BACKGROUND_FLUSH_MS))
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| classify_open_error(path, e))?;
        let store = Store {
            db,
            path: path.to_path_buf(),
        };
        store.check_schema()?;
        Ok(store)
    }

    /// Opens the store like [`Store::open`], but a store the engine cannot read (corruption,
    /// an unreadable log, a panic while recovering it) is moved aside and a fresh one started
    /// in its place, so the agent runs and says so instead of crash-looping at every restart.
    /// A locked, unwritable, newer or foreign store is still an error: those are for a person.
    pub fn open_or_quarantine(
        path: &Path,
        options: &StoreOptions,
        now: jiff::Timestamp,
    ) -> Result<(Store, Option<Quarantined>), StoreError> {
        let attempt = std::panic::catch_unwind(|| Store::open(path, options));
        let reason = match attempt {
            Ok(Ok(store)) => return Ok((store, None)),
            Ok(Err(e)) if e.is_unreadable() => e.to_string(),
            Ok(Err(e)) => return Err(e),
            Err(panic) => format!(
                "the storage engine crashed reading the store at {}: {}",
                path.display(),
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
            ),
        };
        let moved_to = quarantine(path, now)?;
        let store = Store::open(path, options)?;
        Ok((store, Some(Quarantined { moved_to, reason })))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A named tree. Opening a tree is cheap after the first time.
    pub fn tree(&self, name: TreeName) -> Result<Tree, StoreError> {
        let inner = self
            .db
            .open_tree(name.as_str())
            .map_err(|e| self.error(e))?;
        Ok(Tree {
            inner,
            name,
            path: self.path.clone(),
        })
    }

    /// Makes every write so far durable. Returns once the log is fsynced.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let db = self.db.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| StoreError::Engine {
                path: path.clone(),
                detail: format!("flush task failed: {e}"),
            })?
            .map(|_| ())
            .map_err(|e| engine_error(&path, e))
    }

    /// Blocking form of [`Store::flush`], for shutdown paths and tools without a runtime.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(|e| self.error(e))
    }

    /// Bytes free for this process on the filesystem that holds the store.
    pub fn free_bytes(&self) -> Result<u64, StoreError> {
        let stat = nix::sys::statvfs::statvfs(&self.path).map_err(|e| StoreError::Io {
            path: self.path.clone(),
            source: std::io::Error::from(e),
        })?;
        Ok((stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64))
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(|e| self.error(e))
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let meta = self.tree(TreeName::Meta)?;
        match meta.get(SCHEMA_KEY)? {
            Some(v) => {
                let found = <[u8; 4]>::try_from(&*v)
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::UnknownSchema {
                        path: self.path.clone(),
                    })?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        path: self.path.clone(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                if found == 0 {
                    return Err(StoreError::UnknownSchema {
                        path: self.path.clone(),
                    });
                }
                Ok(())
            }
            None => {
                if self.holds_data()? {
                    return Err(StoreError::UnknownSchema {
                        path: self.path.clone(),
                    });
                }
                meta.insert(SCHEMA_KEY, SCHEMA_VERSION.to_be_bytes())?;
                self.flush_blocking()
            }
        }
    }

    fn holds_data(&self) -> Result<bool, StoreError> {
        if !self.db.is_empty() {
            return Ok(true);
        }
        for name in self.db.tree_names() {
            let tree = self.db.open_tree(&name).map_err(|e| self.error(e))?;
            if !tree.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn error(&self, e: sled::Error) -> StoreError {
        engine_error(&self.path, e)
    }

    /// Writes the schema version, for tests of the version check.
    #[doc(hidden)]
    pub fn set_schema_version_for_test(&self, version: u32) -> Result<(), StoreError> {
        self.tree(TreeName::Meta)?
            .insert(SCHEMA_KEY, version.to_be_bytes())?;
        self.flush_blocking()
    }
}

/// A value read from a tree. Derefs to bytes without copying.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Value(sled::IVec);

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
    inner: sled::Tree,
    name: TreeName,
    path: PathBuf,
}

impl fmt::Debug for Tree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tree({})", self.name.as_str())
    }
}

impl Tree {
    pub fn name(&self) -> TreeName {
        self.name
    }

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

/// sled creates the directory itself, but its errors for a read-only or foreign-owned path
/// are vague; probing first gives retail IT a message that names the path.
fn probe_writable(path: &Path) -> Result<(), StoreError> {
    let unwritable = |source| StoreError::Unwritable {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(path).map_err(unwritable)?;
    let probe = path.join(".storelink-write-probe");
    std::fs::write(&probe, b"ok").map_err(unwritable)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
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

fn engine_error(path: &Path, e: sled::Error) -> StoreError {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open(dir, &StoreOptions::default())
    }

    #[test]
    fn an_unreadable_store_is_quarantined_and_a_fresh_one_opened() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        {
            let store = open(&dir).unwrap();
            let t = store.tree(TreeName::Outbox).unwrap();
            for i in 0u32..2000 {
                t.insert(i.to_be_bytes(), vec![7u8; 200]).unwrap();
            }
            store.flush_blocking().unwrap();
        }
        // Garbage over the whole log and snapshot, as a failing card or a bad copy leaves it.
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_file() {
                let len = std::fs::metadata(&p).unwrap().len() as usize;
                let junk: Vec<u8> = (0..len.max(64))
                    .map(|_| {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng as u8
                    })
                    .collect();
                std::fs::write(&p, junk).unwrap();
            }
        }
        let now: jiff::Timestamp = "2026-11-23T03:00:00Z".parse().unwrap();
        let (store, quarantined) =
            Store::open_or_quarantine(&dir, &StoreOptions::default(), now).unwrap();
        let q = quarantined.expect("the garbage was noticed");
        assert_eq!(
            q.moved_to,
            parent.path().join("data.corrupt-20261123T030000Z")
        );
        assert!(q.moved_to.join("db").exists(), "the broken files are kept");
        assert!(store.tree(TreeName::Outbox).unwrap().is_empty());
        drop(store);
        // A healthy store opens as it is.
        let (_store, again) =
            Store::open_or_quarantine(&dir, &StoreOptions::default(), now).unwrap();
        assert!(again.is_none());
    }

    #[test]
    fn fresh_store_gets_the_schema_version_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path()).unwrap();
            let t = store.tree(TreeName::Outbox).unwrap();
            t.insert(b"k", b"v").unwrap();
            store.flush_blocking().unwrap();
        }
        let store = open(dir.path()).unwrap();
        let t = store.tree(TreeName::Outbox).unwrap();
        assert_eq!(&*t.get(b"k").unwrap().unwrap(), b"v");
        let meta = store.tree(TreeName::Meta).unwrap();
        assert_eq!(
            &*meta.get(SCHEMA_KEY).unwrap().unwrap(),
            &SCHEMA_VERSION.to_be_bytes()
        );
    }

    #[test]
    fn newer_schema_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        open(dir.path())
            .unwrap()
            .set_schema_version_for_test(SCHEMA_VERSION + 1)
            .unwrap();
        let err = open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1)
        );
        assert!(err.to_string().contains("upgrade storelink"), "{err}");
    }

    #[test]
    fn data_without_a_schema_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.open_tree("foreign").unwrap().insert(b"a", b"b").unwrap();
            db.flush().unwrap();
        }
        let err = open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::UnknownSchema { .. }), "{err}");
    }

    #[test]
    fn a_second_open_of_a_live_store_reports_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(dir.path()).unwrap();
        // sled keeps one Db per process path registry-free, so a second open in the same
        // process contends for the same file lock a second agent would.
        let err = open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(err.to_string().contains("another storelink agent"));
    }

    #[test]
    fn unwritable_path_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = open(&file.join("store")).unwrap_err();
        assert!(matches!(err, StoreError::Unwritable { .. }), "{err}");
        assert!(err.to_string().contains("storage.path"));
    }

    #[test]
    fn batch_applies_atomically_and_scans_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        let t = store.tree(TreeName::DeadLetter).unwrap();
        let mut b = Batch::default();
        b.insert([1u8, 2], b"b");
        b.insert([1u8, 1], b"a");
        b.insert([2u8, 0], b"c");
        t.apply(b).unwrap();
        let keys: Vec<_> = t
            .scan_prefix([1u8])
            .map(|r| r.unwrap().0.to_vec())
            .collect();
        assert_eq!(keys, vec![vec![1, 1], vec![1, 2]]);
        assert_eq!(t.len(), 3);
    }
}
