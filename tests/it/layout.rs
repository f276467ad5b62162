//! The source tree's shape, as docs/architecture.md promises it: no import cycle between modules
//! (top level, and one level down inside directory modules), checked by scripts/module-cycles.py.

use std::process::Command;

use crate::common::repo;

#[test]
fn no_import_cycle_between_modules() {
    let out = Command::new("python3")
        .arg(repo().join("scripts/module-cycles.py"))
        .output()
        .expect("python3 runs scripts/module-cycles.py");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.trim(), "no import cycles");
}
