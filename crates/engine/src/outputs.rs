//! Files kept by content (SHA-256) in the data dir (or the shared artifacts folder):
//! outputs, so they outlive the backend that made them and a cached rerun that names an
//! earlier run's file still gets the bytes it had (PROTOCOL.md pitfall 13); and jobs'
//! input attachments, stored once however many jobs use them.

use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct ContentStore {
    dir: PathBuf,
}

impl ContentStore {
    /// Output files, under `root/outputs`.
    pub fn outputs(root: &Path) -> ContentStore {
        ContentStore {
            dir: root.join("outputs"),
        }
    }

    /// Input attachments, under `root/inputs`.
    pub fn attachments(root: &Path) -> ContentStore {
        ContentStore {
            dir: root.join("inputs"),
        }
    }

    /// Whether a file with this hash is stored (a well-formed hash, and on disk).
    pub async fn has(&self, sha256: &str) -> bool {
        match self.path(sha256) {
            Some(p) => tokio::fs::try_exists(&p).await.unwrap_or(false),
            None => false,
        }
    }

    /// The size of a stored file; `None` when there is none with this hash.
    pub async fn size(&self, sha256: &str) -> Option<u64> {
        let path = self.path(&sha256.to_ascii_lowercase())?;
        tokio::fs::metadata(path).await.ok().map(|m| m.len())
    }

    /// The bytes of a stored file.
    pub async fn read(&self, sha256: &str) -> std::io::Result<bytes::Bytes> {
        let path = self.path(sha256).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a SHA-256 hash")
        })?;
        tokio::fs::read(path).await.map(bytes::Bytes::from)
    }

    /// Where a file with this hash lives; `None` for anything that is not a hash.
    pub fn path(&self, sha256: &str) -> Option<PathBuf> {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some(self.dir.join(&sha256[..2]).join(sha256))
    }

    /// Store `bytes` and answer their hash. Writing the same bytes twice is harmless:
    /// the file is written beside its final name and renamed into place. It is on disk
    /// (file and directory entry synced) before this returns, because the job's success
    /// that names it is committed next and must never point at a file a power cut lost.
    pub async fn put(&self, bytes: bytes::Bytes) -> std::io::Result<String> {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let dir = self.dir.join(&sha256[..2]);
        let path = dir.join(&sha256);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(sha256);
        }
        tokio::fs::create_dir_all(&dir).await?;
        let tmp = dir.join(format!("{sha256}.{}.tmp", uuid::Uuid::new_v4()));
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(sha256)
    }
}

/// A content type for an output file, from its extension.
pub fn content_type(filename: &str) -> &'static str {
    let ext = filename.rsplit('.').next().unwrap_or_default();
    match ext.to_ascii_lowercase().as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "flac" => "audio/flac",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

/// A name as one percent-encoded URL path segment (an output's name in its URL).
pub fn url_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
