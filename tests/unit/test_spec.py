"""The run spec: precedence, YAML traps, unknown keys, clashing options, one clear message each."""

from __future__ import annotations

import textwrap

import pytest

from launcher.config.resolve import resolve
from launcher.config.spec import RunSpec
from launcher.errors import SpecError


def write(tmp_path, text: str):
    p = tmp_path / "spec.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_resolve_without_a_file():
    spec = resolve()
    assert isinstance(spec, RunSpec)
    assert spec.zero.stage == "auto" and spec.precision.dtype == "auto" and spec.optim.loss == "auto"
    assert spec.model.name == "tiny" and spec.model.compile is False


def test_precedence_is_file_then_flags_then_set(tmp_path):
    p = write(tmp_path, """
        optim: {lr: 1.0e-3, max_steps: 7}
        zero: {stage: 1}
    """)
    spec = resolve(p, flags={"zero": 3, "lr": None}, sets=["zero.stage=2", "optim.warmup_steps=3"])
    assert spec.zero.stage == 2          # --set beats the flag
    assert spec.optim.lr == 1e-3         # an absent flag (None) does not override the file
    assert spec.optim.max_steps == 7
    assert spec.optim.warmup_steps == 3


def test_profile_value_survives_spec_defaults(tmp_path):
    p = write(tmp_path, "optim: {lr: 0.001}\n")
    spec = resolve(p, profile={"cluster": {"partition": "gpu", "gpus_per_node": 8}})
    assert spec.cluster.partition == "gpu" and spec.cluster.gpus_per_node == 8


def test_yaml_time_and_exponent_keep_their_meaning(tmp_path):
    p = write(tmp_path, """
        optim: {lr: 1e-4}
        cluster: {time: 24:00:00}
    """)
    spec = resolve(p)
    assert spec.optim.lr == pytest.approx(1e-4)
    assert spec.cluster.time == "24:00:00"
    assert spec.cluster.time_seconds() == 86400


@pytest.mark.parametrize("value,seconds", [("90", 5400), ("1-00:00:00", 86400), ("30:00", 1800), ("2:00:00", 7200)])
def test_slurm_time_forms(value, seconds):
    assert resolve(sets=[f"cluster.time={value}"]).cluster.time_seconds() == seconds


def test_bare_number_time_means_minutes():
    assert resolve(sets=["cluster.time=120"]).cluster.time == "120"


def test_unknown_key_suggests_the_closest_and_lists_valid(tmp_path):
    p = write(tmp_path, "optim: {lrr: 0.1}\n")
    with pytest.raises(SpecError) as e:
        resolve(p)
    msg = str(e.value)
    assert "unknown key 'optim.lrr'" in msg and "Did you mean 'optim.lr'" in msg and "max_steps" in msg


def test_unknown_top_level_section():
    with pytest.raises(SpecError, match="Did you mean 'model'"):
        resolve(sets=["modle.name=x"])


def test_every_problem_is_reported_at_once():
    with pytest.raises(SpecError) as e:
        resolve(sets=["zero.stage=5", "optim.micro_batch=0", "precision=fp8"])
    assert len(e.value.problems) == 3


@pytest.mark.parametrize(
    "sets,needle",
    [
        (["zero.stage=2", "zero.offload_param=cpu"], "needs ZeRO stage 3"),
        (["zero.stage=0", "zero.offload_optimizer=cpu"], "needs ZeRO stage 1, 2 or 3"),
        (["zero.stage=3", "zero.offload_optimizer=nvme"], "zero.nvme_path"),
        (["precision=bf16", "zero.extra={fp16: {enabled: true}}"], "fp16 and bf16"),
        (["method.name=qlora", "precision=fp32"], "qlora computes in bf16 or fp16"),
        (["model.attn=flash2", "precision=fp32"], "flash2 runs only in bf16 or fp16"),
        (["optim.global_batch=8", "optim.global_batch_tokens=4096"], "not both"),
        (["zero.extra={train_batch_size: 8}"], "batch numbers are computed"),
        (["cluster.gpus_per_node=4", "cluster.nproc_per_node=8"], "one rank per GPU"),
        (["cluster.env={HF_TOKEN: abc}"], "secrets are not written"),
        (["optim.warmup_steps=100", "optim.max_steps=10"], "warmup"),
    ],
)
def test_clashing_options_are_refused_with_the_fix(sets, needle):
    with pytest.raises(SpecError, match=needle):
        resolve(sets=sets)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("optim: [1, 2]\n", "optim: expected a mapping"),
        ("optim: {lr: fast}\n", "optim.lr"),
        ("zero: {stage: two}\n", "zero.stage"),
        ("- a\n- b\n", "YAML mapping"),
        ("optim: {lr: 1e-4\n", "not valid YAML"),
        ("cluster: {time: soon}\n", "not a Slurm time"),
        ("cluster: {env: {'bad name': x}}\n", "environment variable name"),
    ],
)
def test_bad_files_name_the_field(tmp_path, text, needle):
    with pytest.raises(SpecError, match=needle):
        resolve(write(tmp_path, text))


def test_missing_spec_file():
    with pytest.raises(SpecError, match="does not exist"):
        resolve("/nonexistent/spec.yaml")


def test_set_value_syntax_is_checked():
    with pytest.raises(SpecError, match="dotted.key=value"):
        resolve(sets=["no_equals_sign"])


def test_set_parses_lists():
    spec = resolve(sets=["method.lora.target_modules=[q_proj, v_proj]"])
    assert spec.method.lora.target_modules == ["q_proj", "v_proj"]


def test_spec_is_immutable():
    spec = resolve()
    with pytest.raises(Exception):
        spec.optim.lr = 1.0  # type: ignore[misc]


def test_resolved_yaml_round_trips(tmp_path):
    spec = resolve(sets=["cluster.time=24:00:00", "optim.lr=3e-4", "name='x: y'"])
    p = tmp_path / "r.yaml"
    p.write_text(spec.to_yaml())
    assert resolve(p) == spec


def test_model_and_method_shorthands_in_a_spec_file(tmp_path):
    p = write(tmp_path, """
        model: tiny
        method: lora
        precision: fp32
    """)
    spec = resolve(p)
    assert (spec.model.name, spec.method.name, spec.precision.dtype) == ("tiny", "lora", "fp32")
    assert spec.to_dict()["model"]["name"] == "tiny" and spec.to_dict()["method"]["lora"]["r"] == 16  # full form


def test_shorthands_merge_field_by_field_across_layers(tmp_path):
    p = write(tmp_path, """
        model: {name: tiny, attn: eager}
        method: {name: lora, lora: {r: 4}}
    """)
    spec = resolve(p, sets=["model=other/model", "method=dora"])
    assert (spec.model.name, spec.model.attn) == ("other/model", "eager")
    assert (spec.method.name, spec.method.lora.r) == ("dora", 4)
    spec = resolve(write(tmp_path, "model: tiny\n"), sets=["model.attn=sdpa"], profile={"method": "ia3"})
    assert (spec.model.name, spec.model.attn, spec.method.name) == ("tiny", "sdpa", "ia3")


def test_a_wrong_shorthand_names_the_field_in_one_line(tmp_path):
    with pytest.raises(SpecError) as e:
        resolve(write(tmp_path, "method: lorax\n"))
    assert len(e.value.problems) == 1 and "\n" not in str(e.value)
    assert e.value.problems[0].startswith("method.name: 'lorax' is not allowed") and "'lora'" in str(e.value)
