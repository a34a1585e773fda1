//! `xent merge`: summaries of shards scored apart, merged exactly into the summary of one run.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use xent::Summary;

use super::{output_kind, Kind};

/// Flags of `xent merge`.
#[derive(clap::Args)]
pub struct MergeArgs {
    /// Summary files written by `xent score --summary-out`.
    #[arg(required = true)]
    summaries: Vec<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Write the merged summary (mergeable again).
    #[arg(long)]
    summary_out: Option<PathBuf>,
}

/// Runs `xent merge`.
///
/// # Errors
/// A summary file that cannot be read or is not an xent summary, or an output that cannot be written.
pub fn run(a: &MergeArgs) -> Result<()> {
    // The first file says which kind of summaries these are; every other must be the same kind.
    let kinds = a
        .summaries
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).with_context(|| p.display().to_string())?;
            let v: serde_json::Value =
                serde_json::from_slice(&bytes).map_err(|e| anyhow!("{}: not JSON: {e}", p.display()))?;
            let text = String::from_utf8(bytes).map_err(|e| anyhow!("{}: not JSON: {e}", p.display()))?;
            let kind = v.get("kind").and_then(serde_json::Value::as_str).unwrap_or("score").to_string();
            Ok((kind, text))
        })
        .collect::<Result<Vec<_>>>()?;
    if kinds.iter().any(|(k, _)| k == xent::kld::summary::KIND) {
        if let Some(i) = kinds.iter().position(|(k, _)| k != xent::kld::summary::KIND) {
            bail!(
                "{}: a {} summary among kld summaries: score and kld summaries cannot be merged together",
                a.summaries[i].display(),
                kinds[i].0
            );
        }
        return merge_kld(a, &kinds);
    }
    let mut total = Summary::default();
    let mut seconds = 0.0;
    for (path, (_, text)) in a.summaries.iter().zip(&kinds) {
        let (summary, _, secs) = Summary::from_json(text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        total.merge(&summary);
        seconds += secs;
    }
    let json = total.to_json("merged", seconds);
    if let Some(path) = &a.summary_out {
        if output_kind(path)? != Kind::Json {
            bail!("{}: --summary-out writes .json", path.display());
        }
        xent::io::write_atomic(path, format!("{json}\n").as_bytes())?;
    }
    if a.json {
        println!("{json}");
    } else {
        print!("{}", total.human("merged summaries", seconds));
    }
    Ok(())
}

/// Merges `kld --summary-out` files: exact sums, merged sketches for the percentiles.
fn merge_kld(a: &MergeArgs, files: &[(String, String)]) -> Result<()> {
    let mut total: Option<xent::kld::summary::KldSummary> = None;
    let mut seconds = 0.0;
    for (path, (_, text)) in a.summaries.iter().zip(files) {
        let s = xent::kld::summary::KldSummary::from_json(text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(text)?;
        seconds += v.get("seconds").and_then(serde_json::Value::as_f64).unwrap_or(0.0);
        match &mut total {
            Some(t) => t.merge(&s),
            None => total = Some(s),
        }
    }
    let total = total.ok_or_else(|| anyhow!("no summaries"))?;
    let stats = total.stats();
    if let Some(path) = &a.summary_out {
        if output_kind(path)? != Kind::Json {
            bail!("{}: --summary-out writes .json", path.display());
        }
        let full = total.to_json_with(&stats, "merged", seconds);
        xent::io::write_atomic(path, format!("{full}\n").as_bytes())?;
    }
    if a.json {
        println!("{}", total.report_json_with(&stats, "merged", seconds));
    } else {
        print!("{}", total.human_with(&stats));
    }
    Ok(())
}
