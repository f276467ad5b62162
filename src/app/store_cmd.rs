//! `store stats | dump | quarantine`: read-only views of the local feedback store. Kinds and model
//! versions come from feedback records, so text goes through [`crate::sanitize`] and JSON lines
//! through [`crate::sanitize::json_text`].

use std::io::{BufWriter, Write};

use anyhow::{Context, Result};

use super::output::{json, text};
use crate::cli::{Format, StoreCommand};
use crate::config::Settings;
use crate::feedback::Store;
use crate::sanitize::{json_text, terminal_line};

pub fn run(settings: &Settings, cmd: StoreCommand, format: Format) -> Result<()> {
    let store = Store::open(&settings.store.dir)?;
    match cmd {
        StoreCommand::Stats => {
            let stats = store.stats()?;
            match format {
                Format::Json => json(&stats),
                Format::Text => {
                    let mut out = format!(
                        "store {}\nrecords: {}\n",
                        store.path().display(),
                        stats.records
                    );
                    for (kind, n) in &stats.by_kind {
                        out.push_str(&format!("  {}: {n}\n", terminal_line(kind)));
                    }
                    out.push_str("by model version:\n");
                    for (version, kinds) in &stats.by_model_version {
                        let parts: Vec<String> = kinds
                            .iter()
                            .map(|(k, n)| format!("{} {n}", terminal_line(k)))
                            .collect();
                        out.push_str(&format!(
                            "  {}: {}\n",
                            terminal_line(version),
                            parts.join(", ")
                        ));
                    }
                    out.push_str(&format!(
                        "watermark: {}\ntombstones: {}\nquarantined: {}",
                        terminal_line(stats.watermark.as_deref().unwrap_or("none")),
                        stats.tombstones,
                        stats.quarantined
                    ));
                    if stats.pull_in_progress {
                        out.push_str("\nan interrupted pull will resume from its saved cursor");
                    }
                    text(&out);
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
                sink.write_all(json_text(line).as_bytes())?;
                sink.write_all(b"\n")?;
                Ok(())
            })?;
            sink.flush()?;
            Ok(())
        }
        StoreCommand::Quarantine => {
            for q in store.quarantined()? {
                println!("{}", json_text(&serde_json::to_string(&q)?));
            }
            Ok(())
        }
    }
}
