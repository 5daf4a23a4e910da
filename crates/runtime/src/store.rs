//! A worker's data store: the results it holds, in memory or spilled to files.
//!
//! The memory policy (`memory.rs`) decides what goes to disk; this module does the I/O. Spill
//! files are **written by a thread of their own**: a result chosen for spilling stays readable
//! from memory while its file is written, and moves to the disk side of the books only once
//! the write is done. The worker's event loop, which also sends its heartbeats and serves its
//! peers, thus never waits for a disk write, however slow the disk. (Reading a spilled result
//! back happens when it is needed, on the thread that needs it.)

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rask_graph::{FxHashMap, Key, Value};

use crate::memory::SpillPolicy;

/// The store as the worker shares it between its event loop, its data port and the spill
/// writer.
pub(crate) type Store = Arc<Mutex<DataStore>>;

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The results a worker holds: in memory, or — above [`crate::memory::SPILL_FRACTION`] of its
/// memory limit, least recently used first — in files of its spill directory, read back
/// transparently when a task or a peer needs them. The directory is removed with the store.
pub(crate) struct DataStore {
    mem: FxHashMap<Key, Value>,
    pub(crate) policy: SpillPolicy,
    /// Where spilled results go (created at the first spill).
    dir: PathBuf,
    /// The file of each spilled result, and of each result read back since (kept until the
    /// result is freed or replaced, so that spilling it again writes nothing).
    files: FxHashMap<Key, PathBuf>,
    /// Results whose file the writer thread is writing: the number of that write and the
    /// value (still served from here until the write is done).
    writing: FxHashMap<Key, (u64, Value)>,
    /// Their bytes (still in process memory).
    writing_bytes: u64,
    /// Results taken back from `writing` because they were needed, with the number of the
    /// write still in flight: spilled again before it lands, they wait for it instead of
    /// starting another; once it lands, its file is theirs.
    rescued: FxHashMap<Key, u64>,
    /// The writer thread's queue; `None`: files are written on the spot (tests).
    writer: Option<std::sync::mpsc::Sender<SpillJob>>,
    next_file: u64,
    name: String,
    /// Disk traffic so far: bytes written and read, and the time it took.
    io: SpillIo,
    /// Whether this store created its directory (it never reuses one it did not create).
    dir_made: bool,
    /// Bytes in memory when there is no limit (the policy is then not consulted at all).
    unlimited_bytes: u64,
}

/// A worker's spill traffic since it started.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SpillIo {
    pub(crate) written: u64,
    pub(crate) write_time: Duration,
    pub(crate) read: u64,
    pub(crate) read_time: Duration,
}

/// A file for the writer thread to write.
struct SpillJob {
    key: Key,
    /// Identifies this write among writes of the same key (the file number).
    id: u64,
    value: Value,
    path: PathBuf,
}

impl DataStore {
    pub(crate) fn new(name: &str, memory_limit: Option<u64>) -> Self {
        let dir = std::env::temp_dir().join(format!("rask-spill-{}-{}", std::process::id(), sanitize(name)));
        DataStore {
            mem: FxHashMap::default(),
            policy: SpillPolicy::new(memory_limit),
            dir,
            files: FxHashMap::default(),
            writing: FxHashMap::default(),
            writing_bytes: 0,
            rescued: FxHashMap::default(),
            writer: None,
            next_file: 0,
            name: name.to_owned(),
            io: SpillIo::default(),
            dir_made: false,
            unlimited_bytes: 0,
        }
    }

    /// A shared store whose spill files are written by a thread of its own (when it has a
    /// memory limit; without one it never spills).
    pub(crate) fn start(name: &str, memory_limit: Option<u64>) -> Store {
        let store = Arc::new(Mutex::new(DataStore::new(name, memory_limit)));
        if memory_limit.is_some() {
            let (tx, rx) = std::sync::mpsc::channel();
            let weak = Arc::downgrade(&store);
            let spawned =
                std::thread::Builder::new().name(format!("rask-spill-{name}")).spawn(move || write_loop(&weak, &rx));
            // Without the thread, files are written on the spot: slower, still correct.
            if spawned.is_ok() {
                lock(&store).writer = Some(tx);
            }
        }
        store
    }

    /// Holds `v` under `key` (replacing any earlier copy), then spills what the policy says.
    pub(crate) fn insert(&mut self, key: Key, v: Value) {
        let nbytes = v.nbytes() as u64;
        if !self.policy.limited() {
            self.unlimited_bytes += nbytes;
            if let Some(old) = self.mem.insert(key, v) {
                self.unlimited_bytes -= old.nbytes() as u64;
            }
            return;
        }
        self.forget_copies(&key);
        self.mem.insert(key.clone(), v);
        let out = self.policy.stored(&key, nbytes);
        self.spill(out);
    }

    /// Moves these results (chosen by the policy) to disk: queued for the writer thread, or
    /// nothing to write if their file is still there from before.
    pub(crate) fn spill(&mut self, keys: Vec<Key>) {
        for k in keys {
            let Some(v) = self.mem.remove(&k) else { continue };
            if self.files.contains_key(&k) {
                // Read back earlier and unchanged since (values are immutable): its file is
                // still there, so spilling it again costs no write.
                continue;
            }
            if let Some(id) = self.rescued.remove(&k) {
                // Its write is still in flight: wait for that one.
                self.writing_bytes += v.nbytes() as u64;
                self.writing.insert(k, (id, v));
                continue;
            }
            let path = match self.next_path() {
                Ok(p) => p,
                Err(e) => {
                    self.keep(k, v, &e);
                    continue;
                }
            };
            let id = self.next_file;
            // Back-pressure: with a whole memory limit's worth of results already waiting for
            // the disk, this one is written here, so the queue cannot outgrow the memory it is
            // meant to give back.
            let nbytes = v.nbytes() as u64;
            let backlog = self.policy.limit().is_some_and(|l| self.writing_bytes + nbytes > l);
            match &self.writer {
                Some(tx) if !backlog => {
                    self.writing_bytes += v.nbytes() as u64;
                    self.writing.insert(k.clone(), (id, v.clone()));
                    if let Err(std::sync::mpsc::SendError(job)) = tx.send(SpillJob { key: k, id, value: v, path }) {
                        // The writer is gone: write here instead.
                        self.writer = None;
                        let started = Instant::now();
                        let result = write_file(&job.path, &job.value);
                        self.written(job, result, started.elapsed());
                    }
                }
                _ => {
                    let started = Instant::now();
                    let result = write_file(&path, &v);
                    self.writing_bytes += v.nbytes() as u64;
                    self.writing.insert(k.clone(), (id, v.clone()));
                    self.written(SpillJob { key: k, id, value: v, path }, result, started.elapsed());
                }
            }
        }
    }

    /// The path for the next spill file (the directory is made at the first).
    fn next_path(&mut self) -> Result<PathBuf, String> {
        use std::os::unix::fs::DirBuilderExt;
        if !self.dir_made {
            // Private to this user, and ours alone: a directory someone else prepared under
            // the same name is refused rather than trusted.
            std::fs::DirBuilder::new().mode(0o700).create(&self.dir).map_err(|e| e.to_string())?;
            self.dir_made = true;
        }
        self.next_file += 1;
        Ok(self.dir.join(format!("{}.val", self.next_file)))
    }

    /// Better over the target than lost: keeps a result that cannot be spilled in memory, and
    /// says why.
    fn keep(&mut self, k: Key, v: Value, why: &str) {
        eprintln!("rask worker {}: cannot spill {k} to {}: {why}; keeping it in memory", self.name, self.dir.display());
        self.policy.kept(&k, v.nbytes() as u64);
        self.mem.insert(k, v);
    }

    /// A spill write finished (`Ok(bytes written)`): the result now lives in its file —
    /// unless it was freed, replaced or read back meanwhile, when the file is garbage.
    fn written(&mut self, job: SpillJob, result: Result<u64, String>, took: Duration) {
        let current = self.writing.get(&job.key).is_some_and(|(id, _)| *id == job.id);
        if !current {
            let rescued = self.rescued.get(&job.key) == Some(&job.id);
            if rescued {
                self.rescued.remove(&job.key);
            }
            match (rescued, result) {
                // Needed again while being written: the value stays in memory, and the file,
                // now complete, is kept for its next spill.
                (true, Ok(bytes)) => {
                    self.io.written += bytes;
                    self.io.write_time += took;
                    self.files.insert(job.key, job.path);
                }
                _ => {
                    let _ = std::fs::remove_file(&job.path);
                }
            }
            return;
        }
        self.writing.remove(&job.key);
        self.writing_bytes -= job.value.nbytes() as u64;
        match result {
            Ok(bytes) => {
                self.io.written += bytes;
                self.io.write_time += took;
                self.files.insert(job.key, job.path);
            }
            Err(e) => {
                let _ = std::fs::remove_file(&job.path);
                self.keep(job.key, job.value, &e);
            }
        }
    }

    /// The value of `key`, read back from disk if it was spilled; `None` if not held (or its
    /// file is unreadable, which is reported and treated as lost).
    pub(crate) fn get(&mut self, key: &Key) -> Option<Value> {
        if let Some(v) = self.mem.get(key) {
            if self.policy.limited() {
                self.policy.touched(key);
            }
            return Some(v.clone());
        }
        if let Some((id, v)) = self.writing.remove(key) {
            // On its way to disk and needed again: it stays in memory, and the write in flight
            // becomes the file of its next spill (see `rescued`).
            self.rescued.insert(key.clone(), id);
            self.writing_bytes -= v.nbytes() as u64;
            self.policy.unspilled(key);
            self.back_in_memory(key, v.clone());
            return Some(v);
        }
        let path = self.files.get(key)?.clone();
        let start = Instant::now();
        let read = std::fs::read(&path)
            .inspect(|b| self.io.read += b.len() as u64)
            .map_err(|e| e.to_string())
            .and_then(|b| rask_protocol::wire::value_from_bytes(Bytes::from(b)).map_err(|e| e.to_string()));
        self.io.read_time += start.elapsed();
        self.policy.unspilled(key);
        match read {
            Ok(v) => {
                // Back in memory, its file kept: should it be spilled again, nothing needs
                // writing (see `spill`).
                self.back_in_memory(key, v.clone());
                Some(v)
            }
            Err(e) => {
                self.drop_file(key);
                eprintln!("rask worker {}: spilled {key} is unreadable ({e}); it counts as lost", self.name);
                None
            }
        }
    }

    fn back_in_memory(&mut self, key: &Key, v: Value) {
        let nbytes = v.nbytes() as u64;
        self.mem.insert(key.clone(), v);
        let out = self.policy.stored(key, nbytes);
        self.spill(out);
    }

    pub(crate) fn remove(&mut self, key: &Key) {
        let old = self.mem.remove(key);
        if !self.policy.limited() {
            self.unlimited_bytes -= old.map_or(0, |v| v.nbytes() as u64);
            return;
        }
        self.forget_copies(key);
        self.policy.removed(key);
    }

    /// Drops `key`'s file and any write of it in flight (which then lands as garbage).
    fn forget_copies(&mut self, key: &Key) {
        self.drop_file(key);
        self.rescued.remove(key);
        if let Some((_, v)) = self.writing.remove(key) {
            self.writing_bytes -= v.nbytes() as u64;
        }
    }

    fn drop_file(&mut self, key: &Key) {
        if let Some(path) = self.files.remove(key) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// (bytes in memory, bytes on disk, disk traffic). Results being written count as on
    /// disk.
    pub(crate) fn usage(&self) -> (u64, u64, SpillIo) {
        let managed = if self.policy.limited() { self.policy.managed() } else { self.unlimited_bytes };
        (managed, self.policy.spilled(), self.io)
    }

    /// Bytes of results still in memory only because their spill file is being written: they
    /// count as given back when process memory is compared with the limit.
    pub(crate) fn writing_bytes(&self) -> u64 {
        self.writing_bytes
    }
}

impl Drop for DataStore {
    fn drop(&mut self) {
        if self.dir_made {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The writer thread: writes each queued file, then books it in the store. Ends with the store
/// (its queue closes when the store is dropped).
fn write_loop(store: &Weak<Mutex<DataStore>>, jobs: &std::sync::mpsc::Receiver<SpillJob>) {
    while let Ok(job) = jobs.recv() {
        let started = Instant::now();
        let result = write_file(&job.path, &job.value);
        let took = started.elapsed();
        match store.upgrade() {
            Some(store) => lock(&store).written(job, result, took),
            None => {
                let _ = std::fs::remove_file(&job.path);
                return;
            }
        }
    }
}

/// Encodes `v` into a new file readable by its owner only; returns the bytes written.
fn write_file(path: &std::path::Path, v: &Value) -> Result<u64, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = rask_protocol::wire::value_to_bytes(v).map_err(|e| e.to_string())?;
    let mut f =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| e.to_string())?;
    f.write_all(&bytes).map_err(|e| e.to_string())?;
    Ok(bytes.len() as u64)
}

/// This process's resident memory in bytes (Linux; `None` elsewhere).
pub(crate) fn process_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// CPU time this process has used so far, all threads, in microseconds (0 if unknown).
pub(crate) fn process_cpu_us() -> u64 {
    // /proc/self/stat fields 14 and 15 (utime, stime) in clock ticks; the command name (field
    // 2) may hold spaces, so count from the closing parenthesis.
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0 };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // Fields after ")" start at field 3 (state): utime is field 14 → index 11.
    let total = ticks(11) + ticks(12);
    // USER_HZ is 100 on every Linux configuration that matters.
    total * 10_000
}

/// A worker name as a file name component.
fn sanitize(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

/// Spill directories of worker processes that no longer exist (killed before they could clean
/// up) are removed when a worker starts.
pub(crate) fn remove_stale_spill_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("rask-spill-") else { continue };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: usize, seed: u8) -> Value {
        Value::Bytes(Bytes::from(vec![seed; n]))
    }

    #[test]
    fn store_spills_over_its_target_reads_back_and_cleans_up() {
        let mut s = DataStore::new(&format!("unit-{}", std::process::id()), Some(1000)); // target 600 B
        s.insert(Key::new("a"), blob(400, 1));
        s.insert(Key::new("b"), blob(400, 2)); // a (least recently used) goes to disk
        let (managed, spilled, _) = s.usage();
        assert!(managed <= 600 && spilled >= 400, "{managed} {spilled}");
        assert_eq!(s.files.len(), 1);
        let dir = s.dir.clone();
        assert!(dir.exists());
        assert_eq!(s.get(&Key::new("a")), Some(blob(400, 1)), "read back transparently");
        assert!(s.io.read >= 400 && s.io.written >= 400);
        // Reading a back pushed b out (written); reading b back pushes a out again, whose file
        // was kept: each value is written once however often it moves.
        assert_eq!(s.files.len(), 2);
        let once = s.io.written;
        for _ in 0..3 {
            assert_eq!(s.get(&Key::new("b")), Some(blob(400, 2)));
            assert_eq!(s.get(&Key::new("a")), Some(blob(400, 1)));
        }
        assert_eq!(s.io.written, once, "no value is written twice");
        assert!(s.io.read >= 6 * 400);
        assert!(s.usage().0 <= 600, "still under the target");
        // A new value under the same key replaces the old file.
        s.insert(Key::new("a"), blob(300, 9));
        assert_eq!(s.get(&Key::new("a")), Some(blob(300, 9)));
        s.remove(&Key::new("a"));
        s.remove(&Key::new("b"));
        assert_eq!(s.usage().0 + s.usage().1, 0);
        assert!(s.files.is_empty(), "freed values leave the disk");
        drop(s);
        assert!(!dir.exists(), "the spill directory goes with the store");
    }

    #[test]
    fn store_without_a_limit_only_counts_bytes() {
        let mut s = DataStore::new("unlimited", None);
        s.insert(Key::new("a"), blob(400, 1));
        s.insert(Key::new("a"), blob(100, 1)); // replaced
        s.insert(Key::new("b"), blob(50, 2));
        let size = |v: Value| v.nbytes() as u64;
        assert_eq!(s.usage().0, size(blob(100, 1)) + size(blob(50, 2)));
        assert_eq!(s.get(&Key::new("b")), Some(blob(50, 2)));
        s.remove(&Key::new("a"));
        assert_eq!((s.usage().0, s.usage().1), (size(blob(50, 2)), 0));
        assert!(s.files.is_empty() && !s.dir_made);
    }

    /// A store whose writer queue the test drains by hand, to order writes against reads.
    fn store_with_manual_writer(name: &str, limit: u64) -> (DataStore, std::sync::mpsc::Receiver<SpillJob>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut s = DataStore::new(&format!("{name}-{}", std::process::id()), Some(limit));
        s.writer = Some(tx);
        (s, rx)
    }

    fn land(s: &mut DataStore, job: SpillJob) {
        let result = write_file(&job.path, &job.value);
        s.written(job, result, Duration::ZERO);
    }

    #[test]
    fn a_result_needed_while_its_file_is_written_is_written_once() {
        let (mut s, jobs) = store_with_manual_writer("rescue", 1000); // target 600 B
        s.insert(Key::new("a"), blob(400, 1));
        s.insert(Key::new("b"), blob(400, 2)); // a is queued for writing
        let first = jobs.try_recv().expect("a's write");
        assert_eq!(s.get(&Key::new("a")), Some(blob(400, 1)), "served while in flight");
        // Reading a pushed b out (queued); reading b pushes a out again: no second write of a.
        let b_job = jobs.try_recv().expect("b's write");
        assert_eq!(s.get(&Key::new("b")), Some(blob(400, 2)));
        assert!(jobs.try_recv().is_err(), "a waits for its write in flight");
        land(&mut s, first);
        land(&mut s, b_job);
        assert!(s.files.contains_key(&Key::new("a")), "the landed write is a's file");
        assert_eq!(s.get(&Key::new("a")), Some(blob(400, 1)), "read back from that file");
        // Freed while in flight: the landing write removes its file.
        s.insert(Key::new("c"), blob(400, 3));
        while let Ok(job) = jobs.try_recv() {
            let path = job.path.clone();
            s.remove(&job.key.clone());
            land(&mut s, job);
            assert!(!path.exists(), "a write of a freed result leaves no file");
        }
        let (managed, spilled, _) = s.usage();
        assert!(managed <= 600, "{managed} {spilled}");
    }

    #[test]
    fn a_backlog_of_a_whole_limit_is_written_on_the_spot() {
        let (mut s, jobs) = store_with_manual_writer("backlog", 1000); // target 600 B
        for i in 0..6u8 {
            s.insert(Key::from(format!("k{i}")), blob(300, i));
        }
        // Nothing lands: the queue holds at most the limit's worth, the rest went to disk here.
        let queued: Vec<SpillJob> = jobs.try_iter().collect();
        assert!(s.writing_bytes() <= 1000, "{} bytes waiting", s.writing_bytes());
        assert!(!queued.is_empty() && !s.files.is_empty(), "{} queued, {} written", queued.len(), s.files.len());
        for i in 0..6u8 {
            assert_eq!(s.get(&Key::from(format!("k{i}"))), Some(blob(300, i)));
        }
        for job in queued {
            land(&mut s, job);
        }
    }

    /// Waits (bounded) until the writer thread has written everything queued.
    fn drained(store: &Store) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !lock(store).writing.is_empty() {
            assert!(Instant::now() < deadline, "spill writes did not finish");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_writer_thread_spills_while_results_stay_readable() {
        let store = DataStore::start(&format!("writer-{}", std::process::id()), Some(1000)); // target 600 B
        for i in 0..10u8 {
            lock(&store).insert(Key::from(format!("k{i}")), blob(200, i));
        }
        // Whatever is in flight is still served.
        for i in 0..10u8 {
            assert_eq!(lock(&store).get(&Key::from(format!("k{i}"))), Some(blob(200, i)));
        }
        drained(&store);
        let (managed, spilled, io) = lock(&store).usage();
        assert!(managed <= 600, "{managed}");
        assert_eq!(managed + spilled, 10 * blob(200, 0).nbytes() as u64, "every byte counted once");
        assert!(io.written > 0 && lock(&store).writing_bytes() == 0);
        // Freed while (or after) being written: no file is left behind.
        for i in 0..10u8 {
            lock(&store).remove(&Key::from(format!("k{i}")));
        }
        let dir = lock(&store).dir.clone();
        // A write that lands after its result was freed removes its own file.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_dir(&dir).map_or(0, |d| d.count()) > 0 {
            assert!(Instant::now() < deadline, "freed results leave no file");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(lock(&store).files.is_empty());
        drop(store);
        assert!(!dir.exists(), "the spill directory goes with the store");
    }
}
