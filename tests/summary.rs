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

/// The same shape rules at 64x64, where PyTorch's floor((in + 2p - k) / s) + 1
/// gives: stem convolution 7x7/2 (padding 3) 64 -> 32, max pool 3x3/2
/// (padding 1) 32 -> 16, then every halving stage 16 -> 8 -> 4 -> 2.
#[test]
fn summaries_follow_the_shape_rules_at_64() {
    let expected: [(&str, &[&str]); 3] = [
        (
            "googlenet",
            &[
                "(1, 64, 16, 16)",
                "(1, 192, 8, 8)",
                "(1, 480, 4, 4)",
                "(1, 832, 2, 2)",
                "(1, 1024)",
                "(1, 10)",
            ],
        ),
        (
            "resnet",
            &[
                "(1, 64, 16, 16)",
                "(1, 64, 16, 16)",
                "(1, 128, 8, 8)",
                "(1, 256, 4, 4)",
                "(1, 512, 2, 2)",
                "(1, 512, 1, 1)",
                "(1, 512)",
                "(1, 10)",
            ],
        ),
        (
            "densenet",
            &[
                "(1, 64, 16, 16)",
                "(1, 192, 16, 16)",
                "(1, 96, 8, 8)",
                "(1, 224, 8, 8)",
                "(1, 112, 4, 4)",
                "(1, 240, 4, 4)",
                "(1, 120, 2, 2)",
                "(1, 248, 2, 2)",
                "(1, 248, 2, 2)",
                "(1, 248, 2, 2)",
                "(1, 248, 1, 1)",
                "(1, 248)",
                "(1, 10)",
            ],
        ),
    ];
    for (model, shapes) in expected {
        let spec = models::find(model).unwrap();
        let at_64 = models::summary(spec, 64).unwrap();
        let got: Vec<String> = at_64
            .lines()
            .iter()
            .map(|l| l.rsplit('\t').next().unwrap().to_string())
            .collect();
        assert_eq!(got, shapes, "{model} at 64");
        // Parameter counts do not depend on the input size here: every
        // model ends in global pooling before its classifier.
        assert_eq!(
            at_64.params,
            models::summary(spec, spec.resize).unwrap().params
        );
    }
}
