"""`launcher bench` arithmetic and matrix expansion, without training: comma lists, the product of
axes, MFU/HFU from the FLOPs per token (checked against an independent count from the model's
shape), the cost formula, the timed window, and the shipped matrices."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launcher.bench import matrix, report
from launcher.bench.run import RANK_ENTRY, rank_command
from launcher.config.resolve import resolve
from launcher.errors import UserError
from launcher.plan.plan import make_plan
from launcher.plan.price import usd_per_mtok_at
from launcher.rundir.layout import RunDir

ROOT = Path(__file__).resolve().parents[2]


def cpu_spec(**sets):
    items = [f"{k}={v}" for k, v in {"model.name": "tiny", "cluster.gpus_per_node": 0, "precision.dtype": "fp32",
                                     "data.seq_len": 64, **sets}.items()]
    return resolve(None, sets=items)


# --------------------------------------------------------------------------- comma lists, matrices

def test_comma_lists_become_typed_axis_values():
    assert matrix.parse_axis("zero", "2,3") == [2, 3]
    assert matrix.parse_axis("micro_batch", " 1, 2 ,4") == [1, 2, 4]
    assert matrix.parse_axis("grad_ckpt", "on,off") == [True, False]
    assert matrix.parse_axis("grad_ckpt", [True]) == [True]
    assert matrix.parse_axis("method", "full,lora") == ["full", "lora"]
    assert matrix.parse_axis("seq_len", [128, 256]) == [128, 256]

    assert matrix.parse_axis("zero", "auto,0") == ["auto", 0]
    assert matrix.parse_axis("loss", "standard,chunked,auto") == ["standard", "chunked", "auto"]
    assert matrix.parse_axis("compile", "on,off") == [True, False]
    assert matrix.parse_axis("precision", "auto,fp32") == ["auto", "fp32"]


def test_lever_axes_expand_into_specs_and_the_row_says_what_auto_became():
    setups = matrix.expand(cpu_spec(**{"optim.micro_batch": 8, "data.seq_len": 512}),
                           {"zero": [2, "auto"], "loss": ["standard", "auto"], "compile": [False, True]})
    assert len(setups) == 8 and all(s.error is None for s in setups)
    last = setups[-1]
    assert (last.spec.zero.stage, last.spec.optim.loss, last.spec.model.compile) == ("auto", "auto", True)
    assert last.label == "full zauto auto nockpt mb8 s512 fp32 auto compile"
    opts = matrix.Options(steps=1, warmup=0)
    row = report.make_row(last.spec, last.values, "launcher", [], opts)
    plan = make_plan(last.spec)
    assert (row["zero"], row["loss"], row["compile"], row["optimizer"]) == (0, plan.loss, True, plan.optimizer)
    assert report._ran_as(row).startswith("z0 ") and row["setup"] == last.label


@pytest.mark.parametrize("axis,text", [("zero", "2,,3"), ("loss", "fast"), ("compile", "perhaps"), ("zero", "two"), ("grad_ckpt", "maybe"),
                                       ("micro_batch", "1,1"), ("seq_len", ""), ("colour", "red")])
def test_bad_comma_lists_are_refused_with_the_flag_named(axis, text):
    with pytest.raises(UserError) as e:
        matrix.parse_axis(axis, text)
    assert e.value.exit_code == 2


def test_matrix_expands_to_the_product_first_axis_slowest():
    spec = cpu_spec(**{"optim.micro_batch": 4})
    setups = matrix.expand(spec, {"method": ["full", "lora"], "zero": [2, 3], "grad_ckpt": [False, True]})
    assert len(setups) == 8
    assert [(s.values["method"], s.values["zero"], s.values["grad_ckpt"]) for s in setups[:3]] == [
        ("full", 2, False), ("full", 2, True), ("full", 3, False)]
    for s in setups:
        assert s.error is None
        assert (s.spec.method.name, s.spec.zero.stage, s.spec.model.grad_ckpt) == (
            s.values["method"], s.values["zero"], s.values["grad_ckpt"])
        assert s.spec.optim.micro_batch == 4 == s.values["micro_batch"]  # an axis not given keeps the spec's value
    assert len({s.label for s in setups}) == 8


def test_a_combination_the_spec_refuses_is_a_setup_with_its_error():
    setups = matrix.expand(cpu_spec(), {"attn": ["sdpa", "flash2"]})  # flash2 needs bf16/fp16
    assert setups[0].error is None and setups[0].spec is not None
    assert setups[1].spec is None and "flash2" in setups[1].error


def test_baselines_are_shared_by_setups_that_differ_only_in_zero_stage():
    setups = matrix.expand(cpu_spec(), {"method": ["full", "lora"], "zero": [2, 3]})
    assert [matrix.baseline_label(s.values) for s in matrix.baseline_setups(setups)] == [
        "HF baseline full sdpa nockpt mb1 s64", "HF baseline lora sdpa nockpt mb1 s64"]


def test_bench_spec_runs_warmup_plus_steps_plus_the_memory_step(tmp_path):
    spec = matrix.bench_spec(cpu_spec(**{"optim.warmup_steps": 50}), tmp_path, steps=5, warmup=2, index=0)
    assert spec.optim.max_steps == 8
    assert spec.optim.warmup_steps == 7  # an LR warm-up longer than the bench is clipped, not refused
    assert (spec.output.save_every, spec.output.resume, spec.data.eval_fraction) == (0, "never", 0.0)


def test_bench_flags_replace_the_matrix_axes_and_shared_flags_apply_to_all(tmp_path):
    from click.testing import CliRunner

    from launcher.commands.bench_cmd import bench as cmd

    out = tmp_path / "arr"
    res = CliRunner().invoke(cmd, ["--matrix", str(ROOT / "benchmarks/matrices/cpu_tiny.yaml"), "--method", "lora",
                                   "--seq-len", "64,96", "--micro-batch", "1", "--lr", "1e-3", "--slurm",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    tasks = json.loads(RunDir(out).bench_settings.read_text())["tasks"]
    runs = [t for t in tasks if t["kind"] == "launcher"]
    assert len(runs) == 1 * 2 * 2 * 1 * 2  # lora x zero{2,3} x ckpt{off,on} x mb1 x seq{64,96}
    assert {t["values"]["method"] for t in runs} == {"lora"} and {t["values"]["seq_len"] for t in runs} == {64, 96}
    assert len([t for t in tasks if t["kind"] == "baseline"]) == 4  # zero stages share one baseline
    spec = resolve(out / "tasks" / "0" / "spec.yaml")
    assert spec.optim.lr == 1e-3 and spec.precision.dtype == "fp32"  # the matrix base, under the flags
    script = (out / "job.sbatch").read_text()
    assert '-m launcher.bench.probe rank "$SPEC"' in script and "-m launcher train" not in script
    assert f"--array=0-{len(tasks) - 1}" in script


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "matrices").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_matrices_parse_and_expand(path):
    m = matrix.load_matrix(path)
    setups = matrix.expand(matrix.resolve_base(m.base, None, {}, []), m.axes)
    assert setups and all(s.error is None for s in setups), [s.error for s in setups]
    assert m.steps and m.warmup is not None and m.usd_per_device_hour


def test_unknown_matrix_keys_are_refused(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("axes: {zero: [2]}\nstep: 3\n")
    with pytest.raises(UserError, match="step"):
        matrix.load_matrix(p)


# --------------------------------------------------------------------------- arithmetic

def test_usd_per_mtok_is_price_times_devices_over_tokens():
    assert usd_per_mtok_at(2.5, 8, 10_000) == pytest.approx(2.5 * 8 / 3600 / 10_000 * 1e6)
    assert usd_per_mtok_at(None, 8, 10_000) is None
    assert usd_per_mtok_at(2.5, 8, None) is None


def test_timed_window_leaves_the_warmup_steps_out():
    ends = [10.0, 11.0, 11.5, 12.0, 12.5]
    assert report.timed_window(9.0, ends, warmup=2, steps=3) == pytest.approx(1.5)
    assert report.timed_window(9.0, ends, warmup=0, steps=2) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        report.timed_window(9.0, ends, warmup=3, steps=3)
    cols = report.measured_columns([{"rank": 0, "world_size": 2, "t_begin": 9.0, "step_ends": ends, "error": None}],
                                  tokens_per_step=100, warmup=1, steps=4)
    assert cols["tokens_per_s"] == pytest.approx(4 * 100 / 2.5) and cols["tokens_per_s_per_device"] == pytest.approx(80)
    assert cols["step_time_s"] == pytest.approx(2.5 / 4) and cols["step_time_median_s"] == pytest.approx(0.5)


@pytest.mark.parametrize("name,key", [("NVIDIA H100 80GB HBM3", "H100-80GB"), ("NVIDIA H200", "H200"),
                                      ("NVIDIA A100-SXM4-40GB", "A100-40GB"), ("NVIDIA L4", "L4"),
                                      ("NVIDIA L40S", "L40S"), ("cpu (2 cores)", None)])
def test_torch_device_names_map_to_the_device_table(name, key):
    assert report.device_key(name) == key


def _record(step_s: float, steps: int, warmup: int, **extra):
    t0 = 100.0
    return {"rank": 0, "world_size": 1, "t_begin": t0, "step_ends": [t0 + step_s * (i + 1) for i in range(warmup + steps + 1)],
            "error": None, **extra}


def _independent_flops(cfg: dict, seq: int, lora_r: int | None = None) -> tuple[float, float, float]:
    """(matmul weights, LoRA weights, attention FLOPs per token) from the published shape."""
    h, layers, heads, kv = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, inter, vocab = h // heads, cfg["intermediate_size"], cfg["vocab_size"]
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter
    matmul = layers * per_layer + vocab * h
    lora = 0.0
    if lora_r:
        shapes = [(h, heads * d), (h, kv * d), (h, kv * d), (heads * d, h), (h, inter), (h, inter), (inter, h)]
        lora = layers * sum(lora_r * (a + b) for a, b in shapes)
    attn = 12 * layers * heads * d * seq / 2
    return matmul, lora, attn


def test_mfu_and_hfu_on_an_h100_follow_from_measured_tokens_and_the_flops_per_token(llama8b_dir):
    cfg = json.loads((llama8b_dir / "config.json").read_text())
    spec = resolve(None, sets=[f"model.name={llama8b_dir}", "cluster.gpus_per_node=1", "data.seq_len=2048",
                               "optim.micro_batch=2", "model.grad_ckpt=true", "precision.dtype=bf16"])
    opts = matrix.Options(steps=4, warmup=2, usd_per_device_hour=3.0)
    rec = _record(2.0, 4, 2, device="NVIDIA H100 80GB HBM3", cuda_peak_allocated=60 * 2**30,
                  cuda_peak_reserved=70 * 2**30)
    values = {"method": "full", "zero": 2, "attn": "auto", "grad_ckpt": True, "micro_batch": 2, "seq_len": 2048}
    row = report.make_row(spec, values, "launcher", [rec], opts)
    tps = 2 * 2048 / 2.0
    assert row["tokens_per_s"] == pytest.approx(tps) and row["step_time_s"] == pytest.approx(2.0)
    matmul, _, attn = _independent_flops(cfg, 2048)
    model = 6 * matmul + attn
    hardware = model + 2 * matmul + attn / 3  # checkpointing runs the forward again
    assert row["model_flops_per_token"] == pytest.approx(model)
    assert row["hardware_flops_per_token"] == pytest.approx(hardware)
    assert row["peak_tflops_per_device"] == 989.4
    assert row["mfu"] == pytest.approx(tps * model / 1e12 / 989.4)
    assert row["hfu"] == pytest.approx(tps * hardware / 1e12 / 989.4)
    assert row["usd_per_mtok"] == pytest.approx(3.0 * 1 / 3600 / tps * 1e6)
    assert row["peak_mem_bytes"] == 60 * 2**30 and row["peak_mem_reserved_bytes"] == 70 * 2**30
    assert row["est_mem_basis"] == "peak vs CUDA max allocated"
    assert row["mem_error"] == pytest.approx(row["est_peak_bytes"] / (60 * 2**30) - 1)
    assert row["tokens_per_s_error"] == pytest.approx(row["est_tokens_per_s"] / tps - 1)


def test_lora_model_flops_count_frozen_weights_at_four_per_token(llama8b_dir):
    cfg = json.loads((llama8b_dir / "config.json").read_text())
    spec = resolve(None, sets=[f"model.name={llama8b_dir}", "cluster.gpus_per_node=1", "data.seq_len=1024",
                               "method.name=qlora", "method.lora.r=16", "precision.dtype=bf16"])
    values = {"method": "qlora", "zero": 2, "attn": "auto", "grad_ckpt": False, "micro_batch": 1, "seq_len": 1024}
    row = report.make_row(spec, values, "launcher", [_record(1.0, 3, 1, device="NVIDIA H100 80GB HBM3")],
                         matrix.Options(steps=3, warmup=1))
    matmul, lora, attn = _independent_flops(cfg, 1024, lora_r=16)
    assert row["model_flops_per_token"] == pytest.approx(4 * matmul + 6 * lora + attn)
    assert row["hfu"] == pytest.approx(row["mfu"])  # no recomputation without checkpointing
    assert "frozen base weights count 4" in row["flops_note"]
    assert row["usd_per_mtok"] is None  # no price given


def test_on_cpu_mfu_is_null_unless_a_peak_is_given():
    spec = cpu_spec()
    values = {"method": "full", "zero": 2, "attn": "auto", "grad_ckpt": False, "micro_batch": 1, "seq_len": 64}
    rec = _record(0.5, 3, 1, device="cpu (2 cores)", rss_peak_bytes=700 * 2**20,
                  tensor_bytes={"total": 80_000_000})
    row = report.make_row(spec, values, "launcher", [rec], matrix.Options(steps=3, warmup=1))
    assert row["mfu"] is None and row["hfu"] is None and row["model_tflops_per_device"] > 0
    assert row["peak_mem_bytes"] == 700 * 2**20  # RSS on CPU
    assert row["est_mem_basis"] == "model states vs engine tensor bytes"
    assert row["mem_error"] == pytest.approx(row["est_model_states_bytes"] / 80_000_000 - 1)
    row = report.make_row(spec, values, "launcher", [rec], matrix.Options(steps=3, warmup=1, device_tflops=0.5))
    assert row["mfu"] == pytest.approx(row["model_tflops_per_device"] / 0.5)
    # ZeRO-3: the gathered-layer allowance (forward and backward only) is left out of what the update holds
    z3 = report.make_row(cpu_spec(**{"zero.stage": 3}), dict(values, zero=3), "launcher", [rec],
                         matrix.Options(steps=3, warmup=1))
    gathered = z3["est_model_states_bytes"] - z3["est_mem_bytes"]
    assert gathered > 0 and z3["mem_error"] == pytest.approx(z3["est_mem_bytes"] / 80_000_000 - 1)


def test_a_rank_error_makes_a_row_with_the_error_and_no_throughput():
    spec = cpu_spec()
    values = {"method": "full", "zero": 2, "attn": "auto", "grad_ckpt": False, "micro_batch": 1, "seq_len": 64}
    rec = {**_record(0.5, 1, 0), "error": "out of memory: CUDA out of memory", "oom": True}
    row = report.make_row(spec, values, "launcher", [rec], matrix.Options(steps=3, warmup=1))
    assert row["error"].startswith("out of memory") and row["tokens_per_s"] is None and row["usd_per_mtok"] is None


def test_ratios_pair_each_setup_with_its_baseline():
    rows = [
        {"bench": "b", "kind": "launcher", "method": "full", "grad_ckpt": False, "micro_batch": 1, "seq_len": 64,
         "precision": "fp32", "devices": 1, "tokens_per_s": 300.0, "measured_mem_bytes": 90},
        {"bench": "b", "kind": "baseline", "method": "full", "grad_ckpt": False, "micro_batch": 1, "seq_len": 64,
         "precision": "fp32", "devices": 1, "tokens_per_s": 200.0, "measured_mem_bytes": 100, "error": None},
        {"bench": "b", "kind": "launcher", "method": "lora", "grad_ckpt": False, "micro_batch": 1, "seq_len": 64,
         "precision": "fp32", "devices": 1, "tokens_per_s": 300.0, "measured_mem_bytes": 90},
    ]
    report.attach_baseline(rows)
    assert rows[0]["speedup_vs_baseline"] == pytest.approx(1.5) and rows[0]["mem_vs_baseline"] == pytest.approx(0.9)
    assert rows[2].get("speedup_vs_baseline") is None  # no lora baseline


def test_bench_help_imports_no_torch():
    code = ("import sys\nfrom launcher.cli import main\ntry:\n    main(['bench', '--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'matplotlib') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "collect DIR" in proc.stdout


def test_bench_collect_imports_no_torch(tmp_path):
    spec = cpu_spec()
    values = {"method": "full", "zero": 2, "attn": "auto", "grad_ckpt": False, "micro_batch": 1, "seq_len": 64}
    row = report.make_row(spec, values, "launcher", [_record(0.5, 3, 1, device="cpu (2 cores)")],
                          matrix.Options(steps=3, warmup=1))
    report.write_results(tmp_path / "b", [row])
    code = ("import sys\nfrom launcher.cli import main\ntry:\n"
            f"    main(['bench', 'collect', {str(tmp_path / 'b')!r}])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = [m for m in ('torch', 'transformers', 'deepspeed') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "1 row(s) from 1 folder(s)" in proc.stdout and (tmp_path / "b" / report.PLOTS[0]).is_file()


# --------------------------------------------------------------------------- the ranks' entry

def test_bench_ranks_run_the_probe_entry_through_the_local_launch(tmp_path):
    plan = make_plan(cpu_spec())
    argv, env = rank_command(tmp_path / "run", plan)
    i = argv.index("--module")
    assert argv[i + 1:] == [*RANK_ENTRY, str(tmp_path / "run" / "spec.yaml")]
    assert RANK_ENTRY == ("launcher.bench.probe", "rank") and env["LAUNCHER_RUN_DIR"] == str(tmp_path / "run")


def test_the_probe_entry_takes_rank_and_one_spec_path():
    proc = subprocess.run([sys.executable, "-m", "launcher.bench.probe", "train", "x.yaml"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "usage: python -m launcher.bench.probe rank RUN_DIR/spec.yaml" in proc.stderr
