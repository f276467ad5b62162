//! The release path end to end on this machine: `scripts/package-release.sh` packs a binary (a
//! shell script standing in for rlhf-bot; for the CUDA tarball, a C program linked against a fake
//! CUDA toolkit built here with `cc`), a loopback HTTP server serves the tarball at GitHub's
//! release-download path, and `scripts/install-rlhf-bot.sh` must install it only when the pinned
//! sha256 matches, and otherwise stop before unpacking anything. The composite actions are checked
//! too (actionlint reads workflows only): every output they declare is written by the step it
//! names, their scripts parse with `bash -n` and pass ShellCheck (installed by
//! scripts/install-test-deps.sh), and action.yml's run step is executed against the real binary's
//! `--format json` output to show it writes `retrain` and `pr-url`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rlhf_bot::forge::{PublishAction, PublishOutcome};
use sha2::{Digest, Sha256};

use super::common::{Workspace, deps_dir, have, repo, stderr, stdout};
use super::feedback_server::serve_in_background;

const REPO: &str = "acme/rlhf-bot";
const VERSION: &str = "v0.1.0";

/// What the server holds and what it was asked.
#[derive(Default)]
struct Served {
    files: HashMap<String, Vec<u8>>,
    requests: Vec<String>,
    /// This many requests are answered 503 first (a transient fault curl should retry).
    fail_next: usize,
}

/// A release-download server on loopback (on its own runtime: the installer runs as a blocking
/// child process).
struct ReleaseServer {
    addr: SocketAddr,
    state: Arc<Mutex<Served>>,
}

impl ReleaseServer {
    fn start() -> Self {
        let state = Arc::new(Mutex::new(Served::default()));
        let app = Router::new().fallback(serve).with_state(state.clone());
        let addr = serve_in_background(app);
        Self { addr, state }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `bytes` where GitHub serves a release asset.
    fn publish(&self, version: &str, asset: &str, bytes: &[u8]) {
        self.serve_at(
            &format!("/{REPO}/releases/download/{version}/{asset}"),
            bytes,
        );
    }

    fn serve_at(&self, path: &str, bytes: &[u8]) {
        let mut state = self.state.lock().unwrap();
        state.files.insert(path.to_string(), bytes.to_vec());
    }

    fn requests(&self) -> Vec<String> {
        self.state.lock().unwrap().requests.clone()
    }
}

async fn serve(State(state): State<Arc<Mutex<Served>>>, uri: Uri) -> Response {
    let mut s = state.lock().unwrap();
    s.requests.push(uri.path().to_string());
    if s.fail_next > 0 {
        s.fail_next -= 1;
        return (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response();
    }
    match s.files.get(uri.path()) {
        Some(bytes) => bytes.clone().into_response(),
        None => (StatusCode::NOT_FOUND, "Not Found").into_response(),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn target() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

fn cpu_asset() -> String {
    format!("rlhf-bot-{}.tar.gz", target())
}

/// A tarball made by scripts/package-release.sh, its bytes and the sha256 its `.sha256` file
/// states (checked against the bytes here).
struct Packed {
    bytes: Vec<u8>,
    sha256: String,
}

fn package(flavour: &str, bin: &Path, out: &Path, envs: &[(&str, &Path)]) -> Packed {
    let asset = match flavour {
        "cuda" => format!("rlhf-bot-cuda-{}.tar.gz", target()),
        _ => cpu_asset(),
    };
    let result = Command::new("bash")
        .arg(repo().join("scripts/package-release.sh"))
        .args([flavour, &target()])
        .arg(bin)
        .arg(out)
        .envs(envs.iter().map(|(k, v)| (*k, *v)))
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "package-release.sh {flavour} failed:\n{}{}",
        stdout(&result),
        stderr(&result)
    );
    let bytes = std::fs::read(out.join(&asset)).unwrap();
    let sha_file = std::fs::read_to_string(out.join(format!("{asset}.sha256"))).unwrap();
    // sha256sum's format, so `sha256sum --check` (the release job) reads it.
    assert_eq!(sha_file, format!("{}  {asset}\n", sha256_hex(&bytes)));
    Packed {
        sha256: sha256_hex(&bytes),
        bytes,
    }
}

/// A CPU release whose "binary" is a shell script printing `version_line` for `--version`.
fn cpu_release(dir: &Path, version_line: &str) -> Packed {
    let build = dir.join("build");
    std::fs::create_dir_all(&build).unwrap();
    let bin = build.join("rlhf-bot");
    std::fs::write(&bin, format!("#!/bin/sh\necho '{version_line}'\n")).unwrap();
    make_executable(&bin);
    package("cpu", &bin, &dir.join("dist"), &[])
}

fn make_executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// One run of the installer as a GitHub Actions step would run it, in its own directories.
struct Runner {
    root: tempfile::TempDir,
}

impl Runner {
    fn new() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("runner-temp")).unwrap();
        Self { root }
    }
    fn install_dir(&self) -> PathBuf {
        self.root.path().join("installed")
    }
    fn runner_temp(&self) -> PathBuf {
        self.root.path().join("runner-temp")
    }
    fn github_path(&self) -> PathBuf {
        self.root.path().join("github_path")
    }
    fn github_output(&self) -> PathBuf {
        self.root.path().join("github_output")
    }

    fn install(&self, server: &ReleaseServer, args: &[&str], envs: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("scripts/install-rlhf-bot.sh"))
            .arg("--dir")
            .arg(self.install_dir())
            .args(args);
        for name in [
            "RLHF_BOT_VERSION",
            "RLHF_BOT_SHA256",
            "RLHF_BOT_FLAVOUR",
            "RLHF_BOT_DIR",
            "RLHF_BOT_ALLOW_LATEST",
            "GITHUB_SERVER_URL",
            "LD_LIBRARY_PATH",
        ] {
            cmd.env_remove(name);
        }
        cmd.env("GITHUB_ACTIONS", "true")
            .env("RUNNER_TEMP", self.runner_temp())
            .env("GITHUB_PATH", self.github_path())
            .env("GITHUB_OUTPUT", self.github_output())
            .env("RLHF_BOT_SERVER", server.url())
            .env("RLHF_BOT_REPO", REPO)
            .envs(envs.iter().copied())
            .output()
            .unwrap()
    }

    /// Nothing unpacked, nothing added to PATH, no download left behind.
    fn assert_nothing_installed(&self) {
        assert!(
            !self.install_dir().exists(),
            "something was unpacked into {}",
            self.install_dir().display()
        );
        assert!(!self.github_path().exists(), "GITHUB_PATH was written");
        let left: Vec<_> = std::fs::read_dir(self.runner_temp())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "left in RUNNER_TEMP: {left:?}");
    }
}

/// A genuine CPU release published as [`VERSION`] (its bytes held in memory), the server serving
/// it, and a fresh runner.
struct Published {
    release: Packed,
    server: ReleaseServer,
    runner: Runner,
}

fn published() -> Published {
    let work = tempfile::tempdir().unwrap();
    let release = cpu_release(work.path(), "rlhf-bot 0.1.0");
    let server = ReleaseServer::start();
    server.publish(VERSION, &cpu_asset(), &release.bytes);
    Published {
        release,
        server,
        runner: Runner::new(),
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn installs_a_pinned_release_after_checking_its_sha256() {
    let Published {
        release,
        server,
        runner,
    } = published();

    // Upper case with a `sha256:` prefix, as some tools print it: the pin is normalised.
    let pin = format!("sha256:{}", release.sha256.to_uppercase());
    let out = runner.install(&server, &["--version", VERSION, "--sha256", &pin], &[]);
    assert!(
        out.status.success(),
        "install failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );

    let dir = runner.install_dir();
    let installed = Command::new(dir.join("rlhf-bot"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(stdout(&installed), "rlhf-bot 0.1.0\n");
    assert_eq!(
        read(&runner.github_path()),
        format!("{}\n", dir.display()),
        "the install directory goes on PATH for the next steps"
    );
    assert_eq!(
        read(&runner.github_output()),
        format!("path={}\nversion=rlhf-bot 0.1.0\n", dir.display())
    );
    assert!(
        stdout(&out).contains("installed rlhf-bot 0.1.0 (cpu"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains(&format!("sha256 verified: {}", release.sha256)),
        "{}",
        stderr(&out)
    );
    assert!(!stdout(&out).contains("::warning"), "{}", stdout(&out));
    assert_eq!(
        server.requests(),
        vec![format!(
            "/{REPO}/releases/download/{VERSION}/{}",
            cpu_asset()
        )]
    );
    let scratch: Vec<_> = std::fs::read_dir(runner.runner_temp()).unwrap().collect();
    assert!(scratch.is_empty(), "the download is cleaned up");
}

#[test]
fn retries_a_transient_server_error() {
    let Published {
        release,
        server,
        runner,
    } = published();
    server.state.lock().unwrap().fail_next = 1;

    let out = runner.install(
        &server,
        &["--version", VERSION, "--sha256", &release.sha256],
        &[],
    );
    assert!(
        out.status.success(),
        "install failed:\n{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(server.requests().len(), 2, "one 503, then the asset");
    assert!(runner.install_dir().join("rlhf-bot").exists());
}

#[test]
fn refuses_a_tampered_tarball_before_unpacking_it() {
    let work = tempfile::tempdir().unwrap();
    let genuine = cpu_release(&work.path().join("genuine"), "rlhf-bot 0.1.0");
    let tampered = cpu_release(&work.path().join("tampered"), "rlhf-bot 0.1.0 (not ours)");
    assert_ne!(genuine.sha256, tampered.sha256);
    let server = ReleaseServer::start();
    server.publish(VERSION, &cpu_asset(), &tampered.bytes);
    let runner = Runner::new();

    let out = runner.install(
        &server,
        &["--version", VERSION, "--sha256", &genuine.sha256],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("sha256 mismatch"), "{err}");
    assert!(
        err.contains(&format!("expected: {}", genuine.sha256)),
        "{err}"
    );
    assert!(
        err.contains(&format!("actual:   {}", tampered.sha256)),
        "{err}"
    );
    assert!(err.contains("Nothing was unpacked"), "{err}");
    assert!(err.contains("hint:"), "{err}");
    // The same, as one annotation line on the run page.
    let annotation = stdout(&out);
    assert!(
        annotation.starts_with("::error title=rlhf-bot install::sha256 mismatch"),
        "{annotation}"
    );
    assert_eq!(annotation.lines().count(), 1, "{annotation}");
    assert!(annotation.contains(&tampered.sha256), "{annotation}");
    runner.assert_nothing_installed();
}

#[test]
fn a_missing_asset_is_a_clear_error_and_is_not_retried() {
    let Published {
        release,
        server,
        runner,
    } = published();

    let out = runner.install(
        &server,
        &["--version", "v9.9.9", "--sha256", &release.sha256],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "{} not found in release 'v9.9.9' of {REPO} (HTTP 404",
            cpu_asset()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "{}/{REPO}/releases/download/v9.9.9/",
            server.url()
        )),
        "{err}"
    );
    assert!(err.contains("hint: check that the tag exists"), "{err}");
    assert!(stdout(&out).starts_with("::error "), "{}", stdout(&out));
    assert_eq!(
        server.requests().len(),
        1,
        "a 404 is an answer, not retried"
    );
    runner.assert_nothing_installed();
}

#[test]
fn refuses_unpinned_input_before_any_download() {
    let server = ReleaseServer::start();
    let runner = Runner::new();
    let sha = "0".repeat(64);
    let sha = sha.as_str();
    let cases: [(&[&str], &str); 5] = [
        (&["--sha256", sha], "no version given"),
        (
            &["--version", "latest", "--sha256", sha],
            "version 'latest' refused",
        ),
        (&["--version", VERSION], "no sha256 given for v0.1.0"),
        (
            &["--version", VERSION, "--sha256", "abc"],
            "sha256 'abc' has 3 characters, not 64",
        ),
        (
            &["--version", VERSION, "--sha256", sha, "--flavour", "rocm"],
            "flavour 'rocm' is neither cpu nor cuda",
        ),
    ];
    for (args, message) in cases {
        let out = runner.install(&server, args, &[]);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("hint:"), "{args:?}: {}", stderr(&out));
    }
    assert!(server.requests().is_empty(), "{:?}", server.requests());
    runner.assert_nothing_installed();
}

#[test]
fn latest_only_when_allowed_and_with_a_warning() {
    let Published {
        release,
        server,
        runner,
    } = published();
    // GitHub redirects /releases/latest/download/<asset> to the newest release's asset; the
    // server here serves it at that path directly.
    let latest = format!("/{REPO}/releases/latest/download/{}", cpu_asset());
    server.serve_at(&latest, &release.bytes);

    let out = runner.install(
        &server,
        &["--version", "latest", "--sha256", &release.sha256],
        &[("RLHF_BOT_ALLOW_LATEST", "true")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("::warning title=rlhf-bot install::installing 'latest'"),
        "{}",
        stdout(&out)
    );
    assert_eq!(server.requests(), vec![latest]);
}

/// A fake CUDA toolkit: the shared libraries candle's CUDA build links (with their real
/// sonames), NVRTC's builtins, and the driver stub; plus a "driver" directory holding
/// libcuda.so.1 and a binary linked against all of them that calls into each when run.
struct FakeToolkit {
    lib64: PathBuf,
    driver: PathBuf,
    bin: PathBuf,
}

fn cc(args: &[&str], dir: &Path) {
    let out = Command::new("cc")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "cc {args:?}: {}", stderr(&out));
}

fn fake_toolkit(root: &Path) -> FakeToolkit {
    let lib64 = root.join("cuda/lib64");
    let driver = root.join("driver");
    for dir in [lib64.join("stubs"), driver.clone(), root.join("build")] {
        std::fs::create_dir_all(&dir).unwrap();
    }
    let libs = [
        ("cublas", "12"),
        ("cublasLt", "12"),
        ("curand", "10"),
        ("nvrtc", "12"),
        ("cudart", "12"),
    ];
    for (name, major) in libs {
        let src = root.join(format!("{name}.c"));
        std::fs::write(&src, format!("int {name}_probe(void) {{ return 0; }}\n")).unwrap();
        let soname = format!("lib{name}.so.{major}");
        cc(
            &[
                "-shared",
                "-fPIC",
                &format!("-Wl,-soname,{soname}"),
                "-o",
                &format!("{}/{soname}", lib64.display()),
                &src.display().to_string(),
            ],
            root,
        );
        // The unversioned name the linker looks for, as the toolkit has it.
        std::os::unix::fs::symlink(&soname, lib64.join(format!("lib{name}.so"))).unwrap();
    }
    std::fs::write(lib64.join("libnvrtc-builtins.so.12.6"), b"builtins").unwrap();
    std::fs::write(
        root.join("cuda.c"),
        "int cuInit(unsigned f) { return (int)f; }\n",
    )
    .unwrap();
    for out in [lib64.join("stubs/libcuda.so"), driver.join("libcuda.so.1")] {
        cc(
            &[
                "-shared",
                "-fPIC",
                "-Wl,-soname,libcuda.so.1",
                "-o",
                &out.display().to_string(),
                "cuda.c",
            ],
            root,
        );
    }
    let main = "#include <stdio.h>\n#include <string.h>\n\
        int cublas_probe(void); int cublasLt_probe(void); int curand_probe(void);\n\
        int nvrtc_probe(void); int cudart_probe(void); int cuInit(unsigned);\n\
        int main(int argc, char **argv) {\n\
          if (argc > 1 && strcmp(argv[1], \"--version\") == 0) { puts(\"rlhf-bot 0.1.0\"); return 0; }\n\
          int r = cublas_probe() + cublasLt_probe() + curand_probe() + nvrtc_probe() + cudart_probe() + cuInit(0);\n\
          puts(r == 0 ? \"cuda libraries loaded\" : \"wrong libraries\");\n\
          return r;\n\
        }\n";
    std::fs::write(root.join("main.c"), main).unwrap();
    let bin = root.join("build/rlhf-bot");
    cc(
        &[
            "-o",
            &bin.display().to_string(),
            "main.c",
            &format!("-L{}", lib64.display()),
            &format!("-L{}/stubs", lib64.display()),
            "-Wl,--no-as-needed",
            "-lcublas",
            "-lcublasLt",
            "-lcurand",
            "-lnvrtc",
            "-lcudart",
            "-lcuda",
        ],
        root,
    );
    FakeToolkit { lib64, driver, bin }
}

#[test]
fn the_cuda_tarball_ships_the_toolkit_libraries_and_installs() {
    if std::env::consts::ARCH != "x86_64" {
        eprintln!("skipped: the CUDA release is x86_64 only");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let toolkit = fake_toolkit(work.path());
    let dist = work.path().join("dist");
    let release = package(
        "cuda",
        &toolkit.bin,
        &dist,
        &[("CUDA_LIB", toolkit.lib64.as_path())],
    );
    let asset = format!("rlhf-bot-cuda-{}.tar.gz", target());

    let listing = Command::new("tar")
        .arg("-tzf")
        .arg(dist.join(&asset))
        .output()
        .unwrap();
    let mut entries: Vec<String> = stdout(&listing)
        .lines()
        .map(|l| l.trim_end_matches('/').to_string())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        [
            "NOTICE-CUDA.txt",
            "bin",
            "bin/rlhf-bot",
            "lib",
            "lib/libcublas.so.12",
            "lib/libcublasLt.so.12",
            "lib/libcudart.so.12",
            "lib/libcurand.so.10",
            "lib/libnvrtc-builtins.so.12.6",
            "lib/libnvrtc.so.12",
            "rlhf-bot",
        ],
        "every toolkit library the binary links, NVRTC's builtins, never the driver"
    );

    let server = ReleaseServer::start();
    server.publish(VERSION, &asset, &release.bytes);
    let args = [
        "--version",
        VERSION,
        "--sha256",
        release.sha256.as_str(),
        "--flavour",
        "cuda",
    ];

    // A machine without the NVIDIA driver: the CUDA build cannot start, and says why.
    let no_driver = Runner::new();
    let out = no_driver.install(&server, &args, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("hint: it needs the NVIDIA driver (libcuda.so.1)"),
        "{}",
        stderr(&out)
    );

    // With the driver: installed, and the wrapper finds the shipped libraries, not the toolkit's
    // (which this machine does not have on any search path).
    let runner = Runner::new();
    let driver = toolkit.driver.display().to_string();
    let out = runner.install(&server, &args, &[("LD_LIBRARY_PATH", driver.as_str())]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("installed rlhf-bot 0.1.0 (cuda"),
        "{}",
        stdout(&out)
    );
    std::fs::remove_dir_all(work.path().join("cuda")).unwrap();
    let run = Command::new(runner.install_dir().join("rlhf-bot"))
        .env("LD_LIBRARY_PATH", &driver)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(stdout(&run), "cuda libraries loaded\n");
}

/// `steps.<id>.outputs.<key>` of an output's `value`.
fn output_source(value: &str) -> Option<(String, String)> {
    let inner = value.trim().strip_prefix("${{")?.strip_suffix("}}")?.trim();
    let (step, key) = inner.strip_prefix("steps.")?.split_once(".outputs.")?;
    Some((step.to_string(), key.to_string()))
}

#[test]
fn composite_actions_write_every_output_and_their_scripts_lint() {
    let shellcheck = deps_dir().join("venv/bin/shellcheck");
    let lint = have(&shellcheck, "shellcheck");
    let scratch = tempfile::tempdir().unwrap();
    for action in ["action.yml", "install/action.yml"] {
        let path = repo().join(action);
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
        assert_eq!(doc["runs"]["using"].as_str(), Some("composite"), "{action}");
        let steps = doc["runs"]["steps"].as_sequence().unwrap();
        let action_dir = path.parent().unwrap();

        // Each step's script, with any repository script it calls through GITHUB_ACTION_PATH.
        let mut scripts: HashMap<String, String> = HashMap::new();
        for (i, step) in steps.iter().enumerate() {
            let run = step["run"].as_str().unwrap_or_default();
            assert_eq!(step["shell"].as_str(), Some("bash"), "{action} step {i}");
            assert!(
                !run.contains("${{"),
                "{action} step {i}: inputs reach scripts through env, never spliced in"
            );
            let mut all = run.to_string();
            if let Some(rest) = run.split("$GITHUB_ACTION_PATH/").nth(1) {
                let rel: String = rest.chars().take_while(|c| *c != '"').collect();
                let called = action_dir.join(&rel);
                assert!(
                    called.is_file(),
                    "{action} step {i} runs {rel}, which is not at {}",
                    called.display()
                );
                all.push_str(&std::fs::read_to_string(called).unwrap());
            }
            let file = scratch
                .path()
                .join(format!("{}-{i}.sh", action.replace('/', "-")));
            std::fs::write(&file, run).unwrap();
            let syntax = Command::new("bash").arg("-n").arg(&file).output().unwrap();
            assert!(
                syntax.status.success(),
                "{action} step {i}: {}",
                stderr(&syntax)
            );
            if lint {
                let found = Command::new(&shellcheck)
                    .args(["--shell=bash", "--severity=style"])
                    .arg(&file)
                    .output()
                    .unwrap();
                assert!(
                    found.status.success(),
                    "{action} step {i}:\n{}",
                    stdout(&found)
                );
            }
            let id = step["id"].as_str().unwrap_or_default().to_string();
            scripts.insert(id, all);
        }

        let outputs = doc["outputs"].as_mapping().unwrap();
        assert!(!outputs.is_empty(), "{action}");
        for (name, spec) in outputs {
            let name = name.as_str().unwrap();
            let value = spec["value"].as_str().unwrap_or_default();
            let (step, key) = output_source(value)
                .unwrap_or_else(|| panic!("{action} output {name}: value {value:?}"));
            let script = scripts
                .get(&step)
                .unwrap_or_else(|| panic!("{action} output {name}: no step with id {step}"));
            assert!(
                script.contains(&format!("echo \"{key}=")),
                "{action} output {name}: step {step} never writes {key} to GITHUB_OUTPUT"
            );
        }
    }
    if lint {
        let found = Command::new(&shellcheck)
            .arg("--severity=style")
            .args(["scripts/install-rlhf-bot.sh", "scripts/package-release.sh"])
            .current_dir(repo())
            .output()
            .unwrap();
        assert!(found.status.success(), "{}", stdout(&found));
    }
}

/// The `run` script of the step with `id` in a composite action, as written to a file.
fn action_step_script(action: &str, id: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(repo().join(action)).unwrap();
    let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
    let step = doc["runs"]["steps"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|s| s["id"].as_str() == Some(id))
        .unwrap_or_else(|| panic!("{action} has no step with id {id}"));
    let path = dir.join(format!("{id}.sh"));
    std::fs::write(&path, step["run"].as_str().unwrap()).unwrap();
    path
}

/// Runs action.yml's `run` step as the runner would: bash, the inputs in env, `rlhf-bot` on PATH
/// from `bin_dir`. Returns the output and the step's GITHUB_OUTPUT file.
fn run_action_step(ws: &Workspace, bin_dir: &Path, config: &Path) -> (Output, String) {
    let script = action_step_script("action.yml", "run", ws.path());
    let outputs = ws.path().join("github_output");
    let path = std::env::join_paths(
        std::iter::once(bin_dir.to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();
    let out = Command::new("bash")
        .arg(&script)
        .env("PATH", path)
        .env("CONFIG", config)
        .env("FORCE", "false")
        .env("DRY_RUN", "true")
        .env("ALGO", "")
        .env("GITHUB_OUTPUT", &outputs)
        .env("RUNNER_TEMP", ws.path())
        .env("RLHF_BOT_NOW", "2026-11-27T12:00:00Z")
        .env_remove("GITHUB_STEP_SUMMARY")
        .env_remove("GITHUB_ACTIONS")
        .current_dir(ws.path())
        .output()
        .unwrap();
    (out, read(&outputs))
}

/// The value the runner takes for `key`: the last `key=` line (rlhf-bot's check stage writes
/// `retrain` too; the step writes it again from the JSON).
fn last_output<'a>(outputs: &'a str, key: &str) -> Option<&'a str> {
    outputs
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .next_back()
}

#[test]
fn the_action_run_step_writes_retrain_and_pr_url_from_the_real_json() {
    // The real binary on the bundled sample, as a dry run: retraining is due, and the pull
    // request is written locally, so there is no URL.
    let ws = Workspace::new();
    let config = ws.sample_config();
    let real = Path::new(env!("CARGO_BIN_EXE_rlhf-bot")).parent().unwrap();
    let (out, outputs) = run_action_step(&ws, real, &config);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["check"]["retrain"], true, "{json}");
    assert_eq!(last_output(&outputs, "retrain"), Some("true"), "{outputs}");
    assert_eq!(last_output(&outputs, "pr_url"), Some(""), "{outputs}");

    // A published run: `run.publish` is the publisher's PublishOutcome, serialised by the same
    // type the binary uses, printed by a stand-in binary.
    let outcome = PublishOutcome {
        pr_number: Some(42),
        pr_url: Some("https://github.com/acme/assistant/pull/42".into()),
        action: PublishAction::Created,
        branch: "rlhf-bot/reward-gh-1".into(),
        commit_sha: Some("0123abc".into()),
        superseded: vec![],
        warnings: vec![],
    };
    let printed = serde_json::json!({
        "pull": {},
        "check": {"retrain": true},
        "run": {"run_id": "gh-1", "publish": outcome},
    });
    let stand_in = ws.path().join("stand-in");
    std::fs::create_dir(&stand_in).unwrap();
    let json_file = ws.path().join("printed.json");
    std::fs::write(&json_file, printed.to_string()).unwrap();
    let fake = stand_in.join("rlhf-bot");
    std::fs::write(&fake, format!("#!/bin/sh\ncat '{}'\n", json_file.display())).unwrap();
    make_executable(&fake);
    std::fs::remove_file(ws.path().join("github_output")).unwrap();
    let (out, outputs) = run_action_step(&ws, &stand_in, &config);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        outputs,
        "retrain=true\npr_url=https://github.com/acme/assistant/pull/42\n"
    );

    // No retraining due: `run` is null, pr-url empty, retrain false.
    std::fs::write(
        &json_file,
        serde_json::json!({"pull": {}, "check": {"retrain": false}, "run": null}).to_string(),
    )
    .unwrap();
    std::fs::remove_file(ws.path().join("github_output")).unwrap();
    let (out, outputs) = run_action_step(&ws, &stand_in, &config);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(outputs, "retrain=false\npr_url=\n");
}
