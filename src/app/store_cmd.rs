//! `store stats | dump | quarantine`: read-only views of the local feedback store.

use std::io::{BufWriter, Write};

use anyhow::{Context, Result};

use super::output::json;
use crate::cli::{Format, StoreCommand};
use crate::config::Settings;
use crate::feedback::Store;

pub fn run(settings: &Settings, cmd: StoreCommand, format: Format) -> Result<()> {
    let store = Store::open(&settings.store.dir)?;
    match cmd {
        StoreCommand::Stats => {
            let stats = store.stats()?;
            match format {
                Format::Json => json(&stats),
                Format::Text => {
                    println!("store {}", store.path().display());
                    println!("records: {}", stats.records);
                    for (kind, n) in &stats.by_kind {
                        println!("  {kind}: {n}");
                    }
                    println!("by model version:");
                    for (version, kinds) in &stats.by_model_version {
                        let parts: Vec<String> =
                            kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
                        println!("  {version}: {}", parts.join(", "));
                    }
                    println!(
                        "watermark: {}",
                        stats.watermark.as_deref().unwrap_or("none")
                    );
                    println!("tombstones: {}", stats.tombstones);
                    println!("quarantined: {}", stats.quarantined);
                    if stats.pull_in_progress {
                        println!("an interrupted pull will resume from its saved cursor");
                    }
                    Ok(())
                }
            }
        }
        StoreCommand::Dump { out } => {
            let sink: Box<dyn Write> = match &out {
                Some(path) => Box::new(
                    std::fs::File::create(path)
                        .with_context(|| format!("creating {}", path.display()))?,
                ),
                None => Box::new(std::io::stdout().lock()),
            };
            let mut sink = BufWriter::new(sink);
            store.for_each_json(|line| {
                sink.write_all(line.as_bytes())?;
                sink.write_all(b"\n")?;
                Ok(())
            })?;
            sink.flush()?;
            Ok(())
        }
        StoreCommand::Quarantine => {
            for q in store.quarantined()? {
                println!("{}", serde_json::to_string(&q)?);
            }
            Ok(())
        }
    }
}
