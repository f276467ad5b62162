//! The newcomer's first run ("The promise, end to end", points 1 and 2): configs/example.yaml
//! names the real models through `$RLHF_MODELS_DIR` and says which script fetches them when they
//! are missing; `run` picks its device (`--device auto|cpu|cuda`, auto by default) and ends by
//! saying where the report, the pull request and the registry update are.

use crate::common::{Workspace, bin, stderr, stdout};

#[test]
fn missing_models_name_the_fetch_script_before_training() {
    let ws = Workspace::new();
    let text = ws.shipped_config_text("example.yaml", ".rlhf/example");
    assert!(text.contains("model: $RLHF_MODELS_DIR/"), "{text}");
    let cfg = ws.write_config(&text);
    let empty = ws.path().join("no-models-here");
    let o = bin()
        .env("RLHF_MODELS_DIR", &empty)
        .arg("--config")
        .arg(&cfg)
        .args(["run", "--force"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("reward.model: model")
            && err.contains(&empty.join("all-MiniLM-L6-v2").display().to_string())
            && err.contains("hint: run scripts/fetch-models.sh first"),
        "{err}"
    );
    assert!(
        !ws.store_dir().join("runs").exists(),
        "nothing may be trained before the check"
    );
    // `config check` shows where the variable points.
    let o = bin()
        .env("RLHF_MODELS_DIR", &empty)
        .arg("--config")
        .arg(&cfg)
        .args(["config", "check"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&empty.join("SmolLM2-135M-Instruct").display().to_string()),
        "{}",
        stdout(&o)
    );
}

#[test]
fn device_is_a_value_enum_on_run() {
    let ws = Workspace::new();
    let cfg = ws.sample_config();
    let o = bin()
        .arg("--config")
        .arg(&cfg)
        .args(["run", "--device", "tpu"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("auto") && err.contains("cpu") && err.contains("cuda"),
        "{err}"
    );
    let o = bin()
        .arg("--config")
        .arg(&cfg)
        .args(["config", "check"])
        .output()
        .unwrap();
    assert!(
        stdout(&o).contains("device: auto"),
        "auto is the default: {}",
        stdout(&o)
    );
}

#[test]
fn run_logs_its_device_and_ends_with_where_to_look() {
    let ws = Workspace::new();
    let cfg = ws.sample_config();
    let o = bin()
        .env("RLHF_BOT_NOW", "2026-11-27T12:00:00Z")
        .arg("--config")
        .arg(&cfg)
        .args(["run", "--force", "--device", "auto"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    if !cfg!(feature = "cuda") {
        assert!(
            err.contains("device=cpu") && err.contains("built without the cuda feature"),
            "{err}"
        );
    }
    let out = stdout(&o);
    let tail: Vec<&str> = out.lines().rev().take(4).collect();
    assert_eq!(tail[3], "where to look:", "{out}");
    let report = tail[2].trim().strip_prefix("report").unwrap().trim();
    assert!(report.contains("report.md"), "{out}");
    let report = report.split(" (").next().unwrap();
    assert!(std::path::Path::new(report).is_file(), "{report}");
    let pr = tail[1].trim().strip_prefix("pull request").unwrap().trim();
    let pr_dir = pr.split(' ').next().unwrap();
    assert!(
        std::path::Path::new(pr_dir).join("body.md").is_file(),
        "{pr}"
    );
    let registry = tail[0].trim().strip_prefix("registry").unwrap().trim();
    assert!(std::path::Path::new(registry).is_file(), "{registry}");
    assert!(registry.ends_with("registry.yaml"), "{registry}");
}
