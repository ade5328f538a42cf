//! `podvisor image ...`: pull, list, inspect, remove, import and prune the
//! images of the store (`/var/lib/podvisor/images` unless configured).

use std::collections::HashMap;
use std::fs::File;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use image::{ImageRecord, ImagesConfig, Store};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use nix::fcntl::{Flock, FlockArg};
use sandbox::pool;

#[derive(Args)]
pub struct ImageArgs {
    /// The image store's directory (default: `root` of the config file's
    /// [images] table, else /var/lib/podvisor/images).
    #[arg(long, global = true)]
    image_root: Option<PathBuf>,
    /// podvisor's config file (its [images] table).
    #[arg(long, global = true, env = "PODVISOR_CONFIG", default_value = pool::DEFAULT_CONFIG)]
    config: PathBuf,
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Pull an image from a registry (linux/amd64); prints its digest.
    Pull(PullArgs),
    /// List stored images.
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Print a stored image's record, manifest and config as JSON.
    Inspect { reference: String },
    /// Remove stored images and the blobs no other image uses.
    Rm {
        #[arg(required = true)]
        references: Vec<String>,
    },
    /// Store the images of a docker-archive or oci-archive tarball.
    Import {
        file: PathBuf,
        /// Store the image under this name instead of the archive's.
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove blobs no image uses and what interrupted pulls left.
    Prune,
    /// Make a stored image's block root (its layers as one read-only ext4
    /// filesystem, as `sandbox run --image` uses it) if it is not made yet;
    /// prints its path.
    Root { reference: String },
}

#[derive(Args)]
struct PullArgs {
    reference: String,
    /// Verify the registry's TLS certificate; with false, any certificate
    /// is taken and plain HTTP is tried if the registry has no TLS.
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true",
          action = clap::ArgAction::Set)]
    tls_verify: bool,
    /// Print only the digest: no progress, no summary.
    #[arg(long, short)]
    quiet: bool,
    /// Seconds a connection or a stalled transfer may take (default 30, or
    /// `timeout_secs` of [images]).
    #[arg(long)]
    timeout: Option<u64>,
}

#[derive(Args)]
struct LsArgs {
    /// table or json.
    #[arg(long, default_value = "table", value_parser = ["table", "json"])]
    format: String,
}

/// The image store (`image_root`, else the config file's, else the
/// default) and the config file's [images] table.
pub fn open_store(
    image_root: Option<&Path>,
    config: &Path,
) -> anyhow::Result<(Store, ImagesConfig)> {
    let config = ImagesConfig::load(config)?;
    let root = image_root
        .map(Path::to_path_buf)
        .or(config.root.clone())
        .unwrap_or_else(|| PathBuf::from(image::store::DEFAULT_ROOT));
    let store = Store::open(&root)
        .with_context(|| format!("opening the image store {}", root.display()))?;
    Ok((store, config))
}

/// The stored image `reference`, pulled first (quietly) if it is not stored.
pub async fn find_or_pull(
    store: &Store,
    config: &ImagesConfig,
    reference: &str,
    tls_verify: bool,
) -> anyhow::Result<ImageRecord> {
    if let Ok(found) = find(store, reference) {
        return Ok(found);
    }
    let options = pull_options(config, tls_verify, None, None);
    let pulled = image::pull(store, reference, &options)
        .await
        .with_context(|| format!("pulling {reference}"))?;
    Ok(pulled.image)
}

fn pull_options(
    config: &ImagesConfig,
    tls_verify: bool,
    timeout: Option<u64>,
    progress: Option<Arc<dyn image::Progress>>,
) -> image::PullOptions {
    let secs = timeout.or(config.timeout_secs).unwrap_or(30).max(1);
    image::PullOptions {
        tls_verify,
        insecure_registries: config.insecure_registries.clone(),
        connect_timeout: Duration::from_secs(secs.min(10)),
        read_timeout: Duration::from_secs(secs),
        progress,
        ..image::PullOptions::default()
    }
}

/// Where `sandbox run --image` and `template create --image` get images.
pub struct ImageSource<'a> {
    pub image_root: Option<&'a Path>,
    pub config: &'a Path,
    pub tls_verify: bool,
}

impl ImageSource<'_> {
    /// Image `reference`'s block root (pulled and built on first use) with
    /// an empty filesystem of `disk_mib` for writable layers, its config
    /// blob, and a shared lock on it that keeps `image rm` from removing it.
    pub async fn block_root(
        &self,
        reference: &str,
        disk_mib: u64,
    ) -> anyhow::Result<(sandbox::BlockRoot, Vec<u8>, Flock<File>)> {
        let (store, config) = open_store(self.image_root, self.config)?;
        let record = find_or_pull(&store, &config, reference, self.tls_verify).await?;
        let config_blob = store.read_blob(&record.config)?;
        let (image, empty) = tokio::task::spawn_blocking(move || {
            let limits = image::unpack::Limits::default();
            let image = image::blockroot::block_root(&store, &record, &limits)
                .with_context(|| format!("making a block root of {}", record.name))?;
            let empty = image::blockroot::empty_fs(&store, disk_mib)?;
            Ok::<_, anyhow::Error>((image, empty))
        })
        .await??;
        let lock = hold_root(&image)?;
        Ok((sandbox::BlockRoot { image, empty }, config_blob, lock))
    }
}

/// Where a block root's users hold a shared lock: `image rm` refuses an
/// image while one is held (a running `sandbox run --image`).
pub fn users_lock(root: &Path) -> PathBuf {
    root.with_extension("users")
}

/// Holds (shared) the users lock of the block root `root` until dropped.
fn hold_root(root: &Path) -> anyhow::Result<Flock<File>> {
    let path = users_lock(root);
    let file = File::create(&path).with_context(|| format!("{}", path.display()))?;
    Flock::lock(file, FlockArg::LockShared)
        .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", path.display()))
}

/// Who uses `record`'s block root: a running sandbox, or a template of
/// the state root `state_root`.
fn used_by(
    store: &Store,
    record: &ImageRecord,
    state_root: &Path,
) -> anyhow::Result<Option<String>> {
    let root = image::blockroot::root_path(store, record)?;
    let path = users_lock(&root);
    if let Ok(file) = File::open(&path) {
        if let Err((_, nix::Error::EWOULDBLOCK)) =
            Flock::lock(file, FlockArg::LockExclusiveNonblock)
        {
            return Ok(Some("a running sandbox".into()));
        }
    }
    for t in sandbox::template::Template::list(state_root)
        .into_iter()
        .flatten()
    {
        if t.meta.block_root.as_ref().is_some_and(|b| b.image == root) {
            return Ok(Some(format!("template {}", t.meta.name)));
        }
    }
    Ok(None)
}

pub async fn run(args: ImageArgs, state_root: &Path) -> anyhow::Result<u8> {
    let (store, config) = open_store(args.image_root.as_deref(), &args.config)?;
    match args.command {
        ImageCommand::Pull(p) => pull(&store, &config, p).await,
        ImageCommand::Ls(l) => list(&store, &l.format),
        ImageCommand::Inspect { reference } => inspect(&store, &reference),
        ImageCommand::Rm { references } => {
            for r in references {
                let found = find(&store, &r)?;
                if let Some(user) = used_by(&store, &found, state_root)? {
                    anyhow::bail!("image {} is in use by {user}", found.name);
                }
                store.remove_image(&found.name).await?;
                image::blockroot::collect(&store)?;
                println!("{}", found.name);
            }
            Ok(0)
        }
        ImageCommand::Import { file, name } => {
            let images = image::import(&store, &file, name.as_deref())
                .await
                .with_context(|| format!("importing {}", file.display()))?;
            for i in images {
                println!("{} {}", i.name, i.digest);
            }
            Ok(0)
        }
        ImageCommand::Root { reference } => {
            let found = find(&store, &reference)?;
            let limits = image::unpack::Limits::default();
            let root = tokio::task::spawn_blocking(move || {
                image::blockroot::block_root(&store, &found, &limits)
                    .with_context(|| format!("making a block root of {}", found.name))
            })
            .await??;
            println!("{}", root.display());
            Ok(0)
        }
        ImageCommand::Prune => {
            let r = store.prune().await?;
            let roots = image::blockroot::collect(&store)?;
            println!(
                "removed {} blobs ({}) and {} leftovers of interrupted writes",
                r.blobs,
                human_size(r.bytes + roots),
                r.leftovers
            );
            Ok(0)
        }
    }
}

async fn pull(store: &Store, config: &ImagesConfig, args: PullArgs) -> anyhow::Result<u8> {
    let progress: Option<Arc<dyn image::Progress>> =
        (!args.quiet && std::io::stderr().is_terminal()).then(|| Arc::new(Bars::default()) as _);
    let options = pull_options(config, args.tls_verify, args.timeout, progress);
    let pulled = image::pull(store, &args.reference, &options)
        .await
        .with_context(|| format!("pulling {}", args.reference))?;
    if !args.quiet {
        eprintln!(
            "pulled {}: {} blobs fetched ({}), {} already stored",
            pulled.image.name,
            pulled.fetched,
            human_size(pulled.bytes_fetched),
            pulled.present
        );
    }
    println!("{}", pulled.image.digest);
    Ok(0)
}

fn find(store: &Store, reference: &str) -> anyhow::Result<ImageRecord> {
    Ok(store.find(reference, image::normalize(reference).as_deref())?)
}

fn list(store: &Store, format: &str) -> anyhow::Result<u8> {
    let images = store.images()?;
    if format == "json" {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(0);
    }
    let now = image::store::now_secs();
    println!("{:<50} {:<19} {:>10}  AGE", "NAME", "DIGEST", "SIZE");
    for i in images {
        println!(
            "{:<50} {:<19} {:>10}  {}",
            i.name,
            &i.digest[..i.digest.len().min(19)],
            human_size(i.size),
            age(now.saturating_sub(i.created))
        );
    }
    Ok(0)
}

fn inspect(store: &Store, reference: &str) -> anyhow::Result<u8> {
    let i = find(store, reference)?;
    let json_blob = |digest: &str| -> anyhow::Result<serde_json::Value> {
        serde_json::from_slice(&store.read_blob(digest)?)
            .with_context(|| format!("blob {digest} is not JSON"))
    };
    let out = serde_json::json!({
        "image": i,
        "manifest": json_blob(&i.digest)?,
        "config": json_blob(&i.config)?,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(0)
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["kB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1000.0;
    let mut unit = 0;
    while v >= 1000.0 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs} seconds ago"),
        60..3600 => format!("{} minutes ago", secs / 60),
        3600..86400 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}

/// A progress bar per blob on the terminal: bytes and rate.
#[derive(Default)]
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl image::Progress for Bars {
    fn start(&self, digest: &str, size: u64) {
        let bar = self.multi.add(ProgressBar::new(size));
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(digest[..digest.len().min(19)].to_string());
        if let Ok(mut bars) = self.bars.lock() {
            bars.insert(digest.to_string(), bar);
        }
    }

    fn advance(&self, digest: &str, bytes: u64) {
        if let Some(b) = self.bars.lock().ok().and_then(|b| b.get(digest).cloned()) {
            b.inc(bytes);
        }
    }

    fn finish(&self, digest: &str) {
        if let Some(b) = self.bars.lock().ok().and_then(|mut b| b.remove(digest)) {
            b.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_as_people_write_them() {
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1_500_000), "1.5 MB");
        assert_eq!(age(59), "59 seconds ago");
        assert_eq!(age(7200), "2 hours ago");
    }
}
