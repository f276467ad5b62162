//! The offline twin of `publish`: `--dry-run`, and the default when no GitHub target is
//! configured. It writes exactly what would be sent (branch, title, body, labels, reviewers,
//! draft flag, every file at its repository path) under `<dir>/<branch>/`, with a `pr.json`
//! manifest a person or a later `publish` can read, and can also commit the files onto a local git
//! branch without touching the working tree or the index (plumbing commands and a private index).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::publish::{OnExisting, PublishRequest};

/// Name of the manifest written beside the files.
pub const MANIFEST: &str = "pr.json";

/// One file in the manifest: where it goes and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Path in the repository.
    pub path: String,
    /// Where the bytes were written, relative to the manifest.
    pub local: String,
    pub bytes: u64,
    pub sha256: String,
}

/// `pr.json`: the pull request as it would be opened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub run_id: String,
    pub branch: String,
    pub title: String,
    /// File holding the PR body, relative to the manifest.
    pub body_file: String,
    pub labels: Vec<String>,
    pub reviewers: Vec<String>,
    pub draft: bool,
    pub on_existing: OnExisting,
    pub commit_message: String,
    pub files: Vec<ManifestFile>,
}

/// What `publish_local` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalOutcome {
    /// `<dir>/<branch>/`.
    pub dir: PathBuf,
    pub manifest_path: PathBuf,
    pub manifest: Manifest,
}

/// Writes the request under `dir/<branch>/`: `pr.json`, `body.md` and `files/<repo path>`.
/// A previous dry run of the same branch is replaced (only if it is one: it must hold `pr.json`).
pub fn publish_local(dir: &Path, request: &PublishRequest) -> Result<LocalOutcome> {
    request.validate()?;
    let out = dir.join(&request.branch);
    if out.exists() {
        if !out.join(MANIFEST).is_file() {
            bail!(
                "{} exists and is not an earlier dry run (no {MANIFEST})\nhint: choose another output directory or remove it",
                out.display()
            );
        }
        std::fs::remove_dir_all(&out)
            .with_context(|| format!("removing the earlier dry run {}", out.display()))?;
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;

    let body_file = "body.md";
    write(&out.join(body_file), request.pr_body().as_bytes())?;
    let mut files = Vec::with_capacity(request.files.len());
    for (path, bytes) in &request.files {
        // Files live under files/ so a repository path can never collide with pr.json or body.md.
        let local = format!("files/{path}");
        write(&out.join(&local), bytes)?;
        files.push(ManifestFile {
            path: path.clone(),
            local,
            bytes: bytes.len() as u64,
            sha256: hex::encode(Sha256::digest(bytes)),
        });
    }
    let manifest = Manifest {
        run_id: request.run_id.clone(),
        branch: request.branch.clone(),
        title: request.title.clone(),
        body_file: body_file.to_owned(),
        labels: request.labels.clone(),
        reviewers: request.reviewers.clone(),
        draft: request.draft,
        on_existing: request.on_existing,
        commit_message: request.commit_message(),
        files,
    };
    let manifest_path = out.join(MANIFEST);
    let json = serde_json::to_string_pretty(&manifest).context("serialising the PR manifest")?;
    write(&manifest_path, format!("{json}\n").as_bytes())?;
    tracing::info!("dry run: pull request written to {}", out.display());
    Ok(LocalOutcome {
        dir: out,
        manifest_path,
        manifest,
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Commits the request's files onto `refs/heads/<branch>` of the git repository at `repo`, on
/// top of the branch if it exists (and is the bot's), else on top of `base`. Uses a private index
/// file, so the user's working tree, index and checked-out branch are untouched. Returns the new
/// commit's id. Refuses to move a branch whose head the bot did not make.
pub fn commit_to_local_branch(repo: &Path, base: &str, request: &PublishRequest) -> Result<String> {
    request.validate()?;
    let git = Git { repo };
    let branch_ref = format!("refs/heads/{}", request.branch);
    let existing = git.try_run(
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{branch_ref}^{{commit}}"),
        ],
        None,
    )?;
    let parent = match &existing {
        Some(head) => {
            let message = git.run(&["log", "-1", "--format=%B", head], None)?;
            if !super::publish::is_bot_commit(&message) {
                bail!(
                    "local branch `{}` has a commit the bot did not make ({head}); not moving it\nhint: delete or rename the branch, then run again",
                    request.branch
                );
            }
            head.clone()
        }
        None => git
            .try_run(
                &[
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    &format!("{base}^{{commit}}"),
                ],
                None,
            )?
            .with_context(|| {
                format!(
                    "base `{base}` is not a commit in {}\nhint: name an existing branch",
                    repo.display()
                )
            })?,
    };

    // A private index inside the git directory: the user's index and working tree stay as they are.
    let git_dir = PathBuf::from(git.run(&["rev-parse", "--absolute-git-dir"], None)?);
    let index_path = git_dir.join(format!("rlhf-bot-index-{}", std::process::id()));
    let result = (|| -> Result<String> {
        let env = Some(index_path.as_path());
        git.run(&["read-tree", &parent], env)?;
        for (path, bytes) in &request.files {
            let blob = git.run_with_input(&["hash-object", "-w", "--stdin"], bytes)?;
            git.run(
                &[
                    "update-index",
                    "--add",
                    "--cacheinfo",
                    &format!("100644,{blob},{path}"),
                ],
                env,
            )?;
        }
        let tree = git.run(&["write-tree"], env)?;
        let message = request.commit_message();
        let commit = git.run(
            &[
                "commit-tree",
                &tree,
                "-p",
                &parent,
                "-m",
                message.trim_end(),
            ],
            None,
        )?;
        // The expected old value makes update-ref atomic: if the branch moved meanwhile, it fails.
        let old = if existing.is_some() {
            parent.clone()
        } else {
            "0".repeat(40)
        };
        git.run(
            &[
                "update-ref",
                "-m",
                "rlhf-bot: local publish",
                &branch_ref,
                &commit,
                &old,
            ],
            None,
        )?;
        Ok(commit)
    })();
    let _ = std::fs::remove_file(&index_path);
    result
}

struct Git<'a> {
    repo: &'a Path,
}

impl Git<'_> {
    fn command(&self, args: &[&str], index: Option<&Path>) -> Command {
        let mut cmd = Command::new("git");
        cmd.arg("-C").arg(self.repo).args(args);
        if let Some(index) = index {
            cmd.env("GIT_INDEX_FILE", index);
        }
        // commit-tree needs an identity; runners often have none configured.
        for (key, value) in [
            ("GIT_AUTHOR_NAME", "rlhf-bot"),
            ("GIT_AUTHOR_EMAIL", "rlhf-bot@users.noreply.github.com"),
            ("GIT_COMMITTER_NAME", "rlhf-bot"),
            ("GIT_COMMITTER_EMAIL", "rlhf-bot@users.noreply.github.com"),
        ] {
            if std::env::var_os(key).is_none() {
                cmd.env(key, value);
            }
        }
        cmd
    }

    /// Runs git; a non-zero exit is an error carrying git's stderr.
    fn run(&self, args: &[&str], index: Option<&Path>) -> Result<String> {
        self.try_run(args, index)?
            .with_context(|| format!("git {} failed", args.join(" ")))
    }

    /// Runs git with `input` on stdin.
    fn run_with_input(&self, args: &[&str], input: &[u8]) -> Result<String> {
        use std::io::Write as _;
        let mut child = self
            .command(args, None)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running git\nhint: install git, or publish without a local branch")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input).context("writing to git's stdin")?;
        }
        let output = child.wait_with_output().context("waiting for git")?;
        if !output.status.success() {
            bail!(
                "git {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Runs git; exit 1 with no stderr (e.g. `rev-parse --quiet` of a missing ref) is `None`.
    fn try_run(&self, args: &[&str], index: Option<&Path>) -> Result<Option<String>> {
        let output = self
            .command(args, index)
            .output()
            .context("running git\nhint: install git, or publish without a local branch")?;
        if output.status.success() {
            return Ok(Some(
                String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            ));
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if stderr.is_empty() {
            return Ok(None);
        }
        bail!(
            "git {} failed in {}: {stderr}",
            args.join(" "),
            self.repo.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(run: &str) -> PublishRequest {
        PublishRequest {
            run_id: run.into(),
            branch: "rlhf-bot/dpo-run1".into(),
            branch_prefix: "rlhf-bot/".into(),
            title: format!("rlhf-bot: DPO candidate {run}"),
            body: "## Report\n".into(),
            files: vec![
                ("models/registry.yaml".into(), format!("version: {run}\n").into_bytes()),
                ("pr.json".into(), b"{\"not\": \"the manifest\"}".to_vec()),
            ],
            labels: vec!["rlhf-bot".into()],
            reviewers: vec!["octocat".into()],
            draft: true,
            on_existing: OnExisting::Update,
        }
    }

    #[test]
    fn dry_run_writes_manifest_body_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = publish_local(dir.path(), &request("run1")).unwrap();
        assert_eq!(out.dir, dir.path().join("rlhf-bot/dpo-run1"));
        let manifest: Manifest =
            serde_json::from_str(&std::fs::read_to_string(&out.manifest_path).unwrap()).unwrap();
        assert_eq!(manifest, out.manifest);
        assert_eq!(manifest.labels, ["rlhf-bot"]);
        assert!(manifest.draft);
        assert!(manifest.commit_message.contains("Rlhf-Bot-Run: run1"));
        assert_eq!(
            std::fs::read_to_string(out.dir.join("body.md")).unwrap(),
            "## Report\n"
        );
        // A repository file named pr.json does not clobber the manifest.
        assert_eq!(
            std::fs::read(out.dir.join("files/pr.json")).unwrap(),
            b"{\"not\": \"the manifest\"}"
        );
        let registry = &manifest.files[0];
        assert_eq!(registry.path, "models/registry.yaml");
        assert_eq!(registry.bytes, 13);
        assert_eq!(
            registry.sha256,
            hex::encode(Sha256::digest(b"version: run1\n"))
        );
    }

    #[test]
    fn dry_run_replaces_an_earlier_dry_run_but_not_other_directories() {
        let dir = tempfile::tempdir().unwrap();
        let first = publish_local(dir.path(), &request("run1")).unwrap();
        std::fs::write(first.dir.join("files/stale.txt"), b"old").unwrap();
        let second = publish_local(dir.path(), &request("run2")).unwrap();
        assert!(!second.dir.join("files/stale.txt").exists());
        assert_eq!(second.manifest.run_id, "run2");

        let other = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(other.path().join("rlhf-bot/dpo-run1")).unwrap();
        let err = publish_local(other.path(), &request("run1")).unwrap_err();
        assert!(format!("{err:#}").contains("not an earlier dry run"));
    }

    fn git(repo: &Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(args)
            .env("GIT_AUTHOR_NAME", "Jane")
            .env("GIT_AUTHOR_EMAIL", "jane@example.com")
            .env("GIT_COMMITTER_NAME", "Jane")
            .env("GIT_COMMITTER_EMAIL", "jane@example.com")
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    #[test]
    fn local_branch_commit_leaves_worktree_alone_and_refuses_human_heads() {
        if Command::new("git").arg("--version").output().is_err() {
            eprintln!("skipped: git not installed");
            return;
        }
        let repo = tempfile::tempdir().unwrap();
        let r = repo.path();
        git(r, &["init", "-q", "-b", "main"]);
        std::fs::write(r.join("README.md"), "hello\n").unwrap();
        git(r, &["add", "README.md"]);
        git(r, &["commit", "-q", "-m", "init"]);

        let first = commit_to_local_branch(r, "main", &request("run1")).unwrap();
        assert_eq!(git(r, &["rev-parse", "refs/heads/rlhf-bot/dpo-run1"]), first);
        assert_eq!(git(r, &["show", &format!("{first}:models/registry.yaml")]), "version: run1");
        assert_eq!(git(r, &["show", &format!("{first}:README.md")]), "hello");
        // Working tree, index and checked-out branch untouched.
        assert!(!r.join("models").exists());
        assert_eq!(git(r, &["status", "--porcelain"]), "");
        assert_eq!(git(r, &["rev-parse", "--abbrev-ref", "HEAD"]), "main");

        // A second run goes on top of the first.
        let second = commit_to_local_branch(r, "main", &request("run2")).unwrap();
        assert_eq!(git(r, &["rev-parse", &format!("{second}^")]), first);

        // A human commit on the branch stops the bot.
        git(r, &["checkout", "-q", "rlhf-bot/dpo-run1"]);
        std::fs::write(r.join("notes.md"), "mine\n").unwrap();
        git(r, &["add", "notes.md"]);
        git(r, &["commit", "-q", "-m", "my notes"]);
        let human = git(r, &["rev-parse", "HEAD"]);
        let err = commit_to_local_branch(r, "main", &request("run3")).unwrap_err();
        assert!(format!("{err:#}").contains("did not make"));
        assert_eq!(git(r, &["rev-parse", "refs/heads/rlhf-bot/dpo-run1"]), human);
    }
}
