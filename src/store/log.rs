//! The durable log: the outbox, the seen-id index, the dead letters, agent facts and the
//! journal of work still owed to the profile cache, in one redb file (`outbox.redb`).
//!
//! redb is the crash-safe engine: copy-on-write B-trees with checksums, a commit that is
//! durable when it returns ([`Commit::Durable`]: one `fdatasync`), and commits that are merely
//! visible ([`Commit::Lazy`]) and become durable with the next durable one. A power cut rolls
//! the file back to the last durable commit, never to something in between.
//!
//! Invariants:
//! - All writes go through [`super::Store::write`]: one transaction, committed whole or not at
//!   all, with hooks ([`LogWrite::after_commit`]) that update in-memory state only once the
//!   commit succeeded. Writers are serialised (redb allows one at a time); the hooks run before
//!   the next writer starts, so state computed inside a transaction is never applied out of
//!   order.
//! - Values of the tables that hold records ([`LogTable::framed`]) are stored in a frame
//!   (magic, table, key, value, CRC-32), so that [`super::salvage`] can find every intact
//!   record in a damaged file by scanning its bytes, whatever happened to redb's own pages.
//!   The seen-id index is not framed: it is rebuilt from the entries it indexes.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use super::StoreError;

/// Name of the log file inside `storage.path`.
pub const FILE_NAME: &str = "outbox.redb";

/// The log's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogTable {
    /// Events bound for central, until central acknowledges them.
    Outbox,
    /// Every event id the outbox accepted, for de-duplication (rebuilt from the outbox).
    Seen,
    /// Rejected input with its raw bytes and the reason.
    DeadLetters,
    /// Schema version and small agent-wide facts.
    Meta,
    /// Work owed to the profile cache, kept until the cache has it on disk.
    Journal,
    /// Which lifecycle triggers fired for whom (see [`crate::occasions`]).
    Occasions,
}

const TABLE_COUNT: usize = 6;

impl LogTable {
    pub const ALL: [LogTable; TABLE_COUNT] = [
        LogTable::Outbox,
        LogTable::Seen,
        LogTable::DeadLetters,
        LogTable::Meta,
        LogTable::Journal,
        LogTable::Occasions,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LogTable::Outbox => "outbox",
            LogTable::Seen => "seen",
            LogTable::DeadLetters => "deadletters",
            LogTable::Meta => "meta",
            LogTable::Journal => "journal",
            LogTable::Occasions => "occasions",
        }
    }

    /// Whether its values are framed for salvage.
    pub fn framed(self) -> bool {
        !matches!(self, LogTable::Seen)
    }

    fn id(self) -> u8 {
        self as u8
    }

    pub(super) fn from_id(id: u8) -> Option<LogTable> {
        LogTable::ALL.get(id as usize).copied()
    }

    fn definition(self) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
        TableDefinition::new(self.name())
    }
}

/// How a write transaction is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// On disk when the commit returns: what anything acknowledged goes through.
    Durable,
    /// Visible at once, on disk with the next durable commit. For work whose loss only means
    /// doing it again: an acknowledgement's removal (a resend with the same id), an expiry.
    Lazy,
}

/// The frame around a record value: `MAGIC ‖ table ‖ key len (u16 BE) ‖ key ‖ value len (u32
/// BE) ‖ value ‖ CRC-32 (LE) of everything from the table byte`. The magic is not valid UTF-8,
/// so it cannot start inside the JSON that most values are.
pub(super) const MAGIC: [u8; 4] = [0xF3, 0x5A, 0x1C, 0xE7];

/// Larger than any value the agent writes (MQTT packets are capped at 4 MiB); a length beyond it
/// is damage, not a record.
pub(super) const MAX_FRAME: usize = 64 << 20;

pub(super) const FRAME_OVERHEAD: usize = 4 + 1 + 2 + 4 + 4;

#[cfg(test)]
pub(super) fn frame(table: LogTable, key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; FRAME_OVERHEAD + key.len() + value.len()];
    write_frame(&mut f, table, key, value);
    f
}

/// Writes the frame of `key`/`value` into `out`, which is exactly as long as the frame.
fn write_frame(out: &mut [u8], table: LogTable, key: &[u8], value: &[u8]) {
    let (magic, rest) = out.split_at_mut(4);
    magic.copy_from_slice(&MAGIC);
    rest[0] = table.id();
    rest[1..3].copy_from_slice(&(key.len() as u16).to_be_bytes());
    rest[3..3 + key.len()].copy_from_slice(key);
    let at = 3 + key.len();
    rest[at..at + 4].copy_from_slice(&(value.len() as u32).to_be_bytes());
    rest[at + 4..at + 4 + value.len()].copy_from_slice(value);
    let crc_at = at + 4 + value.len();
    let crc = crc32fast::hash(&rest[..crc_at]);
    rest[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// The value inside a frame that redb stored (redb's checksums vouch for it; salvage checks
/// the CRC itself).
fn unframe(framed: &[u8]) -> &[u8] {
    let key_len = framed
        .get(5..7)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]) as usize);
    let start = 4 + 1 + 2 + key_len + 4;
    let end = framed.len().saturating_sub(4);
    framed.get(start..end).unwrap_or(&[])
}

/// A record found by scanning raw bytes: a frame whose CRC holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Framed {
    pub table: LogTable,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
}

/// What reading a frame at the start of `bytes` found.
pub(super) enum FrameRead {
    /// An intact record, and how many bytes it spans.
    Record(Framed, usize),
    /// The frame runs past the end of `bytes`; it needs this many.
    Short(usize),
    /// Not a record: a damaged frame, or the magic by chance.
    Broken,
}

pub(super) fn read_frame(bytes: &[u8]) -> FrameRead {
    if bytes.len() < FRAME_OVERHEAD {
        return FrameRead::Short(FRAME_OVERHEAD);
    }
    if bytes[..4] != MAGIC {
        return FrameRead::Broken;
    }
    let Some(table) = LogTable::from_id(bytes[4]).filter(|t| t.framed()) else {
        return FrameRead::Broken;
    };
    let key_len = u16::from_be_bytes([bytes[5], bytes[6]]) as usize;
    let value_at = 7 + key_len + 4;
    if bytes.len() < value_at {
        return FrameRead::Short(value_at + 4);
    }
    let value_len =
        u32::from_be_bytes(bytes[7 + key_len..value_at].try_into().expect("four bytes")) as usize;
    let Some(end) = value_at
        .checked_add(value_len)
        .and_then(|e| e.checked_add(4))
    else {
        return FrameRead::Broken;
    };
    if end > MAX_FRAME {
        return FrameRead::Broken;
    }
    if bytes.len() < end {
        return FrameRead::Short(end);
    }
    let crc = u32::from_le_bytes(bytes[end - 4..end].try_into().expect("four bytes"));
    if crc32fast::hash(&bytes[4..end - 4]) != crc {
        return FrameRead::Broken;
    }
    FrameRead::Record(
        Framed {
            table,
            key: bytes[7..7 + key_len].to_vec(),
            value: bytes[value_at..value_at + value_len].to_vec(),
        },
        end,
    )
}

/// The open redb database.
pub(super) struct Log {
    pub db: redb::Database,
    pub file: PathBuf,
    /// Held from the start of a write transaction until its hooks have run.
    pub writer: Mutex<()>,
    pub next_journal: AtomicU64,
}

impl Log {
    /// Opens or creates the log file. A file redb cannot read is [`StoreError::Corrupt`] (also
    /// when redb panics reading it); the caller decides about salvage.
    pub fn open(file: &Path, cache_bytes: u64) -> Result<(Log, bool), StoreError> {
        let created = !file.exists();
        let mut builder = redb::Builder::new();
        // Verify every page's checksum at open, not only after a crash: a file damaged while
        // the agent was stopped is then an error here, where it can be salvaged, rather than a
        // panic on some later read. It reads the whole file, which is small unless central has
        // been away for long.
        builder
            .set_cache_size(cache_bytes as usize)
            .set_check_integrity_on_open(true);
        let opened =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.create(file)));
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e)) => return Err(database_error(file, e)),
            Err(panic) => {
                return Err(StoreError::Corrupt {
                    path: file.to_path_buf(),
                    detail: format!("the log engine crashed reading it: {}", panic_text(&panic)),
                });
            }
        };
        // Creates the tables at the first open, so reads never meet a missing one.
        let txn = db.begin_write().map_err(|e| redb_error(file, e))?;
        for table in LogTable::ALL {
            txn.open_table(table.definition())
                .map_err(|e| redb_error(file, e))?;
        }
        txn.commit().map_err(|e| redb_error(file, e))?;
        let next_journal = {
            let read = db.begin_read().map_err(|e| redb_error(file, e))?;
            let table = read
                .open_table(LogTable::Journal.definition())
                .map_err(|e| redb_error(file, e))?;
            let last = table.last().map_err(|e| redb_error(file, e))?;
            last.and_then(|(k, _)| <[u8; 8]>::try_from(k.value()).ok())
                .map_or(1, |k| u64::from_be_bytes(k) + 1)
        };
        Ok((
            Log {
                db,
                file: file.to_path_buf(),
                writer: Mutex::new(()),
                next_journal: AtomicU64::new(next_journal),
            },
            created,
        ))
    }

    pub fn write<'h, R>(
        &self,
        commit: Commit,
        f: impl for<'t> FnOnce(&mut LogWrite<'t, 'h>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let file = &self.file;
        // A panic in some writer must not stop every later one; redb aborts that transaction.
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut txn = self.db.begin_write().map_err(|e| redb_error(file, e))?;
        if commit == Commit::Lazy {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| redb_error(file, e))?;
        }
        let (result, hooks) = {
            let mut w = LogWrite {
                txn: &txn,
                tables: Default::default(),
                hooks: Vec::new(),
                file,
                next_journal: &self.next_journal,
                journal_at_start: self.next_journal.load(Ordering::SeqCst),
            };
            match f(&mut w) {
                Ok(r) => (r, std::mem::take(&mut w.hooks)),
                Err(e) => {
                    // Journal sequence numbers taken by the aborted transaction are reused.
                    self.next_journal
                        .store(w.journal_at_start, Ordering::SeqCst);
                    return Err(e);
                }
            }
        };
        txn.commit().map_err(|e| redb_error(file, e))?;
        for hook in hooks {
            hook();
        }
        Ok(result)
    }

    /// A consistent snapshot of one table.
    pub fn view(&self, table: LogTable) -> Result<LogView, StoreError> {
        let file = &self.file;
        let read = self.db.begin_read().map_err(|e| redb_error(file, e))?;
        let inner = read
            .open_table(table.definition())
            .map_err(|e| redb_error(file, e))?;
        Ok(LogView {
            inner,
            table,
            file: file.clone(),
        })
    }
}

/// An open write transaction, handed to the closure of [`super::Store::write`]. `'t` is the
/// transaction's; `'h` is what the commit hooks may borrow.
pub struct LogWrite<'t, 'h> {
    txn: &'t redb::WriteTransaction,
    tables: [Option<LogTableMut<'t>>; TABLE_COUNT],
    hooks: Vec<Box<dyn FnOnce() + 'h>>,
    file: &'t Path,
    next_journal: &'t AtomicU64,
    journal_at_start: u64,
}

impl<'t, 'h> LogWrite<'t, 'h> {
    /// One table of the transaction; opened on first use and kept open.
    pub fn table(&mut self, table: LogTable) -> Result<&mut LogTableMut<'t>, StoreError> {
        let slot = &mut self.tables[table as usize];
        if slot.is_none() {
            let inner = self
                .txn
                .open_table(table.definition())
                .map_err(|e| redb_error(self.file, e))?;
            *slot = Some(LogTableMut {
                inner,
                table,
                file: self.file,
            });
        }
        Ok(slot.as_mut().expect("opened above"))
    }

    /// Two tables at once, for writes that move between them.
    pub fn tables(
        &mut self,
        a: LogTable,
        b: LogTable,
    ) -> Result<[&mut LogTableMut<'t>; 2], StoreError> {
        assert_ne!(a, b, "two different tables");
        self.table(a)?;
        self.table(b)?;
        let [x, y] = self
            .tables
            .get_disjoint_mut([a as usize, b as usize])
            .expect("distinct indices");
        Ok([
            x.as_mut().expect("opened above"),
            y.as_mut().expect("opened above"),
        ])
    }

    /// Runs `f` once the transaction is committed, before the next writer starts; never if it
    /// is not.
    pub fn after_commit(&mut self, f: impl FnOnce() + 'h) {
        self.hooks.push(Box::new(f));
    }

    /// Appends a record to the journal of work owed to the profile cache (see
    /// [`super::Store::checkpoint`]).
    pub fn journal(&mut self, record: &[u8]) -> Result<(), StoreError> {
        let seq = self.next_journal.fetch_add(1, Ordering::SeqCst);
        self.table(LogTable::Journal)?
            .insert(&seq.to_be_bytes(), record)
    }
}

/// A table inside a write transaction.
pub struct LogTableMut<'a> {
    inner: redb::Table<'a, &'static [u8], &'static [u8]>,
    table: LogTable,
    file: &'a Path,
}

impl LogTableMut<'_> {
    pub fn insert(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let result = if self.table.framed() {
            // Written in place: no copy of the value on its way in.
            let len = FRAME_OVERHEAD + key.len() + value.len();
            self.inner.insert_reserve(key, len).map(|mut slot| {
                write_frame(slot.as_mut(), self.table, key, value);
            })
        } else {
            self.inner.insert(key, value).map(|_| ())
        };
        result.map_err(|e| redb_error(self.file, e))
    }

    /// Removes `key`; whether it was there.
    pub fn remove(&mut self, key: &[u8]) -> Result<bool, StoreError> {
        self.inner
            .remove(key)
            .map(|old| old.is_some())
            .map_err(|e| redb_error(self.file, e))
    }

    /// Removes `key` and hands its value to `f` on the way out: one lookup where a read and a
    /// removal would take two.
    pub fn remove_with<R>(
        &mut self,
        key: &[u8],
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>, StoreError> {
        let framed = self.table.framed();
        let old = self
            .inner
            .remove(key)
            .map_err(|e| redb_error(self.file, e))?;
        Ok(old.map(|guard| {
            let raw = guard.value();
            f(if framed { unframe(raw) } else { raw })
        }))
    }

    /// Removes every entry with a key in `[from, to]`, handing each value to `f` on the way
    /// out; how many there were. One pass over the leaves, each rebuilt once: for a run of
    /// neighbouring keys far cheaper than a removal per key, which rebuilds a leaf each time.
    pub fn remove_range_with(
        &mut self,
        from: &[u8],
        to: &[u8],
        mut f: impl FnMut(&[u8]),
    ) -> Result<usize, StoreError> {
        let framed = self.table.framed();
        let mut removed = 0;
        self.inner
            .retain_in(from..=to, |_, raw| {
                f(if framed { unframe(raw) } else { raw });
                removed += 1;
                false
            })
            .map_err(|e| redb_error(self.file, e))?;
        Ok(removed)
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<LogValue<'_>>, StoreError> {
        get(&self.inner, self.table, key, self.file)
    }

    pub fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.get(key)?.is_some())
    }

    /// Entries with keys in `[from, to)` (`to` = `None`: to the end), in key order; reversible.
    pub fn range(&self, from: &[u8], to: Option<&[u8]>) -> Result<LogRange<'_>, StoreError> {
        range(&self.inner, self.table, from, to, self.file)
    }

    /// Every entry, in key order.
    pub fn iter_all(&self) -> Result<LogRange<'_>, StoreError> {
        self.range(&[], None)
    }

    pub fn len(&self) -> Result<u64, StoreError> {
        self.inner.len().map_err(|e| redb_error(self.file, e))
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }
}

/// A read-only snapshot of one table: what it held when the view was taken, whatever is
/// written after.
pub struct LogView {
    inner: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    table: LogTable,
    file: PathBuf,
}

impl LogView {
    pub fn get(&self, key: &[u8]) -> Result<Option<LogValue<'_>>, StoreError> {
        get(&self.inner, self.table, key, &self.file)
    }

    pub fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.get(key)?.is_some())
    }

    pub fn range(&self, from: &[u8], to: Option<&[u8]>) -> Result<LogRange<'_>, StoreError> {
        range(&self.inner, self.table, from, to, &self.file)
    }

    /// Every entry, in key order.
    pub fn iter(&self) -> Result<LogRange<'_>, StoreError> {
        self.range(&[], None)
    }

    pub fn len(&self) -> Result<u64, StoreError> {
        self.inner.len().map_err(|e| redb_error(&self.file, e))
    }

    pub fn is_empty(&self) -> Result<bool, StoreError> {
        Ok(self.len()? == 0)
    }
}

fn get<'t>(
    table: &'t impl ReadableTable<&'static [u8], &'static [u8]>,
    which: LogTable,
    key: &[u8],
    file: &Path,
) -> Result<Option<LogValue<'t>>, StoreError> {
    table
        .get(key)
        .map(|v| {
            v.map(|guard| LogValue {
                guard,
                framed: which.framed(),
            })
        })
        .map_err(|e| redb_error(file, e))
}

fn range<'t>(
    table: &'t impl ReadableTable<&'static [u8], &'static [u8]>,
    which: LogTable,
    from: &[u8],
    to: Option<&[u8]>,
    file: &Path,
) -> Result<LogRange<'t>, StoreError> {
    let inner = match to {
        Some(to) => table.range::<&[u8]>(from..to),
        None => table.range::<&[u8]>(from..),
    }
    .map_err(|e| redb_error(file, e))?;
    Ok(LogRange {
        inner,
        framed: which.framed(),
        file: file.to_path_buf(),
    })
}

/// A value read from the log, without copying.
pub struct LogValue<'a> {
    guard: redb::AccessGuard<'a, &'static [u8]>,
    framed: bool,
}

impl LogValue<'_> {
    pub fn bytes(&self) -> &[u8] {
        let raw = self.guard.value();
        if self.framed { unframe(raw) } else { raw }
    }
}

/// One entry of a [`LogRange`].
pub struct LogItem<'a> {
    key: redb::AccessGuard<'a, &'static [u8]>,
    value: redb::AccessGuard<'a, &'static [u8]>,
    framed: bool,
}

impl LogItem<'_> {
    pub fn key(&self) -> &[u8] {
        self.key.value()
    }

    pub fn value(&self) -> &[u8] {
        let raw = self.value.value();
        if self.framed { unframe(raw) } else { raw }
    }
}

/// Entries of a table in key order (or reversed).
pub struct LogRange<'a> {
    inner: redb::Range<'a, &'static [u8], &'static [u8]>,
    framed: bool,
    file: PathBuf,
}

impl<'a> Iterator for LogRange<'a> {
    type Item = Result<LogItem<'a>, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        let framed = self.framed;
        self.inner.next().map(|r| {
            r.map(|(key, value)| LogItem { key, value, framed })
                .map_err(|e| redb_error(&self.file, e))
        })
    }
}

impl DoubleEndedIterator for LogRange<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        let framed = self.framed;
        self.inner.next_back().map(|r| {
            r.map(|(key, value)| LogItem { key, value, framed })
                .map_err(|e| redb_error(&self.file, e))
        })
    }
}

pub(super) fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)")
        .to_string()
}

fn database_error(file: &Path, e: redb::DatabaseError) -> StoreError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen | redb::DatabaseError::LockProtocolMismatch => {
            StoreError::Locked {
                path: file.to_path_buf(),
            }
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(source))
            if source.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            StoreError::Unwritable {
                path: file.to_path_buf(),
                source,
            }
        }
        other => redb_error(file, other),
    }
}

/// Any redb error, classified: unreadable data is [`StoreError::Corrupt`], I/O stays I/O.
pub(super) fn redb_error(file: &Path, e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Corrupted(detail) => StoreError::Corrupt {
            path: file.to_path_buf(),
            detail,
        },
        redb::Error::Io(source) => StoreError::Io {
            path: file.to_path_buf(),
            source,
        },
        redb::Error::DatabaseAlreadyOpen => StoreError::Locked {
            path: file.to_path_buf(),
        },
        other => StoreError::Engine {
            path: file.to_path_buf(),
            detail: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_reads_back_and_any_flipped_byte_breaks_it() {
        let f = frame(LogTable::Outbox, b"key", b"value bytes");
        match read_frame(&f) {
            FrameRead::Record(r, len) => {
                assert_eq!(len, f.len());
                assert_eq!(r.table, LogTable::Outbox);
                assert_eq!(r.key, b"key");
                assert_eq!(r.value, b"value bytes");
            }
            _ => panic!("an intact frame"),
        }
        assert_eq!(unframe(&f), b"value bytes");
        for i in 4..f.len() {
            let mut bad = f.clone();
            bad[i] ^= 0x10;
            assert!(
                !matches!(read_frame(&bad), FrameRead::Record(..)),
                "byte {i} flipped went unnoticed"
            );
        }
        assert!(matches!(read_frame(&f[..f.len() - 1]), FrameRead::Short(n) if n == f.len()));
    }
}
