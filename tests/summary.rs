//! `summary` against PyTorch's per-layer output shapes and parameter counts
//! (tests/golden/summaries.txt, d2l's layer_summary at each default resize).

use d2l_wgpu::models::{self, MODELS};

/// The golden file's section for `model`: (layer lines, parameter count).
fn golden_section(model: &str) -> (Vec<String>, usize) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/summaries.txt");
    let text = std::fs::read_to_string(path).unwrap();
    // The golden file names the models as d2l's code does.
    let name = match model {
        "resnet" => "resnet18".to_string(),
        other => other.replace('-', "_"),
    };
    let header = format!("=== {name}: ");
    let mut lines = text.lines().skip_while(|l| !l.starts_with(&header));
    let head = lines
        .next()
        .unwrap_or_else(|| panic!("no section for {model}"));
    let count = head
        .split("params ")
        .nth(1)
        .unwrap()
        .split(", fwd")
        .next()
        .unwrap();
    let params: usize = count.replace(',', "").parse().unwrap();
    let layers = lines
        .take_while(|l| !l.trim().is_empty() && !l.starts_with("==="))
        .map(String::from)
        .collect();
    (layers, params)
}

#[test]
fn summaries_match_pytorch_at_default_sizes() {
    for spec in MODELS {
        let summary = models::summary(spec, spec.resize).unwrap();
        let (layers, params) = golden_section(spec.name);
        assert_eq!(summary.lines(), layers, "{}", spec.name);
        assert_eq!(summary.params, params, "{} parameter count", spec.name);
    }
}

#[test]
fn lenet_cannot_take_a_smaller_input() {
    // 8 -> conv (padding 2) 8 -> pool 4: the second 5x5 convolution does not fit.
    let err = models::summary(models::find("lenet").unwrap(), 8)
        .err()
        .expect("8x8 is too small");
    let message = format!("{err:#}");
    assert!(
        message.contains("lenet at --resize 8: layer 3 (Conv2d)"),
        "{message}"
    );
    assert!(message.contains("does not fit"), "{message}");
}
