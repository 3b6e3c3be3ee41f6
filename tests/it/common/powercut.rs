//! A FUSE filesystem that can lose power: it passes everything through to a backing directory
//! and remembers, in an undo log, what each change not yet made durable overwrote. A power cut
//! (after the test has SIGKILLed the program using it) unmounts, rolls the backing directory
//! back to what a disk would hold after losing power, and mounts again on what survived.
//!
//! The durability model is POSIX's strict one, which is what an SD card or cheap SSD behind a
//! journaling filesystem promises and no more:
//! - a write (or a size change, or an fallocate that grows the file) is durable once that file
//!   is `fsync`ed or `fdatasync`ed (FUSE `fsync`); `sync_file_range`, `msync` of nothing and
//!   closing the file are not fsyncs and make nothing durable;
//! - a name change (create, mkdir, unlink, rmdir, rename, including a rename over another
//!   file) is durable once its parent directory is fsynced (FUSE `fsyncdir`); a rename
//!   between two directories needs both. fsyncing a file does not make its name durable.
//!
//! Invariants:
//! - Changes reach the backing directory at once, so reads see them; undo records are kept
//!   per change in one global order and applied in reverse, so rolling back restores exactly
//!   the state at the last durable point of every file and directory.
//! - Nothing that an unsynced change replaced is destroyed before the cut: unlinked files,
//!   removed directories and rename victims are moved into a hidden graveyard in the backing
//!   directory (never shown through the mount) so they can be put back.
//! - `cut` runs only while nothing is mounted: the session is unmounted and its thread
//!   joined first, so no request is half-handled while the log is applied, and mounting
//!   again drops the kernel's page cache for the filesystem.
//! - Torn mode is seeded by the caller's RNG; with the same seed and the same sequence of
//!   changes it tears the same way.
//!
//! Not modelled (see the report in tests/it/powercut.rs): writes reaching the medium out of
//! order within a file, sectors torn in the middle of an otherwise-kept range, a device that
//! lies about fsync, extended attributes, hard links and symlinks (refused).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use rand::Rng;

/// Hidden in the backing directory's root: where removed things wait until the cut.
const GRAVEYARD: &str = ".powercut-graveyard";

/// Attributes and entries are never cached by the kernel: every stat and lookup asks us, so
/// nothing stale survives a rename or a cut (the remount drops the rest).
const TTL: Duration = Duration::ZERO;

/// When a name change (create, unlink, rename, …) becomes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NameDurability {
    /// POSIX's rule: only through an fsync of its directory (f2fs' default `fsync_mode=posix`
    /// and btrfs behave close to this).
    #[default]
    Strict,
    /// Like a filesystem with one metadata journal (ext4 `data=ordered`, XFS): an fsync of
    /// any file or directory also commits every name change made before it.
    Journal,
}

/// What a power cut keeps of the changes that were not made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutMode {
    /// Every unsynced write and name change is dropped.
    Drop,
    /// For each file, a random prefix of its unsynced writes survives: the first k whole, a
    /// random byte prefix of write k+1, the rest dropped. For each directory, a random prefix
    /// of its unsynced name changes survives.
    Torn,
    /// Nothing is lost: a SIGKILL and a remount only. The control run: a scenario that
    /// fails with it fails for a reason of its own, not the power.
    Keep,
}

impl CutMode {
    pub fn name(self) -> &'static str {
        match self {
            CutMode::Drop => "drop",
            CutMode::Torn => "torn",
            CutMode::Keep => "keep",
        }
    }
}

/// What one cut did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CutReport {
    /// Files that lost (or kept only part of) at least one write.
    pub files_touched: usize,
    /// Writes and size changes undone whole.
    pub writes_dropped: usize,
    /// Writes of which a strict byte prefix was kept.
    pub writes_torn: usize,
    /// Unsynced writes kept whole (torn mode only).
    pub writes_kept: usize,
    /// Name changes undone.
    pub names_undone: usize,
    /// Unsynced name changes kept (torn mode only).
    pub names_kept: usize,
    /// Each name change undone, as "create|remove|rename path" (paths relative to the mount).
    pub names: Vec<String>,
    /// Undo steps that met something a durable later change had put in their place; see
    /// `Journal::apply`.
    pub conflicts: usize,
    /// Per file (its path when the power went, relative to the mount; an unlinked file by
    /// the name it had): writes dropped, writes torn.
    pub files: BTreeMap<String, (usize, usize)>,
    /// FUSE fsync and fsyncdir requests since the previous mount: what the program asked to
    /// be made durable.
    pub fsyncs: u64,
    pub fsyncdirs: u64,
}

/// A change not yet durable, with what it takes to undo it.
#[derive(Debug)]
enum Undo {
    /// `len` bytes written at `offset`; `old` are the bytes they replaced (only those below
    /// `old_len`), `old_len` the file's length before.
    Write {
        ino: u64,
        offset: u64,
        len: u64,
        old: Vec<u8>,
        old_len: u64,
    },
    /// The length changed from `old_len`; `tail` holds what a shrink cut off.
    SetLen {
        ino: u64,
        old_len: u64,
        tail: Vec<u8>,
    },
    /// `name` appeared in `dir` (create, mkdir).
    Created { dir: u64, name: String, ino: u64 },
    /// `name` left `dir` (unlink, rmdir); the thing now sits at `grave`.
    Removed {
        dir: u64,
        name: String,
        ino: u64,
        grave: PathBuf,
    },
    /// `from_dir/from_name` became `to_dir/to_name`; what it replaced sits at `victim`.
    Renamed {
        from_dir: u64,
        from_name: String,
        to_dir: u64,
        to_name: String,
        ino: u64,
        victim: Option<(u64, PathBuf)>,
        from_synced: bool,
        to_synced: bool,
    },
}

impl Undo {
    /// The file whose data this changes, for a data record.
    fn data_ino(&self) -> Option<u64> {
        match self {
            Undo::Write { ino, .. } | Undo::SetLen { ino, .. } => Some(*ino),
            _ => None,
        }
    }

    /// The directory a name change is grouped under (for torn mode's per-directory prefix).
    fn name_dir(&self) -> Option<u64> {
        match self {
            Undo::Created { dir, .. } | Undo::Removed { dir, .. } => Some(*dir),
            Undo::Renamed { to_dir, .. } => Some(*to_dir),
            _ => None,
        }
    }
}

/// The inode table, open files and the undo log: shared between the FUSE thread and the test.
struct Journal {
    /// Backing directory root.
    root: PathBuf,
    /// ino → path relative to `root` ("" for the root; graveyard paths for removed things).
    nodes: HashMap<u64, PathBuf>,
    by_path: HashMap<PathBuf, u64>,
    next_ino: u64,
    handles: HashMap<u64, (u64, File)>,
    next_fh: u64,
    next_grave: u64,
    /// Graveyard path → the path the thing had when it was removed, for reports.
    origins: HashMap<PathBuf, PathBuf>,
    log: Vec<Undo>,
    names: NameDurability,
    /// Counters since the last cut, for tests of the filesystem itself.
    fsyncs: u64,
    fsyncdirs: u64,
}

impl Journal {
    fn new(root: &Path, names: NameDurability) -> Journal {
        let mut j = Journal {
            root: root.to_path_buf(),
            nodes: HashMap::new(),
            by_path: HashMap::new(),
            next_ino: 2,
            handles: HashMap::new(),
            next_fh: 1,
            next_grave: 0,
            origins: HashMap::new(),
            log: Vec::new(),
            names,
            fsyncs: 0,
            fsyncdirs: 0,
        };
        j.nodes.insert(1, PathBuf::new());
        j.by_path.insert(PathBuf::new(), 1);
        j
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    fn path_of(&self, ino: u64) -> Result<PathBuf, Errno> {
        self.nodes.get(&ino).cloned().ok_or(Errno::ENOENT)
    }

    fn ino_for(&mut self, rel: &Path) -> u64 {
        if let Some(ino) = self.by_path.get(rel) {
            return *ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(ino, rel.to_path_buf());
        self.by_path.insert(rel.to_path_buf(), ino);
        ino
    }

    /// The path of `name` in directory `dir`, refusing the hidden graveyard.
    fn child(&self, dir: u64, name: &OsStr) -> Result<PathBuf, Errno> {
        let parent = self.path_of(dir)?;
        if parent.as_os_str().is_empty() && name == GRAVEYARD {
            return Err(Errno::ENOENT);
        }
        Ok(parent.join(name))
    }

    fn fresh_grave(&mut self) -> PathBuf {
        self.next_grave += 1;
        Path::new(GRAVEYARD).join(format!("{}", self.next_grave))
    }

    /// Moves whatever is at `from` (relative) to `to`, carrying every tracked path under it.
    fn relocate(&mut self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(self.abs(from), self.abs(to))?;
        let moved: Vec<(u64, PathBuf)> = self
            .nodes
            .iter()
            .filter(|(_, p)| p.starts_with(from))
            .map(|(i, p)| (*i, p.clone()))
            .collect();
        for (ino, old) in moved {
            // (`join("")` would add a trailing slash, which makes a file path a directory's.)
            let rest = old.strip_prefix(from).expect("filtered by prefix");
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            if self.by_path.get(&old) == Some(&ino) {
                self.by_path.remove(&old);
            }
            self.by_path.insert(new.clone(), ino);
            self.nodes.insert(ino, new);
        }
        Ok(())
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let md = std::fs::symlink_metadata(self.abs(&self.path_of(ino)?)).map_err(errno)?;
        Ok(attr_of(ino, &md))
    }

    fn file(&self, fh: u64) -> Result<&File, Errno> {
        self.handles.get(&fh).map(|(_, f)| f).ok_or(Errno::EBADF)
    }

    /// Records the data a write at `offset` of `len` bytes is about to replace.
    fn note_write(&mut self, ino: u64, file: &File, offset: u64, len: u64) -> io::Result<()> {
        let old_len = file.metadata()?.len();
        let end = offset.saturating_add(len).min(old_len);
        let old = if end > offset {
            read_exact_at(file, offset, (end - offset) as usize)?
        } else {
            Vec::new()
        };
        self.log.push(Undo::Write {
            ino,
            offset,
            len,
            old,
            old_len,
        });
        Ok(())
    }

    fn note_set_len(&mut self, ino: u64, file: &File, new_len: u64) -> io::Result<()> {
        let old_len = file.metadata()?.len();
        if old_len == new_len {
            return Ok(());
        }
        let tail = if new_len < old_len {
            read_exact_at(file, new_len, (old_len - new_len) as usize)?
        } else {
            Vec::new()
        };
        self.log.push(Undo::SetLen { ino, old_len, tail });
        Ok(())
    }

    /// Rolls the backing directory back: every record is undone in reverse order, except
    /// what torn mode keeps. Runs only while unmounted.
    fn apply(&mut self, mode: CutMode, rng: &mut impl Rng) -> io::Result<CutReport> {
        let log = std::mem::take(&mut self.log);
        let mut report = CutReport {
            fsyncs: self.fsyncs,
            fsyncdirs: self.fsyncdirs,
            ..Default::default()
        };
        // Files are reported by the name they had when the power went (or when unlinked).
        let names_at_cut: HashMap<u64, PathBuf> = self
            .nodes
            .iter()
            .map(|(i, p)| {
                let name = match self.origins.get(p) {
                    Some(o) => PathBuf::from(format!("{} (unlinked)", o.display())),
                    None => p.clone(),
                };
                (*i, name)
            })
            .collect();
        // What survives, per record: None = undone whole, Some(None) = kept whole,
        // Some(Some(p)) = a write of which the first p bytes are kept.
        let mut keep: Vec<Option<Option<u64>>> = vec![None; log.len()];
        if mode == CutMode::Keep {
            keep.fill(Some(None));
        }
        if mode == CutMode::Torn {
            let mut by_file: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
            let mut by_dir: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
            for (i, r) in log.iter().enumerate() {
                if let Some(ino) = r.data_ino() {
                    by_file.entry(ino).or_default().push(i);
                } else if let Some(dir) = r.name_dir() {
                    by_dir.entry(dir).or_default().push(i);
                }
            }
            for records in by_file.values() {
                let k = rng.random_range(0..=records.len());
                for &i in &records[..k] {
                    keep[i] = Some(None);
                }
                if let Some(&i) = records.get(k)
                    && let Undo::Write { len, .. } = log[i]
                    && len > 1
                {
                    keep[i] = Some(Some(rng.random_range(1..len)));
                }
            }
            for records in by_dir.values() {
                let k = rng.random_range(0..=records.len());
                for &i in &records[..k] {
                    keep[i] = Some(None);
                }
            }
        }
        let mut touched: HashMap<u64, (usize, usize)> = HashMap::new();
        for (record, keep) in log.into_iter().zip(keep).rev() {
            match (record, keep) {
                (r, Some(None)) => {
                    if r.data_ino().is_some() {
                        report.writes_kept += 1;
                    } else {
                        report.names_kept += 1;
                    }
                }
                (
                    Undo::Write {
                        ino,
                        offset,
                        old,
                        old_len,
                        ..
                    },
                    Some(Some(prefix)),
                ) => {
                    let f = self.open_backing(ino)?;
                    // Bytes from `prefix` on revert to what they were; the length is what
                    // the kept prefix reached.
                    let skip = (prefix as usize).min(old.len());
                    f.write_all_at(&old[skip..], offset + skip as u64)?;
                    f.set_len(old_len.max(offset + prefix))?;
                    report.writes_torn += 1;
                    touched.entry(ino).or_default().1 += 1;
                }
                (
                    Undo::Write {
                        ino,
                        offset,
                        old,
                        old_len,
                        ..
                    },
                    None,
                ) => {
                    let f = self.open_backing(ino)?;
                    f.write_all_at(&old, offset)?;
                    f.set_len(old_len)?;
                    report.writes_dropped += 1;
                    touched.entry(ino).or_default().0 += 1;
                }
                (Undo::SetLen { ino, old_len, tail }, _) => {
                    let f = self.open_backing(ino)?;
                    let new_len = f.metadata()?.len();
                    f.set_len(old_len)?;
                    if !tail.is_empty() {
                        f.write_all_at(&tail, new_len)?;
                    }
                    report.writes_dropped += 1;
                    touched.entry(ino).or_default().0 += 1;
                }
                (Undo::Created { ino, .. }, _) => {
                    let at = self.path_of(ino).map_err(io_err)?;
                    let grave = self.fresh_grave();
                    self.relocate(&at, &grave)?;
                    report.names_undone += 1;
                    report.names.push(format!("create {}", at.display()));
                }
                (
                    Undo::Removed {
                        dir,
                        name,
                        ino,
                        grave,
                    },
                    _,
                ) => {
                    let at = self.path_of(dir).map_err(io_err)?.join(&name);
                    report.conflicts += self.clear(&at)?;
                    let _ = ino;
                    self.relocate(&grave, &at)?;
                    report.names_undone += 1;
                    report.names.push(format!("remove {}", at.display()));
                }
                (
                    Undo::Renamed {
                        from_dir,
                        from_name,
                        to_dir,
                        to_name,
                        ino,
                        victim,
                        ..
                    },
                    _,
                ) => {
                    let now = self.path_of(ino).map_err(io_err)?;
                    let back = self.path_of(from_dir).map_err(io_err)?.join(&from_name);
                    report.conflicts += self.clear(&back)?;
                    self.relocate(&now, &back)?;
                    if let Some((_, grave)) = victim {
                        let at = self.path_of(to_dir).map_err(io_err)?.join(&to_name);
                        report.conflicts += self.clear(&at)?;
                        self.relocate(&grave, &at)?;
                    }
                    report.names_undone += 1;
                    report
                        .names
                        .push(format!("rename {} -> {to_name}", back.display()));
                }
            }
        }
        report.files_touched = touched.len();
        for (ino, counts) in touched {
            let name = names_at_cut
                .get(&ino)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            let e = report.files.entry(name).or_default();
            e.0 += counts.0;
            e.1 += counts.1;
        }
        Ok(report)
    }

    /// Makes room at `at` for an undo: something durable a later change put there (possible
    /// only across directories whose fsyncs interleave) goes to the graveyard, counted as a
    /// conflict.
    fn clear(&mut self, at: &Path) -> io::Result<usize> {
        if std::fs::symlink_metadata(self.abs(at)).is_err() {
            return Ok(0);
        }
        let grave = self.fresh_grave();
        self.relocate(at, &grave)?;
        Ok(1)
    }

    fn open_backing(&self, ino: u64) -> io::Result<File> {
        let rel = self.path_of(ino).map_err(io_err)?;
        OpenOptions::new().write(true).open(self.abs(&rel))
    }
}

fn read_exact_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

fn io_err(e: Errno) -> io::Error {
    io::Error::other(format!("powercut: {e:?}"))
}

fn attr_of(ino: u64, md: &std::fs::Metadata) -> FileAttr {
    let time = |secs: i64, nanos: i64| {
        if secs >= 0 {
            UNIX_EPOCH + Duration::new(secs as u64, nanos as u32)
        } else {
            UNIX_EPOCH
        }
    };
    let kind = if md.is_dir() {
        FileType::Directory
    } else if md.file_type().is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    };
    FileAttr {
        ino: INodeNo(ino),
        size: md.size(),
        blocks: md.blocks(),
        atime: time(md.atime(), md.atime_nsec()),
        mtime: time(md.mtime(), md.mtime_nsec()),
        ctime: time(md.ctime(), md.ctime_nsec()),
        crtime: time(md.ctime(), md.ctime_nsec()),
        kind,
        perm: (md.mode() & 0o7777) as u16,
        nlink: md.nlink() as u32,
        uid: md.uid(),
        gid: md.gid(),
        rdev: md.rdev() as u32,
        blksize: md.blksize() as u32,
        flags: 0,
    }
}

/// The filesystem the kernel talks to.
struct Fs {
    journal: Arc<Mutex<Journal>>,
}

impl Fs {
    fn j(&self) -> MutexGuard<'_, Journal> {
        // A panic in one handler must not wedge the mount: the data is still consistent,
        // every handler records before it changes anything.
        self.journal.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl fuser::Filesystem for Fs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut j = self.j();
        let result = j.child(parent.0, name).and_then(|rel| {
            let md = std::fs::symlink_metadata(j.abs(&rel)).map_err(errno)?;
            let ino = j.ino_for(&rel);
            Ok(attr_of(ino, &md))
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.j().attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let mut j = self.j();
        let result = (|| -> Result<FileAttr, Errno> {
            let path = j.abs(&j.path_of(ino.0)?);
            if let Some(size) = size {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(errno)?;
                j.note_set_len(ino.0, &f, size).map_err(errno)?;
                f.set_len(size).map_err(errno)?;
            }
            // Permissions and owners are not journalled: no storage engine's consistency
            // rests on them, and a cut leaves them as they are. Times are not kept at all
            // (the backing file's own stand): nothing the tests run sets them.
            if let Some(mode) = mode {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .map_err(errno)?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::chown(&path, uid, gid).map_err(errno)?;
            }
            j.attr(ino.0)
        })();
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut j = self.j();
        let result = (|| -> Result<FileAttr, Errno> {
            let rel = j.child(parent.0, name)?;
            let abs = j.abs(&rel);
            std::fs::create_dir(&abs).map_err(errno)?;
            std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(mode & !umask))
                .map_err(errno)?;
            let ino = j.ino_for(&rel);
            j.log.push(Undo::Created {
                dir: parent.0,
                name: name.to_string_lossy().into_owned(),
                ino,
            });
            j.attr(ino)
        })();
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, false, reply)
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, true, reply)
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM)
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let mut j = self.j();
        let result = (|| -> Result<(), Errno> {
            if flags.contains(RenameFlags::RENAME_EXCHANGE)
                || flags.contains(RenameFlags::RENAME_WHITEOUT)
            {
                return Err(Errno::EINVAL);
            }
            let from = j.child(parent.0, name)?;
            let to = j.child(newparent.0, newname)?;
            let src_md = std::fs::symlink_metadata(j.abs(&from)).map_err(errno)?;
            let ino = j.ino_for(&from);
            if from == to {
                return Ok(());
            }
            let mut victim = None;
            if let Ok(md) = std::fs::symlink_metadata(j.abs(&to)) {
                if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                    return Err(Errno::EEXIST);
                }
                if md.is_dir() != src_md.is_dir() {
                    return Err(if md.is_dir() {
                        Errno::EISDIR
                    } else {
                        Errno::ENOTDIR
                    });
                }
                if md.is_dir()
                    && std::fs::read_dir(j.abs(&to))
                        .map_err(errno)?
                        .next()
                        .is_some()
                {
                    return Err(Errno::ENOTEMPTY);
                }
                let victim_ino = j.ino_for(&to);
                let grave = j.fresh_grave();
                j.relocate(&to, &grave).map_err(errno)?;
                j.origins.insert(grave.clone(), to.clone());
                victim = Some((victim_ino, grave));
            }
            j.relocate(&from, &to).map_err(errno)?;
            // Same directory: one fsyncdir marks both sides (see `fsyncdir`).
            j.log.push(Undo::Renamed {
                from_dir: parent.0,
                from_name: name.to_string_lossy().into_owned(),
                to_dir: newparent.0,
                to_name: newname.to_string_lossy().into_owned(),
                ino,
                victim,
                from_synced: false,
                to_synced: false,
            });
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM)
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut j = self.j();
        let result = (|| -> Result<u64, Errno> {
            let path = j.abs(&j.path_of(ino.0)?);
            let file = open_backing_as(&path, flags.0, false)?;
            let fh = j.next_fh;
            j.next_fh += 1;
            j.handles.insert(fh, (ino.0, file));
            Ok(fh)
        })();
        match result {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut j = self.j();
        let result = (|| -> Result<(FileAttr, u64), Errno> {
            let rel = j.child(parent.0, name)?;
            let abs = j.abs(&rel);
            let existed = std::fs::symlink_metadata(&abs).is_ok();
            if existed && flags & libc_o_excl() != 0 {
                return Err(Errno::EEXIST);
            }
            let ino = j.ino_for(&rel);
            let file = if existed {
                let f = open_backing_as(&abs, flags, false)?;
                if flags & libc_o_trunc() != 0 {
                    j.note_set_len(ino, &f, 0).map_err(errno)?;
                    f.set_len(0).map_err(errno)?;
                }
                f
            } else {
                let f = open_backing_as(&abs, flags, true)?;
                std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(mode & !umask))
                    .map_err(errno)?;
                j.log.push(Undo::Created {
                    dir: parent.0,
                    name: name.to_string_lossy().into_owned(),
                    ino,
                });
                f
            };
            let fh = j.next_fh;
            j.next_fh += 1;
            j.handles.insert(fh, (ino, file));
            Ok((j.attr(ino)?, fh))
        })();
        match result {
            Ok((attr, fh)) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        let j = self.j();
        let result = j.file(fh.0).and_then(|f| {
            let mut buf = vec![0; size as usize];
            let mut got = 0;
            while got < buf.len() {
                match f.read_at(&mut buf[got..], offset + got as u64) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(errno(e)),
                }
            }
            buf.truncate(got);
            Ok(buf)
        });
        match result {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut j = self.j();
        let result = (|| -> Result<(), Errno> {
            let (ino, file) = j.handles.get(&fh.0).ok_or(Errno::EBADF)?;
            let (ino, file) = (*ino, file.try_clone().map_err(errno)?);
            j.note_write(ino, &file, offset, data.len() as u64)
                .map_err(errno)?;
            file.write_all_at(data, offset).map_err(errno)
        })();
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: fuser::LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) is not a durability point.
        reply.ok()
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.j().handles.remove(&fh.0);
        reply.ok()
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // The backing file is not fsynced: the backing filesystem does not lose power, this
        // one does. Durable now: every earlier write and size change of this file.
        let mut j = self.j();
        j.fsyncs += 1;
        let journal = j.names == NameDurability::Journal;
        // With one journal, the commit takes every earlier name change along.
        j.log.retain(|r| {
            r.data_ino().is_some_and(|i| i != ino.0) || (!journal && r.data_ino().is_none())
        });
        reply.ok()
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut j = self.j();
        j.fsyncdirs += 1;
        let dir = ino.0;
        if j.names == NameDurability::Journal {
            j.log.retain(|r| r.data_ino().is_some());
            reply.ok();
            return;
        }
        for r in j.log.iter_mut() {
            if let Undo::Renamed {
                from_dir,
                to_dir,
                from_synced,
                to_synced,
                ..
            } = r
            {
                if *from_dir == dir {
                    *from_synced = true;
                }
                if *to_dir == dir {
                    *to_synced = true;
                }
            }
        }
        j.log.retain(|r| match r {
            Undo::Created { dir: d, .. } | Undo::Removed { dir: d, .. } => *d != dir,
            Undo::Renamed {
                from_synced,
                to_synced,
                ..
            } => !(*from_synced && *to_synced),
            _ => true,
        });
        reply.ok()
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.j().path_of(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut j = self.j();
        let result = (|| -> Result<Vec<(u64, FileType, String)>, Errno> {
            let rel = j.path_of(ino.0)?;
            let mut names: Vec<(String, bool)> = std::fs::read_dir(j.abs(&rel))
                .map_err(errno)?
                .filter_map(|e| e.ok())
                .map(|e| {
                    let dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
                    (e.file_name().to_string_lossy().into_owned(), dir)
                })
                .filter(|(n, _)| !(rel.as_os_str().is_empty() && n == GRAVEYARD))
                .collect();
            names.sort();
            let parent = rel.parent().map(|p| j.ino_for(p)).unwrap_or(ino.0);
            let mut out = vec![
                (ino.0, FileType::Directory, ".".to_string()),
                (parent, FileType::Directory, "..".to_string()),
            ];
            for (name, dir) in names {
                let child = j.ino_for(&rel.join(&name));
                let kind = if dir {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                out.push((child, kind, name));
            }
            Ok(out)
        })();
        match result {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize)
                {
                    if reply.add(INodeNo(ino), (i + 1) as u64, kind, name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // The agent's free-space reserve reads these: the backing filesystem's own numbers.
        let root = self.j().root.clone();
        match nix::sys::statvfs::statvfs(&root) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.j().path_of(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        use nix::fcntl::FallocateFlags;
        let mut j = self.j();
        let result = (|| -> Result<(), Errno> {
            let flags = FallocateFlags::from_bits(mode).ok_or(Errno::EOPNOTSUPP)?;
            // Allocation alone changes no byte anyone can read; only growing the file does
            // (and is journalled as a size change). Punching holes and the like would need
            // the old bytes and no engine we test asks for them.
            if !(flags - FallocateFlags::FALLOC_FL_KEEP_SIZE).is_empty() {
                return Err(Errno::EOPNOTSUPP);
            }
            let file = j.file(fh.0)?.try_clone().map_err(errno)?;
            let end = offset.saturating_add(length);
            if !flags.contains(FallocateFlags::FALLOC_FL_KEEP_SIZE)
                && end > file.metadata().map_err(errno)?.len()
            {
                j.note_set_len(ino.0, &file, end).map_err(errno)?;
            }
            nix::fcntl::fallocate(&file, flags, offset as i64, length as i64)
                .map_err(|e| Errno::from_i32(e as i32))
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

impl Fs {
    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        let mut j = self.j();
        let result = (|| -> Result<(), Errno> {
            let rel = j.child(parent.0, name)?;
            let md = std::fs::symlink_metadata(j.abs(&rel)).map_err(errno)?;
            match (dir, md.is_dir()) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                _ => {}
            }
            if dir
                && std::fs::read_dir(j.abs(&rel))
                    .map_err(errno)?
                    .next()
                    .is_some()
            {
                return Err(Errno::ENOTEMPTY);
            }
            let ino = j.ino_for(&rel);
            let grave = j.fresh_grave();
            j.relocate(&rel, &grave).map_err(errno)?;
            j.origins.insert(grave.clone(), rel.clone());
            j.log.push(Undo::Removed {
                dir: parent.0,
                name: name.to_string_lossy().into_owned(),
                ino,
                grave,
            });
            Ok(())
        })();
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

fn libc_o_excl() -> i32 {
    nix::fcntl::OFlag::O_EXCL.bits()
}

fn libc_o_trunc() -> i32 {
    nix::fcntl::OFlag::O_TRUNC.bits()
}

/// Opens the backing file as the program asked, less what this filesystem does itself:
/// truncation is a journalled size change, and O_APPEND would make pwrite ignore the offset
/// the kernel sends.
fn open_backing_as(path: &Path, flags: i32, create: bool) -> Result<File, Errno> {
    use nix::fcntl::OFlag;
    let acc = flags & OFlag::O_ACCMODE.bits();
    let strip = (OFlag::O_ACCMODE
        | OFlag::O_APPEND
        | OFlag::O_TRUNC
        | OFlag::O_CREAT
        | OFlag::O_EXCL
        | OFlag::O_DIRECT
        | OFlag::O_NOCTTY)
        .bits();
    let mut o = OpenOptions::new();
    o.read(true)
        .write(acc != OFlag::O_RDONLY.bits() || create)
        .create_new(create)
        .custom_flags(flags & !strip);
    o.open(path).map_err(errno)
}

/// A mounted power-cut filesystem. Unmounts on drop.
pub struct PowerCutFs {
    names: NameDurability,
    backing: PathBuf,
    mountpoint: PathBuf,
    journal: Arc<Mutex<Journal>>,
    session: Option<fuser::BackgroundSession>,
    /// Sessions that ended with ECONNABORTED after a successful unmount (see `stop`).
    aborted_at_unmount: u64,
}

/// Whether this machine can mount FUSE filesystems here: `/dev/fuse`, and either root (which
/// mounts with mount(2)) or `fusermount3`. Without it the test prints a loud skip line, or
/// fails under `STORELINK_REQUIRE_EXTERNAL=1` like the other external programs.
pub fn require_fuse(test: &str) -> bool {
    if !Path::new("/dev/fuse").exists() {
        if std::env::var("STORELINK_REQUIRE_EXTERNAL").as_deref() == Ok("1") {
            panic!("{test}: /dev/fuse is required (STORELINK_REQUIRE_EXTERNAL=1) but missing");
        }
        eprintln!("\n!!!!!!!! SKIPPED {test}: no /dev/fuse on this machine !!!!!!!!\n");
        return false;
    }
    nix::unistd::geteuid().is_root() || super::require_external("fusermount3", test)
}

impl PowerCutFs {
    /// Mounts a filesystem over `backing` at `mountpoint` (both existing directories), with
    /// POSIX's strict rule for names.
    pub fn mount(backing: &Path, mountpoint: &Path) -> PowerCutFs {
        Self::mount_with(backing, mountpoint, NameDurability::Strict)
    }

    pub fn mount_with(backing: &Path, mountpoint: &Path, names: NameDurability) -> PowerCutFs {
        let backing = backing.canonicalize().expect("backing directory exists");
        std::fs::create_dir_all(backing.join(GRAVEYARD)).unwrap();
        let mut fs = PowerCutFs {
            names,
            journal: Arc::new(Mutex::new(Journal::new(&backing, names))),
            backing,
            mountpoint: mountpoint.to_path_buf(),
            session: None,
            aborted_at_unmount: 0,
        };
        fs.start();
        fs
    }

    /// How many sessions the kernel ended with ECONNABORTED rather than ENODEV after an
    /// unmount that succeeded (both are the end of the session; reported for the record).
    pub fn aborted_at_unmount(&self) -> u64 {
        self.aborted_at_unmount
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    fn start(&mut self) {
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("powercut".into()),
            fuser::MountOption::Subtype("powercut".into()),
            fuser::MountOption::NoAtime,
        ];
        // One thread: requests are handled in the order the kernel sends them, and the
        // journal's order is theirs.
        config.n_threads = Some(1);
        let fs = Fs {
            journal: self.journal.clone(),
        };
        let session = fuser::spawn_mount(fs, &self.mountpoint, &config)
            .unwrap_or_else(|e| panic!("mounting powercut at {}: {e}", self.mountpoint.display()));
        self.session = Some(session);
        // The mount is live once a stat through it answers with our root.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if is_mounted(&self.mountpoint) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "powercut never appeared mounted: {}",
                std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        // A process that just died may still have its files open for a moment (the kernel
        // releases them asynchronously): EBUSY then, so try again for a while.
        let deadline = Instant::now() + Duration::from_secs(20);
        let unmounted = loop {
            match nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::empty()) {
                Ok(()) => break true,
                Err(nix::errno::Errno::EBUSY) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(nix::errno::Errno::EINVAL) => break false, // not mounted any more
                Err(e) => panic!("unmounting {}: {e}", self.mountpoint.display()),
            }
        };
        match session.join() {
            Ok(()) => {}
            // After our own unmount the kernel ends the session; a read that races with the
            // teardown can report the end as ECONNABORTED rather than ENODEV. Nothing is in
            // flight by then (the program using the mount is dead and the unmount succeeded),
            // so it is the same clean end; it is counted so the report shows how often.
            Err(e) if unmounted && e.raw_os_error() == Some(nix::libc::ECONNABORTED) => {
                self.aborted_at_unmount += 1;
            }
            Err(e) => panic!(
                "the FUSE session at {} ended with {e} (unmount {})",
                self.mountpoint.display(),
                if unmounted {
                    "succeeded"
                } else {
                    "found it unmounted already"
                }
            ),
        }
    }

    /// Power cut: unmounts, drops (or tears) everything not durable, and mounts again on what
    /// survived. The program using the mount must be dead already (SIGKILLed and reaped).
    pub fn cut(&mut self, mode: CutMode, rng: &mut impl Rng) -> CutReport {
        self.stop();
        let report = {
            let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
            let report = j
                .apply(mode, rng)
                .expect("rolling back the backing directory");
            *j = Journal::new(&self.backing, self.names);
            report
        };
        let graves = self.backing.join(GRAVEYARD);
        std::fs::remove_dir_all(&graves).unwrap();
        std::fs::create_dir_all(&graves).unwrap();
        self.start();
        report
    }

    /// Unmounts and mounts again without losing anything (a clean shutdown and boot).
    pub fn remount(&mut self) {
        self.stop();
        let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        j.log.clear();
        *j = Journal::new(&self.backing, self.names);
        drop(j);
        self.start();
    }

    /// Declares everything written so far durable, as a kernel's periodic writeback and
    /// journal commits would have made it on a machine that has been up a while. Strict
    /// POSIX says a name is durable only through its directory's fsync; a program that never
    /// fsyncs its directory would otherwise lose files it created hours ago.
    pub fn settle(&self) {
        self.journal.lock().unwrap().log.clear();
    }

    /// Changes not yet durable (for tests of the filesystem).
    pub fn pending(&self) -> usize {
        self.journal.lock().unwrap().log.len()
    }

    /// FUSE fsync and fsyncdir requests seen since the last cut.
    pub fn syncs_seen(&self) -> (u64, u64) {
        let j = self.journal.lock().unwrap();
        (j.fsyncs, j.fsyncdirs)
    }
}

fn is_mounted(mountpoint: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let target = mountpoint
        .canonicalize()
        .unwrap_or_else(|_| mountpoint.to_path_buf());
    mounts.lines().any(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        fields.get(4).map(Path::new) == Some(target.as_path())
            && l.split_once(" - ")
                .is_some_and(|(_, fs)| fs.starts_with("fuse"))
    })
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            let _ = session.join();
        }
    }
}
