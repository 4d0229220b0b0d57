//! Hugging Face Hub layouts in and out (the onnx/ folder of transformers.js repositories), the model
//! card, and a rewrite loaded by Optimum's `ORTModelForCausalLM`.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// `repo/onnx/model_q4.onnx` with the tokenizer and config in `repo/`, as onnx-community publishes
/// them; `config.json` names the model it came from.
fn hub_repo(root: &Path) -> PathBuf {
    let repo = root.join("repo");
    std::fs::create_dir_all(repo.join("onnx")).unwrap();
    for entry in std::fs::read_dir(fixtures_dir().join("llama-optimum-past")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        match name.as_str() {
            "model.onnx" => std::fs::copy(&path, repo.join("onnx/model_q4.onnx")).unwrap(),
            "config.json" => {
                let mut config: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
                config["_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct".into();
                std::fs::write(repo.join(&name), config.to_string()).unwrap();
                0
            }
            n if n.ends_with(".json") && n != "fixture.json" => {
                std::fs::copy(&path, repo.join(&name)).unwrap()
            }
            _ => 0,
        };
    }
    repo
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        walk(dir).iter().map(|p| p.strip_prefix(dir).unwrap().display().to_string()).collect();
    names.sort();
    names
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flat_map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() { walk(&p) } else { vec![p] }
        })
        .collect()
}

/// The onnx/ layout in: the tokenizer and config one folder up are found (built-in text needs the
/// tokenizer; `check` and `eval` too). Out: `-o DIR/` writes a repository of the same layout with
/// the companion files at its root and a model card; a variant beside the input writes only itself.
#[test]
fn the_onnx_folder_layout_is_read_and_reproduced_with_a_model_card() {
    let root = tempfile::tempdir().unwrap();
    let repo = hub_repo(root.path());
    let model = repo.join("onnx/model_q4.onnx");
    let new = root.path().join("new");
    let dir_arg = format!("{}/", new.display());
    let rewrite_into_new = || {
        ok(nbl(&[
            "rewrite",
            model.to_str().unwrap(),
            "--samples",
            "4",
            "--seq-len",
            "32",
            "--layers",
            "1",
            "-o",
            &dir_arg,
        ]))
    };
    rewrite_into_new();
    assert_eq!(
        files(&new),
        [
            "README.md",
            "config.json",
            "generation_config.json",
            "onnx/model_q4.nbl.json",
            "onnx/model_q4.onnx",
            "special_tokens_map.json",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(new.join("onnx/model_q4.nbl.json")).unwrap()).unwrap();
    assert_eq!(report["report"], new.join("onnx/model_q4.nbl.json").display().to_string());
    assert!(report["command"].as_str().unwrap().starts_with("nbl-onnx rewrite "), "{report}");
    // The companion files are the input's.
    for name in ["tokenizer.json", "config.json"] {
        assert_eq!(std::fs::read(new.join(name)).unwrap(), std::fs::read(repo.join(name)).unwrap(), "{name}");
    }
    let card = std::fs::read_to_string(new.join("README.md")).unwrap();
    assert!(
        card.starts_with(
            "---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: onnx\ntags:\n- onnx\n- nbl\n"
        ),
        "{card}"
    );
    let replaced = report["rewrite"]["units"][0]["layer"].as_u64().unwrap();
    assert!(card.contains(&format!("- Units: attention {replaced}.")), "{card}");
    assert!(card.contains("Not measured yet."), "{card}");

    // The output reads the same way: check finds its tokenizer one folder up, and decodes.
    let out = new.join("onnx/model_q4.onnx");
    let checked =
        ok(nbl(&["check", out.to_str().unwrap(), "--reference", model.to_str().unwrap(), "--json"]));
    let check_path = root.path().join("check.json");
    std::fs::write(&check_path, &checked.stdout).unwrap();
    let check: serde_json::Value = serde_json::from_slice(&checked.stdout).unwrap();
    assert!(
        check["notes"].as_array().unwrap().iter().all(|n| !n.as_str().unwrap().contains("tokenizer")),
        "{check}"
    );
    assert!(check["command"].as_str().unwrap().starts_with("nbl-onnx check "), "{check}");

    // `card` writes it again with the check's numbers and command.
    let report_path = new.join("onnx/model_q4.nbl.json");
    ok(nbl(&["card", report_path.to_str().unwrap(), "--check", check_path.to_str().unwrap()]));
    let card = std::fs::read_to_string(new.join("README.md")).unwrap();
    let kl = check["reference"]["mean_kl"].as_f64().unwrap();
    assert!(card.contains(&format!("`check` passed: mean KL(original ‖ this) {kl:.4}")), "{card}");
    assert!(card.contains("\nnbl-onnx check "), "{card}");
    // A README.md of the user's is never written over: refused by `card`, kept by `rewrite`.
    std::fs::write(new.join("README.md"), "# my notes\n").unwrap();
    assert_bad_input(&nbl(&["card", report_path.to_str().unwrap()]), "not a model card nbl-onnx wrote");
    let again = rewrite_into_new();
    assert!(
        stderr(&again).contains("is not a model card nbl-onnx wrote; it is left as it is"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read_to_string(new.join("README.md")).unwrap(), "# my notes\n");

    // A variant beside the input (the default name) writes the model and its report, nothing else.
    let before = files(&repo);
    ok(nbl(&["rewrite", model.to_str().unwrap(), "--samples", "4", "--seq-len", "32", "--layers", "1"]));
    let mut expected = before.clone();
    expected.extend(["onnx/model_q4.nbl.json".to_string(), "onnx/model_q4.nbl.onnx".to_string()]);
    expected.sort();
    assert_eq!(files(&repo), expected);
}

/// A Python with Optimum's ONNX Runtime models: `NBL_OPTIMUM_PYTHON`, else the fixture script's
/// export virtualenv where it exists.
fn optimum_python() -> Option<PathBuf> {
    let candidates = std::env::var_os("NBL_OPTIMUM_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain(std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/nbl-onnx/py/export/bin/python")));
    candidates.into_iter().find(|p| {
        std::process::Command::new(p)
            .args(["-c", "import optimum.onnxruntime"])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Optimum's `ORTModelForCausalLM.from_pretrained` loads a rewrite (layer 1's attention replaced,
/// its KV cache gone) from the folder `rewrite` wrote, flat as Optimum exports and in the onnx/
/// layout, and `generate` gives the greedy tokens `nbl-onnx check` decoded from the same prompt.
#[test]
fn optimum_generates_with_a_rewritten_model_what_check_decodes() {
    let Some(python) = optimum_python() else {
        eprintln!(
            "skipped: no Python with optimum-onnx (set NBL_OPTIMUM_PYTHON, or make the export virtualenv: \
             scripts/fixtures/make-fixtures.py)"
        );
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let repo = hub_repo(root.path());
    let flat = root.path().join("flat");
    std::fs::create_dir(&flat).unwrap();
    copy_fixture("llama-optimum-past", &flat);
    let prompt: Vec<i64> = (0..32).map(|i| (i * 37 + 11) % 500 + 3).collect();
    let ids = root.path().join("ids.json");
    std::fs::write(&ids, serde_json::to_string(&prompt).unwrap()).unwrap();
    let data = root.path().join("prompt.json");
    std::fs::write(&data, serde_json::json!([{ "input_ids": prompt }]).to_string()).unwrap();
    let steps = "12";
    // (input, -o, the output's repository folder, subfolder, file name)
    let cases = [
        (flat.join("model.onnx"), root.path().join("flat-nbl/model.onnx"), "flat-nbl", "", "model.onnx"),
        (repo.join("onnx/model_q4.onnx"), root.path().join("hub-nbl/"), "hub-nbl", "onnx", "model_q4.onnx"),
    ];
    for (input, output, out_repo, subfolder, file_name) in cases {
        let output = output.to_str().unwrap();
        ok(nbl(&[
            "rewrite",
            input.to_str().unwrap(),
            "--samples",
            "4",
            "--seq-len",
            "32",
            "--layer-ids",
            "1",
            "-o",
            output,
        ]));
        let out_repo = root.path().join(out_repo);
        let model = out_repo.join(subfolder).join(file_name);
        let checked = ok(nbl(&[
            "check",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--prompt-len",
            "32",
            "--prompts",
            "1",
            "--decode-steps",
            steps,
            "--json",
        ]));
        let check: serde_json::Value = serde_json::from_slice(&checked.stdout).unwrap();
        let decoded = decoded(&check, "onnxruntime");
        assert_eq!(decoded.len(), 12, "{check}");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/tests/optimum_generate.py");
        let run = std::process::Command::new(&python)
            .arg(&script)
            .args([out_repo.to_str().unwrap(), subfolder, file_name, ids.to_str().unwrap(), steps])
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let generated: Vec<i64> = serde_json::from_slice(&run.stdout).unwrap();
        eprintln!("{}: Optimum generate {generated:?}; nbl-onnx check {decoded:?}", model.display());
        assert_eq!(generated, decoded, "{}", model.display());
    }
}

/// In the onnx/ layout: a folder of several models names them all; a tokenizer one folder up that
/// belongs to a larger vocabulary is refused naming it.
#[test]
fn a_hub_repository_is_refused_where_it_is_ambiguous_or_its_tokenizer_is_another_models() {
    let root = tempfile::tempdir().unwrap();
    let repo = hub_repo(root.path());
    std::fs::copy(repo.join("onnx/model_q4.onnx"), repo.join("onnx/model_fp16.onnx")).unwrap();
    for dir in [repo.join("onnx"), repo.clone()] {
        let out = nbl(&["rewrite", dir.to_str().unwrap()]);
        assert_bad_input(
            &out,
            "is a directory, not an ONNX model file: it holds 2 models; name the one to use",
        );
        let err = stderr(&out);
        assert!(err.contains("onnx/model_fp16.onnx") && err.contains("onnx/model_q4.onnx"), "{err}");
    }
    // A word-level tokenizer of 1001 tokens where the model embeds 512.
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..1001).map(|i| (if i == 0 { "[UNK]".to_string() } else { format!("w{i}") }, i.into())).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(repo.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let model = repo.join("onnx/model_q4.onnx");
    for args in [
        vec!["rewrite", model.to_str().unwrap(), "--samples", "2", "--seq-len", "16"],
        vec!["check", model.to_str().unwrap()],
    ] {
        // (`rewrite` says first which data it reads.)
        let out = nbl(&args);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let needle = format!("error: tokenizer {} has 1001 tokens", repo.join("tokenizer.json").display());
        assert!(stderr(&out).contains(&needle), "{}", stderr(&out));
    }
}
