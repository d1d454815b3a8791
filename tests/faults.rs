//! GPU faults surface as errors that say what was being done, not as
//! aborts, hangs or silently wrong numbers.

mod common;

use anyhow::Result;
use d2l_wgpu::gpu::Shader;
use d2l_wgpu::graph::{
    Binding, DType, Externals, Graph, Init, Op, ParamStore, Plan, PlanContext, Shape, Tensor,
    TensorId,
};

/// ReLU whose output is bound to a uniform-only buffer: a mistake wgpu's
/// validation catches when the bind group is created.
#[derive(Debug)]
struct MisboundRelu;

impl Op for MisboundRelu {
    fn describe(&self) -> String {
        "misbound relu".into()
    }

    fn infer(&self, inputs: &[&Tensor]) -> Result<Vec<(Shape, DType)>> {
        Ok(vec![(inputs[0].shape.clone(), DType::F32)])
    }

    fn plan(
        &self,
        ctx: &mut PlanContext,
        inputs: &[TensorId],
        _outputs: &[TensorId],
    ) -> Result<()> {
        let len = ctx.len(inputs[0]);
        let not_storage = ctx.gpu.uniform_buffer("not storage", &vec![0u8; 4 * len]);
        let params = [
            len as u32, 0, 0, 0, 0, 0, 1, len as u32, 1, len as u32, 1, len as u32, 1, len as u32,
            0, 0,
        ];
        ctx.dispatch(
            Shader::Eltwise,
            "relu_forward",
            &params,
            &[
                (1, ctx.binding(inputs[0])),
                (4, Binding::whole(&not_storage)),
            ],
            len,
        )
    }
}

/// A validation error while planning names the op and its tensor shapes.
#[test]
fn a_validation_error_names_the_op_and_shapes() {
    let gpu = common::gpu();
    let mut g = Graph::new(false);
    let x = g.param("x".into(), vec![2, 3, 5], Init::Zeros);
    g.apply1(MisboundRelu, &[x]).unwrap();
    let store = ParamStore::new(&gpu, &g).unwrap();
    let err = Plan::new(&gpu, &g, &store, &Externals::new())
        .err()
        .expect("planning fails");
    let message = format!("{err:#}");
    assert!(
        message.contains(
            "planning misbound relu (inputs [2, 3, 5]; outputs [2, 3, 5]): GPU validation error"
        ),
        "{message}"
    );
    println!("{message}");
    // The error was taken by the scope: the device carries on.
    gpu.check_errors().unwrap();
}

/// A buffer beyond the adapter's per-buffer limit is refused up front with
/// the numbers, before wgpu sees it.
#[test]
fn a_buffer_beyond_the_adapter_limit_is_refused_with_the_numbers() {
    let gpu = common::gpu();
    let too_big = gpu.limits.max_buffer_size + 4;
    let err = gpu
        .storage_buffer("huge", too_big)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&format!(
            "needs {too_big} bytes but the adapter allows at most {}",
            gpu.limits.max_buffer_size
        )),
        "{err}"
    );
    assert!(
        err.contains("try a smaller --batch-size or --resize"),
        "{err}"
    );
}

/// A lost device (here destroyed on purpose) is reported by the next wait
/// or readback, with the reason, instead of hanging or aborting.
#[test]
fn a_lost_device_is_reported_not_hung() {
    let gpu = common::gpu();
    let buffer = gpu.storage_buffer("before the loss", 16).unwrap();
    gpu.device.destroy();
    let waited = gpu
        .wait()
        .and_then(|_| gpu.read_f32(&buffer, 0, 4).map(|_| ()));
    let message = format!("{:#}", waited.expect_err("the loss is reported"));
    println!("{message}");
    assert!(
        message.contains("the GPU device was lost (Destroyed)"),
        "{message}"
    );
}

/// Running out of memory while allocating a layer's buffers is reported
/// with the layer and the sizes, and exits 2. lavapipe's device memory is
/// host memory, so capping the process's address space (`ulimit -v`, here
/// 1.5 GB against AlexNet's 143 MB first activation at batch 128) makes its
/// allocations fail for real.
#[test]
fn running_out_of_gpu_memory_names_the_layer_and_sizes() {
    let out = std::process::Command::new("sh")
        .args(["-c", r#"ulimit -v 1500000 && exec "$0" "$@""#])
        .arg(env!("CARGO_BIN_EXE_d2l-wgpu"))
        .args([
            "--model",
            "alexnet",
            "--limit-train",
            "128",
            "--limit-test",
            "128",
        ])
        .args(["--epochs", "1", "--quiet"])
        .env("XDG_RUNTIME_DIR", "/tmp")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{err}");
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for part in [
        "error: the output [128, ",
        ": allocating buffer \"",
        "the GPU is out of memory",
        "try a smaller --batch-size or --resize",
    ] {
        assert!(err.contains(part), "{part:?} missing from {err}");
    }
}
