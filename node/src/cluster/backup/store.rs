//! The backup store: a directory or an S3 bucket (`s3://bucket/prefix`) behind one object-store
//! API (the `object_store` crate), holding content-addressed files and manifests
//! (`manifest::file_path`, `manifest::manifest_path`). In a directory, manifests, markers and
//! archive segments are fsynced one by one; a backup's files are written unsynced and made
//! durable together by [`BackupStore::sync`].

use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::BackupError;
use crate::config::BackupSection;

/// What a destination string names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Directory(std::path::PathBuf),
    S3 { bucket: String, prefix: String },
}

impl Destination {
    /// `s3://bucket[/prefix]`, or a directory path (absolute, relative, or `file://...`).
    pub fn parse(text: &str) -> Result<Destination, BackupError> {
        let invalid = |why: &str| BackupError::Destination(text.to_string(), why.to_string());
        let text = text.trim();
        if text.is_empty() {
            return Err(invalid("empty: give a directory or s3://bucket/prefix (or set backup.destination)"));
        }
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid_bucket = (3..=63).contains(&bucket.len())
                && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
            if !valid_bucket {
                return Err(invalid("not an S3 bucket name (3-63 lowercase letters, digits, '-', '.')"));
            }
            return Ok(Destination::S3 { bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() });
        }
        if text.contains("://") && !text.starts_with("file://") {
            return Err(invalid("only directories and s3:// are supported"));
        }
        Ok(Destination::Directory(text.trim_start_matches("file://").into()))
    }
}

/// An opened backup store.
#[derive(Clone)]
pub struct BackupStore {
    store: Arc<dyn ObjectStore>,
    prefix: Option<StorePath>,
    /// A directory store's second handle on the same directory that does not fsync each file
    /// ([`BackupStore::put_unsynced`]), and the directory ([`BackupStore::sync`]).
    unsynced: Option<(Arc<dyn ObjectStore>, std::path::PathBuf)>,
    /// The destination as given, for messages.
    pub name: String,
}

impl std::fmt::Debug for BackupStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackupStore({})", self.name)
    }
}

/// An object listed in the store.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The path under the store's prefix.
    pub path: String,
    pub size: u64,
    pub modified_us: u64,
}

impl BackupStore {
    /// Opens `destination` (see [`Destination::parse`]); a directory is created if missing.
    /// `create` false: the directory must exist (reading a backup).
    pub fn open(destination: &str, settings: &BackupSection, create: bool) -> Result<BackupStore, BackupError> {
        let invalid = |why: String| BackupError::Destination(destination.to_string(), why);
        let mut unsynced: Option<(Arc<dyn ObjectStore>, std::path::PathBuf)> = None;
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match Destination::parse(destination)? {
            Destination::Directory(dir) => {
                if create {
                    std::fs::create_dir_all(&dir).map_err(|e| invalid(format!("cannot create the directory: {e}")))?;
                } else if !dir.is_dir() {
                    return Err(invalid("no such directory".into()));
                }
                // Files and manifests reach the disk before they count.
                let local = |fsync: bool| {
                    object_store::local::LocalFileSystem::new_with_prefix(&dir)
                        .map(|store| store.with_automatic_cleanup(true).with_fsync(fsync))
                        .map_err(|e| invalid(e.to_string()))
                };
                unsynced = Some((Arc::new(local(false)?), dir.clone()));
                (Arc::new(local(true)?), String::new())
            }
            Destination::S3 { bucket, prefix } => {
                let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
                if !settings.s3_endpoint.is_empty() {
                    builder = builder.with_endpoint(settings.s3_endpoint.clone());
                }
                if !settings.s3_region.is_empty() {
                    builder = builder.with_region(settings.s3_region.clone());
                }
                if settings.s3_allow_http {
                    builder = builder.with_allow_http(true);
                }
                (Arc::new(builder.build().map_err(|e| invalid(e.to_string()))?), prefix)
            }
        };
        let prefix = (!prefix.is_empty()).then(|| StorePath::from(prefix.as_str()));
        Ok(BackupStore { store, prefix, unsynced, name: destination.to_string() })
    }

    fn path(&self, relative: &str) -> StorePath {
        let relative = StorePath::from(relative);
        match &self.prefix {
            Some(prefix) => prefix.parts().chain(relative.parts()).collect(),
            None => relative,
        }
    }

    fn failed(&self, what: &str, relative: &str, error: object_store::Error) -> BackupError {
        BackupError::Store(format!("{what} {relative} in {}: {error}", self.name))
    }

    /// Whether an object exists.
    pub async fn exists(&self, relative: &str) -> Result<bool, BackupError> {
        Ok(self.size(relative).await?.is_some())
    }

    /// The size of an object, if it exists.
    pub async fn size(&self, relative: &str) -> Result<Option<u64>, BackupError> {
        match self.store.head(&self.path(relative)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(self.failed("checking", relative, error)),
        }
    }

    /// The directory of a directory store (its files can be read back to check them).
    pub fn directory(&self) -> Option<&std::path::Path> {
        self.unsynced.as_ref().map(|(_, dir)| dir.as_path())
    }

    /// Writes an object whole (replacing it) that need not be durable until [`BackupStore::sync`]
    /// returns: in a directory, without an fsync of its own. A backup's files go this way and
    /// are synced once per copied replica, before the manifest can name them: an fsync per file
    /// on the disk that holds the Raft log delays the log's own syncs (`docs/performance.md`).
    /// S3 writes are durable when they return.
    pub async fn put_unsynced(&self, relative: &str, bytes: Vec<u8>) -> Result<(), BackupError> {
        let Some((store, _)) = &self.unsynced else { return self.put(relative, bytes).await };
        store
            .put(&self.path(relative), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.failed("writing", relative, e))
    }

    /// Makes every [`BackupStore::put_unsynced`] before it durable: one `syncfs` of the
    /// directory's filesystem (its data and the renames that named the files), on a blocking
    /// thread. Nothing to do for S3.
    pub async fn sync(&self) -> Result<(), BackupError> {
        let Some(dir) = self.directory().map(std::path::Path::to_path_buf) else { return Ok(()) };
        let synced = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&dir)?;
            rustix::fs::syncfs(&file).map_err(std::io::Error::from)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|result| result);
        synced.map_err(|e| BackupError::Store(format!("syncing {}: {e}", self.name)))
    }

    /// Writes an object whole (replacing it).
    pub async fn put(&self, relative: &str, bytes: Vec<u8>) -> Result<(), BackupError> {
        self.store
            .put(&self.path(relative), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.failed("writing", relative, e))
    }

    /// Writes an object only if none exists at `relative`: `true` if this call wrote it. Atomic
    /// where the store supports it (a directory; S3 with conditional writes); elsewhere checked
    /// first, then written.
    pub async fn put_if_absent(&self, relative: &str, bytes: Vec<u8>) -> Result<bool, BackupError> {
        let options: object_store::PutOptions = object_store::PutMode::Create.into();
        match self.store.put_opts(&self.path(relative), PutPayload::from(bytes.clone()), options).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => Ok(false),
            Err(object_store::Error::NotImplemented { .. }) => {
                if self.exists(relative).await? {
                    return Ok(false);
                }
                self.put(relative, bytes).await.map(|()| true)
            }
            Err(error) => Err(self.failed("writing", relative, error)),
        }
    }

    /// Reads an object whole; `Ok(None)` if it does not exist.
    pub async fn get(&self, relative: &str) -> Result<Option<Vec<u8>>, BackupError> {
        let result = match self.store.get(&self.path(relative)).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(self.failed("reading", relative, error)),
        };
        result.bytes().await.map(|b| Some(b.to_vec())).map_err(|e| self.failed("reading", relative, e))
    }

    pub async fn delete(&self, relative: &str) -> Result<(), BackupError> {
        match self.store.delete(&self.path(relative)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(self.failed("deleting", relative, error)),
        }
    }

    /// Every object under `relative_dir`.
    pub async fn list(&self, relative_dir: &str) -> Result<Vec<Listed>, BackupError> {
        let base = self.path(relative_dir);
        let listed: Vec<object_store::ObjectMeta> =
            self.store.list(Some(&base)).try_collect().await.map_err(|e| self.failed("listing", relative_dir, e))?;
        Ok(listed
            .into_iter()
            .map(|meta| {
                let path = match &self.prefix {
                    Some(prefix) => match meta.location.prefix_match(prefix) {
                        Some(parts) => parts.map(|p| p.as_ref().to_string()).collect::<Vec<_>>().join("/"),
                        None => meta.location.to_string(),
                    },
                    None => meta.location.to_string(),
                };
                Listed { path, size: meta.size, modified_us: meta.last_modified.timestamp_micros().max(0) as u64 }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse() {
        assert_eq!(
            Destination::parse("s3://backups/prod/stemedb/").expect("s3"),
            Destination::S3 { bucket: "backups".into(), prefix: "prod/stemedb".into() }
        );
        assert_eq!(
            Destination::parse("s3://backups").expect("s3"),
            Destination::S3 { bucket: "backups".into(), prefix: String::new() }
        );
        assert_eq!(Destination::parse("/var/backups/x").expect("dir"), Destination::Directory("/var/backups/x".into()));
        assert_eq!(Destination::parse("file:///tmp/b").expect("dir"), Destination::Directory("/tmp/b".into()));
        for bad in ["", "s3://", "s3://UPPER/x", "gs://bucket/x", "http://host/x"] {
            assert!(matches!(Destination::parse(bad), Err(BackupError::Destination(..))), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_directory_store_writes_reads_lists_and_deletes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("b").to_string_lossy().to_string();
        assert!(BackupStore::open(&dest, &BackupSection::default(), false).is_err(), "missing directory");
        let store = BackupStore::open(&dest, &BackupSection::default(), true).expect("opens");
        assert!(!store.exists("files/ab/abc").await.expect("head"));
        store.put("files/ab/abc", b"hello".to_vec()).await.expect("put");
        assert!(store.exists("files/ab/abc").await.expect("head"));
        assert_eq!(store.get("files/ab/abc").await.expect("get"), Some(b"hello".to_vec()));
        assert_eq!(store.get("files/ab/nope").await.expect("get"), None);
        let listed = store.list("files").await.expect("list");
        assert_eq!(listed.iter().map(|l| (l.path.as_str(), l.size)).collect::<Vec<_>>(), vec![("files/ab/abc", 5)]);
        store.delete("files/ab/abc").await.expect("delete");
        store.delete("files/ab/abc").await.expect("deleting twice is fine");
        assert!(store.list("files").await.expect("list").is_empty());
    }
}
