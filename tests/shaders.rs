//! Every shader in shaders/ parses and validates with naga, with the
//! workgroup sizes the adapters use substituted, and without subgroup
//! operations unless it is the variant that needs them. Needs no GPU.

use d2l_wgpu::gpu::Shader;
use naga::valid::{Capabilities, ValidationFlags, Validator};
use std::collections::BTreeSet;

#[test]
fn every_shader_file_is_registered() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".wgsl") && n != "prelude.wgsl")
        .collect();
    let registered: BTreeSet<String> = Shader::ALL
        .iter()
        .flat_map(|s| [Some(s.file_name()), s.part().map(|(name, _)| name)])
        .flatten()
        .map(str::to_string)
        .collect();
    assert_eq!(
        on_disk, registered,
        "shaders/ and gpu::Shader::ALL must list the same files"
    );
}

#[test]
fn every_shader_validates() {
    for shader in Shader::ALL {
        let name = shader.file_name();
        let module = naga::front::wgsl::parse_str(&shader.source())
            .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(&shader.source())));
        // Only the shaders that say so may need subgroups.
        let (capabilities, subgroup_stages) = if shader.needs_subgroups() {
            (Capabilities::SUBGROUP, naga::valid::ShaderStages::COMPUTE)
        } else {
            (Capabilities::empty(), naga::valid::ShaderStages::empty())
        };
        let info = Validator::new(ValidationFlags::all(), capabilities)
            .subgroup_stages(subgroup_stages)
            .subgroup_operations(naga::valid::SubgroupOperationSet::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert!(!module.entry_points.is_empty(), "{name} has no entry point");
        for workgroup in [8.0, 64.0, 256.0] {
            let constants = naga::back::PipelineConstants::from([("WG".to_string(), workgroup)]);
            for entry in &module.entry_points {
                naga::back::pipeline_constants::process_overrides(
                    &module,
                    &info,
                    Some((naga::ShaderStage::Compute, &entry.name)),
                    &constants,
                )
                .unwrap_or_else(|e| panic!("{name}::{} with WG={workgroup}: {e:?}", entry.name));
            }
        }
    }
}
