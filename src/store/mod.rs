//! Durable state: the only module that names a storage engine.
//!
//! Two engines live under `storage.path`, each for what it is good at:
//! - the **log** ([`log`], redb, `outbox.redb`): the outbox, the seen-id index, the dead
//!   letters, agent facts, and the journal of work owed to the cache. Crash-safe by design;
//!   what the agent acknowledges is here, committed durably, first.
//! - the **cache** ([`cache`], sled): customer profiles, KPIs, presence history and the offer
//!   ledger.
//!
//! Invariants:
//! - Nothing is acknowledged that is not durable in the log. Where one step writes to both
//!   engines, the log goes first and the cache's part is *owed*: it is recorded in the log's
//!   journal in the same durable commit, applied to the cache idempotently, and the journal
//!   record is dropped only after a [`Store::checkpoint`] has made the cache durable. After a
//!   power cut, the owner replays what the journal still holds.
//! - Durable points are real: a durable log commit is an `fdatasync` of the file (and the
//!   directory when the file was new); a durable cache point is sled's flush followed by an
//!   fsync of every sled file and the directory (sled alone uses `sync_file_range`).
//! - A database carries a schema version in the log's `meta` table. Opening refuses a newer
//!   version and a database with data but no version, with an error that says what to do.
//!   A store from before the log (everything in sled, schema 1) is migrated on first start,
//!   held events and all.
//! - Opening never panics: an unwritable path, a store held by another running agent and
//!   corruption each get their own error. [`Store::open_or_salvage`] moves damaged files aside
//!   and carries every intact log record into a fresh log (see [`salvage`]).

pub mod cache;
pub mod log;
mod salvage;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub use cache::{Batch, Tree, TreeName, Value};
pub use log::{Commit, LogItem, LogRange, LogTable, LogTableMut, LogValue, LogView, LogWrite};
pub use salvage::ScanReport;

/// Current on-disk schema. 1: everything in sled. 2: the log in redb, the cache in sled.
pub const SCHEMA_VERSION: u32 = 2;

/// How often sled flushes on its own. Durability never depends on it (see the invariants).
pub const BACKGROUND_FLUSH_MS: u64 = 500;

const SCHEMA_KEY: &[u8] = b"schema_version";
/// Set in the log's meta table once a schema-1 sled store's log trees were carried over.
const MIGRATED_KEY: &[u8] = b"migrated_from_sled";
/// A random mark a new store writes into both engines. A cache without the log's mark was
/// replaced or lost (sled reads unreadable files as an empty database rather than failing).
const CACHE_MARK_KEY: &[u8] = b"cache_mark";
/// The sled trees of schema 1 that the log replaces.
const LEGACY_TREES: [&str; 3] = ["meta", "outbox", "deadletter"];

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
    /// The engine could not read what is on disk: a case for salvage, not for a person.
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

/// What [`Store::open_or_salvage`] did with a damaged store.
#[derive(Debug, Clone)]
pub struct Salvaged {
    /// Where the damaged files are kept for inspection.
    pub moved_to: PathBuf,
    /// What the engines said.
    pub reason: String,
    /// Log records carried into the fresh log (after de-duplication by key), and how many of
    /// them are events for central.
    pub records: u64,
    pub events: u64,
    /// Frames found damaged (at least this many records are lost), with their first bytes.
    pub unreadable: u64,
    pub sample: Vec<u8>,
    /// The log was damaged (and salvaged); false when only the cache was.
    pub log_damaged: bool,
    /// The profile cache was unreadable too and starts empty (profiles come back with the next
    /// sync from central; KPIs and offer history of the old cache are lost).
    pub cache_lost: bool,
}

/// Options that tune the engines, not the data.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// sled's page cache.
    pub cache_bytes: u64,
    /// redb's page cache.
    pub log_cache_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 4 * 1024 * 1024,
            log_cache_bytes: 4 * 1024 * 1024,
        }
    }
}

/// A schema-1 store's outbox carried into the log at first start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Migrated {
    pub entries: u64,
    pub seen: u64,
    pub deadletters: u64,
}

/// An open store. Cheap to clone; clones share the databases.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    cache: sled::Db,
    log: log::Log,
    path: PathBuf,
    migrated: Option<Migrated>,
    /// The log was salvaged at this open: its indexes are to be rebuilt, not trusted.
    salvaged: bool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl Store {
    /// Opens or creates the store at `path`, checking the schema version and migrating a
    /// schema-1 store. Any damage is an error.
    pub fn open(path: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        probe_writable(path)?;
        let (log, created) = log::Log::open(&path.join(log::FILE_NAME), options.log_cache_bytes)?;
        let cache = open_cache(path, options)?;
        if !mark_matches(&log, &cache, false)? {
            return Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                detail: "the profile cache does not carry this store's mark: its files were replaced or read as an empty database".into(),
            });
        }
        Store::assemble(path, log, created, cache, false)
    }

    /// Opens the store like [`Store::open`], but damage does not stop the agent: a log redb
    /// cannot read, or a cache sled cannot open, is moved aside (into `{path}.corrupt-{time}`,
    /// or a `corrupt-{time}` directory inside `path` where the parent is not writable), a fresh
    /// one takes its place, and every intact record of the damaged log is carried over. A
    /// locked, unwritable, newer or foreign store is still an error: those are for a person.
    pub fn open_or_salvage(
        path: &Path,
        options: &StoreOptions,
        now: jiff::Timestamp,
    ) -> Result<(Store, Option<Salvaged>), StoreError> {
        probe_writable(path)?;
        let file = path.join(log::FILE_NAME);
        let mut reasons = Vec::new();
        let mut aside: Option<PathBuf> = None;
        let mut move_aside = |what: &[PathBuf]| -> Result<PathBuf, StoreError> {
            let dir = match &aside {
                Some(d) => d.clone(),
                None => corrupt_dir(path, now)?,
            };
            for p in what {
                if let Some(name) = p.file_name() {
                    std::fs::rename(p, dir.join(name)).map_err(|source| StoreError::Io {
                        path: p.clone(),
                        source,
                    })?;
                }
            }
            sync_dir(path)?;
            aside = Some(dir.clone());
            Ok(dir)
        };

        let (log, created, damaged_log) = match log::Log::open(&file, options.log_cache_bytes) {
            Ok((log, created)) => (log, created, None),
            Err(e) if e.is_unreadable() => {
                reasons.push(e.to_string());
                let dir = move_aside(std::slice::from_ref(&file))?;
                let (log, _) = log::Log::open(&file, options.log_cache_bytes)?;
                (log, true, Some(dir.join(log::FILE_NAME)))
            }
            Err(e) => return Err(e),
        };
        // The damaged log's records first: its meta holds the cache's mark.
        let carried = match &damaged_log {
            Some(damaged) => Some(carry_over(&log, damaged)?),
            None => None,
        };
        let attempt = std::panic::catch_unwind(|| open_cache(path, options));
        let mut cache = match attempt {
            Ok(Ok(cache)) => Some(cache),
            Ok(Err(e)) if !e.is_unreadable() => return Err(e),
            Ok(Err(e)) => {
                reasons.push(e.to_string());
                None
            }
            Err(panic) => {
                reasons.push(format!(
                    "the cache engine crashed reading {}: {}",
                    path.display(),
                    log::panic_text(&panic)
                ));
                None
            }
        };
        if let Some(c) = &cache
            && !mark_matches(&log, c, damaged_log.is_some())?
        {
            reasons.push(format!(
                "the profile cache at {} does not carry this store's mark (sled read its files as an empty database)",
                path.display()
            ));
            cache = None;
        }
        let cache_lost = cache.is_none();
        let cache = match cache {
            Some(c) => c,
            None => {
                let files = cache::sled_files(path).map_err(|source| StoreError::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                move_aside(&files)?;
                open_cache(path, options)?
            }
        };

        let mut salvaged = None;
        if let Some((records, report)) = carried {
            let events = log.view(LogTable::Outbox)?.len()?;
            salvaged = Some(Salvaged {
                moved_to: aside.clone().expect("moved above"),
                reason: reasons.join("; "),
                records,
                events,
                unreadable: report.unreadable,
                sample: report.sample,
                log_damaged: true,
                cache_lost,
            });
        } else if cache_lost {
            salvaged = Some(Salvaged {
                moved_to: aside.clone().expect("moved above"),
                reason: reasons.join("; "),
                records: 0,
                events: 0,
                unreadable: 0,
                sample: Vec::new(),
                log_damaged: false,
                cache_lost,
            });
        }
        let store = Store::assemble(path, log, created, cache, salvaged.is_some())?;
        Ok((store, salvaged))
    }

    fn assemble(
        path: &Path,
        log: log::Log,
        created: bool,
        cache: sled::Db,
        salvaged: bool,
    ) -> Result<Store, StoreError> {
        if created {
            // A new file's name is durable only with its directory.
            sync_dir(path)?;
        }
        let mut store = Store {
            inner: Arc::new(Inner {
                cache,
                log,
                path: path.to_path_buf(),
                migrated: None,
                salvaged,
            }),
        };
        let migrated = store.check_schema(salvaged)?;
        store.ensure_mark()?;
        if migrated.is_some() {
            Arc::get_mut(&mut store.inner)
                .expect("not shared yet")
                .migrated = migrated;
        }
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether the log was salvaged from a damaged file at this open (its records were carried
    /// over one by one; indexes over them must be checked).
    pub fn salvaged(&self) -> bool {
        self.inner.salvaged
    }

    /// What a migration from a schema-1 store carried over at this open, if one ran.
    pub fn migrated(&self) -> Option<Migrated> {
        self.inner.migrated
    }

    /// A named cache tree. Opening a tree is cheap after the first time.
    pub fn tree(&self, name: TreeName) -> Result<Tree, StoreError> {
        let inner = self
            .inner
            .cache
            .open_tree(name.as_str())
            .map_err(|e| cache::engine_error(&self.inner.path, e))?;
        Ok(Tree {
            inner,
            name: name.as_str(),
            path: self.inner.path.clone(),
        })
    }

    /// Runs `f` in one log transaction and commits it as `commit` says; nothing of it is kept
    /// when `f` fails. Hooks registered with [`LogWrite::after_commit`] run after the commit.
    /// Blocks on a durable commit's fsync: call it from a blocking context when that matters.
    pub fn write<'h, R>(
        &self,
        commit: Commit,
        f: impl for<'t> FnOnce(&mut LogWrite<'t, 'h>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        self.inner.log.write(commit, f)
    }

    /// A snapshot of one log table.
    pub fn view(&self, table: LogTable) -> Result<LogView, StoreError> {
        self.inner.log.view(table)
    }

    /// Makes every write so far durable, in both engines.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let store = self.clone();
        blocking(&self.inner.path, move || store.flush_blocking()).await
    }

    /// Blocking form of [`Store::flush`], for shutdown paths and tools without a runtime.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        self.write(Commit::Durable, |_| Ok(()))?;
        self.flush_cache_blocking()
    }

    /// Makes every cache write so far durable (the log is untouched).
    pub async fn flush_cache(&self) -> Result<(), StoreError> {
        let store = self.clone();
        blocking(&self.inner.path, move || store.flush_cache_blocking()).await
    }

    fn flush_cache_blocking(&self) -> Result<(), StoreError> {
        let path = &self.inner.path;
        self.inner
            .cache
            .flush()
            .map_err(|e| cache::engine_error(path, e))?;
        // sled's flush ends in sync_file_range on Linux: no metadata (a grown file's new
        // length), no device cache flush. An fsync of each of its files, and of the directory
        // for files it created or renamed (snapshots), makes this a durable point.
        let io = |p: &Path, source| StoreError::Io {
            path: p.to_path_buf(),
            source,
        };
        let mut dirs = vec![path.to_path_buf()];
        let files = cache::sled_files(path).map_err(|e| io(path, e))?;
        for p in files {
            if p.is_dir() {
                for entry in std::fs::read_dir(&p).map_err(|e| io(&p, e))? {
                    let entry = entry.map_err(|e| io(&p, e))?;
                    sync_file(&entry.path())?;
                }
                dirs.push(p);
            } else {
                sync_file(&p)?;
            }
        }
        for d in dirs {
            sync_dir(&d)?;
        }
        Ok(())
    }

    /// The journal's pending records (what the cache may not have on disk), oldest first.
    pub fn journal(&self) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let view = self.view(LogTable::Journal)?;
        let mut out = Vec::new();
        for item in view.iter()? {
            let item = item?;
            let seq = <[u8; 8]>::try_from(item.key())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            out.push((seq, item.value().to_vec()));
        }
        Ok(out)
    }

    /// Makes the cache durable, then drops the journal records it now holds. Returns how many
    /// were dropped.
    pub async fn checkpoint(&self) -> Result<u64, StoreError> {
        // Nothing owed (an idle store): no sled flush, and no blocking thread kept alive for it.
        if self.view(LogTable::Journal)?.is_empty()? {
            return Ok(0);
        }
        let store = self.clone();
        blocking(&self.inner.path, move || store.checkpoint_blocking()).await
    }

    pub fn checkpoint_blocking(&self) -> Result<u64, StoreError> {
        // Records below the mark were committed, with the cache writes they stand for, before
        // the mark was read: sequence numbers are taken inside write transactions, which hold
        // the writer lock.
        let mark = {
            let _writer = self
                .inner
                .log
                .writer
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.inner.log.next_journal.load(Ordering::SeqCst)
        };
        if self.view(LogTable::Journal)?.is_empty()? {
            return Ok(0);
        }
        self.flush_cache_blocking()?;
        // Lazy: a lost removal only means replaying idempotent work again.
        self.write(Commit::Lazy, |w| {
            let journal = w.table(LogTable::Journal)?;
            let keys: Vec<Vec<u8>> = journal
                .range(&[], Some(&mark.to_be_bytes()))?
                .map(|item| item.map(|i| i.key().to_vec()))
                .collect::<Result<_, _>>()?;
            for k in &keys {
                journal.remove(k)?;
            }
            Ok(keys.len() as u64)
        })
    }

    /// Bytes free for this process on the filesystem that holds the store.
    pub fn free_bytes(&self) -> Result<u64, StoreError> {
        let path = &self.inner.path;
        let stat = nix::sys::statvfs::statvfs(path).map_err(|e| StoreError::Io {
            path: path.clone(),
            source: std::io::Error::from(e),
        })?;
        Ok((stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64))
    }

    /// Bytes both databases occupy on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        let cache = self
            .inner
            .cache
            .size_on_disk()
            .map_err(|e| cache::engine_error(&self.inner.path, e))?;
        let log = std::fs::metadata(&self.inner.log.file)
            .map(|m| m.len())
            .unwrap_or(0);
        Ok(cache + log)
    }

    /// Checks the schema version; on a fresh log, migrates a schema-1 sled store or refuses
    /// foreign data.
    fn check_schema(&self, salvaged: bool) -> Result<Option<Migrated>, StoreError> {
        let path = &self.inner.path;
        let found = self
            .view(LogTable::Meta)?
            .get(SCHEMA_KEY)?
            .map(|v| v.bytes().to_vec());
        match found {
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_slice())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::UnknownSchema { path: path.clone() })?;
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        path: path.clone(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
                if found == 0 {
                    return Err(StoreError::UnknownSchema { path: path.clone() });
                }
                // A migration that committed but was cut before sled dropped its trees.
                self.drop_legacy_trees()?;
                Ok(None)
            }
            None => {
                let legacy_meta = self.legacy_tree("meta")?;
                let legacy_version = match &legacy_meta {
                    Some(meta) => meta
                        .get(SCHEMA_KEY)
                        .map_err(|e| cache::engine_error(path, e))?,
                    None => None,
                };
                let migrated = match legacy_version {
                    Some(v) if *v == 1u32.to_be_bytes() => Some(self.migrate_from_sled()?),
                    Some(v) => {
                        let found = <[u8; 4]>::try_from(&*v)
                            .map(u32::from_be_bytes)
                            .map_err(|_| StoreError::UnknownSchema { path: path.clone() })?;
                        return Err(if found > 1 {
                            StoreError::NewerSchema {
                                path: path.clone(),
                                found,
                                supported: SCHEMA_VERSION,
                            }
                        } else {
                            StoreError::UnknownSchema { path: path.clone() }
                        });
                    }
                    None if !salvaged && self.cache_holds_data()? => {
                        let ours = self
                            .inner
                            .cache
                            .contains_key(CACHE_MARK_KEY)
                            .map_err(|e| cache::engine_error(path, e))?;
                        if !ours {
                            return Err(StoreError::UnknownSchema { path: path.clone() });
                        }
                        tracing::warn!(
                            path = %path.display(),
                            "outbox.redb is new but the profile cache is from an earlier run: was the log file removed? Events it held are gone"
                        );
                        None
                    }
                    None => None,
                };
                self.write(Commit::Durable, |w| {
                    w.table(LogTable::Meta)?
                        .insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())
                })?;
                self.drop_legacy_trees()?;
                Ok(migrated)
            }
        }
    }

    /// Carries a schema-1 store's outbox, seen ids, dead letters and facts from sled into the
    /// log, in one durable commit. sled's trees are dropped only after it.
    fn migrate_from_sled(&self) -> Result<Migrated, StoreError> {
        let path = &self.inner.path;
        let sled_err = |e| cache::engine_error(path, e);
        let mut migrated = Migrated::default();
        let trees: Vec<(&str, Option<sled::Tree>)> = LEGACY_TREES
            .iter()
            .map(|name| Ok((*name, self.legacy_tree(name)?)))
            .collect::<Result<_, StoreError>>()?;
        self.write(Commit::Durable, |w| {
            for (name, tree) in &trees {
                let Some(tree) = tree else { continue };
                for item in tree.iter() {
                    let (k, v) = item.map_err(sled_err)?;
                    let table = match (*name, k.first()) {
                        ("meta", _) if &*k == SCHEMA_KEY => continue,
                        ("meta", _) => LogTable::Meta,
                        ("deadletter", _) => {
                            migrated.deadletters += 1;
                            LogTable::DeadLetters
                        }
                        // The schema-1 outbox tree: entries under 0x00, seen ids under 0x02
                        // and 0x03; the log keeps the same keys in two tables.
                        ("outbox", Some(0x00)) => {
                            migrated.entries += 1;
                            LogTable::Outbox
                        }
                        ("outbox", Some(0x02)) => {
                            migrated.seen += 1;
                            LogTable::Seen
                        }
                        ("outbox", _) => LogTable::Seen,
                        _ => continue,
                    };
                    w.table(table)?.insert(&k, &v)?;
                }
            }
            w.table(LogTable::Meta)?
                .insert(MIGRATED_KEY, &1u32.to_be_bytes())?;
            Ok(())
        })?;
        tracing::info!(
            events = migrated.entries,
            seen_ids = migrated.seen,
            dead_letters = migrated.deadletters,
            "carried the outbox of a schema-1 store from sled into outbox.redb"
        );
        Ok(migrated)
    }

    fn legacy_tree(&self, name: &str) -> Result<Option<sled::Tree>, StoreError> {
        let cache = &self.inner.cache;
        if !cache.tree_names().iter().any(|n| &**n == name.as_bytes()) {
            return Ok(None);
        }
        cache
            .open_tree(name)
            .map(Some)
            .map_err(|e| cache::engine_error(&self.inner.path, e))
    }

    fn drop_legacy_trees(&self) -> Result<(), StoreError> {
        let mut dropped = false;
        for name in LEGACY_TREES {
            if self.legacy_tree(name)?.is_some() {
                self.inner
                    .cache
                    .drop_tree(name)
                    .map_err(|e| cache::engine_error(&self.inner.path, e))?;
                dropped = true;
            }
        }
        if dropped {
            self.flush_cache_blocking()?;
        }
        Ok(())
    }

    fn cache_holds_data(&self) -> Result<bool, StoreError> {
        let cache = &self.inner.cache;
        if !cache.is_empty() {
            return Ok(true);
        }
        for name in cache.tree_names() {
            let tree = cache
                .open_tree(&name)
                .map_err(|e| cache::engine_error(&self.inner.path, e))?;
            if !tree.is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Gives a new store its cache mark, in the cache first and then the log (a cut in between
    /// leaves the log without one, which adopts the cache's at the next open).
    fn ensure_mark(&self) -> Result<(), StoreError> {
        let path = &self.inner.path;
        if self.view(LogTable::Meta)?.get(CACHE_MARK_KEY)?.is_some() {
            return Ok(());
        }
        let cache = &self.inner.cache;
        let mark = match cache
            .get(CACHE_MARK_KEY)
            .map_err(|e| cache::engine_error(path, e))?
        {
            Some(m) => m.to_vec(),
            None => {
                let made: [u8; 16] = rand::random();
                cache
                    .insert(CACHE_MARK_KEY, &made[..])
                    .map_err(|e| cache::engine_error(path, e))?;
                self.flush_cache_blocking()?;
                made.to_vec()
            }
        };
        self.write(Commit::Durable, |w| {
            w.table(LogTable::Meta)?.insert(CACHE_MARK_KEY, &mark)
        })
    }

    /// Writes the schema version, for tests of the version check.
    #[doc(hidden)]
    pub fn set_schema_version_for_test(&self, version: u32) -> Result<(), StoreError> {
        self.write(Commit::Durable, |w| {
            w.table(LogTable::Meta)?
                .insert(SCHEMA_KEY, &version.to_be_bytes())
        })
    }
}

/// Whether the cache is the one the log belongs with: it carries the log's mark, or the log has
/// none yet (a new or migrated store, which [`Store::ensure_mark`] completes). When the log
/// itself was damaged and salvaged without a mark, only a cache with a mark of its own is
/// trusted: sled reads unreadable files as an empty database, and nothing else tells.
fn mark_matches(log: &log::Log, cache: &sled::Db, log_damaged: bool) -> Result<bool, StoreError> {
    let found = cache
        .get(CACHE_MARK_KEY)
        .map_err(|e| cache::engine_error(&log.file, e))?;
    match log
        .view(LogTable::Meta)?
        .get(CACHE_MARK_KEY)?
        .map(|v| v.bytes().to_vec())
    {
        Some(expected) => Ok(found.is_some_and(|f| *f == *expected)),
        None => Ok(!log_damaged || found.is_some()),
    }
}

/// Copies every intact record of the damaged log file into the fresh log: batched, lazily
/// committed, then made durable once. Returns how many distinct records it now holds.
fn carry_over(log: &log::Log, damaged: &Path) -> Result<(u64, ScanReport), StoreError> {
    let mut pending = Vec::new();
    let flush = |pending: &mut Vec<log::Framed>| -> Result<(), StoreError> {
        if pending.is_empty() {
            return Ok(());
        }
        log.write(Commit::Lazy, |w| {
            for r in pending.iter() {
                w.table(r.table)?.insert(&r.key, &r.value)?;
            }
            Ok(())
        })?;
        pending.clear();
        Ok(())
    };
    let report = salvage::scan(damaged, |record| {
        pending.push(record);
        if pending.len() >= 1024 {
            flush(&mut pending)?;
        }
        Ok(())
    })?;
    flush(&mut pending)?;
    log.write(Commit::Durable, |_| Ok(()))?;
    let mut records = 0;
    for table in LogTable::ALL.into_iter().filter(|t| t.framed()) {
        records += log.view(table)?.len()?;
    }
    Ok((records, report))
}

fn open_cache(path: &Path, options: &StoreOptions) -> Result<sled::Db, StoreError> {
    let db = match cache::open(path, options.cache_bytes, BACKGROUND_FLUSH_MS) {
        Ok(db) => db,
        Err(e) if cache::repair_conf(path) => {
            tracing::warn!(path = %path.display(), error = %e, "sled's settings file was torn; wrote it again");
            cache::open(path, options.cache_bytes, BACKGROUND_FLUSH_MS)?
        }
        Err(e) => return Err(e),
    };
    // sled writes its settings file and creates its files without an fsync; make them durable
    // before anything relies on them.
    for p in cache::sled_files(path).map_err(|source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    })? {
        if p.is_file() {
            sync_file(&p)?;
        }
    }
    sync_dir(path)?;
    Ok(db)
}

/// Where damaged files go: a sibling `{path}.corrupt-{time}` directory, or `corrupt-{time}`
/// inside `path` when the parent is not writable (a systemd StateDirectory, a mount point).
fn corrupt_dir(path: &Path, now: jiff::Timestamp) -> Result<PathBuf, StoreError> {
    let stamp = now.strftime("%Y%m%dT%H%M%SZ").to_string();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "store".into());
    let sibling = path.with_file_name(format!("{name}.corrupt-{stamp}"));
    if std::fs::create_dir_all(&sibling).is_ok() {
        if let Some(parent) = path.parent() {
            let _ = sync_dir(parent);
        }
        return Ok(sibling);
    }
    let inside = path.join(format!("corrupt-{stamp}"));
    std::fs::create_dir_all(&inside).map_err(|source| StoreError::Io {
        path: inside.clone(),
        source,
    })?;
    Ok(inside)
}

fn sync_file(p: &Path) -> Result<(), StoreError> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(|source| StoreError::Io {
            path: p.to_path_buf(),
            source,
        })
}

fn sync_dir(p: &Path) -> Result<(), StoreError> {
    sync_file(p)
}

async fn blocking<R: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<R, StoreError> + Send + 'static,
) -> Result<R, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Engine {
            path: path.to_path_buf(),
            detail: format!("storage task failed: {e}"),
        })?
}

/// Creates the directory (and makes the new names durable), and gives retail IT a message that
/// names the path when it is read-only or foreign-owned; the engines' own errors are vague.
fn probe_writable(path: &Path) -> Result<(), StoreError> {
    let unwritable = |source| StoreError::Unwritable {
        path: path.to_path_buf(),
        source,
    };
    // Each new directory's entry is durable only with its parent's fsync.
    let mut created = Vec::new();
    let mut p = path;
    while !p.exists() {
        created.push(p.to_path_buf());
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => p = parent,
            _ => break,
        }
    }
    std::fs::create_dir_all(path).map_err(unwritable)?;
    for dir in created.iter().rev() {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    let probe = path.join(".storelink-write-probe");
    std::fs::write(&probe, b"ok").map_err(unwritable)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open(dir, &StoreOptions::default())
    }

    fn garble(dir: &Path) {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for entry in std::fs::read_dir(dir).unwrap() {
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
    }

    #[test]
    fn an_unreadable_store_is_moved_aside_and_a_fresh_one_opened() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("data");
        {
            let store = open(&dir).unwrap();
            let t = store.tree(TreeName::Profiles).unwrap();
            for i in 0u32..2000 {
                t.insert(i.to_be_bytes(), vec![7u8; 200]).unwrap();
            }
            store.flush_blocking().unwrap();
        }
        // Garbage over every file, as a failing card or a bad copy leaves it.
        garble(&dir);
        let now: jiff::Timestamp = "2026-11-23T03:00:00Z".parse().unwrap();
        let (store, salvaged) =
            Store::open_or_salvage(&dir, &StoreOptions::default(), now).unwrap();
        let s = salvaged.expect("the garbage was noticed");
        assert_eq!(
            s.moved_to,
            parent.path().join("data.corrupt-20261123T030000Z")
        );
        assert!(s.moved_to.join("db").exists(), "sled's files are kept");
        assert!(s.moved_to.join(log::FILE_NAME).exists(), "so is the log");
        assert!(s.cache_lost);
        assert_eq!(s.events, 0);
        assert!(store.tree(TreeName::Profiles).unwrap().is_empty());
        drop(store);
        // A healthy store opens as it is.
        let (_store, again) = Store::open_or_salvage(&dir, &StoreOptions::default(), now).unwrap();
        assert!(again.is_none());
    }

    #[test]
    fn fresh_store_gets_the_schema_version_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path()).unwrap();
            store
                .write(Commit::Lazy, |w| {
                    w.table(LogTable::Outbox)?.insert(b"k", b"v")
                })
                .unwrap();
            store
                .tree(TreeName::Offers)
                .unwrap()
                .insert(b"o", b"1")
                .unwrap();
            store.flush_blocking().unwrap();
        }
        let store = open(dir.path()).unwrap();
        let outbox = store.view(LogTable::Outbox).unwrap();
        assert_eq!(outbox.get(b"k").unwrap().unwrap().bytes(), b"v");
        let meta = store.view(LogTable::Meta).unwrap();
        assert_eq!(
            meta.get(SCHEMA_KEY).unwrap().unwrap().bytes(),
            &SCHEMA_VERSION.to_be_bytes()
        );
        assert_eq!(
            &*store
                .tree(TreeName::Offers)
                .unwrap()
                .get(b"o")
                .unwrap()
                .unwrap(),
            b"1"
        );
    }

    #[test]
    fn a_failed_write_keeps_nothing_and_runs_no_hook() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path()).unwrap();
        let ran = std::cell::Cell::new(false);
        let err = store.write(Commit::Durable, |w| {
            w.table(LogTable::Outbox)?.insert(b"a", b"1")?;
            w.journal(b"owed")?;
            w.after_commit(|| ran.set(true));
            Err::<(), _>(StoreError::Engine {
                path: dir.path().to_path_buf(),
                detail: "refused".into(),
            })
        });
        assert!(err.is_err());
        assert!(!ran.get());
        assert!(store.view(LogTable::Outbox).unwrap().is_empty().unwrap());
        assert!(store.journal().unwrap().is_empty());
        store
            .write(Commit::Durable, |w| {
                w.journal(b"owed")?;
                w.after_commit(|| ran.set(true));
                Ok(())
            })
            .unwrap();
        assert!(ran.get());
        assert_eq!(store.journal().unwrap(), [(1, b"owed".to_vec())]);
    }

    #[test]
    fn a_checkpoint_drops_only_what_it_made_durable() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path()).unwrap();
            store
                .write(Commit::Durable, |w| {
                    w.journal(b"one")?;
                    w.journal(b"two")
                })
                .unwrap();
            assert_eq!(store.checkpoint_blocking().unwrap(), 2);
            store
                .write(Commit::Durable, |w| w.journal(b"three"))
                .unwrap();
            store.flush_blocking().unwrap();
        }
        let store = open(dir.path()).unwrap();
        assert_eq!(store.journal().unwrap(), [(3, b"three".to_vec())]);
        store
            .write(Commit::Durable, |w| w.journal(b"four"))
            .unwrap();
        assert_eq!(store.journal().unwrap().last().unwrap().0, 4);
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
        let t = store.tree(TreeName::Presence).unwrap();
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

    #[test]
    fn a_torn_sled_settings_file_is_written_again() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(dir.path()).unwrap();
            store
                .tree(TreeName::Profiles)
                .unwrap()
                .insert(b"p", b"1")
                .unwrap();
            store.flush_blocking().unwrap();
        }
        let conf = dir.path().join("conf");
        let bytes = std::fs::read(&conf).unwrap();
        std::fs::write(&conf, &bytes[..bytes.len() - 2]).unwrap();
        let store = open(dir.path()).unwrap();
        assert_eq!(
            &*store
                .tree(TreeName::Profiles)
                .unwrap()
                .get(b"p")
                .unwrap()
                .unwrap(),
            b"1"
        );
    }
}
